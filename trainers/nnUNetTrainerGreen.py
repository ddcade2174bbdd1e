# Re-exports for nnU-Net's trainer lookup (see __init__.py for why nothing is defined here).
from nnunet_green.training.variants import (  # noqa: F401
    nnUNetTrainerGreen, nnUNetTrainerGreen8bit, nnUNetTrainerGreen8bitAdamW, nnUNetTrainerGreenAMP,
    nnUNetTrainerGreenAMP8bit, nnUNetTrainerGreenAMP8bitAdamW, nnUNetTrainerGreenBF16, nnUNetTrainerGreenFP32,
    nnUNetTrainerGreenHalf8bit, nnUNetTrainerGreenHalf8bitAdamW)
