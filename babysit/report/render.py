"""The report's HTML page and Markdown twin, and the formatting of its numbers.

babysit.report gathers the facts from storage into a ``Report``; this module only lays
them out: HTML with inline images and no outside assets, and Markdown with the images
beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from babysit.schema import Stage

TITLES = {
    Stage.SANITY: "sanity check",
    Stage.OVERFIT: "overfit a small subset",
    Stage.COARSE: "coarse search",
    Stage.FINE: "fine search",
    Stage.FINAL: "final training",
}
TRIAL_COLUMNS = ["#", "lr", "weight_decay", "val accuracy", "state", "reason"]


def trial_columns(params: list[str]) -> list[str]:
    """The trial table's columns: the number, every searched parameter, the result."""
    return ["#", *params, "val accuracy", "state", "reason"]


# ---------------------------------------------------------------------------- formatting


def blank(v: Any) -> str:
    """A stored value as text, empty when it is not stored."""
    return "" if v is None else str(v)


def num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def g3(v: Any) -> str:
    """A parameter as the verdicts print it (3 significant digits), '-' when missing."""
    return f"{v:.3g}" if isinstance(v, (int, float)) else num(v)


def acc(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def pct(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"


def secs(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.1f} s"
    return f"{v / 60:.1f} min"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        if isinstance(value, dict) and value and key != "lrs":
            out += flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


# ---------------------------------------------------------------------------- the report


@dataclass
class Section:
    stage: str
    status: str
    verdict: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trials: list[list[str]] = field(default_factory=list)
    # The trial table's header: TRIAL_COLUMNS, or more where dropout or a schedule was searched.
    columns: list[str] = field(default_factory=lambda: list(TRIAL_COLUMNS))
    total_trials: int = 0
    figure: str | None = None


@dataclass
class Report:
    run: str
    header: list[tuple[str, str]]
    headline: str
    timing: list[list[str]]
    sections: list[Section]
    spec: list[tuple[str, str]]
    images: dict[str, bytes]
    generated: str


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 980px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em; font-size: 1.25em; }
.headline { font-size: 1.15em; background: #f3f6fa; padding: .6em .9em; border-radius: 6px; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .92em; }
th, td { border: 1px solid #d5d9de; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f6f7f9; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-size: .8em; padding: .1em .5em; border-radius: 4px; margin-left: .4em;
          color: white; background: #888; vertical-align: middle; }
.passed { background: #2e7d32; } .failed { background: #c62828; }
.running { background: #ef6c00; } .verdict { margin: .4em 0; }
.warning { color: #8a4b00; } img { max-width: 100%; height: auto; display: block; }
.meta { color: #666; font-size: .9em; } details { margin: 1em 0; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if i in numeric else ''}>{_esc(c)}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def render_html(r: Report) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>babysit report: {_esc(r.run)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>babysit report: {_esc(r.run)}</h1>",
        f'<p class="meta">generated {_esc(r.generated)}</p>',
        f'<p class="headline">{_esc(r.headline)}</p>',
        _html_table(["", ""], [[k, v] for k, v in r.header], set()),
        "<h2>Stages</h2>",
        _html_table(
            [
                "stage",
                "status",
                "trials",
                "sum of trial durations",
                "wall (first start to last end)",
                "epochs spent",
            ],
            r.timing,
            {2, 3, 4, 5},
        ),
    ]
    for s in r.sections:
        parts.append(
            f'<h2 id="{s.stage}">{_esc(TITLES[s.stage])} '
            f'<span class="status {_esc(s.status)}">{_esc(s.status)}</span></h2>'
        )
        parts.append(f'<p class="verdict">{_esc(s.verdict)}</p>')
        parts += [f'<p class="warning">{_esc(n)}</p>' for n in s.notes]
        if s.facts:
            parts.append(_html_table(["", ""], [[k, v] for k, v in s.facts], set()))
        if s.figure:
            data = base64.b64encode(r.images[s.figure]).decode("ascii")
            parts.append(f'<img alt="{_esc(s.stage)} plot" src="data:image/png;base64,{data}">')
        if s.trials:
            more = s.total_trials - len(s.trials)
            parts.append(
                f"<p>Top {len(s.trials)} trials"
                f"{f' ({more} more in babysit export)' if more > 0 else ''}:</p>"
            )
            numeric = {
                i for i, c in enumerate(s.columns) if c not in ("state", "reason", "schedule")
            }
            parts.append(_html_table(s.columns, s.trials, numeric))
    parts.append("<details><summary>The run's spec</summary>")
    parts.append(_html_table(["key", "value"], [[k, v] for k, v in r.spec], set()))
    parts.append("</details></body></html>")
    return "\n".join(parts) + "\n"


def render_md(r: Report) -> str:
    lines = [
        f"# babysit report: {r.run}",
        "",
        f"_generated {r.generated}_",
        "",
        f"**{r.headline}**",
        "",
    ]
    lines += md_table(["", ""], [[k, v] for k, v in r.header])
    lines += ["## Stages", ""]
    lines += md_table(
        [
            "stage",
            "status",
            "trials",
            "sum of trial durations",
            "wall (first start to last end)",
            "epochs spent",
        ],
        r.timing,
    )
    for s in r.sections:
        lines += [f"## {TITLES[s.stage]}: {s.status}", "", s.verdict, ""]
        lines += [f"> {n}" for n in s.notes]
        if s.notes:
            lines.append("")
        lines += md_table(["", ""], [[k, v] for k, v in s.facts])
        if s.figure:
            lines += [f"![{s.stage}]({s.figure})", ""]
        if s.trials:
            more = s.total_trials - len(s.trials)
            lines += [
                f"Top {len(s.trials)} trials"
                f"{f' ({more} more in `babysit export`)' if more > 0 else ''}:",
                "",
            ]
            lines += md_table(s.columns, s.trials)
    lines += ["## The run's spec", "", "```"]
    lines += [f"{k} = {v}" for k, v in r.spec]
    lines += ["```", ""]
    return "\n".join(lines)
