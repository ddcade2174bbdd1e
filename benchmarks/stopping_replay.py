"""Replay the plateau rule on a finished full-schedule run: where each patience / min_delta would have stopped.

With a fixed seed on CPU, a run with a stopping policy is the full run, epoch for epoch, until its plateau
(docs/results/stopping.md: plateau and stop epochs repeat exactly); only the cool-down after it differs. So one
finished full run answers, for a grid of policies and without training: at which epoch the plateau is detected,
when the run would stop (plateau + cool-down), how much of the schedule's measured time that saves, and how far the
full run's EMA pseudo-Dice still climbed after the plateau. What the cool-down itself adds is not replayable: that
needs the run (`benchmarks/stopping.py --full-from`).

  python benchmarks/stopping_replay.py work/stopping200_s1/runs/full/fold_0 -o bench_out/stopping_replay_s1
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path


def markdown(result: dict) -> str:
    f = lambda v, spec=".4f": "–" if v is None else format(v, spec)  # noqa: E731
    lines = ["# Plateau rule replayed on a full run", "", f"Command: `{result['command']}`  ",
             f"Run: `{result['run']}`, {result['num_epochs']} epochs, final EMA pseudo-Dice "
             f"{f(result['ema_final'])}; warm-up {result['min_epochs']} epochs; cool-down = "
             f"{result['cooldown'] if result['cooldown'] is not None else 'the patience'}.", "",
             "| patience | min_delta | plateau epoch | stop epoch | time saved | EMA at plateau | full run's best EMA after it |",
             "|---|---|---|---|---|---|---|"]
    for r in result["policies"]:
        lines.append(f"| {r['patience']} | {r['min_delta']:g} | {r['plateau_epoch'] if r['plateau_epoch'] is not None else 'none'} "
                     f"| {r['stop_epoch']} | {r['time_saving']:.1%} | {f(r.get('ema_at_plateau'))} "
                     f"| {f(r.get('ema_best_after_plateau'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="fold folder of a full-schedule run of a green trainer")
    p.add_argument("--patience", type=int, nargs="+", default=[5, 10, 15, 20, 30])
    p.add_argument("--min-delta", type=float, nargs="+", default=[0.0, 0.001, 0.002, 0.005])
    p.add_argument("--min-epochs", type=int, default=None, help="plateau warm-up (default: the trainer's, a tenth "
                   "of the schedule)")
    p.add_argument("--cooldown", type=int, default=None, help="cool-down epochs (default: the trainer's, the "
                   "patience)")
    p.add_argument("-o", "--output", type=Path, default=Path("bench_out") / "stopping_replay")
    args = p.parse_args(argv)
    checkpoint = args.run / "checkpoint_final.pth"
    if not checkpoint.is_file():
        p.error(f"{checkpoint} not found: give the fold folder of a finished run")

    from nnunet_green.contract import GreenSettings
    from nnunet_green.evaluation.experiment import write_result
    from nnunet_green.nnunet_io import load_checkpoint
    from nnunet_green.training.stopping import StoppingPolicy, replay

    logs = load_checkpoint(checkpoint)["logging"]
    ema, epoch_s = [float(v) for v in logs["ema_fg_dice"]], [float(v) for v in logs.get("green_epoch_s", [])]
    if len(epoch_s) != len(ema):
        p.error(f"{checkpoint} has no per-epoch times of a green trainer (green_epoch_s)")
    num_epochs = len(ema)
    policies = []
    for patience in args.patience:
        for min_delta in args.min_delta:
            # the trainer's own route from settings to policy: its defaults for warm-up and cool-down apply
            policy = StoppingPolicy.from_settings(GreenSettings(patience=patience, min_delta=min_delta,
                                                                min_epochs=args.min_epochs, cooldown=args.cooldown),
                                                  num_epochs)
            policies.append({"patience": patience, "min_delta": min_delta, **replay(policy, ema, epoch_s)})
    min_epochs = policy.min_epochs  # the same for every policy of the grid
    result = {"benchmark": "stopping_replay",
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/stopping_replay.py", *(argv or sys.argv[1:])]),
              "run": str(args.run), "num_epochs": num_epochs, "min_epochs": min_epochs, "cooldown": args.cooldown,
              "ema_final": ema[-1], "policies": policies}
    write_result(args.output, "stopping_replay", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
