"""Fast CPU inference of a Tucker-compressed network: an ONNX Runtime graph that travels inside the checkpoint.

The stock predictor builds the network from plans.json without telling it the model folder, then strict-loads
each fold's `network_weights` and calls `network(x)`. So the artefact lives in the state dict: the factorized
network (`FastPlainConvUNet` / `FastResidualEncoderUNet`, subclasses of the dense classes with one extra uint8
buffer, `ARTEFACT_KEY`) holds the serialized ONNX model of itself, exported at compression time at the plans' patch
size. Its metadata records a fingerprint of the weights it was exported from and the input shape.

`forward` runs the ONNX Runtime session only when the result is the eager network's: not training, no autograd,
a CPU float32 input of the exported shape, deep supervision off, onnxruntime importable, and the artefact's
fingerprint equal to the current weights (re-hashed on every call: a few ms against seconds of forward). In every
other case it runs the eager network and says why, once per reason per process (`nnunet_green.fast_path` logger).
A folder without the buffer (written before this existed) still strict-loads: `_load_from_state_dict` accepts
the entry missing or of another size.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import sys

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_green.contract import FAST_PATH_ARTEFACT_KEY as ARTEFACT_KEY
from nnunet_green.contract import GreenSettings

log = logging.getLogger("nnunet_green.fast_path")

# ONNX metadata keys of the artefact
META_FINGERPRINT = "nnunet_green.weights_sha256"
META_INPUT_SHAPE = "nnunet_green.input_shape"
META_VERSIONS = "nnunet_green.versions"
INPUT_NAME, OUTPUT_NAME = "input", "logits"

_EAGER = contextvars.ContextVar("nnunet_green_fast_path_eager", default=False)
_SESSIONS: dict[tuple[str, int], object] = {}   # (artefact sha256, threads) -> InferenceSession or Exception
_SAID: set[str] = set()                          # reasons already logged in this process


@contextlib.contextmanager
def eager():
    """Run the eager network inside this block, silently (export, verification, benchmarks of the eager path)."""
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)


def say_once(key: str, message: str, level: int = logging.WARNING) -> None:
    """Log `message` once per process for `key`; stderr when nothing is configured (the stock CLIs configure
    no logging, and this line is how a user sees which path ran)."""
    if key in _SAID:
        return
    _SAID.add(key)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("nnunet-green: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    log.log(level, message)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) except the artefact itself."""
    h = hashlib.sha256()
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if n != ARTEFACT_KEY]
    for name, t in tensors:
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        t = t.cpu().contiguous()
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"")
    return h.hexdigest()


def artefact_bytes(module: torch.nn.Module) -> bytes:
    blob = module._buffers.get(ARTEFACT_KEY)
    return b"" if blob is None or blob.numel() == 0 else blob.detach().cpu().numpy().tobytes()


def session_options(threads: int, lean_memory: bool = True):
    """ONNX Runtime CPU options of the fast path: all graph optimizations, `threads` intra-op threads, one
    inter-op thread. `lean_memory` turns ORT's memory patterns off (its arena stays on): with both on (ORT's
    default) the TS-1.5mm compressed session peaked at 4.0 GB from its second 128^3 call, as the planned block of the
    pattern comes on top of the arena's chunks from the first call; without patterns 2.7 GB
    (benchmarks/fast_path_memory.py). Without the arena instead, every call pays fresh page faults on its
    intermediate tensors (~10-20 % slower here). The compressed prediction must not need more memory than the dense
    one."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_mem_pattern = not lean_memory
    opts.log_severity_level = 3
    return opts


def _session(blob: bytes, digest: str):
    """The ONNX Runtime session of an artefact, built once per process (and thread count): folds share nothing,
    each has its own digest. Returns the session or the exception that prevented it."""
    import onnxruntime as ort

    threads = torch.get_num_threads()
    key = (digest, threads)
    if key not in _SESSIONS:
        opts = session_options(threads)
        try:
            _SESSIONS[key] = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # corrupt bytes, an opset this runtime lacks: ORT raises several types
            _SESSIONS[key] = e
    return _SESSIONS[key]


def _run_options():
    """Give the arena's free chunks back after every call: between tiles the predictor's own tensors (logits
    buffers, resampling, export) reuse that memory instead of adding to it; an arena that only grows made the
    whole `TotalSegmentator --fast` process peak ~0.85 GB above the dense one (docs/results/end_to_end_cpu.md)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


REBUILD_HINT = "Rebuild it with `nnunet-green-fastpath MODEL_FOLDER`"


def _call_reason(module, x: torch.Tensor) -> tuple[str, str, int] | None:
    """(reason key, log line, level) when this call must run eagerly whatever the artefact; None otherwise."""
    info = logging.INFO
    if module.training or torch.is_grad_enabled():
        return "autograd", ("training or autograd enabled: the eager network runs (the fast path is inference "
                            "only)"), info
    if x.device.type != "cpu":
        return "device", f"input on {x.device.type}: the eager network runs (the fast path is a CPU path)", info
    if x.dtype != torch.float32:
        return "dtype", f"{x.dtype} input: the eager network runs (the fast path is float32)", info
    if getattr(module.decoder, "deep_supervision", False):
        return "deep_supervision", "deep supervision on: the eager network runs", info
    if _has_hooks(module):
        return "hooks", "forward hooks on the network's layers: the eager network runs (the hooks see every layer)", info
    if not GreenSettings.from_env().fast_path:
        return "disabled", "fast CPU path disabled by nnUNet_green_fast_path=0: the eager network runs", info
    return None


def _has_hooks(module) -> bool:
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)


def artefact_status(module) -> tuple[str, str, object]:
    """("ok", "", session) when the stored artefact is usable for the current weights, else (reason key, log line,
    None) with key one of missing / runtime / corrupt / stale."""
    blob = artefact_bytes(module)
    if not blob:
        return "missing", ("this compressed model has no fast-path artefact (written by an older nnunet-green, with "
                           "--no-fast-path, or stripped); the eager network runs, slower. " + REBUILD_HINT), None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "runtime", "onnxruntime is not installed: the eager network runs, slower (pip install onnxruntime)", None
    session = _session(blob, hashlib.sha256(blob).hexdigest())
    if isinstance(session, Exception):
        return "corrupt", (f"the fast-path artefact cannot be loaded ({type(session).__name__}); the eager network "
                           "runs. " + REBUILD_HINT), None
    if session.get_modelmeta().custom_metadata_map.get(META_FINGERPRINT) != weights_fingerprint(module):
        return "stale", ("the fast-path artefact was built for other weights (fine-tuned, distilled or edited "
                         "since); the eager network runs. " + REBUILD_HINT), None
    return "ok", "", session


def artefact_input_shape(session) -> tuple[int, ...]:
    meta = session.get_modelmeta().custom_metadata_map
    return tuple(int(s) for s in meta.get(META_INPUT_SHAPE, "").split(",") if s)


def fast_forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """The logits from the ONNX Runtime session, or None when the eager network must run (reason logged once)."""
    if (_EAGER.get() or type(x) is not torch.Tensor  # fake/meta tensors of shape propagation (count_macs)
            or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
        return None
    reason = _call_reason(module, x)
    if reason is not None:
        say_once(*reason)
        return None
    key, message, session = artefact_status(module)
    if session is None:
        say_once(key, message)
        return None
    shape = artefact_input_shape(session)
    if tuple(x.shape) != shape:
        say_once("shape", f"input shape {tuple(x.shape)} is not the fast-path artefact's {shape}: the eager network "
                          "runs for it")
        return None
    import onnxruntime

    say_once(f"used:{id(session)}", f"fast CPU path: ONNX Runtime {onnxruntime.__version__}, "
                                    f"{torch.get_num_threads()} threads, input {shape}", logging.INFO)
    out = session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().contiguous().numpy()}, _run_options())[0]
    return torch.from_numpy(out)


class FastPathMixin:
    """Adds the artefact buffer and the fast forward to a dense nnU-Net class; everything else is the dense
    class's (state-dict keys, `decoder.deep_supervision`, `initialize`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer(ARTEFACT_KEY, torch.zeros(0, dtype=torch.uint8))

    def forward(self, x):
        out = fast_forward(self, x)
        return super().forward(x) if out is None else out

    def set_fast_path_artefact(self, blob: bytes) -> None:
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
        self._buffers[ARTEFACT_KEY] = data.to(self._buffers[ARTEFACT_KEY].device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Optional entry: folders written before the fast path have none, and its size is the artefact's.
        key = prefix + ARTEFACT_KEY
        blob = state_dict.get(key)
        device = self._buffers[ARTEFACT_KEY].device
        self._buffers[ARTEFACT_KEY] = (torch.zeros(0, dtype=torch.uint8, device=device) if blob is None else
                                       torch.empty(blob.shape, dtype=torch.uint8, device=device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if blob is None and key in missing_keys:
            missing_keys.remove(key)


class FastPlainConvUNet(FastPathMixin, PlainConvUNet):
    """PlainConvUNet with the fast CPU path (see module docstring)."""


class FastResidualEncoderUNet(FastPathMixin, ResidualEncoderUNet):
    """ResidualEncoderUNet with the fast CPU path (see module docstring)."""


FAST_CLASSES = {PlainConvUNet: FastPlainConvUNet, ResidualEncoderUNet: FastResidualEncoderUNet}


def fast_class(dense_cls: type) -> type | None:
    """The fast-path subclass of exactly `dense_cls`, or None (other classes keep the plain path)."""
    return FAST_CLASSES.get(dense_cls)


def has_fast_path(module) -> bool:
    return isinstance(module, FastPathMixin)
