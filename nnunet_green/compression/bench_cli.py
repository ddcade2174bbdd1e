"""Moved to `nnunet_green.evaluation.cli` (kept until setup.cfg's entry point names the new module)."""
from nnunet_green.evaluation.cli import main  # noqa: F401
