"""What a run leaves for people: stage notes and plots for the dashboard, the report, export.

Everything here is derived from storage. ``publish_stage`` writes, after each stage, a
Markdown note on the stage's study (optuna-dashboard shows it on the study page) and the
stage's plots as study artifacts; what it uploaded is recorded in the study's user attr
``published``, so a rerun of a finished run uploads nothing twice, and a note a person has
edited in the dashboard since is left as they wrote it. ``write_report`` reads trials back
through babysit.record and redraws every plot; for a run whose artifact store lives on
another machine it draws what the database holds (the search scatters), since the
curves are the trials' JSON artifacts. The tables of ``babysit export`` are built in babysit.report.export.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any

import optuna
from optuna.trial import TrialState

from babysit.record.artifacts import upload_bytes
from babysit.record.runs import find_study
from babysit.report.document import _fallback_verdict
from babysit.report.document import _narrowing_md
from babysit.report.document import _top
from babysit.report.document import _trial_row
from babysit.report.document import searched
from babysit.report.render import TITLES
from babysit.report.render import acc
from babysit.report.render import blank
from babysit.report.render import md_table
from babysit.report.render import num
from babysit.report.render import pct
from babysit.report.render import trial_columns
from babysit.schema import FINISHED
from babysit.schema import Param
from babysit.schema import Stage
from babysit.schema import StudyAttrs
from babysit.schema import StudyKey
from babysit.schema import TrialKey
from babysit.schema import trial_attrs
from babysit.storage import Storage
from babysit.storage.private import study_id

if TYPE_CHECKING:
    from torch import nn

# One plot per stage that has one, under this file name (the dashboard shows the name).
_PLOT_FILES = {
    Stage.OVERFIT: "overfit-curve.png",
    Stage.COARSE: "coarse-search.png",
    Stage.FINE: "fine-search.png",
    Stage.FINAL: "final-curves.png",
}


# ---------------------------------------------------------------------------- publishing


def publish_stage(
    storage: Storage,
    run: str,
    stage: str,
    status: str,
    verdict: str,
    log: Callable[[str], None],
) -> None:
    """A stage's verdict, note and plot on its study, for the dashboard; called by the
    process that owns the run (``--jobs`` workers finishing the same stage at the same
    moment would upload the same plot twice).

    Never raises: a plot that cannot be drawn or uploaded is a warning (through ``log``),
    not a failed run.
    """
    try:
        _publish(storage, run, stage, status, verdict)
    except Exception as err:  # noqa: BLE001 - publishing must never stop a run
        log(
            f"warning: could not publish the {stage} note and plots "
            f"({type(err).__name__}: {err}); the run goes on"
        )


def _publish(storage: Storage, run: str, stage_done: str, status: str, verdict: str) -> None:
    from babysit.record.notes import get_note
    from babysit.record.notes import save_note

    study = find_study(storage, run, stage_done)
    if study is None:
        return
    published = _published(study)
    if published.get("verdict") != verdict or published.get("status") != status:
        _record(study, verdict=verdict, status=status)
    # The coarse scatter waits for the narrowed box, which exists once fine starts; so
    # fine's turn publishes coarse too (and coarse's own turn does when it failed, since
    # no fine stage follows, or on a rerun, when the box is already there).
    stages = (Stage.COARSE, Stage.FINE) if stage_done == Stage.FINE else (stage_done,)
    for stage in stages:
        target = study if stage == stage_done else find_study(storage, run, stage)
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
    if stage == Stage.COARSE and published.get("status") != "failed":
        fine = find_study(storage, run, Stage.FINE)
        if fine is None or StudyAttrs.from_attrs(fine.user_attrs).narrowed is None:
            return
    from babysit.report.plots import png
    from babysit.report.plots import stage_figure

    fig = stage_figure(storage, run, stage)
    if fig is None:
        return

    artifact_id = upload_bytes(storage, study, name, png(fig))
    artifacts[name] = artifact_id
    _record(study, artifacts=artifacts)


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
    if stage == Stage.SANITY:
        done = [t for t in trials if t.state in FINISHED]
        if done:
            a = trial_attrs(done[0])
            lines += md_table(
                ["initial loss", "expected", "with L2 penalty", "reg"],
                [[num(a.initial_loss), num(a.expected_loss), num(a.loss_with_reg), num(a.reg)]],
            )
    elif stage == Stage.OVERFIT:
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
    elif stage in (Stage.COARSE, Stage.FINE):
        if stage == Stage.FINE:
            lines += _narrowing_md(StudyAttrs.from_attrs(study.user_attrs).narrowed)
        lines += [f"Top trials by validation accuracy (of {len(trials)}):", ""]
        names = searched(trials)
        lines += md_table(trial_columns(names), [_trial_row(t, names) for t in _top(trials, 5)])
    elif stage == Stage.FINAL:
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if done:
            t = done[0]
            a = trial_attrs(t)
            names = searched([t])
            lines += md_table(
                [*names, "epochs", "val accuracy", "test accuracy", "test loss"],
                [
                    [
                        *(num(t.params.get(name)) for name in names),
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
        lines += [f"![{stage}](/artifacts/{study_id(study)}/{artifact_id})", ""]
    lines.append(
        f"_Written by babysit; `babysit report --name {run}` has every stage on one page._"
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- trials


def upload_filters(storage: Storage, trial: optuna.Trial, model: nn.Module) -> str:
    """The first-layer filters of a network with a conv layer (the caller checks) as a
    PNG artifact of ``trial`` (user attr ``filters_artifact``)."""
    from babysit.report.plots import first_layer_filters
    from babysit.report.plots import png

    data = png(first_layer_filters(model))
    artifact_id = upload_bytes(storage, trial, "first_layer_filters.png", data, "image/png")
    trial.set_user_attr(TrialKey.FILTERS_ARTIFACT, artifact_id)
    return artifact_id
