"""Compress a trained nnU-Net model folder (or a TotalSegmentator weights root) into an ordinary model folder.

The output is read by the stock predictor unchanged: plans.json names our network builder
(`contract.NETWORK_CLASS_NAME`) with the dense architecture and the per-layer Tucker ranks in `arch_kwargs`; each
checkpoint keeps its original `trainer_name` and `init_args`, so nnU-Net resolves the same trainer and its
`build_network_architecture` builds the factorized network from plans.

One folder is compressed in named steps, each a function of its own: `resolve_source` (folds, checkpoints, trainer,
configuration, as the predictor resolves them) -> `decompose_folds` -> `write_folder` (plans, checkpoints, the
files nnU-Net's exporter needs) -> `verify_folder` (load it the way nnUNetv2_predict does, compare with the dense
model) -> `build_manifest` (compression.json) -> optional distillation. With calibration images,
`calibration_patches` prepares the patches first and `decompose_folds` collects each fold's statistics with one
dense forward before decomposing it data-aware. The folder is written through
`nnunet_io.publish`: it appears complete or not at all, and temporaries of killed earlier runs are removed.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import math
import pydoc
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import nnunet_green
from nnunet_green.contract import (DATASET_FILE, DECOMPOSITION_CALIBRATED, DECOMPOSITION_WEIGHT_ONLY,
                                   DEFAULT_CALIBRATION_PATCHES, DEFAULT_CHECKPOINT, FINGERPRINT_FILE, MANIFEST_FILE,
                                   PLANS_FILE, PROGRESS_FILE, SPEED_RULE_MACS, SPEED_RULE_MEASURED, CompressionManifest,
                                   GreenError, write_json_atomic)
from nnunet_green.compression.fast_path import eager
from nnunet_green.compression.layer_timing import timing_summary
from nnunet_green.nnunet_io import ModelFolder, ModelFolderError, find_model_folders, io_channels, publish, sha256

COPIED_FILES = (DATASET_FILE, FINGERPRINT_FILE)
# per fold: files nnU-Net's exporter (nnUNetv2_export_model_to_zip) requires, copied from the dense source; they
# describe the DENSE model and compression.json says so
CARRIED_OVER = {PROGRESS_FILE: "training curves of the dense source model",
                "validation/summary.json": "validation metrics of the dense source model"}


class CompressionError(GreenError):
    """Compression of a readable model folder failed (no factorizable layer, a failed check); the message is meant
    for the user as is. Folder problems raise nnunet_io.ModelFolderError; both are GreenError."""


# --------------------------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------------------------

def compress_model_folder(src, dst, config=None, folds=None, checkpoint: str = DEFAULT_CHECKPOINT,
                          configuration: str | None = None, half: bool = False, overwrite: bool = False,
                          progress: bool = False, verify: bool = True, distill: dict | None = None,
                          calibrate: dict | bool | None = None, fast_path: bool = True,
                          speed_check: bool = True) -> dict:
    """Write a compressed copy of the model folder `src` to `dst` and return its manifest (as written to
    `dst/compression.json`). `config` is a `TuckerConfig` (default: TuckerConfig()). Nothing is written to `src`;
    `dst` appears only when everything succeeded. `distill`: keyword arguments of `distill_model_folder` (at least
    `images`) to recover accuracy before the folder is published. `calibrate`: {"images": folder, "patches": N,
    "seed": 0, "sequential": False} for a data-aware decomposition on those (unlabelled) images ("sequential": True
    then refits the layers in execution order on the compressed network's own inputs,
    `sequential.refine_sequentially_`); None = the distillation images if `distill` is given, else weight-only;
    False = weight-only. `fast_path`: store the fast CPU inference artefact in the checkpoints (fast_folder.py);
    `speed_check`: time dense vs compressed at the patch size."""
    src, dst = Path(src).absolute(), Path(dst).absolute()
    _check_src_dst(src, dst, overwrite)
    ModelFolder(src).check()
    with publish(dst, overwrite) as tmp:
        return compress_into(src, tmp, config, folds, checkpoint, configuration, half, progress, verify, distill,
                             calibrate, fast_path, speed_check)


def compress_weights_root(src, dst, config=None, folds=None, checkpoint: str = DEFAULT_CHECKPOINT,
                          configuration: str | None = None, half: bool = False, overwrite: bool = False,
                          progress: bool = False, verify: bool = True, distill: dict | None = None,
                          calibrate: dict | bool | None = None, fast_path: bool = True,
                          speed_check: bool = True) -> list[dict]:
    """Compress every model folder below a weights root (TotalSegmentator's `.../nnunet/results` or an nnU-Net
    results folder) into the same relative layout under `dst`; returns the manifests."""
    src, dst = Path(src).absolute(), Path(dst).absolute()
    _check_src_dst(src, dst, overwrite)
    folders = find_model_folders(src)
    if not folders:
        raise CompressionError(f"{src} contains no model folders (DatasetXXX_*/<trainer>__<plans>__<configuration>/)")
    manifests = []
    with publish(dst, overwrite) as tmp:
        for folder in _progress(folders, progress, "models"):
            target = tmp / folder.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                manifests.append(compress_into(folder, target, config, folds, checkpoint, configuration, half,
                                               progress, verify, distill, calibrate, fast_path, speed_check))
            except GreenError as e:
                raise CompressionError(f"{folder.relative_to(src)}: {e}") from None
    return manifests


def compress(src, dst, config=None, **kwargs) -> dict | list[dict]:
    """Model folder or weights root, whichever `src` is."""
    src = Path(src)
    if not src.is_dir():
        raise CompressionError(f"input folder not found: {src}")
    if (src / PLANS_FILE).is_file():
        return compress_model_folder(src, dst, config, **kwargs)
    if find_model_folders(src):
        return compress_weights_root(src, dst, config, **kwargs)
    raise CompressionError(f"{src} is not an nnU-Net model folder (no plans.json) and contains no model folders "
                           "(DatasetXXX_*/<trainer>__<plans>__<configuration>/plans.json)")


def compress_into(src: Path, out: Path, config=None, folds=None, checkpoint: str = DEFAULT_CHECKPOINT,
                  configuration: str | None = None, half: bool = False, progress: bool = False, verify: bool = True,
                  distill: dict | None = None, calibrate: dict | bool | None = None, fast_path: bool = True,
                  speed_check: bool = True) -> dict:
    """The steps for one model folder, written into the (new, empty) folder `out`; returns the manifest."""
    from nnunet_green.compression import TuckerConfig

    config = TuckerConfig() if config is None else config
    source = resolve_source(src, folds, checkpoint, configuration)
    if distill is not None:  # bad images fail here, before minutes of decomposition
        check_distill_images(distill["images"], source.folder.dataset_json)
    if calibrate is None and distill is not None:
        calibrate = {"images": distill["images"]}  # images at hand: the data-aware decomposition is the default
    calibration = calibration_patches(source, calibrate, progress) if calibrate else None
    result = decompose_folds(source, config, half, progress, calibration)
    carried = write_folder(source, result, out)
    verification = verify_folder(source, out) if verify else None
    manifest = build_manifest(source, result, config, half, verification, carried)
    manifest.write(out / MANIFEST_FILE)
    if distill is not None:
        manifest.recovery = run_distillation(out, src, distill)  # also recorded in out/compression.json
    if fast_path:  # after distillation: the artefact must fit the weights that are published
        from nnunet_green.compression.fast_folder import DEFAULT_SPEED_SECONDS, build_fast_path

        t = result.totals
        manifest.fast_path = build_fast_path(out, source.folds, source.checkpoint, dense_folder=src,
                                             speed_seconds=DEFAULT_SPEED_SECONDS if speed_check else None,
                                             macs=(t["macs_before"], t["macs_after"]),
                                             speed_rule=config.speed_rule)
        manifest.write(out / MANIFEST_FILE)
    return manifest.to_json()


# --------------------------------------------------------------------------------------------------------------------
# step 1: the source model, resolved as the stock predictor resolves it
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Source:
    folder: ModelFolder
    folds: list[str]
    checkpoint: str
    checkpoints: dict[str, dict]   # fold -> loaded nnU-Net checkpoint
    trainer_name: str
    configuration: str
    plans_manager: object
    configuration_manager: object
    dense_class: str               # the plans' network class (dotted path)

    @property
    def patch_size(self) -> list[int]:
        return list(self.configuration_manager.patch_size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One patch, batch 1: the shape multiply-adds are counted at."""
        n_in, _ = io_channels(self.plans_manager, self.configuration_manager, self.folder.dataset_json)
        return (1, n_in, *self.patch_size)

    def dense_network(self) -> nn.Module:
        """The dense network of the plans, built by the checkpoint's trainer (unloaded)."""
        net = self.folder.build_network(self.configuration, self.trainer_name)
        located = pydoc.locate(self.dense_class)
        if type(net) is not located:
            raise CompressionError(f"unsupported network class: trainer {self.trainer_name} builds "
                                   f"{type(net).__module__}.{type(net).__name__}, not the plans' {self.dense_class}")
        return net


def resolve_source(src: Path, folds=None, checkpoint: str = DEFAULT_CHECKPOINT,
                   configuration: str | None = None) -> Source:
    folder = ModelFolder(src).check()
    if (folder.path / MANIFEST_FILE).exists():
        raise CompressionError(f"{src} is already compressed ({MANIFEST_FILE} present)")
    if folder.is_compressed:
        raise CompressionError(f"{src} is already compressed ({PLANS_FILE} names the factorized network)")
    _ = folder.dataset_json  # read now: a missing dataset.json is reported before any checkpoint is loaded

    present = folder.folds(checkpoint)
    if not folds:
        if not present:
            raise CompressionError(f"{src} has no fold_*/{checkpoint}")
        folds = present
    folds = [str(f) for f in folds]
    for f in folds:
        if not (folder.path / f"fold_{f}").is_dir():
            raise CompressionError(f"fold {f} not present in {src} (has: {', '.join(present) or 'none'})")
    ckpts = {f: folder.load_checkpoint(f, checkpoint) for f in folds}

    first = ckpts[folds[0]]  # trainer and configuration from the first checkpoint, as the predictor does
    trainer_name = first["trainer_name"]
    conf = (first.get("init_args") or {}).get("configuration") or configuration or folder.configuration_name()
    if conf is None:
        raise CompressionError(f"cannot tell which configuration {src} was trained with; pass -c")
    if configuration is not None and configuration != conf:
        raise CompressionError(f"-c {configuration} does not match the checkpoint's configuration {conf!r}")
    for f, ck in ckpts.items():
        if ck["trainer_name"] != trainer_name or (ck.get("init_args") or {}).get("configuration", conf) != conf:
            raise CompressionError(f"fold {f} was trained with another trainer/configuration than fold {folds[0]}")

    pm, cm = folder.managers(conf)
    dense_class = cm.network_arch_class_name
    located = pydoc.locate(dense_class)
    if not (isinstance(located, type) and issubclass(located, nn.Module)):
        raise CompressionError(f"unsupported network class {dense_class!r} in {PLANS_FILE} (not an importable "
                               "torch.nn.Module)")
    return Source(folder, folds, checkpoint, ckpts, trainer_name, conf, pm, cm, dense_class)


# --------------------------------------------------------------------------------------------------------------------
# step 2: decompose every fold (one architecture for all of them: one plans.json)
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Decomposition:
    ranks: dict[str, list[int]]              # what plans.json gets
    records: list                            # LayerRecord of the first fold
    rel_errors: dict[str, dict[str, float]]  # fold -> layer -> relative weight error
    states: dict[str, dict]                  # fold -> factorized state dict
    totals: dict = field(default_factory=dict)
    calibration: dict | None = None          # the calibration record (None: weight-only)


@dataclass
class CalibrationPatches:
    patches: list                            # (1, C, *patch) tensors, preprocessed as the predictor does
    labels: list[str]                        # the image file of each patch (named in errors)
    record: dict                             # images, source, patches, patch_size, preprocess_s, seed


def calibration_patches(source: Source, calibrate: dict, progress: bool = False) -> CalibrationPatches:
    """The calibration patches of `calibrate` ({"images", "patches", "seed"}), prepared once for every fold
    (preprocessing depends on the plans only). Bad images raise CompressionError naming the file."""
    from types import SimpleNamespace

    from nnunet_green.compression.calibration import CalibrationError, image_patches

    n_in, _ = io_channels(source.plans_manager, source.configuration_manager, source.folder.dataset_json)
    model = SimpleNamespace(plans_manager=source.plans_manager, configuration_manager=source.configuration_manager,
                            dataset_json=source.folder.dataset_json, num_input_channels=n_in)
    try:
        patches, labels, record = image_patches(model, calibrate["images"],
                                                calibrate.get("patches", DEFAULT_CALIBRATION_PATCHES),
                                                calibrate.get("seed", 0))
    except CalibrationError as e:
        raise CompressionError(f"--calibrate: {e}") from None
    return CalibrationPatches(patches, labels, {**record, "sequential": bool(calibrate.get("sequential", False))})


def decompose_folds(source: Source, config, half: bool = False, progress: bool = False,
                    calibration: CalibrationPatches | None = None) -> Decomposition:
    """Factorize each fold's weights. A budgeted rule chooses the ranks on the first fold's weights and the other
    folds are decomposed at those ranks (one plans.json holds one architecture). With `calibration`, each fold's
    dense network first runs over the patches (`collect_statistics`) and the factors are data-aware."""
    from nnunet_green.compression import count_macs, param_count, tucker_
    from nnunet_green.compression.calibration import CalibrationError, collect_statistics, peak_rss_mb
    from nnunet_green.compression.data_aware import reconstruction_error
    from nnunet_green.compression.sequential import factorized_layers, refine_sequentially_
    from nnunet_green.compression.surgery import unique_convs

    shape = source.input_shape
    result, t_total = None, 0.0
    fold_calibration: dict[str, dict] = {}
    for f in _progress(source.folds, progress and len(source.folds) > 1, "folds"):
        net = source.dense_network()
        try:
            net.load_state_dict(source.checkpoints[f]["network_weights"], strict=True)
        except RuntimeError as e:
            raise CompressionError(f"fold_{f}/{source.checkpoint} does not match the plans' network: "
                                   f"{str(e).splitlines()[0]}") from None
        net.eval()
        if result is None:
            totals = {"params_before": param_count(net), "macs_before": int(count_macs(net, shape))}
        shared = (None if result is None or not config.ranks_from_first_fold
                  else {k: tuple(v) for k, v in result.ranks.items()})
        stats = None
        if calibration is not None:
            try:
                stats = collect_statistics(net, calibration.patches, progress=progress,
                                           label=lambda i: f"patch {i} of {calibration.labels[i]}")
            except CalibrationError as e:
                raise CompressionError(f"--calibrate: fold_{f}: {e}") from None
            fold_calibration[f] = stats.record()
        t0 = time.perf_counter()
        dense = copy.deepcopy(net) if stats is not None and calibration.record["sequential"] else None
        try:
            records = tucker_(net, config, progress=progress, input_shape=shape, ranks=shared, calibration=stats)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise CompressionError(f"fold_{f}: cannot factorize: {e}") from None
        if stats is not None:
            fold_calibration[f]["decomposition_s"] = round(time.perf_counter() - t0, 2)
        if dense is not None:
            try:
                fold_calibration[f]["sequential_refit"] = refine_sequentially_(net, dense, calibration.patches,
                                                                               stats, progress)
            except CalibrationError as e:
                raise CompressionError(f"--calibrate: fold_{f}: {e}") from None
            refitted, dense_convs = factorized_layers(net), {n: c for n, _, c in unique_convs(dense)}
            for r in records:  # the weight errors of the refitted factors
                if r.name in refitted:
                    m = refitted[r.name]
                    r.rel_error = reconstruction_error(dense_convs[r.name], m.first.weight, m.core.weight,
                                                       m.last.weight)
            del dense
        t_total += time.perf_counter() - t0
        if stats is not None:
            fold_calibration[f]["input_rank_deficient_layers"] = [r.name for r in records if r.input_rank_deficient]
            fold_calibration[f]["process_peak_rss_mb"] = round(peak_rss_mb(), 1)
            del stats
        ranks = {r.name: [int(r.rank_in), int(r.rank_out)] for r in records if r.factorized}
        if result is None:
            if not ranks:
                slower = sum(bool(r.timing and r.timing.get("verdict")) for r in records)
                raise CompressionError(f"{source.folder.path}: no layer was factorized at {config.describe()}" + (
                    f" (factorizing was not faster on this machine for all {slower} planned layers; "
                    f"--speed-rule {SPEED_RULE_MACS} factorizes them anyway)" if slower else ""))
            totals.update(params_after=param_count(net), macs_after=int(count_macs(net, shape)))
            result = Decomposition(ranks, records, {}, {}, totals)
        elif ranks != result.ranks:
            raise CompressionError(f"fold_{f} got other ranks than fold_{source.folds[0]}; one {PLANS_FILE} cannot "
                                   "hold both")
        result.rel_errors[f] = {r.name: r.rel_error for r in records}
        if half:
            net.half()  # the module, not per key: keeps the aliased tensors shared
        result.states[f] = net.state_dict()
        del net
    result.totals["decomposition_s"] = round(t_total, 3)
    if calibration is not None:
        per_fold = [fold_calibration[f] for f in source.folds]
        result.calibration = {**calibration.record, "ridge": config.ridge,
                              "statistics": "one forward of each fold's dense network; per conv, input and output "
                                            "channel covariances (per-instance centred before an InstanceNorm)",
                              **(per_fold[0] if len(per_fold) == 1 else
                                 {"folds": {f"fold_{f}": r for f, r in fold_calibration.items()}})}
    return result


# --------------------------------------------------------------------------------------------------------------------
# step 3: the folder
# --------------------------------------------------------------------------------------------------------------------

def compressed_plans(source: Source, ranks: dict) -> dict:
    """plans.json of the compressed folder: the trained configuration in the new format, resolved, naming our
    network builder; every other key as the source has it."""
    from nnunet_green.compression.network import factorized_architecture

    cm = source.configuration_manager
    conf = copy.deepcopy(cm.configuration)
    conf.pop("inherits_from", None)
    conf["architecture"] = factorized_architecture(
        {"network_class_name": source.dense_class, "arch_kwargs": copy.deepcopy(cm.network_arch_init_kwargs),
         "_kw_requires_import": list(cm.network_arch_init_kwargs_req_import)}, ranks)
    plans = copy.deepcopy(source.folder.plans)
    plans["configurations"][source.configuration] = conf
    return plans


def write_folder(source: Source, result: Decomposition, out: Path) -> dict[str, str]:
    """plans.json, dataset files, one checkpoint per fold (optimizer state dropped: the predictor never reads it)
    and the dense source's files nnU-Net's exporter requires. Returns {carried-over file: what it describes}."""
    src = source.folder.path
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / PLANS_FILE, compressed_plans(source, result.ranks))
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    carried = {}
    for f in source.folds:
        ck = dict(source.checkpoints[f])
        ck["network_weights"] = result.states[f]
        ck["optimizer_state"] = None  # 2x the weights in size
        ck["grad_scaler_state"] = None
        (out / f"fold_{f}").mkdir()
        torch.save(ck, out / f"fold_{f}" / source.checkpoint)
        for rel, what in CARRIED_OVER.items():
            path = src / f"fold_{f}" / rel
            if path.is_file():
                (out / f"fold_{f}" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out / f"fold_{f}" / rel)
                carried[f"fold_{f}/{rel}"] = what
    return carried


# --------------------------------------------------------------------------------------------------------------------
# step 4: verification
# --------------------------------------------------------------------------------------------------------------------

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


@torch.no_grad()
def verify_folder(source: Source, out: Path) -> dict:
    """Load every written fold the way nnUNetv2_predict does (nnUNetPredictor on the new folder: plans, trainer by
    name, strict load) and compare one small forward with the dense fold."""
    shape = None
    diffs = {}
    for f in source.folds:
        try:
            compressed = ModelFolder(out).load(f, source.checkpoint, what="written model folder")
        except ModelFolderError as e:
            raise CompressionError(f"verification failed: fold_{f}/{source.checkpoint}: {e}") from None
        dense = source.folder.load(f, source.checkpoint, what="dense model")
        if shape is None:
            shape = (1, compressed.num_input_channels, *_min_input_shape(compressed.configuration_manager))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with eager():  # the artefact is built later, for the published weights
            a, b = dense.network.eval()(x), compressed.network.eval()(x).float()
        if not torch.isfinite(b).all():
            raise CompressionError(f"verification failed: fold_{f} gives non-finite outputs")
        diffs[f"fold_{f}"] = float((a - b).norm() / a.norm().clamp_min(1e-12))
    return {"strict_load": True, "input_shape": list(shape), "forward_rel_diff": diffs}


# --------------------------------------------------------------------------------------------------------------------
# step 5: the manifest
# --------------------------------------------------------------------------------------------------------------------

def rank_rule(config, n_folds: int, calibration: dict | None = None) -> str:
    from nnunet_green.compression.policies import MeasuredSpeed

    rule = dataclasses.replace(config, speed_rule=SPEED_RULE_MACS).describe()  # the rank rule alone
    if calibration and config.budget is not None:  # the budget was spent by CalibratedRanks
        rule = (f"calibrated ranks: {config.budget:g} of the factorizable layers' {config.budget_cost} "
                "(output error on the calibration patches, greedy)")
    if config.speed_rule == SPEED_RULE_MEASURED:
        rule += MeasuredSpeed.SUFFIX
    if calibration:
        rule += f"; data-aware factors from {calibration['patches']} calibration patches"
    if config.ranks_from_first_fold and n_folds > 1:
        rule += "; ranks chosen on the first fold"
    return rule


def build_manifest(source: Source, result: Decomposition, config, half: bool, verification: dict | None,
                   carried_over: dict[str, str]) -> CompressionManifest:
    budgeted = config.budget is not None
    folds = source.folds
    layers = []
    for r in result.records:
        d = r.to_dict()
        d["rel_error"] = (result.rel_errors[folds[0]].get(r.name) if len(folds) == 1
                          else {f"fold_{f}": result.rel_errors[f].get(r.name) for f in folds})
        layers.append(d)
    src = source.folder.path
    return CompressionManifest(
        nnunet_green_version=nnunet_green.__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        source={"path": str(src), "checkpoints": {f"fold_{f}/{source.checkpoint}":
                                                  sha256(src / f"fold_{f}" / source.checkpoint) for f in folds}},
        # rank_ratio stays null for a budgeted model: its ranks do not follow one ratio (see rule_label)
        config={"rank_ratio": None if budgeted else config.rank_ratio, "budget": config.budget,
                "budget_cost": config.budget_cost if budgeted else None, "min_rank": config.min_rank,
                "round_to": config.round_to, "half": bool(half), "speed_rule": config.speed_rule},
        rank_rule=rank_rule(config, len(folds), result.calibration),
        configuration=source.configuration,
        patch_size=source.patch_size,
        folds=list(folds),
        checkpoint=source.checkpoint,
        totals=dict(result.totals),
        layers=layers,
        recovery=None,
        trainer_name=source.trainer_name,
        dense_network_class=source.dense_class,
        verification=verification,
        carried_over=dict(carried_over),
        decomposition=DECOMPOSITION_CALIBRATED if result.calibration else DECOMPOSITION_WEIGHT_ONLY,
        calibration=result.calibration,
        layer_timing=timing_summary(layers) if config.speed_rule == SPEED_RULE_MEASURED else None,
    )


# --------------------------------------------------------------------------------------------------------------------
# step 6 (optional): label-free distillation; the recovery package owns it
# --------------------------------------------------------------------------------------------------------------------

def check_distill_images(images, dataset_json: dict) -> None:
    from nnunet_green.recovery import DistillError, check_images
    try:
        check_images(images, dataset_json)
    except DistillError as e:
        raise CompressionError(f"--distill: {e}") from None


def run_distillation(out: Path, teacher: Path, settings: dict) -> dict:
    from nnunet_green.recovery import DistillError, distill_model_folder
    try:
        return distill_model_folder(out, teacher=teacher, fast_path=False, **settings)  # compress builds it after
    except DistillError as e:
        raise CompressionError(f"distillation: {e}") from None


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------

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
