"""Calibration statistics: what the data-aware decomposition (`data_aware.py`) needs from real inputs.

One forward of the DENSE network over calibration patches, with forward hooks on the factorizable convs. Per conv
and per channel side (input, output) the hooks stream a C x C second-moment matrix, the channel sums and the
within-instance (per-patch centred) scatter, in float64. Activations are never kept: memory is the network's own
forward plus a few C x C matrices per layer. Hooks are registered for the forward and removed after it (no module is
patched).
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from nnunet_green.contract import DEFAULT_CALIBRATION_PATCHES, DEFAULT_CALIBRATION_RIDGE, GreenError

from .cost import dense_reason
from .surgery import unique_convs

DEFAULT_RIDGE = DEFAULT_CALIBRATION_RIDGE
MIN_PATCH_COVERAGE = 1 / 8        # an image with fewer voxels than this fraction of a patch is refused


class CalibrationError(GreenError):
    """Calibration images or statistics that cannot be used (one message naming the file)."""


@dataclass
class Moments:
    """Streamed channel statistics of one tensor side: sum of x x^T, sum of x, within-instance scatter
    (sum over instances of X_i X_i^T - s_i s_i^T / n_i), voxel and instance counts."""
    second: torch.Tensor
    first: torch.Tensor
    within: torch.Tensor
    voxels: int = 0
    instances: int = 0

    @classmethod
    def zeros(cls, channels: int) -> "Moments":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(z(channels, channels), z(channels), z(channels, channels))

    @torch.no_grad()
    def add(self, t: torch.Tensor) -> bool:
        """Add a (N, C, *spatial) batch; returns False if it held non-finite values (nothing added then)."""
        n, c = t.shape[:2]
        x = t.detach().reshape(n, c, -1)
        if x.dtype != torch.float32:
            x = x.float()
        for xi in x:
            s = xi.sum(1).double()  # fp32 pairwise sum: accurate enough, ~3x faster than summing in float64
            if not torch.isfinite(s).all():
                return False
            g = (xi @ xi.T).double()  # fp32 GEMM (fast, blocked sums), accumulated in float64
            self.second += g
            self.first += s
            self.within += g - torch.outer(s, s) / xi.shape[1]
            self.voxels += xi.shape[1]
            self.instances += 1
        return True

    @property
    def mean(self) -> torch.Tensor:
        return self.first / max(self.voxels, 1)

    def covariance(self, per_instance: bool) -> torch.Tensor:
        """Centred covariance per voxel: within each instance (what a following InstanceNorm sees) or about the
        global mean."""
        if per_instance:
            cov = self.within
        else:
            cov = self.second - torch.outer(self.first, self.first) / max(self.voxels, 1)
        cov = cov / max(self.voxels, 1)
        return (cov + cov.T) / 2


@dataclass
class CrossMoments:
    """Streamed cross statistics of two tensors of one shape seen on the same inputs (a layer's dense input x and
    the input u the compressed network gives it instead): sum of x u^T, the sums of each, the within-instance cross
    scatter and the voxel count."""
    second: torch.Tensor
    first_x: torch.Tensor
    first_u: torch.Tensor
    within: torch.Tensor
    voxels: int = 0

    @classmethod
    def zeros(cls, channels: int) -> "CrossMoments":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(z(channels, channels), z(channels), z(channels), z(channels, channels))

    @torch.no_grad()
    def add(self, x: torch.Tensor, u: torch.Tensor) -> bool:
        """Add a pair of (N, C, *spatial) batches; False if either held non-finite values (nothing added then)."""
        n, c = x.shape[:2]
        xs, us = x.detach().reshape(n, c, -1).float(), u.detach().reshape(n, c, -1).float()
        for xi, ui in zip(xs, us):
            sx, su = xi.sum(1).double(), ui.sum(1).double()
            if not (torch.isfinite(sx).all() and torch.isfinite(su).all()):
                return False
            g = (xi @ ui.T).double()
            self.second += g
            self.first_x += sx
            self.first_u += su
            self.within += g - torch.outer(sx, su) / xi.shape[1]
            self.voxels += xi.shape[1]
        return True

    def covariance(self, per_instance: bool) -> torch.Tensor:
        """Centred cross covariance E[x u^T] per voxel, within each instance or about the global means."""
        cov = self.within if per_instance else self.second - torch.outer(self.first_x, self.first_u) / max(
            self.voxels, 1)
        return cov / max(self.voxels, 1)


@dataclass
class InputDrift:
    """What a layer gets from the already compressed layers before it instead of its dense input (sequential
    calibration): the moments of that input and its cross moments with the dense input, on the same patches."""
    inputs: Moments
    cross: CrossMoments

    @classmethod
    def zeros(cls, channels: int) -> "InputDrift":
        return cls(Moments.zeros(channels), CrossMoments.zeros(channels))

    def add(self, dense_input: torch.Tensor, compressed_input: torch.Tensor) -> bool:
        return self.inputs.add(compressed_input) and self.cross.add(dense_input, compressed_input)


@dataclass
class LayerStatistics:
    inputs: Moments
    outputs: Moments
    norm: nn.Module | None  # the normalisation right after the conv, if any


@dataclass
class CalibrationStats:
    """Per canonical conv name, the statistics of its inputs and outputs on the calibration patches."""
    layers: dict[str, LayerStatistics]
    patches: int
    patch_shape: list[int]
    seconds: float
    peak_rss_mb: float
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"patches": self.patches, "patch_size": self.patch_shape, "statistics_s": round(self.seconds, 2),
                "process_peak_rss_mb": round(self.peak_rss_mb, 1), "layers_with_statistics": len(self.layers),
                **self.extra}


def following_norms(model: nn.Module) -> dict[int, nn.Module]:
    """id(conv) -> the normalisation applied right after it. nnU-Net's blocks (ConvDropoutNormReLU, ...) hold
    `conv` and `norm` side by side and run conv -> (dropout) -> norm -> nonlin; transposed convs and segmentation
    heads have no such sibling."""
    norms = {}
    for m in model.modules():
        conv, norm = getattr(m, "conv", None), getattr(m, "norm", None)
        if isinstance(conv, nn.Module) and isinstance(norm, nn.modules.instancenorm._InstanceNorm):
            norms[id(conv)] = norm
    return norms


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def collect_statistics(model: nn.Module, patches: Iterable[torch.Tensor],
                       filter_fn: Callable[[nn.Module, str], bool] | None = None,
                       names: Iterable[str] | None = None, progress: bool = False,
                       label: Callable[[int], str] | None = None) -> CalibrationStats:
    """Run `model` (eval, no grad) once over `patches` ((1, C, *spatial) tensors, or batches) and collect the
    statistics of every conv a Tucker-2 factorization may replace (`cost.dense_reason` at min_rank 1; only `names`
    if given). `label(i)` names patch i in errors (e.g. its file). CalibrationError if a patch makes any statistic
    non-finite."""
    t0 = time.perf_counter()
    wanted = None if names is None else set(names)
    norms = following_norms(model)
    layers: dict[str, LayerStatistics] = {}
    hooks, bad = [], []

    hook_s = [0.0]  # time inside the hooks: what the statistics add to the plain forwards

    def make_hook(name: str, stats: LayerStatistics):
        def hook(module, args, output):
            t = time.perf_counter()
            if not (stats.inputs.add(args[0]) and stats.outputs.add(output)):
                bad.append(name)
            hook_s[0] += time.perf_counter() - t
        return hook

    for name, _, conv in unique_convs(model):
        if dense_reason(conv, 1) is not None or (filter_fn is not None and not filter_fn(conv, name)):
            continue
        if wanted is not None and name not in wanted:
            continue
        stats = LayerStatistics(Moments.zeros(conv.in_channels), Moments.zeros(conv.out_channels),
                                norms.get(id(conv)))
        layers[name] = stats
        hooks.append(conv.register_forward_hook(make_hook(name, stats)))
    was_training = model.training
    model.eval()
    count, shape = 0, []
    items = patches
    if progress:
        from tqdm import tqdm
        items = tqdm(patches, desc="calibration forward", unit="patch", leave=False)
    try:
        for i, x in enumerate(items):
            x = torch.as_tensor(x)
            shape = shape or list(x.shape[2:])  # recorded from the first patch
            y = model(x)
            y = y[0] if isinstance(y, (list, tuple)) else y
            if bad or not torch.isfinite(y).all():
                where = label(i) if label is not None else f"patch {i}"
                layer = f" (first at layer {bad[0]})" if bad else ""
                raise CalibrationError(f"calibration produced non-finite values on {where}{layer}")
            count += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise CalibrationError("no calibration patches were given")
    return CalibrationStats(layers, count, shape, time.perf_counter() - t0, peak_rss_mb(),
                            {"statistics_hooks_s": round(hook_s[0], 2)})


def image_patches(model, images, n_patches: int = DEFAULT_CALIBRATION_PATCHES, seed: int = 0):
    """(patches, labels, record) for calibration from an images folder: cases found and preprocessed exactly as the
    predictor does (`recovery.patches`), one random patch of the plans' patch size per case in turn (cases in a
    seeded random order, cycled when n_patches exceeds them). `model` is a LoadedModel-like object (plans and
    configuration managers, dataset_json, num_input_channels). CalibrationError names the file at fault."""
    import numpy as np

    from nnunet_green.recovery.patches import DistillError, check_images, pad_to_patch, read_case, sample_patch

    if isinstance(n_patches, bool) or not isinstance(n_patches, int) or n_patches < 1:
        raise CalibrationError(f"--calibration-patches must be a positive integer; got {n_patches!r}")
    try:
        cases = check_images(images, model.dataset_json)
    except DistillError as e:
        raise CalibrationError(str(e)) from None
    patch = [int(p) for p in model.configuration_manager.patch_size]
    rng = np.random.default_rng(seed)
    order = [cases[i] for i in rng.permutation(len(cases))]
    chosen = [order[i % len(order)] for i in range(n_patches)]
    data_of, patches, labels = {}, [], []
    t0 = time.perf_counter()
    for case, files in chosen:
        if case not in data_of:
            try:
                data, properties = read_case(model, files)
            except DistillError as e:
                raise CalibrationError(str(e)) from None
            # nnU-Net's readers turn a 2D image into a 3D one with a single slice (then resampled to many)
            read_shape = list(properties.get("shape_before_cropping", data.shape[1:]))
            flat = [i for i, (s, p) in enumerate(zip(read_shape, patch)) if s == 1 and p > 1]
            if data.ndim != 1 + len(patch) or len(read_shape) != len(patch) or flat:
                raise CalibrationError(f"{files[0]} is not a {len(patch)}D image (read as shape {read_shape}); the "
                                       f"model is {len(patch)}D")
            voxels = math.prod(data.shape[1:])
            if voxels < MIN_PATCH_COVERAGE * math.prod(patch):
                raise CalibrationError(f"{files[0]} has {voxels} voxels after preprocessing, fewer than "
                                       f"{MIN_PATCH_COVERAGE:.3g} of a patch {patch} ({math.prod(patch)} voxels): its "
                                       "patches would be mostly padding")
            data_of = {case: pad_to_patch(model, data)}  # one case in memory at a time (cases come in turn)
        patches.append(torch.from_numpy(sample_patch(data_of[case], patch, rng, None))[None])
        labels.append(files[0])
    return patches, labels, {"images": len(cases), "source": str(images), "patches": n_patches,
                             "patch_size": patch, "preprocess_s": round(time.perf_counter() - t0, 2), "seed": seed}
