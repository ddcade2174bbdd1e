"""Moved to `nnunet_green.recovery.finetune` (kept until the trainers/ re-export in /work/main names it)."""
from nnunet_green.recovery.finetune import nnUNetTrainerTuckerFinetune  # noqa: F401
