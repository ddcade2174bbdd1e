"""The green trainers: one row per setting, (precision, optimizer) composed onto `nnUNetTrainerGreen`.

The first six are the settings of the resource-efficiency study (arXiv 2303.10181) plus bf16; the `AdamW` rows
select bitsandbytes' AdamW8bit (the study used 8-bit Adam) instead of the default SGD8bit. Classes are created at
import and bound to module-level names, so they pickle like hand-written classes (nnU-Net's worker processes and
DDP need that) and nnU-Net's lookup finds them by name.
"""
from nnunet_green.training.green_trainer import nnUNetTrainerGreen
from nnunet_green.training.optimizers import ADAMW_8BIT, NNUNET_SGD, SGD_8BIT
from nnunet_green.training.precision import AMP, BF16, FP32, HALF

SETTINGS = {
    "nnUNetTrainerGreenFP32": (FP32, NNUNET_SGD),  # the honest baseline: autocast off
    "nnUNetTrainerGreenAMP": (AMP, NNUNET_SGD),
    "nnUNetTrainerGreenBF16": (BF16, NNUNET_SGD),
    "nnUNetTrainerGreen8bit": (FP32, SGD_8BIT),
    "nnUNetTrainerGreenAMP8bit": (AMP, SGD_8BIT),
    "nnUNetTrainerGreenHalf8bit": (HALF, SGD_8BIT),
    "nnUNetTrainerGreen8bitAdamW": (FP32, ADAMW_8BIT),
    "nnUNetTrainerGreenAMP8bitAdamW": (AMP, ADAMW_8BIT),
    "nnUNetTrainerGreenHalf8bitAdamW": (HALF, ADAMW_8BIT),
}

for _name, (_precision, _recipe) in SETTINGS.items():
    globals()[_name] = type(_name, (nnUNetTrainerGreen,), {
        "precision": _precision, "optimizer_recipe": _recipe, "__module__": __name__, "__qualname__": _name,
        "__doc__": f"nnU-Net trainer: {_precision.name} precision, {_recipe.name} optimizer, metered per epoch."})

__all__ = ["nnUNetTrainerGreen", *SETTINGS]
