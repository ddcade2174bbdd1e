#!/usr/bin/env python
"""Does the per-layer speed rule (`--speed-rule measured`) make compressed models faster? One interleaved run.

For each model (`--models`): a dense model folder with random weights (seed 0) is written, then compressed twice by
`nnunet-green-compress --rank-ratio R`, once with `--speed-rule macs` (the multiply-add rule alone) and once with
`--speed-rule measured` (each planned layer timed dense vs factorized on this machine), each as the user runs it in
its own process (fast-path artefact included, the compress-time speed check skipped: this script times everything
itself). Then, at the plans' patch size, batch 1, `--threads` torch threads, the forwards are timed in rotating
rounds (evaluation.interleaved):

- `dense`: the dense folder loaded the stock predictor's way, eager torch (the predictor's call);
- `macs_eager`, `measured_eager`: each compressed folder in plain eager torch (`nnUNet_green_fast_path=0`): what the
  speed rule's per-layer timings predict for;
- `macs_fast`, `measured_fast`: each compressed folder as the stock predictor calls it on a CPU (the fast path,
  ONNX Runtime, where it applies).

Models: `demo` = the network nnU-Net plans for `make demo`'s synthetic data (PlainConvUNet, 4 stages [32 .. 256],
3 outputs) at `--demo-patch` (default 32 40 32, the demo's planned patch; issue 12 quoted 40 48 40);
`ts_1.5mm` = TotalSegmentator's 1.5 mm organs architecture (6 stages [32 .. 320], 25 outputs) at `--ts-patch`
(default 64^3: 128^3 takes minutes per forward on a busy 2-core machine). Writes <out>/speed_rule.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnunet_green.contract import MANIFEST_FILE, SPEED_RULES
from nnunet_green.evaluation import interleaved, machine_info
from nnunet_green.evaluation.experiment import write_result
from nnunet_green.evaluation.timing import forward_seconds
from nnunet_green.nnunet_io import ModelFolder

FAST_PATH_SWITCH = "nnUNet_green_fast_path"  # contract.ENV: 0 runs the compressed network eagerly
DEMO_DATASET = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "outer": 1, "inner": 2},
                "numTraining": 10, "file_ending": ".nii.gz"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dense_folder(model: str, patch, work: Path) -> Path:
    from nnunet_green.testing import totalseg

    if model == "demo":  # what nnU-Net plans for the demo's synthetic data (nnUNetv2_plan_and_preprocess)
        plans = totalseg.ts_old_format_plans(base_features=32, max_features=320, n_stages=4, patch=patch, spacing=1.0)
        return totalseg.random_model_folder(work / "dense", DEMO_DATASET, plans=plans)
    plans = totalseg.ts_old_format_plans(**{**totalseg.DATASET291, "patch": patch})
    return totalseg.random_model_folder(work / "dense", totalseg.ts_organs_dataset_json(), plans=plans)


def compress(dense: Path, out: Path, ratio: float, rule: str, threads: int) -> dict:
    """`nnunet-green-compress` in its own process (torch threads as for the timing); returns its manifest and the
    wall time of the whole command."""
    cmd = [sys.executable, "-m", "nnunet_green.compression.cli", "-i", str(dense), "-o", str(out), "--rank-ratio",
           str(ratio), "--speed-rule", rule, "--no-speed-check", "-q"]
    log("compressing: " + " ".join(shlex.quote(c) for c in cmd[3:]))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["compress_wall_s"] = round(time.perf_counter() - t0, 2)
    return manifest


def eager_seconds(net, x):
    """One forward with the fast path switched off by its environment variable (read on every call)."""
    os.environ[FAST_PATH_SWITCH] = "0"
    try:
        return forward_seconds(net, x, "cpu")
    finally:
        os.environ.pop(FAST_PATH_SWITCH)


def time_model(dense: Path, compressed: dict[str, Path], threads: int, repeats: int, warmup: int) -> dict:
    from nnunet_green.compression.fast_folder import fold_input_shape

    torch.set_num_threads(threads)
    loaded = ModelFolder(dense).load(device="cpu")
    shape = fold_input_shape(loaded)  # what the stock predictor feeds: batch 1, the plans' patch size
    nets = {"dense": loaded.network.eval()}
    for rule, folder in compressed.items():
        nets[rule] = ModelFolder(folder).load(device="cpu").network.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    runs = {"dense": lambda: forward_seconds(nets["dense"], x, "cpu")}
    for rule in compressed:
        runs[f"{rule}_eager"] = lambda r=rule: eager_seconds(nets[r], x)
        runs[f"{rule}_fast"] = lambda r=rule: forward_seconds(nets[r], x, "cpu")

    def on_round(r, times):
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))

    times = interleaved(runs, repeats, warmup, on_round)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"input_shape": list(shape), "threads": threads, "repeats": repeats, "warmup": warmup,
            "median_s": {k: round(v, 4) for k, v in med.items()}, "all_s": times,
            "speedup_vs_dense": {k: round(med["dense"] / v, 3) for k, v in med.items() if k != "dense"}}


def summary(manifest: dict) -> dict:
    t = manifest["totals"]
    timing = manifest.get("layer_timing") or {}
    return {"params_before": t["params_before"], "params_after": t["params_after"],
            "params_kept": round(t["params_after"] / t["params_before"], 4), "macs_ratio": round(
                t["macs_before"] / t["macs_after"], 3),
            "factorized_layers": sum(lay["factorized"] for lay in manifest["layers"]),
            "compress_wall_s": manifest["compress_wall_s"], "layer_timing": timing or None}


def markdown(result: dict) -> str:
    lines = [f"# Per-layer speed rule: `--speed-rule macs` vs `measured` ({result['created']})", "",
             f"- Command: `{result['command']}`",
             f"- Machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} logical CPUs, load average "
             f"{result['machine']['load_avg']} at the start; {result['note']}", ""]
    for name, m in result["models"].items():
        tm = m["timing"]
        lines += [f"## {name}: input {tuple(tm['input_shape'])}, rank ratio {result['rank_ratio']}, "
                  f"{tm['threads']} threads, {tm['repeats']} rounds after {tm['warmup']} warm-up", "",
                  "| rule | params kept | factorized layers | MAC ratio | timing s | kept dense | compress s | "
                  "eager × vs dense | fast path × vs dense |", "|---|---|---|---|---|---|---|---|---|"]
        for rule in SPEED_RULES:
            s = m["compressed"][rule]
            lt = s["layer_timing"] or {}
            lines.append(f"| {rule} | {s['params_kept']:.1%} ({s['params_after']:,}) | {s['factorized_layers']} | "
                         f"{s['macs_ratio']:.2f} | {lt.get('seconds', '—')} | {len(lt.get('kept_dense', [])) or '—'} "
                         f"| {s['compress_wall_s']:.0f} | {tm['speedup_vs_dense'][rule + '_eager']:.2f} | "
                         f"{tm['speedup_vs_dense'][rule + '_fast']:.2f} |")
        lines += ["", "Median forward seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in tm["median_s"].items()),
                  ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=("demo", "ts_1.5mm"), default=["demo", "ts_1.5mm"])
    p.add_argument("--demo-patch", nargs=3, type=int, default=[32, 40, 32])
    p.add_argument("--ts-patch", nargs=3, type=int, default=[64, 64, 64])
    p.add_argument("--ratio", type=float, default=0.12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--note", default="", help="what else ran on the machine (goes into the record)")
    p.add_argument("-o", "--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    result = {"created": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python benchmarks/speed_rule.py " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
              "machine": machine_info(), "note": args.note, "rank_ratio": args.ratio, "models": {}}
    for model in args.models:
        patch = args.demo_patch if model == "demo" else args.ts_patch
        with tempfile.TemporaryDirectory(prefix=f"speed_rule_{model}_") as tmp:
            work = Path(tmp)
            log(f"{model}: dense model folder, patch {patch}")
            dense = dense_folder(model, patch, work)
            folders = {rule: work / rule / dense.name for rule in SPEED_RULES}
            manifests = {rule: compress(dense, folders[rule], args.ratio, rule, args.threads) for rule in SPEED_RULES}
            log(f"{model}: timing {', '.join(['dense', *folders])}")
            timing = time_model(dense, folders, args.threads, args.repeats, args.warmup)
            result["models"][model] = {"patch": patch, "timing": timing,
                                       "compressed": {r: summary(m) for r, m in manifests.items()},
                                       "layers": {r: [{k: lay[k] for k in ("name", "factorized", "reason", "timing")}
                                                      for lay in m["layers"]] for r, m in manifests.items()}}
    write_result(args.out, "speed_rule", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
