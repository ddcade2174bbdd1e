"""Metadata lives in setup.cfg. This file only ships `nnunet_green.pth`.

The .pth file makes the stock nnU-Net CLIs find the green trainers with no manual step: at interpreter start it
imports `nnunet_green.trainers`, which appends its own folder to `nnUNet_extTrainer` (see docs/design.md).
setuptools has no declarative way to put a .pth into site-packages, for wheels nor for editable installs.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "nnunet_green.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)


class editable_wheel_with_pth(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copy(PTH, os.path.join(unpacked_wheel, PTH))
        return result


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
