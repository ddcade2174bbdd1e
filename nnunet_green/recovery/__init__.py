"""Accuracy recovery of Tucker-compressed model folders.

* `distill_model_folder(folder, images, settings=None, *, teacher, device, folds, progress, **overrides)`:
  label-free distillation from the dense model (`nnunet-green-distill`, `recovery.cli`).
* `DistillSettings`: its settings and their defaults (declared once); `DistillError` (a `contract.GreenError`).
* `check_images(images_dir, dataset_json)`: the cases of an unlabelled images folder, or `ImagesError`.
* `nnUNetTrainerTuckerFinetune` (`recovery.finetune`): labelled fine-tuning through the stock nnUNetv2_train.

Names are imported lazily: `from nnunet_green.recovery import DistillSettings` does not import torch.
"""
from __future__ import annotations

from nnunet_green._lazy import lazy_exports

_EXPORTS = {
    "DistillSettings": "settings", "DistillError": "settings", "LOSSES": "settings",
    "ImagesError": "patches", "check_images": "patches", "find_cases": "patches", "channel_names": "patches",
    "distill_model_folder": "distill",
    "nnUNetTrainerTuckerFinetune": "finetune", "FinetuneError": "finetune",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
