"""The settings of a distillation run: defaults declared once, here, and validated once (torch-free, so the CLI's
`--help` stays fast and takes its defaults from this dataclass)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from nnunet_green.contract import GreenError

LOSSES = ("mse", "kl")


class DistillError(GreenError):
    """Bad distillation input or a failed check; the message is meant for the user as is."""


@dataclass(frozen=True)
class DistillSettings:
    """How a compressed model is distilled (what and where - folder, images, teacher, device, folds - are the
    arguments of `distill_model_folder`)."""
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 2
    patches_per_image: int = 4
    loss: str = "mse"
    temperature: float = 2.0
    feature_weight: float = 0.0  # > 0: also match every encoder/decoder stage's output (relative error, see distill)
    heldout_fraction: float = 0.2
    heldout_patches: int = 8
    eval_every: int | None = None  # held-out check every N steps (None: 5 checks per run); the best is kept
    max_cache_mb: float = 2048.0
    max_minutes: float | None = None
    patch_size: tuple[int, ...] | None = None  # None: the plans' patch size; smaller bounds memory and time per step
    seed: int = 0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides) -> "DistillSettings":
        """A copy with `overrides`; an unknown name is a DistillError (a typo must not be ignored)."""
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise DistillError(f"unknown distillation setting(s): {', '.join(unknown)} "
                               f"(known: {', '.join(self.field_names())})")
        if overrides.get("patch_size") is not None:
            overrides["patch_size"] = tuple(overrides["patch_size"])
        return dataclasses.replace(self, **overrides)

    @property
    def checks_every(self) -> int:
        return self.eval_every or max(1, self.steps // 5)

    def check(self) -> "DistillSettings":
        def integer(name, low):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < low:
                raise DistillError(f"{name} must be an integer >= {low}, got {v!r}")

        def number(name, ok, what):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise DistillError(f"{name} must be {what}, got {v!r}")

        integer("steps", 0)
        for name in ("batch_size", "patches_per_image", "heldout_patches"):
            integer(name, 1)
        if self.eval_every is not None:
            integer("eval_every", 1)
        number("lr", lambda v: v > 0, "a positive number")
        number("weight_decay", lambda v: v >= 0, "a number >= 0")
        number("temperature", lambda v: v > 0, "> 0")
        number("feature_weight", lambda v: v >= 0, ">= 0")
        number("heldout_fraction", lambda v: 0 <= v < 1, "in [0, 1)")
        number("max_cache_mb", lambda v: v >= 0, ">= 0")
        if self.max_minutes is not None:
            number("max_minutes", lambda v: v > 0, "> 0")
        if self.loss not in LOSSES:
            raise DistillError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        return self

    def record(self) -> dict:
        """The settings as written into the recovery record."""
        out = {name: getattr(self, name) for name in self.field_names()}
        out["patch_size"] = None if self.patch_size is None else list(self.patch_size)
        out["temperature"] = self.temperature if self.loss == "kl" else None
        out["eval_every"] = self.checks_every
        return out
