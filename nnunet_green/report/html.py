"""report.html: one self-contained file (inline CSS, figures as base64 data URIs, no scripts, no network)."""
from __future__ import annotations

import base64
import html as _h
from pathlib import Path

from nnunet_green.report.tables import Table

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
td.est { background: repeating-linear-gradient(45deg, #fff7e0, #fff7e0 4px, #ffe9b3 4px, #ffe9b3 8px);
         font-style: italic; }
td.missing { color: #888; text-align: center; }
td.long { white-space: normal; min-width: 18em; text-align: left; }
.notes { font-size: 0.8em; color: #444; }
.warn { background: #fff3f3; border-left: 4px solid #c33; padding: 0.4em 0.8em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #444; }
.scroll { overflow-x: auto; }
"""


def _e(text) -> str:
    return _h.escape(str(text))


def table_html(t: Table) -> str:
    out = ['<div class="scroll"><table>', "<tr>" + "".join(f"<th>{_e(h)}</th>" for _, h in t.columns) + "</tr>"]
    for row in t.rows:
        tds = []
        for key, _ in t.columns:
            c = row[key]
            cls = "est" if c.estimate else "missing" if c.text == "—" else "long" if len(c.text) > 40 else ""
            marks = "".join(f'<sup><a href="#{_anchor(t, n)}">[{n}]</a></sup>' for n in c.notes)
            attr = f' class="{cls}"' if cls else ""
            tds.append(f"<td{attr}>{_e(c.text)}{marks}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</table></div>")
    if t.notes.texts:
        out.append('<ol class="notes">' + "".join(f'<li id="{_anchor(t, i)}">{_e(x)}</li>'
                                                  for i, x in enumerate(t.notes.texts, 1)) + "</ol>")
    if t.remarks:
        out.append('<ul class="notes">' + "".join(f"<li>{_e(r)}</li>" for r in t.remarks) + "</ul>")
    return "\n".join(out)


def _anchor(t: Table, n: int) -> str:
    return f"{t.title.lower().replace(' ', '-')}-note-{n}"


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(report, out_dir: Path) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{_e(report.title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{_e(report.title)}</h1>",
             f"<p>Generated {_e(report.created)} by nnunet-green-report. Missing values are “—” with a numbered "
             "footnote giving the reason (never 0); cells with an estimated CPU energy are hatched and read "
             "“≈… (est.)”, savings of an early stop (extrapolated from the run's mean epoch) are hatched and "
             "read “≈… (extrapolated)”.</p>",
             "<details><summary>Inputs</summary><ul>" + "".join(f"<li><code>{_e(p)}</code></li>"
                                                               for p in report.inputs) + "</ul></details>"]
    if report.warnings:
        parts.append('<div class="warn"><b>Warnings</b><ul>' + "".join(f"<li>{_e(w)}</li>" for w in report.warnings)
                     + "</ul></div>")
    for s in report.sections:
        parts.append(f"<h2>{_e(s.title)}</h2>")
        if s.table is None:
            parts.append(f"<p>{_e(s.empty_reason or 'Nothing to show.')}</p>")
            continue
        parts.append(table_html(s.table))
        for f in s.figures:
            parts.append(f'<figure><img alt="{_e(f["title"])}" src="{_img(Path(out_dir) / f["file"])}">'
                         f"<figcaption><b>{_e(f['title'])}.</b> {_e(f['caption'])}</figcaption></figure>")
        if s.skipped:
            parts.append('<p class="notes">Figures not drawn:</p><ul class="notes">' + "".join(
                f"<li>{_e(f['figure'])}: {_e(f['reason'])}</li>" for f in s.skipped) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
