"""Compression and label-free recovery of a TotalSegmentator-shaped model, measured with the real TotalSegmentator CLI.

The real TotalSegmentator weights are a download (not possible offline), so this fits a network of the published
`--fast` architecture (Dataset297: PlainConvUNet [32, 64, 128, 256, 320], 118 outputs, 16.55 M parameters, old-format
plans, TotalSegmentator's folder layout) to the real abdominal CT in ../shared/data/totalsegmentator_example
(example_ct.nii.gz), with TotalSegmentator's own 3 mm output for that CT as the target
(example_seg_fast_force_split.nii.gz; model output, not ground truth). nnU-Net's preprocessor and loss are used.

Then: nnunet-green-compress (uniform rank ratio, budgeted ranks at the same parameter budget, and both calibrated
on the unlabelled fitting CT: data-aware factors) → TotalSegmentator --fast with TOTALSEG_WEIGHTS_PATH on
the dense and on each compressed root → agreement; nnunet-green-distill on the fitting CT (label-free) → agreement
again. Agreement is measured on example_ct.nii.gz (the CT the model was fitted
and distilled on) and on example_ct_sm.nii.gz (a different CT slab, never trained on).

  python benchmarks/recovery_totalsegmentator.py --fit-steps 300 --distill-steps 150 -o bench_out

Fitting and distillation use 48^3 patches by default (the model's own 112x112x128 patch costs ~6x more per
step on a CPU); predictions use TotalSegmentator's own sliding window.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nnunet_green.contract import DEFAULT_CHECKPOINT, MANIFEST_FILE
from nnunet_green.evaluation import dice_scores, machine_info
from nnunet_green.evaluation.experiment import equal_budget, write_result
from nnunet_green.nnunet_io import ModelFolder

REPO = Path(__file__).resolve().parents[1]


def fit(folder: Path, ct: Path, seg: Path, steps: int, patch, lr: float, batch_size: int, minutes: float | None,
        seed: int = 0) -> dict:
    """Train the network of `folder` on one CT with nnU-Net's Dice+CE loss and write it back as the checkpoint."""
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from tqdm import tqdm

    model = ModelFolder(folder).load("0", what="dense model")
    pre = model.configuration_manager.preprocessor_class(verbose=False)
    data, target, _ = pre.run_case([str(ct)], str(seg), model.plans_manager, model.configuration_manager,
                                   model.dataset_json)
    full = list(model.configuration_manager.patch_size)
    pad = [(0, 0)] + [(0, max(0, p - s)) for s, p in zip(data.shape[1:], full)]
    data, target = np.pad(data, pad).astype(np.float32), np.pad(target, pad).astype(np.int64)
    target[target < 0] = 0  # nnU-Net marks voxels outside the nonzero crop -1; its training maps them to 0
    net = model.network.train()
    loss_fn = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                             weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=3e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / steps) ** 0.9)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    fg = np.argwhere(target[0] > 0)
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc="fit TotalSegmentator-shaped model", unit="step", file=sys.stderr)
    for _ in bar:
        if minutes is not None and time.perf_counter() - t0 > 60 * minutes:
            break
        xs, ys = [], []
        for _ in range(batch_size):  # half the patches centred on a foreground voxel, as nnU-Net oversamples
            if rng.random() < 0.5:
                c = fg[rng.integers(len(fg))]
                start = [int(np.clip(ci - p // 2, 0, s - p)) for ci, p, s in zip(c, patch, data.shape[1:])]
            else:
                start = [int(rng.integers(0, s - p + 1)) for s, p in zip(data.shape[1:], patch)]
            sl = (slice(None), *[slice(a, a + p) for a, p in zip(start, patch)])
            xs.append(data[sl])
            ys.append(target[sl])
        x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    ck_path = folder / "fold_0" / DEFAULT_CHECKPOINT
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    ck["network_weights"] = net.eval().state_dict()
    torch.save(ck, ck_path)
    return {"steps": len(losses), "seconds": round(time.perf_counter() - t0, 1), "patch": list(patch), "lr": lr,
            "batch_size": batch_size, "loss_first10": float(np.mean(losses[:10])),
            "loss_last10": float(np.mean(losses[-10:]))}


def totalsegmentator(weights: Path, ct: Path, out: Path, home: Path) -> float:
    from nnunet_green.testing.totalseg import offline_env

    t0 = time.perf_counter()
    exe = Path(sys.executable).parent / "TotalSegmentator"
    proc = subprocess.run([str(exe), "-i", str(ct), "-o", str(out), "--fast", "--ml", "-d", "cpu", "-nr", "1",
                           "-ns", "1"], env=offline_env(weights, home), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"TotalSegmentator on {weights} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def agreement(pred: Path, ref: Path) -> dict:
    """Mean Dice over the labels present in the reference, and voxel agreement."""
    import nibabel as nib

    a, b = np.asarray(nib.load(pred).dataobj), np.asarray(nib.load(ref).dataobj)
    labels = [int(v) for v in np.unique(b) if v > 0]
    dice = list(dice_scores(a, b, labels).values())  # every label is in the reference: never NaN
    return {"mean_dice": float(np.mean(dice)) if dice else None, "labels": len(labels),
            "voxel_agreement": float((a == b).mean())}


def main(argv=None) -> int:
    data = Path(os.environ.get("NNUNET_GREEN_DATA", REPO.parent / "shared" / "data")) / "totalsegmentator_example"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=data, help="the totalsegmentator_example folder")
    p.add_argument("--work", type=Path, default=REPO / "work" / "recovery_totalsegmentator")
    p.add_argument("-o", "--output", type=Path, default=REPO / "bench_out")
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument("--fit-minutes", type=float, default=None, help="stop fitting after this long")
    p.add_argument("--fit-patch", type=int, nargs=3, default=[48, 48, 48])
    p.add_argument("--fit-lr", type=float, default=1e-3)
    p.add_argument("--resume", action="store_true", help="reuse the fitted model of an earlier run in --work")
    p.add_argument("--ratio", type=float, default=0.12, help="uniform rank ratio (budgeted: same parameter budget)")
    p.add_argument("--calibration-patches", type=int, default=8,
                   help="also compress with calibration on this many patches of the fitting CT (0: skip)")
    p.add_argument("--distill-steps", type=int, default=150)
    p.add_argument("--distill-patch", type=int, nargs=3, default=[48, 48, 48])
    p.add_argument("--distill-modes", nargs="*", choices=("uniform", "budgeted"), default=["uniform", "budgeted"],
                   help="compressed variants to distil")
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--distill-minutes", type=float, default=None, help="stop each distillation after this long")
    args = p.parse_args(argv)

    from nnunet_green.compression import TuckerConfig
    from nnunet_green.compression.model_folder import compress_weights_root
    from nnunet_green.recovery import distill_model_folder
    from nnunet_green.testing import totalseg

    ct, ct_sm = args.data / "example_ct.nii.gz", args.data / "example_ct_sm.nii.gz"
    refs = {"example_ct": args.data / "example_seg_fast_force_split.nii.gz",
            "example_ct_sm": args.data / "example_seg_fast.nii.gz"}
    for f in (ct, ct_sm, *refs.values()):
        if not f.is_file():
            p.error(f"not found: {f} (set NNUNET_GREEN_DATA or --data)")
    import torch

    work = args.work.absolute()
    dense_folder = work / "dense" / totalseg.TASK_FOLDER / totalseg.MODEL_FOLDER
    fit_record = work / "fit.json"
    if args.resume and fit_record.is_file():
        fitted = json.loads(fit_record.read_text())
    else:
        if work.exists():
            shutil.rmtree(work)
        images = work / "unlabelled"  # nnU-Net naming for distillation: the fitting CT, without its labels
        images.mkdir(parents=True)
        os.symlink(ct, images / "example_ct_0000.nii.gz")
        torch.manual_seed(0)
        plans, dataset = totalseg.ts_old_format_plans(**totalseg.DATASET297), totalseg.ts_dataset_json()
        totalseg.write_model_folder(work / "dense", plans, dataset,
                                    totalseg.build_network(plans, dataset).state_dict())
        fitted = fit(dense_folder, ct, refs["example_ct"], args.fit_steps, args.fit_patch, args.fit_lr, 2,
                     args.fit_minutes)
        fit_record.write_text(json.dumps(fitted, indent=2))
    images = work / "unlabelled"

    roots = {"dense": work / "dense"}
    man = compress_weights_root(work / "dense", work / "uniform", TuckerConfig(rank_ratio=args.ratio),
                                overwrite=True, speed_check=False)[0]  # an accuracy study: no timing
    roots["uniform"] = work / "uniform"
    n_params = man["totals"]["params_before"]
    budget = equal_budget(man)
    compress_weights_root(work / "dense", work / "budgeted", TuckerConfig(budget=budget), overwrite=True,
                          speed_check=False)
    roots["budgeted"] = work / "budgeted"
    if args.calibration_patches:  # data-aware factors from the unlabelled fitting CT (issue 11): the same rank rules
        for name, config in (("uniform", TuckerConfig(rank_ratio=args.ratio)),
                             ("budgeted", TuckerConfig(budget=budget))):
            compress_weights_root(work / "dense", work / f"{name}-calibrated", config, overwrite=True,
                                  speed_check=False, calibrate={"images": images, "patches": args.calibration_patches})
            roots[f"{name}-calibrated"] = work / f"{name}-calibrated"
    recovery = {}
    for mode in args.distill_modes:
        target = work / f"{mode}-distilled"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(roots[mode], target)
        recovery[mode] = distill_model_folder(target / totalseg.TASK_FOLDER / totalseg.MODEL_FOLDER, images,
                                              steps=args.distill_steps, lr=args.distill_lr,
                                              patch_size=args.distill_patch, batch_size=2, seed=0,
                                              teacher=dense_folder, max_minutes=args.distill_minutes)
        roots[f"{mode}-distilled"] = target

    rows = []
    for name, root in roots.items():
        folder = root / totalseg.TASK_FOLDER / totalseg.MODEL_FOLDER
        params = json.loads((folder / MANIFEST_FILE).read_text())["totals"]["params_after"] \
            if (folder / MANIFEST_FILE).is_file() else n_params
        row = {"model": name, "params": params}
        for case, image in (("example_ct", ct), ("example_ct_sm", ct_sm)):
            seg = work / "seg" / f"{name}_{case}.nii.gz"
            seg.parent.mkdir(exist_ok=True)
            row[f"{case}_ts_s"] = round(totalsegmentator(root, image, seg, work / "ts_home"), 1)
            row[f"{case}_vs_ts_reference"] = agreement(seg, refs[case])
            if name != "dense":
                row[f"{case}_vs_dense"] = agreement(seg, work / "seg" / f"dense_{case}.nii.gz")
        rec = recovery.get(name.replace("-distilled", "")) if name.endswith("distilled") else None
        if rec:
            row["distill"] = {k: rec[k] for k in ("steps_done", "kept_step", "seconds", "energy_j",
                                                  "energy_source", "heldout_rel_error_before",
                                                  "heldout_rel_error_after")}
        rows.append(row)

    result = {"format": "nnunet-green-recovery-totalsegmentator/1",
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["benchmarks/recovery_totalsegmentator.py", *sys.argv[1:]]),
              "machine": machine_info("cpu"),
              "fit": fitted, "ratio": args.ratio, "budget": budget, "rows": rows}
    write_result(args.output, "recovery_totalsegmentator", result, markdown(result))
    return 0


def markdown(r: dict) -> str:
    f = lambda v, spec=".4f": "–" if v is None else format(v, spec)  # noqa: E731
    fit = r["fit"]
    lines = ["# TotalSegmentator-shaped model (Dataset297 architecture) fitted to a real CT: compression and "
             "label-free distillation", "",
             f"Command: `{r['command']}`  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cpu_count']} CPUs, GPU {r['machine']['gpu'] or 'none'}, "
             f"torch {r['machine']['torch']}.  ",
             f"Fit: {fit['steps']} AdamW steps (lr {fit['lr']}, batch {fit['batch_size']} x {fit['patch']}) on "
             f"example_ct in {fit['seconds']:.0f} s; Dice+CE loss {fit['loss_first10']:.3f} -> "
             f"{fit['loss_last10']:.3f}. Rank ratio {r['ratio']:g}; budgeted ranks at the same parameter budget "
             f"({r['budget']:.4f} of the factorizable layers).", "",
             "Mean Dice over the labels present in the reference (voxel agreement in brackets). All predictions by "
             "the real `TotalSegmentator --fast --ml` with `TOTALSEG_WEIGHTS_PATH` on each weights root.", "",
             "| model | params | example_ct vs dense | example_ct_sm vs dense (held out) | example_ct vs TS reference "
             "| example_ct_sm vs TS reference | distillation |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        cell = lambda k: "–" if k not in row else \
            f"{f(row[k]['mean_dice'])} ({f(row[k]['voxel_agreement'])})"  # noqa: E731
        d = row.get("distill")
        dist = "–" if not d else (f"{d['steps_done']} steps (kept step {d.get('kept_step', '?')}), "
                                  f"{d['seconds']:.0f} s, held-out rel. logit error "
                                  f"{d['heldout_rel_error_before']:.3f} -> {d['heldout_rel_error_after']:.3f}")
        lines.append(f"| {row['model']} | {row['params']:,} | {cell('example_ct_vs_dense')} "
                     f"| {cell('example_ct_sm_vs_dense')} | {cell('example_ct_vs_ts_reference')} "
                     f"| {cell('example_ct_sm_vs_ts_reference')} | {dist} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
