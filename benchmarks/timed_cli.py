#!/usr/bin/env python
"""Run an installed console script (e.g. `TotalSegmentator`, `nnUNetv2_predict_from_modelfolder`) in this process,
exactly as its wrapper does (`sys.exit(entry_point())`), and record when the network's forwards ran:

    python benchmarks/timed_cli.py FORWARDS.json CONSOLE_SCRIPT [ARGS ...]

The network is the one nnU-Net's predictor builds (`nnUNetPredictor.initialize_from_trained_model_folder`, which
TotalSegmentator calls too): after that method, a forward pre-hook and a forward hook go on the network object
itself - on nothing inside it, so the package's fast path, which steps aside when its layers carry hooks, runs as it
would without this script. That method is wrapped for this process only; nnU-Net is not modified.

FORWARDS.json gets {"calls": [[start, end], ...]} in time.time() seconds, one pair per network call (one per
sliding-window tile), "peak_rss_mb": this process's own peak resident memory (VmHWM: it starts afresh at exec, so
unlike the ru_maxrss a parent gets from wait4 it does not include the launching process's memory), and
"workers_peak_rss_mb": the largest ru_maxrss of the worker processes it waited for (each includes this process's
resident memory at the moment it was started). Used by end_to_end_cpu.py to split a CLI's wall time into network
forwards and the rest.
"""
from __future__ import annotations

import functools
import json
import resource
import sys
import time
from importlib.metadata import entry_points


class ForwardClock:
    def __init__(self):
        self.calls = []

    def before(self, module, args):
        self.calls.append([time.time(), None])

    def after(self, module, args, output):
        self.calls[-1][1] = time.time()

    def watch_predictor_networks(self) -> None:
        """Hook the network of every nnUNetPredictor initialised from a model folder in this process."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        initialize = nnUNetPredictor.initialize_from_trained_model_folder

        @functools.wraps(initialize)
        def initialize_and_watch(predictor, *args, **kwargs):
            initialize(predictor, *args, **kwargs)
            network = getattr(predictor.network, "_orig_mod", predictor.network)
            network.register_forward_pre_hook(self.before)
            network.register_forward_hook(self.after, always_call=True)

        nnUNetPredictor.initialize_from_trained_model_folder = initialize_and_watch


def main() -> int:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    log_path, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    (ep,) = entry_points(group="console_scripts", name=script)
    clock = ForwardClock()
    clock.watch_predictor_networks()
    sys.argv = [script, *args]
    try:
        return ep.load()()
    finally:
        from nnunet_green.evaluation import peak_rss_mb

        with open(log_path, "w") as f:
            json.dump({"calls": [c for c in clock.calls if c[1] is not None], "peak_rss_mb": peak_rss_mb(),
                       "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}, f)


if __name__ == "__main__":  # guarded: nnU-Net's spawned worker processes import this file again
    sys.exit(main())
