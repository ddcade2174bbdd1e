# Re-exports for nnU-Net's trainer lookup (see __init__.py for why nothing is defined here).
from nnunet_green.training.variants import *  # noqa: F401,F403
