"""The folder nnU-Net scans for the green trainers (`nnUNet_extTrainer`).

Imported at interpreter start by `nnunet_green.pth`; appends this folder to `nnUNet_extTrainer` so that the stock
`nnUNetv2_train -tr nnUNetTrainerGreen...` and `nnUNetv2_predict` find the trainers. The modules here only
re-export classes defined in `nnunet_green.training`: nnU-Net imports ext-folder modules under throwaway names and
drops them from sys.modules afterwards, so classes defined here could not be pickled by its worker processes.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_paths = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
if _HERE not in _paths:
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(_paths + [_HERE])
