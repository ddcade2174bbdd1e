"""`nnunet-green-compress`: Tucker-compress a trained nnU-Net model folder (or a TotalSegmentator weights root).

Thin: argparse -> TuckerConfig + compress() keyword arguments -> `model_folder.compress`. Options left out are
not passed, so every default lives in one place (TuckerConfig, compress(), distill_model_folder()); every
GreenError is one line on stderr and exit status EXIT_BAD_INPUT.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings

from nnunet_green.contract import (DEFAULT_CALIBRATION_PATCHES, DEFAULT_LAYER_TIMING_SECONDS, DEFAULT_MIN_RANK,
                                   DEFAULT_RANK_RATIO, DEFAULT_ROUND_TO, DEFAULT_SPEED_MARGIN, DEFAULT_SPEED_RULE,
                                   EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK, SPEED_RULE_MEASURED,
                                   SPEED_RULES, GreenError)
from nnunet_green.recovery.settings import DistillSettings

PROG = "nnunet-green-compress"

EXAMPLES = f"""\
examples:
  # one model folder -> a new, ordinary nnU-Net model folder
  nnunet-green-compress -i $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      -o compressed/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres --rank-ratio 0.12
  nnUNetv2_predict_from_modelfolder -i imagesTs -o pred -m compressed/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres -f 0

  # per-layer ranks from a global budget (12 % of the factorizable layers' multiply-adds), then label-free
  # distillation against the dense model on unlabelled scans, before the folder is published
  nnunet-green-compress -i DENSE_FOLDER -o COMPRESSED_FOLDER --rank-budget 0.12 --budget-cost macs \\
      --distill unlabelled_scans/ --distill-steps 500 --device cuda

  # data-aware: factors (and, with --rank-budget, ranks) chosen on 16 patches of unlabelled images
  nnunet-green-compress -i DENSE_FOLDER -o COMPRESSED_FOLDER --rank-ratio 0.12 --calibrate unlabelled_scans/

  # a whole TotalSegmentator weights root (every DatasetXXX_*/<trainer>__<plans>__<config>/ below it)
  nnunet-green-compress -i ~/.totalsegmentator/nnunet/results -o ts_weights_012 --rank-ratio 0.12
  TOTALSEG_WEIGHTS_PATH=$PWD/ts_weights_012 TotalSegmentator -i ct.nii.gz -o seg --fast

The output is written beside OUT and renamed into place only when every checkpoint was written and re-loaded the
way nnU-Net's predictor loads it; the input is never modified. A run killed midway leaves no OUT; the hidden
temporary folder it leaves beside OUT is removed by the next run.

{EXIT_CODES_HELP}
"""

# option dest -> TuckerConfig field (the rank rule); the other options are compress() keyword arguments
CONFIG_FIELDS = {"rank_ratio": "rank_ratio", "rank_budget": "budget", "budget_cost": "budget_cost",
                 "min_rank": "min_rank", "round_to": "round_to", "speed_rule": "speed_rule"}
DISTILL_OPTIONS = {"distill_steps": "steps", "distill_lr": "lr", "distill_minutes": "max_minutes"}
_FLAG_OF_FIELD = {"budget_cost": "--budget-cost", "rank_ratio": "--rank-ratio", "budget": "--rank-budget",
                  "min_rank": "--min-rank", "round_to": "--round-to", "speed_rule": "--speed-rule"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    unset = argparse.SUPPRESS  # absent from the namespace unless given
    p = _Parser(prog=PROG, description="Tucker-2 compress the convolutions of a trained nnU-Net model and write a "
                "model folder that stock nnU-Net (nnUNetv2_predict*, TotalSegmentator) loads as is.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=unset)
    p.add_argument("-i", "--input", required=True, metavar="MODEL_FOLDER",
                   help="trained model folder (<trainer>__<plans>__<configuration>, with plans.json, dataset.json, "
                        "fold_X/) or a weights root containing DatasetXXX_*/<model folder>/")
    p.add_argument("-o", "--output", required=True, metavar="OUT_FOLDER", help="folder to create")
    ranks = p.add_argument_group("ranks (one rule)")
    ranks.add_argument("--rank-ratio", type=float,
                       help="uniform rule: fraction of each convolution's parameters to keep, in (0, 1] "
                            f"(default {DEFAULT_RANK_RATIO})")
    ranks.add_argument("--rank-budget", type=float, metavar="FRACTION",
                       help="budgeted rule: per-layer ranks such that the factorizable convolutions keep this "
                            "fraction of their dense cost in total, spent where the weights' singular values say it "
                            "matters most (docs/recovery.md)")
    ranks.add_argument("--budget-cost", choices=("params", "macs"),
                       help="what --rank-budget counts: parameters, or multiply-adds at the plans' patch size "
                            "(default params)")
    ranks.add_argument("--min-rank", type=int,
                       help=f"smallest Tucker rank per mode (default {DEFAULT_MIN_RANK})")
    ranks.add_argument("--round-to", type=int,
                       help=f"round ranks to a multiple of this (default {DEFAULT_ROUND_TO}, suits GPU kernels)")
    ranks.add_argument("--speed-rule", choices=SPEED_RULES,
                       help=f"which layers pay off in speed: 'macs' factorizes every layer the rank rule saves "
                            f"multiply-adds on; '{SPEED_RULE_MEASURED}' also times each such layer dense vs "
                            f"factorized on this machine (its input shape at the plans' patch size, torch's "
                            f"threads; at most {DEFAULT_LAYER_TIMING_SECONDS:g} s in total) and leaves it dense "
                            f"unless factorizing is at least {DEFAULT_SPEED_MARGIN * 100:g}%% faster (default "
                            f"{DEFAULT_SPEED_RULE}; docs/compression.md, 'Per-layer speed rule')")
    cal = p.add_argument_group("data-aware decomposition (docs/compression.md#data-aware-decomposition)")
    cal.add_argument("--calibrate", metavar="IMAGES_DIR",
                     help="unlabelled images (CASE_0000.nii.gz, ...): the dense network runs once over patches of "
                          "them and each layer's factors minimise the error of its outputs on them (after the "
                          "following InstanceNorm) instead of its weights; with --rank-budget the ranks are chosen "
                          "by that error too. Default with --distill: the distillation images")
    cal.add_argument("--calibration-patches", type=int, metavar="N",
                     help=f"patches (plans' patch size, one per image in turn) for --calibrate "
                          f"(default {DEFAULT_CALIBRATION_PATCHES})")
    cal.add_argument("--calibration-sequential", action="store_true",
                     help="then refit each layer, in the order the network runs them, on the inputs the already "
                          "compressed layers give it, so errors do not add up through the network (costs about "
                          "one forward of both networks per patch and layer; docs/compression.md)")
    cal.add_argument("--weight-only", action="store_true",
                     help="decompose the weights alone even with --distill (the behaviour without images)")
    rec = p.add_argument_group("label-free recovery (optional; see nnunet-green-distill for all settings)")
    rec.add_argument("--distill", metavar="IMAGES_DIR",
                     help="after factorizing, train the compressed network to reproduce the dense network's logits "
                          "on these unlabelled images (CASE_0000.nii.gz, ...) before the folder is published")
    rec.add_argument("--distill-steps", type=int,
                     help=f"distillation steps per fold (default {DistillSettings.steps})")
    rec.add_argument("--distill-lr", type=float, help=f"distillation AdamW lr (default {DistillSettings.lr:g})")
    rec.add_argument("--distill-minutes", type=float, help="stop distillation after this long (per fold)")
    rec.add_argument("--device", choices=("cpu", "cuda"), help="device for --distill (default cpu)")
    p.add_argument("-f", "--folds", nargs="+", help="folds to compress (default: all present)")
    p.add_argument("-chk", "--checkpoint", help="checkpoint file name in fold_X/ (default checkpoint_final.pth)")
    p.add_argument("-c", "--configuration",
                   help="configuration (default: from the checkpoint, as nnU-Net's predictor does)")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the file size)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_FOLDER if it exists")
    p.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                   help="do not store the fast CPU inference artefact (ONNX Runtime graph) in the checkpoints; "
                        "nnunet-green-fastpath FOLDER adds it later (docs/compression.md, 'Fast CPU inference')")
    p.add_argument("--no-speed-check", dest="speed_check", action="store_false",
                   help="skip timing dense vs compressed at the plans' patch size (up to a minute per model)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", default=False, help="no progress bars")
    return p


def _user_message(e: Exception) -> str:
    """A settings error names the dataclass field; the user typed the option."""
    msg = str(e)
    for name, flag in _FLAG_OF_FIELD.items():
        msg = re.sub(rf"\b{name}\b", flag, msg)
    return msg


def settings_from_args(args: argparse.Namespace):
    """(TuckerConfig, compress() keyword arguments) from parsed options; GreenError for inconsistent ones."""
    from nnunet_green.compression import TuckerConfig

    given = vars(args)
    if "rank_ratio" in given and "rank_budget" in given:
        raise GreenError("give either --rank-ratio (uniform) or --rank-budget (budgeted), not both")
    distill_given = [opt for opt in DISTILL_OPTIONS if opt in given]
    if "distill" not in given and (distill_given or "device" in given):
        opt = (distill_given or ["device"])[0]
        raise GreenError(f"--{opt.replace('_', '-')} needs --distill IMAGES_DIR")
    if "calibrate" in given and given.get("weight_only"):
        raise GreenError("give either --calibrate or --weight-only, not both")
    if "calibration_patches" in given and ("calibrate" not in given and "distill" not in given
                                           or given.get("weight_only")):
        raise GreenError("--calibration-patches needs --calibrate IMAGES_DIR (or --distill IMAGES_DIR)")
    if "calibration_sequential" in given and ("calibrate" not in given and "distill" not in given
                                              or given.get("weight_only")):
        raise GreenError("--calibration-sequential needs --calibrate IMAGES_DIR (or --distill IMAGES_DIR)")
    try:
        config = TuckerConfig(**{field: given[opt] for opt, field in CONFIG_FIELDS.items() if opt in given})
    except (TypeError, ValueError) as e:
        raise GreenError(_user_message(e)) from None
    kwargs = {k: given[k] for k in ("folds", "checkpoint", "configuration", "half", "overwrite", "verify",
                                    "fast_path", "speed_check") if k in given}
    kwargs["progress"] = not args.quiet
    if given.get("weight_only"):
        kwargs["calibrate"] = False
    elif {"calibrate", "calibration_patches", "calibration_sequential"} & set(given):  # --distill alone: its images
        kwargs["calibrate"] = {"images": given.get("calibrate", given.get("distill")),
                               **({"patches": given["calibration_patches"]} if "calibration_patches" in given else {}),
                               **({"sequential": True} if "calibration_sequential" in given else {})}
    if "distill" in given:
        kwargs["distill"] = {"images": given["distill"], "progress": not args.quiet,
                             **({"device": given["device"]} if "device" in given else {}),
                             **{DISTILL_OPTIONS[opt]: given[opt] for opt in distill_given}}
    return config, kwargs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation noise from imports
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        config, kwargs = settings_from_args(args)
        from nnunet_green.compression.model_folder import compress

        result = compress(args.input, args.output, config, **kwargs)
    except GreenError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_FAILED

    for m in result if isinstance(result, list) else [result]:
        t = m["totals"]
        print(f"{m['source']['path']}: params {t['params_before']:,} -> {t['params_after']:,} "
              f"({t['params_after'] / t['params_before']:.1%}), MACs {t['macs_before']:,} -> {t['macs_after']:,} "
              f"({t['macs_after'] / t['macs_before']:.1%}) at patch {m['patch_size']}, folds {m['folds']}, "
              f"{t['decomposition_s']:.1f} s")
        timing = m.get("layer_timing")
        if timing:
            print(f"  speed rule {timing['rule']}: {timing['timed']} layers timed in {timing['seconds']:.1f} s "
                  f"({timing['threads']} threads), {len(timing['kept_dense'])} kept dense (factorizing not faster "
                  f"here, {timing['params_kept_dense']:,} parameters more)"
                  + (f", {len(timing['untimed'])} untimed (multiply-add rule)" if timing["untimed"] else ""))
            if timing.get("warning"):
                print(f"{PROG}: warning: {timing['warning']}", file=sys.stderr)
        cal = m.get("calibration")
        if cal:
            print(f"  data-aware decomposition: {cal['patches']} calibration patches of {cal['images']} images"
                  + (", layers refitted sequentially" if cal.get("sequential") else ""))
        else:
            print("  weight-only decomposition (no calibration images)")
        fast = m.get("fast_path")
        if fast:
            measured = fast.get("measured")
            print(f"  fast CPU path: {fast['status']}" + (f" ({fast['reason']})" if fast.get("reason") else "") +
                  (f"; measured {measured['speedup']:.2f}x faster than dense at input {measured['input_shape']}, "
                   f"{measured['threads']} threads" if measured else ""))
            if fast.get("warning"):
                print(f"{PROG}: warning: {fast['warning']}", file=sys.stderr)
        rec = m.get("recovery")
        if rec:
            print(f"  distilled {rec['steps_done']} steps on {rec['images']} images in {rec['seconds_total']:.0f} s: "
                  f"held-out relative logit error {_num(rec['heldout_rel_error_before'])} -> "
                  f"{_num(rec['heldout_rel_error_after'])}")
    print(f"wrote {args.output}")
    return EXIT_OK


def _num(v) -> str:
    if isinstance(v, dict):  # several folds
        return "/".join(f"{x:.3f}" for x in v.values())
    return f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
