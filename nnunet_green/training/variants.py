"""The green trainers, in the spirit of nnU-Net's `variants/`: each a few-line subclass naming its two pieces.

`precision` (precision.py) and `optimizer_recipe` (optimizers.py) are all a setting changes; the hooks live in
`nnUNetTrainerGreen`. The first six are the settings of the resource-efficiency study (arXiv 2303.10181) plus bf16;
the `AdamW` classes use bitsandbytes' AdamW8bit (the study used 8-bit Adam) instead of SGD8bit. Class names are
what nnU-Net's lookup and saved checkpoints (`trainer_name`) resolve: never rename one.
"""
from nnunet_green.training.green_trainer import nnUNetTrainerGreen
from nnunet_green.training.optimizers import ADAMW_8BIT, NNUNET_SGD, SGD_8BIT
from nnunet_green.training.precision import AMP, BF16, FP32, HALF


class nnUNetTrainerGreenFP32(nnUNetTrainerGreen):
    """fp32, autocast off (also on CUDA): the honest baseline. nnU-Net's SGD."""
    precision = FP32
    optimizer_recipe = NNUNET_SGD


class nnUNetTrainerGreenAMP(nnUNetTrainerGreen):
    """fp16 autocast with a GradScaler (on CUDA), nnU-Net's SGD."""
    precision = AMP
    optimizer_recipe = NNUNET_SGD


class nnUNetTrainerGreenBF16(nnUNetTrainerGreen):
    """bf16 autocast (on CUDA), no loss scaler, nnU-Net's SGD."""
    precision = BF16
    optimizer_recipe = NNUNET_SGD


class nnUNetTrainerGreen8bit(nnUNetTrainerGreen):
    """fp32, bitsandbytes SGD8bit."""
    precision = FP32
    optimizer_recipe = SGD_8BIT


class nnUNetTrainerGreenAMP8bit(nnUNetTrainerGreen):
    """fp16 autocast with a GradScaler (on CUDA), SGD8bit."""
    precision = AMP
    optimizer_recipe = SGD_8BIT


class nnUNetTrainerGreenHalf8bit(nnUNetTrainerGreen):
    """fp16 weights (on CUDA), no scaler (non-finite steps skipped), SGD8bit."""
    precision = HALF
    optimizer_recipe = SGD_8BIT


class nnUNetTrainerGreen8bitAdamW(nnUNetTrainerGreen):
    """fp32, bitsandbytes AdamW8bit (lr 3e-4)."""
    precision = FP32
    optimizer_recipe = ADAMW_8BIT


class nnUNetTrainerGreenAMP8bitAdamW(nnUNetTrainerGreen):
    """fp16 autocast with a GradScaler (on CUDA), AdamW8bit (lr 3e-4)."""
    precision = AMP
    optimizer_recipe = ADAMW_8BIT


class nnUNetTrainerGreenHalf8bitAdamW(nnUNetTrainerGreen):
    """fp16 weights (on CUDA), no scaler (non-finite steps skipped), AdamW8bit (lr 3e-4)."""
    precision = HALF
    optimizer_recipe = ADAMW_8BIT


GREEN_TRAINERS: tuple[type[nnUNetTrainerGreen], ...] = (
    nnUNetTrainerGreenFP32, nnUNetTrainerGreenAMP, nnUNetTrainerGreenBF16, nnUNetTrainerGreen8bit,
    nnUNetTrainerGreenAMP8bit, nnUNetTrainerGreenHalf8bit, nnUNetTrainerGreen8bitAdamW,
    nnUNetTrainerGreenAMP8bitAdamW, nnUNetTrainerGreenHalf8bitAdamW,
)
# name -> (precision, optimizer recipe), derived from the classes (docs, tests, the report's labels).
SETTINGS = {cls.__name__: (cls.precision, cls.optimizer_recipe) for cls in GREEN_TRAINERS}

__all__ = ["nnUNetTrainerGreen", "GREEN_TRAINERS", "SETTINGS", *SETTINGS]
