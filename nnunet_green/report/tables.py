"""The report's tables as data: cells with display text, raw value and footnotes; rendered by markdown/html.

Missing values are "—" with a footnote saying why (never 0); estimated energy is "≈… (est.)" with a footnote.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nnunet_green.contract import BASELINE_TRAINER, BENCH_FILE, MANIFEST_FILE
from nnunet_green.report.collect import (DEFAULT_PLANS, EARLY_STOPS, STOP_REASONS, Inputs, Setting, _get,
                                         number, recovery_figures)

DASH = "—"


@dataclass
class Cell:
    text: str
    notes: list[int] = field(default_factory=list)
    estimate: bool = False


class Notes:
    """Numbered footnotes of one table; identical texts share a number."""

    def __init__(self):
        self.texts: list[str] = []

    def ref(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1


@dataclass
class Table:
    title: str
    columns: list[tuple[str, str]]          # (key, header)
    rows: list[dict[str, Cell]]
    records: list[dict]                     # raw values per row, for report.json and the plots
    notes: Notes = field(default_factory=Notes)
    remarks: list[str] = field(default_factory=list)  # sentences printed under the table


# --- number formatting ---------------------------------------------------------------------------------------------
def fmt_duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_energy(j: float) -> str:
    kwh = j / 3.6e6
    return f"{j:,.0f} J ({kwh:.3g} kWh)" if j >= 10 else f"{j:.3g} J ({kwh:.3g} kWh)"


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f}"


def fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def fmt_factor(x: float) -> str:
    return f"{x:.2f}×"


# --- training ------------------------------------------------------------------------------------------------------
def memory_metric(settings: list[Setting]) -> tuple[str | None, str]:
    """The one memory figure compared across settings: GPU allocated peak if any run had a GPU, else host RSS.
    Mixing the two would compare different things."""
    if any(s.values.get("gpu_mem_alloc_peak_mb") is not None for s in settings):
        return "gpu_mem_alloc_peak_mb", "peak GPU memory (allocated)"
    if any(s.values.get("host_rss_peak_mb") is not None for s in settings):
        return "host_rss_peak_mb", "peak host memory (RSS)"
    return None, "memory"


def baseline(settings: list[Setting]) -> Setting | None:
    """The fp32 baseline: the `BASELINE_TRAINER` run with nnU-Net's default plans (a light-plans run of the same
    trainer is compared to it), else any run of that trainer."""
    fp32 = [s for s in settings if s.values.get("trainer") == BASELINE_TRAINER]
    return next((s for s in fp32 if s.values.get("plans") in (None, DEFAULT_PLANS)), fp32[0] if fp32 else None)


def training_table(inputs: Inputs) -> Table | None:
    settings = inputs.settings
    if not settings:
        return None
    base = baseline(settings)
    mem_key, mem_label = memory_metric(settings)
    cols = [("setting", "Setting"), ("precision", "Precision"), ("optimizer", "Optimizer"), ("folds", "Fold(s)"),
            ("parameters", "Params"), ("dice", "Dice"), ("time", "Training time"), ("energy", "Energy"),
            ("co2", "CO2eq"), ("gpu_mem", "Peak GPU mem"), ("host_mem", "Peak host mem"),
            ("opt_state", "Optimizer state"), ("dice_per_kj", "Dice/kJ"), ("energy_source", "Energy source")]
    if base is not None:
        cols[7:7] = [("x_time", "×time")]
        cols[9:9] = [("x_energy", "×energy")]
        cols.insert(cols.index(("host_mem", "Peak host mem")) + 1, ("x_mem", "×mem"))
    t = Table("Training runs", cols, [], [])
    if base is not None:
        t.remarks.append(f"×time, ×energy, ×mem: relative to the fp32 baseline `{base.name}` (1.00× = same, "
                         f"<1 = cheaper); ×mem compares {mem_label}.")
    else:
        t.remarks.append(f"No `{BASELINE_TRAINER}` run among the inputs, so no relative columns.")
    if len({s.values["folds"] for s in settings}) > 1 or any(s.values["folds"] > 1 for s in settings):
        t.remarks.append("A model folder with several folds is one row: training time, energy and CO2eq are "
                         "summed over its folds, Dice is the mean over folds, peak memory the maximum. ×time, "
                         "×energy, Dice/kJ and the figures compare the cost per fold (total ÷ folds).")
    t.remarks.append("Training time is the sum of the logged epochs; energy and CO2eq also include nnU-Net's "
                     "final validation where it was metered.")
    dice_sources = {s.values.get("dice_source", "").split(",")[0] for s in settings if s.values.get("dice_source")}
    if len(dice_sources) > 1:
        t.remarks.append("Dice comes from different sources across rows (see its footnotes: final validation vs "
                         "online pseudo Dice); compare those rows with care.")
    carbon = {(c["intensity_g_per_kwh"], c["country"]) for s in settings for c in s.values.get("carbon", [])}
    if carbon:
        t.remarks.append("CO2eq = energy × carbon intensity (" + ", ".join(
            f"{i:g} g/kWh{f' ({c})' if c else ''}" for i, c in sorted(carbon, key=str) if i is not None) + ").")

    for s in settings:
        v, why = s.values, s.reasons
        cell: dict[str, Cell] = {}

        def put(col, value, text_fn, reason_key=None, estimate=False, extra_notes=()):
            if value is None:
                reason = why.get(reason_key or col, "not available")
                cell[col] = Cell(DASH, [t.notes.ref(reason)])
            else:
                text = text_fn(value)
                notes = [t.notes.ref(n) for n in extra_notes]
                if estimate:
                    text = f"≈{text} (est.)"
                cell[col] = Cell(text, notes, estimate)

        cell["setting"] = Cell(s.name)
        put("precision", v["precision"], str)
        put("optimizer", v["optimizer"], str)
        cell["folds"] = Cell(", ".join(v["fold_names"]))
        put("parameters", v["parameters"], fmt_count)
        put("dice", v["dice"], lambda x: f"{x:.4f}", extra_notes=[f"Dice: {v['dice_source']}"] if v["dice_source"]
            else [])
        put("time", v["time_s"], fmt_duration, "time_s")
        est = s.energy_estimated
        energy_notes = [why[k] for k in ("energy_estimate", "energy_partial") if k in why]
        put("energy", v["energy_j"], fmt_energy, "energy_j", est, energy_notes)
        put("co2", v["co2eq_g"], lambda x: f"{x:.3g} g", "co2eq_g", est)
        put("gpu_mem", v["gpu_mem_alloc_peak_mb"], fmt_mb, "gpu_mem_alloc_peak_mb")
        put("host_mem", v["host_rss_peak_mb"], fmt_mb, "host_rss_peak_mb")
        put("opt_state", v["optimizer_state_bytes"], lambda b: f"{b / 1024 ** 2:.1f} MB", "optimizer_state_bytes")
        put("dice_per_kj", v["dice_per_kj"], lambda x: f"{x:.3g}", estimate=est)
        put("energy_source", v["energy_source"], str)
        rel = {}
        if base is not None:
            for col, key, is_est in (("x_time", "time_s_per_fold", False),
                                     ("x_energy", "energy_j_per_fold", est or base.energy_estimated),
                                     ("x_mem", mem_key, False)):
                a, b = (v.get(key), base.values.get(key)) if key else (None, None)
                rel[col] = a / b if a is not None and b else None
                if rel[col] is None:
                    if not key:
                        reason = "no memory recorded in any run"
                    elif a is None:  # same footnote as this row's own missing value
                        reason = why.get(key.replace("_per_fold", ""), "not available")
                    else:
                        reason = f"the baseline {base.name} has no value here (see its row)"
                    cell[col] = Cell(DASH, [t.notes.ref(reason)])
                else:
                    text = fmt_factor(rel[col])
                    cell[col] = Cell(f"≈{text} (est.)" if is_est else text, [], is_est)
        t.rows.append(cell)
        rec = {"setting": s.name, "folder": str(s.folder), "energy_estimated": est,
               **{k: val for k, val in v.items() if k != "carbon"}, "carbon": v.get("carbon"),
               "relative_to_baseline": ({"baseline": base.name, "memory_metric": mem_key, **rel}
                                        if base is not None else None),
               "missing_reasons": {k: r for k, r in why.items() if k not in ("energy_estimate", "energy_partial")},
               "display": {k: c.text for k, c in cell.items()},
               "footnotes": {k: [t.notes.texts[i - 1] for i in c.notes] for k, c in cell.items() if c.notes}}
        if est:
            rec["estimate_note"] = why.get("energy_estimate")
        t.records.append(rec)
    return t


# --- stopping and data wait ---------------------------------------------------------------------------------------
EXTRAPOLATED = "extrapolated"
EXTRAPOLATION_NOTE = "estimate, not measured: the epochs not trained at this run's mean measured epoch"


def fmt_stop(p: dict) -> str:
    """'plateau after epoch 41 (best EMA pseudo-Dice 0.8512 at epoch 31)', 'full schedule (100 epochs)'; after a
    cool-down: 'plateau after epoch 41 (...); 5 cool-down epochs, stopped after epoch 46'."""
    reason = p["reason"]
    if reason == "schedule_complete":
        n = p["epochs_scheduled"] if p["epochs_scheduled"] is not None else p["epochs_trained"]
        return f"full schedule ({n:.0f} epochs)"
    label = STOP_REASONS.get(reason, reason)
    cooled = reason == "plateau" and p.get("plateau_epoch") is not None and p.get("cooldown_epochs")
    at = p["plateau_epoch"] if cooled else p["epoch"]
    text = f"{label} after epoch {at}" if at is not None else label
    if reason == "plateau" and p["best_epoch"] is not None:
        best = f"{p['best_ema_pseudo_dice']:.4f} " if p["best_ema_pseudo_dice"] is not None else ""
        text += f" (best EMA pseudo-Dice {best}at epoch {p['best_epoch']})"
    if cooled:
        text += f"; {p['cooldown_epochs']} cool-down epochs, stopped after epoch {p['epoch']}"
    elif p["budget"]:
        text += f" (budget {p['budget']})"
    return text


def stopping_table(inputs: Inputs) -> Table | None:
    """Per setting: how training ended, what stopping early saved against the full schedule (extrapolated), and
    the share of the training time spent waiting for data."""
    settings = inputs.settings
    if not settings:
        return None
    cols = [("setting", "Setting"), ("stop", "Stop"), ("epochs", "Epochs trained / scheduled"),
            ("epochs_saved", "Epochs saved"), ("time_saved", "Time saved (extrapolated)"),
            ("energy_saved", "Energy saved (extrapolated)"), ("data_wait", "Data wait")]
    t = Table("Stopping and data loading", cols, [], [])
    t.remarks.append("Stop: why training ended — an early stop (plateau of nnU-Net's EMA pseudo-Dice, energy or "
                     "time budget; nnUNet_green_patience / _budget_kwh / _budget_hours) after the epoch shown "
                     "(0-based, as nnU-Net counts), or the full schedule. A plateau is followed by "
                     "nnUNet_green_cooldown epochs that anneal the learning rate before the stop.")
    t.remarks.append("Time and energy saved are extrapolated, never measured: the epochs not trained × this run's "
                     "mean measured epoch, as the trainer recorded in green_summary.json (stopping.full_schedule); "
                     "a full schedule saved nothing. Several folds: epochs, time and energy summed.")
    t.remarks.append("Data wait: share of the training time (train_s) the training loop spent waiting for batches "
                     "from nnU-Net's data loader; a large share means the accelerator starves (see "
                     "nnunet-green-loader).")
    for s in settings:
        v, why = s.values, s.reasons
        per = v["stopping"]
        cell: dict[str, Cell] = {"setting": Cell(s.name)}

        def dash(reason):
            return Cell(DASH, [t.notes.ref(reason)])

        known = [p for p in per if p["reason"]]
        if not known:
            cell["stop"] = dash(why.get("stop_reason", "not recorded"))
        else:
            multi = len(per) > 1
            texts = [fmt_stop(p) if p["reason"] else DASH for p in per]
            if multi and len(set(texts)) == 1:  # every fold ended the same way
                parts = [f"{texts[0]}, all {len(per)} folds"]
            else:
                parts = [(f"fold {p['fold']}: " if multi else "") + text for p, text in zip(per, texts)]
            notes = [f"policy: {p['policy']}" for p in per if p["policy"] and p["reason"] in EARLY_STOPS]
            notes += [p["inferred"] for p in per if p["inferred"]]
            notes += [(f"fold {p['fold']}: " if multi else "") + p["missing"] for p in per
                      if p["missing"] and not p["reason"]]
            cell["stop"] = Cell("; ".join(parts), [t.notes.ref(n) for n in dict.fromkeys(notes)])
        sched = v["epochs_scheduled"]
        cell["epochs"] = Cell(f"{v['epochs_trained']} / {DASH if sched is None else sched}",
                              [] if sched is not None else [t.notes.ref("number of scheduled epochs (num_epochs) "
                                                                        "not recorded")])
        nothing_saved = v["epochs_saved"] == 0 and not v["saved_extrapolated"]
        if v["epochs_saved"] is None:
            cell["epochs_saved"] = dash(why["epochs_saved"])
        elif nothing_saved:
            cell["epochs_saved"] = Cell("none")
        else:
            share = f" ({v['epochs_saved'] / sched:.0%} of the schedule)" if sched else ""
            cell["epochs_saved"] = Cell(f"{v['epochs_saved']}{share}")
        method = [f"estimate, not measured — {v['saved_method']}" if v["saved_method"] else EXTRAPOLATION_NOTE]
        for col, key, fmt, extra in (("time_saved", "time_saved_s", fmt_duration, []),
                                     ("energy_saved", "energy_saved_j", fmt_energy,
                                      [why["energy_estimate"]] if s.energy_estimated else [])):
            if v[key] is None:
                cell[col] = dash(why[key])
            elif nothing_saved:
                cell[col] = Cell("none")
            else:
                est = " (est.)" if extra else ""
                cell[col] = Cell(f"≈{fmt(v[key])} ({EXTRAPOLATED}){est}",
                                 [t.notes.ref(n) for n in method + extra], True)
        if v["data_wait_fraction"] is None:
            cell["data_wait"] = dash(why["data_wait_fraction"])
        else:
            wait = f" ({fmt_duration(v['data_wait_s'])})" if v["data_wait_s"] is not None else ""
            cell["data_wait"] = Cell(f"{v['data_wait_fraction']:.1%}{wait}",
                                     [t.notes.ref(f"data wait: {v['data_wait_source']}")])
        t.rows.append(cell)
        t.records.append({"setting": s.name, **{k: v[k] for k in STOPPING_KEYS},
                          "missing_reasons": {k: why[k] for k in STOPPING_KEYS if k in why},
                          "display": {k: c.text for k, c in cell.items()},
                          "footnotes": {k: [t.notes.texts[i - 1] for i in c.notes] for k, c in cell.items()
                                        if c.notes}})
    return t


STOPPING_KEYS = ("stop_reason", "stop_epoch", "epochs_trained", "epochs_scheduled", "epochs_saved", "time_saved_s",
                 "energy_saved_j", "saved_extrapolated", "saved_method", "data_wait_s", "data_wait_fraction",
                 "data_wait_source", "stopping")


# --- compressed models ---------------------------------------------------------------------------------------------
def _resolve(p) -> str | None:
    if not p:
        return None
    try:
        return str(Path(p).expanduser().resolve())
    except OSError:
        return str(p)


DENSE_RULE = "dense"
NOT_BENCHMARKED = f"not benchmarked: no {BENCH_FILE} among the inputs lists this folder"


def compression_records(inputs: Inputs) -> list[dict]:
    """One record per benchmarked model (joined by path to its compression.json and to a training run), plus one
    per compressed folder that no bench.json lists."""
    manifests = {_resolve(c.folder): c for c in inputs.compressed}
    runs = {_resolve(s.folder): s.name for s in inputs.settings}
    records, benched = [], set()
    multi = len(inputs.benches) > 1
    for b in inputs.benches:
        res = b.result
        models = [m for m in res.models if isinstance(m, dict)]
        if len(models) < len(res.models):
            inputs.warnings.append(f"{b.path}: {len(res.models) - len(models)} model row(s) are not JSON objects; "
                                   "left out")
        ref_name = res.reference
        ref = next((m for m in models if m.get("name") == ref_name), models[0] if models else None)
        ref_lat = number(_get(ref, "latency_s", "median"))
        for m in models:
            path = _resolve(m.get("path"))
            benched.add(path)
            c = manifests.get(path)
            r = _record(m.get("name") or Path(path or "?").name, path, c, runs, inputs.warnings)
            lat = number(_get(m, "latency_s", "median"))
            r.update(bench=str(b.path) if multi else None, is_reference=m is ref, latency_s=lat,
                     speedup=(ref_lat / lat if lat and ref_lat else None),
                     predict_wall_s=number(m.get("predict_wall_s")),
                     agreement_dice=number(m.get("agreement_dice")), dice_vs_labels=number(m.get("dice_vs_labels")),
                     device=res.device or None, has_labels=bool(res.labels) or any(
                         number(x.get("dice_vs_labels")) is not None for x in models))
            if r["rank_ratio"] is None:
                r["rank_ratio"] = number(m.get("rank_ratio"))
            if isinstance(m.get("rule"), str) and m["rule"]:  # the bench's rule wins (it names what was timed)
                r["rule"], r["rule_from"] = m["rule"], "bench"
            if c is None:  # no manifest: sizes from the bench, relative to its reference
                r["params_after"], r["macs_after"] = number(m.get("params")), number(m.get("macs"))
                if ref is not None and m is not ref:
                    r["params_before"], r["macs_before"] = number(ref.get("params")), number(ref.get("macs"))
                if r["source_path"] is None and ref is not None and m is not ref:
                    r["source_path"] = _resolve(ref.get("path"))
                if r["rule"] is None:
                    r["rule"], r["rule_from"] = _rule_without_manifest(m, m is ref, r["rank_ratio"])
            if number(m.get("kept_fraction")) is not None:
                r["kept_fraction"] = number(m.get("kept_fraction"))
            records.append(_derive(r))
    for path, c in manifests.items():
        if path not in benched:
            r = _record(Path(path).name, path, c, runs, inputs.warnings)
            r.update(bench=None, is_reference=False, latency_s=None, speedup=None, predict_wall_s=None,
                     agreement_dice=None, dice_vs_labels=None, device=None, has_labels=False, not_benchmarked=True)
            records.append(_derive(r))
    return records


def _rule_without_manifest(m: dict, is_ref: bool, ratio):
    """(rule, where from) of a bench row whose compression.json is not among the inputs, written by a bench of an
    earlier version (no "rule" key)."""
    if ratio is not None:
        return f"ratio {ratio:g}", "bench rank_ratio"
    if is_ref:
        return DENSE_RULE, "bench reference"
    return None, None


def _record(name, path, c, runs, warnings) -> dict:
    man = c.manifest if c else None
    tot, cfg = (man.totals, man.config) if man else ({}, {})
    src = _resolve(_get(man.source, "path")) if man else None
    layers = [layer for layer in (man.layers if man else []) if isinstance(layer, dict)]
    return {"name": name, "path": path, "compressed": c is not None, "rank_ratio": number(cfg.get("rank_ratio")),
            "budget": number(cfg.get("budget")), "budget_cost": cfg.get("budget_cost"),
            "rule": man.rule_label if man else None, "rule_from": MANIFEST_FILE if man else None,
            "rank_rule": (man.rank_rule or None) if man else None,
            "kept_fraction": man.kept_fraction if man else None,
            "recovery": recovery_figures(c, warnings) if c else None,
            "half": cfg.get("half"), "source_path": src, "source_run": runs.get(src) or runs.get(path),
            "params_before": number(tot.get("params_before")), "params_after": number(tot.get("params_after")),
            "macs_before": number(tot.get("macs_before")), "macs_after": number(tot.get("macs_after")),
            "decomposition_s": number(tot.get("decomposition_s")), "patch_size": man.patch_size if man else None,
            "factorized_layers": sum(bool(layer.get("factorized")) for layer in layers), "layers": len(layers)}


def _derive(r: dict) -> dict:
    pb, pa, mb, ma = r["params_before"], r["params_after"], r["macs_before"], r["macs_after"]
    r["params_removed_frac"] = 1 - pa / pb if pa is not None and pb else None
    r["macs_ratio"] = ma / mb if ma is not None and mb else None
    if r["kept_fraction"] is None:
        if pa is not None and pb:
            r["kept_fraction"] = pa / pb
        elif r.get("is_reference") or (not r["compressed"] and r.get("rule") == DENSE_RULE):
            r["kept_fraction"] = 1.0
    return r


def fmt_recovery(rec: dict) -> str:
    """'distilled, 200 steps (best at 150): held-out agreement 0.912 → 0.968, rel. error 0.41 → 0.22'."""
    parts = []
    steps = rec.get("steps_done") if rec.get("steps_done") is not None else rec.get("steps")
    head = rec["kind"]
    if steps is not None:
        head += f", {steps:.0f} steps"
        if rec.get("kept_step") is not None and rec["kept_step"] != steps:
            head += f" (kept step {rec['kept_step']:.0f})"
    if rec.get("epochs") is not None:
        head += f", {rec['epochs']:.0f} epochs"

    def arrow(label, a, b, spec):
        if a is None and b is None:
            return
        fa = DASH if a is None else format(a, spec)
        fb = DASH if b is None else format(b, spec)
        parts.append(f"{label} {fa} → {fb}")

    arrow("held-out agreement", rec.get("heldout_agreement_before"), rec.get("heldout_agreement_after"), ".3f")
    arrow("rel. error", rec.get("heldout_rel_error_before"), rec.get("heldout_rel_error_after"), ".3f")
    if rec.get("dice") is not None:
        parts.append(f"Dice {rec['dice']:.4f}")
    if rec.get("folds_averaged", 1) > 1:
        parts.append(f"mean of {rec['folds_averaged']} folds")
    return head + (": " + ", ".join(parts) if parts else "")


def compression_table(records: list[dict]) -> Table | None:
    if not records:
        return None
    cols = [("model", "Model"), ("source", "Source run"), ("rule", "Rule"), ("kept", "Params kept"),
            ("params", "Params"), ("macs", "MACs"), ("latency", "Latency (median)"), ("agreement", "Agreement Dice"),
            ("dice_labels", "Dice vs labels"), ("recovery", "Recovery"), ("decomp", "Decomposition time")]
    multi = any(r.get("bench") for r in records)
    if multi:
        cols.append(("bench", "Bench"))
    t = Table("Compressed models", cols, [], records)
    t.remarks.append("Rule: how the Tucker ranks were chosen — \"ratio r\": every layer keeps the fraction r of its "
                     "weights; \"budget b params\" (or macs): per-layer ranks chosen so that the factorizable layers "
                     "keep at most b of their dense cost; \"calibrated\": ranks chosen on calibration images; "
                     "\"+ distilled\" / \"+ fine-tuned\": accuracy recovered after compression (see Recovery).")
    t.remarks.append("Params kept: parameters after ÷ before compression, the x axis of the compression figures, so "
                     "models of every rule are compared on one scale. Params: % removed vs the uncompressed model. "
                     f"MACs: ratio compressed/uncompressed at the patch size in {MANIFEST_FILE} (or the bench patch). "
                     "Latency: median forward pass of one patch; speed-up vs the bench's reference model, measured on "
                     "the same machine.")
    if any(r.get("recovery") for r in records):
        t.remarks.append("Recovery: distillation reports its held-out patches before → after (agreement = share of "
                         "voxels whose predicted class matches the dense model; rel. error = relative logit error), "
                         "fine-tuning its epochs and the Dice of its own validation.")
    for r in records:
        c: dict[str, Cell] = {}

        def dash(reason):
            return Cell(DASH, [t.notes.ref(reason)])

        name = r["name"] + (" (reference)" if r.get("is_reference") else "")
        c["model"] = Cell(name + (" [fp16]" if r.get("half") else ""))
        c["source"] = Cell(r["source_run"] or (Path(r["source_path"]).name if r["source_path"] else DASH))
        if r["rule"]:
            # how a budget chose its ranks (a uniform ratio says it all in its label)
            detail = r.get("rank_rule") if r["rank_ratio"] is None else None
            c["rule"] = Cell(r["rule"], [t.notes.ref(f"ranks: {detail}")] if detail else [])
        elif not r["compressed"] and r.get("is_reference"):
            c["rule"] = Cell(DENSE_RULE)
        else:
            c["rule"] = dash(f"rule not recorded: no {MANIFEST_FILE} among the inputs and a {BENCH_FILE} without "
                             "\"rule\" (an earlier version)")
        c["kept"] = (Cell(f"{r['kept_fraction']:.3f}") if r["kept_fraction"] is not None
                     else dash("parameter count not recorded"))
        if r["params_after"] is None:
            c["params"] = dash("parameter count not recorded")
        else:
            extra = f" (−{r['params_removed_frac']:.1%})" if r["params_removed_frac"] is not None else ""
            c["params"] = Cell(fmt_count(r["params_after"]) + extra)
        if r["macs_after"] is None:
            c["macs"] = dash("MACs not recorded")
        else:
            extra = f" ({r['macs_ratio']:.2f}×)" if r["macs_ratio"] is not None else ""
            c["macs"] = Cell(fmt_count(r["macs_after"]) + extra)
        if r["latency_s"] is None:
            c["latency"] = dash(NOT_BENCHMARKED)
        else:
            sp = "" if r.get("is_reference") or r["speedup"] is None else f" ({r['speedup']:.2f}× speed-up)"
            c["latency"] = Cell(f"{r['latency_s'] * 1000:.1f} ms{sp}")
        if r["agreement_dice"] is not None:
            c["agreement"] = Cell(f"{r['agreement_dice']:.4f}")
        elif r.get("is_reference"):
            c["agreement"] = dash("the reference model: agreement Dice is measured against its predictions")
        elif r.get("not_benchmarked"):
            c["agreement"] = dash(NOT_BENCHMARKED)
        else:
            c["agreement"] = dash("bench run without images (--images): no predictions to compare")
        if r["dice_vs_labels"] is not None:
            c["dice_labels"] = Cell(f"{r['dice_vs_labels']:.4f}")
        elif r.get("not_benchmarked"):
            c["dice_labels"] = dash(NOT_BENCHMARKED)
        else:
            c["dice_labels"] = dash("bench run without reference labels (--labels)")
        if r.get("recovery"):
            c["recovery"] = Cell(fmt_recovery(r["recovery"]))
        elif r["compressed"]:
            c["recovery"] = Cell("none")
        else:
            c["recovery"] = dash("uncompressed model, or its compression.json is not among the inputs")
        if r["decomposition_s"] is not None:
            c["decomp"] = Cell(fmt_duration(r["decomposition_s"]))
        else:
            c["decomp"] = dash("uncompressed model: no decomposition" if not r["compressed"]
                               else "decomposition time not recorded")
        if multi:
            c["bench"] = Cell(Path(r["bench"]).parent.name if r.get("bench") else DASH)
        t.rows.append(c)
        r["display"] = {k: cell.text for k, cell in c.items()}
        r["footnotes"] = {k: [t.notes.texts[i - 1] for i in cell.notes] for k, cell in c.items() if cell.notes}
    return t
