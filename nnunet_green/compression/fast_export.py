"""Build, check and time the fast-path artefact of a factorized network (see fast_path.py).

`build_artefact` exports the network (eval, deep supervision off, batch 1, the plans' patch size) with the legacy
TorchScript-based ONNX exporter at opset 18 and stamps the weights' fingerprint and the input shape into the ONNX
metadata; `check_artefact` compares it with the eager network on a random input; `install_artefact_` does both and
puts the bytes into the network's buffer; `measure_speedup` times dense eager against the compressed network as
the stock predictor runs it, interleaved.
"""
from __future__ import annotations

import io
import time
import warnings

import torch

import nnunet_green

from .fast_path import (INPUT_NAME, META_FINGERPRINT, META_INPUT_SHAPE, META_VERSIONS, OUTPUT_NAME, artefact_bytes,
                        eager, has_fast_path, weights_fingerprint)

OPSET = 18
# what an artefact must reach against the eager network before it is stored (issue 12's exactness bar)
MIN_ARGMAX_AGREEMENT = 0.9999
MAX_REL_LOGIT_DIFF = 1e-4


class ArtefactError(Exception):
    """The artefact could not be built or did not match the eager network."""


class _deep_supervision_off:
    def __init__(self, net):
        self.decoder = getattr(net, "decoder", None)

    def __enter__(self):
        self.was = getattr(self.decoder, "deep_supervision", False)
        if self.decoder is not None and self.was:
            self.decoder.deep_supervision = False

    def __exit__(self, *exc):
        if self.decoder is not None and self.was:
            self.decoder.deep_supervision = self.was


def build_artefact(net: torch.nn.Module, input_shape) -> bytes:
    """Serialized ONNX model of `net` (CPU, float32) at `input_shape`, with the fingerprint of its weights."""
    import onnx
    import onnxruntime

    input_shape = tuple(int(s) for s in input_shape)
    was_training = net.training
    net.eval()
    buf = io.BytesIO()
    try:
        with torch.no_grad(), eager(), _deep_supervision_off(net), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.zeros(input_shape),), buf, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True)
    finally:
        net.train(was_training)
    model = onnx.load_model_from_string(buf.getvalue())
    meta = {META_FINGERPRINT: weights_fingerprint(net), META_INPUT_SHAPE: ",".join(map(str, input_shape)),
            META_VERSIONS: f"nnunet_green={nnunet_green.__version__};torch={torch.__version__};onnx={onnx.__version__};"
                           f"onnxruntime={onnxruntime.__version__};opset={OPSET}"}
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    return model.SerializeToString()


def relative_logit_diff(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """max |fast - ref| / max |ref|: the largest logit error relative to the largest logit."""
    return float((fast - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def argmax_agreement(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return float((fast.argmax(1) == ref.argmax(1)).float().mean())


def compare_paths(net: torch.nn.Module, x: torch.Tensor) -> dict:
    """Eager vs fast output of `net` on `x` (the fast path must apply): argmax agreement, max relative logit
    difference (see relative_logit_diff)."""
    from .fast_path import fast_forward

    net.eval()
    with torch.inference_mode():
        with eager():
            ref = net(x)
        fast = fast_forward(net, x)
    if fast is None:
        raise ArtefactError("the fast path did not run (see the log line above)")
    return {"argmax_agreement": argmax_agreement(fast, ref), "max_rel_logit_diff": relative_logit_diff(fast, ref)}


def install_artefact_(net: torch.nn.Module, input_shape, seed: int = 0) -> dict:
    """Build the artefact, check it on a random input against the eager network, and store it in `net`'s buffer.
    Returns the record for compression.json; raises ArtefactError if it does not match."""
    if not has_fast_path(net):
        raise ArtefactError(f"{type(net).__name__} has no fast CPU path")
    t0 = time.perf_counter()
    blob = build_artefact(net, input_shape)
    export_s = time.perf_counter() - t0
    previous = artefact_bytes(net)
    net.set_fast_path_artefact(blob)
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(seed))
    try:
        with _deep_supervision_off(net):
            check = compare_paths(net, x)
    except ArtefactError:
        net.set_fast_path_artefact(previous)
        raise
    if check["argmax_agreement"] < MIN_ARGMAX_AGREEMENT or check["max_rel_logit_diff"] > MAX_REL_LOGIT_DIFF:
        net.set_fast_path_artefact(previous)
        raise ArtefactError(f"the exported graph does not reproduce the network: {check}")
    return {"status": "built", "input_shape": list(input_shape), "bytes": len(blob), "export_s": round(export_s, 2),
            "check": {"input": "random normal", **check}}


def measure_speedup(dense: torch.nn.Module, compressed: torch.nn.Module, input_shape, repeats: int = 2,
                    max_seconds: float = 60.0) -> dict:
    """Median forward seconds of the dense eager network and of the compressed one as the stock predictor runs it
    (inference_mode: the fast path where it applies), interleaved dense, compressed, ...; the first round is a
    warm-up unless the time bound leaves only one. Threads: torch's current setting."""
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(1))
    dense.eval()
    compressed.eval()
    times = {"dense": [], "compressed": []}
    t_start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for name, net in (("dense", dense), ("compressed", compressed)):
                t0 = time.perf_counter()
                net(x)
                times[name].append(time.perf_counter() - t0)
            if time.perf_counter() - t_start > max_seconds:
                break
    kept = {k: (v[1:] if len(v) > 1 else v) for k, v in times.items()}
    med = {k: sorted(v)[len(v) // 2] for k, v in kept.items()}
    return {"input_shape": list(input_shape), "threads": torch.get_num_threads(), "repeats": len(kept["dense"]),
            "dense_s": round(med["dense"], 4), "compressed_s": round(med["compressed"], 4),
            "speedup": round(med["dense"] / med["compressed"], 3)}
