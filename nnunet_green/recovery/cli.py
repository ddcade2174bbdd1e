"""`nnunet-green-distill`: label-free accuracy recovery of a Tucker-compressed nnU-Net model folder.

The compressed network (student) learns to reproduce the dense network's logits (teacher) on patches sampled from
unlabelled images, preprocessed exactly as nnUNetv2_predict preprocesses them. The compressed folder's checkpoint is
replaced (atomically) and the run is recorded in its compression.json under "recovery"."""
from __future__ import annotations

import argparse
import json
import sys

from nnunet_green.contract import EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_OK, GreenError
from nnunet_green.recovery.settings import LOSSES, DistillSettings

PROG = "nnunet-green-distill"

EXAMPLES = f"""\
examples:
  nnunet-green-compress -i DENSE_FOLDER -o COMPRESSED_FOLDER --rank-ratio 0.12
  nnunet-green-distill COMPRESSED_FOLDER --images imagesTs --steps 500 --device cuda
  # dense folder moved since compression:
  nnunet-green-distill COMPRESSED_FOLDER --images scans/ --teacher /models/DENSE_FOLDER

Images use nnU-Net's naming (CASE_0000.nii.gz, one file per channel, channels as in the model's dataset.json).

{EXIT_CODES_HELP}
"""

# printed after a run: the figures a user looks at first (the whole record is in compression.json)
SUMMARY_KEYS = ("images", "steps_done", "nonfinite_steps", "kept_step", "heldout_rel_error_before",
                "heldout_rel_error_after", "heldout_agreement_before", "heldout_agreement_after", "seconds_total",
                "device")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    d = DistillSettings()  # the one place the defaults are declared
    p = _Parser(prog=PROG, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="COMPRESSED_FOLDER", help="model folder written by nnunet-green-compress")
    p.add_argument("--images", required=True, metavar="DIR", help="unlabelled images (CASE_0000.nii.gz, ...)")
    p.add_argument("--teacher", default=None, metavar="MODEL_FOLDER",
                   help="dense model folder (default: source.path recorded in compression.json)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to distil (default: all compressed folds)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s = p.add_argument_group("settings (nnunet_green.recovery.DistillSettings)")
    s.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per fold (default %(default)s)")
    s.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate, poly-decayed to 0 (default %(default)s)")
    s.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help="patches per step (default %(default)s)")
    s.add_argument("--patches-per-image", type=int, default=d.patches_per_image,
                   help="patches drawn from an image before moving to the next (default %(default)s)")
    s.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="mse on logits or temperature-scaled kl on softmax (default %(default)s)")
    s.add_argument("--temperature", type=float, default=d.temperature,
                   help="temperature of --loss kl (default %(default)s)")
    s.add_argument("--feature-weight", type=float, default=d.feature_weight,
                   help="also match the output of every encoder and decoder stage, each as a relative squared "
                        "error; 1 weighs their mean like the logits' (default %(default)s: logits only)")
    s.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction,
                   help="fraction of the images (at least one, if there are two or more) kept out of training to "
                        "measure the error before/after (default %(default)s)")
    s.add_argument("--heldout-patches", type=int, default=d.heldout_patches,
                   help="held-out patches evaluated (default %(default)s)")
    s.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="check the held-out patches every N steps and keep the best weights, the starting ones "
                        "included (default: 5 checks per run)")
    s.add_argument("--max-cache-mb", type=float, default=d.max_cache_mb,
                   help="memory for preprocessed images; images beyond it are re-preprocessed on each visit "
                        "(default %(default)s)")
    s.add_argument("--max-minutes", type=float, default=d.max_minutes, help="stop training after this long (per fold)")
    s.add_argument("--patch-size", type=int, nargs="+", default=d.patch_size, metavar="N",
                   help="training patch size (default: the plans' patch size); smaller patches bound memory and "
                        "time per step; each size a multiple of the network's total stride")
    s.add_argument("--seed", type=int, default=d.seed)
    return p


def settings_from_args(args: argparse.Namespace) -> DistillSettings:
    return DistillSettings().replace(**{name: getattr(args, name) for name in DistillSettings.field_names()
                                        if hasattr(args, name)})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args).check()  # before the heavy imports: a bad value fails at once
        from nnunet_green.recovery.distill import distill_model_folder

        rec = distill_model_folder(args.folder, args.images, settings, teacher=args.teacher, device=args.device,
                                   folds=args.folds, progress=not args.quiet)
    except GreenError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({k: rec.get(k) for k in SUMMARY_KEYS}, indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
