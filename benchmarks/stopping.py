"""Energy-aware stopping evidence: the same training twice, the full schedule and with a plateau stop.

On the first --n-train labelled cases of MSD Hippocampus (converted and planned once with the real nnU-Net CLIs
into --work; the next --n-test labelled cases held out), nnU-Net's training entry point (what `nnUNetv2_train`
runs) trains the same trainer, fold and seed twice: once for the whole schedule, once with
nnUNet_green_patience / nnUNet_green_min_delta (and nnUNet_green_cooldown: after the plateau the learning rate is
annealed over that many epochs before the stop; default the patience). For each run it reports nnU-Net's final
validation Dice (validation/summary.json, via green_summary.json), Dice of `nnUNetv2_predict_from_modelfolder` on
the held-out labelled cases (unless --no-predict), training time, energy where a counter is readable (else the CPU
time of the training process tree, labelled as such), the stop epoch and reason, and the saving in %. Pass/fail
against issue #13's target: Dice within 0.01 of the full schedule with >= 40 % less training time and energy (or
CPU time).

Seed: random, numpy and torch are seeded in the training process before nnU-Net starts; with nnUNet_n_proc_DA=0
(the default here) augmentation runs in that process too. nnU-Net turns cudnn.benchmark on, so GPU runs are not
bit-reproducible.

Default (45 min on a quiet 2-core CPU, the full run 27 min of it; `make bench-stopping`):
  python benchmarks/stopping.py -o bench_out/stopping
Another early-run setting against the same full run (no second full schedule): --full-from a stopping.json of an
earlier run with the same settings, e.g.
  python benchmarks/stopping.py --cooldown 3 --full-from bench_out/stopping/stopping.json -o bench_out/stopping_cd3
Smoke test of the script (a couple of minutes; patience 1 with min_delta 1.0 forces a stop):
  python benchmarks/stopping.py --n-train 6 --n-test 2 --epochs 4 --iters 2 --val-iters 1 --patience 1 \\
      --min-delta 1.0 -o /tmp/stopping_smoke
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path

from nnunet_green.contract import BASELINE_TRAINER, DATASET_FILE

REPO = Path(__file__).resolve().parents[1]
DATASET_ID, DATASET_NAME = 4, "Dataset004_Hippocampus"
DICE_TOLERANCE = 0.01
MIN_SAVING = 0.40
DEFAULT_PATIENCE = 5  # the early run's nnUNet_green_patience unless --patience says otherwise


def default_data() -> Path:
    root = os.environ.get("NNUNET_GREEN_DATA") or str(REPO.parent / "shared" / "data")
    return Path(root) / "Task04_Hippocampus"


def _saving(full, early):
    return None if full in (None, 0) or early is None else 1 - early / full


def compare(full: dict, early: dict) -> dict:
    energy_measured = all(r["energy_j"] is not None and r["energy_source"] not in (None, "unavailable")
                          for r in (full, early))
    if energy_measured:
        measure, key = f"energy ({full['energy_source']})", "energy_j"
    else:
        measure, key = "CPU time of the training process tree (energy unavailable)", "process_cpu_s"
    savings = {"train_time": _saving(full["train_time_s"], early["train_time_s"]),
               "energy_or_cpu_time": _saving(full[key], early[key])}
    checks = []
    for what, k in (("final validation Dice", "validation_dice"), ("held-out Dice", "held_out_dice")):
        if full.get(k) is None or early.get(k) is None:
            if k == "validation_dice" or "held_out_dice" in full:
                checks.append({"target": f"{what} within {DICE_TOLERANCE:g} of the full schedule", "value": None,
                               "result": "not measured"})
            continue
        diff = early[k] - full[k]
        checks.append({"target": f"{what} within {DICE_TOLERANCE:g} of the full schedule", "value": diff,
                       "result": "pass" if diff >= -DICE_TOLERANCE else "fail"})
    for what, v in (("training time", savings["train_time"]), (measure, savings["energy_or_cpu_time"])):
        checks.append({"target": f"{what} >= {MIN_SAVING:.0%} less", "value": v,
                       "result": "not measured" if v is None else ("pass" if v >= MIN_SAVING else "fail")})
    verdict = "pass" if all(c["result"] == "pass" for c in checks) else \
        ("fail" if any(c["result"] == "fail" for c in checks) else "not measured")
    return {"cost_measure": measure, "cost_key": key, "savings": savings, "checks": checks, "verdict": verdict,
            "held_out_paired": held_out_paired(full, early)}


def held_out_paired(full: dict, early: dict) -> dict | None:
    """Early minus full held-out Dice case by case, with a bootstrap interval: how sure the mean difference is."""
    from nnunet_green.evaluation import paired_difference

    if "held_out_case_dice" not in full or full.get("held_out_case_names") != early.get("held_out_case_names"):
        return None
    return paired_difference(full["held_out_case_dice"], early.get("held_out_case_dice", []))


def _f(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    s, c, m = result["settings"], result["comparison"], result["machine"]
    lines = ["# Energy-aware stopping: full schedule vs plateau stop", "",
             f"Measured {result['created']} on {m.get('gpu') or m['cpu']} ({m['cpu_count']} CPU cores, device "
             f"{s['device']}), torch {m['torch']}, nnU-Net {m['nnunetv2']}.", "",
             f"Command: `{result['command']}`", "",
             *([f"Held-out Dice scored again from the runs' predictions ({result['rescored']['at']}): "
                f"`{result['rescored']['command']}`", ""] if result.get("rescored") else []),
             f"Setting: MSD Hippocampus, {s['n_train']} training cases (fold {s['fold']} of nnU-Net's 5-fold split "
             f"for the final validation) + {s['n_test']} held-out labelled cases, {s['trainer']}, {s['epochs']} "
             f"epochs x {s['iters']} iterations ({s['val_iters']} validation iterations), seed {s['seed']}, "
             f"nnUNet_n_proc_DA={s['n_proc_DA']}. Early run: nnUNet_green_patience={s['patience']}, "
             f"nnUNet_green_min_delta={s['min_delta']:g}"
             + ("" if s.get("cooldown") is None else f", nnUNet_green_cooldown={s['cooldown']}")
             + f" (policy: {result['runs'][-1]['policy']}). Cost measure: {c['cost_measure']}.", "",
             *([f"The full run is reused from `{s['full_from']}` (same settings; measured when that file was "
                f"written).", ""] if s.get("full_from") else []),
             "| run | stop (last epoch, 0-based) | epochs | training s | energy J (source) | process CPU s | "
             "val Dice | held-out Dice |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        plateau = "" if r.get("plateau_epoch") is None else f", plateau after epoch {r['plateau_epoch']}"
        lines.append(f"| {r['run']} | {r['stop_reason']} (epoch {r['stop_epoch']}{plateau}) | "
                     f"{r['epochs_trained']}/{r['epochs_scheduled']} | {_f(r['train_time_s'])} | "
                     f"{_f(r['energy_j'], '.0f')} ({r['energy_source']}) | {_f(r['process_cpu_s'])} | "
                     f"{_f(r['validation_dice'], '.4f')} | {_f(r.get('held_out_dice'), '.4f')} |")
    sv = c["savings"]
    pct = {k: None if v is None else 100 * v for k, v in sv.items()}
    lines += ["", "Training s: the epochs (nnU-Net's loop); energy: the epochs plus nnU-Net's final validation "
              "(both from green_summary.json); process CPU s: the whole `nnUNetv2_train` run, start-up and final "
              "validation included. Those fixed costs are the same in both runs, so short runs understate the saving."]
    lines += ["", f"Saving: training time {_f(pct['train_time'])} %, {c['cost_measure']} "
              f"{_f(pct['energy_or_cpu_time'])} %.",
              "", f"Target (issue #13): Dice within {DICE_TOLERANCE:g} with >= {MIN_SAVING:.0%} less training time "
              f"and energy: **{c['verdict']}**", ""]
    lines += [f"- {k['target']}: **{k['result']}**" + ("" if k["value"] is None else f" ({k['value']:+.4f})")
              for k in c["checks"]]
    if c.get("held_out_paired"):
        d = c["held_out_paired"]
        lines += ["", f"Held-out Dice, early minus full, case by case: mean {d['mean']:+.4f}, 95 % bootstrap interval "
                  f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] ({d['cases']} cases, {d['resamples']} resamples); "
                  f"{d['worse']} of {d['cases']} cases lower after the early stop."]
    return "\n".join(lines) + "\n"


def command_line(argv) -> str:
    return " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv)


def earlier_result(path: Path, settings: dict, error, flag: str, runs_needed: int) -> dict:
    """An earlier stopping.json, refused unless its settings match these and the model folders of its first
    `runs_needed` runs are still there."""
    import json

    try:
        earlier = json.loads(path.read_text())
        runs, recorded = earlier["runs"], earlier["settings"]
        if runs[0].get("run") != "full":
            raise KeyError("runs[0] is not the full run")
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        error(f"{flag} {path}: not a stopping.json of this benchmark ({e})")
    differ = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
    if differ:
        error(f"{flag} {path}: recorded with other settings (earlier, now): {differ}")
    for run in runs[:runs_needed]:
        if not Path(run["model_folder"]).is_dir():
            error(f"{flag} {path}: its model folder {run['model_folder']} is gone")
    return earlier


def earlier_full_run(path: Path, settings: dict, error) -> dict:
    """The full-schedule run recorded in an earlier stopping.json with the same settings."""
    return {**earlier_result(path, settings, error, "--full-from", 1)["runs"][0], "reused_from": str(path)}


def rescore(path: Path, settings: dict, images: Path, labels: Path, output: Path, error, command: str) -> int:
    """The earlier result with its held-out Dice scored again from the runs' prediction folders."""
    from nnunet_green.evaluation.experiment import score_held_out, write_result

    result = earlier_result(path, settings, error, "--rescore", 2)
    for run in result["runs"]:
        if "held_out_dice" in run:
            score_held_out(run, images, labels)
    result.update(comparison=compare(*result["runs"]), rescored={
        "from": str(path), "command": command,
        "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    write_result(output, "stopping", result, markdown(result))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="MSD Task04_Hippocampus folder "
                   "(default $NNUNET_GREEN_DATA/Task04_Hippocampus, else ../shared/data/Task04_Hippocampus)")
    p.add_argument("--work", type=Path, default=REPO / "work" / "stopping", help="nnU-Net folders and both runs")
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--n-test", type=int, default=10, help="held-out labelled cases (Dice of the stock predictor)")
    p.add_argument("--trainer", default=BASELINE_TRAINER)
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--val-iters", type=int, default=5)
    p.add_argument("--patience", type=int, default=DEFAULT_PATIENCE, help="nnUNet_green_patience of the early run")
    p.add_argument("--min-delta", type=float, default=0.005, help="nnUNet_green_min_delta of the early run")
    p.add_argument("--cooldown", type=int, default=None, help="nnUNet_green_cooldown of the early run (default: "
                   "unset, i.e. the trainer's default, the patience; 0 stops at the plateau itself)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--n-proc-da", default="0", help="nnUNet_n_proc_DA (default 0: augmentation in the seeded "
                   "process)")
    p.add_argument("--no-predict", action="store_true", help="skip the held-out prediction")
    p.add_argument("--full-from", type=Path, default=None, help="stopping.json of an earlier run of this benchmark "
                   "with the same settings: reuse its full-schedule run instead of training it again")
    p.add_argument("--rescore", type=Path, default=None, help="stopping.json of an earlier run of this benchmark with "
                   "the same settings: score its runs' held-out predictions again and redo the comparison (no "
                   "training, no prediction)")
    p.add_argument("-o", "--output", type=Path, default=REPO / "bench_out" / "stopping")
    args = p.parse_args(argv)
    start = time.perf_counter()

    from nnunet_green.evaluation.machine import machine_info

    data = (args.data or default_data()).absolute()
    if not (data / DATASET_FILE).is_file():
        p.error(f"MSD Task04_Hippocampus not found at {data} (set --data or NNUNET_GREEN_DATA)")
    if args.patience < 1 or args.min_delta < 0 or args.epochs < 2 or (args.cooldown or 0) < 0:
        p.error("--patience must be >= 1, --min-delta and --cooldown >= 0 and --epochs >= 2")
    work = args.work.absolute()
    from nnunet_green.evaluation.experiment import prepare_msd_subset

    images, labels = prepare_msd_subset(data, work, args.n_train, args.n_test, (DATASET_ID, DATASET_NAME))
    from nnunet_green.evaluation.experiment import held_out_dice, seeded_training_run

    common = dict(trainer=args.trainer, fold=args.fold, seed=args.seed, device=args.device, epochs=args.epochs,
                  iters=args.iters, val_iters=args.val_iters, n_proc_da=args.n_proc_da)
    settings = {"n_train": args.n_train, "n_test": args.n_test, "trainer": args.trainer, "epochs": args.epochs,
                "iters": args.iters, "val_iters": args.val_iters, "seed": args.seed, "fold": args.fold,
                "device": args.device, "n_proc_DA": args.n_proc_da}
    if args.rescore:
        return rescore(args.rescore, settings, images, labels, args.output, p.error, command_line(argv))
    full = earlier_full_run(args.full_from, settings, p.error) if args.full_from else \
        seeded_training_run("full", work, (DATASET_ID, DATASET_NAME), **common)
    early_name = "early" + ("" if args.patience == DEFAULT_PATIENCE else f"_patience{args.patience}") \
        + ("" if args.cooldown is None else f"_cooldown{args.cooldown}")
    runs = [full, seeded_training_run(early_name, work, (DATASET_ID, DATASET_NAME), **common,
                                      green_env={"patience": args.patience, "min_delta": args.min_delta,
                                                 **({} if args.cooldown is None else {"cooldown": args.cooldown})})]
    if not args.no_predict and args.n_test > 0:
        for run in runs:
            if "held_out_dice" not in run:
                held_out_dice(run, images, labels, args.fold, args.device)
    result = {
        "benchmark": "stopping", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "machine": machine_info(args.device),
        "settings": {**settings, "patience": args.patience, "min_delta": args.min_delta, "cooldown": args.cooldown,
                     "data": str(data), "full_from": None if args.full_from is None else str(args.full_from)},
        "runs": runs, "comparison": compare(*runs), "elapsed_s": round(time.perf_counter() - start, 1),
    }
    from nnunet_green.evaluation.experiment import write_result
    write_result(args.output, "stopping", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
