"""Moved to `nnunet_green.recovery` (kept until compression/model_folder.py imports from there)."""
from nnunet_green.recovery.distill import distill_model_folder  # noqa: F401
from nnunet_green.recovery.patches import channel_names, find_cases  # noqa: F401
from nnunet_green.recovery.settings import DistillError  # noqa: F401
