"""The verb: `tucker_(model, policy_or_config, filter_fn)` = plan the ranks (a rank policy), then factorize.

`TuckerConfig` is the one-object form (rank rule + decomposition settings, as the CLI and compression.json record
it); `config.policy()` is the rank policy it stands for. `factorize_structure_` builds the factorized structure
without decomposing (to strict-load a saved factorized state dict). With `calibration=` (statistics of the model on
calibration images, `calibration.collect_statistics`) the factors are data-aware (`data_aware.py`) and a budget is
spent by measured output error (`CalibratedRanks`); without, the decomposition is weight-only (HOSVD + HOOI).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

from torch import nn

from nnunet_green.contract import (DECOMPOSITION_CALIBRATED, DECOMPOSITION_WEIGHT_ONLY, DEFAULT_MIN_RANK,
                                   DEFAULT_RANK_RATIO, DEFAULT_ROUND_TO, DEFAULT_SPEED_RULE, SPEED_RULE_MEASURED,
                                   SPEED_RULES)

from .calibration import DEFAULT_RIDGE, CalibrationStats
from .cost import TRANSPOSED_CONVS, factorized_params, mac_fraction, param_count  # noqa: F401  (re-exported)
from .decompose import decompose_conv_weight, one_thread
from .layers import TuckerConv, gemm_pointwise_
from .policies import (BudgetedRanks, CalibratedRanks, GivenRanks, MeasuredSpeed, RankPlan, RankPolicy, UniformRanks,
                       _check_int)
from .surgery import canonical_name, conv_aliases, parent_refs, replace_everywhere, unique_convs  # noqa: F401


@dataclass(frozen=True)
class TuckerConfig:
    """Rank rule and decomposition settings in one frozen dataclass.

    Rank rule: `rank_ratio` / `min_rank` / `round_to` / `min_mac_saving` as `UniformRanks`; with `budget` set,
    `BudgetedRanks(budget, budget_cost, min_rank, round_to)` instead (rank_ratio is then unused; budget_cost
    "macs" needs tucker_'s input_shape). Decomposition: `n_iter_max` HOOI sweeps after the SVD init (0 = HOSVD);
    `gemm_pointwise` also runs the 1x1 convs left dense (segmentation heads) as GEMMs (same state dict).
    `ridge`: regularisation of the input covariances of a calibrated decomposition (times their mean eigenvalue).
    `speed_rule`: "macs" (the rank rule alone) or "measured": the rule's layers are also timed dense vs factorized
    on this machine at tucker_'s input_shape and left dense where factorizing is not faster (MeasuredSpeed)."""
    rank_ratio: float = DEFAULT_RANK_RATIO
    min_rank: int = DEFAULT_MIN_RANK
    round_to: int = DEFAULT_ROUND_TO
    n_iter_max: int = 2
    min_mac_saving: float = 0.1
    gemm_pointwise: bool = True
    budget: float | None = None
    budget_cost: str = "params"
    ridge: float = DEFAULT_RIDGE
    speed_rule: str = DEFAULT_SPEED_RULE

    def __post_init__(self):
        _check_int("n_iter_max", self.n_iter_max, 0)
        if not isinstance(self.speed_rule, str) or self.speed_rule not in SPEED_RULES:
            raise ValueError(f"speed_rule must be one of {', '.join(map(repr, SPEED_RULES))}; "
                             f"got {self.speed_rule!r}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not 0 < self.ridge < 1:
            raise ValueError(f"ridge must be a number with 0 < ridge < 1; got {self.ridge!r}")
        self._uniform()  # validates the rank settings even when a budget replaces the ratio
        self.policy()

    def _uniform(self) -> UniformRanks:
        return UniformRanks(self.rank_ratio, self.min_rank, self.round_to, self.min_mac_saving)

    def policy(self, calibration: CalibrationStats | None = None) -> RankPolicy:
        """The rank policy this config stands for (a budget with calibration statistics: CalibratedRanks), wrapped
        in MeasuredSpeed for speed_rule "measured"."""
        if self.budget is not None and calibration is not None:
            rule = CalibratedRanks(self.budget, calibration, self.budget_cost, self.min_rank, self.round_to,
                                   self.ridge)
        elif self.budget is not None:
            rule = BudgetedRanks(self.budget, self.budget_cost, self.min_rank, self.round_to)
        else:
            rule = self._uniform()
        return MeasuredSpeed(rule) if self.speed_rule == SPEED_RULE_MEASURED else rule

    @property
    def ranks_from_first_fold(self) -> bool:
        """True when the plan depends on more than the architecture (a budget: the weights; the measured speed
        rule: timings, which vary run to run), so the folds of one folder share the first fold's ranks (one
        plans.json holds one architecture)."""
        return self.budget is not None or self.speed_rule == SPEED_RULE_MEASURED

    def describe(self) -> str:
        return self.policy().describe()


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
    decomposition: str | None = None  # "weight-only" or "calibrated" (factorized layers)
    est_output_rel_error: float | None = None  # calibrated: from the statistics (docs/compression.md)
    input_rank_deficient: bool | None = None  # calibrated: input covariance needed its ridge
    reason: str | None = None
    seconds: float = 0.0  # decomposition time of this layer
    timing: dict | None = None  # speed rule "measured": dense vs factorized ms on this machine (layer_timing)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel_size"], d["stride"] = list(self.kernel_size), list(self.stride)
        return d


def plan_layer(conv: nn.Module, config: TuckerConfig) -> tuple[int | None, int | None, str | None]:
    """The uniform rule of `config` for one layer: (rank_in, rank_out, None) or (None, None, reason)."""
    return config._uniform().layer(conv)


def tucker_(model: nn.Module, policy: TuckerConfig | RankPolicy = TuckerConfig(),
            filter_fn: Callable[[nn.Module, str], bool] | None = None, progress: bool = False, input_shape=None,
            ranks: dict[str, tuple[int, int]] | None = None, *, n_iter_max: int | None = None,
            gemm_pointwise: bool | None = None, calibration: CalibrationStats | None = None) -> list[LayerRecord]:
    """Factorize the convs of `model` in place; one LayerRecord per unique conv considered (dense ones too, with
    the reason).

    `policy`: a TuckerConfig, or a rank policy (UniformRanks, BudgetedRanks, GivenRanks, ...).
    filter_fn(module, canonical_name) -> False leaves a layer dense. `input_shape` (full shape incl. batch): the
    records get measured per-layer multiply-adds (fake-tensor forward, no compute), and MAC budgets need it.
    `ranks` (canonical name -> (r_in, r_out)) replaces the policy's choice: exactly those layers are factorized.
    n_iter_max / gemm_pointwise: decomposition settings (default: the TuckerConfig's, else 2 / True).
    `calibration`: statistics of THIS model on calibration images (`calibration.collect_statistics`): layers with
    statistics get data-aware factors, and a TuckerConfig budget becomes CalibratedRanks.
    """
    ridge = DEFAULT_RIDGE
    if isinstance(policy, TuckerConfig):
        n_iter_max = policy.n_iter_max if n_iter_max is None else n_iter_max
        gemm_pointwise = policy.gemm_pointwise if gemm_pointwise is None else gemm_pointwise
        ridge = policy.ridge
        policy = policy.policy(calibration if ranks is None else None)
    elif isinstance(policy, (CalibratedRanks, MeasuredSpeed)):  # the ridge of a calibrated rule, also wrapped
        ridge = getattr(policy.base if isinstance(policy, MeasuredSpeed) else policy, "ridge", DEFAULT_RIDGE)
    elif not isinstance(policy, RankPolicy):
        raise TypeError(f"tucker_: expected a TuckerConfig or a rank policy (UniformRanks, BudgetedRanks, ...), "
                        f"got {type(policy).__name__}")
    if ranks is not None:
        policy = GivenRanks(ranks)
    plan = policy.plan(model, input_shape=input_shape, filter_fn=filter_fn)
    return apply_plan_(model, plan, n_iter_max=2 if n_iter_max is None else n_iter_max,
                       gemm_pointwise=True if gemm_pointwise is None else gemm_pointwise, progress=progress,
                       input_shape=input_shape, calibration=calibration, ridge=ridge)


def apply_plan_(model: nn.Module, plan: RankPlan, n_iter_max: int = 2, gemm_pointwise: bool = True,
                progress: bool = False, input_shape=None, calibration: CalibrationStats | None = None,
                ridge: float = DEFAULT_RIDGE) -> list[LayerRecord]:
    """Decompose the layers of `plan` in place (every reference of a conv gets the same TuckerConv); data-aware
    factors for the layers `calibration` has statistics of, weight-only (HOSVD + HOOI) for the others."""
    from .data_aware import calibrated_factors, reconstruction_error
    from .macs import mac_breakdown

    macs_before = mac_breakdown(model, input_shape) if input_shape is not None else None
    refs = parent_refs(model)
    records: list[LayerRecord] = []
    items = unique_convs(model)
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc=f"tucker ({plan.rule or 'plan'})", unit="layer")
    with one_thread():
        for name, aliases, conv in items:
            rec = LayerRecord(name=name, aliases=aliases, kind=type(conv).__name__, in_channels=conv.in_channels,
                              out_channels=conv.out_channels, kernel_size=tuple(conv.kernel_size),
                              stride=tuple(conv.stride), rank_in=None, rank_out=None,
                              params_before=param_count(conv), params_after=param_count(conv),
                              timing=plan.timings.get(name))
            if name not in plan.ranks:
                rec.reason = plan.dense.get(name, "not in the rank plan")
            else:
                r_in, r_out = plan.ranks[name]
                t0 = time.perf_counter()
                stats = None if calibration is None else calibration.layers.get(name)
                if stats is None:
                    first, core, last, err = decompose_conv_weight(conv.weight, r_in, r_out,
                                                                   isinstance(conv, TRANSPOSED_CONVS), n_iter_max)
                    bias = conv.bias.detach() if conv.bias is not None else None
                    rec.decomposition = DECOMPOSITION_WEIGHT_ONLY
                else:
                    first, core, last, bias, info = calibrated_factors(conv, r_in, r_out, stats, ridge)
                    err = reconstruction_error(conv, first, core, last)
                    rec.decomposition = DECOMPOSITION_CALIBRATED
                    rec.est_output_rel_error = info["est_output_rel_error"]
                    rec.input_rank_deficient = info["input_rank_deficient"]
                new = TuckerConv.from_conv(conv, r_in, r_out, name=name)
                new.set_factors(first, core, last, bias)
                new.train(conv.training)
                replace_everywhere(refs, conv, new, name)
                rec.seconds = time.perf_counter() - t0
                rec.rank_in, rec.rank_out, rec.rel_error, rec.factorized = r_in, r_out, err, True
                rec.params_after = param_count(new)
            records.append(rec)
    if gemm_pointwise:
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


def apply_ranks_(model: nn.Module, ranks: dict[str, tuple[int, int]], n_iter_max: int = 2,
                 gemm_pointwise: bool = True) -> dict[str, float]:
    """Decompose the named convs of `model` in place at the given ranks; returns {name: relative error}."""
    records = tucker_(model, GivenRanks(ranks), n_iter_max=n_iter_max, gemm_pointwise=gemm_pointwise)
    return {r.name: r.rel_error for r in records if r.factorized}


def factorize_structure_(model: nn.Module, ranks: dict[str, tuple[int, int]] | dict[str, list[int]],
                         gemm_pointwise: bool = True) -> None:
    """Replace the named convs (canonical names) by TuckerConv of the given (r_in, r_out) without decomposing
    (weights are arbitrary), so a state dict saved from a tucker_'d model strict-loads. Aliases stay shared.
    gemm_pointwise: like TuckerConfig.gemm_pointwise (does not change the state dict)."""
    by_name = dict(model.named_modules())
    refs = parent_refs(model)
    for name, r in ranks.items():
        if name not in by_name:
            canonical = canonical_name(model, name)
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
        replace_everywhere(refs, conv, new, name)
    if gemm_pointwise:
        gemm_pointwise_(model)


def ranks_of(records_or_model) -> dict[str, list[int]]:
    """{canonical name: [r_in, r_out]} of the factorized layers, from tucker_ records or a factorized model
    (JSON-friendly: this is what goes into plans.json as `tucker_ranks`)."""
    if isinstance(records_or_model, nn.Module):
        return {name: [m.rank_in, m.rank_out] for name, m in records_or_model.named_modules()
                if isinstance(m, TuckerConv)}
    return {r.name: [r.rank_in, r.rank_out] for r in records_or_model if r.factorized}
