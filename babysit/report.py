"""What a run leaves for people: stage notes and plots for the dashboard, the report, export.

Everything here is derived from storage. ``publish_stage`` writes, after each stage, a
Markdown note on the stage's study (optuna-dashboard shows it on the study page) and the
stage's plots as study artifacts; what it uploaded is recorded in the study's user attr
``published``, so a rerun of a finished run uploads nothing twice, and a note a person has
edited in the dashboard since is left as they wrote it. ``write_report`` reads trials back
through babysit.record and redraws every plot; for a run whose artifact store lives on
another machine it draws what the database holds (the search scatters), since the
curves are the trials' JSON artifacts. The tables of ``babysit export`` are built in babysit.export.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit import record
from babysit import stored
from babysit.errors import UsageError
from babysit.export import export_trials  # noqa: F401 - `babysit.report.export_trials` stays
from babysit.export import trials_frame  # noqa: F401
from babysit.record import FINISHED
from babysit.record import Param
from babysit.record import StudyAttrs
from babysit.record import StudyKey
from babysit.record import trial_attrs
from babysit.render import TITLES
from babysit.render import TRIAL_COLUMNS
from babysit.render import Report
from babysit.render import Section
from babysit.render import acc
from babysit.render import blank
from babysit.render import flatten
from babysit.render import g3
from babysit.render import md_table
from babysit.render import num
from babysit.render import pct
from babysit.render import render_html
from babysit.render import render_md
from babysit.render import secs
from babysit.storage import STAGES
from babysit.storage import Storage
from babysit.storage import find_study

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# One plot per stage that has one, under this file name (the dashboard shows the name).
_PLOT_FILES = {
    "overfit": "overfit-curve.png",
    "coarse": "coarse-search.png",
    "fine": "fine-search.png",
    "final": "final-curves.png",
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
        ctx.log(
            f"warning: could not publish the {result.stage} note and plots "
            f"({type(err).__name__}: {err}); the run goes on"
        )


def _publish(storage: Storage, run: str, result: Any) -> None:
    from babysit.notes import get_note
    from babysit.notes import save_note

    study = find_study(storage, run, result.stage)
    if study is None:
        return
    published = _published(study)
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
        mine = _published(target).get("note")
        if current and mine != _digest(current):
            continue  # edited by someone in the dashboard since: theirs stays
        save_note(target, body)
        _record(target, note=_digest(body))


def _published(study: optuna.Study) -> dict[str, Any]:
    return dict(StudyAttrs.from_attrs(study.user_attrs).published or {})


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record(study: optuna.Study, **values: Any) -> None:
    published = _published(study)
    published.update(values)
    study.set_user_attr(StudyKey.PUBLISHED, published)


def _publish_plot(storage: Storage, run: str, stage: str, study: optuna.Study) -> None:
    name = _PLOT_FILES.get(stage)
    published = _published(study)
    artifacts = dict(published.get("artifacts") or {})
    if name is None or name in artifacts:
        return
    if stage == "coarse" and published.get("status") != "failed":
        fine = find_study(storage, run, "fine")
        if fine is None or StudyAttrs.from_attrs(fine.user_attrs).narrowed is None:
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
            artifact_store=storage.artifacts, file_path=path, study_or_trial=study
        )
    artifacts[name] = artifact_id
    _record(study, artifacts=artifacts)


def stage_figure(storage: Storage, run: str, stage: str) -> Figure | None:
    """The stage's plot drawn from its stored trials, or None when there is nothing to draw."""
    from babysit import plots

    return plots.stage_figure(storage, run, stage)


# ---------------------------------------------------------------------------- stage notes


def _note(storage: Storage, run: str, stage: str, study: optuna.Study) -> str:
    """The study's note in Markdown: verdict in words, the numbers, the plot."""
    published = _published(study)
    trials = study.get_trials(deepcopy=False)
    status = published.get("status", "")
    lines = [
        f"## {run}: {TITLES[stage]} {status}".rstrip(),
        "",
        published.get("verdict") or _fallback_verdict(stage, study, trials),
        "",
    ]
    if stage == "sanity":
        done = [t for t in trials if t.state in FINISHED]
        if done:
            a = trial_attrs(done[0])
            lines += md_table(
                ["initial loss", "expected", "with L2 penalty", "reg"],
                [[num(a.initial_loss), num(a.expected_loss), num(a.loss_with_reg), num(a.reg)]],
            )
    elif stage == "overfit":
        rows = [
            [
                num(t.params.get(Param.LR)),
                pct(t.value),
                blank(trial_attrs(t).steps),
                blank(trial_attrs(t).samples),
            ]
            for t in sorted(trials, key=lambda t: t.number)
            if t.state in FINISHED
        ]
        lines += md_table(["lr", "train accuracy", "steps", "examples"], rows)
    elif stage in ("coarse", "fine"):
        if stage == "fine":
            lines += _narrowing_md(StudyAttrs.from_attrs(study.user_attrs).narrowed)
        lines += [f"Top trials by validation accuracy (of {len(trials)}):", ""]
        lines += md_table(TRIAL_COLUMNS, [_trial_row(t) for t in _top(trials, 5)])
    elif stage == "final":
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if done:
            t = done[0]
            a = trial_attrs(t)
            lines += md_table(
                ["lr", "weight_decay", "epochs", "val accuracy", "test accuracy", "test loss"],
                [
                    [
                        num(t.params.get(Param.LR)),
                        num(t.params.get(Param.WEIGHT_DECAY)),
                        blank(a.epochs_run),
                        acc(a.val_accuracy),
                        acc(a.test_accuracy),
                        num(a.test_loss),
                    ]
                ],
            )
    artifact_id = (published.get("artifacts") or {}).get(_PLOT_FILES.get(stage, ""))
    if artifact_id:
        # The dashboard serves study artifacts here, so the note shows the plot inline.
        lines += [f"![{stage}](/artifacts/{study._study_id}/{artifact_id})", ""]
    lines.append(
        f"_Written by babysit; `babysit report --name {run}` has every stage on one page._"
    )
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
    verdict = StudyAttrs.from_attrs(study.user_attrs).verdict
    if verdict is not None:
        return str(verdict)
    done = [t for t in trials if t.state in FINISHED]
    if stage in ("sanity", "final"):
        return blank(trial_attrs(done[0]).verdict) if done else "not run yet"
    if stage in ("coarse", "fine"):
        counts = record.counts(trials)
        best = record.best_trial(trials)
        text = (
            f"{counts['finished']} trials ({counts['complete']} complete, "
            f"{counts['diverged']} diverged, {counts['pruned'] - counts['diverged']} "
            "pruned)"
        )
        if best is not None:
            # .get: a study copied or written by hand may lack a parameter; say so, no crash.
            text += (
                f"; best val accuracy {best.value:.3f} at lr "
                f"{g3(best.params.get(Param.LR))}, weight_decay "
                f"{g3(best.params.get(Param.WEIGHT_DECAY))}"
            )
        return text
    return ""


# ---------------------------------------------------------------------------- trials


def _top(trials: list[FrozenTrial], n: int) -> list[FrozenTrial]:
    """Complete trials by value, then pruned ones (diverged last: COMPLETE at chance in
    this babysit, PRUNED in older runs), then failed ones."""
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}

    def key(t: FrozenTrial) -> tuple:
        value = t.value if t.value is not None and math.isfinite(t.value) else -math.inf
        gone = record.diverged(t)
        return (1 if gone else order.get(t.state, 2), gone, -value, t.number)

    return sorted(record.real(trials), key=key)[:n]


def _trial_row(t: FrozenTrial) -> list[str]:
    return [
        str(t.number),
        num(t.params.get(Param.LR)),
        num(t.params.get(Param.WEIGHT_DECAY)),
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
    from babysit.plots import png

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
        busy, wall = record.timing(trials)
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
    final = stages["final"]
    if final.get("status") == "passed":
        params = ", ".join(f"{k} {g3(v)}" for k, v in (final.get("params") or {}).items())
        headline = (
            f"test accuracy {acc(final.get('test_accuracy'))}, test loss "
            f"{acc(final.get('test_loss'))} after {final.get('epochs') or '?'} epochs "
            f"at {params}"
        )
    else:
        headline = f"no final result yet (final: {final.get('status')})"
    header = [
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


def _stage_facts(
    section: Section,
    stage: str,
    info: dict[str, Any],
    trials: list[FrozenTrial],
    summary: dict[str, Any],
) -> None:
    facts = section.facts
    if stage == "sanity":
        facts += [
            ("initial loss", num(info.get("initial_loss"))),
            ("expected loss", num(info.get("expected_loss"))),
            ("loss with L2 penalty", num(info.get("loss_with_reg"))),
        ]
    elif stage == "overfit":
        facts += [
            ("train accuracy", pct(info.get("train_accuracy"))),
            ("lr", num(info.get("lr"))),
            ("learning rates tried", str(len(trials))),
        ]
    elif stage in ("coarse", "fine") and trials:
        facts += [
            ("trials", f"{info.get('trials', 0)} of {info.get('target', '?')} finished"),
            ("complete", str(info.get("complete", 0))),
            ("pruned", f"{info.get('pruned', 0)} ({info.get('diverged', 0)} diverged)"),
            ("failed", str(info.get("failed", 0))),
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
            facts += [(f"{k} range", f"[{v[0]:.3g}, {v[1]:.3g}]") for k, v in ranges.items()]
        narrowed = info.get("narrowing") if stage == "fine" else None
        if narrowed:
            facts.append(("narrowing rule", narrowed["rule"]))
            section.notes += [f"warning: {w}" for w in narrowed.get("warnings") or []]
        section.trials = [_trial_row(t) for t in _top(trials, _TOP_TRIALS)]
        section.total_trials = len(trials)
    elif stage == "final" and info.get("status") == "passed":
        facts += [(k, num(v)) for k, v in (info.get("params") or {}).items()]
        facts += [
            ("epochs", str(info.get("epochs"))),
            ("val accuracy", acc(info.get("val_accuracy"))),
            ("test accuracy", acc(info.get("test_accuracy"))),
            ("test loss", num(info.get("test_loss"))),
        ]
