"""Dice scores: per label between two label maps, and tables over folders of predictions and references."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nnunet_green.contract import GreenError


class DiceError(GreenError):
    """Predictions and references that cannot be compared (missing case, shape mismatch)."""


def dice_scores(pred: np.ndarray, ref: np.ndarray, labels) -> dict[int, float]:
    """{label: Dice of `pred == label` vs `ref == label`}; NaN where the label is in neither."""
    if pred.shape != ref.shape:
        raise DiceError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    out = {}
    for lab in labels:
        a, b = pred == lab, ref == lab
        denom = int(a.sum()) + int(b.sum())
        out[int(lab)] = math.nan if denom == 0 else 2.0 * int((a & b).sum()) / denom
    return out


def read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_tables(pred_dir, ref_dir, cases: list[str], labels) -> dict[int, list[float]]:
    """Per label: Dice per case (file names in both folders; NaN where both are empty)."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    out: dict[int, list[float]] = {int(lab): [] for lab in labels}
    for case in cases:
        ref_path = ref_dir / case
        if not ref_path.is_file():
            raise DiceError(f"no label for predicted case {case} in {ref_dir}")
        try:
            scores = dice_scores(read_labels(pred_dir / case), read_labels(ref_path), labels)
        except DiceError as e:
            raise DiceError(f"{case}: {e} ({ref_path})") from None
        for lab, v in scores.items():
            out[lab].append(v)
    return out


def _mean_defined(values) -> float | None:
    """Mean of the values that are neither None nor NaN; None when there is none."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return sum(defined) / len(defined) if defined else None


def summarize(table: dict[int, list[float]]) -> tuple[float | None, dict[str, float | None]]:
    """(mean over labels of the per-label mean over cases, {label: mean}); NaN cases are left out, a label with
    no defined case is None."""
    per_label = {str(lab): _mean_defined(vals) for lab, vals in table.items()}
    return _mean_defined(per_label.values()), per_label


def case_means(table: dict[int, list[float]]) -> list[float | None]:
    """Per case: mean Dice over the labels defined in that case (None where none is)."""
    return [_mean_defined(vals) for vals in zip(*table.values())]


def paired_difference(a: list[float | None], b: list[float | None], resamples: int = 10000,
                      seed: int = 0) -> dict | None:
    """Mean of b - a over the cases scored in both, with a seeded percentile-bootstrap 95 % interval (cases
    resampled with replacement) and how many cases got worse; None without two such cases."""
    pairs = np.array([(x, y) for x, y in zip(a, b) if x is not None and y is not None], dtype=float)
    if len(pairs) < 2:
        return None
    diff = pairs[:, 1] - pairs[:, 0]
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    low, high = np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95": [float(low), float(high)], "cases": len(diff),
            "worse": int((diff < 0).sum()), "resamples": resamples}


def foreground_labels(dataset_json: dict) -> list[int]:
    """The labels (or region classes) a model predicts, background and ignore excluded."""
    if dataset_json.get("regions_class_order"):
        return [int(v) for v in dataset_json["regions_class_order"]]
    vals = [v for k, v in dataset_json["labels"].items() if k != "ignore" and isinstance(v, int)]
    return sorted(v for v in set(vals) if v != 0)
