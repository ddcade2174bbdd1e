"""Accuracy recovery evidence: zero-shot vs distilled (vs fine-tuned) compressed models, uniform vs budgeted ranks.

For each rank ratio: compress the dense model with the uniform ratio; build a budgeted-rank copy at the SAME
parameter budget (same fraction of the factorizable layers' parameters, rank_selection.select_ranks); distil a copy
of each on unlabelled images; optionally fine-tune (nnUNetTrainerTuckerFinetune through the stock nnUNetv2_train,
needs nnUNet_raw/preprocessed/results of the dataset in the environment). All variants are predicted on held-out
images with the stock predictor and scored by nnunet-green-bench's functions: agreement Dice vs the dense model and
Dice vs labels. Writes OUT/recovery.json and OUT/recovery.md.

example (Hippocampus, CPU, small):
  python benchmarks/recovery.py --model $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres \\
      --distill-images $nnUNet_raw/Dataset004_Hippocampus/imagesTr --images imagesTs --labels labelsTs \\
      --ratios 0.12 --steps 50 -o bench_out
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def budgeted_copy(uniform: Path, dense: Path, out: Path, fold: str) -> dict:
    """Copy of the uniform compressed folder whose factorized layers get budgeted ranks at the same parameter
    budget: re-decomposes the dense weights, rewrites plans.json's tucker_ranks, the checkpoint and the manifest."""
    import torch

    from nnunet_green.compression.network import build_dense_from_plans
    from nnunet_green.compression.rank_selection import apply_ranks_, select_ranks

    manifest = json.loads((uniform / "compression.json").read_text())
    conf = manifest["configuration"]
    dense_plans = json.loads((dense / "plans.json").read_text())
    dataset_json = json.loads((dense / "dataset.json").read_text())
    net = build_dense_from_plans(dense_plans, conf, dataset_json)
    net.load_state_dict(torch.load(dense / f"fold_{fold}" / manifest["checkpoint"], map_location="cpu",
                                   weights_only=False)["network_weights"])
    net.eval()
    probe = select_ranks(net, 0.5)  # eligible layers and their dense parameter counts
    eligible = {c.name: c.dense_cost for c in probe.layers}
    uni = {r["name"]: r for r in manifest["layers"] if r["name"] in eligible}
    budget = sum(r["params_after"] for r in uni.values()) / sum(eligible.values())
    uniform_err2 = sum((r["rel_error"] or 0.0) ** 2 for r in uni.values())  # before the layers are rewritten
    sel = select_ranks(net, budget, cost="params")
    errors = apply_ranks_(net, sel.ranks)

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(uniform, out)
    plans = json.loads((out / "plans.json").read_text())
    plans["configurations"][conf]["architecture"]["arch_kwargs"]["tucker_ranks"] = {
        k: [int(a), int(b)] for k, (a, b) in sel.ranks.items()}
    (out / "plans.json").write_text(json.dumps(plans, indent=4))
    ck_path = out / f"fold_{fold}" / manifest["checkpoint"]
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    ck["network_weights"] = net.state_dict()
    torch.save(ck, ck_path)
    manifest["folds"] = [fold]
    manifest["rank_selection"] = {"rule": "budgeted (singular-value energy, greedy)", "cost": "params",
                                  "budget": budget, "kept_fraction": sel.kept_fraction,
                                  "dense_layers": [c.name for c in sel.layers if c.rank_in is None]}
    for layer in manifest["layers"]:
        name = layer["name"]
        if name in sel.ranks:
            layer.update(rank_in=sel.ranks[name][0], rank_out=sel.ranks[name][1], factorized=True,
                         rel_error=errors[name])
        elif name in eligible:
            layer.update(rank_in=None, rank_out=None, factorized=False, rel_error=0.0, reason="budgeted: dense")
    manifest["totals"]["params_after"] = sum(p.numel() for p in net.parameters())
    (out / "compression.json").write_text(json.dumps(manifest, indent=2))
    return {"budget": budget, "kept_fraction": sel.kept_fraction, "sum_rel_err2": sum(e * e for e in errors.values()),
            "uniform_sum_rel_err2": uniform_err2, "n_dense": len(eligible) - len(sel.ranks)}


def finetune(compressed: Path, dataset: str, configuration: str, fold: str, epochs: int, iters: int, device: str,
             label: str) -> tuple[Path, float]:
    """nnUNetv2_train with nnUNetTrainerTuckerFinetune; returns (model folder, seconds). The results folder of the
    trainer is moved aside per variant (one trainer name, several variants)."""
    env = dict(os.environ, nnUNet_green_finetune_from=str(compressed), nnUNet_green_epochs=str(epochs),
               nnUNet_green_iters=str(iters), nnUNet_green_val_iters="1", nnUNet_compile="f")
    exe = Path(sys.executable).parent / "nnUNetv2_train"
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), dataset, configuration, fold, "-tr", "nnUNetTrainerTuckerFinetune", "-device",
                           device], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fine-tuning failed:\n{proc.stderr[-3000:]}")
    results = Path(os.environ["nnUNet_results"])
    folder = next(results.glob(f"Dataset*/nnUNetTrainerTuckerFinetune__*__{configuration}"))
    target = compressed.parent / f"{label}-finetuned"
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(folder), target)
    return target, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="dense nnU-Net model folder")
    p.add_argument("--images", required=True, help="held-out images (CASE_0000.nii.gz) to predict and score")
    p.add_argument("--labels", required=True, help="labels of --images (CASE.nii.gz)")
    p.add_argument("--distill-images", required=True,
                   help="unlabelled images for distillation (must not be --images, or the comparison is not held out)")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.12], help="uniform rank ratios (default 0.12)")
    p.add_argument("--modes", nargs="+", choices=("uniform", "budgeted"), default=["uniform", "budgeted"])
    p.add_argument("--steps", type=int, default=100, help="distillation steps")
    p.add_argument("--lr", type=float, default=1e-4, help="distillation lr")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--finetune", action="store_true",
                   help="also fine-tune with labels (needs nnUNet_raw/preprocessed/results set for the dataset)")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-iters", type=int, default=10)
    p.add_argument("--dataset", default=None, help="dataset id/name for --finetune (default: from the model path)")
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--disable-tta", action="store_true", help="predict without mirroring (8x faster on CPU)")
    p.add_argument("-o", "--output", default="bench_out")
    args = p.parse_args(argv)

    from nnunet_green.compression import TuckerConfig
    from nnunet_green.compression.bench_cli import bench
    from nnunet_green.compression.distill import distill_model_folder
    from nnunet_green.compression.model_folder import compress_model_folder

    for what in ("model", "images", "labels", "distill_images"):  # fail before minutes of work, not after
        if not Path(getattr(args, what)).is_dir():
            p.error(f"--{what.replace('_', '-')} folder not found: {getattr(args, what)}")
    dense = Path(args.model).absolute()
    out = Path(args.output).absolute()
    work = out / "recovery_models"
    work.mkdir(parents=True, exist_ok=True)
    conf = dense.name.split("__")[-1]
    dataset = args.dataset or dense.parent.name
    variants, rows = [], []
    for ratio in args.ratios:
        uniform = work / f"r{ratio:g}-uniform"
        if uniform.exists():
            shutil.rmtree(uniform)
        t0 = time.perf_counter()
        compress_model_folder(dense, uniform, TuckerConfig(rank_ratio=ratio), folds=[args.fold])
        compress_s = time.perf_counter() - t0
        bases = {}
        if "uniform" in args.modes:
            bases["uniform"] = (uniform, {"compress_s": round(compress_s, 2)})
        if "budgeted" in args.modes:
            t0 = time.perf_counter()
            info = budgeted_copy(uniform, dense, work / f"r{ratio:g}-budgeted", args.fold)
            info["compress_s"] = round(compress_s + time.perf_counter() - t0, 2)
            bases["budgeted"] = (work / f"r{ratio:g}-budgeted", info)
        for mode, (folder, info) in bases.items():
            label = f"r{ratio:g}-{mode}"
            variants.append((folder, dict(ratio=ratio, ranks=mode, recovery="zero-shot", recovery_s=0.0, **info)))
            dist = work / f"{label}-distilled"
            if dist.exists():
                shutil.rmtree(dist)
            shutil.copytree(folder, dist)
            rec = distill_model_folder(dist, args.distill_images, steps=args.steps, lr=args.lr,
                                       batch_size=args.batch_size, device=args.device, folds=[args.fold], seed=0)
            variants.append((dist, dict(ratio=ratio, ranks=mode, recovery="distilled", recovery_s=rec["seconds"],
                                        heldout_rel_error=[rec["heldout_rel_error_before"],
                                                           rec["heldout_rel_error_after"]], **info)))
            if args.finetune:
                ft, seconds = finetune(folder, dataset, conf, args.fold, args.finetune_epochs, args.finetune_iters,
                                       args.device, label)
                variants.append((ft, dict(ratio=ratio, ranks=mode, recovery="fine-tuned", recovery_s=round(seconds, 1),
                                          **info)))
        if "uniform" not in args.modes:
            shutil.rmtree(uniform)

    result = bench([dense] + [v[0] for v in variants], out / "recovery_bench", device=args.device, repeats=1,
                   warmup=0, images=args.images, labels=args.labels, fold=args.fold,
                   disable_tta=args.disable_tta)
    ref = result["models"][0]
    for (folder, meta), row in zip(variants, result["models"][1:]):
        rows.append({**meta, "folder": str(folder), "params": row["params"], "macs": row["macs"],
                     "agreement_dice": row["agreement_dice"], "dice_vs_labels": row["dice_vs_labels"]})
    summary = {"dense": {"folder": str(dense), "params": ref["params"], "macs": ref["macs"],
                         "dice_vs_labels": ref["dice_vs_labels"]},
               "images": str(Path(args.images).absolute()), "distill_images": str(Path(args.distill_images).absolute()),
               "steps": args.steps, "lr": args.lr, "device": args.device, "tta": not args.disable_tta,
               "command": " ".join(sys.argv), "variants": rows}
    (out / "recovery.json").write_text(json.dumps(summary, indent=2))
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["# Accuracy recovery", "", f"Dense: `{dense}` — {ref['params']:,} params, Dice vs labels "
             f"{fmt(ref['dice_vs_labels'])}", "",
             "| ratio | ranks | recovery | params | agreement Dice | Dice vs labels | recovery s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['ranks']} | {r['recovery']} | {r['params']:,} | "
                     f"{fmt(r['agreement_dice'])} | {fmt(r['dice_vs_labels'])} | {r['recovery_s']} |")
    (out / "recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
