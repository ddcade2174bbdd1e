"""`nnunet-green-loader`: how many nnU-Net data-augmentation workers does this machine need? Measures nnU-Net's own
training loader per `nnUNet_n_proc_DA` value against the trainer's own training step and writes loader.json and
loader.md."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from nnunet_green.contract import DEFAULT_PLANS, EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_OK, GreenError

PROG = "nnunet-green-loader"

EXAMPLES = f"""\
examples:
  {PROG} -d 4                                    # nnUNetPlans 3d_fullres, procs 0 1 2 4 8 (capped at the CPU count)
  {PROG} -d 4 -p nnUNetPlansGreenLight -tr nnUNetTrainerGreenFP32 --procs 2 4 8 12 --device cuda
  {PROG} -d 4 --procs 0 1 --batches 3 --max-seconds 60 -o /tmp/loader_check

Writes loader.json and loader.md into the trainer's fold folder
($nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>/fold_F, created if needed) or into -o. Then train
with the recommended value: nnUNet_n_proc_DA=N nnUNetv2_train ...

The measurement runs the real trainer's get_dataloaders() and train_step(); torch.compile is off for it.

{EXIT_CODES_HELP}
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Measure nnU-Net's training data loader (augmentation included) in "
                "batches/s for several nnUNet_n_proc_DA values, compare with the training-step time, and "
                "recommend a value.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, metavar="DATASET", help="dataset id or name (DatasetXXX_Name)")
    p.add_argument("-c", default="3d_fullres", metavar="CONFIGURATION", help="configuration (default 3d_fullres)")
    p.add_argument("-p", default=DEFAULT_PLANS, metavar="PLANS", help=f"plans identifier (default {DEFAULT_PLANS})")
    p.add_argument("-tr", default="nnUNetTrainer", metavar="TRAINER",
                   help="trainer class whose loader and step are measured (default nnUNetTrainer)")
    p.add_argument("-f", "--fold", type=int, default=0, help="fold whose training split is loaded (default 0)")
    p.add_argument("--procs", nargs="+", type=int, default=None, metavar="N",
                   help="nnUNet_n_proc_DA values to measure (default: 0 1 2 4 8, those up to the CPU count)")
    p.add_argument("--batches", type=int, default=10, metavar="N",
                   help="timed batches per value after the augmenter's buffer is drained (default 10)")
    p.add_argument("--steps", type=int, default=3, metavar="N",
                   help="timed training steps after one warm-up step (default 3)")
    p.add_argument("--max-seconds", type=float, default=120.0, metavar="S",
                   help="time budget for everything (default 120); each measurement stops early when its share is "
                        "spent")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device of the training step (default: cuda if available, else cpu)")
    p.add_argument("--headroom", type=float, default=None, metavar="X",
                   help="a value keeps up if its batches/s >= X times the steps/s (default 1.25)")
    p.add_argument("-o", "--output", default=None, metavar="FOLDER",
                   help="folder for loader.json / loader.md (default: the trainer's fold folder)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def default_procs() -> list[int]:
    cpus = os.cpu_count() or 1
    return [n for n in (0, 1, 2, 4, 8, 12, 16, 24, 32) if n <= cpus] or [0]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT

    procs = args.procs if args.procs is not None else default_procs()
    if any(n < 0 for n in procs):
        return fail(f"--procs values must be >= 0, got {procs}")
    if args.batches < 1 or args.steps < 1:
        return fail("--batches and --steps must be >= 1")
    if not args.max_seconds > 0:
        return fail("--max-seconds must be positive")
    if args.headroom is not None and not args.headroom > 0:
        return fail("--headroom must be positive")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from nnunet_green.training.loader import DEFAULT_HEADROOM, run, write_report

    tr = None
    try:
        report, tr = run(args.d, args.c, args.p, args.tr, procs, args.batches, args.steps, args.max_seconds,
                         args.device, args.fold, args.headroom or DEFAULT_HEADROOM, progress=not args.quiet)
        out = Path(args.output) if args.output else Path(tr.output_folder)
        json_path, md_path = write_report(report, out)
    except GreenError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted; nothing was written")
    finally:
        if tr is not None:
            _remove_trainer_log(tr, keep_folder=args.output is None)

    for row in report.rows:
        print(f"  nnUNet_n_proc_DA={row['n_proc_DA']:<3} {row['batches_per_s']:8.2f} batches/s"
              + ("" if row["steady_state"] else "  (not steady: budget spent while draining)"))
    print(f"  training step: {report.step['seconds_median']:.3f} s ({report.step['steps_per_s']:.2f} steps/s, "
          f"{report.step['device']})")
    print(report.verdict)
    print(f"recommended: nnUNet_n_proc_DA={report.recommended_n_proc_DA}")
    print(f"wrote {json_path} and {md_path.name}")
    return EXIT_OK


def _remove_trainer_log(trainer, keep_folder: bool) -> None:
    """nnU-Net's trainer writes a training_log_*.txt (its banner) into the fold folder when it is constructed; no
    training happened, so remove it, and the folders it created if the report went elsewhere."""
    log = Path(getattr(trainer, "log_file", "") or "")
    if log.is_file():
        log.unlink()
    if not keep_folder:
        for folder in getattr(trainer, "nnunet_green_new_folders", []):
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break


if __name__ == "__main__":
    sys.exit(main())
