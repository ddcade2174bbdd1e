"""`nnunet-green-distill`: label-free accuracy recovery of a Tucker-compressed nnU-Net model folder.

The compressed network (student) learns to reproduce the dense network's logits (teacher) on patches sampled from
unlabelled images, preprocessed exactly as nnUNetv2_predict preprocesses them. The compressed folder's checkpoint is
replaced (atomically) and the run is recorded in its compression.json under "recovery"."""
from __future__ import annotations

import argparse
import json
import sys

PROG = "nnunet-green-distill"

EXAMPLES = """\
examples:
  nnunet-green-compress -i DENSE_FOLDER -o COMPRESSED_FOLDER --rank-ratio 0.12
  nnunet-green-distill COMPRESSED_FOLDER --images imagesTs --steps 500 --device cuda
  # dense folder moved since compression:
  nnunet-green-distill COMPRESSED_FOLDER --images scans/ --teacher /models/DENSE_FOLDER

Images use nnU-Net's naming (CASE_0000.nii.gz, one file per channel, channels as in the model's dataset.json).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="COMPRESSED_FOLDER", help="model folder written by nnunet-green-compress")
    p.add_argument("--images", required=True, metavar="DIR", help="unlabelled images (CASE_0000.nii.gz, ...)")
    p.add_argument("--teacher", default=None, metavar="MODEL_FOLDER",
                   help="dense model folder (default: source.path recorded in compression.json)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per fold (default 200)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, poly-decayed to 0 (default 1e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per step (default 2)")
    p.add_argument("--patches-per-image", type=int, default=4,
                   help="patches drawn from an image before moving to the next (default 4)")
    p.add_argument("--loss", choices=("mse", "kl"), default="mse",
                   help="mse on logits (default) or temperature-scaled KL on softmax")
    p.add_argument("--temperature", type=float, default=2.0, help="temperature of --loss kl (default 2)")
    p.add_argument("--heldout-fraction", type=float, default=0.2,
                   help="fraction of the images (at least one, if there are two or more) kept out of training to "
                        "measure the error before/after (default 0.2)")
    p.add_argument("--heldout-patches", type=int, default=8, help="held-out patches evaluated (default 8)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="check the held-out patches every N steps and keep the best weights, the starting ones "
                        "included (default: 5 checks per run)")
    p.add_argument("--max-cache-mb", type=float, default=2048,
                   help="memory for preprocessed images; images beyond it are re-preprocessed on each visit "
                        "(default 2048)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this long (per fold)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None, metavar="N",
                   help="training patch size (default: the plans' patch size); smaller patches bound memory and "
                        "time per step; each size a multiple of the network's total stride")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to distil (default: all compressed folds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch  # noqa: F401  (heavy import after argument parsing: --help stays fast)

        from nnunet_green.compression.distill import DistillError, distill_model_folder
    except ImportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    try:
        rec = distill_model_folder(
            args.folder, args.images, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
            patches_per_image=args.patches_per_image, device=args.device, folds=args.folds, teacher=args.teacher,
            seed=args.seed, progress=not args.quiet, weight_decay=args.weight_decay, loss=args.loss,
            temperature=args.temperature, heldout_fraction=args.heldout_fraction,
            heldout_patches=args.heldout_patches, max_cache_mb=args.max_cache_mb, max_minutes=args.max_minutes,
            patch_size=args.patch_size, eval_every=args.eval_every)
    except DistillError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    keys = ("images", "steps_done", "kept_step", "heldout_rel_error_before", "heldout_rel_error_after",
            "heldout_agreement_before", "heldout_agreement_after", "seconds_total", "device")
    print(json.dumps({k: rec.get(k) for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
