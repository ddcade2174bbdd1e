"""`nnunet-green-bench`: compare nnU-Net model folders (e.g. dense vs Tucker-compressed): parameters, MACs, forward
latency (interleaved across models), and optionally stock-predictor wall time and Dice on real images."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from nnunet_green.contract import BENCH_FILE, DEFAULT_CHECKPOINT, EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_OK, GreenError

PROG = "nnunet-green-bench"

EXAMPLES = f"""\
examples:
  # dense vs compressed: params, MACs and forward latency at the plans' patch size
  nnunet-green-bench dense/nnUNetTrainer__nnUNetPlans__3d_fullres compressed/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      -o bench_out --repeats 5
  # also predict held-out images with the stock predictor and score them
  nnunet-green-bench DENSE COMPRESSED -o bench_out --images imagesTs --labels labelsTs -f 0

The first model is the reference: agreement Dice is each model's predictions against the first model's.

{EXIT_CODES_HELP}
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL_FOLDER", help="nnU-Net model folders; the first is the reference")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="writes bench.json, bench.md, predictions/")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--patch", nargs=3, type=int, metavar=("Z", "Y", "X"), default=None,
                   help="input size for MACs and latency (default: each model's plans patch size)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per model (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per model first")
    p.add_argument("--images", default=None, help="folder of images (nnU-Net naming, CASE_0000.nii.gz) to predict")
    p.add_argument("--labels", default=None, help="folder of reference labels (CASE.nii.gz) for Dice")
    p.add_argument("-f", "--fold", default=None, help="fold to use (default: first fold present)")
    p.add_argument("-chk", "--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("-npp", type=int, default=1, help="preprocessing workers of the predictor")
    p.add_argument("-nps", type=int, default=1, help="export workers of the predictor")
    p.add_argument("--disable-tta", action="store_true",
                   help="predict without mirroring test-time augmentation (nnU-Net's --disable_tta; 8x fewer forwards "
                        "in 3D)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation noise from imports
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from nnunet_green.evaluation.bench import bench, markdown

    try:
        result = bench(args.models, args.output, device=args.device, patch=args.patch, repeats=args.repeats,
                       warmup=args.warmup, images=args.images, labels=args.labels, fold=args.fold,
                       checkpoint=args.checkpoint, npp=args.npp, nps=args.nps, disable_tta=args.disable_tta)
    except GreenError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(markdown(result), end="")
    print(f"wrote {Path(args.output) / BENCH_FILE}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
