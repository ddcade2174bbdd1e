"""Sequential calibration: refit each data-aware factorized layer on the inputs the compressed network gives it.

`tucker_(..., calibration=stats)` fits every layer to the DENSE network's inputs, so the errors of the layers before
it are not seen and add up through the network. `refine_sequentially_` then walks the factorized layers in the order
the network runs them: for layer l it runs the dense network and the compressed one (layers before l already
refitted) over the calibration patches up to l's input, streams the compressed input's moments and their cross
moments with the dense input (`InputDrift`), and refits l in closed form to reproduce the dense layer's response
from the input it really gets (`data_aware.calibrated_factors(..., drift=...)`; docs/compression.md). Ranks are kept.

Cost: every layer needs the patches run up to its input through both networks, about one forward of each network
per patch and layer on average over the layers (measured in docs/results/calibration.md).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from .calibration import CalibrationError, CalibrationStats, InputDrift
from .data_aware import calibrated_factors
from .layers import TuckerConv
from .surgery import unique_convs


class _InputReached(Exception):
    """Raised by the pre-hook once the layer's input is seen: the rest of the forward is not needed."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x


def _raise_input(module, args):
    raise _InputReached(args[0])


def input_of(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tensor `layer` gets as input when `model` runs on x (the forward stops there)."""
    handle = layer.register_forward_pre_hook(_raise_input)
    try:
        model(x)
    except _InputReached as reached:
        return reached.x
    finally:
        handle.remove()
    raise CalibrationError(f"{type(layer).__name__} was not run by the network's forward")


def factorized_layers(model: nn.Module) -> dict[str, TuckerConv]:
    """Canonical name (the first in `named_modules()`, as for the conv it replaced) -> TuckerConv."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TuckerConv)}


def execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names (TuckerConv.name) of the factorized layers of `model` in the order a forward on x runs them."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: order.append(n))
             for name, m in factorized_layers(model).items()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))  # a layer run twice counts at its first call


@torch.no_grad()
def refine_sequentially_(compressed: nn.Module, dense: nn.Module, patches: Sequence[torch.Tensor],
                         stats: CalibrationStats, progress: bool = False) -> dict:
    """Refit, in place and in execution order, every factorized layer of `compressed` that `stats` (the dense
    network's statistics on `patches`) has, on the inputs the compressed network gives it. `dense` is the network
    `compressed` was factorized from (unchanged). Returns a record: layers refitted, seconds, per layer the relative
    distance of its compressed input from the dense one on the patches, and the layers kept as they were (fewer
    input voxels on the patches than input channels)."""
    t0 = time.perf_counter()
    dense_convs = {name: conv for name, _, conv in unique_convs(dense)}
    factorized = factorized_layers(compressed)
    modes = compressed.training, dense.training
    compressed.eval(), dense.eval()
    try:
        order = [n for n in execution_order(compressed, torch.as_tensor(patches[0]))
                 if n in stats.layers and n in dense_convs]
        items = order
        if progress:
            from tqdm import tqdm
            items = tqdm(order, desc="sequential calibration", unit="layer", leave=False)
        drift_of, kept = {}, []
        for name in items:
            layer, conv = factorized[name], dense_convs[name]
            drift = InputDrift.zeros(conv.in_channels)
            gap = total = 0.0
            for i, x in enumerate(patches):
                x = torch.as_tensor(x)
                xd, xc = input_of(dense, conv, x), input_of(compressed, layer, x)
                if not drift.add(xd, xc):
                    raise CalibrationError(f"sequential calibration produced non-finite inputs of layer {name} on "
                                           f"patch {i}")
                gap += float(torch.linalg.vector_norm(xd - xc)) ** 2  # fp32: no float64 copies of the activations
                total += float(torch.linalg.vector_norm(xd)) ** 2
            drift_of[name] = round((gap / max(total, 1e-30)) ** 0.5, 5)
            if drift.inputs.voxels < conv.in_channels:  # fewer samples than channels: a regression would overfit
                kept.append(name)
                continue
            first, core, last, bias, _ = calibrated_factors(conv, layer.rank_in, layer.rank_out, stats.layers[name],
                                                            drift=drift)
            layer.set_factors(first, core, last, bias)
    finally:
        compressed.train(modes[0]), dense.train(modes[1])
    return {"layers": len(order) - len(kept), "seconds": round(time.perf_counter() - t0, 2),
            "input_rel_distance": drift_of, "kept_layers": kept}
