"""The leaderboard as one self-contained static HTML page: sortable tables, the plots inlined as
data URIs, and a Content-Security-Policy that forbids every network request and every script but
the page's own. All text from the results (untrusted: anyone can hand over a CSV) is escaped."""

from __future__ import annotations

import base64
import hashlib
import math
import re
from html import escape
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

import wmbench
from wmbench.plots import plot_stems
from wmbench.statistics import Interval
from wmbench.summary import CHEAP_REMOVAL_POINTS, CellStats, GroupSummary, failed_cells, figure_text, summarize_frame
from wmbench.summary_text import FAILED_NOTE, LEGEND, at_chance_text, joined_values, run_meta, statistic_label

REMOVAL_NOTE = (
    "On this page, `removal cost: ATTACK` is the smallest mean error_delta among the tested strengths "
    "of that attack at which the mark is detected in no seed, with that strength (`detection n/a` when detection did not apply at any tested strength, `not removed` when "
    "no tested strength removes it); a click on a column header sorts the table by it."
)
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def render_html(
    frame: pd.DataFrame, name: str, plots: Mapping[tuple[object, object], Sequence[Path]] | None = None,
    source: str | None = None, groups: list[GroupSummary] | None = None,
) -> str:
    """The page for ``frame`` (normalized rows) titled ``name``, embedding in each (model, dataset)
    section exactly the PNGs ``plots`` holds for that pair (``plot_leaderboard``'s result; ``groups``:
    ``summarize_frame(frame)``, computed here when not given)."""
    plots = plots or {}
    meta = run_meta(frame)
    parts = [f'<p class="meta">{escape(meta)}</p>', f'<p class="legend">{_inline_code(LEGEND + " " + REMOVAL_NOTE)}</p>']
    groups = summarize_frame(frame) if groups is None else groups
    anchors = plot_stems((g.model, g.dataset) for g in groups)
    for group in groups:
        key = (group.model, group.dataset)
        parts.append(_group_section(group, anchors[key], [Path(p) for p in plots.get(key, ())]))
    failed = failed_cells(frame)
    if not failed.empty:
        rows = [[_td(str(v)) for v in row] for row in failed.itertuples(index=False)]
        parts += ['<section id="failed-cells">', "<h2>Failed cells</h2>", f"<p>{_inline_code(FAILED_NOTE)}</p>",
                  _table(list(failed.columns), rows), "</section>"]
    style, script = _asset("report.css"), _asset("report.js")
    values = {
        "title": escape(name),
        "body": "\n".join(parts),
        "style": style,
        "script": script,
        "style_hash": _csp_hash(style),
        "script_hash": _csp_hash(script),
        "generator": escape(wmbench.__version__),
        "source": escape(source or f"{name}.csv"),
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _asset("report.html"))


def _group_section(group: GroupSummary, anchor: str, plots: list[Path]) -> str:
    """One (model, dataset): its summary, a table per attack and its own ``plots``, inlined."""
    model, dataset = str(group.model), str(group.dataset)
    metrics = joined_values(group.rows["metric"])
    out = [f'<section id="{escape(anchor)}">', f"<h2>{escape(model)} / {escape(dataset)} (metric: {escape(metrics)})</h2>"]
    attacks = group.attacks
    out.append(_summary_table(group, attacks))
    chance = at_chance_text(group.methods, escape, "<code>{}</code>".format)
    if chance is not None:
        out.append(f"<p>{chance}</p>")
    for attack in attacks:
        out.append(f"<details><summary>{escape(attack)}: every strength</summary>")
        out.append(_attack_table(group, attack))
        out.append("</details>")
    for path in plots:
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            caption = f"{model} / {dataset}: {path.stem.rsplit('-', 1)[-1]} ({path.parent.name}/{path.name})"
            out.append(
                f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{escape(caption)}</figcaption></figure>"
            )
    out.append("</section>")
    return "\n".join(out)


def _summary_table(group: GroupSummary, attacks: list[str]) -> str:
    headers = ["method", "statistic", "seeds", "clean error (%)", "imperceptibility (%)", "detected clean"]
    headers += [f"removal cost: {a}" for a in attacks]
    headers += [f"removed for < {CHEAP_REMOVAL_POINTS:g} pts", "train s/epoch"]
    body = []
    for s in group.methods:
        cells = [
            _td(s.method), _td(statistic_label(s.statistic)), _td(s.seeds_text, s.seeds),
            _td(figure_text(s.clean_error, s.seeds) + s.at_chance_mark, s.clean_error.estimate), _interval_td(s.imperceptibility, signed=True, seeds=s.seeds), _detection_td(s.clean),
        ]
        for attack in attacks:
            removal = s.removals[attack]
            css = "cheap" if removal.cheap else "safe" if removal.detected_clean and removal.cost is None else None
            cells.append(_td(removal.text(interval=False), removal.sort_key, css, title=removal.text()))
        cheap = s.cheap_removals
        cells.append(_td("yes: " + ", ".join(cheap) if cheap else "no" if s.seeds else "n/a", len(cheap), "cheap" if cheap else None))
        cells.append(_interval_td(s.train_s, seeds=s.seeds))
        body.append(cells)
    return _table(headers, body)


def _attack_table(group: GroupSummary, attack: str) -> str:
    headers = ["method", "strength", "seeds", "error (%)", "error_delta", "detect_stat", "log10 p", "detected"]
    body = [[
        _td(method), _td("clean" if strength is None else f"{strength:g}", -math.inf if strength is None else strength), _td(c.seeds_text, c.seeds),
        _interval_td(c.error, seeds=c.seeds), _interval_td(c.delta, signed=True, seeds=c.seeds), _interval_td(c.stat, digits=3, seeds=c.seeds),
        _interval_td(c.log10_p, digits=1, seeds=c.seeds), _detection_td(c),
    ] for method, strength, c in group.cells[attack]]
    return _table(headers, body)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f'<th scope="col" aria-sort="none"><button type="button">{escape(h)}</button></th>' for h in headers)
    body = "\n".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    return f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>'


def _td(text: str, sort: float | None = None, css: str | None = None, title: str | None = None) -> str:
    attrs = f' data-sort="{_sort_value(sort)}"' if sort is not None else ""
    attrs += f' class="{css}"' if css else ""
    attrs += f' title="{escape(title)}"' if title else ""
    return f"<td{attrs}>{escape(text)}</td>"


def _interval_td(interval: Interval, digits: int = 2, signed: bool = False, seeds: int = 0) -> str:
    """``interval``'s cell, marked ``(2 seeds)`` when it rests on fewer than its row's ``seeds``."""
    return _td(figure_text(interval, seeds, digits, signed), interval.estimate)


def _detection_td(cell: CellStats) -> str:
    return _td(cell.detection, cell.hits / cell.known if cell.known else math.nan)


def _sort_value(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value == math.inf else "-Infinity" if value == -math.inf else repr(value)


def _inline_code(text: str) -> str:
    """Escape ``text``, then show its `backquoted` parts as code."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", escape(text))


def _asset(name: str) -> str:
    return resources.files("wmbench").joinpath("assets", name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
