"""Rank policies: which convs to factorize, at which (r_in, r_out). Deciding only; `tucker_` applies a plan.

Every policy has `plan(model, input_shape=None, filter_fn=None) -> RankPlan` and `describe() -> str`:

- `UniformRanks(rank_ratio, min_rank, round_to, min_mac_saving)`: the same fraction of every layer's parameters.
- `BudgetedRanks(budget, cost="params"|"macs", min_rank, round_to)`: one global budget spent per layer where the
  weights' singular values say it buys most (`rank_selection.select_ranks`).
- `GivenRanks(ranks)`: exactly the named layers at the named ranks (a plan read back from plans.json, or ranks
  chosen on another fold).

- `CalibratedRanks(budget, calibration, cost, min_rank, round_to, ridge)`: the same global budget, spent by the
  output error each rank step costs as measured on calibration images (`calibration.collect_statistics`,
  `data_aware.spectra`) instead of by the weights' singular values.
- `MeasuredSpeed(base, margin, max_seconds)`: any of the above, then every planned layer timed dense vs factorized
  on this machine at its input shape (`layer_timing`); a layer whose factorization is not faster stays dense.

All of them leave dense what `cost.dense_reason` (the one eligibility rule) refuses, with that reason in the plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, runtime_checkable

from torch import nn

from nnunet_green.contract import (DEFAULT_LAYER_TIMING_SECONDS, DEFAULT_MIN_RANK, DEFAULT_RANK_RATIO,
                                   DEFAULT_ROUND_TO, DEFAULT_SPEED_MARGIN)

from .calibration import DEFAULT_RIDGE, CalibrationStats

from .cost import check_factorizable, dense_reason, mac_fraction
from .decompose import tucker_ranks
from .layer_timing import Timer, time_planned_layers
from .rank_selection import COSTS, select_ranks
from .surgery import unique_convs

FilterFn = Callable[[nn.Module, str], bool]
EXCLUDED = "excluded by filter_fn"


@dataclass(frozen=True)
class RankPlan:
    """What a policy decided: canonical name -> (r_in, r_out) for the layers to factorize, and for every other
    conv the reason it stays dense."""
    ranks: dict[str, tuple[int, int]]
    dense: dict[str, str] = field(default_factory=dict)
    rule: str = ""
    timings: dict[str, dict] = field(default_factory=dict)  # MeasuredSpeed: per timed layer (layer_timing)


@runtime_checkable
class RankPolicy(Protocol):
    def plan(self, model: nn.Module, input_shape=None, filter_fn: FilterFn | None = None) -> RankPlan: ...

    def describe(self) -> str: ...


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def _is_fraction(x, high_inclusive: bool) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return False
    return 0.0 < x <= 1.0 if high_inclusive else 0.0 < x < 1.0


@dataclass(frozen=True)
class UniformRanks:
    """rank_ratio: fraction of each layer's weight parameters kept (1.0 = full rank, exact, every conv with a
    spatial kernel factorized). min_rank / round_to: rank floor and rounding (multiples of round_to where the
    channel count allows). min_mac_saving: a layer is factorized only if it saves at least this fraction of its
    multiply-adds (ignored at rank_ratio 1.0)."""
    rank_ratio: float = DEFAULT_RANK_RATIO
    min_rank: int = DEFAULT_MIN_RANK
    round_to: int = DEFAULT_ROUND_TO
    min_mac_saving: float = 0.1

    def __post_init__(self):
        if not _is_fraction(self.rank_ratio, high_inclusive=True):
            raise ValueError(f"rank_ratio must be a number with 0 < rank_ratio <= 1 (fraction of each layer's "
                             f"weight parameters kept); got {self.rank_ratio!r}")
        _check_int("min_rank", self.min_rank, 1)
        _check_int("round_to", self.round_to, 1)
        m = self.min_mac_saving
        if isinstance(m, bool) or not isinstance(m, (int, float)) or math.isnan(m) or not 0.0 <= m < 1.0:
            raise ValueError(f"min_mac_saving must satisfy 0 <= min_mac_saving < 1; got {m!r}")

    def describe(self) -> str:
        return f"uniform rank ratio {self.rank_ratio:g}"

    def layer(self, conv: nn.Module) -> tuple[int | None, int | None, str | None]:
        """(rank_in, rank_out, None) to factorize `conv`, or (None, None, reason) to leave it dense."""
        full = self.rank_ratio >= 1.0
        reason = dense_reason(conv, 1 if full else self.min_rank)
        if reason is not None:
            return None, None, reason
        k = math.prod(conv.kernel_size)
        if full:
            return (*tucker_ranks(conv.in_channels, conv.out_channels, k, 1.0), None)
        r_in, r_out = tucker_ranks(conv.in_channels, conv.out_channels, k, self.rank_ratio, self.min_rank,
                                   self.round_to)
        frac = mac_fraction(conv, r_in, r_out)
        if frac > 1.0 - self.min_mac_saving:
            return None, None, (f"no multiply-add gain: ranks ({r_in}, {r_out}) of ({conv.in_channels}, "
                                f"{conv.out_channels}) would keep {frac:.0%} of the multiply-adds")
        return r_in, r_out, None

    def plan(self, model: nn.Module, input_shape=None, filter_fn: FilterFn | None = None) -> RankPlan:
        ranks, dense = {}, {}
        for name, _, conv in unique_convs(model):
            if filter_fn is not None and not filter_fn(conv, name):
                dense[name] = EXCLUDED
                continue
            r_in, r_out, reason = self.layer(conv)
            if reason is None:
                ranks[name] = (r_in, r_out)
            else:
                dense[name] = reason
        return RankPlan(ranks, dense, self.describe())


@dataclass(frozen=True)
class BudgetedRanks:
    """budget: the factorizable layers keep at most this fraction of their dense `cost` ("params", or "macs" at
    the plan's input_shape), spent per layer by singular-value energy (greedy; a layer may stay dense when that is
    the better buy). Ranks are multiples of round_to, at least min_rank."""
    budget: float
    cost: str = "params"
    min_rank: int = DEFAULT_MIN_RANK
    round_to: int = DEFAULT_ROUND_TO
    weights: Mapping[str, float] | None = None  # per-layer weight of the error objective (default 1)

    def __post_init__(self):
        if not _is_fraction(self.budget, high_inclusive=False):
            raise ValueError(f"budget must be a fraction 0 < budget < 1 of the dense cost kept; got {self.budget!r}")
        if self.cost not in COSTS:
            raise ValueError(f"budget_cost must be 'params' or 'macs'; got {self.cost!r}")
        _check_int("min_rank", self.min_rank, 1)
        _check_int("round_to", self.round_to, 1)

    def describe(self) -> str:
        return (f"budgeted ranks: {self.budget:g} of the factorizable layers' {self.cost} "
                "(singular-value energy, greedy)")

    def plan(self, model: nn.Module, input_shape=None, filter_fn: FilterFn | None = None) -> RankPlan:
        sel = select_ranks(model, self.budget, self.cost, input_shape=input_shape, min_rank=self.min_rank,
                           round_to=self.round_to, weights=None if self.weights is None else dict(self.weights),
                           filter_fn=filter_fn)
        dense = dict(sel.skipped)
        dense.update({c.name: f"kept dense: the {self.cost} budget buys more accuracy here than a factorization"
                      for c in sel.layers if c.rank_in is None})
        return RankPlan(dict(sel.ranks), dense, self.describe())


@dataclass(frozen=True)
class CalibratedRanks:
    """budget: as BudgetedRanks, but each layer's error per rank step is the output error measured on calibration
    images (input-mode whitened singular values and output-mode eigenvalues of `data_aware.spectra`, after the
    following InstanceNorm where there is one), not the weights' singular-value energy. `calibration`: the
    statistics of the model being planned (`calibration.collect_statistics`)."""
    budget: float
    calibration: CalibrationStats = field(compare=False, repr=False)
    cost: str = "params"
    min_rank: int = DEFAULT_MIN_RANK
    round_to: int = DEFAULT_ROUND_TO
    ridge: float = DEFAULT_RIDGE

    def __post_init__(self):
        BudgetedRanks(self.budget, self.cost, self.min_rank, self.round_to)  # same checks
        if not isinstance(self.calibration, CalibrationStats):
            raise TypeError("calibration must be the CalibrationStats of the model (calibration.collect_statistics)")

    def describe(self) -> str:
        return (f"calibrated ranks: {self.budget:g} of the factorizable layers' {self.cost} "
                f"(output error on {self.calibration.patches} calibration patches, greedy)")

    def plan(self, model: nn.Module, input_shape=None, filter_fn: FilterFn | None = None) -> RankPlan:
        from .data_aware import spectra

        convs = {name: conv for name, _, conv in unique_convs(model)}
        energies = {}
        for name, stats in self.calibration.layers.items():
            if name in convs:
                sp = spectra(convs[name], stats, self.ridge)
                energies[name] = (sp.energy_out, sp.energy_in)
        sel = select_ranks(model, self.budget, self.cost, input_shape=input_shape, min_rank=self.min_rank,
                           round_to=self.round_to, filter_fn=filter_fn, spectra=energies)
        dense = dict(sel.skipped)
        dense.update({c.name: f"kept dense: the {self.cost} budget buys more accuracy here than a factorization"
                      for c in sel.layers if c.rank_in is None})
        return RankPlan(dict(sel.ranks), dense, self.describe())


@dataclass(frozen=True)
class GivenRanks:
    """Exactly the layers in `ranks` (canonical name -> (r_in, r_out)); a name that is no conv of the model is a
    KeyError, a named layer that cannot be factorized a ValueError (an explicit request is not skipped silently)."""
    ranks: Mapping[str, tuple[int, int]]
    rule: str = "given ranks"

    def describe(self) -> str:
        return self.rule

    def plan(self, model: nn.Module, input_shape=None, filter_fn: FilterFn | None = None) -> RankPlan:
        convs = unique_convs(model)
        unknown = set(self.ranks) - {name for name, _, _ in convs}
        if unknown:
            raise KeyError(f"tucker_: ranks name no conv of {type(model).__name__}: {', '.join(sorted(unknown))}")
        ranks, dense = {}, {}
        for name, _, conv in convs:
            if filter_fn is not None and not filter_fn(conv, name):
                dense[name] = EXCLUDED
            elif name not in self.ranks:
                dense[name] = "not among the given ranks"
            else:
                check_factorizable(conv, name)
                r_in, r_out = self.ranks[name]
                ranks[name] = (int(r_in), int(r_out))
        return RankPlan(ranks, dense, self.describe())


@dataclass(frozen=True)
class MeasuredSpeed:
    """`base`'s plan, minus the layers whose factorization is not faster on this machine: each planned layer is
    timed dense vs factorized at its input shape in the network (`input_shape` of plan(): batch 1, the plans' patch
    size), and stays dense unless factorized < dense x (1 - margin). Layers not timed within `max_seconds` keep
    base's decision (the multiply-add rule), and say so. The timing records go into the plan (and the layer
    records). `timer`: (conv, ranks, input shape) -> LayerTiming, for tests; default layer_timing's clock."""
    base: RankPolicy
    margin: float = DEFAULT_SPEED_MARGIN
    max_seconds: float = DEFAULT_LAYER_TIMING_SECONDS
    timer: Timer | None = field(default=None, compare=False, repr=False)

    SUFFIX = "; layers left dense where factorizing is not faster on this machine (measured)"

    def __post_init__(self):
        if not isinstance(self.base, RankPolicy):
            raise TypeError(f"MeasuredSpeed: base must be a rank policy, got {type(self.base).__name__}")
        m = self.margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or math.isnan(m) or not 0.0 <= m < 1.0:
            raise ValueError(f"margin must satisfy 0 <= margin < 1; got {m!r}")
        s = self.max_seconds
        if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s) or s <= 0:
            raise ValueError(f"max_seconds must be a number > 0; got {s!r}")

    def describe(self) -> str:
        return self.base.describe() + self.SUFFIX

    def plan(self, model: nn.Module, input_shape=None, filter_fn: FilterFn | None = None) -> RankPlan:
        if input_shape is None:
            raise ValueError("speed_rule 'measured' times each layer where the network runs it: give tucker_ the "
                             "input_shape (batch 1, the plans' patch size, e.g. (1, 1, 128, 128, 128))")
        base = self.base.plan(model, input_shape=input_shape, filter_fn=filter_fn)
        timings = time_planned_layers(model, base.ranks, input_shape, self.max_seconds, self.timer, self.margin)
        ranks, dense = dict(base.ranks), dict(base.dense)
        for name, rec in timings.items():
            if rec.get("verdict"):
                del ranks[name]
                dense[name] = rec["verdict"]
        return RankPlan(ranks, dense, self.describe(), {**base.timings, **timings})
