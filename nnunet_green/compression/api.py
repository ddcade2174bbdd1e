"""Public entry points: TuckerConfig, tucker_ (decompose in place), factorize_structure_ (structure only)."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .decompose import decompose_conv_weight, tucker_ranks
from .layers import SUPPORTED_CONVS, TuckerConv, check_factorizable, gemm_pointwise_

_TRANSPOSED = (nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class TuckerConfig:
    """rank_ratio: fraction of each layer's weight parameters kept (1.0 = full rank, exact, every conv with a
    spatial kernel factorized). min_rank / round_to: rank floor and rounding (multiples of round_to where the
    channel count allows). n_iter_max: HOOI sweeps after the SVD init (0 = HOSVD). min_mac_saving: a layer is
    factorized only if it saves at least this fraction of its multiply-adds (ignored at rank_ratio 1.0).
    gemm_pointwise: also run the 1x1 convs left dense (segmentation heads) as GEMMs (same state dict).
    budget: instead of the same rank_ratio everywhere, choose per-layer ranks so that the factorizable layers keep
    at most this fraction of their dense `budget_cost` ("params", or "macs" which needs tucker_'s input_shape),
    spent where the singular-value energy says it buys most (rank_selection.select_ranks; rank_ratio is unused)."""
    rank_ratio: float = 0.12
    min_rank: int = 8
    round_to: int = 8
    n_iter_max: int = 2
    min_mac_saving: float = 0.1
    gemm_pointwise: bool = True
    budget: float | None = None
    budget_cost: str = "params"

    def __post_init__(self):
        r = self.rank_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or not 0.0 < r <= 1.0:
            raise ValueError(f"rank_ratio must be a number with 0 < rank_ratio <= 1 (fraction of each layer's "
                             f"weight parameters kept); got {r!r}")
        if int(self.min_rank) != self.min_rank or self.min_rank < 1:
            raise ValueError(f"min_rank must be an integer >= 1; got {self.min_rank!r}")
        if int(self.round_to) != self.round_to or self.round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1; got {self.round_to!r}")
        if int(self.n_iter_max) != self.n_iter_max or self.n_iter_max < 0:
            raise ValueError(f"n_iter_max must be an integer >= 0; got {self.n_iter_max!r}")
        if math.isnan(self.min_mac_saving) or not 0.0 <= self.min_mac_saving < 1.0:
            raise ValueError(f"min_mac_saving must satisfy 0 <= min_mac_saving < 1; got {self.min_mac_saving!r}")
        b = self.budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b)
                              or not 0.0 < b < 1.0):
            raise ValueError(f"budget must be a fraction 0 < budget < 1 of the dense cost kept; got {b!r}")
        if self.budget_cost not in ("params", "macs"):
            raise ValueError(f"budget_cost must be 'params' or 'macs'; got {self.budget_cost!r}")


@dataclass
class LayerRecord:
    name: str
    aliases: list[str]
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    rank_in: int | None
    rank_out: int | None
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    rel_error: float | None = None
    factorized: bool = False
    reason: str | None = None
    seconds: float = 0.0  # decomposition time of this layer

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel_size"], d["stride"] = list(self.kernel_size), list(self.stride)
        return d


def conv_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(conv) -> all its names in `model`, canonical (first in named_modules()) first. Convs inside an existing
    TuckerConv are not listed (already factorized)."""
    names: dict[int, list[str]] = {}
    inside: set[int] = set()
    for m in model.modules():
        if isinstance(m, TuckerConv):
            inside.update(id(c) for c in m.modules() if c is not m)
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, SUPPORTED_CONVS) and id(m) not in inside:
            names.setdefault(id(m), []).append(name)
    return names


def _parent_refs(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    refs: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in {id(m): m for m in model.modules()}.values():
        for key, child in parent._modules.items():
            if child is not None:
                refs.setdefault(id(child), []).append((parent, key))
    return refs


def _replace(refs, old: nn.Module, new: nn.Module, name: str) -> None:
    slots = refs.get(id(old), [])
    if not slots:
        raise ValueError(f"layer '{name}' is the model itself or not reachable from it; cannot replace it")
    for parent, key in slots:
        parent._modules[key] = new  # every reference -> the same new module (aliases stay shared)


@contextlib.contextmanager
def _one_thread():
    """Decompose on one intra-op thread: the small Gram/eigh/matmul calls gain nothing from two threads, and on a
    busy 2-core machine OpenMP spin-waiting made a whole-network decomposition 3-5x slower (3.3 s -> 11-17 s)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def factorized_params(conv: nn.Module, rank_in: int, rank_out: int) -> int:
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
    if isinstance(conv, _TRANSPOSED):  # per input voxel
        fact = c_in * rank_in + k * rank_in * rank_out + s * rank_out * c_out
    else:  # per output voxel
        fact = s * c_in * rank_in + k * rank_in * rank_out + rank_out * c_out
    return fact / dense


def plan_layer(conv: nn.Module, config: TuckerConfig) -> tuple[int | None, int | None, str | None]:
    """(rank_in, rank_out, None) to factorize, or (None, None, reason) to leave the layer dense."""
    k = math.prod(conv.kernel_size)
    try:
        check_factorizable(conv)
    except ValueError as e:
        return None, None, str(e)
    if k == 1:
        return None, None, "1x1 kernel: Tucker-2 adds a layer without saving anything"
    if config.rank_ratio >= 1.0:
        return (*tucker_ranks(conv.in_channels, conv.out_channels, k, 1.0), None)
    if conv.in_channels < config.min_rank or conv.out_channels < config.min_rank:
        return None, None, (f"channels ({conv.in_channels}->{conv.out_channels}) below min_rank={config.min_rank}: "
                            f"input stem / tiny head, that mode cannot be compressed")
    r_in, r_out = tucker_ranks(conv.in_channels, conv.out_channels, k, config.rank_ratio, config.min_rank,
                               config.round_to)
    frac = mac_fraction(conv, r_in, r_out)
    if frac > 1.0 - config.min_mac_saving:
        return None, None, (f"no multiply-add gain: ranks ({r_in}, {r_out}) of ({conv.in_channels}, "
                            f"{conv.out_channels}) would keep {frac:.0%} of the multiply-adds")
    return r_in, r_out, None


def _given_ranks(conv: nn.Module, name: str, ranks: dict) -> tuple[int | None, int | None, str | None]:
    if name not in ranks:
        return None, None, "not among the given ranks"
    check_factorizable(conv, name)  # explicit ranks for an unsupported layer are an error, not a silent skip
    r_in, r_out = ranks[name]
    return int(r_in), int(r_out), None


def tucker_(model: nn.Module, config: TuckerConfig = TuckerConfig(),
            filter_fn: Callable[[nn.Module, str], bool] | None = None, progress: bool = False,
            input_shape=None, ranks: dict[str, tuple[int, int]] | None = None) -> list[LayerRecord]:
    """Factorize the convs of `model` in place; one LayerRecord per unique conv considered (dense ones too).

    filter_fn(module, canonical_name) -> False leaves a layer dense. With `input_shape` (full shape incl. batch)
    the records get measured per-layer multiply-adds (fake-tensor forward, no compute). `ranks` (canonical name ->
    (r_in, r_out), e.g. from rank_selection) replaces the uniform rule: exactly those layers are factorized.
    With `config.budget` (and no `ranks`) the ranks come from rank_selection.select_ranks at that budget.
    """
    if not isinstance(config, TuckerConfig):
        raise TypeError(f"config must be a TuckerConfig, got {type(config).__name__}")
    from .macs import mac_breakdown

    left_dense: dict[str, str] = {}
    if ranks is None and config.budget is not None:
        from .rank_selection import select_ranks

        selection = select_ranks(model, config.budget, config.budget_cost, input_shape=input_shape,
                                 min_rank=config.min_rank, round_to=config.round_to)
        ranks = selection.ranks
        left_dense = {**selection.skipped, **{c.name: f"kept dense: the {config.budget_cost} budget buys more "
                                              "accuracy here than a factorization" for c in selection.layers
                                              if c.rank_in is None}}

    macs_before = mac_breakdown(model, input_shape) if input_shape is not None else None
    aliases = conv_aliases(model)
    unknown = set(ranks or ()) - {names[0] for names in aliases.values()}
    if unknown:
        raise KeyError(f"tucker_: ranks name no conv of {type(model).__name__}: {', '.join(sorted(unknown))}")
    modules = {id(m): m for m in model.modules()}
    refs = _parent_refs(model)
    records: list[LayerRecord] = []
    items = list(aliases.items())
    if progress:
        from tqdm import tqdm
        rule = f"budget={config.budget} ({config.budget_cost})" if config.budget is not None else \
            f"rank_ratio={config.rank_ratio}"
        items = tqdm(items, desc=f"tucker {rule}", unit="layer")
    with _one_thread():
        for key, names in items:
            conv, name = modules[key], names[0]
            rec = LayerRecord(name=name, aliases=names[1:], kind=type(conv).__name__, in_channels=conv.in_channels,
                              out_channels=conv.out_channels, kernel_size=tuple(conv.kernel_size),
                              stride=tuple(conv.stride), rank_in=None, rank_out=None, params_before=_params(conv),
                              params_after=_params(conv))
            if filter_fn is not None and not filter_fn(conv, name):
                rec.reason = "excluded by filter_fn"
            else:
                r_in, r_out, rec.reason = plan_layer(conv, config) if ranks is None else _given_ranks(conv, name, ranks)
                rec.reason = left_dense.get(name, rec.reason) if rec.reason else None
                if rec.reason is None:
                    t0 = time.perf_counter()
                    first, core, last, err = decompose_conv_weight(conv.weight, r_in, r_out,
                                                                   isinstance(conv, _TRANSPOSED), config.n_iter_max)
                    new = TuckerConv.from_conv(conv, r_in, r_out, name=name)
                    new.set_factors(first, core, last, conv.bias.detach() if conv.bias is not None else None)
                    new.train(conv.training)
                    _replace(refs, conv, new, name)
                    rec.seconds = time.perf_counter() - t0
                    rec.rank_in, rec.rank_out, rec.rel_error, rec.factorized = r_in, r_out, err, True
                    rec.params_after = _params(new)
            records.append(rec)
    if config.gemm_pointwise:
        gemm_pointwise_(model)
    if input_shape is not None:
        after = mac_breakdown(model, input_shape)
        for rec in records:
            rec.macs_before = macs_before.get(rec.name)
            if rec.factorized:
                parts = [after.get(f"{rec.name}.{p}") for p in ("first", "core", "last")]
                rec.macs_after = None if None in parts or rec.macs_before is None else sum(parts)
            else:
                rec.macs_after = after.get(rec.name)
    return records


def _canonical_name(model: nn.Module, alias: str) -> str | None:
    target = dict(model.named_modules(remove_duplicate=False)).get(alias)
    if target is None:
        return None
    return next(n for n, m in model.named_modules() if m is target)


def factorize_structure_(model: nn.Module, ranks: dict[str, tuple[int, int]] | dict[str, list[int]],
                         gemm_pointwise: bool = True) -> None:
    """Replace the named convs (canonical names) by TuckerConv of the given (r_in, r_out) without decomposing
    (weights are arbitrary), so a state dict saved from a tucker_'d model strict-loads. Aliases stay shared.
    gemm_pointwise: like TuckerConfig.gemm_pointwise (does not change the state dict)."""
    by_name: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        by_name[name] = m
    refs = _parent_refs(model)
    for name, r in ranks.items():
        if name not in by_name:
            canonical = _canonical_name(model, name)
            hint = f" ('{name}' is an alias; use the canonical name '{canonical}')" if canonical else ""
            raise KeyError(f"factorize_structure_: no module named '{name}' in {type(model).__name__}{hint}")
        conv = by_name[name]
        if isinstance(conv, TuckerConv):
            if (conv.rank_in, conv.rank_out) != tuple(r):
                raise ValueError(f"layer '{name}' is already a TuckerConv with ranks "
                                 f"({conv.rank_in}, {conv.rank_out}), not {tuple(r)}")
            continue
        if len(r) != 2:
            raise ValueError(f"layer '{name}': ranks must be (r_in, r_out), got {r!r}")
        new = TuckerConv.from_conv(conv, int(r[0]), int(r[1]), name=name)
        new.train(conv.training)
        _replace(refs, conv, new, name)
    if gemm_pointwise:
        gemm_pointwise_(model)


def ranks_of(records_or_model) -> dict[str, list[int]]:
    """{canonical name: [r_in, r_out]} of the factorized layers, from tucker_ records or a factorized model
    (JSON-friendly: this is what goes into plans.json as `tucker_ranks`)."""
    if isinstance(records_or_model, nn.Module):
        out = {}
        for name, m in records_or_model.named_modules():
            if isinstance(m, TuckerConv):
                out[name] = [m.rank_in, m.rank_out]
        return out
    return {r.name: [r.rank_in, r.rank_out] for r in records_or_model if r.factorized}
