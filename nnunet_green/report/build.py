"""Assemble the report: collect inputs, build tables, draw figures, write report.md / report.html / report.json."""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_green import __version__
from nnunet_green.contract import BENCH_FILE, GREEN_LOG_FILE, GREEN_SUMMARY_FILE, MANIFEST_FILE
from nnunet_green.report import plots
from nnunet_green.report.collect import Inputs, discover
from nnunet_green.report.tables import (Table, compression_records, compression_table, stopping_table,
                                        training_table)

FORMAT = "nnunet-green-report/1"


@dataclass
class Section:
    title: str
    table: Table | None
    figures: list[dict] = field(default_factory=list)   # {"file", "caption", "title"[, "data"]}
    skipped: list[dict] = field(default_factory=list)   # {"figure", "reason"}
    empty_reason: str | None = None


@dataclass
class Report:
    title: str
    created: str
    inputs: list[str]
    warnings: list[str]
    sections: list[Section]
    data: dict


def _figures(section: Section, specs, data, out: Path) -> None:
    for title, fn in specs:
        try:
            name, caption, *points = fn(data, out)
            section.figures.append({"file": name, "title": title, "caption": caption,
                                    **({"data": points[0]} if points else {})})
        except plots.Skip as e:
            section.skipped.append({"figure": title, "reason": str(e)})


def build(paths, out_dir, title: str | None = None) -> Report:
    inputs: Inputs = discover(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # a figure skipped this time must not survive from an earlier report
        old.unlink()

    train = Section("Training runs", training_table(inputs))
    if inputs.settings:
        _figures(train, plots.TRAINING, inputs.settings, out)
    else:
        train.empty_reason = f"No training runs ({GREEN_LOG_FILE} / {GREEN_SUMMARY_FILE}) among the inputs."
    stop = Section("Stopping and data loading", stopping_table(inputs), empty_reason=train.empty_reason)
    records = compression_records(inputs)
    comp = Section("Compressed models", compression_table(records))
    if records:
        _figures(comp, plots.COMPRESSION, records, out)
    else:
        comp.empty_reason = f"No compressed model folders ({MANIFEST_FILE}) or {BENCH_FILE} among the inputs."

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    report = Report(title or "nnunet-green report", created, [str(Path(p).resolve()) for p in paths],
                    inputs.warnings, [train, stop, comp], {})
    report.data = {
        "format": FORMAT, "nnunet_green_version": __version__, "created": created, "title": report.title,
        "inputs": report.inputs, "warnings": inputs.warnings,
        "training": _table_json(train), "stopping": _table_json(stop), "compression": _table_json(comp),
    }
    (out / "report.json").write_text(json.dumps(report.data, indent=2, default=str, allow_nan=False))
    from nnunet_green.report.html import render_html
    from nnunet_green.report.markdown import render_markdown
    (out / "report.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report, out))
    return report


def _table_json(section: Section) -> dict:
    t = section.table
    return {
        "columns": [{"key": k, "header": h} for k, h in t.columns] if t else [],
        "rows": t.records if t else [],
        "footnotes": t.notes.texts if t else [],
        "remarks": t.remarks if t else [],
        "figures": section.figures,
        "skipped_figures": section.skipped,
        "empty_reason": section.empty_reason,
    }
