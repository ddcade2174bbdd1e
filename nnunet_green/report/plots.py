"""The report's figures (PNG, matplotlib Agg). Each function writes one file and returns (file name, caption), or
raises `Skip(reason)` when its data is absent, so the report says why instead of showing an empty plot. The
compression figures also return the points they drew (report.json keeps them beside the figure)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from nnunet_green.contract import BENCH_FILE, GREEN_LOG_FILE  # noqa: E402
from nnunet_green.report.collect import Setting, epoch_series  # noqa: E402
from nnunet_green.report.tables import DENSE_RULE, fmt_count, fmt_duration, fmt_mb, memory_metric  # noqa: E402

DPI = 120


class Skip(Exception):
    """The figure's data is absent; the message says what is missing."""


def colors(settings: list[Setting]) -> dict[str, tuple]:
    """One colour per setting, the same in every figure."""
    cmap = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
    return {s.name: cmap(i % cmap.N) for i, s in enumerate(settings)}


def _save(fig, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return name


def _legend_below(ax, handles=None, labels=None, ncol=1):
    kw = {} if handles is None else {"handles": handles, "labels": labels}
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, fontsize=8, frameon=False, **kw)


def _fmt_j(j: float) -> str:
    for unit, div in (("MJ", 1e6), ("kJ", 1e3)):
        if j >= div:
            return f"{j / div:.3g} {unit}"
    return f"{j:.3g} J"


# --- training figures ----------------------------------------------------------------------------------------------
def radar(settings: list[Setting], out: Path) -> tuple[str, str]:
    """Study-style radar: Dice, energy, memory, time, each divided by its largest value among the settings."""
    if not settings:
        raise Skip("no training runs")
    mem_key, mem_label = memory_metric(settings)
    per = " per fold" if any(len(s.folds) > 1 for s in settings) else ""
    axes = [("Dice", "dice", lambda x: f"{x:.3f}"), ("Energy", "energy_j_per_fold", lambda x: _fmt_j(x) + per),
            ("Memory", mem_key, fmt_mb), ("Time", "time_s_per_fold", lambda x: fmt_duration(x) + per)]
    # an axis nobody has is dropped for all settings; a value of 0 is kept (an untrained model's Dice is 0)
    dropped = [a for a, k, _ in axes if k is None or all(s.values.get(k) is None for s in settings)]
    axes = [a for a in axes if a[0] not in dropped]
    if len(axes) < 3:
        raise Skip(f"radar needs at least 3 axes; no run has {', '.join(dropped).lower()}")
    n = len(axes)
    angles = [2 * math.pi * i / n for i in range(n)]
    maxima = [max(s.values[k] for s in settings if s.values.get(k) is not None) for _, k, _ in axes]
    col = colors(settings)

    fig = plt.figure(figsize=(7.2, 7.6))
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_offset(math.pi / 2)  # first axis (Dice) on top, then clockwise
    ax.set_theta_direction(-1)
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.set_yticklabels(["0.25", "0.5", "0.75", "1"], fontsize=7, color="grey")
    ax.set_rlabel_position(180 / n)
    ax.set_xticks(angles)
    ax.set_xlim(0, 2 * math.pi)  # set_xticks may shrink the view to the ticks' span
    ax.set_xticklabels([])
    for ang, (a, _, f), m in zip(angles, axes, maxima):
        # placed by hand: tick labels at 3 and 9 o'clock would overlap the outer ring
        x, y = math.sin(ang), math.cos(ang)  # clockwise from the top
        ax.text(ang, 1.13, f"{a}{' ↑' if a == 'Dice' else ' ↓'}\n(max {f(m)})", fontsize=9, ha=(
            "left" if x > 0.1 else "right" if x < -0.1 else "center"),
            va="bottom" if y > 0.1 else "top" if y < -0.1 else "center")
    notes = []
    for s in settings:
        r = [None if s.values.get(k) is None else s.values[k] / m if m > 0 else 0.0
             for (_, k, _), m in zip(axes, maxima)]
        missing = [a.lower() for (a, _, _), x in zip(axes, r) if x is None]
        est = s.energy_estimated and "Energy" in [a for a, _, _ in axes]
        style = "--" if est else "-"
        label = s.name + (" (energy est.)" if est else "") + (f" ({', '.join(missing)} n/a)" if missing else "")
        for i in range(n):  # segments only between present vertices: a missing axis is a gap, never a 0
            j = (i + 1) % n
            if r[i] is not None and r[j] is not None:
                ax.plot([angles[i], angles[j]], [r[i], r[j]], style, color=col[s.name], lw=1.8)
        pts = [(a, x) for a, x in zip(angles, r) if x is not None]
        ax.plot([a for a, _ in pts], [x for _, x in pts], "o", color=col[s.name], ms=5,
                mfc="white" if est else col[s.name], label=label, linestyle="none")
        if not missing:
            ax.fill(angles, r, color=col[s.name], alpha=0.08)
    if dropped:
        notes.append(f"axis dropped (no run has it): {', '.join(dropped).lower()}")
    if any(s.energy_estimated for s in settings) and "Energy" not in dropped:
        notes.append("dashed / hollow = energy includes a CPU estimate")
    ax.set_title("Resource use per setting", fontsize=12, pad=52)
    norm = ("Normalisation: each axis is value ÷ largest value among the settings (1 = largest).\n"
            "Dice ↑ higher is better; energy, memory, time ↓ lower is better.")
    if "Memory" not in dropped:
        norm += f" Memory = {mem_label}."
    # legend and the normalisation note stacked under the polar plot, clear of the axis labels
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, fontsize=8, frameon=False, alignment="left",
              title=norm + ("\n" + "; ".join(notes) if notes else ""), title_fontsize=8)
    return _save(fig, out, "radar.png"), ("Radar plot of Dice, energy, memory and time, each normalised to the "
                                          "largest value among the settings (smaller is better except Dice).")


def per_epoch_cost(settings: list[Setting], out: Path) -> tuple[str, str]:
    """Energy per epoch; time per epoch (titled so) when no run has energy."""
    if not settings:
        raise Skip("no training runs")
    col = colors(settings)
    series = {s.name: epoch_series(s, "energy_j") for s in settings}
    with_energy = [s for s in settings if series[s.name][0]]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    if with_energy:
        for s in with_energy:
            ep, y = series[s.name]
            ax.plot(ep, y, "--" if s.energy_estimated else "-", marker="o", ms=3, color=col[s.name],
                    label=s.name + (" (est.)" if s.energy_estimated else "") + _folds(s))
        ax.set_ylabel("energy per epoch (J)")
        ax.set_title("Energy per epoch")
        lacking = [s.name for s in settings if s not in with_energy]
        foot = []
        if lacking:
            foot.append("no energy measured (not shown): " + ", ".join(lacking))
        if any(s.energy_estimated for s in with_energy):
            foot.append("dashed = includes estimated CPU energy (user-given power × time)")
        name = "energy_per_epoch.png"
        cap = "Energy per epoch (J) of each setting."
    else:
        _plot_per_epoch(ax, settings, "epoch_s", col)
        if not ax.lines:
            plt.close(fig)
            raise Skip(f"no per-epoch energy or time in any {GREEN_LOG_FILE}")
        ax.set_ylabel("time per epoch (s)")
        ax.set_title("Time per epoch (no run has energy measurements)")
        foot = []
        name = "time_per_epoch.png"
        cap = "Time per epoch (s): no run has energy measurements, so time is shown instead."
    ax.set_ylim(bottom=0)
    _finish_per_epoch(ax, settings)
    if foot:
        fig.text(0.01, 1.0, "\n".join(foot), fontsize=8, va="bottom", ha="left")
    return _save(fig, out, name), cap


def _folds(s: Setting) -> str:
    return f" (mean of {len(s.folds)} folds)" if len(s.folds) > 1 else ""


def _plot_per_epoch(ax, settings: list[Setting], key: str, col: dict) -> None:
    for s in settings:
        ep, y = epoch_series(s, key)
        if ep:
            ax.plot(ep, y, marker="o", ms=3, color=col[s.name], label=s.name + _folds(s))


def _finish_per_epoch(ax, settings: list[Setting]) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend_below(ax, ncol=2 if len(settings) > 4 else 1)


def pseudo_dice(settings: list[Setting], out: Path) -> tuple[str, str]:
    col = colors(settings)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    _plot_per_epoch(ax, settings, "pseudo_dice", col)
    if not ax.lines:
        plt.close(fig)
        raise Skip(f"no pseudo Dice in any {GREEN_LOG_FILE}")
    ax.set_ylabel("pseudo Dice (online validation, mean fg)")
    ax.set_title("Validation pseudo Dice per epoch")
    _finish_per_epoch(ax, settings)
    return _save(fig, out, "pseudo_dice_per_epoch.png"), "nnU-Net's online-validation pseudo Dice per epoch."


def dice_per_kj(settings: list[Setting], out: Path) -> tuple[str, str]:
    have = [s for s in settings if s.values.get("dice_per_kj") is not None]
    if not have:
        raise Skip("no run has both Dice and energy")
    col = colors(settings)
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.45 * len(have)))
    y = list(range(len(have)))[::-1]
    vals = [s.values["dice_per_kj"] for s in have]
    bars = ax.barh(y, vals, color=[col[s.name] for s in have], edgecolor="black", lw=0.6)
    for b, s, v in zip(bars, have, vals):
        if s.energy_estimated:
            b.set_hatch("//")
            b.set_facecolor((*col[s.name][:3], 0.35))
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.3g}" + (" (est.)" if s.energy_estimated else ""),
                va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([s.name for s in have], fontsize=9)
    ax.set_xlim(0, max(vals) * 1.25)
    per = " per fold" if any(len(s.folds) > 1 for s in settings) else ""
    ax.set_xlabel(f"Dice per kJ of training energy{per} (higher is better)")
    ax.set_title("Dice per kJ")
    _energy_footnote(fig, settings, have, "hatched")
    return _save(fig, out, "dice_per_kj.png"), "Dice per kJ of training energy (hatched: estimated energy)."


def _energy_footnote(fig, settings: list[Setting], shown: list[Setting], estimate_mark: str) -> None:
    """Above the plot: how estimated energy is drawn, and which settings lack energy or Dice."""
    foot = []
    if any(s.energy_estimated for s in shown):
        foot.append(f"{estimate_mark} = energy includes an estimate (user-given CPU power × time)")
    lacking = [s.name for s in settings if s not in shown]
    if lacking:
        foot.append("not shown (no energy or Dice): " + ", ".join(lacking))
    if foot:
        fig.text(0.01, 1.0, "\n".join(foot), fontsize=8, va="bottom", ha="left")


def pareto_front(points):
    """Indices of points (energy, dice) not dominated: no other point has <= energy and >= Dice, one strictly."""
    front = []
    for i, (e, d) in enumerate(points):
        if not any((e2 <= e and d2 >= d) and (e2 < e or d2 > d) for j, (e2, d2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto(settings: list[Setting], out: Path) -> tuple[str, str]:
    have = [s for s in settings if s.values.get("energy_j_per_fold") is not None and s.values.get("dice") is not None]
    if len(have) < 2:
        raise Skip(f"needs at least 2 runs with both Dice and energy ({len(have)} found)")
    col = colors(settings)
    pts = [(s.values["energy_j_per_fold"] / 1000, s.values["dice"]) for s in have]
    per = " per fold" if any(len(s.folds) > 1 for s in settings) else ""
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-", color="grey", lw=1, zorder=1)
    for i, (s, (x, yv)) in enumerate(zip(have, pts)):
        ax.scatter([x], [yv], s=60, color=col[s.name], zorder=3, facecolors="white" if s.energy_estimated else None,
                   edgecolors=col[s.name], linewidths=1.8,
                   label=s.name + (" (est.)" if s.energy_estimated else ""))
        if i in front:
            ax.scatter([x], [yv], s=180, facecolors="none", edgecolors="black", linewidths=1.2, zorder=2)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="o", ms=11, mfc="none", mec="black", ls="-", color="grey"))
    labels.append("Pareto front (no other run is both cheaper and better)")
    ax.set_xlabel(f"training energy{per} (kJ)")
    ax.set_ylabel("Dice")
    ax.set_title("Dice vs energy")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    _legend_below(ax, handles, labels, ncol=1)
    _energy_footnote(fig, settings, have, "hollow")
    return _save(fig, out, "pareto_dice_energy.png"), ("Dice vs training energy; ringed points form the Pareto "
                                                       "front (lower energy and higher Dice are better).")


# --- compression figures -------------------------------------------------------------------------------------------
# Every compressed model sits on one x axis, the fraction of the dense model's parameters it keeps, whatever rule
# chose its ranks; the marker says the rule, and a recovered (distilled / fine-tuned) model has its own marker.
FAMILIES = {"ratio": ("o", "uniform rank ratio"), "budget": ("s", "rank budget"),
            "calibrated": ("D", "calibrated ranks"), "other": ("^", "rule not recorded / other")}
RECOVERED = {"distilled": ("*", "+ distilled"), "fine-tuned": ("P", "+ fine-tuned")}
_OTHER_RECOVERY = ("X", "+ recovered")


def rule_family(rule: str | None) -> tuple[str, str | None]:
    """('ratio' | 'budget' | 'calibrated' | 'other', recovery kind or None) of a rule label such as
    'budget 0.12 params calibrated + distilled'."""
    base, _, recovered = (rule or "").partition(" + ")
    fam = ("calibrated" if "calibrated" in base else "budget" if base.startswith("budget")
           else "ratio" if base.startswith("ratio") else "other")
    return fam, (recovered.strip() or None)


def _marker(rule):
    fam, rec = rule_family(rule)
    return RECOVERED.get(rec, _OTHER_RECOVERY)[0] if rec else FAMILIES[fam][0]


def _is_dense(r: dict) -> bool:
    return r.get("rule") == DENSE_RULE or (not r["compressed"] and bool(r.get("is_reference")))


def _groups(records, key):
    """Per source model (and bench): the compressed models with a kept fraction and a value for `key`, sorted by
    kept fraction, plus the dense value."""
    out = {}
    for r in records:
        if r.get(key) is None:
            continue
        dense = _is_dense(r)
        if not dense and r.get("kept_fraction") is None:
            continue
        src = r.get("path") if dense else r.get("source_path")
        g = out.setdefault((src, r.get("bench")), {"points": [], "ref": None, "name": None})
        if dense:
            g["ref"], g["name"] = r[key], r["name"]
        else:
            g["points"].append((r["kept_fraction"], r[key], r))
    for g in out.values():
        g["points"].sort(key=lambda p: p[0])
    return {k: g for k, g in out.items() if g["points"]}


def _series_label(src, bench, g, n):
    if n == 1:
        return "compressed"
    return f"from {g['name'] or (Path(src).name if src else '?')}" + (f" [{Path(bench).parent.name}]" if bench else "")


def _draw_points(ax, g, color, scale, label, annotate):
    """Uniform-ratio models without recovery joined by a line (one series); every model marked by its rule. The
    series is one legend entry (its colour); the markers' meaning is in _rule_legend."""
    uniform = [(x, y) for x, y, r in g["points"] if rule_family(r.get("rule")) == ("ratio", None)]
    if len(uniform) > 1:
        ax.plot([x for x, _ in uniform], [y * scale for _, y in uniform], "-", color=color, lw=1.2, zorder=2)
    ax.plot([], [], "-", color=color, lw=4, label=label)
    at: dict[tuple, list[str]] = {}  # models of the same size share a point: one label listing them
    for x, y, r in g["points"]:
        marker = _marker(r.get("rule"))
        ax.plot([x], [y * scale], marker, color=color, ms=10 if marker == "*" else 6.5, mec="black", mew=0.5,
                ls="none", zorder=3)
        at.setdefault((round(x, 4), round(y * scale, 9)), []).append(r.get("rule") or r["name"])
    if annotate:
        for (x, y), texts in at.items():
            ax.annotate("\n".join(dict.fromkeys(texts)), (x, y), textcoords="offset points", xytext=(5, 3),
                        fontsize=6.5, color="0.25", va="bottom")


def _rule_legend(points) -> list:
    """Legend entries (grey) for the rules and recoveries among the drawn points."""
    present = [(p["family"], p["recovery"]) for p in points]
    handles = []
    for fam, (marker, text) in FAMILIES.items():
        if any(f == fam for f, _ in present):
            handles.append(Line2D([], [], marker=marker, color="0.4", ls="none", mec="black", mew=0.5, label=text))
    for rec in sorted({r for _, r in present if r}):
        marker, text = RECOVERED.get(rec, (_OTHER_RECOVERY[0], f"+ {rec}"))
        handles.append(Line2D([], [], marker=marker, color="0.4", ls="none", mec="black", mew=0.5,
                              ms=10 if marker == "*" else 6.5, label=text))
    return handles


def _points_data(records, keys) -> tuple[list[dict], list[dict]]:
    """(points drawn, compressed models left out with the reason) for report.json."""
    drawn, left = [], []
    for r in records:
        if _is_dense(r):
            continue
        if r.get("kept_fraction") is None:
            left.append({"model": r["name"], "rule": r.get("rule"), "reason": "parameter count not recorded"})
            continue
        if all(r.get(k) is None for k in keys):
            continue
        fam, rec = rule_family(r.get("rule"))
        drawn.append({"model": r["name"], "rule": r.get("rule"), "family": fam, "recovery": rec,
                      "kept_fraction": r["kept_fraction"], **{k: r.get(k) for k in keys}})
    return drawn, left


def compression_size(records: list[dict], out: Path) -> tuple[str, str, dict]:
    if not any(not _is_dense(r) and r.get("kept_fraction") is not None for r in records):
        raise Skip("no compressed model with a parameter count (kept fraction)")
    # uncompressed size from the manifest's "before" when the reference is not benchmarked
    recs = list(records)
    for r in records:
        if r["compressed"] and r.get("params_before") is not None and not any(
                _is_dense(x) and x.get("path") == r.get("source_path") for x in recs):
            recs.append({"name": "uncompressed", "path": r.get("source_path"), "compressed": False,
                         "rule": DENSE_RULE, "kept_fraction": 1.0, "bench": r.get("bench"),
                         "params_after": r["params_before"], "macs_after": r.get("macs_before"), "latency_s": None})
    panels = [("params_after", "parameters", "Parameters", 1), ("macs_after", "MACs per patch", "MACs per patch", 1),
              ("latency_s", "latency (ms, median)", "Latency (median forward)", 1000)]
    panels = [p for p in panels if _groups(recs, p[0])]
    fig, axs = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.1), squeeze=False)
    for ax, (key, label, title, scale) in zip(axs[0], panels):
        groups = _groups(recs, key)
        for i, ((src, bench), g) in enumerate(groups.items()):
            c = plt.get_cmap("tab10")(i)
            _draw_points(ax, g, c, scale, _series_label(src, bench, g, len(groups)), annotate=False)
            if g["ref"] is not None:
                ax.axhline(g["ref"] * scale, color=c, ls="--", lw=1, label="uncompressed" if len(groups) == 1
                           else f"uncompressed ({g['name']})")
        ax.set_xlabel("parameters kept (fraction of the dense model)")
        ax.set_xlim(0, 1.02)  # the whole range, so one or two points are placed honestly
        ax.set_ylabel(label)
        # axhline does not take part in autoscaling: leave room above the uncompressed reference line.
        top = max([y * scale for g in groups.values() for _, y, _ in g["points"]]
                  + [g["ref"] * scale for g in groups.values() if g["ref"] is not None])
        ax.set_ylim(0, top * 1.15)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        if scale == 1:
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: fmt_count(v) if v else "0"))
    drawn, left = _points_data(records, ("params_after", "macs_after", "latency_s"))
    # one legend for all panels, below them: series (colour), uncompressed (dashed), rule and recovery (marker)
    legend: dict[str, object] = {}
    for ax in axs[0]:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lbl, h)
    for h in _rule_legend(drawn):
        legend.setdefault(h.get_label(), h)
    fig.suptitle("Compressed model size and speed vs parameters kept (markers: rank rule)", fontsize=11)
    fig.tight_layout()
    fig.legend(list(legend.values()), list(legend), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(4, len(legend)), fontsize=8, frameon=False)
    if len(panels) < 3:
        fig.text(0.5, -0.02 - 0.05 * math.ceil(len(legend) / 4), f"latency not shown: no {BENCH_FILE} lists the "
                 "compressed folders", ha="center", fontsize=8)
    return (_save(fig, out, "compression_size.png"),
            "Parameters, MACs and latency of the compressed models vs the fraction of parameters they keep; marker = "
            "how the ranks were chosen (uniform ratio, budget, calibrated) or recovered (distilled, fine-tuned); "
            "dashed: the uncompressed model. Each model's rule is in the table.",
            {"x": "kept_fraction", "points": drawn, "left_out": left})


def compression_dice(records: list[dict], out: Path) -> tuple[str, str, dict]:
    keys = [(k, lbl) for k, lbl in (("agreement_dice", "agreement Dice (vs reference predictions)"),
                                    ("dice_vs_labels", "Dice vs labels")) if _groups(records, k)]
    if not keys:
        raise Skip("no benchmark with agreement Dice or Dice vs labels for compressed models "
                   f"({BENCH_FILE} without --images/--labels, or none given)")
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for k, lbl in keys:
        groups = _groups(records, k)
        for i, ((src, bench), g) in enumerate(groups.items()):
            c = plt.get_cmap("tab10")(i * 2 + (k == "dice_vs_labels"))
            suffix = "" if len(groups) == 1 else " " + _series_label(src, bench, g, len(groups))
            _draw_points(ax, g, c, 1, lbl + suffix, annotate=k == keys[0][0])
            if g["ref"] is not None and k == "dice_vs_labels":
                ax.axhline(g["ref"], color=c, ls="--", lw=1, label=f"Dice vs labels, uncompressed{suffix}")
    ax.set_xlabel("parameters kept (fraction of the dense model)")
    ax.set_xlim(0, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title("Segmentation quality vs parameters kept (markers: rank rule)")
    ax.grid(alpha=0.3)
    ax.margins(y=0.2)
    drawn, left = _points_data(records, ("agreement_dice", "dice_vs_labels"))
    handles, labels = ax.get_legend_handles_labels()
    rules = _rule_legend(drawn)
    _legend_below(ax, handles + rules, labels + [h.get_label() for h in rules], ncol=2)
    return (_save(fig, out, "compression_dice.png"),
            "Agreement Dice with the uncompressed model's predictions and Dice vs labels, by the fraction of "
            "parameters kept; marker = rank rule or recovery, as in the size figure; agreement points are labelled "
            "with their rule.",
            {"x": "kept_fraction", "points": drawn, "left_out": left})


TRAINING = [("Radar plot", radar), ("Energy/time per epoch", per_epoch_cost), ("Pseudo Dice per epoch", pseudo_dice),
            ("Dice per kJ", dice_per_kj), ("Pareto front Dice vs energy", pareto)]
COMPRESSION = [("Compressed size/speed vs parameters kept", compression_size),
               ("Compressed Dice vs parameters kept", compression_dice)]
