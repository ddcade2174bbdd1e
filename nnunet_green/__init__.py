"""nnunet-green: cheaper nnU-Net v2 training (metered precision/optimizer trainers) and inference (Tucker compression).

Kept import-light on purpose: `nnunet_green.pth` imports this package in every interpreter of the environment.
"""
__version__ = "0.1.0"
