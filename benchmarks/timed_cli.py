#!/usr/bin/env python
"""Run an installed console script (e.g. `TotalSegmentator`, `nnUNetv2_predict_from_modelfolder`) in this process,
exactly as its wrapper does (`sys.exit(entry_point())`), and record when the outermost torch module calls ran:

    python benchmarks/timed_cli.py FORWARDS.json CONSOLE_SCRIPT [ARGS ...]

FORWARDS.json gets {"calls": [[start, end], ...]} in time.time() seconds: one pair per top-level module call (the
network's forward on each sliding-window tile; calls nested inside it are not counted again), "peak_rss_mb": this
process's own peak resident memory (VmHWM: it starts afresh at exec, so unlike the ru_maxrss a parent gets from
wait4 it does not include the launching process's memory), and "workers_peak_rss_mb": the largest ru_maxrss of the
worker processes it waited for (each includes this process's resident memory at the moment it was started). Global module hooks
cost microseconds per module call, nothing against a forward of seconds. Used by end_to_end_cpu.py to split a CLI's
wall time into network forwards and the rest.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from importlib.metadata import entry_points


class ForwardClock:
    def __init__(self):
        self.depth, self.calls = 0, []

    def before(self, module, args):
        if self.depth == 0:
            self.calls.append([time.time(), None])
        self.depth += 1

    def after(self, module, args, output):
        self.depth -= 1
        if self.depth == 0:
            self.calls[-1][1] = time.time()


def main() -> int:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    log_path, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    (ep,) = entry_points(group="console_scripts", name=script)
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    clock = ForwardClock()
    register_module_forward_pre_hook(clock.before)
    register_module_forward_hook(clock.after, always_call=True)
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
