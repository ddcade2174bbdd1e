"""Light plans evidence: nnU-Net's default plans vs nnUNetPlansGreenLight at equal epochs, then compressed.

On the first --n-train labelled cases of MSD Hippocampus (converted and planned once with the real nnU-Net CLIs
into --work; the next --n-test labelled cases held out), `nnunet-green-plan` writes the light plans, and nnU-Net's
training entry point (what `nnUNetv2_train` runs) trains the same trainer, fold and seed on both plans for the same
epochs. For each: parameters and multiply-adds per patch, training time and epoch time, energy where a counter is
readable (else the CPU time of the training process tree, labelled), nnU-Net's final validation Dice and the Dice of
`nnUNetv2_predict_from_modelfolder` on the held-out cases. Then both models go through `nnunet-green-compress
--rank-ratio R` and the compressed folders are scored the same way: how much further the light model compresses.

The default-plans run of `benchmarks/stopping.py` (full schedule) has the same settings at its defaults; pass its
folder with --baseline-run (and the same --work) to skip training the default plans again.

Default (`make bench-light`; about 35 min on a 2-core CPU, 15 with --baseline-run):
  python benchmarks/light_plans.py -o bench_out/light_plans
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
from pathlib import Path

from nnunet_green.contract import (BASELINE_TRAINER, DATASET_FILE, DEFAULT_PLANS, GREEN_SUMMARY_FILE, LIGHT_PLANS,
                                   MANIFEST_FILE, PLANS_FILE, TrainingSummary, read_json)

REPO = Path(__file__).resolve().parents[1]
DATASET = (4, "Dataset004_Hippocampus")
CONFIGURATION = "3d_fullres"


def default_data() -> Path:
    root = os.environ.get("NNUNET_GREEN_DATA") or str(REPO.parent / "shared" / "data")
    return Path(root) / "Task04_Hippocampus"


def plan_light(work: Path) -> list[str]:
    """`nnunet-green-plan`, then `nnUNetv2_preprocess` only where the light plans do not share nnUNetPlans' data."""
    from nnunet_green.evaluation.experiment import nnunet_env, run_tool

    env = nnunet_env(work)
    run_tool(["nnunet-green-plan", "-d", DATASET[0], "-c", CONFIGURATION], env)
    pre = work / "preprocessed" / DATASET[1]
    light = read_json(pre / f"{LIGHT_PLANS}.json", "light plans")
    identifier = light["configurations"][CONFIGURATION]["data_identifier"]
    steps = ["nnunet-green-plan"]
    if not (pre / identifier).is_dir():
        run_tool(["nnUNetv2_preprocess", "-d", DATASET[0], "-plans_name", LIGHT_PLANS, "-c", CONFIGURATION,
                  "-np", 1], env)
        steps.append("nnUNetv2_preprocess")
    return steps


def network_costs(work: Path) -> dict[str, dict]:
    from nnunet_green.training.light_plans import network_cost

    pre = work / "preprocessed" / DATASET[1]
    dataset_json = read_json(pre / DATASET_FILE, DATASET_FILE)
    return {plans: network_cost(read_json(pre / f"{plans}.json", plans), CONFIGURATION, dataset_json)
            for plans in (DEFAULT_PLANS, LIGHT_PLANS)}


def reuse_run(folder: Path, args) -> dict:
    """A finished default-plans run (e.g. stopping.py's full schedule) in the shape seeded_training_run returns;
    refused unless it ran the same trainer, epochs and iterations with no stopping policy."""
    summary = TrainingSummary.read(folder / f"fold_{args.fold}" / GREEN_SUMMARY_FILE)
    extra, t = summary.extra, summary.totals
    stopping = extra.get("stopping") or {}
    expected = {"trainer": args.trainer, "num_epochs": args.epochs, "epochs_logged": args.epochs,
                "stopping": "schedule_complete"}
    seen = {"trainer": summary.trainer, "num_epochs": extra.get("num_epochs"), "epochs_logged": summary.epochs_logged,
            "stopping": stopping.get("reason", "schedule_complete")}
    if seen != expected:
        sys.exit(f"--baseline-run {folder} does not match this benchmark's settings: {seen} != {expected}")
    return {"run": folder.name, "model_folder": str(folder), "plans": DEFAULT_PLANS, "reused": True,
            "epochs_trained": summary.epochs_logged, "epochs_scheduled": extra.get("num_epochs"),
            "train_time_s": t.get("time_s"), "final_validation_s": t.get("final_validation_s"),
            "energy_j": t.get("energy_j"), "energy_source": t.get("energy_source"),
            "process_cpu_s": None, "validation_dice": (extra.get("dice") or {}).get("validation_mean_fg_dice")}


def compress(run: dict, work: Path, rank_ratio: float) -> dict:
    """`nnunet-green-compress` of a run's model folder; the compressed folder as a run-like row."""
    src = Path(run["model_folder"])
    out = work / "runs" / f"{run['run']}_compressed"
    cmd = [str(Path(sys.executable).parent / "nnunet-green-compress"), "-i", str(src), "-o", str(out),
           "--rank-ratio", str(rank_ratio), "--overwrite"]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"compression of {src} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    manifest = read_json(out / MANIFEST_FILE, MANIFEST_FILE)
    return {"run": out.name, "model_folder": str(out), "plans": run["plans"], "compressed_from": run["run"],
            "compress_s": round(time.perf_counter() - t0, 1), "rank_ratio": rank_ratio,
            "params": (manifest.get("totals") or {}).get("params_after"),
            "params_before": (manifest.get("totals") or {}).get("params_before")}


def compressed_macs(row: dict, patch_size) -> int:
    """Multiply-adds per patch of a compressed folder's network (built from its plans, as the predictor does)."""
    from nnunet_green.compression.macs import count_macs
    from nnunet_green.nnunet_io import ModelFolder

    loaded = ModelFolder(row["model_folder"]).load(device="cpu")
    return count_macs(loaded.network, (1, loaded.num_input_channels, *patch_size))


def _f(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    cost = result["cost_measure"]
    lines = ["# Light plans vs nnU-Net's default plans, at equal epochs, then compressed", "",
             f"Measured {result['created']} on {m.get('gpu') or m['cpu']} ({m['cpu_count']} CPU cores, device "
             f"{s['device']}), torch {m['torch']}, nnU-Net {m['nnunetv2']}.", "",
             f"Command: `{result['command']}`", "",
             f"Setting: MSD Hippocampus, {s['n_train']} training cases (fold {s['fold']}) + {s['n_test']} held-out "
             f"labelled cases, {s['trainer']}, {s['epochs']} epochs x {s['iters']} iterations, seed {s['seed']}, "
             f"nnUNet_n_proc_DA={s['n_proc_DA']}; compression at rank ratio {s['rank_ratio']:g}. "
             f"Light plans prepared by: {', '.join(result['light_plans_steps'])}.", "",
             "| model | features per stage | params | multiply-adds / patch | training s | mean epoch s | "
             f"{cost} | val Dice | held-out Dice |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        c = result["network_costs"][r["plans"]]
        energy = r["energy_j"] if r.get("energy_source") not in (None, "unavailable") else r.get("process_cpu_s")
        lines.append(f"| {r['plans']}{' (reused run)' if r.get('reused') else ''} | {c['features_per_stage']} | "
                     f"{c['params'] / 1e6:.2f} M | {c['macs_per_patch'] / 1e9:.2f} G | {_f(r['train_time_s'])} | "
                     f"{_f(r['train_time_s'] / r['epochs_trained'] if r['train_time_s'] else None)} | "
                     f"{_f(energy, '.0f')} | {_f(r.get('validation_dice'), '.4f')} | "
                     f"{_f(r.get('held_out_dice'), '.4f')} |")
    for r in result["compressed"]:
        lines.append(f"| {r['plans']} compressed ({r['rank_ratio']:g}) | Tucker-2 | {r['params'] / 1e6:.2f} M | "
                     f"{r['macs_per_patch'] / 1e9:.2f} G | – | – | – | – | {_f(r.get('held_out_dice'), '.4f')} |")
    ratios = result["ratios"]
    lines += ["", f"Light / default: params {ratios['params']:.2f}x, multiply-adds {ratios['macs']:.2f}x, training "
              f"time {_f(ratios['train_time'], '.2f')}x, {cost} {_f(ratios['cost'], '.2f')}x; held-out Dice "
              f"{_f(ratios['held_out_dice_diff'], '+.4f')} (light minus default).",
              "", "Compressed light / dense default: params "
              f"{_f(ratios['compressed_light_params'], '.3f')}x, multiply-adds "
              f"{_f(ratios['compressed_light_macs'], '.3f')}x.", "",
              "Training s: the epochs (nnU-Net's loop, from green_summary.json). One seed and few held-out cases: "
              "Dice differences of ~0.01 are within run-to-run noise.", ""]
    return "\n".join(lines)


def _ratio(a, b):
    return None if a is None or not b else a / b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="MSD Task04_Hippocampus folder "
                   "(default $NNUNET_GREEN_DATA/Task04_Hippocampus, else ../shared/data/Task04_Hippocampus)")
    p.add_argument("--work", type=Path, default=REPO / "work" / "stopping",
                   help="nnU-Net folders and the runs (default: the stopping benchmark's, to share its data)")
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--trainer", default=BASELINE_TRAINER)
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--val-iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--n-proc-da", default="0")
    p.add_argument("--rank-ratio", type=float, default=0.12)
    p.add_argument("--baseline-run", type=Path, default=None,
                   help="a finished default-plans run folder with these settings (e.g. WORK/runs/full of "
                        "benchmarks/stopping.py) instead of training the default plans again")
    p.add_argument("-o", "--output", type=Path, default=REPO / "bench_out" / "light_plans")
    args = p.parse_args(argv)
    start = time.perf_counter()

    from nnunet_green.evaluation.experiment import (held_out_dice, prepare_msd_subset, seeded_training_run,
                                                    write_result)
    from nnunet_green.evaluation.machine import machine_info

    data = (args.data or default_data()).absolute()
    if not (data / DATASET_FILE).is_file():
        p.error(f"MSD Task04_Hippocampus not found at {data} (set --data or NNUNET_GREEN_DATA)")
    work = args.work.absolute()
    images, labels = prepare_msd_subset(data, work, args.n_train, args.n_test, DATASET)
    steps = plan_light(work)
    costs = network_costs(work)
    common = dict(trainer=args.trainer, fold=args.fold, seed=args.seed, device=args.device, epochs=args.epochs,
                  iters=args.iters, val_iters=args.val_iters, n_proc_da=args.n_proc_da)
    default = (reuse_run(args.baseline_run.absolute(), args) if args.baseline_run
               else seeded_training_run("default_plans", work, DATASET, plans=DEFAULT_PLANS, **common))
    light = seeded_training_run("light_plans", work, DATASET, plans=LIGHT_PLANS, **common)
    runs = [default, light]
    compressed = [compress(r, work, args.rank_ratio) for r in runs]
    patch = costs[LIGHT_PLANS]["patch_size"]
    for row in compressed:
        row["macs_per_patch"] = compressed_macs(row, patch)
    for row in (*runs, *compressed):
        held_out_dice(row, images, labels, args.fold, args.device)

    measured = all(r.get("energy_source") not in (None, "unavailable") for r in runs)
    cost_measure = "energy J" if measured else "process CPU s (energy unavailable)"
    cost_key = "energy_j" if measured else "process_cpu_s"
    dl, dd = costs[LIGHT_PLANS], costs[DEFAULT_PLANS]
    ratios = {"params": dl["params"] / dd["params"], "macs": dl["macs_per_patch"] / dd["macs_per_patch"],
              "train_time": _ratio(light["train_time_s"], default["train_time_s"]),
              "cost": _ratio(light.get(cost_key), default.get(cost_key)),
              "held_out_dice_diff": (None if light.get("held_out_dice") is None
                                     or default.get("held_out_dice") is None
                                     else light["held_out_dice"] - default["held_out_dice"]),
              "compressed_light_params": _ratio(compressed[1]["params"], dd["params"]),
              "compressed_light_macs": _ratio(compressed[1]["macs_per_patch"], dd["macs_per_patch"])}
    result = {
        "benchmark": "light_plans", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "machine": machine_info(args.device),
        "settings": {"n_train": args.n_train, "n_test": args.n_test, "trainer": args.trainer, "epochs": args.epochs,
                     "iters": args.iters, "val_iters": args.val_iters, "seed": args.seed, "fold": args.fold,
                     "device": args.device, "n_proc_DA": args.n_proc_da, "rank_ratio": args.rank_ratio,
                     "data": str(data), "plans_file": PLANS_FILE},
        "light_plans_steps": steps, "network_costs": costs, "runs": runs, "compressed": compressed,
        "cost_measure": cost_measure, "ratios": ratios, "elapsed_s": round(time.perf_counter() - start, 1),
    }
    write_result(args.output, "light_plans", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
