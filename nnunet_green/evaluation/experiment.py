"""Building blocks of the benchmark studies (benchmarks/*.py): a dense model trained with the real nnU-Net CLIs on
a subset of an MSD task, the cost of a metered training run, and the budget at which budgeted ranks match a
uniform compression."""
from __future__ import annotations

import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunet_green.contract import (BASELINE_TRAINER, DATASET_FILE, DEFAULT_CHECKPOINT, DEFAULT_PLANS,
                                   FINETUNE_TRAINER, GREEN_SUMMARY_FILE, RECOVERY_FINETUNED, GreenSettings,
                                   TrainingSummary, env_name, read_json)

STOP_SETTINGS = ("patience", "min_delta", "min_epochs", "cooldown", "budget_kwh", "budget_hours")
# nnU-Net's own training entry point, seeded first (the console script nnUNetv2_train runs the same function).
SEEDED_TRAIN = """\
import random, sys
import numpy as np, torch
seed = int(sys.argv[1])
random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
sys.argv = ["nnUNetv2_train", *sys.argv[2:]]
from nnunetv2.run.run_training import run_training_entry
sys.exit(run_training_entry())
"""


def run_tool(args, env: dict) -> None:
    """One of the venv's console scripts; exits with its output tail on failure (a benchmark cannot go on)."""
    exe = Path(sys.executable).parent / str(args[0])
    cmd = [str(exe), *map(str, args[1:])]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def nnunet_folders(work: Path) -> dict:
    """nnU-Net's folder variables for a benchmark's work folder: raw, preprocessed and results under `work`."""
    return dict(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                nnUNet_results=str(work / "results"), nnUNet_def_n_proc="1")


def nnunet_env(work: Path, **extra) -> dict:
    """The environment with nnUNet_raw/preprocessed/results under `work` (created)."""
    for k in ("raw", "preprocessed", "results"):
        (work / k).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **nnunet_folders(work), nnUNet_compile="f")
    env.pop("nnUNet_extTrainer", None)  # the installed package must be enough to find the trainers
    env.update({k: str(v) for k, v in extra.items()})
    return env


def prepare_msd_subset(data: Path, work: Path, n_train: int, n_test: int,
                       dataset: tuple[int, str] = (4, "Dataset004_Hippocampus")) -> tuple[Path, Path]:
    """Real convert -> plan and preprocess (3d_fullres) of the first `n_train` labelled cases of an MSD task into
    `work` (reused when already there), the next `n_test` labelled cases held out. Returns (held-out images, their
    labels)."""
    from nnunet_green.demo.data import msd_subset

    env = nnunet_env(work)
    dataset_id, dataset_name = dataset
    task = msd_subset(data, work / "msd", n_train, n_test)
    if not (work / "raw" / dataset_name / DATASET_FILE).is_file():
        run_tool(["nnUNetv2_convert_MSD_dataset", "-i", task, "-np", 1], env)
    if not (work / "preprocessed" / dataset_name / f"{DEFAULT_PLANS}.json").is_file():
        run_tool(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-npfp", 1, "-np", 1], env)
    return work / "raw" / dataset_name / "imagesTs", task / "labelsTs"


def train_msd_subset(data: Path, work: Path, n_train: int, n_test: int, epochs: int, iters: int, val_iters: int,
                     fold: str = "0", device: str = "cpu", trainer: str = BASELINE_TRAINER,
                     dataset: tuple[int, str] = (4, "Dataset004_Hippocampus")) -> tuple[Path, Path, Path]:
    """Real convert -> plan -> train on the first cases of an MSD task (reused if already trained in `work`);
    returns (model folder, held-out images, their labels)."""
    dataset_id, dataset_name = dataset
    model = work / "results" / dataset_name / f"{trainer}__{DEFAULT_PLANS}__3d_fullres"
    images, labels = prepare_msd_subset(data, work, n_train, n_test, dataset)
    if not (model / f"fold_{fold}" / DEFAULT_CHECKPOINT).is_file():
        t0 = time.perf_counter()
        run_tool(["nnUNetv2_train", dataset_id, "3d_fullres", fold, "-tr", trainer, "-device", device],
                 dict(nnunet_env(work), **{env_name("epochs"): str(epochs), env_name("iters"): str(iters),
                                           env_name("val_iters"): str(val_iters),
                                           "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "0")}))
        print(f"trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return model, images, labels


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def seeded_training_run(name: str, work: Path, dataset: tuple[int, str], *, trainer: str = BASELINE_TRAINER,
                        plans: str = DEFAULT_PLANS, fold: str = "0", seed: int = 0, device: str = "cpu",
                        epochs: int, iters: int, val_iters: int, n_proc_da: str = "0",
                        green_env: dict | None = None) -> dict:
    """One fresh, seeded `nnUNetv2_train` run (nnU-Net's entry point in a subprocess), moved to work/runs/NAME.

    `green_env`: nnUNet_green_* settings by short name (e.g. {"patience": 5}); stopping settings not given are
    removed from the environment, so a run never inherits a policy from the caller's shell. Returns what the run
    cost and how it ended (from its green_summary.json, plus the process tree's wall and CPU time)."""
    dataset_id, dataset_name = dataset
    trained = work / "results" / dataset_name / f"{trainer}__{plans}__3d_fullres"
    target = work / "runs" / name
    for folder in (trained, target):
        if folder.exists():
            shutil.rmtree(folder)
    green_env = dict(green_env or {})
    env = nnunet_env(work, nnUNet_n_proc_DA=n_proc_da, **{
        env_name("epochs"): epochs, env_name("iters"): iters, env_name("val_iters"): val_iters,
        **{env_name(k): v for k, v in green_env.items()}})
    for var in STOP_SETTINGS:
        if var not in green_env:
            env.pop(env_name(var), None)
    cmd = [sys.executable, "-c", SEEDED_TRAIN, str(seed), str(dataset_id), "3d_fullres", fold, "-tr", trainer,
           "-p", plans, "-device", device]
    print(f"+ [{name}] nnUNetv2_train {' '.join(cmd[4:])}  "
          f"({' '.join(f'{k}={v}' for k, v in green_env.items()) or 'full schedule'})", file=sys.stderr, flush=True)
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    if proc.returncode != 0:
        sys.exit(f"[{name}] training failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(trained), target)
    summary = TrainingSummary.read(target / f"fold_{fold}" / GREEN_SUMMARY_FILE)
    t, extra = summary.totals, summary.extra
    stopping = extra.get("stopping") or {}
    return {
        "run": name, "model_folder": str(target), "plans": plans, "policy": stopping.get("policy"),
        "stop_reason": stopping.get("reason"), "stop_epoch": stopping.get("epoch"),
        "plateau_epoch": stopping.get("plateau_epoch"),
        "epochs_trained": summary.epochs_logged, "epochs_scheduled": extra.get("num_epochs"),
        "train_time_s": t.get("time_s"), "final_validation_s": t.get("final_validation_s"),
        "energy_j": t.get("energy_j"), "energy_source": t.get("energy_source"),
        "process_wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1),
        "validation_dice": (extra.get("dice") or {}).get("validation_mean_fg_dice"),
        "ema_pseudo_dice_best": (extra.get("dice") or {}).get("ema_pseudo_dice_best"),
    }


def held_out_dice(run: dict, images: Path, labels: Path, fold: str = "0", device: str = "cpu") -> None:
    """Dice of the stock `nnUNetv2_predict_from_modelfolder` (no TTA) of run["model_folder"] on held-out labelled
    cases (predicted into <run>_predictions beside the model folder); see score_held_out for what it adds to `run`,
    plus the prediction time."""
    from nnunet_green.evaluation.bench import predict

    folder = Path(run["model_folder"])
    wall = predict(images, held_out_predictions(run), folder, fold, DEFAULT_CHECKPOINT, device, 1, 1,
                   disable_tta=True)
    score_held_out(run, images, labels)
    run["predict_s"] = round(wall, 1)


def held_out_predictions(run: dict) -> Path:
    return Path(run["model_folder"]).parent / f"{run['run']}_predictions"


def score_held_out(run: dict, images: Path, labels: Path) -> None:
    """Scores the held-out predictions of held_out_dice: adds held_out_dice (mean foreground), per label, per case
    (held_out_case_dice, in held_out_case_names order) and the case count to `run`."""
    from nnunet_green.evaluation.bench import image_cases
    from nnunet_green.evaluation.dice import case_means, dice_tables, foreground_labels, summarize

    folder = Path(run["model_folder"])
    cases = [c + ".nii.gz" for c in image_cases(images, ".nii.gz")]
    table = dice_tables(held_out_predictions(run), labels, cases, foreground_labels(
        read_json(folder / DATASET_FILE, DATASET_FILE)))
    mean, per_label = summarize(table)
    run.update(held_out_dice=mean, held_out_dice_per_label=per_label, held_out_cases=len(cases),
               held_out_case_names=cases, held_out_case_dice=case_means(table))


def training_cost(fold_folder: Path) -> dict:
    """Time and energy of a metered (green) training run, from its green_summary.json (None where absent)."""
    path = Path(fold_folder) / GREEN_SUMMARY_FILE
    if not path.is_file():
        return {"seconds": None, "energy_j": None, "energy_source": None}
    t = TrainingSummary.read(path).totals
    seconds = (t.get("time_s") or 0.0) + (t.get("final_validation_s") or 0.0)
    return {"seconds": round(seconds, 1), "energy_j": t.get("energy_j"), "energy_source": t.get("energy_source")}


def finetune(compressed: Path, fold: str, epochs: int, iters: int, lr: float | None, device: str,
             target: Path) -> dict:
    """nnUNetv2_train -tr nnUNetTrainerTuckerFinetune starting from `compressed` (nnUNet_raw/preprocessed/results of
    its dataset set in os.environ); dataset and configuration are the compressed folder's own. The result folder is
    moved to `target` (one trainer name, several variants). Returns its cost."""
    from nnunet_green.nnunet_io import ModelFolder

    folder = ModelFolder(compressed)
    dataset, configuration = folder.plans["dataset_name"], folder.manifest().configuration
    lr = GreenSettings().finetune_lr if lr is None else lr
    env = dict(os.environ, nnUNet_compile="f", **{env_name("finetune_from"): str(compressed),
                                                  env_name("epochs"): str(epochs), env_name("iters"): str(iters),
                                                  env_name("val_iters"): "1", env_name("finetune_lr"): str(lr)})
    env.setdefault("nnUNet_n_proc_DA", "0")
    exe = Path(sys.executable).parent / "nnUNetv2_train"
    print(f"+ fine-tune {compressed.name}: {epochs} x {iters} iterations", file=sys.stderr, flush=True)
    proc = subprocess.run([str(exe), dataset, configuration, fold, "-tr", FINETUNE_TRAINER, "-device", device],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"fine-tuning {compressed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    results = Path(os.environ["nnUNet_results"])
    folder = next(results.glob(f"Dataset*/{FINETUNE_TRAINER}__*__{configuration}"))
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(folder), target)
    return {"recovery": RECOVERY_FINETUNED, **training_cost(target / f"fold_{fold}"),
            "settings": f"{epochs} epochs x {iters} iterations, AdamW lr {lr}"}


def equal_budget(manifest: dict, cost: str = "params") -> float:
    """Fraction of the factorizable layers' parameters or multiply-adds (spatial kernel, both channel counts >=
    the manifest's min_rank: the layers the budgeted rule may factorize) that a uniform compression kept - the
    `--rank-budget` that compares budgeted ranks with it at equal cost."""
    min_rank = manifest["config"].get("min_rank") or 1
    eligible = [lay for lay in manifest["layers"] if math.prod(lay["kernel_size"]) > 1
                and min(lay["in_channels"], lay["out_channels"]) >= min_rank]
    return sum(lay[f"{cost}_after"] for lay in eligible) / sum(lay[f"{cost}_before"] for lay in eligible)


def variant_rows(result: dict, variants: list) -> list[dict]:
    """One row per compressed variant of a bench result whose first model is the dense reference: the variant's own
    metadata (`variants`: [(folder, meta dict)], in bench order) with its size and accuracy figures."""
    return [{**meta, "folder": str(folder), "params": row["params"], "macs": row["macs"],
             "agreement_dice": row["agreement_dice"], "dice_vs_labels": row["dice_vs_labels"]}
            for (folder, meta), row in zip(variants, result["models"][1:])]


def write_result(folder: Path, stem: str, result: dict, markdown: str) -> None:
    """A benchmark's record: `stem.json` (written atomically) and `stem.md` in `folder`; the markdown is printed."""
    from nnunet_green.contract import write_json_atomic

    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{stem}.json", result)
    (folder / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {folder / stem}.json and {stem}.md", file=sys.stderr)
