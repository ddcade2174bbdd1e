"""Datasets for the demo and the tests: a case subset of an MSD-layout dataset, or a small synthetic one."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from nnunet_green.contract import DATASET_FILE


def msd_subset(source: str | os.PathLike, target_root: str | os.PathLike, n_train: int, n_test: int) -> Path:
    """Link the first `n_train` labelled cases of an MSD task as training cases and the next `n_test` as held-out
    cases (images in imagesTs, their labels in labelsTs for scoring). Returns the new MSD task folder, ready for
    `nnUNetv2_convert_MSD_dataset`."""
    source = Path(source).resolve()
    meta = json.loads((source / DATASET_FILE).read_text())
    cases = sorted(Path(entry["image"]).name for entry in meta["training"])
    if len(cases) < n_train + n_test:
        raise ValueError(f"{source} has {len(cases)} labelled cases; {n_train} training + {n_test} held-out asked")
    target = Path(target_root) / source.name
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    train, test = cases[:n_train], cases[n_train:n_train + n_test]
    for name in train:
        _link(source / "imagesTr" / name, target / "imagesTr" / name)
        _link(source / "labelsTr" / name, target / "labelsTr" / name)
    for name in test:
        _link(source / "imagesTr" / name, target / "imagesTs" / name)
        _link(source / "labelsTr" / name, target / "labelsTs" / name)
    meta.update(numTraining=len(train), numTest=len(test),
                training=[{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in train],
                test=[f"./imagesTs/{n}" for n in test])
    (target / DATASET_FILE).write_text(json.dumps(meta, indent=2))
    return target


def _link(src: Path, dst: Path):
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src)


def synthetic_msd_task(target_root: str | os.PathLike, n_train: int = 8, n_test: int = 4, shape=(32, 40, 32),
                       seed: int = 0) -> Path:
    """A SYNTHETIC MRI-like task in MSD layout (Task901_Synthetic): noisy images with two touching ellipsoids of
    different intensity (labels 1 and 2) at random positions. It only lets the demo run anywhere; numbers obtained
    on it say nothing about real anatomy."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    target = Path(target_root) / "Task901_Synthetic"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    names = [f"synthetic_{i:03d}.nii.gz" for i in range(n_train + n_test)]
    for i, name in enumerate(names):
        centre = np.array(shape) / 2 + rng.uniform(-4, 4, 3)
        radii = rng.uniform(5, 8, 3)
        inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1
        label = np.where(inside & (grid[..., 0] < centre[0]), 1, np.where(inside, 2, 0)).astype(np.uint8)
        image = rng.normal(100, 15, shape) + 60 * (label == 1) + 120 * (label == 2)
        image = image.astype(np.float32)
        train = i < n_train
        nib.save(nib.Nifti1Image(image, np.eye(4)), target / ("imagesTr" if train else "imagesTs") / name)
        nib.save(nib.Nifti1Image(label, np.eye(4)), target / ("labelsTr" if train else "labelsTs") / name)
    meta = {
        "name": "Synthetic", "description": "SYNTHETIC ellipsoids, for the demo only", "tensorImageSize": "3D",
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "front", "2": "back"},
        "numTraining": n_train, "numTest": n_test,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names[:n_train]],
        "test": [f"./imagesTs/{n}" for n in names[n_train:]],
    }
    (target / DATASET_FILE).write_text(json.dumps(meta, indent=2))
    return target
