"""Data-aware (calibrated) vs weight-only Tucker-2 decomposition: zero-shot and distilled agreement, and the cost.

`sweep` (default): for each rank ratio, compress one dense model folder six ways with nnunet-green's own
functions - uniform ratio / budgeted ranks at the uniform model's parameter fraction / at its multiply-add fraction,
each weight-only and calibrated (`--calibrate` on at most --calibration-images unlabelled training images; with
--sequential also calibrated then refitted sequentially, `--calibration-sequential`) - and, for --distill-ratios,
distil every decomposition of --distill-ranks (uniform, budgeted) with the same budget; for --finetune-ratios
(needs --data or the model's nnU-Net folders), fine-tune the uniform ones with labels (nnUNetTrainerTuckerFinetune
through nnUNetv2_train). Every variant is predicted on held-out images by the
stock predictor and scored by nnunet-green-bench's functions (agreement Dice with the dense model, Dice vs labels).
Writes OUT/calibration.json and .md.

`cost`: calibration + decomposition of the whole TotalSegmentator 1.5 mm architecture (random weights, PlainConvUNet
as in its plans) at rank ratio 0.12 on N patches of 128^3 (random, CT-like intensities: the cost does not depend on
the values), timed by phase in a fresh process, with the peak resident memory. Writes OUT/calibration_cost.json.

  python benchmarks/calibration.py sweep --data ../shared/data/Task04_Hippocampus --work work/recovery_hippocampus \\
      --n-train 60 --n-test 20 --epochs 3 --iters 50 --ratios 0.05 0.12 0.25 0.5 --distill-ratios 0.12 -o bench_out
  python benchmarks/calibration.py cost --patches 8 --size 128 -o bench_out
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

from nnunet_green.recovery.settings import LOSSES, DistillSettings  # torch-free: --help stays fast

REPO = Path(__file__).resolve().parents[1]


def calibration_images(images: Path, out: Path, n: int) -> Path:
    """A folder of links to the first `n` cases of `images` (nnU-Net naming): the calibration set."""
    out.mkdir(parents=True, exist_ok=True)
    cases = sorted({p.name.rsplit("_", 1)[0] for p in images.glob("*_0000.nii.gz")})[:n]
    for case in cases:
        for f in images.glob(f"{case}_*.nii.gz"):
            link = out / f.name
            if not link.exists():
                link.symlink_to(f.absolute())
    return out


def sweep(args) -> int:
    from nnunet_green.compression import TuckerConfig
    from nnunet_green.compression.model_folder import compress_model_folder
    from nnunet_green.contract import MANIFEST_FILE
    from nnunet_green.evaluation.bench import bench
    from nnunet_green.evaluation.experiment import (equal_budget, finetune, nnunet_folders, train_msd_subset,
                                                    variant_rows, write_result)
    from nnunet_green.recovery import distill_model_folder

    if args.data is not None:
        work = args.work.absolute()
        dense, images, labels = train_msd_subset(args.data.absolute(), work, args.n_train, args.n_test, args.epochs,
                                                 args.iters, val_iters=2, fold=args.fold)
        train_images = work / "raw" / "Dataset004_Hippocampus" / "imagesTr"
        os.environ.update(nnunet_folders(work))
    else:
        if args.finetune_ratios and not os.environ.get("nnUNet_results"):
            sys.exit("--finetune-ratios needs --data, or nnUNet_raw/nnUNet_preprocessed/nnUNet_results of the "
                     "dense model's dataset")
        dense, images, labels, train_images = args.model, args.images, args.labels, args.train_images
    out = args.output.absolute()
    models = out / "calibration_models"
    models.mkdir(parents=True, exist_ok=True)
    cal_dir = calibration_images(Path(train_images), models / "calibration_images", args.calibration_images)
    calibrate = {"images": cal_dir, "patches": args.calibration_patches}
    # decompositions by tag: weight-only, calibrated, calibrated then refitted sequentially
    decompositions = {"w": False, "cal": calibrate, **({"seq": {**calibrate, "sequential": True}}
                                                        if args.sequential else {})}

    variants = []  # (folder, row)

    def add(name: str, config, tag: str, meta: dict) -> Path:
        folder = models / name
        t0 = time.perf_counter()
        compress_model_folder(dense, folder, config, folds=[args.fold], overwrite=True, speed_check=False,
                              calibrate=decompositions[tag])  # accuracy study: no timing
        m = json.loads((folder / MANIFEST_FILE).read_text())
        cal = m.get("calibration") or {}
        row = {**meta, "decomposition": m["decomposition"] + (", sequential" if cal.get("sequential") else ""),
               "recovery": "zero-shot", "compress_s": round(time.perf_counter() - t0, 1), "rank_rule": m["rank_rule"],
               "calibration_s": None if not cal else round(cal["statistics_s"] + cal.get("sequential_refit", {}).get(
                   "seconds", 0), 1)}
        variants.append((folder, row))
        print(f"+ {name}: {row['compress_s']} s", file=sys.stderr, flush=True)
        return folder

    for ratio in args.ratios:
        uni = {}
        for tag in [t for t in decompositions if t in args.decompositions or t == "w"]:  # w: the budget's reference
            uni[tag] = add(f"r{ratio:g}-uniform-{tag}", TuckerConfig(rank_ratio=ratio), tag,
                           {"ratio": ratio, "ranks": "uniform", "budget": None})
        manifest = json.loads((uni["w"] / MANIFEST_FILE).read_text())
        to_distill = [uni[t] for t in args.distill_from if t in uni] if "uniform" in args.distill_ranks else []
        for cost in args.budget_costs:
            budget = equal_budget(manifest, cost)
            for tag in [t for t in decompositions if t in args.decompositions]:
                folder = add(f"r{ratio:g}-budget-{cost}-{tag}", TuckerConfig(budget=budget, budget_cost=cost),
                             tag, {"ratio": ratio, "ranks": f"budgeted ({cost})", "budget": round(budget, 4)})
                if "budgeted" in args.distill_ranks and tag in args.distill_from:
                    to_distill.append(folder)
        if ratio in args.distill_ratios:
            for folder in to_distill:
                target = models / f"{folder.name}-distilled"
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(folder, target)
                rec = distill_model_folder(target, train_images, steps=args.steps, lr=args.lr, loss=args.loss,
                                           feature_weight=args.feature_weight,
                                           batch_size=args.batch_size, folds=[args.fold], seed=args.distill_seed,
                                           progress=False)
                base = dict(next(r for f, r in variants if f == folder))
                variants.append((target, {**base, "recovery": "distilled", "distill_s": rec["seconds"],
                                          "distill_settings": f"{rec['steps_done']} steps x {args.batch_size} "
                                                              f"patches, AdamW lr {args.lr}, {args.loss} loss"
                                                              + (f", stage outputs x {args.feature_weight:g}"
                                                                 if args.feature_weight else "")}))
                print(f"+ {target.name}: {rec['seconds']:.0f} s", file=sys.stderr, flush=True)
        if ratio in args.finetune_ratios:
            for folder in uni.values():
                target = models / f"{folder.name}-finetuned"
                cost = finetune(folder, args.fold, args.finetune_epochs, args.finetune_iters, None, "cpu", target)
                base = dict(next(r for f, r in variants if f == folder))
                variants.append((target, {**base, "recovery": cost["recovery"], "finetune_s": cost["seconds"],
                                          "finetune_settings": cost["settings"]}))

    result = bench([Path(dense)] + [v[0] for v in variants], out / "calibration_bench", repeats=1, warmup=0,
                   images=images, labels=labels, fold=args.fold, disable_tta=True)
    ref = result["models"][0]
    rows = variant_rows(result, variants)
    summary = {"format": "nnunet-green-calibration/1",
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
               "machine": result["machine"], "dense": {"folder": str(dense), "params": ref["params"],
                                                       "macs": ref["macs"], "dice_vs_labels": ref["dice_vs_labels"],
                                                       "n_cases_scored": ref.get("n_cases")},
               "calibration": {"images": args.calibration_images, "patches": args.calibration_patches,
                               "source": str(cal_dir)}, "variants": rows}
    write_result(out, "calibration", summary, sweep_markdown(summary))
    return 0


def sweep_markdown(s: dict) -> str:
    f = lambda v, spec=".4f": "–" if v is None else format(v, spec)  # noqa: E731
    d = s["dense"]
    lines = ["# Data-aware (calibrated) vs weight-only Tucker-2", "", f"Command: `{s['command']}`  ",
             f"Machine: {s['machine']['cpu']}, {s['machine']['cpu_count']} CPUs, GPU {s['machine']['gpu'] or 'none'}, "
             f"torch {s['machine']['torch']}; {f(d.get('n_cases_scored'), 'd')} held-out cases, no test-time "
             f"mirroring; calibration: {s['calibration']['patches']} patches of {s['calibration']['images']} "
             "unlabelled training images.", "",
             f"Dense: {d['params']:,} params, Dice vs labels {f(d['dice_vs_labels'])}.", "",
             "| ratio | ranks | decomposition | recovery | params kept | MACs kept | agreement Dice | Dice vs labels "
             "| calibration s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in s["variants"]:
        lines.append(f"| {r['ratio']:g} | {r['ranks']} | {r['decomposition']} | {r['recovery']} "
                     f"| {r['params'] / d['params']:.1%} | {r['macs'] / d['macs']:.1%} | {f(r['agreement_dice'])} "
                     f"| {f(r['dice_vs_labels'])} | {f(r.get('calibration_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


def cost(args) -> int:
    import copy

    import torch

    from nnunet_green.compression import TuckerConfig, collect_statistics, tucker_
    from nnunet_green.compression.calibration import peak_rss_mb
    from nnunet_green.evaluation.experiment import write_result
    from nnunet_green.evaluation.machine import machine_info

    from nnunet_green.testing.totalseg import ts_1_5mm_network

    torch.manual_seed(0)
    shape = (1, 1, *([args.size] * 3))
    net = ts_1_5mm_network(shape[2:]).eval()
    gen = torch.Generator().manual_seed(0)
    patches = [torch.randn(shape, generator=gen) for _ in range(args.patches)]
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        net(patches[0])
    one_forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = collect_statistics(net, patches, progress=True)
    t_stats = time.perf_counter() - t0
    rss_stats = peak_rss_mb()
    t0 = time.perf_counter()
    compressed = copy.deepcopy(net)
    records = tucker_(compressed, TuckerConfig(rank_ratio=0.12), calibration=stats)
    t_dec = time.perf_counter() - t0
    refit = None
    if args.sequential:
        from nnunet_green.compression.sequential import refine_sequentially_

        refit = refine_sequentially_(compressed, net, patches, stats, progress=True)
    del compressed
    t0 = time.perf_counter()
    tucker_(copy.deepcopy(net), TuckerConfig(rank_ratio=0.12))
    t_weight = time.perf_counter() - t0
    result = {"format": "nnunet-green-calibration-cost/1", "machine": machine_info(),
              "command": " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
              "torch_threads": torch.get_num_threads(), "network": "ts_1.5mm (PlainConvUNet, random weights)",
              "patches": args.patches, "patch": list(shape[2:]), "one_dense_forward_s": round(one_forward, 2),
              "statistics_s": round(t_stats, 2), "statistics_hooks_s": stats.extra["statistics_hooks_s"],
              "calibrated_decomposition_s": round(t_dec, 2),
              "weight_only_decomposition_s": round(t_weight, 2),
              "calibration_total_s": round(t_stats + t_dec, 2),
              "peak_rss_mb_before": round(rss0, 1), "peak_rss_mb_after_statistics": round(rss_stats, 1),
              "layers_calibrated": sum(1 for r in records if r.decomposition == "calibrated"),
              **({} if refit is None else {"sequential_refit_s": refit["seconds"],
                                           "sequential_layers_refitted": refit["layers"],
                                           "peak_rss_mb_after_sequential": round(peak_rss_mb(), 1)})}
    md = ["# Calibration cost, TotalSegmentator 1.5 mm architecture", "", f"Command: `{result['command']}`  ",
          f"Machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs, torch threads "
          f"{result['torch_threads']}.", "",
          "| patches | one dense forward s | statistics s (of which in hooks) | calibrated decomposition s "
          "| weight-only decomposition s | calibration total s | peak RSS MB (before / after statistics) |",
          "|---|---|---|---|---|---|---|",
          f"| {args.patches} × {args.size}³ | {result['one_dense_forward_s']} | {result['statistics_s']} "
          f"({result['statistics_hooks_s']}) "
          f"| {result['calibrated_decomposition_s']} | {result['weight_only_decomposition_s']} "
          f"| {result['calibration_total_s']} | {result['peak_rss_mb_before']} / "
          f"{result['peak_rss_mb_after_statistics']} |"]
    if refit is not None:
        md += ["", f"Sequential refit (`--calibration-sequential`): {refit['layers']} layers in {refit['seconds']} s "
                   f"({refit['seconds'] / args.patches:.1f} s per patch); peak RSS "
                   f"{result['peak_rss_mb_after_sequential']} MB."]
    write_result(args.output.absolute(), "calibration_cost", result, "\n".join(md) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("sweep", help="weight-only vs calibrated on a Hippocampus model")
    s.add_argument("--data", type=Path, help="MSD task folder: trains (or reuses) the dense model in --work")
    s.add_argument("--work", type=Path, default=REPO / "work" / "recovery_hippocampus")
    s.add_argument("--n-train", type=int, default=60)
    s.add_argument("--n-test", type=int, default=20)
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--iters", type=int, default=75)
    s.add_argument("--model", type=Path, help="dense model folder (instead of --data)")
    s.add_argument("--images", type=Path, help="held-out images (with --model)")
    s.add_argument("--labels", type=Path, help="their labels (with --model)")
    s.add_argument("--train-images", type=Path, help="unlabelled training images (with --model)")
    s.add_argument("--calibration-images", type=int, default=32, help="at most this many training images")
    s.add_argument("--calibration-patches", type=int, default=32)
    s.add_argument("--sequential", action="store_true",
                   help="also compress each calibrated variant with the sequential refit (--calibration-sequential)")
    s.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.12, 0.25, 0.5])
    s.add_argument("--budget-costs", nargs="*", choices=("params", "macs"), default=["params", "macs"])
    s.add_argument("--distill-ratios", nargs="*", type=float, default=[0.12])
    s.add_argument("--distill-ranks", nargs="+", choices=("uniform", "budgeted"), default=["uniform"],
                   help="which variants of the --distill-ratios to distil (weight-only and calibrated each)")
    s.add_argument("--decompositions", nargs="+", choices=("w", "cal", "seq"), default=["w", "cal", "seq"],
                   help="decompositions to make (default all; seq needs --sequential; the uniform weight-only one "
                        "is always made: it sets the budget). Fewer saves time when one start is distilled")
    s.add_argument("--distill-from", nargs="+", choices=("w", "cal", "seq"), default=["w", "cal", "seq"],
                   help="which decompositions to distil: weight-only, calibrated, calibrated + sequential refit")
    s.add_argument("--finetune-ratios", nargs="*", type=float, default=[],
                   help="fine-tune the uniform variants of these ratios with labels (needs --data, or "
                        "nnUNet_raw/preprocessed/results of the model's dataset)")
    s.add_argument("--finetune-epochs", type=int, default=3)
    s.add_argument("--finetune-iters", type=int, default=50)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--batch-size", type=int, default=2)
    s.add_argument("--loss", choices=LOSSES, default=DistillSettings.loss, help="distillation loss (kl: at the "
                   f"default temperature {DistillSettings.temperature:g})")
    s.add_argument("--feature-weight", type=float, default=DistillSettings.feature_weight,
                   help="also match the encoder/decoder stage outputs, with this weight (0: logits only)")
    s.add_argument("--distill-seed", type=int, default=0, help="seed of the distillation (held-out split, patches)")
    s.add_argument("-f", "--fold", default="0")
    s.add_argument("-o", "--output", type=Path, default=REPO / "bench_out")
    c = sub.add_parser("cost", help="calibration time and memory on the TS-1.5mm architecture")
    c.add_argument("--patches", type=int, default=8)
    c.add_argument("--size", type=int, default=128)
    c.add_argument("--sequential", action="store_true", help="also time the sequential refit")
    c.add_argument("-o", "--output", type=Path, default=REPO / "bench_out")
    args = p.parse_args(argv)
    if args.mode == "sweep" and args.data is None and None in (args.model, args.images, args.labels,
                                                               args.train_images):
        p.error("sweep: give --data, or --model with --images, --labels and --train-images")
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    return sweep(args) if args.mode == "sweep" else cost(args)


if __name__ == "__main__":
    sys.exit(main())
