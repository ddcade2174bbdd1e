"""`nnunet-green-plan`: write `nnUNetPlansGreenLight.json` (a narrower U-Net, same patch and batch) with nnU-Net's
own planning API. nnU-Net 2.8's `-pl` only finds planners inside its own package, hence this thin CLI."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

from nnunet_green.contract import (DATASET_FILE, EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_FAILED, EXIT_OK,
                                   FINGERPRINT_FILE, LIGHT_PLANNER, LIGHT_PLANS, GreenError)

PROG = "nnunet-green-plan"
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")  # nnU-Net's planned configurations

EXAMPLES = f"""\
examples:
  nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres    # fingerprint + nnUNetPlans (or nnUNetv2_extract_fingerprint)
  {PROG} -d 4 -c 3d_fullres              # -> $nnUNet_preprocessed/Dataset004_*/nnUNetPlansGreenLight.json
  nnUNetv2_preprocess -d 4 -plans_name nnUNetPlansGreenLight -c 3d_fullres    # only if the data is not shared
  nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainerGreenFP32 -p nnUNetPlansGreenLight
  nnUNetv2_predict -i imagesTs -o pred -d 4 -c 3d_fullres -f 0 -tr nnUNetTrainerGreenFP32 -p nnUNetPlansGreenLight

The light plans keep nnU-Net's default patch size, batch size, spacing and topology and narrow the U-Net (16 base
features instead of 32, cap 256 instead of 320). Where nnUNetPlans.json exists and a configuration's preprocessing
is identical, the light plans point at its preprocessed data (no second copy, no second preprocessing; re-running
nnUNetv2_preprocess would delete and rewrite that folder). The output says which applies. Numbers:
docs/light_plans.md.

{EXIT_CODES_HELP}
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=f"Plan a lighter nnU-Net (planner {LIGHT_PLANNER}, plans "
                f"{LIGHT_PLANS}) for datasets whose fingerprint exists.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", nargs="+", required=True, metavar="DATASET",
                   help="dataset id(s) or name(s) (DatasetXXX_Name), as for nnUNetv2_plan_experiment")
    p.add_argument("-c", nargs="+", default=None, choices=CONFIGURATIONS, metavar="CONFIGURATION",
                   help=f"configurations to write ({', '.join(CONFIGURATIONS)}; default: every one nnU-Net plans "
                        "for the dataset)")
    p.add_argument("-gpu_memory_target", "--gpu-memory-target", type=float, default=None, metavar="GB",
                   help="GPU memory target in GB of nnU-Net's patch/batch planning (default: nnU-Net's, 8); the "
                        "patch and batch are planned as for the default U-Net, so this means the same as in "
                        "nnUNetv2_plan_experiment")
    p.add_argument("-overwrite_plans_name", "--overwrite-plans-name", default=None, metavar="NAME",
                   help=f"plans identifier to write instead of {LIGHT_PLANS}")
    p.add_argument("-overwrite_target_spacing", "--overwrite-target-spacing", nargs=3, type=float, default=None,
                   metavar="MM", help="3d_fullres target spacing, as nnU-Net's option of that name")
    p.add_argument("-preprocessor_name", "--preprocessor-name", default="DefaultPreprocessor",
                   help="preprocessor class recorded in the plans (default DefaultPreprocessor)")
    p.add_argument("--own-data", action="store_true",
                   help="never share nnUNetPlans' preprocessed data: every configuration gets its own "
                        "data identifier (nnUNetPlansGreenLight_<configuration>) and needs nnUNetv2_preprocess")
    p.add_argument("--time", action="store_true",
                   help="also time one training step (forward, backward, SGD step; random batch at the plans' "
                        "batch and patch size) of the light and the default network on this machine's CPU")
    p.add_argument("--time-repeats", type=int, default=3, metavar="N", help="timed steps per network (default 3)")
    p.add_argument("-v", "--verbose", action="store_true", help="show nnU-Net's own planning printout")
    return p


def _check_environment(dataset: str) -> tuple[str, Path]:
    """The dataset's name and preprocessed folder, or a GreenError saying what is missing."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(var):
            raise GreenError(f"{var} is not set (nnU-Net's data folders; see nnU-Net's setting_up_paths.md)")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(int(dataset) if dataset.isdigit() else dataset)
    except (RuntimeError, ValueError, AssertionError):
        raise GreenError(f"dataset {dataset!r} not found in nnUNet_raw ({os.environ['nnUNet_raw']}) or "
                         f"nnUNet_preprocessed ({os.environ['nnUNet_preprocessed']})") from None
    raw = Path(os.environ["nnUNet_raw"]) / name
    if not (raw / DATASET_FILE).is_file():
        raise GreenError(f"{raw / DATASET_FILE} not found: the planner reads the raw dataset description")
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    if not (pre / FINGERPRINT_FILE).is_file():
        ident = name.split("_")[0][len("Dataset"):].lstrip("0") or "0"
        raise GreenError(f"no dataset fingerprint for {name} ({pre / FINGERPRINT_FILE} is missing): run "
                         f"`nnUNetv2_extract_fingerprint -d {ident}` (or nnUNetv2_plan_and_preprocess) first")
    return name, pre


def plan_dataset(dataset: str, configurations=None, gpu_memory_target=None, plans_name=None,
                 target_spacing=None, preprocessor_name="DefaultPreprocessor", verbose=False, share_data=True):
    """Run nnU-Net's planning with nnUNetPlannerGreenLight; returns (planner, plans dict, preprocessed folder)."""
    from nnunet_green.training.light_plans import nnUNetPlannerGreenLight

    name, pre = _check_environment(dataset)
    kwargs = {"preprocessor_name": preprocessor_name}
    if gpu_memory_target is not None:
        kwargs["gpu_memory_target_in_gb"] = gpu_memory_target
    if plans_name is not None:
        kwargs["plans_name"] = plans_name
    if target_spacing is not None:
        kwargs["overwrite_target_spacing"] = [float(s) for s in target_spacing]
    out = io.StringIO()
    with contextlib.redirect_stdout(sys.stdout if verbose else out):
        # what nnunetv2.experiment_planning.plan_and_preprocess_api.plan_experiment_dataset does, with the
        # configuration filter set on the planner before plan_experiment() writes the file
        planner = nnUNetPlannerGreenLight(name, suppress_transpose=False, **kwargs)
        if configurations:
            planner.keep_configurations = tuple(configurations)
        planner.share_data = share_data
        plans = planner.plan_experiment()
    return planner, plans, pre


def _summary(planner, plans: dict, pre: Path, requested, time_steps: bool, repeats: int) -> list[str]:
    from nnunet_green.contract import read_json
    from nnunet_green.training.light_plans import network_cost, time_train_step

    lines = [f"{plans['dataset_name']}: wrote {pre / (planner.plans_identifier + '.json')}"]
    missing = sorted(set(requested or ()) - set(plans["configurations"]))
    if missing:
        lines.append(f"  note: nnU-Net plans no {', '.join(missing)} for this dataset (skipped)")
    dataset_json = read_json(pre / DATASET_FILE, "dataset description")
    reference = planner.reference_plans()
    for conf_name, conf in plans["configurations"].items():
        if "architecture" not in conf:  # 3d_cascade_fullres inherits from 3d_fullres
            continue
        light = network_cost(plans, conf_name, dataset_json)
        line = (f"  {conf_name}: patch {light['patch_size']}, batch {light['batch_size']}, features "
                f"{light['features_per_stage']}; {light['params'] / 1e6:.2f} M params, "
                f"{light['macs_per_patch'] / 1e9:.2f} G multiply-adds per patch")
        if reference is not None and conf_name in reference.get("configurations", {}):
            ref = network_cost(reference, conf_name, dataset_json)
            line += (f" ({light['params'] / ref['params']:.0%} / {light['macs_per_patch'] / ref['macs_per_patch']:.0%}"
                     f" of nnUNetPlans: {ref['params'] / 1e6:.2f} M, {ref['macs_per_patch'] / 1e9:.2f} G)")
            if time_steps:
                lt = time_train_step(plans, conf_name, dataset_json, repeats)
                rt = time_train_step(reference, conf_name, dataset_json, repeats)
                line += (f"\n    CPU training step (batch {light['batch_size']}, median of {repeats}): light "
                         f"{lt['step_s_median']:.2f} s, nnUNetPlans {rt['step_s_median']:.2f} s "
                         f"({rt['step_s_median'] / lt['step_s_median']:.1f}x faster)")
        elif time_steps:
            lt = time_train_step(plans, conf_name, dataset_json, repeats)
            line += f"\n    CPU training step: {lt['step_s_median']:.2f} s (no nnUNetPlans to compare)"
        data = planner.data_reuse.get(conf_name)
        if data and (pre / data).is_dir():
            line += (f"\n    data: reuses {data} (preprocessing identical to nnUNetPlans; already there, so no "
                     f"nnUNetv2_preprocess needed; running it would delete and rewrite that folder)")
        elif data:
            line += (f"\n    data: reuses {data} (preprocessing identical to nnUNetPlans; not there yet: run "
                     f"nnUNetv2_preprocess with either plans)")
        else:
            line += (f"\n    data: {conf['data_identifier']} (run nnUNetv2_preprocess -plans_name "
                     f"{planner.plans_identifier})")
        lines.append(line)
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.time_repeats < 1:
        print(f"{PROG}: error: --time-repeats must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.gpu_memory_target is not None and not args.gpu_memory_target > 0:
        print(f"{PROG}: error: -gpu_memory_target must be a positive number of GB", file=sys.stderr)
        return EXIT_BAD_INPUT
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for dataset in args.d:
        try:
            planner, plans, pre = plan_dataset(dataset, args.c, args.gpu_memory_target, args.overwrite_plans_name,
                                               args.overwrite_target_spacing, args.preprocessor_name, args.verbose,
                                               share_data=not args.own_data)
            print("\n".join(_summary(planner, plans, pre, args.c, args.time, args.time_repeats)))
        except GreenError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
