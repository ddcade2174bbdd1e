"""Accuracy recovery evidence: zero-shot vs distilled vs fine-tuned compressed models, uniform vs budgeted ranks.

For each rank ratio: compress the dense model with the uniform ratio (`--rank-ratio`), and with budgeted per-layer
ranks at the SAME parameter budget (`--rank-budget` = the fraction of the factorizable layers' parameters the
uniform model kept; or, with --modes budgeted-macs, the same multiply-add budget). Where asked (`--distill-ratios`,
`--finetune-ratios`), recover a copy of each: label-free distillation on unlabelled images (nnunet-green-distill's
function) and labelled fine-tuning with nnUNetTrainerTuckerFinetune through the stock nnUNetv2_train. Every variant
is predicted on held-out images with the stock predictor and scored by nnunet-green-bench's functions: agreement
Dice with the dense model and Dice vs labels. The cost of each recovery (time, energy where a counter is readable)
is put next to the dense model's training cost (its green_summary.json). Writes OUT/recovery.json and
OUT/recovery.md.

Whole run from the MSD Hippocampus folder (trains the dense model with the real nnU-Net CLIs, or reuses it):
  python benchmarks/recovery.py --data ../shared/data/Task04_Hippocampus --n-train 60 --n-test 20 \\
      --epochs 12 --iters 75 --ratios 0.05 0.12 0.25 0.5 --distill-ratios 0.12 --finetune-ratios 0.12 -o bench_out

With a model of your own (fine-tuning then needs nnUNet_raw/preprocessed/results of its dataset set):
  python benchmarks/recovery.py --model MODEL_FOLDER --images imagesTs --labels labelsTs \\
      --distill-images unlabelled/ --ratios 0.12 -o bench_out
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
from pathlib import Path

from nnunet_green.contract import MANIFEST_FILE, RECOVERY_DISTILLED, GreenSettings, env_name
from nnunet_green.evaluation.experiment import (equal_budget, finetune, nnunet_folders, training_cost, variant_rows,
                                                write_result)

REPO = Path(__file__).resolve().parents[1]
MODES = ("uniform", "budgeted", "budgeted-macs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("dense model: train one (--data) or give one (--model)")
    src.add_argument("--data", type=Path, default=None, help="MSD task folder; trains nnUNetTrainerGreenFP32 on a subset")
    src.add_argument("--work", type=Path, default=REPO / "work" / "recovery_hippocampus", help="nnU-Net folders for --data")
    src.add_argument("--n-train", type=int, default=60)
    src.add_argument("--n-test", type=int, default=20)
    src.add_argument("--epochs", type=int, default=12, help="dense training epochs (with --data)")
    src.add_argument("--iters", type=int, default=75, help="dense training iterations per epoch (with --data)")
    src.add_argument("--model", type=Path, default=None, help="dense nnU-Net model folder")
    src.add_argument("--images", type=Path, default=None, help="held-out images (CASE_0000.nii.gz) to score")
    src.add_argument("--labels", type=Path, default=None, help="labels of --images (CASE.nii.gz)")
    src.add_argument("--distill-images", type=Path, default=None,
                     help="unlabelled images to distil on (not --images: the comparison must stay held out)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.12, 0.25, 0.5],
                   help="uniform rank ratios; budgeted variants use the same parameter budget")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["uniform", "budgeted"],
                   help="budgeted: same parameter budget as the uniform ratio; budgeted-macs: same multiply-add budget")
    p.add_argument("--distill-ratios", nargs="*", type=float, default=None,
                   help="ratios whose variants are distilled (default: all)")
    p.add_argument("--finetune-ratios", nargs="*", type=float, default=[],
                   help="ratios whose variants are fine-tuned with labels (default: none)")
    p.add_argument("--steps", type=int, default=300, help="distillation steps")
    p.add_argument("--lr", type=float, default=1e-3, help="distillation lr")
    p.add_argument("--batch-size", type=int, default=2, help="distillation batch size")
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--finetune-iters", type=int, default=75)
    p.add_argument("--finetune-lr", type=float, default=None,
                   help=f"default: the trainer's ({GreenSettings().finetune_lr:g}, {env_name('finetune_lr')})")
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tta", action="store_true", help="predict with mirroring (8x slower on CPU)")
    p.add_argument("-o", "--output", type=Path, default=REPO / "bench_out")
    args = p.parse_args(argv)

    from nnunet_green.compression import TuckerConfig
    from nnunet_green.compression.model_folder import compress_model_folder
    from nnunet_green.evaluation.bench import bench
    from nnunet_green.evaluation.experiment import train_msd_subset
    from nnunet_green.recovery import distill_model_folder

    if args.data is not None:
        if not args.data.is_dir():
            p.error(f"--data folder not found: {args.data}")
        work = args.work.absolute()
        dense, images, labels = train_msd_subset(args.data.absolute(), work, args.n_train, args.n_test, args.epochs,
                                                 args.iters, val_iters=2, fold=args.fold, device=args.device)
        distill_images = args.distill_images or work / "raw" / "Dataset004_Hippocampus" / "imagesTr"
        os.environ.update(nnunet_folders(work))
    else:
        if None in (args.model, args.images, args.labels, args.distill_images):
            p.error("give --data, or --model with --images, --labels and --distill-images")
        dense, images, labels, distill_images = args.model, args.images, args.labels, args.distill_images
    for what, folder in (("model", dense), ("images", images), ("labels", labels), ("distill-images", distill_images)):
        if not Path(folder).is_dir():
            p.error(f"--{what} folder not found: {folder}")  # before minutes of work, not after
    if args.finetune_ratios and not os.environ.get("nnUNet_results"):
        p.error("--finetune-ratios needs nnUNet_raw/nnUNet_preprocessed/nnUNet_results of the dataset (or --data)")
    dense = Path(dense).absolute()
    out = args.output.absolute()
    models = out / "recovery_models"
    models.mkdir(parents=True, exist_ok=True)
    distill_ratios = args.ratios if args.distill_ratios is None else args.distill_ratios
    dense_cost = training_cost(dense / f"fold_{args.fold}")

    variants = []  # (folder, row)
    for ratio in args.ratios:
        uniform_dir = models / f"r{ratio:g}-uniform"
        compress_model_folder(dense, uniform_dir, TuckerConfig(rank_ratio=ratio), folds=[args.fold], overwrite=True)
        uniform = json.loads((uniform_dir / MANIFEST_FILE).read_text())
        bases, budgets = {"uniform": uniform_dir}, {"uniform": None}
        for mode, cost in (("budgeted", "params"), ("budgeted-macs", "macs")):
            if mode in args.modes:
                budgets[mode] = equal_budget(uniform, cost)
                bases[mode] = models / f"r{ratio:g}-{mode}"
                compress_model_folder(dense, bases[mode], TuckerConfig(budget=budgets[mode], budget_cost=cost),
                                      folds=[args.fold], overwrite=True)
        if "uniform" not in args.modes:
            del bases["uniform"]
        for mode, folder in bases.items():
            m = json.loads((folder / MANIFEST_FILE).read_text())
            base = {"ratio": ratio, "ranks": mode, "budget": budgets[mode] and round(budgets[mode], 4),
                    "compress_s": m["totals"]["decomposition_s"]}
            variants.append((folder, {**base, "recovery": "zero-shot", "seconds": 0.0, "energy_j": None,
                                      "energy_source": None, "settings": ""}))
            if ratio in distill_ratios:
                target = models / f"{folder.name}-distilled"
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(folder, target)
                print(f"+ distil {folder.name}: {args.steps} steps", file=sys.stderr, flush=True)
                rec = distill_model_folder(target, distill_images, steps=args.steps, lr=args.lr,
                                           batch_size=args.batch_size, device=args.device, folds=[args.fold], seed=0)
                variants.append((target, {**base, "recovery": RECOVERY_DISTILLED, "seconds": rec["seconds"],
                                          "energy_j": rec["energy_j"], "energy_source": rec["energy_source"],
                                          "settings": f"{rec['steps_done']} steps x {args.batch_size} patches, "
                                                      f"AdamW lr {args.lr}",
                                          "heldout_rel_error": [rec["heldout_rel_error_before"],
                                                                rec["heldout_rel_error_after"]]}))
            if ratio in args.finetune_ratios:
                cost = finetune(folder, args.fold, args.finetune_epochs, args.finetune_iters, args.finetune_lr,
                                args.device, models / f"{folder.name}-finetuned")
                variants.append((models / f"{folder.name}-finetuned", {**base, **cost}))

    result = bench([dense] + [v[0] for v in variants], out / "recovery_bench", device=args.device, repeats=1,
                   warmup=0, images=images, labels=labels, fold=args.fold, disable_tta=not args.tta)
    ref = result["models"][0]
    rows = variant_rows(result, variants)
    summary = {"format": "nnunet-green-recovery/1",
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
               "machine": result["machine"], "device": args.device, "tta": args.tta,
               "dense": {"folder": str(dense), "params": ref["params"], "macs": ref["macs"],
                         "dice_vs_labels": ref["dice_vs_labels"], "training": dense_cost,
                         "n_cases_scored": ref.get("n_cases")},
               "images": str(Path(images).absolute()), "distill_images": str(Path(distill_images).absolute()),
               "variants": rows}
    write_result(out, "recovery", summary, markdown(summary))
    return 0


def markdown(s: dict) -> str:
    f = lambda v, spec=".4f": "–" if v is None else format(v, spec)  # noqa: E731
    d = s["dense"]
    kj = lambda r: "–" if r.get("energy_j") is None else f"{r['energy_j'] / 1e3:.1f} ({r['energy_source']})"  # noqa
    lines = ["# Accuracy recovery of Tucker-compressed models", "",
             f"Command: `{s['command']}`  ", f"Machine: {s['machine']['cpu']}, {s['machine']['cpu_count']} CPUs, "
             f"GPU {s['machine']['gpu'] or 'none'}, device {s['device']}, torch {s['machine']['torch']}; "
             f"test-time mirroring {'on' if s['tta'] else 'off'}; {f(d.get('n_cases_scored'), 'd')} held-out cases.",
             "",
             f"Dense: {d['params']:,} params, Dice vs labels {f(d['dice_vs_labels'])}; training cost "
             f"{f(d['training']['seconds'], '.0f')} s, energy kJ {kj(d['training'])}.", "",
             "ranks: `uniform` = `--rank-ratio`; `budgeted` = `--rank-budget` at the uniform model's parameter "
             "fraction; `budgeted-macs` = `--rank-budget --budget-cost macs` at its multiply-add fraction.", "",
             "| ratio | ranks | recovery | params | MACs kept | agreement Dice | Dice vs labels | Δ Dice vs dense "
             "| recovery s | recovery / dense training time | energy kJ | settings |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    train_s = d["training"]["seconds"]
    for r in s["variants"]:
        delta = None if r["dice_vs_labels"] is None or d["dice_vs_labels"] is None else \
            r["dice_vs_labels"] - d["dice_vs_labels"]
        share = None if not train_s or not r["seconds"] else r["seconds"] / train_s
        lines.append(f"| {r['ratio']:g} | {r['ranks']} | {r['recovery']} | {r['params']:,} "
                     f"({r['params'] / d['params']:.1%}) | {r['macs'] / d['macs']:.1%} | {f(r['agreement_dice'])} "
                     f"| {f(r['dice_vs_labels'])} "
                     f"| {f(delta, '+.4f')} | {f(r['seconds'], '.0f')} | {f(share, '.2f')} | {kj(r)} "
                     f"| {r['settings']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
