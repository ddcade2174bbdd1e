#!/usr/bin/env python
"""Peak resident memory of the fast CPU path's ONNX Runtime session, with ONNX Runtime's defaults (memory arena and
memory patterns on) and with the fast path's lean setting (patterns off), for one compressed model folder:

    python benchmarks/fast_path_memory.py COMPRESSED_MODEL_FOLDER [--calls 2]

Builds the session from the artefact stored in the checkpoint with the fast path's settings (graph optimizations
on, intra-op threads = torch's, one inter-op thread), in a fresh child process per setting, and prints per call:
seconds, RSS before, peak RSS (VmHWM reset before the call). Explains the end-to-end peak-memory gap in
docs/results/end_to_end_cpu.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time


def measure(folder: str, lean: bool, calls: int) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    from nnunet_green.compression.fast_path import artefact_bytes, artefact_input_shape, session_options
    from nnunet_green.evaluation import peak_rss_mb, reset_peak_rss, rss_mb
    from nnunet_green.nnunet_io import ModelFolder

    net = ModelFolder(folder).load(device="cpu").network.eval()
    opts = session_options(torch.get_num_threads(), lean_memory=lean)
    session = ort.InferenceSession(artefact_bytes(net), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(artefact_input_shape(session), dtype=np.float32)
    name = session.get_inputs()[0].name
    for i in range(calls):
        reset_peak_rss()
        before, t0 = rss_mb(), time.perf_counter()
        out = session.run(None, {name: x})
        seconds = time.perf_counter() - t0
        del out
        print(f"{'lean (fast path)' if lean else 'ORT defaults    '}, call {i + 1}: {seconds:.2f} s, RSS before {before:.0f} MB, "
              f"peak {peak_rss_mb():.0f} MB", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="compressed model folder with a fast-path artefact")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--setting", choices=("default", "lean"), default=None, help=argparse.SUPPRESS)  # the child's
    args = ap.parse_args()
    if args.setting is not None:
        measure(args.folder, args.setting == "lean", args.calls)
        return 0
    for setting in ("default", "lean"):  # a fresh process each: RSS and ONNX Runtime state start alike
        subprocess.run([sys.executable, __file__, args.folder, "--calls", str(args.calls), "--setting", setting],
                       check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
