"""Unlabelled images for recovery: case discovery in nnU-Net's naming, preprocessing exactly as the predictor does,
a memory-bounded cache of preprocessed cases and random patch sampling."""
from __future__ import annotations

import contextlib
import io
import re
import time
from pathlib import Path

import numpy as np

from nnunet_green.recovery.settings import DistillError


class ImagesError(DistillError):
    """An images folder (or a case in it) that does not fit the model."""


def channel_names(dataset_json: dict) -> list[str]:
    """The model's input channels in order (dataset.json `channel_names`, old `modality`)."""
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(names, dict) or not names:
        raise ImagesError("dataset.json of the model has no channel_names")
    return [names[k] for k in sorted(names, key=int)]


def find_cases(images, file_ending: str, n_channels: int, names: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """[(case id, [CASE_0000<ending>, CASE_0001<ending>, ...])] in nnU-Net's naming; every case must have exactly
    the model's channels."""
    images = Path(images)
    if not images.is_dir():
        raise ImagesError(f"images folder not found: {images}")
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
        raise ImagesError(f"no images in {images}: expected files named CASE_0000{file_ending} (nnU-Net naming, "
                          f"one file per channel){hint}")
    expected = list(range(n_channels))
    label = ", ".join(f"_{i:04d}={n}" for i, n in enumerate(names or [])) or f"{n_channels} channel(s)"
    for case, chans in cases.items():
        if sorted(chans) != expected:
            got = ", ".join(f"_{c:04d}" for c in sorted(chans))
            raise ImagesError(f"case {case!r} in {images} has channel files {got}, but the model expects "
                              f"{n_channels} channel(s) ({label})")
    return [(case, [chans[i] for i in expected]) for case, chans in sorted(cases.items())]


def check_images(images_dir, dataset_json: dict) -> list[tuple[str, list[str]]]:
    """The cases of `images_dir` for a model with `dataset_json`; ImagesError (one clear message) if the folder is
    missing, holds no nnU-Net-named images, or a case lacks or adds channels."""
    names = channel_names(dataset_json)
    return find_cases(Path(images_dir), dataset_json.get("file_ending", ".nii.gz"), len(names), names)


def preprocess_case(model, files: list[str]) -> np.ndarray:
    """One case as `nnUNetv2_predict` feeds it to the network: the plans' own preprocessor (reader, transpose,
    crop, normalisation, resampling), then zero-padded to at least the patch size like the sliding window.
    `model` is a `nnunet_io.LoadedModel`."""
    return pad_to_patch(model, read_case(model, files)[0])


def pad_to_patch(model, data: np.ndarray) -> np.ndarray:
    """Zero-pad a preprocessed case to at least the patch size, as the predictor's sliding window does."""
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    data = torch.from_numpy(data)  # the predictor pads a tensor
    data, _ = pad_nd_image(data, list(model.configuration_manager.patch_size), "constant", {"value": 0}, True, None)
    return np.ascontiguousarray(data.numpy(), dtype=np.float32)


def read_case(model, files: list[str]) -> tuple[np.ndarray, dict]:
    """One case through the plans' preprocessor, not padded: (float32 C x spatial, nnU-Net's properties of the case,
    e.g. `shape_before_cropping` = the image as read)."""
    cm = model.configuration_manager
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            data, _, properties = cm.preprocessor_class(verbose=False).run_case(files, None, model.plans_manager, cm,
                                                                                model.dataset_json)
    except Exception as e:  # readers raise anything for unreadable files
        reason = " ".join(str(e).split())  # readers' messages span lines; the error is one line
        raise ImagesError(f"cannot read/preprocess {files[0]}: {type(e).__name__}: {reason}") from None
    if data.shape[0] != model.num_input_channels:
        raise ImagesError(f"{files[0]} has {data.shape[0]} channel(s) after reading, the model expects "
                          f"{model.num_input_channels}")
    return np.ascontiguousarray(data, dtype=np.float32), properties


class CaseCache:
    """Preprocessed cases kept in memory up to `max_bytes`; cases beyond it are preprocessed again whenever they
    are visited (slower, memory-bounded)."""

    def __init__(self, cases, model, max_bytes: int):
        self.files = dict(cases)
        self.model = model
        self.max_bytes = max_bytes
        self.cached: dict[str, np.ndarray] = {}
        self.bytes = 0
        self.preprocess_s = 0.0
        self.preprocessed = 0

    def get(self, case: str) -> np.ndarray:
        if case in self.cached:
            return self.cached[case]
        t0 = time.perf_counter()
        try:
            data = preprocess_case(self.model, self.files[case])
        except ImagesError as e:
            raise ImagesError(f"case {case!r}: {e}") from None
        self.preprocess_s += time.perf_counter() - t0
        self.preprocessed += 1
        if self.bytes + data.nbytes <= self.max_bytes:
            self.cached[case] = data
            self.bytes += data.nbytes
        return data

    def drop(self, case: str) -> None:
        if case in self.cached:
            self.bytes -= self.cached.pop(case).nbytes


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


def sample_patch(data: np.ndarray, patch_size, rng: np.random.Generator, mirror_axes) -> np.ndarray:
    """Uniform random crop of `patch_size` from a (C, *spatial) array at least that large, randomly mirrored along
    the axes the predictor mirrors for test-time augmentation (mirrored inputs are inputs the model really sees)."""
    starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(data.shape[1:], patch_size)]
    patch = data[(slice(None), *[slice(a, a + p) for a, p in zip(starts, patch_size)])]
    flip = [int(a) + 1 for a in (mirror_axes or ()) if rng.random() < 0.5]
    if flip:
        patch = np.flip(patch, axis=flip)
    return np.ascontiguousarray(patch)


def patch_stream(cache: CaseCache, case_ids, patch_size, patches_per_image: int, rng, mirror_axes):
    """Endless stream: cases in a fresh random order each pass, `patches_per_image` patches per visit (so a case
    that is not cached is preprocessed once per visit, not once per patch)."""
    while True:
        for i in rng.permutation(len(case_ids)):
            data = cache.get(case_ids[i])
            for _ in range(patches_per_image):
                yield sample_patch(data, patch_size, rng, mirror_axes)
