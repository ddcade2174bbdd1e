"""Building blocks of the benchmark studies (benchmarks/*.py): a dense model trained with the real nnU-Net CLIs on
a subset of an MSD task, the cost of a metered training run, and the budget at which budgeted ranks match a
uniform compression."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

from nnunet_green.contract import BASELINE_TRAINER, DEFAULT_CHECKPOINT, GREEN_SUMMARY_FILE, TrainingSummary, env_name


def run_tool(args, env: dict) -> None:
    """One of the venv's console scripts; exits with its output tail on failure (a benchmark cannot go on)."""
    exe = Path(sys.executable).parent / str(args[0])
    cmd = [str(exe), *map(str, args[1:])]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def nnunet_env(work: Path, **extra) -> dict:
    """The environment with nnUNet_raw/preprocessed/results under `work` (created)."""
    for k in ("raw", "preprocessed", "results"):
        (work / k).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), nnUNet_def_n_proc="1", nnUNet_compile="f")
    env.pop("nnUNet_extTrainer", None)  # the installed package must be enough to find the trainers
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_msd_subset(data: Path, work: Path, n_train: int, n_test: int, epochs: int, iters: int, val_iters: int,
                     fold: str = "0", device: str = "cpu", trainer: str = BASELINE_TRAINER,
                     dataset: tuple[int, str] = (4, "Dataset004_Hippocampus")) -> tuple[Path, Path, Path]:
    """Real convert -> plan -> train on the first cases of an MSD task (reused if already trained in `work`);
    returns (model folder, held-out images, their labels)."""
    from nnunet_green.demo.data import msd_subset

    env = nnunet_env(work)
    dataset_id, dataset_name = dataset
    model = work / "results" / dataset_name / f"{trainer}__nnUNetPlans__3d_fullres"
    task = msd_subset(data, work / "msd", n_train, n_test)
    images = work / "raw" / dataset_name / "imagesTs"
    if not (model / f"fold_{fold}" / DEFAULT_CHECKPOINT).is_file():
        if not images.is_dir():
            run_tool(["nnUNetv2_convert_MSD_dataset", "-i", task, "-np", 1], env)
        if not (work / "preprocessed" / dataset_name / "nnUNetPlans.json").is_file():
            run_tool(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-npfp", 1, "-np", 1], env)
        t0 = time.perf_counter()
        run_tool(["nnUNetv2_train", dataset_id, "3d_fullres", fold, "-tr", trainer, "-device", device],
                 dict(env, **{env_name("epochs"): str(epochs), env_name("iters"): str(iters),
                              env_name("val_iters"): str(val_iters),
                              "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "0")}))  # 1 overlaps augmentation
        print(f"trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return model, images, task / "labelsTs"


def training_cost(fold_folder: Path) -> dict:
    """Time and energy of a metered (green) training run, from its green_summary.json (None where absent)."""
    path = Path(fold_folder) / GREEN_SUMMARY_FILE
    if not path.is_file():
        return {"seconds": None, "energy_j": None, "energy_source": None}
    t = TrainingSummary.read(path).totals
    seconds = (t.get("time_s") or 0.0) + (t.get("final_validation_s") or 0.0)
    return {"seconds": round(seconds, 1), "energy_j": t.get("energy_j"), "energy_source": t.get("energy_source")}


def equal_budget(manifest: dict, cost: str = "params") -> float:
    """Fraction of the factorizable layers' parameters or multiply-adds (spatial kernel, both channel counts >=
    the manifest's min_rank: the layers the budgeted rule may factorize) that a uniform compression kept - the
    `--rank-budget` that compares budgeted ranks with it at equal cost."""
    min_rank = manifest["config"].get("min_rank") or 1
    eligible = [lay for lay in manifest["layers"] if math.prod(lay["kernel_size"]) > 1
                and min(lay["in_channels"], lay["out_channels"]) >= min_rank]
    return sum(lay[f"{cost}_after"] for lay in eligible) / sum(lay[f"{cost}_before"] for lay in eligible)


def write_result(folder: Path, stem: str, result: dict, markdown: str) -> None:
    """A benchmark's record: `stem.json` (written atomically) and `stem.md` in `folder`; the markdown is printed."""
    from nnunet_green.contract import write_json_atomic

    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{stem}.json", result)
    (folder / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {folder / stem}.json and {stem}.md", file=sys.stderr)
