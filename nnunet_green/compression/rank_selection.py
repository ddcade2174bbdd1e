"""Budgeted per-layer Tucker ranks: spend a global parameter (or multiply-add) budget where it buys most energy.

The uniform rule (`TuckerConfig.rank_ratio`) keeps the same fraction of every layer. Layers differ: some kernels
have fast-decaying singular values (cheap to compress), others need high rank. Here each layer's error is estimated
from the singular-value energy of its two channel unfoldings: with kept energy fractions f_out and f_in of the
C_out- and C_in-mode unfoldings, relative squared error ~= 1 - f_out * f_in (exact when the two projections act
independently; to first order it equals the HOSVD bound (1 - f_out) + (1 - f_in), and unlike the bound it never
exceeds 1). Ranks are raised greedily,
always taking the step with the largest reduction of the (weighted) relative squared error per unit of cost, until
the budget is spent. A layer can also be left dense when that is the better buy (zero error for its full cost).
Rule and comparison: docs/recovery.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .cost import TRANSPOSED_CONVS, dense_params, dense_reason, factorized_params, mac_fraction
from .decompose import one_thread
from .surgery import unique_convs

COSTS = ("params", "macs")


@dataclass
class LayerChoice:
    name: str
    in_channels: int
    out_channels: int
    dense_cost: float
    rank_in: int | None  # None: left dense
    rank_out: int | None
    cost: float
    est_rel_error: float  # from the singular-value bound (0 when dense)


@dataclass
class RankSelection:
    budget: float  # fraction of the eligible layers' dense cost allowed
    cost: str
    dense_cost: float  # of the eligible layers
    selected_cost: float
    ranks: dict[str, tuple[int, int]]
    layers: list[LayerChoice] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layers not eligible, with the reason

    @property
    def kept_fraction(self) -> float:
        return self.selected_cost / self.dense_cost


def channel_spectra(weight: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values (descending, float64) of the C_out- and C_in-mode unfoldings of a conv weight,
    from the eigenvalues of the small Gram matrices (fast and stable here, see decompose.gram_svd)."""
    w = weight.detach().to(torch.float32)
    if transposed:  # ConvTranspose weight is (C_in, C_out, *k)
        w = w.transpose(0, 1)
    out = w.reshape(w.shape[0], -1)
    inn = w.transpose(0, 1).reshape(w.shape[1], -1)
    spectra = []
    for m in (out, inn):
        ev = torch.linalg.eigvalsh((m @ m.T).double()).flip(0).clamp_min(0)
        spectra.append(ev)
    return spectra[0], spectra[1]


def rank_candidates(channels: int, min_rank: int, round_to: int) -> list[int]:
    """Allowed ranks of one mode: multiples of round_to from min_rank up (plus the full channel count)."""
    lo = min(min_rank, channels)
    if round_to > 1 and channels >= round_to:
        first = max(round_to, math.ceil(lo / round_to) * round_to)
        cands = set(range(first, channels + 1, round_to))
    else:
        cands = set(range(lo, channels + 1))
    cands.add(channels)
    return sorted(c for c in cands if c >= lo)


def _tails(energy: torch.Tensor) -> list[float]:
    """tails[r] = energy dropped when keeping the r leading singular vectors."""
    total = energy.sum()
    kept = torch.cat([torch.zeros(1, dtype=energy.dtype), energy.cumsum(0)])
    return [float(total - k) for k in kept]


def select_ranks(model: nn.Module, budget: float, cost: str = "params", input_shape=None, min_rank: int = 8,
                 round_to: int = 8, weights: dict[str, float] | None = None, filter_fn=None,
                 spectra: dict | None = None) -> RankSelection:
    """Per-layer (r_in, r_out) for the convs of `model` such that the factorized eligible layers cost at most
    `budget` x their dense cost (cost = "params", or "macs" which needs `input_shape` incl. batch).

    Objective minimised (greedily): sum over layers of weight * (estimated relative squared error), weight 1 by
    default, because every nnU-Net conv is followed by a normalisation that removes the weight's scale: what
    matters per layer is its relative error. Eligible layers: those `cost.dense_reason` accepts at `min_rank` and
    `filter_fn(module, canonical_name)` (if given) keeps. `spectra` ({name: (energy_out, energy_in)}, e.g. from
    calibration statistics) replaces the weights' singular values; each mode's kept fraction is then taken of its
    own total, and layers without an entry stay dense."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be a fraction 0 < budget < 1 of the dense cost, got {budget!r}")
    if cost == "macs" and input_shape is None:
        raise ValueError("cost='macs' needs input_shape (the full input shape including batch)")
    dense_macs = None
    if cost == "macs":
        from .macs import mac_breakdown
        dense_macs = mac_breakdown(model, input_shape)

    layers, skipped = [], {}
    with one_thread():
        for name, _, conv in unique_convs(model):
            reason = "excluded by filter_fn" if filter_fn is not None and not filter_fn(conv, name) else \
                dense_reason(conv, min_rank)
            if reason is not None:
                skipped[name] = reason
                continue
            if cost == "params":
                dense_c = float(dense_params(conv))
                cost_fn = (lambda c: (lambda ri, ro: float(factorized_params(c, ri, ro))))(conv)
            else:
                if dense_macs.get(name) is None:
                    skipped[name] = "not called by a forward of input_shape"
                    continue
                dense_c = float(dense_macs[name])
                cost_fn = (lambda c, d: (lambda ri, ro: d * mac_fraction(c, ri, ro)))(conv, dense_c)
            if spectra is None:
                e_out, e_in = channel_spectra(conv.weight, isinstance(conv, TRANSPOSED_CONVS))
            elif name in spectra:
                e_out, e_in = spectra[name]
            else:
                skipped[name] = "no calibration statistics (not called by the calibration forward)"
                continue
            w = 1.0 if weights is None else float(weights.get(name, 1.0))
            layers.append(dict(name=name, conv=conv, dense=dense_c, k=math.prod(conv.kernel_size), cost_fn=cost_fn,
                               norm_out=max(float(e_out.sum()), 1e-30), norm_in=max(float(e_in.sum()), 1e-30),
                               w=w, tail_out=_tails(e_out), tail_in=_tails(e_in),
                               c_in=rank_candidates(conv.in_channels, min_rank, round_to),
                               c_out=rank_candidates(conv.out_channels, min_rank, round_to)))
    if not layers:
        raise ValueError("no layer of the model can be factorized (need convs with a spatial kernel and at least "
                         f"{min_rank} channels)")

    def err(layer, i_in, i_out):  # weighted relative squared error estimate at candidate indices
        if layer.get("is_dense"):
            return 0.0
        kept_in = 1.0 - layer["tail_in"][layer["c_in"][i_in]] / layer["norm_in"]
        kept_out = 1.0 - layer["tail_out"][layer["c_out"][i_out]] / layer["norm_out"]
        return layer["w"] * max(0.0, 1.0 - kept_in * kept_out)

    def cur_cost(layer):
        if layer.get("is_dense"):
            return layer["dense"]
        return layer["cost_fn"](layer["c_in"][layer["i_in"]], layer["c_out"][layer["i_out"]])

    dense_total = sum(layer["dense"] for layer in layers)
    limit = budget * dense_total
    for layer in layers:
        layer["i_in"] = layer["i_out"] = 0
    spent = sum(cur_cost(layer) for layer in layers)
    if spent > limit * (1 + 1e-9):
        raise ValueError(f"budget {budget:g} is below what the minimum ranks (min_rank={min_rank}) cost: "
                         f"{spent / dense_total:.4f} of the dense {cost}")

    # greedy: best gain per cost among "raise r_in one step", "raise r_out one step", "leave the layer dense"
    while True:
        best = None
        for layer in layers:
            if layer.get("is_dense"):
                continue
            c0 = cur_cost(layer)
            e0 = err(layer, layer["i_in"], layer["i_out"])
            moves = []
            if layer["i_in"] + 1 < len(layer["c_in"]):
                moves.append(("in", layer["i_in"] + 1, layer["i_out"]))
            if layer["i_out"] + 1 < len(layer["c_out"]):
                moves.append(("out", layer["i_in"], layer["i_out"] + 1))
            for kind, ii, io in moves:
                r_in, r_out = layer["c_in"][ii], layer["c_out"][io]
                if r_out > r_in * layer["k"] or r_in > r_out * layer["k"]:
                    continue  # a Tucker-2 core of (r_in, r_out, k) cannot have a larger rank on either mode
                c1 = layer["cost_fn"](r_in, r_out)
                if c1 >= layer["dense"]:
                    continue  # dearer than dense: the "dense" move covers it
                gain, dc = e0 - err(layer, ii, io), c1 - c0
                if spent + dc <= limit and gain > 0:
                    score = gain / max(dc, 1e-12)
                    if best is None or score > best[0]:
                        best = (score, layer, kind, ii, io, dc)
            dc = layer["dense"] - c0
            if e0 > 0 and spent + dc <= limit:
                score = e0 / max(dc, 1e-12)
                if best is None or score > best[0]:
                    best = (score, layer, "dense", None, None, dc)
        if best is None:
            break
        _, layer, kind, ii, io, dc = best
        if kind == "dense":
            layer["is_dense"] = True
        else:
            layer["i_in"], layer["i_out"] = ii, io
        spent += dc

    choices, ranks = [], {}
    for layer in layers:
        if layer.get("is_dense"):
            choices.append(LayerChoice(layer["name"], layer["conv"].in_channels, layer["conv"].out_channels,
                                       layer["dense"], None, None, layer["dense"], 0.0))
            continue
        r_in, r_out = layer["c_in"][layer["i_in"]], layer["c_out"][layer["i_out"]]
        ranks[layer["name"]] = (r_in, r_out)
        rel = math.sqrt(err(layer, layer["i_in"], layer["i_out"]) / layer["w"]) if layer["w"] > 0 else 0.0
        choices.append(LayerChoice(layer["name"], layer["conv"].in_channels, layer["conv"].out_channels,
                                   layer["dense"], r_in, r_out, cur_cost(layer), rel))
    return RankSelection(budget=budget, cost=cost, dense_cost=dense_total, selected_cost=spent, ranks=ranks,
                         layers=choices, skipped=skipped)
