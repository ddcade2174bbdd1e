"""Label-free accuracy recovery: distil the dense model into its Tucker-compressed copy on unlabelled images.

The student is the compressed model folder (written by `compress_model_folder`), the teacher the dense folder it
was made from (`compression.json` -> `source.path`). Both networks are built and loaded exactly as the stock
predictor does (`nnUNetPredictor.initialize_from_trained_model_folder`), and the images are preprocessed with the
plans' own preprocessor (`configuration_manager.preprocessor_class().run_case`, the call the predictor makes), padded
to the patch size like the predictor's sliding window. Patches of the plans' patch size are sampled at random; the
student learns to reproduce the teacher's logits. The result replaces the compressed folder's checkpoint and is
recorded in its compression.json under "recovery".
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MANIFEST = "compression.json"
LOSSES = ("mse", "kl")


class DistillError(Exception):
    """Bad input or a failed check; the message is meant for the user as is."""


# --------------------------------------------------------------------------------------------------------------------
# models, as the stock predictor loads them
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    folder: Path
    fold: str
    network: nn.Module
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    trainer_name: str
    mirror_axes: tuple | None
    num_input_channels: int
    num_outputs: int


def load_model(folder: Path, fold: str, checkpoint: str, what: str) -> LoadedModel:
    """Network + managers of one fold, via nnU-Net's own predictor initialisation (same builder, strict load)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    ck = folder / f"fold_{fold}" / checkpoint
    if not ck.is_file():
        raise DistillError(f"{what} {folder} has no fold_{fold}/{checkpoint}")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, verbose_preprocessing=False,
                                        allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(folder), (_fold_arg(fold),), checkpoint)
    except Exception as e:  # nnU-Net raises bare RuntimeError/KeyError/FileNotFoundError for broken folders
        raise DistillError(f"cannot load the {what} {folder} the way nnUNetv2_predict does: "
                           f"{type(e).__name__}: {e}") from None
    net = predictor.network
    net = getattr(net, "_orig_mod", net)  # nnUNet_compile=1 wraps it; we train the module itself
    pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    return LoadedModel(folder=folder, fold=fold, network=net, plans_manager=pm, configuration_manager=cm,
                       dataset_json=dj, trainer_name=predictor.trainer_name,
                       mirror_axes=predictor.allowed_mirroring_axes,
                       num_input_channels=determine_num_input_channels(pm, cm, dj),
                       num_outputs=pm.get_label_manager(dj).num_segmentation_heads)


def _fold_arg(fold: str):
    return fold if fold == "all" else int(fold)


def _check_compatible(student: LoadedModel, teacher: LoadedModel):
    """Teacher and student must see the same preprocessed input and predict the same classes."""
    s, t = student.configuration_manager, teacher.configuration_manager
    problems = []
    if list(s.patch_size) != list(t.patch_size):
        problems.append(f"patch size {list(s.patch_size)} vs {list(t.patch_size)}")
    if list(s.spacing) != list(t.spacing):
        problems.append(f"spacing {list(s.spacing)} vs {list(t.spacing)}")
    if list(s.normalization_schemes) != list(t.normalization_schemes):
        problems.append(f"normalization {s.normalization_schemes} vs {t.normalization_schemes}")
    if student.num_input_channels != teacher.num_input_channels:
        problems.append(f"input channels {student.num_input_channels} vs {teacher.num_input_channels}")
    if student.num_outputs != teacher.num_outputs:
        problems.append(f"outputs {student.num_outputs} vs {teacher.num_outputs}")
    if problems:
        raise DistillError(f"teacher {teacher.folder} does not match the compressed model {student.folder}: "
                           + "; ".join(problems))


# --------------------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------------------

def channel_names(dataset_json: dict) -> list[str]:
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(names, dict) or not names:
        raise DistillError("dataset.json of the model has no channel_names")
    return [names[k] for k in sorted(names, key=int)]


def find_cases(images: Path, file_ending: str, n_channels: int, names: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """[(case id, [CASE_0000<ending>, CASE_0001<ending>, ...])] in nnU-Net's naming; every case must have exactly
    the model's channels."""
    images = Path(images)
    if not images.is_dir():
        raise DistillError(f"images folder not found: {images}")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: dict[str, dict[int, str]] = {}
    others = []
    for p in sorted(images.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        m = pattern.match(p.name)
        if m:
            cases.setdefault(m.group(1), {})[int(m.group(2))] = str(p)
        else:
            others.append(p.name)
    if not cases:
        hint = f" (found {len(others)} other files, e.g. {others[0]})" if others else ""
        raise DistillError(f"no images in {images}: expected files named CASE_0000{file_ending} (nnU-Net naming, "
                           f"one file per channel){hint}")
    expected = list(range(n_channels))
    label = ", ".join(f"_{i:04d}={n}" for i, n in enumerate(names or [])) or f"{n_channels} channel(s)"
    for case, chans in cases.items():
        if sorted(chans) != expected:
            got = ", ".join(f"_{c:04d}" for c in sorted(chans))
            raise DistillError(f"case {case!r} in {images} has channel files {got}, but the model expects "
                               f"{n_channels} channel(s) ({label})")
    return [(case, [chans[i] for i in expected]) for case, chans in sorted(cases.items())]


class CaseCache:
    """Preprocessed (and padded) cases, kept in memory up to `max_bytes`; cases beyond it are preprocessed again
    whenever they are visited (slower, memory-bounded)."""

    def __init__(self, cases, model: LoadedModel, max_bytes: int):
        from acvl_utils.cropping_and_padding.padding import pad_nd_image

        self._pad = pad_nd_image
        self.cases = dict(cases)
        self.model = model
        self.max_bytes = max_bytes
        self.cached: dict[str, np.ndarray] = {}
        self.bytes = 0
        self.preprocess_s = 0.0
        self.preprocessed = 0
        self.preprocessor = model.configuration_manager.preprocessor_class(verbose=False)

    def get(self, case: str) -> np.ndarray:
        if case in self.cached:
            return self.cached[case]
        m = self.model
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                data, _, _ = self.preprocessor.run_case(self.cases[case], None, m.plans_manager,
                                                        m.configuration_manager, m.dataset_json)
        except Exception as e:
            raise DistillError(f"cannot read/preprocess case {case!r} ({self.cases[case][0]}): "
                               f"{type(e).__name__}: {e}") from None
        if data.shape[0] != m.num_input_channels:
            raise DistillError(f"case {case!r} has {data.shape[0]} channel(s) after reading, the model expects "
                               f"{m.num_input_channels}")
        # as the predictor's sliding window: zero-pad images smaller than the patch
        data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))  # the predictor pads a tensor
        data, _ = self._pad(data, list(m.configuration_manager.patch_size), "constant", {"value": 0}, True, None)
        data = np.ascontiguousarray(data.numpy(), dtype=np.float32)
        self.preprocess_s += time.perf_counter() - t0
        self.preprocessed += 1
        if self.bytes + data.nbytes <= self.max_bytes:
            self.cached[case] = data
            self.bytes += data.nbytes
        return data


def sample_patch(data: np.ndarray, patch_size, rng: np.random.Generator, mirror_axes) -> np.ndarray:
    """Uniform random crop of `patch_size` from a (C, *spatial) array at least that large, randomly mirrored along
    the axes the predictor mirrors for test-time augmentation (mirrored inputs are inputs the model really sees)."""
    starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(data.shape[1:], patch_size)]
    patch = data[(slice(None), *[slice(a, a + p) for a, p in zip(starts, patch_size)])]
    flip = [int(a) + 1 for a in (mirror_axes or ()) if rng.random() < 0.5]
    if flip:
        patch = np.flip(patch, axis=flip)
    return np.ascontiguousarray(patch)


def _patch_stream(cache: CaseCache, case_ids, patch_size, patches_per_image: int, rng, mirror_axes):
    """Endless stream: cases in a fresh random order each pass, `patches_per_image` patches per visit (so a case
    that is not cached is preprocessed once per visit, not once per patch)."""
    while True:
        for i in rng.permutation(len(case_ids)):
            data = cache.get(case_ids[i])
            for _ in range(patches_per_image):
                yield sample_patch(data, patch_size, rng, mirror_axes)


# --------------------------------------------------------------------------------------------------------------------
# loss and evaluation
# --------------------------------------------------------------------------------------------------------------------

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


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, patches: list[np.ndarray], device, batch_size: int,
             loss: str, temperature: float) -> dict:
    """Student vs teacher on fixed patches: distillation loss, relative logit error ||s-t||/||t|| and the fraction
    of voxels whose argmax agrees."""
    err2 = ref2 = 0.0
    agree = voxels = 0
    loss_sum = 0.0
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


# --------------------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class DistillSettings:
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 2
    patches_per_image: int = 4
    loss: str = "mse"
    temperature: float = 2.0
    heldout_fraction: float = 0.2
    heldout_patches: int = 8
    eval_every: int | None = None  # held-out check every N steps (default: 5 checks per run); the best is kept
    max_cache_mb: float = 2048.0
    max_minutes: float | None = None
    patch_size: list[int] | None = None  # default: the plans' patch size; smaller bounds memory and time per step
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def checks_every(self) -> int:
        return self.eval_every or max(1, self.steps // 5)

    def check(self):
        if int(self.steps) != self.steps or self.steps < 0:
            raise DistillError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise DistillError(f"lr must be a positive number, got {self.lr!r}")
        if self.eval_every is not None and (int(self.eval_every) != self.eval_every or self.eval_every < 1):
            raise DistillError(f"eval_every must be an integer >= 1, got {self.eval_every!r}")
        for name in ("batch_size", "patches_per_image", "heldout_patches"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise DistillError(f"{name} must be an integer >= 1, got {v!r}")
        if self.loss not in LOSSES:
            raise DistillError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.temperature > 0:
            raise DistillError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DistillError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}")
        if not self.max_cache_mb >= 0:
            raise DistillError(f"max_cache_mb must be >= 0, got {self.max_cache_mb!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise DistillError(f"max_minutes must be > 0, got {self.max_minutes!r}")


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise DistillError(f"model folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise DistillError(f"{folder} is not a compressed model folder (no {MANIFEST}); compress it first with "
                           f"nnunet-green-compress")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or "folds" not in manifest:
        raise DistillError(f"{path} is not an nnunet-green compression manifest")
    return manifest


def resolve_teacher(manifest: dict, teacher=None) -> Path:
    if teacher is None:
        src = (manifest.get("source") or {}).get("path")
        if not src:
            raise DistillError(f"{MANIFEST} records no source model (source.path); pass the dense model with --teacher")
        teacher = Path(src)
        how = f"recorded in {MANIFEST} as source.path"
    else:
        teacher = Path(teacher)
        how = "given with --teacher"
    if not (teacher / "plans.json").is_file():
        raise DistillError(f"teacher (dense) model folder {teacher} ({how}) not found or has no plans.json; pass the "
                           f"dense model folder with --teacher")
    if (teacher / MANIFEST).is_file():
        raise DistillError(f"teacher {teacher} is itself a compressed model folder; the teacher must be the dense model")
    return teacher


def _resolve_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillError("--device cuda requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise DistillError(f"device must be cpu or cuda, got {device}")
    return device


def _atomic_write_bytes(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _weights_dtype(state: dict) -> torch.dtype:
    for v in state.values():
        if torch.is_tensor(v) and v.is_floating_point():
            return v.dtype
    return torch.float32


def distill_model_folder(folder, images, steps: int = 200, lr: float = 1e-4, batch_size: int = 2,
                         patches_per_image: int = 4, device="cpu", folds=None, teacher=None, seed: int = 0,
                         progress: bool = True, **settings) -> dict:
    """Distil the dense teacher into the compressed model folder `folder` on the unlabelled `images`, replace its
    checkpoint(s) and return the "recovery" record written to its compression.json.

    Other keyword settings: see DistillSettings (loss, temperature, weight_decay, heldout_fraction,
    heldout_patches, max_cache_mb, max_minutes). With more than one image, `heldout_fraction` of them (at least one)
    are never trained on and give the held-out error before/after; with a single image the held-out patches come
    from it (recorded as such).
    """
    t_start = time.perf_counter()
    folder = Path(folder).absolute()
    cfg = DistillSettings(steps=steps, lr=lr, batch_size=batch_size, patches_per_image=patches_per_image, seed=seed,
                          **settings)
    cfg.check()
    manifest = read_manifest(folder)
    teacher_folder = resolve_teacher(manifest, teacher)
    device = _resolve_device(device)
    checkpoint = manifest.get("checkpoint", "checkpoint_final.pth")
    all_folds = [str(f) for f in manifest["folds"]]
    folds = all_folds if not folds else [str(f) for f in ([folds] if isinstance(folds, (str, int)) else folds)]
    for f in folds:
        if f not in all_folds:
            raise DistillError(f"fold {f} is not in the compressed folder {folder} (has {', '.join(all_folds)})")

    try:
        dataset_json = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot read {folder / 'dataset.json'}: {e}") from None
    names = channel_names(dataset_json)
    cases = find_cases(Path(images), dataset_json.get("file_ending", ".nii.gz"), len(names), names)

    per_fold = {}
    for f in folds:
        student = load_model(folder, f, checkpoint, "compressed model")
        teach = load_model(teacher_folder, f, checkpoint, "teacher (dense) model")
        _check_compatible(student, teach)
        if not any(type(m).__name__ == "TuckerConv" for m in student.network.modules()):
            raise DistillError(f"{folder}: the network nnU-Net builds from its plans has no Tucker-factorized layers")
        per_fold[f"fold_{f}"] = _distill_one(student, teach, cases, cfg, device, checkpoint, progress,
                                             label=f"distill fold {f}")
        del student, teach

    record = {"method": "distillation", "teacher": str(teacher_folder), "images": len(cases),
              "images_dir": str(Path(images).absolute()), "steps": cfg.steps, "lr": cfg.lr,
              "weight_decay": cfg.weight_decay, "optimizer": "AdamW", "loss": cfg.loss,
              "temperature": cfg.temperature if cfg.loss == "kl" else None, "batch_size": cfg.batch_size,
              "patches_per_image": cfg.patches_per_image, "patch_size": cfg.patch_size, "eval_every": cfg.checks_every,
              "seed": cfg.seed, "device": str(device), "folds": folds}
    keys = ("loss_before", "loss_after", "heldout_rel_error_before", "heldout_rel_error_after",
            "heldout_agreement_before", "heldout_agreement_after", "train_loss_first", "train_loss_last",
            "steps_done", "kept_step", "heldout_history", "heldout", "heldout_images", "train_images", "seconds",
            "preprocess_s", "cached_images",
            "energy_j", "energy_source", "co2eq_g")
    for k in keys:  # one fold: plain values; several: {fold_X: value} (like compression.json's rel_error)
        vals = {fk: r[k] for fk, r in per_fold.items()}
        record[k] = next(iter(vals.values())) if len(vals) == 1 else vals
    record["seconds_total"] = round(time.perf_counter() - t_start, 2)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    previous = manifest.get("recovery")
    if previous:
        manifest.setdefault("recovery_history", []).append(previous)
    manifest["recovery"] = record
    _atomic_write_bytes(folder / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    return record


def _copy_state(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _check_heldout(s_net, t_net, patches, device, cfg: DistillSettings, step: int, best: dict, history: list):
    ev = evaluate(s_net, t_net, patches, device, cfg.batch_size, cfg.loss, cfg.temperature)
    history.append({"step": step, "loss": ev["loss"], "rel_error": ev["rel_error"]})
    if ev["loss"] < best["eval"]["loss"]:
        best.update(step=step, eval=ev, state=_copy_state(s_net))


def training_patch(configuration_manager, requested) -> list[int]:
    """The plans' patch size, or a smaller one the U-Net accepts (a multiple of its total stride on every axis)."""
    plans_patch = list(configuration_manager.patch_size)
    if requested is None:
        return plans_patch
    stride = [1] * len(plans_patch)
    for s in configuration_manager.pool_op_kernel_sizes:
        s = [s] * len(plans_patch) if isinstance(s, int) else s
        stride = [a * int(b) for a, b in zip(stride, s)]
    requested = [int(v) for v in requested]
    if len(requested) != len(plans_patch) or any(not 0 < r <= p or r % t for r, p, t in
                                                 zip(requested, plans_patch, stride)):
        raise DistillError(f"patch size {requested} must have {len(plans_patch)} sizes, each a multiple of the "
                           f"network's total stride {stride} and at most the plans' patch size {plans_patch}")
    return requested


def _distill_one(student: LoadedModel, teacher: LoadedModel, cases, cfg: DistillSettings, device, checkpoint: str,
                 progress: bool, label: str) -> dict:
    from nnunet_green.metering.carbon import carbon_setting
    from nnunet_green.metering.energy import EnergyMeter

    t0 = time.perf_counter()
    meter = EnergyMeter(device)  # the same counters as the green trainers: recovery cost next to training cost
    energy_start = meter.read()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    ids = [c for c, _ in cases]
    order = list(rng.permutation(len(ids)))
    n_hold = max(1, round(cfg.heldout_fraction * len(ids))) if len(ids) >= 2 and cfg.heldout_fraction > 0 else 0
    held = sorted(ids[i] for i in order[:n_hold])
    train = sorted(ids[i] for i in order[n_hold:])
    cache = CaseCache(cases, student, int(cfg.max_cache_mb * 2 ** 20))
    patch = training_patch(student.configuration_manager, cfg.patch_size)
    mirror = student.mirror_axes

    # held-out patches: fixed, from images never trained on (or, with one image, from that image)
    eval_rng = np.random.default_rng(cfg.seed + 1)
    eval_ids = held or train
    eval_patches = [sample_patch(cache.get(eval_ids[i % len(eval_ids)]), patch, eval_rng, None)
                    for i in range(cfg.heldout_patches)]
    for c in held:  # never needed again: free the memory for training cases
        if c in cache.cached:
            cache.bytes -= cache.cached.pop(c).nbytes

    s_net, t_net = student.network.to(device), teacher.network.to(device)
    # eval() for both: nnU-Net's nets use InstanceNorm without running stats (train/eval identical); for nets with
    # BatchNorm, frozen statistics keep the student normalising the way it will at inference
    s_net.eval()
    t_net.eval()
    for p in t_net.parameters():
        p.requires_grad_(False)
    before = evaluate(s_net, t_net, eval_patches, device, cfg.batch_size, cfg.loss, cfg.temperature)

    params = [p for p in s_net.parameters() if p.requires_grad]
    # AdamW: the factors of a Tucker chain have very different scales (orthonormal first/last, the core carries the
    # magnitude); per-parameter step sizes handle that, and a small lr keeps the student near the decomposition
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / max(cfg.steps, 1)) ** 0.9)  # nnU-Net's poly
    stream = _patch_stream(cache, train, patch, cfg.patches_per_image, rng, mirror)
    deadline = None if cfg.max_minutes is None else time.perf_counter() + 60 * cfg.max_minutes
    losses = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)
    steps_done = 0
    nonfinite = 0
    # keep the weights that do best on the held-out patches, the starting point included: distillation must never
    # hand back a model further from the teacher than the decomposition it started from (too large an lr does that)
    eval_every = cfg.checks_every
    best = {"step": 0, "eval": before, "state": _copy_state(s_net)}
    history = [{"step": 0, "loss": before["loss"], "rel_error": before["rel_error"]}]
    try:
        for step in range(cfg.steps):
            if deadline is not None and time.perf_counter() > deadline:
                break
            x = torch.from_numpy(np.stack([next(stream) for _ in range(cfg.batch_size)])).to(device)
            with torch.no_grad():
                target = t_net(x).float()
            loss = distill_loss(s_net(x).float(), target, cfg.loss, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, 12)
            if torch.isfinite(loss) and torch.isfinite(gnorm):
                opt.step()
            else:
                nonfinite += 1
                if nonfinite >= 5:
                    raise DistillError(f"{nonfinite} distillation steps had a non-finite loss/gradient; lower --lr")
            sched.step()
            steps_done += 1
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4g}", cached=f"{len(cache.cached)}/{len(train)}")
            if steps_done % eval_every == 0 or steps_done == cfg.steps:
                _check_heldout(s_net, t_net, eval_patches, device, cfg, steps_done, best, history)
    finally:
        if bar is not None:
            bar.close()
    if history[-1]["step"] != steps_done:  # stopped early by --max-minutes
        _check_heldout(s_net, t_net, eval_patches, device, cfg, steps_done, best, history)
    if best["step"] != steps_done:
        s_net.load_state_dict(best["state"])
    after = best["eval"]  # the check of the weights being saved: no need to evaluate them again
    k = max(1, min(10, len(losses) // 2))  # running means over the first/last k steps

    # save: the original checkpoint with the new weights, in the dtype the folder stored (--half stays half)
    ck_path = student.folder / f"fold_{student.fold}" / checkpoint
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    s_net = s_net.to("cpu").to(_weights_dtype(ck["network_weights"]))  # whole module: aliases stay shared
    ck["network_weights"] = s_net.state_dict()
    _atomic_write_bytes(ck_path, lambda p: torch.save(ck, p))
    t_net.to("cpu")
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
            "preprocess_s": round(cache.preprocess_s, 2), "cached_images": len(cache.cached)}
