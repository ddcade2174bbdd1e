"""Find the report's inputs below the given paths and read them into records.

Inputs: nnU-Net fold folders (`green_log.csv` / `green_summary.json`), model folders (their `fold_*` children),
compressed model folders (`compression.json`) and benchmark results (`bench.json`), read through the records and
names of `nnunet_green.contract` (the writers use the same). Nothing here imports torch: the report must run on a
laptop that only has the result folders.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_green.contract import (BASELINE_TRAINER, BENCH_FILE, BENCH_FORMAT, DEFAULT_PLANS, GREEN_LOG_FILE,
                                   GREEN_SUMMARY_FILE, LATER_LOG_COLUMNS, LOG_COLUMNS, MANIFEST_FILE, BenchResult,
                                   CompressionManifest, GreenError, SchemaError, TrainingSummary)

FOLD_DIR = re.compile(r"fold_(\d+|all)$")
# Folders that never hold inputs but can be large (nnU-Net predictions, caches).
_PRUNE = {"__pycache__", "predictions", "validation", ".git"}
_TEXT_COLUMNS = {"energy_source"}  # green_log.csv columns that are not numbers


class ReportError(GreenError):
    """An input problem the user must fix; the CLI prints it and exits with contract.EXIT_BAD_INPUT."""


@dataclass
class FoldRun:
    folder: Path
    summary: dict
    epochs: list[dict]  # green_log.csv rows: floats, None for empty cells; energy_source stays a string

    @property
    def fold(self) -> str:
        m = FOLD_DIR.match(self.folder.name)
        return m.group(1) if m else self.folder.name


@dataclass
class Setting:
    """One training setting = one model folder (its folds aggregated) or one lone fold folder."""
    name: str
    folder: Path
    folds: list[FoldRun]
    values: dict = field(default_factory=dict)   # field -> number/str or None
    reasons: dict = field(default_factory=dict)  # field -> why it is missing / how to read it
    energy_estimated: bool = False


@dataclass
class Compressed:
    folder: Path
    manifest: CompressionManifest


@dataclass
class Bench:
    path: Path
    result: BenchResult


@dataclass
class Inputs:
    settings: list[Setting]
    compressed: list[Compressed]
    benches: list[Bench]
    warnings: list[str] = field(default_factory=list)


# --- discovery -----------------------------------------------------------------------------------------------------
def discover(paths) -> Inputs:
    """Every input below `paths`, read through the contract records. A record file this version cannot read is an
    error when it was named on the command line, and a warning naming it (the file is skipped) when found in a
    folder."""
    if not paths:
        raise ReportError("no input paths given")
    fold_dirs: dict[Path, None] = {}
    compressed: dict[Path, Compressed] = {}
    benches: dict[Path, Bench] = {}
    warnings: list[str] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise ReportError(f"{raw}: no such file or folder")
        p = p.resolve()
        before = len(fold_dirs) + len(compressed) + len(benches)
        skipped: list[str] = []
        if p.is_file():
            if p.name in (GREEN_LOG_FILE, GREEN_SUMMARY_FILE):
                if p.name == GREEN_SUMMARY_FILE:
                    _read_record(TrainingSummary, p)  # named on the command line: unreadable is an error
                fold_dirs[p.parent] = None
            elif p.name == MANIFEST_FILE:
                compressed[p.parent] = Compressed(p.parent, _read_record(CompressionManifest, p))
            elif p.suffix == ".json" and _json_format(p) == BENCH_FORMAT:
                benches[p] = Bench(p, _read_record(BenchResult, p))
            else:
                raise ReportError(f"{raw}: not an input the report reads (expected a {BENCH_FORMAT} JSON file, "
                                  f"{GREEN_LOG_FILE}, {GREEN_SUMMARY_FILE}, {MANIFEST_FILE}, or a folder containing "
                                  "them)")
        else:
            _walk(p, fold_dirs, compressed, benches, skipped)
        warnings += skipped
        if len(fold_dirs) + len(compressed) + len(benches) == before:
            why = f"; skipped: {'; '.join(skipped)}" if skipped else ""
            raise ReportError(f"{raw}: found no {GREEN_LOG_FILE}/{GREEN_SUMMARY_FILE} (training runs), "
                              f"{MANIFEST_FILE} (compressed models) or {BENCH_FILE} (benchmarks) this version can "
                              f"read in it or below it{why}")
    settings = _settings(list(fold_dirs), warnings)
    return Inputs(settings=settings, compressed=list(compressed.values()), benches=list(benches.values()),
                  warnings=warnings)


def _read_record(cls, path: Path):
    """contract record from `path`; SchemaError (not found, not JSON, other format, keys missing) -> ReportError."""
    try:
        return cls.read(path)
    except SchemaError as e:
        raise ReportError(str(e)) from None


def _walk(root: Path, fold_dirs, compressed, benches, skipped) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        files = set(filenames)
        if BENCH_FILE in files:
            fmt = _json_format(here / BENCH_FILE)
            if fmt != BENCH_FORMAT:
                skipped.append(f"{here / BENCH_FILE}: format {fmt!r}, this version reads {BENCH_FORMAT!r}; ignored")
            else:
                try:
                    benches[here / BENCH_FILE] = Bench(here / BENCH_FILE, BenchResult.read(here / BENCH_FILE))
                except SchemaError as e:
                    skipped.append(f"{e}; ignored")
        if MANIFEST_FILE in files:
            try:
                compressed[here] = Compressed(here, CompressionManifest.read(here / MANIFEST_FILE))
            except SchemaError as e:
                skipped.append(f"{e}; this compressed model is left out")
            dirnames[:] = []  # its fold_* hold only checkpoints (and a fine-tune's metering, read from its record)
            continue
        if GREEN_LOG_FILE in files or GREEN_SUMMARY_FILE in files:
            fold_dirs[here] = None
            dirnames[:] = []  # validation/ etc. hold nothing for us
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _PRUNE)


def _json_format(path: Path):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


# --- training runs -------------------------------------------------------------------------------------------------
def read_fold(folder: Path, warnings: list[str] | None = None) -> FoldRun:
    """green_summary.json (as a TrainingSummary) and green_log.csv of one fold folder. A summary this version
    cannot read is left out with a warning (totals then come from the log); log columns are matched by their
    contract names, so a log of another version gives the values it has and a warning for the columns it lacks."""
    warnings = [] if warnings is None else warnings
    summary = {}
    if (folder / GREEN_SUMMARY_FILE).is_file():
        try:
            summary = TrainingSummary.read(folder / GREEN_SUMMARY_FILE).to_json()
        except SchemaError as e:
            warnings.append(f"{e}; ignored, totals computed from {GREEN_LOG_FILE}")
    epochs = []
    log = folder / GREEN_LOG_FILE
    if log.is_file():
        try:
            with open(log, newline="") as f:
                reader = csv.DictReader(f)
                header = [h for h in (reader.fieldnames or []) if h]
                known = [c for c in LOG_COLUMNS if c in header]
                if "epoch" not in known:
                    warnings.append(f"{log}: no 'epoch' column (columns: {', '.join(header) or 'none'}), not a "
                                    f"{GREEN_LOG_FILE} this version reads; ignored")
                else:
                    lacking = [c for c in LOG_COLUMNS if c not in header and c not in LATER_LOG_COLUMNS]
                    if lacking:
                        warnings.append(f"{log}: lacks column(s) {', '.join(lacking)} (written by another "
                                        "version?); those values are shown as missing")
                    for row in reader:
                        epochs.append({k: (row.get(k) or None if k in _TEXT_COLUMNS else number(row.get(k)))
                                       for k in known})
                    epochs = [r for r in epochs if r["epoch"] is not None]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            warnings.append(f"{log}: cannot read ({e}); ignored")
            epochs = []
    return FoldRun(folder, summary, epochs)


def number(text):
    """A CSV cell or JSON value as float; empty, non-numeric or non-finite -> None (missing, never 0)."""
    if text is None or text == "" or isinstance(text, bool):
        return None
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _settings(fold_dirs: list[Path], warnings) -> list[Setting]:
    groups: dict[Path, list[Path]] = {}
    for d in fold_dirs:
        groups.setdefault(d.parent if FOLD_DIR.match(d.name) else d, []).append(d)
    settings = []
    for folder, dirs in groups.items():
        folds = [read_fold(d, warnings) for d in sorted(dirs, key=lambda d: _fold_key(d.name))]
        s = Setting(name=_setting_name(folder, folds), folder=folder, folds=folds)
        aggregate(s, warnings)
        settings.append(s)
    _unique_names(settings)
    # baseline first, then by trainer with its default-plans row first and its other plans (light) right after it:
    # stable, and the relative columns read left-to-right from the baseline
    settings.sort(key=lambda s: (s.values.get("trainer") != BASELINE_TRAINER, s.values.get("trainer") or "",
                                 s.values.get("plans") not in (None, DEFAULT_PLANS), s.name))
    return settings


def _fold_key(name: str):
    m = FOLD_DIR.match(name)
    return (0, int(m.group(1))) if m and m.group(1).isdigit() else (1, name)


def model_folder_parts(folder: Path) -> tuple[str | None, str | None]:
    """(plans identifier, configuration) of an nnU-Net model folder named TRAINER__PLANS__CONFIGURATION;
    (None, None) for a folder named otherwise (a lone fold folder somewhere else)."""
    parts = folder.name.split("__")
    return (parts[1], parts[2]) if len(parts) == 3 and all(parts) else (None, None)


def _trainer_name(folder: Path, folds: list[FoldRun]) -> str:
    for f in folds:
        if f.summary.get("trainer"):
            return str(f.summary["trainer"])
    # nnU-Net model folders are named TRAINER__PLANS__CONFIGURATION
    return folder.name.split("__")[0]


def _setting_name(folder: Path, folds: list[FoldRun]) -> str:
    """The trainer, plus the plans identifier when it is not nnU-Net's default: a run with light plans
    (`nnunet-green-plan`) is its own, recognisable row beside the default-plans run of the same trainer."""
    trainer = _trainer_name(folder, folds)
    plans, _ = model_folder_parts(folder)
    return f"{trainer} ({plans})" if plans and plans != DEFAULT_PLANS else trainer


def _unique_names(settings: list[Setting]) -> None:
    def dupes():
        seen: dict[str, int] = {}
        for s in settings:
            seen[s.name] = seen.get(s.name, 0) + 1
        return {n for n, c in seen.items() if c > 1}

    d = dupes()
    for s in settings:  # same trainer and plans, other configuration: name the plans and the configuration
        plans, conf = model_folder_parts(s.folder)
        if s.name in d and plans:
            s.name = f"{_trainer_name(s.folder, s.folds)} ({plans}, {conf})"
    d = dupes()
    for s in settings:  # same model folder name in several datasets: add the dataset folder
        if s.name in d:
            s.name = f"{s.name} [{s.folder.parent.name}]"
    d = dupes()
    for i, s in enumerate(settings):
        if s.name in d:
            s.name = f"{s.name} #{i + 1}"


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _fold_dice(f: FoldRun):
    """(value, source): nnU-Net's final validation Dice if present, else the EMA / last pseudo Dice."""
    for key, label in (("validation_mean_fg_dice", "final validation mean foreground Dice"),
                       ("ema_pseudo_dice_best", "best EMA pseudo Dice (online validation)"),
                       ("pseudo_dice_last", "last-epoch pseudo Dice (online validation)")):
        v = number(_get(f.summary, "dice", key))
        if v is not None:
            return v, label
    vs = f.folder / "validation" / "summary.json"
    if vs.is_file():  # summary missing or older than the final validation
        try:
            v = number(_get(json.loads(vs.read_text()), "foreground_mean", "Dice"))
        except (OSError, ValueError):
            v = None
        if v is not None:
            return v, "final validation mean foreground Dice"
    log = [r.get("pseudo_dice") for r in f.epochs if r.get("pseudo_dice") is not None]
    if log:
        return log[-1], "last-epoch pseudo Dice (online validation)"
    return None, None


def fold_dice(f: FoldRun):
    """(Dice, which Dice it is) of one fold run; (None, None) when none is recorded."""
    return _fold_dice(f)


def _fold_total(f: FoldRun, key: str, column: str | None = None, how=sum):
    """A total from green_summary.json, else computed from the per-epoch log (a run that has not finished)."""
    totals = f.summary.get("totals")
    if isinstance(totals, dict) and key in totals:
        return number(totals[key])
    vals = [r.get(column or key) for r in f.epochs]
    vals = [v for v in vals if v is not None]
    return how(vals) if vals else None


def _energy_reason(f: FoldRun) -> str:
    e = f.summary.get("energy") or {}
    parts = [f"{dev.upper()}: {_get(e, dev, 'reason')}" for dev in ("gpu", "cpu") if _get(e, dev, "reason")]
    if parts:
        return "; ".join(parts)
    src = _energy_source(f)
    return f"no energy counter (energy_source={src})" if src else "no energy values logged"


def _energy_source(f: FoldRun):
    src = _get(f.summary, "totals", "energy_source")
    if not src:
        srcs = [r.get("energy_source") for r in f.epochs if r.get("energy_source")]
        src = srcs[-1] if srcs else None
    return src


def _first(folds, *keys):
    for f in folds:
        v = _get(f.summary, *keys)
        if v is not None:
            return v
    return None


def aggregate(s: Setting, warnings) -> None:
    """Folds of one setting -> one row: time, energy and CO2 summed (the cost of training all folds), Dice
    averaged, peak memory as the maximum. A missing value in any fold leaves the aggregate missing (a partial
    sum would read as a smaller cost)."""
    folds, v, why = s.folds, s.values, s.reasons
    n = len(folds)
    where = (lambda f: f"fold {f.fold}") if n > 1 else (lambda f: "")
    no_summary = not any(f.summary for f in folds)
    not_recorded = (f"no {GREEN_SUMMARY_FILE} (run unfinished?)" if no_summary
                    else f"not recorded in {GREEN_SUMMARY_FILE}")
    v["trainer"] = _trainer_name(s.folder, folds)
    v["plans"], v["configuration"] = model_folder_parts(s.folder)
    v["folds"] = n
    v["fold_names"] = [f.fold for f in folds]
    v["epochs"] = [int(_first([f], "epochs_logged") or len(f.epochs)) for f in folds]
    for key in ("precision", "optimizer", "device", "gpu_name"):
        vals = sorted({str(_get(f.summary, key)) for f in folds if _get(f.summary, key) is not None})
        v[key] = "/".join(vals) if vals else None
        if not vals:
            why[key] = not_recorded
    for key, out in (("num_parameters", "parameters"), ("optimizer_state_bytes", "optimizer_state_bytes")):
        v[out] = number(_first(folds, key))
        if v[out] is None:
            why[out] = not_recorded

    def summed(key, column=None, reason=None):
        vals = [_fold_total(f, key, column) for f in folds]
        if all(x is None for x in vals):
            v[key] = None
            why[key] = reason(folds[0]) if reason else f"not recorded in {GREEN_SUMMARY_FILE} or {GREEN_LOG_FILE}"
        elif any(x is None for x in vals):
            v[key] = None
            lacking = ", ".join(where(f) for f, x in zip(folds, vals) if x is None)
            why[key] = f"missing for {lacking}" + (f" ({reason(folds[0])})" if reason else "")
        else:
            v[key] = sum(vals)

    summed("time_s", "epoch_s")
    summed("energy_j", reason=_energy_reason)
    v["energy_kwh"] = None if v["energy_j"] is None else v["energy_j"] / 3.6e6
    summed("co2eq_g", reason=lambda f: "no energy measured, so no CO2eq" if _fold_total(f, "energy_j") is None
           else "no carbon intensity recorded")
    for key in ("gpu_mem_alloc_peak_mb", "gpu_mem_reserved_peak_mb", "host_rss_peak_mb"):
        vals = [_fold_total(f, key, how=max) for f in folds]
        vals = [x for x in vals if x is not None]
        v[key] = max(vals) if vals else None
        if not vals:
            dev = v.get("device")
            why[key] = (f"CPU run (device {dev}): no GPU memory" if key.startswith("gpu") and dev
                        and not dev.startswith("cuda") else f"not recorded in {GREEN_SUMMARY_FILE} or {GREEN_LOG_FILE}")
    sources = [_energy_source(f) for f in folds]
    v["energy_source"] = "/".join(sorted({x for x in sources if x})) or None
    s.energy_estimated = any(x and "estimate" in x for x in sources)
    if s.energy_estimated:
        watts = sorted({number(_get(f.summary, "energy", "cpu", "estimate_watts")) for f in folds} - {None})
        w = "/".join(f"{x:g} W" for x in watts) if watts else "a user-given CPU power"
        why["energy_estimate"] = f"CPU energy is an estimate ({w} × time), not a measurement"
    partial = [f for f in folds if (number(_get(f.summary, "totals", "epochs_without_energy")) or 0) > 0]
    if partial and v["energy_j"] is not None:
        why["energy_partial"] = "energy misses some epochs in " + ", ".join(
            f"{where(f) or f.folder.name} ({int(number(_get(f.summary, 'totals', 'epochs_without_energy')))} epochs)"
            for f in partial)
    ci = sorted({(number(_get(f.summary, "carbon", "intensity_g_per_kwh")), _get(f.summary, "carbon", "country"),
                  _get(f.summary, "carbon", "source")) for f in folds if _get(f.summary, "carbon")}, key=str)
    v["carbon"] = [{"intensity_g_per_kwh": c[0], "country": c[1], "source": c[2]} for c in ci]

    dice = [_fold_dice(f) for f in folds]
    if any(d is None for d, _ in dice):
        v["dice"] = None
        lacking = [where(f) or f.folder.name for f, (d, _) in zip(folds, dice) if d is None]
        why["dice"] = "no Dice recorded" + (f" for {', '.join(lacking)}" if n > 1 else "")
        v["dice_source"] = None
    else:
        v["dice"] = sum(d for d, _ in dice) / n
        srcs = sorted({src for _, src in dice})
        v["dice_source"] = " / ".join(srcs)
        if n > 1:
            v["dice_source"] += f", mean of {n} folds"
    # Comparisons between settings (relative columns, radar, Pareto, Dice/kJ) use the cost of one fold, so that a
    # 5-fold model folder is not 5x "worse" than a single fold of another setting.
    for key in ("time_s", "energy_j", "co2eq_g"):
        v[f"{key}_per_fold"] = None if v[key] is None else v[key] / n
    v["dice_per_kj"] = (v["dice"] / (v["energy_j_per_fold"] / 1000.0)
                        if v["dice"] is not None and v["energy_j"] else None)
    if v["dice_per_kj"] is None:
        why["dice_per_kj"] = "needs both Dice and energy"
    _stopping(s)
    _data_wait(s)
    skipped = sum(int(number(_get(f.summary, "nonfinite_steps_skipped")) or 0) for f in folds)
    if skipped:
        warnings.append(f"{s.name}: {skipped} optimizer steps skipped for non-finite loss/gradients")
    if no_summary:
        warnings.append(f"{s.folder}: no {GREEN_SUMMARY_FILE}; totals computed from {GREEN_LOG_FILE} (run unfinished?)")


# --- early stopping and data wait -----------------------------------------------------------------------------------
STOP_REASONS = {"plateau": "plateau", "energy_budget": "energy budget", "time_budget": "time budget",
                "schedule_complete": "full schedule", "interrupted": "interrupted"}
EARLY_STOPS = ("plateau", "energy_budget", "time_budget")


def fold_stopping(f: FoldRun) -> dict:
    """How one fold's training ended, from green_summary.json["stopping"]: reason, stop epoch, epochs trained and
    scheduled, and the epochs / time / energy saved against the full schedule (time and energy are the trainer's
    extrapolation from the run's mean epoch, `method` says so). A summary written before stopping was recorded
    gives reason None and `missing` saying why, unless it logged every scheduled epoch (then: full schedule,
    `inferred` saying how that is known)."""
    st = f.summary.get("stopping")
    scheduled = number(f.summary.get("num_epochs"))
    trained = int(number(f.summary.get("epochs_logged")) or len(f.epochs))
    out = {"fold": f.fold, "reason": None, "epoch": None, "epochs_trained": trained, "epochs_scheduled": scheduled,
           "epochs_saved": None, "time_saved_s": None, "energy_saved_j": None, "method": None, "policy": None,
           "best_epoch": None, "best_ema_pseudo_dice": None, "plateau_epoch": None, "cooldown_epochs": None,
           "budget": None, "inferred": None, "missing": None}
    if not isinstance(st, dict) or not st.get("reason"):
        if not f.summary:
            out["missing"] = f"no {GREEN_SUMMARY_FILE} (run unfinished?)"
        elif scheduled and trained >= scheduled:
            out.update(reason="schedule_complete", epoch=trained - 1, epochs_saved=0, time_saved_s=0.0,
                       energy_saved_j=0.0,
                       inferred=f"no stopping record in {GREEN_SUMMARY_FILE} (written before early stopping "
                                f"existed); all {scheduled:.0f} scheduled epochs were logged")
        else:
            out["missing"] = (f"no stopping record in {GREEN_SUMMARY_FILE} (written before early stopping "
                              f"existed) and {trained} of "
                              f"{'?' if scheduled is None else f'{scheduled:.0f}'} scheduled epochs logged")
        return out
    reason = str(st["reason"])
    epoch = number(st.get("epoch"))
    out.update(reason=reason, epoch=None if epoch is None else int(epoch),
               policy=st.get("policy") if isinstance(st.get("policy"), str) else None)
    if reason == "schedule_complete":
        out.update(epochs_saved=0, time_saved_s=0.0, energy_saved_j=0.0)
    elif reason == "interrupted":
        out["missing"] = "interrupted before the end of its schedule (no stop decision): nothing saved to compare"
    else:  # an early stop (or a reason of a newer version) with the trainer's full-schedule estimate
        fs = st.get("full_schedule") if isinstance(st.get("full_schedule"), dict) else {}
        if fs:
            saved = number(fs.get("epochs_saved"))
            out.update(epochs_saved=None if saved is None else int(saved), time_saved_s=number(fs.get("time_saved_s")),
                       energy_saved_j=number(fs.get("energy_saved_j")),
                       method=fs.get("method") if isinstance(fs.get("method"), str) else None)
            if number(fs.get("num_epochs")) is not None:
                out["epochs_scheduled"] = number(fs["num_epochs"])
        else:
            out["missing"] = f"its stopping record in {GREEN_SUMMARY_FILE} has no full_schedule estimate"
        if reason == "plateau":
            best = number(st.get("best_epoch"))
            plateau, cooldown = number(st.get("plateau_epoch")), number(st.get("cooldown_epochs"))
            out.update(best_epoch=None if best is None else int(best),
                       best_ema_pseudo_dice=number(st.get("best_ema_pseudo_dice")),
                       plateau_epoch=None if plateau is None else int(plateau),
                       cooldown_epochs=None if cooldown is None else int(cooldown))
        for key, unit in (("budget_kwh", "kWh"), ("budget_hours", "h")):
            if number(st.get(key)) is not None:
                out["budget"] = f"{number(st[key]):g} {unit}"
    return out


def _stopping(s: Setting) -> None:
    """Setting values: stop reason(s), stop epoch, epochs trained / scheduled / saved, time and energy saved
    (summed over folds; missing if any fold has none), and the per-fold records under "stopping"."""
    folds, v, why = s.folds, s.values, s.reasons
    per = [fold_stopping(f) for f in folds]
    v["stopping"] = per
    reasons = [p["reason"] for p in per]
    v["stop_reason"] = "/".join(dict.fromkeys(r for r in reasons if r)) or None
    epochs = {p["epoch"] for p in per}
    v["stop_epoch"] = epochs.pop() if len(epochs) == 1 else None
    v["epochs_trained"] = sum(p["epochs_trained"] for p in per)
    sched = [p["epochs_scheduled"] for p in per]
    v["epochs_scheduled"] = None if any(x is None for x in sched) else int(sum(sched))
    v["saved_method"] = "; ".join(dict.fromkeys(p["method"] for p in per if p["method"])) or None
    v["saved_extrapolated"] = any(p["reason"] not in (None, "schedule_complete", "interrupted") for p in per)
    label = (lambda p: f"fold {p['fold']}: ") if len(per) > 1 else (lambda p: "")
    missing = [label(p) + p["missing"] for p in per if p["missing"]]
    if v["stop_reason"] is None:
        why["stop_reason"] = "; ".join(missing)
    for key in ("epochs_saved", "time_saved_s", "energy_saved_j"):
        vals = [p[key] for p in per]
        if any(x is None for x in vals):
            v[key] = None
            lacking = [label(p) + (p["missing"] or ("no energy measured, so no energy saving to extrapolate"
                                                    if key == "energy_saved_j" else f"{key} not recorded"))
                       for p, x in zip(per, vals) if x is None]
            why[key] = "; ".join(lacking)
        else:
            v[key] = sum(vals)


def _data_wait_fold(f: FoldRun) -> tuple[float | None, float | None, float | None, str]:
    """(data wait s, training s, share, source or the reason it is missing) of one fold: the summary's
    totals.data_wait_fraction, else data_wait_s / train_s summed over the epochs of green_log.csv that have both."""
    totals = f.summary.get("totals") if isinstance(f.summary.get("totals"), dict) else {}
    frac = number(totals.get("data_wait_fraction"))
    if frac is not None:
        return number(totals.get("data_wait_s")), number(totals.get("train_s")), frac, \
            f"totals.data_wait_fraction of {GREEN_SUMMARY_FILE}"
    pairs = [(r["data_wait_s"], r["train_s"]) for r in f.epochs
             if r.get("data_wait_s") is not None and r.get("train_s") is not None]
    train = sum(t for _, t in pairs)
    if pairs and train > 0:
        wait = sum(w for w, _ in pairs)
        return wait, train, wait / train, (f"computed from {GREEN_LOG_FILE}: data_wait_s / train_s over "
                                           f"{len(pairs)} epochs")
    if f.epochs and all("data_wait_s" not in r for r in f.epochs) and "data_wait_s" not in totals:
        return None, None, None, (f"not recorded: {GREEN_LOG_FILE} has no data_wait_s column (written before "
                                  "data-wait timing existed)")
    if not f.epochs and "data_wait_s" not in totals:
        return None, None, None, f"not recorded in {GREEN_SUMMARY_FILE} or {GREEN_LOG_FILE}"
    return None, None, None, ("not recorded: data_wait_s is empty (the training data loader was not timed, "
                              "e.g. a trainer that is not a green trainer)")


def _data_wait(s: Setting) -> None:
    """Share of the training time spent waiting for batches: per fold as `_data_wait_fold`; several folds: their
    summed wait ÷ summed training time (missing if any fold lacks it)."""
    v, why = s.values, s.reasons
    per = [(f, *_data_wait_fold(f)) for f in s.folds]
    lacking = [(f, src) for f, _, _, frac, src in per if frac is None]
    v["data_wait_source"] = None
    if lacking:
        v["data_wait_s"] = v["data_wait_fraction"] = None
        why["data_wait_fraction"] = "; ".join((f"fold {f.fold}: " if len(per) > 1 else "") + src
                                              for f, src in lacking)
        return
    v["data_wait_source"] = " / ".join(sorted({src for *_, src in per}))
    if len(per) == 1:
        _, wait, _, frac, _ = per[0]
        v["data_wait_s"], v["data_wait_fraction"] = wait, frac
    elif all(wait is not None and train for _, wait, train, _, _ in per):
        v["data_wait_s"] = sum(w for _, w, _, _, _ in per)
        v["data_wait_fraction"] = v["data_wait_s"] / sum(t for _, _, t, _, _ in per)
        v["data_wait_source"] += f", summed over {len(per)} folds"
    else:
        v["data_wait_s"] = v["data_wait_fraction"] = None
        why["data_wait_fraction"] = (f"the folds' data-wait and training times are not both in "
                                     f"{GREEN_SUMMARY_FILE}: cannot combine their shares")


def epoch_series(s: Setting, column: str):
    """(epochs, values): the per-epoch mean over the setting's folds, for epochs every fold has a value for."""
    per_fold = []
    for f in s.folds:
        per_fold.append({int(r["epoch"]): r.get(column) for r in f.epochs
                         if r.get("epoch") is not None and r.get(column) is not None})
    common = sorted(set.intersection(*(set(d) for d in per_fold))) if per_fold else []
    return common, [sum(d[e] for d in per_fold) / len(per_fold) for e in common]


# --- recovery after compression ------------------------------------------------------------------------------------
def _fold_mean(value):
    """A per-fold value ({fold_X: v} with several folds, else v) as (mean, number of folds); (None, 0) if absent."""
    if isinstance(value, dict):
        vals = [number(v) for v in value.values()]
        vals = [v for v in vals if v is not None]
        return (sum(vals) / len(vals), len(vals)) if vals else (None, 0)
    v = number(value)
    return (v, 1) if v is not None else (None, 0)


def recovery_figures(c: Compressed, warnings: list[str]) -> dict | None:
    """The recovery record of a compressed folder as flat figures: kind, steps, held-out agreement/error
    before -> after (distillation), epochs and Dice (fine-tune, from its fold's green_summary.json), cost.
    Keys a record of an older version lacks are None; None when the folder had no recovery."""
    m = c.manifest
    rec = m.recovery if isinstance(m.recovery, dict) and m.recovery else None
    if rec is None:
        return None
    out = {"kind": m.recovery_kind, "method": rec.get("method"), "folds_averaged": 1}
    for key in ("heldout_agreement_before", "heldout_agreement_after", "heldout_rel_error_before",
                "heldout_rel_error_after", "steps_done", "kept_step", "seconds", "energy_j"):
        out[key], n = _fold_mean(rec.get(key))
        out["folds_averaged"] = max(out["folds_averaged"], n)
    out["steps"] = number(rec.get("steps"))
    out["epochs"] = number(rec.get("epochs"))
    out["images"] = number(rec.get("images"))
    out["energy_source"] = rec.get("energy_source") if isinstance(rec.get("energy_source"), str) else None
    out["dice"] = out["dice_source"] = None
    metering = rec.get("metering")
    if isinstance(metering, str) and metering:
        fold_dir = (c.folder / metering).parent
        if (fold_dir / GREEN_SUMMARY_FILE).is_file() or (fold_dir / GREEN_LOG_FILE).is_file():
            run = read_fold(fold_dir, warnings)
            out["dice"], out["dice_source"] = _fold_dice(run)
            if out["energy_j"] is None:
                out["energy_j"] = _fold_total(run, "energy_j")
                out["energy_source"] = out["energy_source"] or _energy_source(run)
            if out["seconds"] is None:
                out["seconds"] = _fold_total(run, "time_s", "epoch_s")
        else:
            warnings.append(f"{c.folder / MANIFEST_FILE}: its recovery record names {metering}, which is not in "
                            "the folder; fine-tune Dice and energy not shown")
    return out
