#!/usr/bin/env python
"""`make bench`: CPU forward of a Tucker-compressed TotalSegmentator 1.5 mm network against what a CPU user would run
instead, as ratios from ONE interleaved run.

A TS-1.5mm-shaped model folder (organs part model Dataset291: 6-stage PlainConvUNet [32 .. 320], 25 outputs, patch
128^3, random weights) is compressed by `nnunet-green-compress` at `--ratio` (fast-path artefact included, as by
default). Then, per torch thread count (`--threads`, default 2
and 1), four variants are timed in rotating rounds on one 1x1x128^3 input:

- `dense`: the dense folder loaded the stock predictor's way, `network(x)` under `torch.inference_mode()`;
- `dense_ort`: the same dense network exported to ONNX (legacy exporter, opset 18) and run by ONNX Runtime with graph
  optimizations on and intra-op threads = the torch thread count (what a CPU user would pick instead of compression);
- `compressed`: the compressed folder loaded the predictor's way, `network(x)` under inference mode - the stock
  predictor's call, so whatever fast path the package provides engages here;
- `compressed_eager`: the same compressed folder, called with `nnUNet_green_fast_path=0` in the environment (the
  user's switch for the fast CPU path): the plain factorized torch network, for reference.

Each forward's peak resident memory above the process's RSS before it is recorded (VmHWM reset per forward).
Writes <out>/compression_cpu.json and .md (evaluation.experiment.write_result); prints each target as MET/MISS.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnunet_green.contract import MANIFEST_FILE
from nnunet_green.evaluation import interleaved, machine_info, peak_rss_mb, reset_peak_rss, rss_mb
from nnunet_green.evaluation.experiment import write_result
from nnunet_green.evaluation.timing import forward_seconds
from nnunet_green.nnunet_io import ModelFolder

TARGETS = {"vs_dense": 3.5, "vs_dense_ort": 3.0}  # compressed (predictor's call) faster than ..., at TARGET_THREADS
TARGET_THREADS = 2
VARIANTS = ("dense", "dense_ort", "compressed", "compressed_eager")
FAST_PATH_SWITCH = "nnUNet_green_fast_path"  # contract.ENV: 0 runs the compressed network eagerly


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ model folders

def make_folders(work: Path, ratio: float, patch) -> tuple[Path, Path, dict]:
    """(dense, compressed) model folders and the compression manifest. The compression runs as the user runs it,
    `nnunet-green-compress` in its own process (so nothing it sets up stays in this one)."""
    from nnunet_green.testing import totalseg

    log("writing the dense TS-1.5mm-shaped model folder (random weights, seed 0)")
    dense = totalseg.random_model_folder(work / "dense", totalseg.ts_organs_dataset_json(),
                                        plans=totalseg.ts_old_format_plans(**{**totalseg.DATASET291, "patch": patch}))
    compressed = work / "compressed"
    cmd = [str(Path(sys.executable).parent / "nnunet-green-compress"), "-i", str(dense), "-o", str(compressed),
           "--rank-ratio", str(ratio), "-q"]
    log(f"compressing it: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    manifest = json.loads((compressed / MANIFEST_FILE).read_text())
    manifest["compress_wall_s"] = time.perf_counter() - t0
    return dense, compressed, manifest


def fast_path_off(seconds_of_run):
    """`seconds_of_run` with the fast CPU path switched off by its environment variable (read on every call)."""
    def run() -> float:
        old = os.environ.get(FAST_PATH_SWITCH)
        os.environ[FAST_PATH_SWITCH] = "0"
        try:
            return seconds_of_run()
        finally:
            if old is None:
                os.environ.pop(FAST_PATH_SWITCH)
            else:
                os.environ[FAST_PATH_SWITCH] = old
    return run


def export_onnx(network, shape, path: Path) -> float:
    """The dense network as a CPU user would export it for ONNX Runtime; returns the export time."""
    x = torch.zeros(shape)
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(network, (x,), str(path), dynamo=False, opset_version=18, input_names=["x"],
                          output_names=["logits"])
    return time.perf_counter() - t0


def ort_session(path: Path, threads: int):
    """Dense ONNX Runtime as a CPU user would run it: ORT's defaults (memory arena and patterns on), all graph optimizations."""
    import onnxruntime as ort

    from nnunet_green.compression.fast_path import session_options

    return ort.InferenceSession(str(path), session_options(threads, lean_memory=False),
                                providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------ measurements

class Variant:
    """One way of running the forward; each call returns its wall seconds and records its peak RSS increase."""

    def __init__(self, run):
        self.run, self.peak_increase_mb = run, []

    def __call__(self) -> float:
        reset_peak_rss()
        before = rss_mb()
        seconds = self.run()
        peak = peak_rss_mb()
        if before is not None and peak is not None:
            self.peak_increase_mb.append(peak - before)
        return seconds


def ort_seconds(session, x) -> float:
    feed = {"x": x.numpy()}
    t0 = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - t0


def time_variants(folders: dict[str, Path], onnx_path: Path, shape, threads: int, repeats: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    nets = {name: ModelFolder(folders[name]).load(device="cpu").network.eval()
            for name in ("dense", "compressed", "compressed_eager")}  # two instances of the compressed folder
    session = ort_session(onnx_path, threads)
    variants = {"dense": Variant(lambda: forward_seconds(nets["dense"], x, "cpu")),
                "dense_ort": Variant(lambda: ort_seconds(session, x)),
                "compressed": Variant(lambda: forward_seconds(nets["compressed"], x, "cpu")),
                "compressed_eager": Variant(fast_path_off(lambda: forward_seconds(nets["compressed_eager"], x,
                                                                                  "cpu")))}

    def on_round(r, times):
        log(f"  {threads} thread(s), round {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))

    log(f"{threads} thread(s): {warmup} warm-up + {repeats} timed rounds of {', '.join(variants)}")
    times = interleaved(variants, repeats, warmup, on_round)
    out = {"threads": threads, "repeats": repeats, "warmup": warmup, "variants": {}}
    for name, t in times.items():
        mem = variants[name].peak_increase_mb
        out["variants"][name] = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "all_s": t,
                                 "peak_rss_increase_mb": max(mem) if mem else None}
    comp = times["compressed"]
    out["speedups"] = {}
    for ref in ("dense", "dense_ort", "compressed_eager"):
        paired = [a / b for a, b in zip(times[ref], comp)]
        out["speedups"][ref] = {"ratio_of_medians": statistics.median(times[ref]) / statistics.median(comp),
                                "paired_median": statistics.median(paired), "paired_min": min(paired),
                                "paired_max": max(paired)}
    return out


# ------------------------------------------------------------------ report

LABELS = {"dense": "dense, torch eager (stock predictor's call)",
          "dense_ort": "dense, ONNX Runtime (exported, graph optimizations on)",
          "compressed": "compressed, stock predictor's call",
          "compressed_eager": f"compressed, plain torch eager ({FAST_PATH_SWITCH}=0)"}


def markdown(result: dict) -> str:
    m, man = result["machine"], result["compression"]
    fast = result["compression"].get("fast_path")
    fast = (f"`{json.dumps(fast)}`" if fast else
            "none recorded (no fast path in this version: both compressed rows run the plain torch network)")
    L = ["# Compressed TotalSegmentator 1.5 mm network: CPU forward", "",
         f"- Command: `{result['command']}`",
         f"- Date: {result['date']}",
         f"- Machine: {result['machine_label']} - {m['cpu']} ({', '.join(m['isa']) or 'no AVX2'}), "
         f"{m['cpu_count']} logical CPUs, torch {m['torch']}, onnxruntime {result['onnxruntime']}; load average at "
         f"start {m['load_avg'][0]:.1f}, end {result['load_avg_end'][0]:.1f}",
         f"- Network: TS-1.5mm architecture (PlainConvUNet, 6 stages [32 .. 320], 25 outputs), random weights, input "
         f"1x1x{'x'.join(map(str, result['patch']))}, fp32. Compressed at rank ratio {man['rank_ratio']}: "
         f"{man['params_before'] / 1e6:.2f} M -> {man['params_after'] / 1e6:.2f} M parameters in the state dict, "
         f"multiply-adds / {man['macs_before'] / man['macs_after']:.2f}; compression {man['compress_wall_s']:.1f} s "
         f"(decomposition {man['decomposition_s']:.1f} s; the rest: checks, fast-path export, speed check).",
         f"- Fast path recorded in compression.json: {fast}.",
         f"- Dense ONNX export: {result['onnx_export_s']:.1f} s (legacy exporter, opset 18).",
         "- One interleaved run: each round times every variant once, rotating the order. Peak memory = the largest "
         "rise of the process's resident memory (VmHWM, reset before each forward) over its RSS before that "
         "forward; ONNX Runtime's arena is allocated in its first (warm-up) call and reused.", ""]
    for block in result["runs"]:
        L += [f"## {block['threads']} thread(s): {block['warmup']} warm-up + {block['repeats']} timed rounds", "",
              "| variant | median | min - max | peak RSS rise | compressed faster by: ratio of medians (per-round "
              "ratios: median, min - max) |", "|---|---|---|---|---|"]
        for name in VARIANTS:
            v = block["variants"][name]
            sp = block["speedups"].get(name)
            ratio = (f"**{sp['ratio_of_medians']:.2f}x** ({sp['paired_median']:.2f}, {sp['paired_min']:.2f} - "
                     f"{sp['paired_max']:.2f})" if sp else "-")
            mem = "-" if v["peak_rss_increase_mb"] is None else f"{v['peak_rss_increase_mb']:.0f} MB"
            L.append(f"| {LABELS[name]} | {v['median_s']:.2f} s | {v['min_s']:.2f} - {v['max_s']:.2f} s | {mem} "
                     f"| {ratio} |")
        L.append("")
    L += ["## Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in result["targets"]:
        L.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(L) + "\n"


def targets(runs: list[dict]) -> list[dict]:
    rows = []
    for block in runs:
        if block["threads"] != TARGET_THREADS:
            continue
        for ref, goal in (("dense", TARGETS["vs_dense"]), ("dense_ort", TARGETS["vs_dense_ort"])):
            sp = block["speedups"][ref]["ratio_of_medians"]
            rows.append({"target": f"compressed >= {goal}x faster than {LABELS[ref]}, {TARGET_THREADS} threads",
                         "value": f"{sp:.2f}x", "met": sp >= goal})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="writes compression_cpu.json and compression_cpu.md here")
    ap.add_argument("--ratio", type=float, default=0.12, help="rank ratio of the compressed model")
    ap.add_argument("--patch", type=int, nargs=3, default=None,
                    help="input size (default: the plans' patch size, 128 128 128); the plans are written with it, "
                         "so the predictor-side fast path sees its patch size")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch / ONNX Runtime thread counts")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per thread count")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--work", default=None, help="folder for the model folders and the ONNX file (default: a "
                                                 "temporary folder, removed afterwards)")
    ap.add_argument("--machine-label", default="2-core CPU dev machine, no GPU, shared with other jobs")
    args = ap.parse_args(argv)

    import onnxruntime

    from nnunet_green.testing import totalseg

    patch = list(args.patch or totalseg.DATASET291["patch"])
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    result = {"command": " ".join(shlex.quote(a) for a in [exe, *sys.argv]),
              "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine_label": args.machine_label, "machine": machine_info("cpu"),
              "onnxruntime": onnxruntime.__version__, "args": vars(args), "patch": patch}
    default_threads = torch.get_num_threads()
    work_ctx = tempfile.TemporaryDirectory(prefix="bench_cpu_") if args.work is None else None
    work = Path(args.work or work_ctx.name).absolute()
    work.mkdir(parents=True, exist_ok=True)
    try:
        dense, compressed, manifest = make_folders(work / "models", args.ratio, patch)
        result["compression"] = {"rank_ratio": args.ratio, **manifest["totals"],
                                 "compress_wall_s": manifest["compress_wall_s"], "fast_path": manifest.get("fast_path")}
        log(f"fast path recorded in compression.json: {manifest.get('fast_path')}")
        shape = (1, 1, *patch)
        log("exporting the dense network to ONNX")
        dense_net = ModelFolder(dense).load(device="cpu").network.eval()
        result["onnx_export_s"] = export_onnx(dense_net, shape, work / "dense.onnx")
        del dense_net
        folders = {"dense": dense, "compressed": compressed, "compressed_eager": compressed}
        result["runs"] = [time_variants(folders, work / "dense.onnx", shape, t, args.repeats, args.warmup)
                          for t in args.threads]
    finally:
        torch.set_num_threads(default_threads)
        if work_ctx is not None:
            work_ctx.cleanup()
    result["load_avg_end"] = list(os.getloadavg())
    result["targets"] = targets(result["runs"])
    write_result(Path(args.out), "compression_cpu", result, markdown(result))
    for row in result["targets"]:
        log(f"  {'MET ' if row['met'] else 'MISS'} {row['target']}: {row['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
