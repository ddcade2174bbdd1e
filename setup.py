"""Metadata lives in setup.cfg; this file only lists the packages.

Automatic discovery (`find_packages`) picks up every package below `nnunet_green/`, so new subpackages need no
edit here. `nnunet_green.trainers` is the one package it cannot see: its folder is the repo's `trainers/`
(mapped in setup.cfg's `package_dir`), the folder nnU-Net scans for trainers (see docs/design.md).
`nnunet_green.pth` is added to the wheels by the build backend in `_build_backend/`, not here.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["nnunet_green", "nnunet_green.*"]) + ["nnunet_green.trainers"])
