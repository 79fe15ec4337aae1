"""What a run leaves for people: stage notes and plots for the dashboard, the report, export.

Everything here is derived from storage. ``publish_stage`` writes, after each stage, a
Markdown note on the stage's study (optuna-dashboard shows it on the study page) and the
stage's plots as study artifacts; what it uploaded is recorded in the study's user attr
``published``, so a rerun of a finished run uploads nothing twice, and a note a person has
edited in the dashboard since is left as they wrote it. ``write_report`` and
``export_trials`` read trials back and redraw every plot, so they work for a run whose
artifact store lives on another machine.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import math
import os
import tempfile
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.errors import UsageError
from babysit.storage import STAGES
from babysit.storage import Storage
from babysit.storage import find_study

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_PUBLISHED = "published"
# One plot per stage that has one, under this file name (the dashboard shows the name).
_PLOT_FILES = {
    "overfit": "overfit-curve.png",
    "coarse": "coarse-search.png",
    "fine": "fine-search.png",
    "final": "final-curves.png",
}
_TITLES = {
    "sanity": "sanity check",
    "overfit": "overfit a small subset",
    "coarse": "coarse search",
    "fine": "fine search",
    "final": "final training",
}
_TOP_TRIALS = 10


# ---------------------------------------------------------------------------- publishing


def publish_stage(ctx: Any, result: Any) -> None:
    """Called after each stage with its StageResult; writes notes and plot artifacts.

    Never raises: a plot that cannot be drawn or uploaded is a warning, not a failed run.
    Only the process that owns the run publishes, so ``--jobs`` workers finishing the same
    stage at the same moment do not upload the same plot twice.
    """
    if not getattr(ctx, "owner", True):
        return
    try:
        _publish(ctx.storage, ctx.spec.name, result)
    except Exception as err:  # noqa: BLE001 - publishing must never stop a run
        ctx.log(f"warning: could not publish the {result.stage} note and plots "
                f"({type(err).__name__}: {err}); the run goes on")


def _publish(storage: Storage, run: str, result: Any) -> None:
    from optuna_dashboard import get_note
    from optuna_dashboard import save_note

    study = find_study(storage, run, result.stage)
    if study is None:
        return
    published = study.user_attrs.get(_PUBLISHED) or {}
    if published.get("verdict") != result.verdict or published.get("status") != result.status:
        _record(study, verdict=result.verdict, status=result.status)
    # The coarse scatter waits for the narrowed box, which exists once fine starts; so
    # fine's turn publishes coarse too (and coarse's own turn does when it failed, since
    # no fine stage follows, or on a rerun, when the box is already there).
    stages = ("coarse", "fine") if result.stage == "fine" else (result.stage,)
    for stage in stages:
        target = study if stage == result.stage else find_study(storage, run, stage)
        if target is None:
            continue
        _publish_plot(storage, run, stage, target)
        body = _note(storage, run, stage, target)
        current = get_note(target)
        if current == body:
            continue
        mine = (target.user_attrs.get(_PUBLISHED) or {}).get("note")
        if current and mine != _digest(current):
            continue  # edited by someone in the dashboard since: theirs stays
        save_note(target, body)
        _record(target, note=_digest(body))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record(study: optuna.Study, **values: Any) -> None:
    published = dict(study.user_attrs.get(_PUBLISHED) or {})
    published.update(values)
    study.set_user_attr(_PUBLISHED, published)


def _publish_plot(storage: Storage, run: str, stage: str, study: optuna.Study) -> None:
    name = _PLOT_FILES.get(stage)
    published = dict(study.user_attrs.get(_PUBLISHED) or {})
    artifacts = dict(published.get("artifacts") or {})
    if name is None or name in artifacts:
        return
    if stage == "coarse" and published.get("status") != "failed":
        fine = find_study(storage, run, "fine")
        if fine is None or "narrowed" not in fine.user_attrs:
            return
    fig = stage_figure(storage, run, stage)
    if fig is None:
        return
    from babysit.plots import png

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as fh:
            fh.write(png(fig))
        artifact_id = optuna.artifacts.upload_artifact(
            artifact_store=storage.artifacts, file_path=path, study_or_trial=study)
    artifacts[name] = artifact_id
    _record(study, artifacts=artifacts)


def stage_figure(storage: Storage, run: str, stage: str) -> Figure | None:
    """The stage's plot drawn from its stored trials, or None when there is nothing to draw."""
    study = find_study(storage, run, stage)
    if study is None:
        return None
    trials = study.get_trials(deepcopy=False)
    from babysit import plots

    if stage == "overfit":
        if not any(t.user_attrs.get("curve") for t in trials):
            return None
        samples = next((t.user_attrs["samples"] for t in trials if "samples" in t.user_attrs),
                       None)
        return plots.overfit_curve(trials, samples)
    if stage in ("coarse", "fine"):
        if not any(t.state in _FINISHED for t in trials):
            return None
        coarse = study if stage == "coarse" else find_study(storage, run, "coarse")
        fine = study if stage == "fine" else find_study(storage, run, "fine")
        bounds = (coarse.user_attrs.get("ranges") if coarse else None) or \
            study.user_attrs.get("ranges") or {}
        narrowed = fine.user_attrs.get("narrowed") if fine else None
        return plots.search_scatter(trials, stage, bounds,
                                    narrowed["ranges"] if narrowed else None)
    if stage == "final":
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if not done or not done[0].user_attrs.get("curves"):
            return None
        return plots.final_curves(done[0])
    return None


# ---------------------------------------------------------------------------- stage notes


def _note(storage: Storage, run: str, stage: str, study: optuna.Study) -> str:
    """The study's note in Markdown: verdict in words, the numbers, the plot."""
    published = study.user_attrs.get(_PUBLISHED) or {}
    trials = study.get_trials(deepcopy=False)
    status = published.get("status", "")
    lines = [f"## {run}: {_TITLES[stage]} {status}".rstrip(), "",
             published.get("verdict") or _fallback_verdict(stage, study, trials), ""]
    if stage == "sanity":
        done = [t for t in trials if t.state in _FINISHED]
        if done:
            a = done[0].user_attrs
            lines += _md_table(["initial loss", "expected", "with L2 penalty", "reg"],
                               [[_num(a.get("initial_loss")), _num(a.get("expected_loss")),
                                 _num(a.get("loss_with_reg")), _num(a.get("reg"))]])
    elif stage == "overfit":
        rows = [[_num(t.params.get("lr")), _pct(t.value), str(t.user_attrs.get("steps", "")),
                 str(t.user_attrs.get("samples", ""))]
                for t in sorted(trials, key=lambda t: t.number) if t.state in _FINISHED]
        lines += _md_table(["lr", "train accuracy", "steps", "examples"], rows)
    elif stage in ("coarse", "fine"):
        if stage == "fine":
            lines += _narrowing_md(study.user_attrs.get("narrowed"))
        lines += [f"Top trials by validation accuracy (of {len(trials)}):", ""]
        lines += _md_table(_TRIAL_COLUMNS, [_trial_row(t) for t in _top(trials, 5)])
    elif stage == "final":
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if done:
            t = done[0]
            a = t.user_attrs
            lines += _md_table(
                ["lr", "weight_decay", "epochs", "val accuracy", "test accuracy", "test loss"],
                [[_num(t.params.get("lr")), _num(t.params.get("weight_decay")),
                  str(a.get("epochs_run", "")), _acc(a.get("val_accuracy")),
                  _acc(a.get("test_accuracy")), _num(a.get("test_loss"))]])
    artifact_id = (published.get("artifacts") or {}).get(_PLOT_FILES.get(stage, ""))
    if artifact_id:
        # The dashboard serves study artifacts here, so the note shows the plot inline.
        lines += [f"![{stage}](/artifacts/{study._study_id}/{artifact_id})", ""]
    lines.append("_Written by babysit; `babysit report --name "
                 f"{run}` has every stage on one page._")
    return "\n".join(lines) + "\n"


def _narrowing_md(narrowed: dict[str, Any] | None) -> list[str]:
    if not narrowed:
        return []
    lines = ["**Narrowed ranges** (searched here):", ""]
    for name, (lo, hi) in narrowed["ranges"].items():
        lines.append(f"- `{name}`: [{lo:.3g}, {hi:.3g}]")
    lines += ["", f"Rule: {narrowed['rule']}.", ""]
    for warning in narrowed.get("warnings") or []:
        lines.append(f"- **warning**: {warning}")
    if narrowed.get("warnings"):
        lines.append("")
    return lines


def _fallback_verdict(stage: str, study: optuna.Study, trials: list[FrozenTrial]) -> str:
    """A verdict for runs published before the verdict was stored: from the trials."""
    if "verdict" in study.user_attrs:
        return str(study.user_attrs["verdict"])
    done = [t for t in trials if t.state in _FINISHED]
    if stage in ("sanity", "final"):
        return str(done[0].user_attrs.get("verdict", "")) if done else "not run yet"
    if stage in ("coarse", "fine"):
        counts = _counts(trials)
        best = _best(trials)
        text = (f"{counts['finished']} trials ({counts['complete']} complete, "
                f"{counts['diverged']} diverged, {counts['pruned'] - counts['diverged']} "
                "pruned)")
        if best is not None:
            # .get: a study copied or written by hand may lack a parameter; say so, no crash.
            text += (f"; best val accuracy {best.value:.3f} at lr "
                     f"{_g3(best.params.get('lr'))}, weight_decay "
                     f"{_g3(best.params.get('weight_decay'))}")
        return text
    return ""


# ---------------------------------------------------------------------------- trials


_TRIAL_COLUMNS = ["#", "lr", "weight_decay", "val accuracy", "state", "reason"]


def _real(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.user_attrs.get("reason") != "surplus"]


def _counts(trials: list[FrozenTrial]) -> dict[str, int]:
    real = _real(trials)
    return {
        "finished": sum(t.state in _FINISHED for t in real),
        "complete": sum(t.state == TrialState.COMPLETE for t in real),
        "pruned": sum(t.state == TrialState.PRUNED for t in real),
        "diverged": sum(t.user_attrs.get("reason") == "diverged" for t in real),
        "failed": sum(t.state == TrialState.FAIL for t in real),
    }


def _best(trials: list[FrozenTrial]) -> FrozenTrial | None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def _top(trials: list[FrozenTrial], n: int) -> list[FrozenTrial]:
    """Complete trials by value, then pruned ones (diverged last), then failed ones."""
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}

    def key(t: FrozenTrial) -> tuple:
        value = t.value if t.value is not None and math.isfinite(t.value) else -math.inf
        return (order.get(t.state, 2), t.user_attrs.get("reason") == "diverged", -value,
                t.number)

    return sorted(_real(trials), key=key)[:n]


def _trial_row(t: FrozenTrial) -> list[str]:
    return [str(t.number), _num(t.params.get("lr")), _num(t.params.get("weight_decay")),
            _acc(t.value), t.state.name, str(t.user_attrs.get("reason", ""))]


def _timing(trials: list[FrozenTrial]) -> tuple[float | None, float | None]:
    """(sum of trial durations, wall from the first start to the last completion), seconds."""
    spans = [(t.datetime_start, t.datetime_complete) for t in trials
             if t.datetime_start is not None and t.datetime_complete is not None]
    if not spans:
        return None, None
    busy = sum((b - a).total_seconds() for a, b in spans)
    wall = (max(b for _, b in spans) - min(a for a, _ in spans)).total_seconds()
    return busy, wall


# ---------------------------------------------------------------------------- formatting


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _g3(v: Any) -> str:
    """A parameter as the verdicts print it (3 significant digits), '-' when missing."""
    return f"{v:.3g}" if isinstance(v, (int, float)) else _num(v)


def _acc(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 120:
        return f"{v:.1f} s"
    return f"{v / 60:.1f} min"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        if isinstance(value, dict) and value and key != "lrs":
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


# ---------------------------------------------------------------------------- the report


@dataclass
class _Section:
    stage: str
    status: str
    verdict: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trials: list[list[str]] = field(default_factory=list)
    total_trials: int = 0
    figure: str | None = None


@dataclass
class _Report:
    run: str
    header: list[tuple[str, str]]
    headline: str
    timing: list[list[str]]
    sections: list[_Section]
    spec: list[tuple[str, str]]
    images: dict[str, bytes]
    generated: str


def write_report(storage: Storage, run: str, out_dir: Path) -> tuple[Path, Path]:
    """A self-contained HTML report (images inline) and its Markdown twin (images beside it).

    Built from storage alone: the plots are redrawn from the stored trials.
    """
    report = _build(storage, run)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create report folder {out_dir}: {err.strerror}") from None
    html_path = out_dir / "report.html"
    md_path = out_dir / "report.md"
    html_path.write_text(_render_html(report), encoding="utf-8")
    for name, data in report.images.items():
        (out_dir / name).write_bytes(data)
    md_path.write_text(_render_md(report), encoding="utf-8")
    return html_path, md_path


def _build(storage: Storage, run: str) -> _Report:
    from babysit.plots import png
    from babysit.protocol import stored_spec
    from babysit.protocol import summarize

    spec = stored_spec(storage, run)  # a UsageError naming the storage when there is no run
    summary = summarize(storage, run)
    stages = summary["stages"]
    images: dict[str, bytes] = {}
    sections: list[_Section] = []
    timing: list[list[str]] = []
    total_busy = 0.0
    for stage in STAGES:
        study = find_study(storage, run, stage)
        trials = study.get_trials(deepcopy=False) if study is not None else []
        info = stages.get(stage, {})
        published = (study.user_attrs.get(_PUBLISHED) or {}) if study is not None else {}
        verdict = published.get("verdict") or (
            _fallback_verdict(stage, study, trials) if study is not None else "not run yet")
        section = _Section(stage=stage, status=info.get("status", "skipped"), verdict=verdict)
        _stage_facts(section, stage, info, trials, summary)
        fig = stage_figure(storage, run, stage)
        if fig is not None:
            name = f"{stage}.png"
            images[name] = png(fig)
            section.figure = name
        sections.append(section)
        busy, wall = _timing(trials)
        total_busy += busy or 0.0
        timing.append([stage, section.status, str(len(trials)), _secs(busy), _secs(wall),
                       f"{summary['epochs_by_stage'].get(stage, 0.0):.2f}"])
    timing.append(["all", "", str(sum(int(r[2]) for r in timing)), _secs(total_busy), "",
                   f"{summary['epochs_spent']:.2f}"])
    final = stages["final"]
    if final.get("status") == "passed":
        params = ", ".join(f"{k} {_g3(v)}" for k, v in (final.get("params") or {}).items())
        headline = (f"test accuracy {_acc(final.get('test_accuracy'))}, test loss "
                    f"{_acc(final.get('test_loss'))} after {final.get('epochs') or '?'} epochs "
                    f"at {params}")
    else:
        headline = f"no final result yet (final: {final.get('status')})"
    header = [("dataset", f"{summary['dataset']} ({summary['num_classes']} classes)"),
              ("model", str(summary["model"])), ("optimizer", str(summary["optimizer"])),
              ("storage", summary["storage"]),
              ("epochs spent", f"{summary['epochs_spent']:.2f} (training examples processed "
                               "by all stages / training split size)")]
    spec_rows = [(k, json.dumps(v) if not isinstance(v, str) else v)
                 for k, v in _flatten(spec.to_dict())]
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return _Report(run=run, header=header, headline=headline, timing=timing,
                   sections=sections, spec=spec_rows, images=images, generated=generated)


def _stage_facts(section: _Section, stage: str, info: dict[str, Any],
                 trials: list[FrozenTrial], summary: dict[str, Any]) -> None:
    facts = section.facts
    if stage == "sanity":
        facts += [("initial loss", _num(info.get("initial_loss"))),
                  ("expected loss", _num(info.get("expected_loss"))),
                  ("loss with L2 penalty", _num(info.get("loss_with_reg")))]
    elif stage == "overfit":
        facts += [("train accuracy", _pct(info.get("train_accuracy"))),
                  ("lr", _num(info.get("lr"))), ("learning rates tried", str(len(trials)))]
    elif stage in ("coarse", "fine") and trials:
        facts += [("trials", f"{info.get('trials', 0)} of {info.get('target', '?')} finished"),
                  ("complete", str(info.get("complete", 0))),
                  ("pruned", f"{info.get('pruned', 0)} ({info.get('diverged', 0)} diverged)"),
                  ("failed", str(info.get("failed", 0)))]
        best = info.get("best")
        if best:
            facts.append(("best", f"val accuracy {best['value']:.4f} (trial {best['number']}) "
                                  f"at lr {_g3(best['params'].get('lr'))}, weight_decay "
                                  f"{_g3(best['params'].get('weight_decay'))}"))
        ranges = info.get("range")
        if ranges:
            facts += [(f"{k} range", f"[{v[0]:.3g}, {v[1]:.3g}]") for k, v in ranges.items()]
        narrowed = info.get("narrowing") if stage == "fine" else None
        if narrowed:
            facts.append(("narrowing rule", narrowed["rule"]))
            section.notes += [f"warning: {w}" for w in narrowed.get("warnings") or []]
        section.trials = [_trial_row(t) for t in _top(trials, _TOP_TRIALS)]
        section.total_trials = len(trials)
    elif stage == "final" and info.get("status") == "passed":
        facts += [(k, _num(v)) for k, v in (info.get("params") or {}).items()]
        facts += [("epochs", str(info.get("epochs"))),
                  ("val accuracy", _acc(info.get("val_accuracy"))),
                  ("test accuracy", _acc(info.get("test_accuracy"))),
                  ("test loss", _num(info.get("test_loss")))]


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
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{_esc(c)}</td>'
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _render_html(r: _Report) -> str:
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
        _html_table(["stage", "status", "trials", "sum of trial durations",
                     "wall (first start to last end)", "epochs spent"], r.timing, {2, 3, 4, 5}),
    ]
    for s in r.sections:
        parts.append(f'<h2 id="{s.stage}">{_esc(_TITLES[s.stage])} '
                     f'<span class="status {_esc(s.status)}">{_esc(s.status)}</span></h2>')
        parts.append(f'<p class="verdict">{_esc(s.verdict)}</p>')
        parts += [f'<p class="warning">{_esc(n)}</p>' for n in s.notes]
        if s.facts:
            parts.append(_html_table(["", ""], [[k, v] for k, v in s.facts], set()))
        if s.figure:
            data = base64.b64encode(r.images[s.figure]).decode("ascii")
            parts.append(f'<img alt="{_esc(s.stage)} plot" src="data:image/png;base64,{data}">')
        if s.trials:
            more = s.total_trials - len(s.trials)
            parts.append(f"<p>Top {len(s.trials)} trials"
                         f"{f' ({more} more in babysit export)' if more > 0 else ''}:</p>")
            parts.append(_html_table(_TRIAL_COLUMNS, s.trials, {0, 1, 2, 3}))
    parts.append("<details><summary>The run's spec</summary>")
    parts.append(_html_table(["key", "value"], [[k, v] for k, v in r.spec], set()))
    parts.append("</details></body></html>")
    return "\n".join(parts) + "\n"


def _render_md(r: _Report) -> str:
    lines = [f"# babysit report: {r.run}", "", f"_generated {r.generated}_", "",
             f"**{r.headline}**", ""]
    lines += _md_table(["", ""], [[k, v] for k, v in r.header])
    lines += ["## Stages", ""]
    lines += _md_table(["stage", "status", "trials", "sum of trial durations",
                        "wall (first start to last end)", "epochs spent"], r.timing)
    for s in r.sections:
        lines += [f"## {_TITLES[s.stage]}: {s.status}", "", s.verdict, ""]
        lines += [f"> {n}" for n in s.notes]
        if s.notes:
            lines.append("")
        lines += _md_table(["", ""], [[k, v] for k, v in s.facts])
        if s.figure:
            lines += [f"![{s.stage}]({s.figure})", ""]
        if s.trials:
            more = s.total_trials - len(s.trials)
            lines += [f"Top {len(s.trials)} trials"
                      f"{f' ({more} more in `babysit export`)' if more > 0 else ''}:", ""]
            lines += _md_table(_TRIAL_COLUMNS, s.trials)
    lines += ["## The run's spec", "", "```"]
    lines += [f"{k} = {v}" for k, v in r.spec]
    lines += ["```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- export


def trials_frame(storage: Storage, run: str) -> pd.DataFrame:
    """Every trial of every stage, one row each: study, stage, params, value, state,
    user attrs flattened (lists and dicts as JSON strings), times and duration."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    found = False
    for stage in STAGES:
        study = find_study(storage, run, stage)
        if study is None:
            continue
        found = True
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            row: dict[str, Any] = {
                "study": study.study_name, "stage": stage, "number": t.number,
                "state": t.state.name, "value": t.value,
                "datetime_start": t.datetime_start, "datetime_complete": t.datetime_complete,
                "duration_s": t.duration.total_seconds() if t.duration is not None else None,
            }
            row.update({f"params_{k}": v for k, v in sorted(t.params.items())})
            row.update({f"user_attrs_{k}": _cell(v) for k, v in sorted(t.user_attrs.items())})
            rows.append(row)
    if not found:
        raise UsageError(f"no run named '{run}' in storage {storage.shown}; "
                         "`babysit status` lists the runs there")
    frame = pd.DataFrame(rows)
    lead = ["study", "stage", "number", "state", "value", "datetime_start",
            "datetime_complete", "duration_s"]
    rest = sorted(c for c in frame.columns if c not in lead)
    frame = frame[lead + [c for c in rest if c.startswith("params_")]
                  + [c for c in rest if not c.startswith("params_")]]
    for col in ("datetime_start", "datetime_complete"):
        frame[col] = pd.to_datetime(frame[col])
    for col in frame.columns:
        # A column mixing text with numbers (an attr stored as both) becomes text, so
        # Parquet can type it and CSV reads it back the same.
        kinds = {type(v) for v in frame[col] if v is not None and not _isnan(v)}
        if str in kinds and len(kinds) > 1:
            frame[col] = [None if v is None or _isnan(v) else str(v) for v in frame[col]]
    return frame


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _cell(v: Any) -> Any:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return v


def export_trials(storage: Storage, run: str, fmt: str, out: Path) -> tuple[Path, int]:
    """Write every trial of the run to ``out`` as CSV or Parquet; returns (path, rows)."""
    if fmt not in ("csv", "parquet"):
        raise UsageError(f"unknown export format '{fmt}'; use csv or parquet")
    frame = trials_frame(storage, run)
    out = Path(out)
    if not out.parent.exists():
        raise UsageError(f"folder {out.parent} for {out.name} does not exist; create it or "
                         "pass another --out")
    if fmt == "csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)
    return out, len(frame)
