"""What a factorization costs and which layers may have one.

`dense_reason` is THE eligibility rule: every rank policy, `tucker_` and the model-folder writer ask it, and a
layer it answers for stays dense with that answer as its recorded reason. `factorized_params` and `mac_fraction`
price one layer at given ranks without building it; `param_count` counts a module's parameters once each.
Multiply-adds of a whole forward are counted in `macs` (shape hooks on a fake-tensor forward).
"""
from __future__ import annotations

import math

from torch import nn

SUPPORTED_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
TRANSPOSED_CONVS = (nn.ConvTranspose2d, nn.ConvTranspose3d)


def unsupported_reason(conv: nn.Module) -> str | None:
    """Why `conv` cannot be written as a Tucker-2 chain at all (any ranks), or None if it can."""
    if not isinstance(conv, SUPPORTED_CONVS):
        return f"not a supported conv type ({', '.join(c.__name__ for c in SUPPORTED_CONVS)})"
    if conv.groups != 1:
        return f"groups={conv.groups} is not supported by Tucker-2 factorization (needs groups=1)"
    if isinstance(conv, TRANSPOSED_CONVS) and any(p != 0 for p in conv.output_padding):
        return f"output_padding={tuple(conv.output_padding)} is not supported (only output_padding=0)"
    return None


def dense_reason(conv: nn.Module, min_rank: int = 1) -> str | None:
    """THE eligibility rule: why a rank policy must leave `conv` dense, or None if it may factorize it.

    Unsupported structure (grouped convs, output_padding, other layer types), a 1x1 kernel (Tucker-2 only adds
    layers there), or fewer than `min_rank` channels on a side (input stems, tiny heads: that mode has nothing
    to compress). Whether the chosen ranks actually save multiply-adds is each policy's own test."""
    reason = unsupported_reason(conv)
    if reason is not None:
        return reason
    if math.prod(conv.kernel_size) == 1:
        return "1x1 kernel: Tucker-2 adds a layer without saving anything"
    if conv.in_channels < min_rank or conv.out_channels < min_rank:
        return (f"channels ({conv.in_channels}->{conv.out_channels}) below min_rank={min_rank}: "
                f"input stem / tiny head, that mode cannot be compressed")
    return None


def check_factorizable(conv: nn.Module, name: str | None = None) -> None:
    """Raise ValueError naming the layer if `conv` cannot be a Tucker-2 chain (for explicitly requested ranks,
    where a silent skip would hide a mistake)."""
    reason = unsupported_reason(conv)
    if reason is not None:
        label = f"layer '{name}' ({type(conv).__name__})" if name else type(conv).__name__
        raise ValueError(f"{label}: {reason}")


def param_count(module: nn.Module) -> int:
    """Parameters of `module`, each once (`parameters()` de-duplicates modules reachable under several names)."""
    return sum(p.numel() for p in module.parameters())


def dense_params(conv: nn.Module) -> int:
    return conv.weight.numel() + (conv.out_channels if conv.bias is not None else 0)


def factorized_params(conv: nn.Module, rank_in: int, rank_out: int) -> int:
    """Parameters of the TuckerConv that would replace `conv` at (rank_in, rank_out)."""
    k = math.prod(conv.kernel_size)
    bias = conv.out_channels if conv.bias is not None else 0
    return conv.in_channels * rank_in + rank_in * rank_out * k + rank_out * conv.out_channels + bias


def mac_fraction(conv: nn.Module, rank_in: int, rank_out: int) -> float:
    """Factorized / dense multiply-adds of one layer, independent of the input size: the first 1x1 conv runs at
    the input resolution, core and last at the output resolution (conv), or first and core at the input and last
    at the output resolution (transposed conv); resolutions differ by prod(stride)."""
    k = math.prod(conv.kernel_size)
    s = math.prod(conv.stride)
    c_in, c_out = conv.in_channels, conv.out_channels
    dense = k * c_in * c_out
    if isinstance(conv, TRANSPOSED_CONVS):  # per input voxel
        fact = c_in * rank_in + k * rank_in * rank_out + s * rank_out * c_out
    else:  # per output voxel
        fact = s * c_in * rank_in + k * rank_in * rank_out + rank_out * c_out
    return fact / dense
