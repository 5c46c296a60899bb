"""Self-contained HTML reports: text, tables and embedded PNG figures.

One file, no JavaScript and no external resources (figures are embedded as base64
``data:`` URIs), so a report can be mailed or archived as is. Used by ``mrharmony
evaluate`` and reusable by the study runner::

    write_html_report("report.html", "ComBat evaluation", [
        ReportSection("Site effects", text="...", tables={"ANOVA": df},
                      figures=["pca.png"]),
    ])

Sections may also be plain mappings with the same keys (``title``, ``text``,
``tables``, ``figures``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mrharmony import __version__
from mrharmony.errors import HarmonizeError
from mrharmony.fileio import atomic_path

__all__ = ["ReportSection", "write_html_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;line-height:1.4}
h1{border-bottom:2px solid #444}h2{margin-top:1.8em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;font-size:12px;margin:.6em 0 1.2em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f0f0f0}
caption{text-align:left;font-weight:bold;padding:.3em 0}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:12px}
.meta{color:#666;font-size:12px}pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
"""


@dataclass
class ReportSection:
    """One report section.

    Parameters
    ----------
    title
        Section heading.
    text
        Paragraphs (plain text; blank lines separate paragraphs; HTML is escaped).
    tables
        Caption -> DataFrame (rendered with 4 significant digits, at most
        ``max_rows`` rows).
    figures
        PNG paths (or caption -> PNG path); embedded, not linked.
    """

    title: str
    text: str = ""
    tables: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    figures: Sequence[str | Path] | Mapping[str, str | Path] = ()
    max_rows: int = 60


def _section(item: ReportSection | Mapping[str, Any]) -> ReportSection:
    if isinstance(item, ReportSection):
        return item
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - {"title", "text", "tables", "figures", "max_rows"})
        if unknown or "title" not in item:
            raise HarmonizeError(f"report section: unknown keys {unknown} or no 'title'")
        return ReportSection(**item)
    raise HarmonizeError(f"report section: {type(item).__name__} is not a ReportSection "
                         "or mapping")


def _png_uri(path: str | Path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG"):
        raise HarmonizeError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _table_html(caption: str, df: pd.DataFrame, max_rows: int) -> str:
    shown = df.head(max_rows)
    body = shown.to_html(escape=True, float_format=lambda v: f"{v:.4g}", border=0,
                         na_rep="–")
    note = (f"<p class='meta'>first {max_rows} of {len(df)} rows</p>"
            if len(df) > max_rows else "")
    end = body.index(">") + 1  # end of the opening <table ...> tag
    return f"{body[:end]}<caption>{html.escape(caption)}</caption>{body[end:]}{note}"


def write_html_report(path: str | Path, title: str,
                      sections: Sequence[ReportSection | Mapping[str, Any]], *,
                      force: bool = False) -> Path:
    """Write a self-contained HTML report.

    Parameters
    ----------
    path
        Output ``.html`` file (written atomically).
    title
        Document title.
    sections
        :class:`ReportSection` objects or mappings with the same keys.
    force
        Replace an existing file.

    Returns
    -------
    Path of the written report.

    Raises
    ------
    FileExistsError
        The file exists and ``force`` is false.
    HarmonizeError
        A malformed section or a figure that is not a PNG.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (use --force / force=True to replace it)")
    secs = [_section(s) for s in sections]
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>mrharmony {html.escape(__version__)} — {stamp}</p>"]
    for sec in secs:
        parts.append(f"<section><h2>{html.escape(sec.title)}</h2>")
        for para in (p for p in sec.text.split("\n\n") if p.strip()):
            parts.append(f"<p>{html.escape(para.strip())}</p>")
        for caption, df in sec.tables.items():
            if not isinstance(df, pd.DataFrame | pd.Series):
                raise HarmonizeError(f"report table {caption!r}: {type(df).__name__} is not "
                                     "a DataFrame")
            parts.append(_table_html(caption, pd.DataFrame(df), sec.max_rows))
        figs = sec.figures.items() if isinstance(sec.figures, Mapping) else (
            (Path(f).stem, f) for f in sec.figures)
        for caption, fig in figs:
            parts.append(f"<figure><img alt='{html.escape(str(caption))}' "
                         f"src='{_png_uri(fig)}'><figcaption>{html.escape(str(caption))}"
                         "</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path
