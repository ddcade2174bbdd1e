"""Does factorizing a layer pay on THIS machine? Time the dense conv against the TuckerConv that would replace it.

Multiply-adds say little about speed at high resolution with few channels: a rank-8 Tucker chain of a 32-channel
conv at 40x48x40 runs three memory-bound ops instead of one, and can be slower than the dense conv it replaces
(issue 12: the demo network lost 88 % of its parameters and ran at 0.95x). So the speed rule (TuckerConfig
`speed_rule="measured"`, policies.MeasuredSpeed) times each planned layer where the network runs it:

- the layer's input shape comes from one shape-only forward of the model (macs.input_shapes, the shape-hook route
  the multiply-add count uses), at the plans' patch size, batch 1;
- dense conv and TuckerConv (structure only: timing does not depend on the weights' values) run in eager torch,
  no_grad, float32, on the CPU with torch's current thread count, on a random input: one warm-up call each (oneDNN
  builds its kernels on the first call of a shape), then `repeats` interleaved rounds; the medians are compared;
- layers are timed in order of their dense multiply-adds (where the time is) until `max_seconds` is spent (checked
  before each layer: one layer may overrun it); the rest keep the multiply-add rule, and their record says so.

`speed_verdict` is the decision, kept apart from the clock so it can be tested with given timings.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nnunet_green.contract import DEFAULT_LAYER_TIMING_SECONDS, DEFAULT_SPEED_MARGIN, SPEED_RULE_MEASURED

from .cost import TRANSPOSED_CONVS, factorized_params, param_count
from .layers import TuckerConv
from .macs import input_shapes

DEFAULT_REPEATS = 3


@dataclass(frozen=True)
class LayerTiming:
    """Median milliseconds of one dense call and of the factorized chain at `input_shape`."""
    input_shape: tuple[int, ...]
    dense_ms: float
    factorized_ms: float
    threads: int
    repeats: int

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.factorized_ms if self.factorized_ms > 0 else math.inf


# a timer: (conv, (r_in, r_out), input shape) -> LayerTiming; tests inject fixed timings through this
Timer = Callable[[nn.Module, tuple[int, int], tuple[int, ...]], LayerTiming]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _cpu_float(conv: nn.Module) -> nn.Module:
    """The conv itself when it is already a CPU float32 module, else a CPU float32 copy (the model is untouched)."""
    w = conv.weight
    return conv if w.device.type == "cpu" and w.dtype == torch.float32 else copy.deepcopy(conv).float().cpu()


@torch.no_grad()
def time_factorization(conv: nn.Module, ranks: tuple[int, int], input_shape: tuple[int, ...],
                       repeats: int = DEFAULT_REPEATS) -> LayerTiming:
    """Time `conv` against a TuckerConv of it at `ranks` on a random input of `input_shape` (see module doc)."""
    dense = _cpu_float(conv)
    factorized = TuckerConv.from_conv(dense, *ranks)
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"dense": [], "factorized": []}
    for r in range(repeats + 1):  # round 0 is the warm-up
        for name, layer in (("dense", dense), ("factorized", factorized)):
            t0 = time.perf_counter()
            layer(x)
            if r:
                times[name].append(time.perf_counter() - t0)
    return LayerTiming(tuple(input_shape), round(_median(times["dense"]) * 1e3, 3),
                       round(_median(times["factorized"]) * 1e3, 3), torch.get_num_threads(), repeats)


def speed_verdict(timing: LayerTiming, margin: float = DEFAULT_SPEED_MARGIN) -> str | None:
    """None when factorizing pays (factorized < dense x (1 - margin)), else the reason the layer stays dense."""
    if timing.factorized_ms < timing.dense_ms * (1.0 - margin):
        return None
    how = "slower" if timing.factorized_ms >= timing.dense_ms else f"less than {margin:.0%} faster"
    return (f"factorizing is {how} on this machine: {timing.factorized_ms:.2f} ms factorized vs "
            f"{timing.dense_ms:.2f} ms dense at input {tuple(timing.input_shape)}, {timing.threads} "
            f"thread{'s' if timing.threads != 1 else ''}")


def _dense_macs(conv: nn.Module, shape: tuple[int, ...]) -> float:
    """Multiply-adds of the dense layer at input `shape` (the timing order: where the time is)."""
    voxels = math.prod(shape[2:]) * shape[0]
    if not isinstance(conv, TRANSPOSED_CONVS):
        voxels /= math.prod(conv.stride)
    return voxels * conv.in_channels * conv.out_channels * math.prod(conv.kernel_size)


def time_planned_layers(model: nn.Module, ranks: dict[str, tuple[int, int]], input_shape,
                        max_seconds: float = DEFAULT_LAYER_TIMING_SECONDS, timer: Timer | None = None,
                        margin: float = DEFAULT_SPEED_MARGIN) -> dict[str, dict]:
    """{name: timing record} for every layer of `ranks` (canonical name -> planned (r_in, r_out)). A timed record
    has input_shape, ranks, dense/factorized params, dense_ms, factorized_ms, speedup, seconds and `verdict` (None:
    factorize; else the reason to stay dense); an untimed one says why in `untimed` (the multiply-add rule decides)."""
    timer = time_factorization if timer is None else timer
    convs = dict(model.named_modules())
    shapes = input_shapes(model, input_shape)
    order = sorted(ranks, key=lambda n: -_dense_macs(convs[n], shapes[n]) if n in shapes else 0.0)
    records, t_start = {}, time.perf_counter()
    for name in order:
        conv, r = convs[name], tuple(ranks[name])
        rec = {"input_shape": list(shapes[name]) if name in shapes else None, "ranks": list(r),
               "dense_params": param_count(conv),
               "factorized_params": factorized_params(conv, *r)}
        spent = time.perf_counter() - t_start
        if name not in shapes:
            rec["untimed"] = "not called by a forward at this input shape: the multiply-add rule decided"
        elif spent >= max_seconds:
            rec["untimed"] = (f"time bound of {max_seconds:g} s spent before this layer: the multiply-add rule "
                              "decided")
        else:
            t0 = time.perf_counter()
            timing = timer(conv, r, shapes[name])
            rec.update(dense_ms=timing.dense_ms, factorized_ms=timing.factorized_ms,
                       speedup=round(timing.speedup, 3), threads=timing.threads, repeats=timing.repeats,
                       seconds=round(time.perf_counter() - t0, 3), verdict=speed_verdict(timing, margin))
        records[name] = rec
    return records


def busy_warning(load_avg: float, cpus: int, threads: int) -> str | None:
    """Why timings on an oversubscribed machine mislead, or None. Measured on the shared 2-core machine with a
    nice-0 job beside: with 2 torch threads each parallel op waited about one scheduler time slice for its second
    thread (a 320->320 conv at 4^3, ranks 96: 15.9 ms dense, 48.1 ms factorized, medians of 15 calls), while 1
    thread gave 6.4 vs 1.5 ms (docs/results/speed_rule.md)."""
    if load_avg <= cpus:
        return None
    return (f"the machine was busy while the layers were timed (load average {load_avg:.1f} on {cpus} CPUs, "
            f"{threads} torch threads): ops can wait for descheduled threads, so the timings and the layers kept "
            "dense reflect the load more than the layers. Compress on a quiet machine, or with the load and "
            "thread count prediction will run with")


def timing_summary(layers: list[dict], margin: float = DEFAULT_SPEED_MARGIN,
                   max_seconds: float = DEFAULT_LAYER_TIMING_SECONDS, load_avg: float | None = None) -> dict:
    """compression.json "layer_timing": what the speed rule measured and changed, from the per-layer records
    (LayerRecord.to_dict() with their "timing"). `params_kept_dense` is what the rule costs in parameters: the
    layers it kept dense hold that many more than their factorization would have. `load_avg`: the 1-minute load
    average (default: now, right after the timing); above the CPU count the summary carries a `warning`."""
    timed = [lay for lay in layers if lay.get("timing") and "dense_ms" in lay["timing"]]
    kept = [lay for lay in timed if lay["timing"]["verdict"]]
    dense_ms = sum(lay["timing"]["dense_ms"] for lay in timed)
    chosen_ms = sum(lay["timing"]["dense_ms" if lay["timing"]["verdict"] else "factorized_ms"] for lay in timed)
    all_factorized_ms = sum(lay["timing"]["factorized_ms"] for lay in timed)
    threads = timed[0]["timing"]["threads"] if timed else torch.get_num_threads()
    if load_avg is None and hasattr(os, "getloadavg"):  # not on Windows
        load_avg = os.getloadavg()[0]
    warning = busy_warning(load_avg, os.cpu_count() or 1, threads) if timed and load_avg is not None else None
    return {
        "rule": SPEED_RULE_MEASURED, "margin": margin, "max_seconds": max_seconds,
        "how": "per planned layer, dense conv vs TuckerConv at its input shape in the network (plans' patch size, "
               "batch 1), eager torch, no_grad, float32, random weights and input, median after a warm-up",
        "threads": threads, "load_avg": None if load_avg is None else round(load_avg, 2), "cpus": os.cpu_count(),
        "seconds": round(sum(lay["timing"]["seconds"] for lay in timed), 2),
        "timed": len(timed),
        "untimed": [lay["name"] for lay in layers if lay.get("timing") and "untimed" in lay["timing"]],
        "kept_dense": [lay["name"] for lay in kept],
        "params_kept_dense": sum(lay["timing"]["dense_params"] - lay["timing"]["factorized_params"] for lay in kept),
        # the timed layers alone (convs only, no norms/activations): what the rule predicts for them
        "timed_layers_ms": {"dense": round(dense_ms, 2), "all_factorized": round(all_factorized_ms, 2),
                            "as_planned": round(chosen_ms, 2)},
        **({"warning": warning} if warning else {}),
    }
