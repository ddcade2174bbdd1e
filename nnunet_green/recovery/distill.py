"""Label-free accuracy recovery: distil the dense model into its Tucker-compressed copy on unlabelled images.

The student is the compressed model folder (written by nnunet-green-compress), the teacher the dense folder it was
made from (`compression.json` -> `source.path`). Both are loaded through `nnunet_io.ModelFolder.load`, i.e. exactly
as the stock predictor loads them; the images are preprocessed as the predictor does (`recovery.patches`). Patches
are sampled at random and the student learns to reproduce the teacher's logits; held-out checks keep the best
weights, the starting ones included. The result replaces the compressed folder's checkpoint(s) and is recorded in
its compression.json under "recovery" (`"kind": "distilled"`).
"""
from __future__ import annotations

import functools
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_green.contract import (DEFAULT_CHECKPOINT, MANIFEST_FILE, PLANS_FILE, RECOVERY_DISTILLED,
                                   CompressionManifest)
from nnunet_green.compression.fast_folder import build_fast_path
from nnunet_green.compression.fast_path import eager
from nnunet_green.nnunet_io import LoadedModel, ModelFolder, predicts_regions
from nnunet_green.recovery.record import add_recovery
from nnunet_green.recovery.patches import CaseCache, check_images, patch_stream, sample_patch, training_patch
from nnunet_green.recovery.settings import LOSSES, DistillError, DistillSettings

MAX_NONFINITE_STEPS = 5  # skipped steps (non-finite loss or gradient) before the run stops with an error


# --- loss and evaluation -------------------------------------------------------------------------------------------
def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str = "mse",
                 temperature: float = 2.0) -> torch.Tensor:
    """mse: mean squared difference of the logits. nnU-Net's predictor averages LOGITS over overlapping windows
    and mirrored copies before the argmax, so matching the logits matches what the predictor aggregates, including
    the confident background voxels where softmax saturates and a KL term has almost no gradient. kl:
    T^2 * KL(softmax(t/T) || softmax(s/T)) per voxel (Hinton et al.), for users who prefer matching probabilities."""
    if loss == "mse":
        return F.mse_loss(student_logits, teacher_logits)
    if loss == "kl":
        t = temperature
        log_p_s = F.log_softmax(student_logits / t, dim=1)
        log_p_t = F.log_softmax(teacher_logits / t, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        return kl.mean() * t * t
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


class StageOutputs:
    """The output of every encoder and decoder stage of a U-Net during each forward, recorded by forward hooks
    (removed by `close`): the intermediate targets of `feature_weight`. A compressed network keeps the dense one's
    module names, so teacher and student stages pair up by name."""

    STAGE = re.compile(r"(encoder|decoder)\.stages\.\d+")

    def __init__(self, net: nn.Module):
        modules = dict(net.named_modules())
        self.names = [n for n in modules if self.STAGE.fullmatch(n)]
        if not self.names:
            raise DistillError(f"feature matching needs a U-Net with encoder.stages / decoder.stages (nnU-Net's "
                               f"PlainConvUNet, ResidualEncoderUNet); {type(net).__name__} has none")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(functools.partial(self._record, n)) for n in self.names]

    def _record(self, name, module, args, output):
        self.outputs[name] = output

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self.outputs.clear()


def paired_stage_outputs(student: nn.Module, teacher: nn.Module) -> tuple[StageOutputs, StageOutputs]:
    """Stage recorders on both networks, whose stages must pair up by name (no hooks are left on failure)."""
    s = StageOutputs(student)
    try:
        t = StageOutputs(teacher)
    except DistillError:
        s.close()
        raise
    if s.names != t.names:
        s.close()
        t.close()
        raise DistillError("the compressed network's encoder/decoder stages do not match the teacher's")
    return s, t


def stage_loss(student: StageOutputs, teacher: StageOutputs) -> torch.Tensor:
    """Mean over the stages of the relative squared error ||s - t||^2 / ||t||^2 (scale-free: deep stages have
    larger activations than shallow ones)."""
    terms = [((student.outputs[n].float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(1e-12)
             for n, t in teacher.outputs.items()]
    return torch.stack(terms).mean()


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, patches: list[np.ndarray], device, batch_size: int,
             loss: str, temperature: float) -> dict:
    """Student vs teacher on fixed patches: distillation loss, relative logit error ||s-t||/||t|| and the fraction
    of voxels whose argmax agrees."""
    err2 = ref2 = loss_sum = 0.0
    agree = voxels = 0
    for i in range(0, len(patches), batch_size):
        x = torch.from_numpy(np.stack(patches[i:i + batch_size])).to(device)
        t, s = teacher(x).float(), student(x).float()
        err2 += float(((s - t) ** 2).sum())
        ref2 += float((t ** 2).sum())
        agree += int((s.argmax(1) == t.argmax(1)).sum())
        voxels += t[:, 0].numel()
        loss_sum += float(distill_loss(s, t, loss, temperature)) * x.shape[0]
    return {"loss": loss_sum / len(patches), "rel_error": math.sqrt(err2 / max(ref2, 1e-30)),
            "argmax_agreement": agree / max(voxels, 1)}


# --- inputs --------------------------------------------------------------------------------------------------------
def read_manifest(folder: ModelFolder) -> CompressionManifest:
    manifest = folder.check().manifest()
    if manifest is None:
        raise DistillError(f"{folder.path} is not a compressed model folder (no {MANIFEST_FILE}); compress it first "
                           f"with nnunet-green-compress")
    return manifest


def resolve_teacher(manifest: CompressionManifest, teacher=None) -> ModelFolder:
    """The dense folder: `teacher` if given, else the one recorded as source.path."""
    if teacher is None:
        src = (manifest.source or {}).get("path")
        if not src:
            raise DistillError(f"{MANIFEST_FILE} records no source model (source.path); pass the dense model with "
                               f"--teacher")
        path, how = Path(src), f"recorded in {MANIFEST_FILE} as source.path"
    else:
        path, how = Path(teacher), "given with --teacher"
    if not (path / PLANS_FILE).is_file():
        raise DistillError(f"teacher (dense) model folder {path} ({how}) not found or has no {PLANS_FILE}; pass the "
                           f"dense model folder with --teacher")
    folder = ModelFolder(path)
    if (folder.path / MANIFEST_FILE).is_file():
        raise DistillError(f"teacher {path} is itself a compressed model folder; the teacher must be the dense model")
    return folder


def resolve_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DistillError(f"device must be cpu or cuda, got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise DistillError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillError("--device cuda requested but CUDA is not available")
    return device


def check_compatible(student: LoadedModel, teacher: LoadedModel) -> None:
    """Teacher and student must see the same preprocessed input and predict the same classes."""
    s, t = student.configuration_manager, teacher.configuration_manager
    problems = []
    for what, a, b in (("patch size", list(s.patch_size), list(t.patch_size)),
                       ("spacing", list(s.spacing), list(t.spacing)),
                       ("normalization", list(s.normalization_schemes), list(t.normalization_schemes)),
                       ("input channels", student.num_input_channels, teacher.num_input_channels),
                       ("outputs", student.num_outputs, teacher.num_outputs)):
        if a != b:
            problems.append(f"{what} {a} vs {b}")
    if problems:
        raise DistillError(f"teacher {teacher.folder} does not match the compressed model {student.folder}: "
                           + "; ".join(problems))
    if not any(type(m).__name__ == "TuckerConv" for m in student.network.modules()):
        raise DistillError(f"{student.folder}: the network nnU-Net builds from its plans has no Tucker-factorized "
                           f"layers")


def _folds(manifest: CompressionManifest, folder: Path, folds) -> list[str]:
    present = [str(f) for f in manifest.folds]
    if not folds:
        return present
    chosen = [str(f) for f in ([folds] if isinstance(folds, (str, int)) else folds)]
    for f in chosen:
        if f not in present:
            raise DistillError(f"fold {f} is not in the compressed folder {folder} (has {', '.join(present)})")
    return chosen


# --- the library call ----------------------------------------------------------------------------------------------
# per-fold values of the record; with several folds each becomes {fold_X: value} (like compression.json's rel_error)
FOLD_KEYS = ("loss_before", "loss_after", "heldout_rel_error_before", "heldout_rel_error_after",
             "heldout_agreement_before", "heldout_agreement_after", "train_loss_first", "train_loss_last",
             "steps_done", "nonfinite_steps", "kept_step", "heldout_history", "heldout", "heldout_images",
             "train_images", "seconds", "preprocess_s", "cached_images", "energy_j", "energy_source", "co2eq_g")


def distill_model_folder(folder, images, settings: DistillSettings | None = None, *, teacher=None, device="cpu",
                         folds=None, progress: bool = True, fast_path: bool = True, **overrides) -> dict:
    """Distil the dense teacher into the compressed model folder `folder` on the unlabelled `images`, replace its
    checkpoint(s) and return the "recovery" record written to its compression.json.

    `settings` (default `DistillSettings()`) with `overrides` (DistillSettings field names, e.g. steps=300) say how;
    `teacher` (default: the source recorded in compression.json), `device` and `folds` (default: all compressed
    folds) say with what. With more than one image, `heldout_fraction` of them (at least one) are never trained on
    and give the held-out error before/after; with a single image the held-out patches come from it (recorded).
    Bad input raises DistillError (a GreenError) before anything is written. `fast_path`: rebuild the fast CPU
    inference artefact of the distilled folds (the old one no longer fits their weights).
    """
    t_start = time.perf_counter()
    cfg = (settings or DistillSettings()).replace(**overrides).check()
    student_folder = ModelFolder(folder)
    manifest = read_manifest(student_folder)
    teacher_folder = resolve_teacher(manifest, teacher)
    device = resolve_device(device)
    checkpoint = manifest.checkpoint or DEFAULT_CHECKPOINT
    folds = _folds(manifest, student_folder.path, folds)
    if cfg.loss == "kl" and predicts_regions(student_folder.dataset_json):
        raise DistillError(f"--loss kl compares softmax outputs, but {student_folder.path} predicts overlapping "
                           f"regions (a sigmoid per channel): use --loss mse")
    cases = check_images(images, student_folder.dataset_json)

    per_fold, trained = {}, {}
    for f in folds:  # everything is checked and trained before the first file is replaced
        student = student_folder.load(f, checkpoint, what="compressed model")
        teach = teacher_folder.load(f, checkpoint, what="teacher (dense) model")
        check_compatible(student, teach)
        if f == folds[0]:
            training_patch(student.configuration_manager, cfg.patch_size)  # bad --patch-size: fail before training
        with eager():  # the student's artefact is stale while it learns: evaluate it eagerly, silently
            per_fold[f"fold_{f}"], trained[f] = distill_fold(student, teach, cases, cfg, device, progress,
                                                             label=f"distill fold {f}")
        del student, teach
    for f, network in trained.items():
        save_weights(student_folder, f, checkpoint, network)

    record = {"kind": RECOVERY_DISTILLED, "method": "distillation", "teacher": str(teacher_folder.path),
              "images": len(cases), "images_dir": str(Path(images).absolute()), "optimizer": "AdamW",
              **cfg.record(), "device": str(device), "folds": folds}
    for k in FOLD_KEYS:
        vals = {fk: r[k] for fk, r in per_fold.items()}
        record[k] = next(iter(vals.values())) if len(vals) == 1 else vals
    record["seconds_total"] = round(time.perf_counter() - t_start, 2)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    add_recovery(manifest, record)
    if fast_path:
        manifest.fast_path = build_fast_path(student_folder.path, folds, checkpoint)
    manifest.write(student_folder.path / MANIFEST_FILE)
    return manifest.recovery


# --- one fold ------------------------------------------------------------------------------------------------------
def _copy_state(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def split_cases(case_ids: list[str], heldout_fraction: float, rng) -> tuple[list[str], list[str]]:
    """(held-out, training) case ids: `heldout_fraction` of them, at least one, if there are two or more."""
    order = list(rng.permutation(len(case_ids)))
    n_hold = max(1, round(heldout_fraction * len(case_ids))) if len(case_ids) >= 2 and heldout_fraction > 0 else 0
    return sorted(case_ids[i] for i in order[:n_hold]), sorted(case_ids[i] for i in order[n_hold:])


def distill_fold(student: LoadedModel, teacher: LoadedModel, cases, cfg: DistillSettings, device, progress: bool,
                 label: str) -> tuple[dict, nn.Module]:
    """Train one fold's student; returns (its record, the network holding the weights to save)."""
    from nnunet_green.metering.carbon import carbon_setting
    from nnunet_green.metering.energy import EnergyMeter

    t0 = time.perf_counter()
    meter = EnergyMeter(device)  # the same counters as the green trainers: recovery cost next to training cost
    energy_start = meter.read()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    held, train = split_cases([c for c, _ in cases], cfg.heldout_fraction, rng)
    cache = CaseCache(cases, student, int(cfg.max_cache_mb * 2 ** 20))
    patch = training_patch(student.configuration_manager, cfg.patch_size)

    # held-out patches: fixed, from images never trained on (or, with one image, from that image)
    eval_rng = np.random.default_rng(cfg.seed + 1)
    eval_ids = held or train
    eval_patches = [sample_patch(cache.get(eval_ids[i % len(eval_ids)]), patch, eval_rng, None)
                    for i in range(cfg.heldout_patches)]
    for c in held:  # never needed again: free the memory for training cases
        cache.drop(c)

    s_net, t_net = student.network.to(device), teacher.network.to(device)
    # eval() for both: nnU-Net's nets use InstanceNorm without running stats (train/eval identical); for nets with
    # BatchNorm, frozen statistics keep the student normalising the way it will at inference
    s_net.eval()
    t_net.eval()
    for p in t_net.parameters():
        p.requires_grad_(False)

    taps = paired_stage_outputs(s_net, t_net) if cfg.feature_weight > 0 else None

    def check_heldout(step: int) -> dict:
        ev = evaluate(s_net, t_net, eval_patches, device, cfg.batch_size, cfg.loss, cfg.temperature)
        history.append({"step": step, "loss": ev["loss"], "rel_error": ev["rel_error"]})
        for tap in taps or ():
            tap.outputs.clear()
        return ev

    # keep the weights that do best on the held-out patches, the starting point included: distillation must never
    # hand back a model further from the teacher than the decomposition it started from (too large an lr does that)
    history: list[dict] = []
    before = check_heldout(0)
    best = {"step": 0, "eval": before, "state": _copy_state(s_net)}

    def check_and_keep(step: int) -> None:
        ev = check_heldout(step)
        if ev["loss"] < best["eval"]["loss"]:
            best.update(step=step, eval=ev, state=_copy_state(s_net))

    params = [p for p in s_net.parameters() if p.requires_grad]
    # AdamW: the factors of a Tucker chain have very different scales (orthonormal first/last, the core carries the
    # magnitude); per-parameter step sizes handle that, and a small lr keeps the student near the decomposition
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / max(cfg.steps, 1)) ** 0.9)  # nnU-Net's poly
    stream = patch_stream(cache, train, patch, cfg.patches_per_image, rng, student.mirror_axes)
    deadline = None if cfg.max_minutes is None else time.perf_counter() + 60 * cfg.max_minutes
    losses: list[float] = []
    steps_done = nonfinite = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        for _ in range(cfg.steps):
            if deadline is not None and time.perf_counter() > deadline:
                break
            x = torch.from_numpy(np.stack([next(stream) for _ in range(cfg.batch_size)])).to(device)
            with torch.no_grad():
                target = t_net(x).float()
            loss = distill_loss(s_net(x).float(), target, cfg.loss, cfg.temperature)
            if taps is not None:  # weighted so that feature_weight 1 counts a stage's relative error like the logits'
                loss = loss + cfg.feature_weight * (target ** 2).mean() * stage_loss(*taps)
                for tap in taps:
                    tap.outputs.clear()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, 12)
            if torch.isfinite(loss) and torch.isfinite(gnorm):
                opt.step()
                losses.append(loss.item())
            else:
                nonfinite += 1
                if nonfinite >= MAX_NONFINITE_STEPS:
                    raise DistillError(f"{nonfinite} distillation steps had a non-finite loss/gradient; lower --lr")
            sched.step()
            steps_done += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-10:]) if losses else math.nan:.4g}",
                                cached=f"{len(cache.cached)}/{len(train)}")
            if steps_done % cfg.checks_every == 0 or steps_done == cfg.steps:
                check_and_keep(steps_done)
    finally:
        if bar is not None:
            bar.close()
        for tap in taps or ():
            tap.close()
    if history[-1]["step"] != steps_done:  # stopped early by max_minutes
        check_and_keep(steps_done)
    if best["step"] != steps_done:
        s_net.load_state_dict(best["state"])
    after = best["eval"]  # the check of the weights being saved: no need to evaluate them again
    k = max(1, min(10, len(losses) // 2))  # running means over the first/last k steps
    t_net.to("cpu")
    s_net.to("cpu")
    parts = [None if a is None or b is None else a - b for a, b in zip(meter.read(), energy_start)]
    energy_j = None if parts == [None, None] else sum(x for x in parts if x is not None)
    energy_source = meter.source
    meter.close()

    return {"loss_before": before["loss"], "loss_after": after["loss"],
            "heldout_rel_error_before": before["rel_error"], "heldout_rel_error_after": after["rel_error"],
            "heldout_agreement_before": before["argmax_agreement"],
            "heldout_agreement_after": after["argmax_agreement"],
            "train_loss_first": float(np.mean(losses[:k])) if losses else None,
            "train_loss_last": float(np.mean(losses[-k:])) if losses else None,
            "steps_done": steps_done, "nonfinite_steps": nonfinite, "kept_step": best["step"],
            "heldout_history": history,
            "heldout": "images" if held else "patches of the training image (only one image given)",
            "heldout_images": held, "train_images": len(train), "seconds": round(time.perf_counter() - t0, 2),
            "energy_j": energy_j, "energy_source": energy_source, "co2eq_g": carbon_setting().co2eq_g(energy_j),
            "preprocess_s": round(cache.preprocess_s, 2), "cached_images": len(cache.cached)}, s_net


# --- output --------------------------------------------------------------------------------------------------------
def _weights_dtype(state: dict) -> torch.dtype:
    for v in state.values():
        if torch.is_tensor(v) and v.is_floating_point():
            return v.dtype
    return torch.float32


def save_weights(folder: ModelFolder, fold: str, checkpoint: str, network: nn.Module) -> None:
    """The fold's checkpoint with `network`'s weights, in the dtype the folder stored (half stays half), trainer
    name and init args kept; replaced atomically (written beside, then renamed)."""
    ck = folder.load_checkpoint(fold, checkpoint)
    network = network.to("cpu").to(_weights_dtype(ck["network_weights"]))  # whole module: aliases stay shared
    ck["network_weights"] = network.state_dict()
    folder.save_checkpoint(fold, ck, checkpoint)
