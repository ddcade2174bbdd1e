"""Shared fixtures: real nnU-Net CLIs on real data, scaled down to fit a 2-core machine.

Data comes from $NNUNET_GREEN_DATA (default: ../shared/data beside the repo). Tests that need it skip with the
reason when it is absent.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_green.demo.data import msd_subset

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NNUNET_GREEN_DATA", REPO.parent / "shared" / "data"))
HIPPOCAMPUS = DATA / "Task04_Hippocampus"
TOTALSEG_EXAMPLE = DATA / "totalsegmentator_example"
BIN = Path(sys.executable).parent
DATASET_ID = 4
N_TRAIN, N_TEST = 6, 2  # folds 0-4 need >= 5 training cases


def requires(path: Path):
    return pytest.mark.skipif(not path.is_dir(), reason=f"real data not found at {path} (set NNUNET_GREEN_DATA)")


def run_cli(*args, env: dict | None = None, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts; on failure show the tail of its output."""
    cmd = [str(BIN / args[0]), *map(str, args[1:])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
                    f"\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def strip_fast_path_artefact(checkpoint: Path) -> None:
    """Delete the fast path's artefact from a checkpoint: the folder as one written before the fast path has it."""
    import torch

    from nnunet_green.compression.fast_path import ARTEFACT_KEY

    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    del ck["network_weights"][ARTEFACT_KEY]
    torch.save(ck, checkpoint)


def predict_in_process(model: Path, images: Path, out: Path, fold: int = 0) -> list[Path]:
    """nnU-Net's own predictor class (the one behind nnUNetv2_predict) on a model folder, in this process: the same
    loading and sliding-window route without the CLI's spawned workers, which cost ~15 s of imports per call here.
    Tests of the CLIs themselves call them with run_cli."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(fold,),
                                                   checkpoint_name="checkpoint_final.pth")
    out.mkdir(parents=True, exist_ok=True)  # the sequential route, unlike the CLI, does not create it
    predictor.predict_from_files_sequential(str(images), str(out))
    return sorted(out.glob("*.nii.gz"))


class NnUNetEnv:
    """nnUNet_raw/preprocessed/results under one temporary root, and the environment to run the CLIs in."""

    def __init__(self, root: Path):
        self.root = root
        self.raw, self.preprocessed, self.results = (root / n for n in ("raw", "preprocessed", "results"))
        for folder in (self.raw, self.preprocessed, self.results):
            folder.mkdir(parents=True, exist_ok=True)

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.pop("nnUNet_extTrainer", None)  # the installed .pth must be enough to find the trainers
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(self.results), nnUNet_def_n_proc="1", nnUNet_compile="f",
                   OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def train(self, trainer: str, fold=0, epochs=1, iters=2, val_iters=1, extra_args=(), device="cpu", **env) -> Path:
        run_cli("nnUNetv2_train", DATASET_ID, "3d_fullres", fold, "-tr", trainer, "-device", device, *extra_args,
                env=self.env(nnUNet_green_epochs=epochs, nnUNet_green_iters=iters, nnUNet_green_val_iters=val_iters,
                             nnUNet_n_proc_DA=0, **env))
        return self.model_folder(trainer) / f"fold_{fold}"

    def model_folder(self, trainer: str) -> Path:
        return self.results / "Dataset004_Hippocampus" / f"{trainer}__nnUNetPlans__3d_fullres"


def assert_compress_refuses(source: Path, out: Path, cases, capsys) -> None:
    """Each (extra arguments, message) of `nnunet-green-compress -i SOURCE -o OUT -q ...`, in-process: exit 2, one
    error line naming the problem, and nothing written under OUT's parent."""
    from nnunet_green.compression.cli import main

    for extra, message in cases:
        code = main(["-i", str(source), "-o", str(out), "-q", *extra])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, lines)
        assert lines[0].startswith("nnunet-green-compress: error: ")
        assert not out.parent.exists()


@pytest.fixture(scope="session")
def hippocampus(tmp_path_factory) -> NnUNetEnv:
    """Six real Hippocampus cases converted and planned with the real CLIs; two held-out cases in `test_images`."""
    if not HIPPOCAMPUS.is_dir():
        pytest.skip(f"real data not found at {HIPPOCAMPUS} (set NNUNET_GREEN_DATA)")
    nn = NnUNetEnv(tmp_path_factory.mktemp("nnunet"))
    task = msd_subset(HIPPOCAMPUS, nn.root / "msd", N_TRAIN, N_TEST)
    run_cli("nnUNetv2_convert_MSD_dataset", "-i", task, "-np", 1, env=nn.env())
    run_cli("nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-npfp", 1, "-np", 1,
            "--verify_dataset_integrity", env=nn.env())
    nn.test_images = nn.raw / "Dataset004_Hippocampus" / "imagesTs"
    nn.test_labels = task / "labelsTs"
    return nn


@pytest.fixture(scope="session")
def trained_fp32(hippocampus) -> Path:
    """A real (tiny) model trained by `nnUNetv2_train -tr nnUNetTrainerGreenFP32`; returns its fold folder."""
    return hippocampus.train("nnUNetTrainerGreenFP32", epochs=2, iters=2, val_iters=1)
