"""Compress a trained nnU-Net model folder (or a TotalSegmentator weights root) into an ordinary model folder.

The output is read by the stock predictor unchanged: plans.json names our network builder
(`network.NETWORK_CLASS_NAME`) with the dense architecture and the per-layer Tucker ranks in `arch_kwargs`; each
checkpoint keeps its original `trainer_name` and `init_args`, so nnU-Net resolves the same trainer and its
`build_network_architecture` builds the factorized network from plans.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

import nnunet_green

FORMAT = "nnunet-green-compression/1"
MANIFEST = "compression.json"
COPIED_FILES = ("dataset.json", "dataset_fingerprint.json")


class CompressionError(Exception):
    """Bad input or a failed check; the message is meant for the user as is."""


# --------------------------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------------------------

def is_model_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "plans.json").is_file()


def find_model_folders(root: str | os.PathLike, max_depth: int = 4) -> list[Path]:
    """Model folders (`<trainer>__<plans>__<configuration>` with plans.json) below a weights root, sorted."""
    root = Path(root)
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        if here != root and here.name.count("__") >= 2 and (here / "plans.json").is_file():
            found.append(here)
            dirnames[:] = []  # fold_X below a model folder are not model folders
            continue
        if depth >= max_depth:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def available_folds(folder: Path, checkpoint: str) -> list[str]:
    folds = [p.name[len("fold_"):] for p in folder.glob("fold_*") if (p / checkpoint).is_file()]
    return sorted(folds, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))


def parse_folder_name(folder: Path) -> tuple[str, str, str] | None:
    parts = folder.name.split("__")
    return tuple(parts) if len(parts) == 3 and all(parts) else None


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# nnU-Net glue
# --------------------------------------------------------------------------------------------------------------------

def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CompressionError(f"{path.parent} has no {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CompressionError(f"cannot read {path}: {e}") from None


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CompressionError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/garbage files
        detail = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise CompressionError(f"cannot read checkpoint {path}: {type(e).__name__}: {detail}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict) or "trainer_name" not in ckpt:
        raise CompressionError(f"{path} is not an nnU-Net checkpoint (no network_weights/trainer_name)")
    return ckpt


def resolve_configuration(plans: dict, name: str):
    """nnU-Net's own ConfigurationManager for `name`: resolves `inherits_from` and converts old-format plans."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if name not in plans.get("configurations", {}):
        raise CompressionError(f"configuration {name!r} is not in plans.json (has {sorted(plans.get('configurations', {}))})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old-format notice; we rewrite the plans in the new format
        try:
            manager = PlansManager(copy.deepcopy(plans))
            return manager, manager.get_configuration(name)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CompressionError(f"cannot interpret configuration {name!r} of plans.json: {type(e).__name__}: {e}") from None


def find_trainer(trainer_name: str):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):  # the lookup prints its search of nnUNet_extTrainer
            return recursive_find_trainer_class_by_name(trainer_name)
    except (RuntimeError, AssertionError, ImportError) as e:
        raise CompressionError(f"trainer {trainer_name!r} (from the checkpoint) cannot be found by nnU-Net: {e}") from None


def build_network(trainer_class, plans_manager, configuration_manager, dataset_json: dict) -> nn.Module:
    """Exactly what `nnUNetPredictor.initialize_from_trained_model_folder` does to build the network."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        return trainer_class.build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
                                                        enable_deep_supervision=False)
    return trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import, n_in, n_out, enable_deep_supervision=False)


def num_input_channels(plans_manager, configuration_manager, dataset_json: dict) -> int:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    return determine_num_input_channels(plans_manager, configuration_manager, dataset_json)


def _check_convs(model: nn.Module, where: str):
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise CompressionError(f"{where}: the network has no convolutions to factorize")
    for name, m in convs:
        if m.groups != 1:
            raise CompressionError(f"{where}: unsupported layer {name} ({type(m).__name__} with groups={m.groups}); "
                                   "only groups=1 convolutions can be Tucker-factorized")


def _min_input_shape(configuration_manager, floor: int = 16) -> list[int]:
    """Smallest cheap input the U-Net accepts, capped at the patch size: a multiple of the total stride per axis
    that leaves at least 2 voxels per axis at the bottleneck (InstanceNorm refuses a single voxel; a 16^3 input
    reaches 1^3 in TotalSegmentator's 5- and 6-stage networks)."""
    patch = list(configuration_manager.patch_size)
    total = [1] * len(patch)
    for s in configuration_manager.pool_op_kernel_sizes:
        s = [s] * len(patch) if isinstance(s, int) else s
        total = [t * int(x) for t, x in zip(total, s)]
    return [min(p, t * max(2, math.ceil(floor / t))) for p, t in zip(patch, total)]


# --------------------------------------------------------------------------------------------------------------------
# compression
# --------------------------------------------------------------------------------------------------------------------

def compress_model_folder(src, dst, config=None, folds=None, checkpoint: str = "checkpoint_final.pth",
                          configuration: str | None = None, half: bool = False, overwrite: bool = False,
                          progress: bool = False, verify: bool = True, distill: dict | None = None) -> dict:
    """Write a compressed copy of the model folder `src` to `dst` and return its manifest (also written as
    `dst/compression.json`). `config` is a `TuckerConfig` (default: TuckerConfig()). Nothing is written to `src`;
    `dst` appears only when everything succeeded (written next to it, then renamed). `distill`: keyword arguments
    of `distill.distill_model_folder` (at least `images`) to recover accuracy before the folder is published."""
    src, dst = Path(src).absolute(), Path(dst).absolute()
    _check_src_dst(src, dst, overwrite)
    if not is_model_folder(src):
        raise CompressionError(f"{src} is not an nnU-Net model folder: no plans.json")
    with _Publisher(dst, overwrite) as tmp:
        manifest = _compress_into(src, tmp, config, folds, checkpoint, configuration, half, progress, verify,
                                  distill)
    return manifest


def compress_weights_root(src, dst, config=None, folds=None, checkpoint: str = "checkpoint_final.pth",
                          configuration: str | None = None, half: bool = False, overwrite: bool = False,
                          progress: bool = False, verify: bool = True, distill: dict | None = None) -> list[dict]:
    """Compress every model folder below a weights root (TotalSegmentator's `.../nnunet/results` or an nnU-Net
    results folder) into the same relative layout under `dst`; returns the manifests."""
    src, dst = Path(src).absolute(), Path(dst).absolute()
    _check_src_dst(src, dst, overwrite)
    folders = find_model_folders(src)
    if not folders:
        raise CompressionError(f"{src} contains no model folders (DatasetXXX_*/<trainer>__<plans>__<configuration>/)")
    manifests = []
    with _Publisher(dst, overwrite) as tmp:
        for folder in _progress(folders, progress, "models"):
            target = tmp / folder.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                manifests.append(_compress_into(folder, target, config, folds, checkpoint, configuration, half,
                                                progress, verify, distill))
            except CompressionError as e:
                raise CompressionError(f"{folder.relative_to(src)}: {e}") from None
    return manifests


def compress(src, dst, config=None, **kwargs) -> dict | list[dict]:
    """Model folder or weights root, whichever `src` is."""
    src = Path(src)
    if not src.is_dir():
        raise CompressionError(f"input folder not found: {src}")
    if is_model_folder(src):
        return compress_model_folder(src, dst, config, **kwargs)
    if find_model_folders(src):
        return compress_weights_root(src, dst, config, **kwargs)
    raise CompressionError(f"{src} is not an nnU-Net model folder (no plans.json) and contains no model folders "
                           "(DatasetXXX_*/<trainer>__<plans>__<configuration>/plans.json)")


def _check_src_dst(src: Path, dst: Path, overwrite: bool):
    if not src.is_dir():
        raise CompressionError(f"input folder not found: {src}")
    rs, rd = src.resolve(), dst.resolve()
    if rs == rd or rs in rd.parents:
        raise CompressionError(f"output {dst} must not be inside the input folder {src}")
    if rd in rs.parents:
        raise CompressionError(f"output {dst} must not contain the input folder {src}")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise CompressionError(f"output {dst} already exists (use --overwrite to replace it)")
    if dst.exists() and not dst.is_dir():
        raise CompressionError(f"output {dst} exists and is not a folder")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, file=sys.stderr, leave=False)


class _Publisher:
    """Temporary folder beside `dst`; renamed onto `dst` on success (replacing it if asked), removed on failure."""

    def __init__(self, dst: Path, overwrite: bool):
        self.dst, self.overwrite = dst, overwrite
        self.created_parents: list[Path] = []

    def __enter__(self) -> Path:
        p = self.dst.parent
        while not p.exists():
            self.created_parents.append(p)
            p = p.parent
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dst.parent / f".{self.dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            for p in self.created_parents:  # innermost first
                try:
                    p.rmdir()
                except OSError:
                    break
            return False
        old = None
        if self.dst.exists() or self.dst.is_symlink():
            if not self.overwrite:  # appeared meanwhile
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise CompressionError(f"output {self.dst} already exists (use --overwrite to replace it)")
            old = self.dst.parent / f".{self.dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        return False


def _compress_into(src: Path, out: Path, config, folds, checkpoint: str, configuration: str | None, half: bool,
                   progress: bool, verify: bool, distill: dict | None = None) -> dict:
    from nnunet_green.compression import TuckerConfig, count_macs, tucker_
    from nnunet_green.compression.network import NETWORK_CLASS_NAME, factorized_architecture

    config = TuckerConfig() if config is None else config
    if (src / MANIFEST).exists():
        raise CompressionError(f"{src} is already compressed ({MANIFEST} present)")
    plans = _load_json(src / "plans.json", "nnU-Net plans")
    dataset_json = _load_json(src / "dataset.json", "dataset description")
    if any(isinstance(c, dict) and isinstance(c.get("architecture"), dict)
           and c["architecture"].get("network_class_name") == NETWORK_CLASS_NAME
           for c in plans.get("configurations", {}).values()):
        raise CompressionError(f"{src} is already compressed (plans.json names {NETWORK_CLASS_NAME})")
    if distill is not None:  # bad images fail here, before minutes of decomposition
        from nnunet_green.compression.distill import DistillError, channel_names, find_cases
        try:
            names = channel_names(dataset_json)
            find_cases(Path(distill["images"]), dataset_json.get("file_ending", ".nii.gz"), len(names), names)
        except DistillError as e:
            raise CompressionError(f"--distill: {e}") from None

    # folds and checkpoints
    present = available_folds(src, checkpoint)
    if folds is None or len(folds) == 0:
        if not present:
            raise CompressionError(f"{src} has no fold_*/{checkpoint}")
        folds = present
    folds = [str(f) for f in folds]
    for f in folds:
        if not (src / f"fold_{f}").is_dir():
            raise CompressionError(f"fold {f} not present in {src} (has: {', '.join(present) or 'none'})")
    ckpts = {f: load_checkpoint(src / f"fold_{f}" / checkpoint) for f in folds}

    # trainer and configuration, as the predictor resolves them (from the first checkpoint)
    first = ckpts[folds[0]]
    trainer_name = first["trainer_name"]
    ck_conf = (first.get("init_args") or {}).get("configuration")
    named = parse_folder_name(src)
    conf = ck_conf or configuration or (named[2] if named else None)
    if conf is None:
        raise CompressionError(f"cannot tell which configuration {src} was trained with; pass -c")
    if configuration is not None and configuration != conf:
        raise CompressionError(f"-c {configuration} does not match the checkpoint's configuration {conf!r}")
    for f, ck in ckpts.items():
        if ck["trainer_name"] != trainer_name or (ck.get("init_args") or {}).get("configuration", conf) != conf:
            raise CompressionError(f"fold {f} was trained with another trainer/configuration than fold {folds[0]}")

    plans_manager, conf_manager = resolve_configuration(plans, conf)
    dense_class = conf_manager.network_arch_class_name
    dense_kwargs = copy.deepcopy(conf_manager.network_arch_init_kwargs)
    req_import = list(conf_manager.network_arch_init_kwargs_req_import)
    trainer_class = find_trainer(trainer_name)

    import pydoc
    located = pydoc.locate(dense_class)
    if not (isinstance(located, type) and issubclass(located, nn.Module)):
        raise CompressionError(f"unsupported network class {dense_class!r} in plans.json (not an importable "
                               "torch.nn.Module)")

    def dense_network():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = build_network(trainer_class, plans_manager, conf_manager, dataset_json)
        except Exception as e:
            raise CompressionError(f"cannot build the network of {src}: {type(e).__name__}: {e}") from None
        if type(net) is not located:
            raise CompressionError(f"unsupported network class: trainer {trainer_name} builds "
                                   f"{type(net).__module__}.{type(net).__name__}, not the plans' {dense_class}")
        return net

    n_in = num_input_channels(plans_manager, conf_manager, dataset_json)
    patch = list(conf_manager.patch_size)
    macs_shape = (1, n_in, *patch)

    # decompose each fold
    records0, ranks, rel_errors, states, decomposition_s = None, None, {}, {}, 0.0
    macs_before = macs_after = params_before = params_after = None
    for f in _progress(folds, progress and len(folds) > 1, "folds"):
        net = dense_network()
        _check_convs(net, str(src))
        try:
            net.load_state_dict(ckpts[f]["network_weights"], strict=True)
        except RuntimeError as e:
            raise CompressionError(f"fold_{f}/{checkpoint} does not match the plans' network: "
                                   f"{str(e).splitlines()[0]}") from None
        if params_before is None:
            params_before = _n_params(net)
            macs_before = int(count_macs(net, macs_shape))
        net.eval()
        t0 = time.perf_counter()
        # budgeted ranks are chosen on the first fold's weights and shared: one plans.json holds one architecture
        shared = None if ranks is None or config.budget is None else {k: tuple(v) for k, v in ranks.items()}
        try:
            records = tucker_(net, config, progress=progress, input_shape=macs_shape, ranks=shared)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise CompressionError(f"fold_{f}: cannot factorize: {e}") from None
        decomposition_s += time.perf_counter() - t0
        fold_ranks = {r.name: [int(r.rank_in), int(r.rank_out)] for r in records if r.factorized}
        if ranks is None:
            ranks, records0 = fold_ranks, records
            params_after = _n_params(net)
            macs_after = int(count_macs(net, macs_shape))
        elif fold_ranks != ranks:
            raise CompressionError(f"fold_{f} got other ranks than fold_{folds[0]}; one plans.json cannot hold both")
        rel_errors[f] = {r.name: r.rel_error for r in records}
        if half:
            net.half()  # the module, not per key: keeps the aliased tensors shared
        states[f] = net.state_dict()
        del net
    if not ranks:
        raise CompressionError(f"{src}: no layer was factorized at {_rule(config)}")

    # plans.json: trained configuration in new format, resolved, naming our builder
    new_conf = copy.deepcopy(conf_manager.configuration)
    new_conf.pop("inherits_from", None)
    new_conf["architecture"] = factorized_architecture(
        {"network_class_name": dense_class, "arch_kwargs": dense_kwargs, "_kw_requires_import": req_import}, ranks)
    new_plans = copy.deepcopy(plans)
    new_plans["configurations"][conf] = new_conf

    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps(new_plans, indent=4))
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    for f in folds:
        ck = dict(ckpts[f])
        ck["network_weights"] = states[f]
        ck["optimizer_state"] = None  # the predictor never reads it; 2x the weights in size
        ck["grad_scaler_state"] = None
        (out / f"fold_{f}").mkdir()
        torch.save(ck, out / f"fold_{f}" / checkpoint)
    del states, ckpts

    verification = _verify(src, out, folds, checkpoint, conf, dataset_json) if verify else None

    layers = []
    for r in records0:
        d = r.to_dict()
        d["rel_error"] = (rel_errors[folds[0]].get(r.name) if len(folds) == 1
                          else {f"fold_{f}": rel_errors[f].get(r.name) for f in folds})
        layers.append(d)
    manifest = {
        "format": FORMAT,
        "nnunet_green_version": nnunet_green.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(src),
                   "checkpoints": {f"fold_{f}/{checkpoint}": sha256(src / f"fold_{f}" / checkpoint) for f in folds}},
        "config": {"rank_ratio": None if config.budget is not None else config.rank_ratio,
                   "budget": config.budget, "budget_cost": config.budget_cost if config.budget is not None else None,
                   "min_rank": config.min_rank, "round_to": config.round_to, "half": bool(half)},
        "rank_rule": _rule(config),
        "configuration": conf,
        "patch_size": patch,
        "folds": folds,
        "checkpoint": checkpoint,
        "totals": {"params_before": params_before, "params_after": params_after, "macs_before": macs_before,
                   "macs_after": macs_after, "decomposition_s": round(decomposition_s, 3)},
        "layers": layers,
        "recovery": None,
        "trainer_name": trainer_name,
        "dense_network_class": dense_class,
        "verification": verification,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
    if distill is not None:
        from nnunet_green.compression.distill import DistillError, distill_model_folder
        try:
            manifest["recovery"] = distill_model_folder(out, teacher=src, **distill)
        except DistillError as e:
            raise CompressionError(f"distillation: {e}") from None
    return manifest


def _rule(config) -> str:
    if config.budget is not None:
        return (f"budgeted ranks: {config.budget:g} of the factorizable layers' {config.budget_cost} "
                "(singular-value energy, greedy; ranks chosen on the first fold)")
    return f"uniform rank ratio {config.rank_ratio:g}"


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates shared modules


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@torch.no_grad()
def _verify(src: Path, out: Path, folds, checkpoint: str, conf: str, dataset_json: dict) -> dict:
    """Load the written folder the way the stock predictor does (new plans, trainer by name, strict load) and
    compare one small forward with the dense network."""
    plans = json.loads((out / "plans.json").read_text())
    pm, cm = resolve_configuration(plans, conf)
    dense_pm, dense_cm = resolve_configuration(json.loads((src / "plans.json").read_text()), conf)
    shape = (1, num_input_channels(pm, cm, dataset_json), *_min_input_shape(cm))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    diffs = {}
    for f in folds:
        ck = torch.load(out / f"fold_{f}" / checkpoint, map_location="cpu", weights_only=False)
        trainer_class = find_trainer(ck["trainer_name"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = build_network(trainer_class, pm, cm, dataset_json)
            dense = build_network(trainer_class, dense_pm, dense_cm, dataset_json)
        try:
            net.load_state_dict(ck["network_weights"], strict=True)
        except RuntimeError as e:
            raise CompressionError(f"verification failed: the written fold_{f}/{checkpoint} does not load into the "
                                   f"network nnU-Net builds from the new plans: {str(e).splitlines()[0]}") from None
        dense.load_state_dict(torch.load(src / f"fold_{f}" / checkpoint, map_location="cpu",
                                         weights_only=False)["network_weights"], strict=True)
        a, b = dense.eval()(x), net.eval()(x)
        if not torch.isfinite(b).all():
            raise CompressionError(f"verification failed: fold_{f} gives non-finite outputs")
        diffs[f"fold_{f}"] = float((a - b).norm() / a.norm().clamp_min(1e-12))
    return {"strict_load": True, "input_shape": list(shape), "forward_rel_diff": diffs}
