"""report.md: GitHub-flavoured markdown, figures linked as PNG files beside it."""
from __future__ import annotations

from nnunet_green.report.tables import Table


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table) -> list[str]:
    lines = ["| " + " | ".join(h for _, h in t.columns) + " |", "|" + "---|" * len(t.columns)]
    for row in t.rows:
        cells = []
        for key, _ in t.columns:
            c = row[key]
            marks = "".join(f"<sup>[{n}]</sup>" for n in c.notes)
            cells.append(_esc(c.text) + marks)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for i, text in enumerate(t.notes.texts, 1):
        lines.append(f"[{i}] {_esc(text)}  ")
    if t.notes.texts:
        lines.append("")
    lines += [f"- {r}" for r in t.remarks]
    return lines


def render_markdown(report) -> str:
    lines = [f"# {report.title}", "", f"Generated {report.created} by nnunet-green-report. "
             "Missing values are shown as \"—\" with a numbered footnote giving the reason (never as 0); "
             "values that include an estimated CPU energy are shown as \"≈… (est.)\", savings of an early stop "
             "(extrapolated from the run's mean epoch, not measured) as \"≈… (extrapolated)\".", ""]
    lines += ["Inputs:", ""] + [f"- `{p}`" for p in report.inputs] + [""]
    if report.warnings:
        lines += ["**Warnings**", ""] + [f"- {_esc(w)}" for w in report.warnings] + [""]
    for s in report.sections:
        lines += [f"## {s.title}", ""]
        if s.table is None:
            lines += [s.empty_reason or "Nothing to show.", ""]
            continue
        lines += table_markdown(s.table) + [""]
        for f in s.figures:
            lines += [f"### {f['title']}", "", f"![{f['title']}]({f['file']})", "", f["caption"], ""]
        if s.skipped:
            lines += ["Figures not drawn:", ""] + [f"- {f['figure']}: {f['reason']}" for f in s.skipped] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"
