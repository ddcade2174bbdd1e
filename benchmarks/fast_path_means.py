#!/usr/bin/env python
"""Which means for fast CPU inference of the compressed network (docs/design.md, "Fast CPU inference").

TotalSegmentator 1.5 mm architecture (random weights, rank ratio 0.12), batch 1, one input size, torch's thread
setting: dense eager, compressed eager, compressed TorchScript (trace + freeze + optimize_for_inference), the
compressed network as the stock predictor now runs it (its ONNX Runtime artefact), and the dense network exported
to ONNX Runtime the same way. Forwards interleaved (A, B, C, ...), first round a warm-up, medians. Writes JSON +
markdown to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from nnunet_green.compression import TuckerConfig, tucker_
from nnunet_green.compression.fast_export import build_artefact, install_artefact_
from nnunet_green.compression.fast_path import ARTEFACT_KEY, eager, fast_class, weights_fingerprint
from nnunet_green.testing.totalseg import ts_1_5mm_network


class Eager(nn.Module):
    """The wrapped network with the fast path switched off."""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with eager():
            return self.net(x)


class OrtDense(nn.Module):
    """The dense network exported exactly as the artefact is (build_artefact), run by ONNX Runtime."""
    def __init__(self, net, shape):
        super().__init__()
        import onnxruntime as ort

        from nnunet_green.compression.fast_path import session_options
        opts = session_options(torch.get_num_threads(), lean_memory=False)
        self.session = ort.InferenceSession(build_artefact(net, shape), opts, providers=["CPUExecutionProvider"])

    def forward(self, x):
        return torch.from_numpy(self.session.run(None, {"input": x.numpy()})[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="cubic input side (default 128, the plans' patch)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up round")
    p.add_argument("--ratio", type=float, default=0.12)
    p.add_argument("--out", default="bench_out/fast_path_means")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    shape = (1, 1, args.size, args.size, args.size)
    torch.manual_seed(0)
    dense = ts_1_5mm_network(shape[2:])
    comp = copy.deepcopy(dense)
    tucker_(comp, TuckerConfig(rank_ratio=args.ratio), n_iter_max=0)
    fast = comp
    fast.__class__ = fast_class(type(dense))  # what TuckerFactorizedNetwork builds from the plans: same modules
    fast.register_buffer(ARTEFACT_KEY, torch.zeros(0, dtype=torch.uint8))
    t0 = time.perf_counter()
    record = install_artefact_(fast, shape)
    export_s = time.perf_counter() - t0
    x = torch.randn(shape)
    with torch.no_grad(), eager():
        t0 = time.perf_counter()
        scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(Eager(fast).eval(), x)))
        script_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ort_dense = OrtDense(dense, shape)
    dense_export_s = time.perf_counter() - t0
    models = {"dense eager": dense, "compressed eager": Eager(fast), "compressed TorchScript frozen": scripted,
              "compressed fast path (ONNX Runtime artefact)": fast, "dense ONNX Runtime": ort_dense}
    times = {k: [] for k in models}
    with torch.inference_mode():
        for r in range(args.repeats + 1):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                dt = time.perf_counter() - t0
                if r:
                    times[name].append(dt)
                print(f"[{time.strftime('%H:%M:%S')}] round {r} {name}: {dt:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    fingerprint_s = []
    for _ in range(5):  # what every fast call pays to prove the artefact matches the weights
        t0 = time.perf_counter()
        weights_fingerprint(fast)
        fingerprint_s.append(time.perf_counter() - t0)
    result = {"architecture": "TotalSegmentator 1.5 mm (PlainConvUNet, 6 stages 32-320, 25 outputs), random weights",
              "rank_ratio": args.ratio, "input_shape": list(shape), "threads": args.threads,
              "repeats": args.repeats, "seconds": times, "median_s": med,
              "speedup_vs_dense_eager": {k: med["dense eager"] / v for k, v in med.items()},
              "speedup_vs_dense_ort": {k: med["dense ONNX Runtime"] / v for k, v in med.items()},
              "artefact": record, "fingerprint_s": statistics.median(fingerprint_s),
              "compressed_params": sum(p.numel() for p in fast.parameters()), "build_s": {"artefact (export + check)": export_s, "torchscript": script_s,
                                              "dense onnx export + session": dense_export_s},
              "command": " ".join(sys.argv), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fast_path_means.json").write_text(json.dumps(result, indent=2))
    rows = ["| means | median s | × vs dense eager | × vs dense ONNX Runtime |", "|---|---|---|---|"]
    rows += [f"| {k} | {med[k]:.2f} | {result['speedup_vs_dense_eager'][k]:.2f} | "
             f"{result['speedup_vs_dense_ort'][k]:.2f} |" for k in models]
    (out / "fast_path_means.md").write_text(
        f"# Means for fast CPU inference ({result['architecture']}, ratio {args.ratio}, input {shape}, "
        f"{args.threads} threads, {args.repeats} interleaved rounds after a warm-up)\n\n" + "\n".join(rows) +
        f"\n\nArtefact: {record['bytes'] / 1e6:.1f} MB, export + check {export_s:.1f} s; weights fingerprint per "
        f"call: {result['fingerprint_s'] * 1e3:.1f} ms ({result['compressed_params']:,} parameters).\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
