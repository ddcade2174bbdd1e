"""Moved to `nnunet_green.recovery.cli` (kept until setup.cfg's entry point names the new module)."""
from nnunet_green.recovery.cli import main  # noqa: F401
