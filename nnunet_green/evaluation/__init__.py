"""Measuring models, shared by `nnunet-green-bench` and the benchmarks (public API; benchmarks import only this).

* `evaluation.bench.bench(models, out_dir, ...)`: params, MACs, interleaved latency, stock predictions, Dice;
  writes `contract.BenchResult` to OUT/bench.json (import it from the module: the package attribute `bench` is the
  module). `BenchError`, `model_label(folder)` (rank_ratio, rule, kept_fraction of a bench row).
* `forward_seconds`, `interleaved` (`evaluation.timing`): CUDA-synchronised, interleaved forward timing.
* `dice_scores`, `dice_tables`, `summarize`, `case_means`, `foreground_labels`, `DiceError` (`evaluation.dice`);
  `paired_difference(a, b)`: mean per-case difference of two models' Dice with a bootstrap interval.
* `machine_info(device)` (`evaluation.machine`): cpu, ISA, cores, gpu, torch threads, versions, load;
  `rss_mb`, `peak_rss_mb`, `reset_peak_rss`: this process's resident memory and its (resettable) peak.

Names are imported lazily (torch only when a measurement needs it).
"""
from __future__ import annotations

from nnunet_green._lazy import lazy_exports

_EXPORTS = {
    "BenchError": "bench", "markdown": "bench", "model_label": "bench",
    "display_names": "bench",
    "forward_seconds": "timing", "interleaved": "timing", "synchronize": "timing",
    "dice_scores": "dice", "dice_tables": "dice", "summarize": "dice", "foreground_labels": "dice",
    "case_means": "dice", "paired_difference": "dice",
    "read_labels": "dice", "DiceError": "dice",
    "machine_info": "machine", "cpu_model": "machine",
    "reset_peak_rss": "machine", "rss_mb": "machine", "peak_rss_mb": "machine",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
