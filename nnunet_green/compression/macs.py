"""Multiply-add counting by shape hooks on a fake-tensor forward (no real compute, no weight copies)."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _shape_forward(model: nn.Module, input_shape, dtype=torch.float32) -> None:
    """One forward without real compute: FakeTensorMode propagates shapes only (the real weights are wrapped,
    not copied). Meta-device stand-ins were tried first but InstanceNorm's meta decomposition mixes devices."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        model(torch.empty(tuple(input_shape), dtype=dtype))


def module_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-adds of one call (bias additions not counted); 0 for modules that are not conv/linear."""
    if isinstance(module, _CONV):
        k = math.prod(module.kernel_size)
        return out.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, _CONVT):
        k = math.prod(module.kernel_size)
        return inp.numel() * (module.out_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


def _canonical_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, m in model.named_modules():  # first name wins = canonical name
        names.setdefault(id(m), name)
    return names


def hooked_shape_forward(model: nn.Module, input_shape, on_call, select, dtype: torch.dtype = torch.float32) -> None:
    """THE shape-hook route: one fake-tensor forward of `input_shape` (shapes only) calling
    `on_call(canonical_name, module, input, output)` for every call of a module `select(module)` accepts. Counting
    multiply-adds, executed parameters and per-layer input shapes all go through here."""
    names = _canonical_names(model)

    def hook(module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        on_call(names.get(id(module), type(module).__name__), module, args[0], out)

    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in model.modules()}.values() if select(m)]
    try:
        _shape_forward(model, input_shape, dtype)
    finally:
        for h in handles:
            h.remove()


def _counted(m: nn.Module) -> bool:
    return isinstance(m, _CONV + _CONVT + (nn.Linear,))


def mac_breakdown(model: nn.Module, input_shape, dtype: torch.dtype = torch.float32) -> "OrderedDict[str, int]":
    """Multiply-adds per conv/linear module (canonical name, in call order) for one forward of `input_shape`
    (full shape including batch, e.g. (1, 1, 128, 128, 128)). The model's weights are untouched: the forward
    runs under FakeTensorMode (shapes only), so a 128^3 forward costs about a second, not minutes."""
    counts: "OrderedDict[str, int]" = OrderedDict()

    def count(name, module, inp, out):
        n = module_macs(module, inp, out)
        if n:
            counts[name] = counts.get(name, 0) + n

    hooked_shape_forward(model, input_shape, count, _counted, dtype)
    return counts


def input_shapes(model: nn.Module, input_shape, dtype: torch.dtype = torch.float32) -> dict[str, tuple[int, ...]]:
    """{canonical name: shape of its input} of every conv/linear module for one forward of `input_shape` (shapes
    only, as mac_breakdown). A module called more than once keeps its first call (nnU-Net calls each conv once)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooked_shape_forward(model, input_shape, lambda name, m, inp, out: shapes.setdefault(name, tuple(inp.shape)),
                         _counted, dtype)
    return shapes


def count_macs(model: nn.Module, input_shape) -> int:
    """Total multiply-adds of conv, transposed conv and linear layers for one forward of `input_shape`
    (including batch). Counts what the forward actually runs (e.g. deep-supervision heads only if enabled)."""
    return sum(mac_breakdown(model, input_shape).values())


def executed_params(model: nn.Module, input_shape) -> int:
    """Parameters of the modules that one forward actually calls (each parameter once). For PlainConvUNet without
    deep supervision this drops the unused deep-supervision heads, which is how published counts are quoted."""
    called = {}
    hooked_shape_forward(model, input_shape, lambda name, m, inp, out: called.setdefault(id(m), m),
                         lambda m: not list(m.children()))
    seen = {}
    for m in called.values():
        for p in m.parameters(recurse=False):
            seen[id(p)] = p.numel()
    return sum(seen.values())
