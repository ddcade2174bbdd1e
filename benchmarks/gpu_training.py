"""GPU training benchmark: every green trainer for a few short epochs on MSD Hippocampus, through the stock CLIs.

Converts and plans a subset of Task04_Hippocampus once (real nnUNetv2_convert_MSD_dataset and
nnUNetv2_plan_and_preprocess, into --work), then runs `nnUNetv2_train DATASET 3d_fullres FOLD -tr TRAINER -device
cuda` for each trainer with nnUNet_green_epochs/iters/val_iters, and reads back what the trainer's meter wrote
(green_summary.json, green_log.csv): peak GPU memory (allocated and reserved), mean epoch time, time waiting for
data and its share of training time, energy (NVML counter deltas where readable) and nnU-Net's final validation
Dice. Each is also given as a ratio to nnUNetTrainerGreenFP32. Then `nnunet-green-loader --device cuda` measures
the data loader against the training step. Writes OUT/gpu_training.json and OUT/gpu_training.md, naming the GPU,
driver/NVML versions and the command.

Targets (issue #13), printed as pass / fail / not measured: nnUNetTrainerGreenAMP8bit <= 0.5x the peak allocated
memory, <= 0.6x the mean epoch time and <= 0.5x the training energy of nnUNetTrainerGreenFP32, with final
validation Dice within 0.01. A few epochs say little about Dice: the Dice check of a short run is a smoke check.

Default run (bounded by --max-minutes 9, preparation included, so it fits one 10-minute device call):
  python benchmarks/gpu_training.py -o bench_out/gpu_training
Without CUDA the script stops (exit 2). `--allow-cpu` runs the same code path on the CPU, for testing the script:
  python benchmarks/gpu_training.py --allow-cpu --trainers nnUNetTrainerGreenFP32 nnUNetTrainerGreenAMP8bit \\
      --n-train 6 --epochs 1 --iters 2 --val-iters 1 --no-loader -o /tmp/gpu_smoke
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunet_green.contract import (BASELINE_TRAINER, EXIT_BAD_INPUT, GREEN_LOG_FILE, GREEN_SUMMARY_FILE,
                                   TrainingSummary, env_name)

REPO = Path(__file__).resolve().parents[1]
DATASET_ID, DATASET_NAME = 4, "Dataset004_Hippocampus"
TRAINERS = ("nnUNetTrainerGreenFP32", "nnUNetTrainerGreenAMP", "nnUNetTrainerGreenBF16", "nnUNetTrainerGreen8bit",
            "nnUNetTrainerGreenAMP8bit", "nnUNetTrainerGreenHalf8bit")
ADAMW_TRAINERS = ("nnUNetTrainerGreen8bitAdamW", "nnUNetTrainerGreenAMP8bitAdamW", "nnUNetTrainerGreenHalf8bitAdamW")
TARGET_TRAINER = "nnUNetTrainerGreenAMP8bit"
# metric key -> (largest allowed ratio to fp32, what it is)
TARGETS = {"gpu_mem_alloc_peak_mb": (0.5, "peak allocated GPU memory"),
           "mean_epoch_s": (0.6, "mean epoch time"),
           "train_energy_j": (0.5, "training energy")}
DICE_TOLERANCE = 0.01
RATIO_KEYS = ("gpu_mem_alloc_peak_mb", "gpu_mem_reserved_peak_mb", "mean_epoch_s", "data_wait_s", "train_energy_j")


def default_data() -> Path:
    root = os.environ.get("NNUNET_GREEN_DATA") or str(REPO.parent / "shared" / "data")
    return Path(root) / "Task04_Hippocampus"


def gpu_description(device: str) -> dict:
    """Name, driver and NVML versions of the GPU (None where not readable)."""
    import torch

    info = {"name": None, "driver": None, "nvml": None, "cuda_runtime": torch.version.cuda}
    if device != "cuda":
        return info
    info["name"] = torch.cuda.get_device_name(0)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
            info["nvml"] = _text(pynvml.nvmlSystemGetNVMLVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - a missing NVML is recorded, not fatal
        info["nvml_error"] = f"{type(e).__name__}: {e}"
    return info


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def prepare(data: Path, work: Path, n_train: int, procs: int) -> dict:
    """Convert and plan the first `n_train` cases once (reused when already there)."""
    from nnunet_green.demo.data import msd_subset
    from nnunet_green.evaluation.experiment import nnunet_env, run_tool

    env = nnunet_env(work)
    t0 = time.perf_counter()
    reused = (work / "preprocessed" / DATASET_NAME / "nnUNetPlans.json").is_file()
    if not reused:
        task = msd_subset(data, work / "msd", n_train, 0)
        if not (work / "raw" / DATASET_NAME / "dataset.json").is_file():
            run_tool(["nnUNetv2_convert_MSD_dataset", "-i", task, "-np", procs], env)
        run_tool(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-npfp", procs, "-np", procs],
                 env)
    # reused = planned by an earlier run in the same --work (its case count, not necessarily this --n-train)
    return {"seconds": round(time.perf_counter() - t0, 1), "n_train": n_train, "reused": reused}


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v):
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _sum(values):
    return None if not values or any(v is None for v in values) else sum(values)


def metrics(fold_folder: Path) -> dict:
    """What one run's meter recorded, reduced to the benchmark's columns."""
    summary = TrainingSummary.read(fold_folder / GREEN_SUMMARY_FILE)
    rows = read_log(fold_folder / GREEN_LOG_FILE)
    t, extra = summary.totals, summary.extra
    epoch_s = [_num(r["epoch_s"]) for r in rows]
    # The first epoch carries start-up work (cudnn autotuning, allocator warm-up): its own column.
    return {
        "epochs": len(rows),
        "precision": extra.get("precision"),
        "optimizer": extra.get("optimizer"),
        "gpu_mem_alloc_peak_mb": t.get("gpu_mem_alloc_peak_mb"),
        "gpu_mem_reserved_peak_mb": t.get("gpu_mem_reserved_peak_mb"),
        "mean_epoch_s": _mean(epoch_s),
        "mean_epoch_s_after_first": _mean(epoch_s[1:]),
        "data_wait_s": t.get("data_wait_s"),
        "data_wait_fraction": t.get("data_wait_fraction"),
        "train_energy_j": _sum([_num(r["energy_j"]) for r in rows]),  # epochs only; final validation apart
        "final_validation_s": t.get("final_validation_s"),
        "energy_j_total": t.get("energy_j"),
        "energy_source": t.get("energy_source"),
        "validation_dice": (extra.get("dice") or {}).get("validation_mean_fg_dice"),
        "optimizer_state_bytes": extra.get("optimizer_state_bytes"),
        "nonfinite_steps_skipped": extra.get("nonfinite_steps_skipped"),
    }


def train(trainer: str, work: Path, device: str, epochs: int, iters: int, val_iters: int, fold: str,
          timeout_s: float, n_proc_da: str | None) -> dict:
    """One fresh `nnUNetv2_train` run; its metrics, or the failure (recorded, the next trainer still runs)."""
    from nnunet_green.evaluation.experiment import nnunet_env

    folder = work / "results" / DATASET_NAME / f"{trainer}__nnUNetPlans__3d_fullres"
    if folder.exists():
        shutil.rmtree(folder)  # a fresh run: no rows of an earlier one in green_log.csv
    env = nnunet_env(work, **{env_name("epochs"): epochs, env_name("iters"): iters, env_name("val_iters"): val_iters})
    if n_proc_da is not None:
        env["nnUNet_n_proc_DA"] = n_proc_da
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", fold, "-tr", trainer,
           "-device", device]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"trainer": trainer, "status": f"timed out after {timeout_s:.0f} s (--max-minutes)",
                "wall_s": round(time.perf_counter() - t0, 1)}
    wall = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"trainer": trainer, "status": f"failed (exit {proc.returncode})", "error": "\n".join(tail),
                "wall_s": wall}
    return {"trainer": trainer, "status": "ok", "wall_s": wall, **metrics(folder / f"fold_{fold}")}


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["trainer"] == BASELINE_TRAINER and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        r["ratio_to_fp32"] = {k: (r[k] / base[k] if base and r.get(k) is not None and base.get(k) else None)
                              for k in RATIO_KEYS}
        r["dice_minus_fp32"] = (r["validation_dice"] - base["validation_dice"]
                                if base and None not in (r["validation_dice"], base["validation_dice"]) else None)


def check_targets(rows: list[dict]) -> list[dict]:
    """pass / fail / not measured, never guessed."""
    row = next((r for r in rows if r["trainer"] == TARGET_TRAINER and r["status"] == "ok"), None)
    checks = []
    for key, (limit, what) in TARGETS.items():
        ratio = (row or {}).get("ratio_to_fp32", {}).get(key)
        checks.append({"target": f"{what} <= {limit:g}x fp32", "value": ratio,
                       "result": "not measured" if ratio is None else ("pass" if ratio <= limit else "fail")})
    diff = (row or {}).get("dice_minus_fp32")
    checks.append({"target": f"final validation Dice within {DICE_TOLERANCE:g} of fp32", "value": diff,
                   "result": "not measured" if diff is None else ("pass" if abs(diff) <= DICE_TOLERANCE else "fail")})
    return checks


def run_loader(work: Path, device: str, max_seconds: float, out: Path) -> dict:
    from nnunet_green.evaluation.experiment import nnunet_env

    env = nnunet_env(work)
    procs = [n for n in (0, 1, 2, 4, 8, 12, 16) if n <= (os.cpu_count() or 1)]
    cmd = [str(Path(sys.executable).parent / "nnunet-green-loader"), "-d", str(DATASET_ID), "-tr", BASELINE_TRAINER,
           "--device", device, "--procs", *map(str, procs), "--max-seconds", f"{max_seconds:.0f}", "-q",
           "-o", str(out / "loader")]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max_seconds + 120)
    if proc.returncode != 0:
        return {"status": f"failed (exit {proc.returncode})", "error": (proc.stderr or proc.stdout)[-1500:]}
    return {"status": "ok", "command": " ".join(cmd[:1] + cmd[1:]),
            "report": json.loads((out / "loader" / "loader.json").read_text())}


def _f(v, spec=".2f"):
    return "–" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    g, s = result["gpu"], result["settings"]
    lines = [f"# GPU training benchmark ({result['device']})", "",
             f"Measured {result['created']} on **{g['name'] or 'no GPU (CPU run: tests the script only)'}**"
             f" (driver {g['driver'] or '–'}, NVML {g['nvml'] or '–'}, CUDA runtime {g['cuda_runtime'] or '–'}); "
             f"CPU {result['machine']['cpu']}, {result['machine']['cpu_count']} cores, torch "
             f"{result['machine']['torch']}, nnU-Net {result['machine']['nnunetv2']}.", "",
             f"Command: `{result['command']}`", "",
             f"Setting: MSD Hippocampus, first {s['n_train']} cases, 3d_fullres fold {s['fold']}, {s['epochs']} "
             f"epochs x {s['iters']} iterations ({s['val_iters']} validation iterations), fresh run per trainer "
             f"through `nnUNetv2_train -device {result['device']}` (torch.compile off: nnUNet_compile=f). "
             f"Energy: training epochs only (final validation apart). Data prepared in "
             f"{result['prepare']['seconds']} s" + (" (reused from an earlier run in the same --work)"
                                                    if result["prepare"].get("reused") else "") + ".", "",
             "| trainer | status | peak alloc MB | peak reserved MB | mean epoch s | data wait s (share) | energy J "
             "(source) | val Dice | mem x | time x | energy x | ΔDice |", "|" + "---|" * 12]
    for r in result["trainers"]:
        if r["status"] != "ok":
            lines.append(f"| {r['trainer']} | {r['status']} |" + " |" * 10)
            continue
        q = r["ratio_to_fp32"]
        share = "" if r["data_wait_fraction"] is None else f" ({r['data_wait_fraction']:.0%})"
        lines.append(
            f"| {r['trainer']} | ok | {_f(r['gpu_mem_alloc_peak_mb'], '.0f')} | "
            f"{_f(r['gpu_mem_reserved_peak_mb'], '.0f')} | {_f(r['mean_epoch_s'])} | {_f(r['data_wait_s'])}{share} | "
            f"{_f(r['train_energy_j'], '.0f')} "
            f"({r['energy_source']}) | {_f(r['validation_dice'], '.4f')} | {_f(q['gpu_mem_alloc_peak_mb'])} | "
            f"{_f(q['mean_epoch_s'])} | {_f(q['train_energy_j'])} | {_f(r['dice_minus_fp32'], '+.4f')} |")
    lines += ["", f"Targets for {TARGET_TRAINER} against {BASELINE_TRAINER}:", ""]
    lines += [f"- {c['target']}: **{c['result']}**" + ("" if c["value"] is None else f" ({c['value']:.3f})")
              for c in result["targets"]]
    loader = result.get("loader")
    if loader:
        lines += ["", "## Data loader (`nnunet-green-loader`)", ""]
        if loader["status"] != "ok":
            lines.append(f"{loader['status']}")
        else:
            rep = loader["report"]
            lines += ["| nnUNet_n_proc_DA | batches/s | steady |", "|---|---|---|"]
            lines += [f"| {row['n_proc_DA']} | {row['batches_per_s']:.2f} | {row['steady_state']} |"
                      for row in rep["rows"]]
            lines += ["", f"Training step: {rep['step']['seconds_median']:.3f} s ({rep['step']['device']}). "
                      f"{rep['verdict']} Recommended: nnUNet_n_proc_DA={rep['recommended_n_proc_DA']}."]
    if result["device"] != "cuda":
        lines += ["", "**CPU run**: autocast and low precision fall back to fp32 on a CPU, NVML is absent: these "
                  "numbers test the script, they are not results."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="MSD Task04_Hippocampus folder "
                   "(default $NNUNET_GREEN_DATA/Task04_Hippocampus, else ../shared/data/Task04_Hippocampus)")
    p.add_argument("--work", type=Path, default=REPO / "work" / "gpu_training", help="nnU-Net folders")
    p.add_argument("--n-train", type=int, default=40, help="cases converted and planned (default 40)")
    p.add_argument("--trainers", nargs="+", default=list(TRAINERS))
    p.add_argument("--adamw", action="store_true", help="also the AdamW8bit trainers")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--val-iters", type=int, default=5)
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("--procs", type=int, default=None, help="conversion/planning workers (default min(8, CPUs))")
    p.add_argument("--n-proc-da", default=None, help="nnUNet_n_proc_DA for training (default: nnU-Net's)")
    p.add_argument("--max-minutes", type=float, default=9.0,
                   help="total time budget; trainers that no longer fit are recorded as skipped (default 9)")
    p.add_argument("--loader-seconds", type=float, default=60.0, help="nnunet-green-loader budget (default 60)")
    p.add_argument("--no-loader", action="store_true", help="skip the loader table")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA (tests the script)")
    p.add_argument("-o", "--output", type=Path, default=REPO / "bench_out" / "gpu_training")
    args = p.parse_args(argv)
    start = time.perf_counter()

    import torch

    from nnunet_green.evaluation.machine import machine_info

    if torch.cuda.is_available():
        device = "cuda"
    elif args.allow_cpu:
        device = "cpu"
        print("no CUDA device: running on the CPU (--allow-cpu); the numbers only test the script", file=sys.stderr)
    else:
        print("gpu_training.py: no CUDA device is available here; this benchmark measures GPU training. "
              "Run it on a CUDA machine, or pass --allow-cpu to test the script on the CPU.", file=sys.stderr)
        return EXIT_BAD_INPUT
    data = (args.data or default_data()).absolute()
    if not (data / "dataset.json").is_file():
        p.error(f"MSD Task04_Hippocampus not found at {data} (set --data or NNUNET_GREEN_DATA)")
    trainers = list(dict.fromkeys([BASELINE_TRAINER, *args.trainers, *(ADAMW_TRAINERS if args.adamw else ())]))
    work = args.work.absolute()
    budget_s = args.max_minutes * 60

    prep = prepare(data, work, args.n_train, args.procs or min(8, os.cpu_count() or 1))
    rows = []
    for i, trainer in enumerate(trainers):
        left = budget_s - (time.perf_counter() - start) - (0 if args.no_loader else args.loader_seconds + 30)
        if left < 30:
            rows.append({"trainer": trainer, "status": "skipped (--max-minutes spent)"})
            continue
        # at most 1.5x a fair share of what is left, so one slow trainer cannot starve the rest
        timeout = min(left, max(1.5 * left / (len(trainers) - i), 30.0))
        rows.append(train(trainer, work, device, args.epochs, args.iters, args.val_iters, args.fold, timeout,
                          args.n_proc_da))
        print(f"  {trainer}: {rows[-1]['status']} ({rows[-1].get('wall_s')} s)", file=sys.stderr, flush=True)
    add_ratios(rows)
    loader = None
    if not args.no_loader:
        left = budget_s - (time.perf_counter() - start)
        loader = run_loader(work, device, max(min(args.loader_seconds, left - 30), 15), args.output) \
            if left > 30 else {"status": "skipped (--max-minutes spent)"}

    result = {
        "benchmark": "gpu_training", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "device": device, "gpu": gpu_description(device), "machine": machine_info(device),
        "settings": {"n_train": args.n_train, "epochs": args.epochs, "iters": args.iters,
                     "val_iters": args.val_iters, "fold": args.fold, "n_proc_DA": args.n_proc_da,
                     "max_minutes": args.max_minutes, "data": str(data)},
        "prepare": prep, "trainers": rows, "targets": check_targets(rows), "loader": loader,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    from nnunet_green.evaluation.experiment import write_result
    write_result(args.output, "gpu_training", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
