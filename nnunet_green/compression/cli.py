"""`nnunet-green-compress`: Tucker-compress a trained nnU-Net model folder (or a TotalSegmentator weights root)."""
from __future__ import annotations

import argparse
import math
import sys
import warnings

PROG = "nnunet-green-compress"

EXAMPLES = """\
examples:
  # one model folder -> a new, ordinary nnU-Net model folder
  nnunet-green-compress -i $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      -o compressed/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres --rank-ratio 0.12
  nnUNetv2_predict_from_modelfolder -i imagesTs -o pred -m compressed/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres -f 0

  # per-layer ranks from a global budget (12 % of the factorizable layers' multiply-adds), then label-free
  # distillation against the dense model on unlabelled scans, before the folder is published
  nnunet-green-compress -i DENSE_FOLDER -o COMPRESSED_FOLDER --rank-budget 0.12 --budget-cost macs \
      --distill unlabelled_scans/ --distill-steps 500 --device cuda

  # a whole TotalSegmentator weights root (every DatasetXXX_*/<trainer>__<plans>__<config>/ below it)
  nnunet-green-compress -i ~/.totalsegmentator/nnunet/results -o ts_weights_012 --rank-ratio 0.12
  TOTALSEG_WEIGHTS_PATH=$PWD/ts_weights_012 TotalSegmentator -i ct.nii.gz -o seg --fast

The output is written beside OUT and renamed into place only when every checkpoint was written and re-loaded the
way nnU-Net's predictor loads it; the input is never modified.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Tucker-2 compress the convolutions of a trained nnU-Net model and write a "
                "model folder that stock nnU-Net (nnUNetv2_predict*, TotalSegmentator) loads as is.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, metavar="MODEL_FOLDER",
                   help="trained model folder (<trainer>__<plans>__<configuration>, with plans.json, dataset.json, "
                        "fold_X/) or a weights root containing DatasetXXX_*/<model folder>/")
    p.add_argument("-o", "--output", required=True, metavar="OUT_FOLDER", help="folder to create")
    ranks = p.add_argument_group("ranks (one rule)")
    ranks.add_argument("--rank-ratio", type=float, default=None,
                       help="uniform rule: fraction of each convolution's parameters to keep, in (0, 1] "
                            "(default 0.12)")
    ranks.add_argument("--rank-budget", type=float, default=None, metavar="FRACTION",
                       help="budgeted rule: per-layer ranks such that the factorizable convolutions keep this "
                            "fraction of their dense cost in total, spent where the weights' singular values say it "
                            "matters most (docs/recovery.md)")
    ranks.add_argument("--budget-cost", choices=("params", "macs"), default="params",
                       help="what --rank-budget counts: parameters, or multiply-adds at the plans' patch size "
                            "(default params)")
    rec = p.add_argument_group("label-free recovery (optional; see nnunet-green-distill for all settings)")
    rec.add_argument("--distill", default=None, metavar="IMAGES_DIR",
                     help="after factorizing, train the compressed network to reproduce the dense network's logits "
                          "on these unlabelled images (CASE_0000.nii.gz, ...) before the folder is published")
    rec.add_argument("--distill-steps", type=int, default=None, help="distillation steps per fold (default 200)")
    rec.add_argument("--distill-lr", type=float, default=None, help="distillation AdamW lr (default 1e-4)")
    rec.add_argument("--distill-minutes", type=float, default=None, help="stop distillation after this long (per fold)")
    rec.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device for --distill (default cpu)")
    p.add_argument("--min-rank", type=int, default=None, help="smallest Tucker rank per mode (default: library's)")
    p.add_argument("--round-to", type=int, default=None,
                   help="round ranks up to a multiple of this (default: library's; 8 suits GPU kernels)")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to compress (default: all present)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in fold_X/")
    p.add_argument("-c", "--configuration", default=None,
                   help="configuration (default: from the checkpoint, as nnU-Net's predictor does)")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the file size)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_FOLDER if it exists")
    p.add_argument("--no-verify", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation noise from imports
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    def fail(msg: str) -> int:
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2

    if args.rank_ratio is not None and args.rank_budget is not None:
        return fail("give either --rank-ratio (uniform) or --rank-budget (budgeted), not both")
    r = 0.12 if args.rank_ratio is None else args.rank_ratio
    if not math.isfinite(r) or not 0 < r <= 1:
        return fail(f"--rank-ratio must be in (0, 1], got {r}")
    b = args.rank_budget
    if b is not None and (not math.isfinite(b) or not 0 < b < 1):
        return fail(f"--rank-budget must be a fraction in (0, 1), got {b}")
    given = [n for n in ("distill_steps", "distill_lr", "distill_minutes") if getattr(args, n) is not None]
    if args.distill is None and given:
        return fail(f"--{given[0].replace('_', '-')} needs --distill IMAGES_DIR")
    for name in ("min_rank", "round_to"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {v}")

    from nnunet_green.compression.model_folder import CompressionError, compress

    try:
        from nnunet_green.compression import TuckerConfig

        kw = {k: getattr(args, k) for k in ("min_rank", "round_to") if getattr(args, k) is not None}
        config = TuckerConfig(rank_ratio=r, budget=b, budget_cost=args.budget_cost, **kw)
    except (TypeError, ValueError) as e:
        return fail(str(e))
    distill = None if args.distill is None else dict(
        images=args.distill, steps=200 if args.distill_steps is None else args.distill_steps,
        lr=1e-4 if args.distill_lr is None else args.distill_lr, max_minutes=args.distill_minutes,
        device=args.device, progress=not args.quiet)
    try:
        result = compress(args.input, args.output, config, folds=args.folds, checkpoint=args.checkpoint,
                          configuration=args.configuration, half=args.half, overwrite=args.overwrite,
                          progress=not args.quiet, verify=not args.no_verify, distill=distill)
    except CompressionError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted; nothing was written")

    for m in result if isinstance(result, list) else [result]:
        t = m["totals"]
        print(f"{m['source']['path']}: params {t['params_before']:,} -> {t['params_after']:,} "
              f"({t['params_after'] / t['params_before']:.1%}), MACs {t['macs_before']:,} -> {t['macs_after']:,} "
              f"({t['macs_after'] / t['macs_before']:.1%}) at patch {m['patch_size']}, folds {m['folds']}, "
              f"{t['decomposition_s']:.1f} s")
        rec = m.get("recovery")
        if rec:
            print(f"  distilled {rec['steps_done']} steps on {rec['images']} images in {rec['seconds_total']:.0f} s: "
                  f"held-out relative logit error {_num(rec['heldout_rel_error_before'])} -> "
                  f"{_num(rec['heldout_rel_error_after'])}")
    print(f"wrote {args.output}")
    return 0


def _num(v) -> str:
    if isinstance(v, dict):  # several folds
        return "/".join(f"{x:.3f}" for x in v.values())
    return f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
