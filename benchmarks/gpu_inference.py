#!/usr/bin/env python
"""`make bench-gpu-inference`: dense vs Tucker-compressed TotalSegmentator 1.5 mm network, forward on one CUDA GPU,
fp32 and AMP fp16 (`torch.autocast`, as nnU-Net's predictor runs on a GPU), one short script.

The dense network is the TS-1.5mm architecture the stock predictor builds from TotalSegmentator's plans (organs part
model: 6-stage PlainConvUNet [32 .. 320], 25 outputs, random weights); the compressed one is the same network after
`tucker_(net, TuckerConfig(rank_ratio))` - the structure nnU-Net builds from a compressed folder. Input 1x1x128^3
(`--patch`), `torch.inference_mode()`, cudnn.benchmark on as in nnU-Net's predictor. Each variant gets `--warmup`
untimed forwards, then `--repeats` interleaved rounds timed with CUDA events; peak memory is
torch.cuda.max_memory_allocated over one forward (weights included) after a reset.

Target: compressed >= 1.5x faster than dense under AMP. Writes <out>/gpu_inference.json and .md and names the GPU.
Without CUDA it exits 2; `--allow-cpu` runs the same code on the CPU to test the script (wall-clock timing, no
memory statistics, fp16 autocast on a CPU is very slow: not results).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from nnunet_green.compression import TuckerConfig, count_macs, tucker_
from nnunet_green.evaluation import interleaved, machine_info, synchronize
from nnunet_green.evaluation.experiment import write_result

TARGET_AMP_SPEEDUP = 1.5
EXIT_NO_CUDA = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def networks(patch, ratio: float, device) -> tuple[torch.nn.Module, torch.nn.Module]:
    from nnunet_green.testing import totalseg

    plans = totalseg.ts_old_format_plans(**{**totalseg.DATASET291, "patch": tuple(patch)})
    torch.manual_seed(0)
    dense = totalseg.build_network(plans, totalseg.ts_organs_dataset_json()).eval()
    compressed = copy.deepcopy(dense)
    tucker_(compressed, TuckerConfig(rank_ratio=ratio), input_shape=(1, 1, *patch))
    return dense.to(device), compressed.eval().to(device)


def timed_forward(net, x, amp: bool):
    """A run for `interleaved`: one forward, seconds by CUDA events (wall clock on a CPU)."""
    cuda = x.device.type == "cuda"

    def run() -> float:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                net(x)
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1000
            t0 = time.perf_counter()
            net(x)
            return time.perf_counter() - t0
    return run


def peak_memory_mb(net, x, amp: bool) -> float | None:
    if x.device.type != "cuda":
        return None
    synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        net(x)
    synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) / 2 ** 20


def markdown(r: dict) -> str:
    m = r["machine"]
    L = ["# Compressed TotalSegmentator 1.5 mm network: GPU forward", "",
         f"- Command: `{r['command']}`", f"- Date: {r['date']}",
         f"- Device: {m['gpu'] or 'CPU (--allow-cpu smoke run: not a result)'}; torch {m['torch']}, CUDA {m['cuda']}; "
         f"CPU {m['cpu']}",
         f"- Network: TS-1.5mm architecture, random weights, input 1x1x{'x'.join(map(str, r['patch']))}; compressed "
         f"at rank ratio {r['rank_ratio']} ({r['params_dense'] / 1e6:.2f} M -> {r['params_compressed'] / 1e6:.2f} M "
         f"parameters, multiply-adds / {r['macs_dense'] / r['macs_compressed']:.2f}).",
         f"- {r['warmup']} warm-up forwards per variant, then {r['repeats']} interleaved rounds, "
         f"{'CUDA-event' if m['gpu'] else 'wall-clock'} timing.", "",
         "| precision | dense median (min - max) | compressed median (min - max) | speed-up | peak memory dense "
         "| peak memory compressed |", "|---|---|---|---|---|---|"]
    for prec, row in r["precisions"].items():
        d, c = row["dense"], row["compressed"]
        mem = [("-" if v["peak_mb"] is None else f"{v['peak_mb']:.0f} MB") for v in (d, c)]
        L.append(f"| {prec} | {d['median_s'] * 1e3:.1f} ms ({d['min_s'] * 1e3:.1f} - {d['max_s'] * 1e3:.1f}) "
                 f"| {c['median_s'] * 1e3:.1f} ms ({c['min_s'] * 1e3:.1f} - {c['max_s'] * 1e3:.1f}) "
                 f"| **{row['speedup']:.2f}x** | {mem[0]} | {mem[1]} |")
    t = r["target"]
    L += ["", "| target | value | met |", "|---|---|---|",
          f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |"]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default="bench_out/gpu_inference", help="writes gpu_inference.json and .md here")
    ap.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    ap.add_argument("--ratio", type=float, default=0.12, help="rank ratio of the compressed network")
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=5, help="untimed forwards per variant first (cudnn autotuning)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU without CUDA (tests the script only)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_inference: torch sees no CUDA device; this benchmark needs a GPU (--allow-cpu runs it on the CPU "
              "to test the script, not for results)", file=sys.stderr)
        return EXIT_NO_CUDA
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's predictor

    log(f"building dense and compressed networks on {device}")
    dense, compressed = networks(args.patch, args.ratio, device)
    shape = (1, 1, *args.patch)
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    result = {"command": " ".join(shlex.quote(a) for a in [exe, *sys.argv]),
              "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_info(device),
              "patch": list(args.patch), "rank_ratio": args.ratio, "repeats": args.repeats, "warmup": args.warmup,
              "params_dense": sum(p.numel() for p in dense.parameters()),
              "params_compressed": sum(p.numel() for p in compressed.parameters()),
              "macs_dense": count_macs(dense, shape), "macs_compressed": count_macs(compressed, shape),
              "precisions": {}}
    x = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(0))
    for prec, amp in (("fp32", False), ("AMP fp16", True)):
        log(f"{prec}: {args.warmup} warm-up forwards per variant, {args.repeats} timed rounds")
        runs = {"dense": timed_forward(dense, x, amp), "compressed": timed_forward(compressed, x, amp)}
        for run in runs.values():  # warm-up per variant, before any timed round
            for _ in range(args.warmup):
                run()
        times = interleaved(runs, args.repeats)
        row = {}
        for name, net in (("dense", dense), ("compressed", compressed)):
            t = times[name]
            row[name] = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "all_s": t,
                         "peak_mb": peak_memory_mb(net, x, amp)}
        row["speedup"] = row["dense"]["median_s"] / row["compressed"]["median_s"]
        result["precisions"][prec] = row
        log(f"  dense {row['dense']['median_s'] * 1e3:.1f} ms, compressed {row['compressed']['median_s'] * 1e3:.1f} ms"
            f": {row['speedup']:.2f}x")
    amp_speedup = result["precisions"]["AMP fp16"]["speedup"]
    result["target"] = {"target": f"compressed >= {TARGET_AMP_SPEEDUP}x faster than dense under AMP",
                        "value": f"{amp_speedup:.2f}x", "met": device.type == "cuda" and amp_speedup >= TARGET_AMP_SPEEDUP}
    write_result(Path(args.out), "gpu_inference", result, markdown(result))
    log(f"{'MET ' if result['target']['met'] else 'MISS'} {result['target']['target']}: {result['target']['value']}"
        + ("" if device.type == "cuda" else " (CPU smoke run: not a result)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
