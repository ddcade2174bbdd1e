"""Accuracy of Tucker compression vs rank ratio on real Hippocampus MRI (MSD Task04).

Trains a short-budget model with the real nnU-Net CLIs (or reuses one given with --model), compresses it at several
rank ratios with `compress_model_folder`, predicts held-out cases with the stock predictor through
`nnunet-green-bench`, and writes OUT/compression_accuracy.{json,md}: agreement Dice with the dense model and Dice
against the manual labels per rank ratio, with params/MACs/latency.

    python benchmarks/compression_accuracy.py --n-train 20 --n-test 10 --epochs 5 --iters 50
    python benchmarks/compression_accuracy.py --model MODEL_FOLDER --images imagesTs --labels labelsTs
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
from pathlib import Path

from nnunet_green.contract import BASELINE_TRAINER as TRAINER

REPO = Path(__file__).resolve().parents[1]
RATIOS = (0.05, 0.08, 0.12, 0.2, 0.3, 0.5)


def main(argv=None):
    data = Path(os.environ.get("NNUNET_GREEN_DATA", REPO.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=data / "Task04_Hippocampus", help="MSD Task04_Hippocampus folder")
    p.add_argument("--work", type=Path, default=REPO / "work" / "compression_accuracy")
    p.add_argument("--out", type=Path, default=REPO / "bench_out")
    p.add_argument("--model", type=Path, default=None, help="reuse this trained model folder (skip training)")
    p.add_argument("--images", type=Path, default=None, help="held-out images (with --model)")
    p.add_argument("--labels", type=Path, default=None, help="their labels (with --model)")
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--iters", type=int, default=50, help="training iterations per epoch")
    p.add_argument("--val-iters", type=int, default=1)
    p.add_argument("--fold", default="0")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per model")
    p.add_argument("--disable-tta", action="store_true", help="predict without mirroring (8x fewer forwards)")
    args = p.parse_args(argv)

    from nnunet_green.compression import TuckerConfig
    from nnunet_green.compression.model_folder import compress_model_folder
    from nnunet_green.evaluation.bench import bench
    from nnunet_green.evaluation.experiment import train_msd_subset

    work = args.work.absolute()
    if args.model is not None:
        model, images, labels = args.model.absolute(), args.images, args.labels
        if images is None or labels is None:
            p.error("--model needs --images and --labels")
    else:
        if not args.data.is_dir():
            p.error(f"data not found: {args.data} (set NNUNET_GREEN_DATA or --data)")
        model, images, labels = train_msd_subset(args.data, work, args.n_train, args.n_test, args.epochs, args.iters,
                                                 args.val_iters, args.fold, args.device, TRAINER)

    compressed = []
    for r in args.ratios:
        dst = work / "compressed" / f"r{r:g}" / model.name
        manifest = compress_model_folder(model, dst, TuckerConfig(rank_ratio=r), folds=[args.fold], overwrite=True)
        errs = [lay["rel_error"] for lay in manifest["layers"] if lay["factorized"]]
        compressed.append((r, dst, manifest, statistics.mean(errs)))
        print(f"rank ratio {r}: params {manifest['totals']['params_after'] / manifest['totals']['params_before']:.1%}"
              f", decomposition {manifest['totals']['decomposition_s']:.1f} s", file=sys.stderr)

    result = bench([model, *[c[1] for c in compressed]], work / "bench", device=args.device, repeats=args.repeats,
                   warmup=1, images=images, labels=labels, fold=args.fold, disable_tta=args.disable_tta)
    dense = result["models"][0]
    rows = [{"rank_ratio": None, "params": dense["params"], "params_frac": 1.0, "macs": dense["macs"],
             "macs_frac": 1.0, "latency_median_s": dense["latency_s"]["median"], "speedup": 1.0,
             "predict_wall_s": dense["predict_wall_s"], "dice_vs_labels": dense["dice_vs_labels"],
             "agreement_dice": None, "mean_layer_rel_error": 0.0, "decomposition_s": 0.0}]
    for (r, _, manifest, err), m in zip(compressed, result["models"][1:]):
        rows.append({"rank_ratio": r, "params": m["params"], "params_frac": m["params"] / dense["params"],
                     "macs": m["macs"], "macs_frac": m["macs"] / dense["macs"],
                     "latency_median_s": m["latency_s"]["median"],
                     "speedup": dense["latency_s"]["median"] / m["latency_s"]["median"],
                     "predict_wall_s": m["predict_wall_s"], "dice_vs_labels": m["dice_vs_labels"],
                     "agreement_dice": m["agreement_dice"], "mean_layer_rel_error": err,
                     "decomposition_s": manifest["totals"]["decomposition_s"]})
    report = {"format": "nnunet-green-compression-accuracy/1",
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "setup": {"data": str(args.data), "model": str(model), "trainer": TRAINER, "fold": args.fold,
                        "n_train": None if args.model else args.n_train, "n_test": None if args.model else args.n_test,
                        "epochs": None if args.model else args.epochs, "iters": None if args.model else args.iters,
                        "n_cases_scored": dense.get("n_cases"), "device": args.device, "tta": not args.disable_tta,
                        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])},
              "machine": result["machine"], "rows": rows, "bench": result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compression_accuracy.json").write_text(json.dumps(report, indent=2))
    (args.out / "compression_accuracy.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    s = report["setup"]
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = ["# Tucker compression vs accuracy (MSD Hippocampus, real MRI)", "",
             f"Model: `{s['trainer']}` fold {s['fold']}, {s['n_train']} training cases, {s['epochs']} epochs × "
             f"{s['iters']} iterations; {s['n_cases_scored']} held-out cases scored; device {s['device']} "
             f"({report['machine']['cpu']}). Agreement Dice: against the dense model's predictions; Dice vs labels: "
             "against the manual labels (mean over labels 1, 2 and cases).", "",
             "| rank ratio | params | MACs | latency (s) | speed-up | Dice vs labels | agreement Dice "
             "| mean layer rel. error |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {'dense' if r['rank_ratio'] is None else r['rank_ratio']} | {r['params']:,} "
                     f"({r['params_frac']:.1%}) | {r['macs'] / 1e9:.2f} G ({r['macs_frac']:.1%}) "
                     f"| {r['latency_median_s']:.3f} | {r['speedup']:.2f}× | {f(r['dice_vs_labels'], '.4f')} "
                     f"| {f(r['agreement_dice'], '.4f')} | {r['mean_layer_rel_error']:.3f} |")
    lines += ["", f"Command: `{s['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
