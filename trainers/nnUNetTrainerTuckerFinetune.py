# Re-export for nnU-Net's trainer lookup (classes defined here could not be pickled; see __init__.py).
from nnunet_green.recovery.finetune import nnUNetTrainerTuckerFinetune  # noqa: F401
