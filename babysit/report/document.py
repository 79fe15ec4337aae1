"""``babysit report``: the HTML report and its Markdown twin, built from storage
alone (every plot redrawn from the stored trials; babysit/report/render.py lays
them out).
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit import schema
from babysit.errors import UsageError
from babysit.record import stored
from babysit.report.render import Report
from babysit.report.render import Section
from babysit.report.render import acc
from babysit.report.render import blank
from babysit.report.render import flatten
from babysit.report.render import g3
from babysit.report.render import num
from babysit.report.render import pct
from babysit.report.render import render_html
from babysit.report.render import render_md
from babysit.report.render import secs
from babysit.report.render import trial_columns
from babysit.schema import FINISHED
from babysit.schema import STAGES
from babysit.schema import Narrowed
from babysit.schema import Param
from babysit.schema import Stage
from babysit.schema import StudyAttrs
from babysit.schema import trial_attrs
from babysit.storage import Storage
from babysit.terminal import epoch_tested
from babysit.terminal import shown_range

_TOP_TRIALS = 10

if TYPE_CHECKING:
    pass


def _narrowing_md(attr: dict[str, Any] | None) -> list[str]:
    if not attr:
        return []
    narrowed = Narrowed.from_attrs(attr)
    lines = ["**Narrowed ranges** (searched here):", ""]
    for name, values in narrowed.ranges.items():
        lines.append(f"- `{name}`: {shown_range(values)}")
    lines += ["", f"Rule: {narrowed.rule}.", ""]
    for warning in narrowed.warnings:
        lines.append(f"- **warning**: {warning}")
    if narrowed.warnings:
        lines.append("")
    return lines


def _fallback_verdict(stage: str, study: optuna.Study, trials: list[FrozenTrial]) -> str:
    """A verdict for runs published before the verdict was stored: from the trials."""
    verdict = StudyAttrs.from_attrs(study.user_attrs).verdict
    if verdict is not None:
        return str(verdict)
    done = [t for t in trials if t.state in FINISHED]
    if stage in (Stage.SANITY, Stage.FINAL):
        return blank(trial_attrs(done[0]).verdict) if done else "not run yet"
    if stage in (Stage.COARSE, Stage.FINE):
        counts = schema.counts(trials)
        best = schema.best_trial(trials)
        text = f"{counts['finished']} trials ({schema.counts_text(counts)})"
        if best is not None:
            # .get: a study copied or written by hand may lack a parameter; say so, no crash.
            text += (
                f"; best val accuracy {best.value:.3f} at lr "
                f"{g3(best.params.get(Param.LR))}, weight_decay "
                f"{g3(best.params.get(Param.WEIGHT_DECAY))}"
            )
        return text
    return ""


def _top(trials: list[FrozenTrial], n: int) -> list[FrozenTrial]:
    """Complete trials by value, then pruned ones (diverged last: COMPLETE at chance in
    this babysit, PRUNED in older runs), then failed ones."""
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}

    def key(t: FrozenTrial) -> tuple:
        value = t.value if t.value is not None and math.isfinite(t.value) else -math.inf
        gone = schema.diverged(t)
        return (1 if gone else order.get(t.state, 2), gone, -value, t.number)

    return sorted(schema.real(trials), key=key)[:n]


def searched(trials: list[FrozenTrial]) -> list[str]:
    """The parameters the trials searched, in Param's order (lr and weight_decay always)."""
    found = {name for t in trials for name in t.params}
    return [n for n in Param.ALL if n in Param.LOG or n in found]


def _trial_row(t: FrozenTrial, params: list[str] | None = None) -> list[str]:
    return [
        str(t.number),
        *(num(t.params.get(name)) for name in params or Param.LOG),
        acc(t.value),
        t.state.name,
        blank(trial_attrs(t).reason),
    ]


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
    html_path.write_text(render_html(report), encoding="utf-8")
    for name, data in report.images.items():
        (out_dir / name).write_bytes(data)
    md_path.write_text(render_md(report), encoding="utf-8")
    return html_path, md_path


def _build(storage: Storage, run: str) -> Report:
    from babysit.report.plots import png
    from babysit.report.plots import stage_figure

    spec = stored.stored_spec(storage, run)  # a UsageError naming the storage if no run
    records = stored.load_run(storage, run)
    summary = stored.summary(storage, run, records)
    stages = summary["stages"]
    images: dict[str, bytes] = {}
    sections: list[Section] = []
    timing: list[list[str]] = []
    total_busy = 0.0
    for stage in STAGES:
        study, trials = records[stage].study, records[stage].trials
        info = stages.get(stage, {})
        published = records[stage].attrs.published or {}
        verdict = published.get("verdict") or (
            _fallback_verdict(stage, study, trials) if study is not None else "not run yet"
        )
        section = Section(stage=stage, status=info.get("status", "skipped"), verdict=verdict)
        _stage_facts(section, stage, info, trials, summary)
        fig = stage_figure(storage, run, stage)
        if fig is not None:
            name = f"{stage}.png"
            images[name] = png(fig)
            section.figure = name
        sections.append(section)
        busy, wall = schema.timing(trials)
        total_busy += busy or 0.0
        timing.append(
            [
                stage,
                section.status,
                str(len(trials)),
                secs(busy),
                secs(wall),
                f"{summary['epochs_by_stage'].get(stage, 0.0):.2f}",
            ]
        )
    timing.append(
        [
            "all",
            "",
            str(sum(int(r[2]) for r in timing)),
            secs(total_busy),
            "",
            f"{summary['epochs_spent']:.2f}",
        ]
    )
    final = stages[Stage.FINAL]
    if final.get("status") == "passed":
        params = ", ".join(f"{k} {g3(v)}" for k, v in (final.get("params") or {}).items())
        headline = (
            f"test accuracy {acc(final.get('test_accuracy'))} {epoch_tested(final)}, test loss "
            f"{acc(final.get('test_loss'))}, at {params}"
        )
    else:
        headline = f"no final result yet (final: {final.get('status')})"
    header = _header(summary)
    spec_rows = [
        (k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(spec.to_dict())
    ]
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return Report(
        run=run,
        header=header,
        headline=headline,
        timing=timing,
        sections=sections,
        spec=spec_rows,
        images=images,
        generated=generated,
    )


def _header(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's first lines: what was trained, where it is stored, what it cost."""
    return [
        ("dataset", f"{summary['dataset']} ({summary['num_classes']} classes)"),
        ("model", str(summary["model"])),
        ("optimizer", str(summary["optimizer"])),
        ("storage", summary["storage"]),
        (
            "epochs spent",
            f"{summary['epochs_spent']:.2f} (training examples processed "
            "by all stages / training split size)",
        ),
    ]


def _stage_facts(
    section: Section,
    stage: str,
    info: dict[str, Any],
    trials: list[FrozenTrial],
    summary: dict[str, Any],
) -> None:
    facts = section.facts
    if stage == Stage.SANITY:
        facts += [
            ("initial loss", num(info.get("initial_loss"))),
            ("expected loss", num(info.get("expected_loss"))),
            ("loss with L2 penalty", num(info.get("loss_with_reg"))),
        ]
    elif stage == Stage.OVERFIT:
        facts += [
            ("train accuracy", pct(info.get("train_accuracy"))),
            ("lr", num(info.get("lr"))),
            ("learning rates tried", str(len(trials))),
        ]
    elif stage in (Stage.COARSE, Stage.FINE) and trials:
        facts += [
            ("trials", f"{info.get('trials', 0)} of {info.get('target', '?')} finished"),
            ("outcomes", schema.counts_text(info)),
        ]
        best = info.get("best")
        if best:
            facts.append(
                (
                    "best",
                    f"val accuracy {best['value']:.4f} (trial {best['number']}) "
                    f"at lr {g3(best['params'].get(Param.LR))}, weight_decay "
                    f"{g3(best['params'].get(Param.WEIGHT_DECAY))}",
                )
            )
        ranges = info.get("range")
        if ranges:
            facts += [(f"{k} range", shown_range(v)) for k, v in ranges.items()]
        attr = info.get("narrowing") if stage == Stage.FINE else None
        if attr:
            narrowed = Narrowed.from_attrs(attr)
            facts.append(("narrowing rule", narrowed.rule))
            section.notes += [f"warning: {w}" for w in narrowed.warnings]
        names = searched(trials)
        section.columns = trial_columns(names)
        section.trials = [_trial_row(t, names) for t in _top(trials, _TOP_TRIALS)]
        section.total_trials = len(trials)
    elif stage == Stage.FINAL and info.get("status") == "passed":
        facts += [(k, num(v)) for k, v in (info.get("params") or {}).items()]
        facts += [
            ("epochs", str(info.get("epochs"))),
            ("val accuracy", acc(info.get("val_accuracy"))),
            ("test accuracy", acc(info.get("test_accuracy"))),
            ("test loss", num(info.get("test_loss"))),
        ]
        # The epoch whose weights were tested, and where they are (older runs: neither).
        if info.get("best_epoch") is not None:
            facts.append(("tested epoch", str(info["best_epoch"])))
        if info.get("model_path"):
            facts.append(("model", str(info["model_path"])))
