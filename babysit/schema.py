"""The schema of everything a run stores in its Optuna studies, and the readers of its trials.

A run is five studies ``<run>/<stage>``. What babysit keeps on them:

- study user attrs: the keys in :class:`StudyKey`, typed as :class:`StudyAttrs`;
- trial user attrs: the keys in :class:`TrialKey`, typed as :class:`TrialAttrs`; the values
  of ``reason`` in :class:`Reason`;
- trial params: :class:`Param` (``lr``, ``weight_decay``);
- stage names: :class:`Stage` (a run's studies are ``<run>/<stage>``, in :data:`STAGES` order);
- system attrs: babysit's own in :class:`SystemKey`; :data:`ARTIFACT_PREFIX` (Optuna's
  artifact records);
- JSON artifacts (babysit.record.artifacts): what is too large for an attr, which stays at most
  :data:`MAX_ATTR_BYTES` as JSON (the dashboard lays attrs out in full).

Writers use the constants, ``trial.set_user_attr(TrialKey.REASON, Reason.DIVERGED)``;
every constant's value is also the name of its dataclass field, so
``TrialAttrs(reason=Reason.DIVERGED).to_attrs()`` gives the same dict. Readers go through
``StudyAttrs.from_attrs(study.user_attrs)`` and ``TrialAttrs.from_attrs(t.user_attrs)``,
which accept any stored dict: a key a run of an older babysit did not write reads as
None, and a key this module does not know is kept in ``extra``, so old runs stay readable
and nothing stored is dropped. None means "not stored": ``to_attrs`` leaves it out.

The readers over trials (``outcome``, ``counts``, ``best_trial``, ``best_of``, ``timing``) are here; the
readers over a whole stored run (``load_stage``, ``stored_spec``, ``stage_result``,
``summary``, ``progress``) are in babysit/record/stored.py, which also reads the JSON artifacts
(babysit/record/artifacts.py builds on this module, so it cannot be imported from here). Neither
imports torch, matplotlib or pandas, so `babysit status`, `export` and `report` start fast.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import TypeVar

from optuna.trial import FrozenTrial
from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Optuna's own system attrs for uploaded artifacts: ``artifacts:<id>`` -> JSON metadata.
ARTIFACT_PREFIX = "artifacts:"
MAX_ATTR_BYTES = 1024  # the most a user attr may take as JSON


class Stage:
    """The five stages' names, which are also their studies' names under the run."""

    SANITY = "sanity"
    OVERFIT = "overfit"
    COARSE = "coarse"
    FINE = "fine"
    FINAL = "final"


# The order the protocol runs them in (and the summary, status and report show them in).
STAGES = (Stage.SANITY, Stage.OVERFIT, Stage.COARSE, Stage.FINE, Stage.FINAL)
SEARCHES = (Stage.COARSE, Stage.FINE)


def study_name(run: str, stage: str) -> str:
    """A stage's study: ``<run>/<stage>``."""
    return f"{run}/{stage}"


class SystemKey:
    """System attrs babysit writes itself (apart from Optuna's and optuna-dashboard's)."""

    # A study's spec, for runs of an older babysit that kept it here (now SPEC_ARTIFACT).
    SPEC = "babysit:spec"
    # The token of the process whose trial creation won (babysit/storage/rdb.py).
    CLAIM = "babysit:claim"
    # A trial's last heartbeat through the gRPC storage proxy (babysit/storage/remote.py)
    # or on a journal file (babysit/storage/journal.py).
    HEARTBEAT = "babysit:heartbeat"


class Param:
    """The searched parameters' names (trial params)."""

    LR = "lr"
    WEIGHT_DECAY = "weight_decay"
    DROPOUT = "dropout"
    SCHEDULE = "schedule"
    # How each is drawn and narrowed: log-uniform, uniform, or one of a list of choices.
    LOG = (LR, WEIGHT_DECAY)
    LINEAR = (DROPOUT,)
    CHOICE = (SCHEDULE,)
    # Every searchable parameter, in the order tables and plots show them.
    ALL = (LR, WEIGHT_DECAY, DROPOUT, SCHEDULE)


class Reason:
    """Values of the trial attr ``reason``: why a trial ended the way it did."""

    SURPLUS = "surplus"
    DIVERGED = "diverged"
    PRUNED = "pruned"
    LR_TOO_LOW = "lr too low"
    RUNNING_WHEN_COPIED = "running when copied"
    # Ctrl-C or SIGTERM stopped the process while the trial trained; a rerun replaces it.
    INTERRUPTED = "interrupted"


class StudyKey:
    """Study user attrs. ``SPEC``, ``RUN``, ``STAGE`` on every study; the data facts on
    sanity's; ``RANGES`` and the search settings on coarse/fine; ``NARROWED`` on fine;
    ``CHECKPOINT`` on final; ``PUBLISHED`` (notes and plots uploaded) on each."""

    SPEC = "spec"  # the whole spec: runs of older babysit only; now SPEC_ARTIFACT
    SPEC_ARTIFACT = "spec_artifact"
    SPEC_SUMMARY = "spec_summary"
    RUN = "run"
    STAGE = "stage"
    VERDICT = "verdict"
    TRAIN_SIZE = "train_size"
    NUM_CLASSES = "num_classes"
    DATA = "data"
    SIZES = "sizes"
    RANGES = "ranges"
    PRUNER = "pruner"
    SAMPLER = "sampler"
    PRUNER_RULE = "pruner_rule"
    LR_RANGE_TEST = "lr_range_test"
    LR_ANCHOR = "lr_anchor"
    EXTENSION = "extension"
    LR_PROBE = "lr_probe"
    MOVED = "moved"
    NARROWED = "narrowed"
    RECOVERY = "recovery"
    CHECKPOINT = "checkpoint"
    PUBLISHED = "published"
    # --budget (babysit/stages/budget.py): the run's plan and its re-plans on the coarse
    # study; on each search study the planned target and epochs per trial, the wall-clock
    # time (Unix seconds) by which its trials must end, what a trial may cost at most, and,
    # once a trial could not start in time, the stage's count when its time was up; on the
    # final study its planned epochs.
    BUDGET = "budget"
    BUDGET_RULE = "budget_rule"
    TARGET = "target"
    EPOCHS = "epochs"
    DEADLINE = "deadline"
    TRIAL_COST = "trial_cost"
    TIME_UP = "time_up"


class CheckpointKey:
    """Keys of the final study's ``checkpoint`` attr. While the final trains it names the
    newest checkpoint (``ARTIFACT_ID``); once the final passed the file is removed and the
    attr keeps ``EPOCH`` and ``TRIAL`` with the removed id under ``DELETED`` instead."""

    ARTIFACT_ID = "artifact_id"
    EPOCH = "epoch"
    TRIAL = "trial"
    DELETED = "deleted"


class TrialKey:
    """Trial user attrs, by the stage that writes them (most are on some stages only)."""

    # every trial: who ran it, and how it ended
    STAGE = "stage"
    WORKER = "worker"
    KEY = "key"
    REASON = "reason"
    NOTE = "note"
    VERDICT = "verdict"
    SECONDS = "seconds"
    EXAMPLES = "examples"
    # sanity
    STATUS = "status"
    INITIAL_LOSS = "initial_loss"
    EXPECTED_LOSS = "expected_loss"
    LOSS_WITH_REG = "loss_with_reg"
    REG = "reg"
    TOLERANCE = "tolerance"
    TOLERANCE_UNIT = "tolerance_unit"
    MAX_LOGIT_STD = "max_logit_std"
    LOGIT_STD = "logit_std"
    TOP_CLASS_SHARE = "top_class_share"
    TOP_CLASS = "top_class"
    NONFINITE_OUTPUTS = "nonfinite_outputs"
    NONFINITE_FIRST_BATCH = "nonfinite_first_batch"
    OUTPUTS = "outputs"
    # sanity, how the outputs line up with the labels: the loss they give under labels
    # independent of them (ln C plus the spread's cost) and the least and most they can give
    # (true class always on top / at the bottom), CE only; the share of each class's samples
    # whose true class the untrained network ranks first / last, averaged over the classes;
    # the share of output rows that are probabilities (>= 0, summing to 1).
    INDEPENDENT_LOSS = "independent_loss"
    ALIGNED_LOSS = "aligned_loss"
    OPPOSED_LOSS = "opposed_loss"
    TRUE_CLASS_FIRST = "true_class_first"
    TRUE_CLASS_LAST = "true_class_last"
    PROBABILITY_ROWS = "probability_rows"
    # overfit
    CURVE = "curve"
    STEPS = "steps"
    SAMPLES = "samples"
    TRAIN_ACCURACY = "train_accuracy"
    # searches and final
    CURVES = "curves"
    EPOCHS_RUN = "epochs_run"
    DIVERGED_AT_STEP = "diverged_at_step"
    DIAGNOSTICS = "diagnostics"
    READINGS = "readings"
    FILTERS_ARTIFACT = "filters_artifact"
    # final
    RESUMED_FROM_EPOCH = "resumed_from_epoch"
    FINAL_PROCS = "final_procs"
    BEST_EPOCH = "best_epoch"
    EPOCHS_SAVED = "epochs_saved"
    STOPPED = "stopped"
    CHECKPOINTS_WRITTEN = "checkpoints_written"
    VAL_ACCURACY = "val_accuracy"
    TEST_ACCURACY = "test_accuracy"
    TEST_LOSS = "test_loss"
    BATCH = "batch"
    MODEL_ARTIFACT = "model_artifact"
    # Where the trained weights were written: a file path, or the object store's URL.
    MODEL_PATH = "model_path"
    DATA = "data"  # the id of the JSON artifact that holds the fields in DATA_FIELDS


# Trial fields kept as JSON artifacts (older runs: in the attrs of the same name).
DATA_FIELDS = (TrialKey.CURVE, TrialKey.CURVES, TrialKey.DIAGNOSTICS, TrialKey.READINGS)


_A = TypeVar("_A", bound="_Attrs")


class _Attrs:
    """to_attrs/from_attrs for a dataclass whose field names are the stored keys."""

    extra: dict[str, Any]

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")  # type: ignore[arg-type]

    def to_attrs(self) -> dict[str, Any]:
        """The dict to store: every field that is not None, then ``extra``."""
        out = {k: getattr(self, k) for k in self.keys() if getattr(self, k) is not None}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_attrs(cls: type[_A], attrs: Mapping[str, Any] | None) -> _A:
        """Read a stored dict; missing keys are None, unknown ones go to ``extra``."""
        attrs = attrs or {}
        known = set(cls.keys())
        return cls(
            **{k: v for k, v in attrs.items() if k in known},  # type: ignore[call-arg]
            extra={k: v for k, v in attrs.items() if k not in known},
        )


@dataclass
class StudyAttrs(_Attrs):
    """A stage study's user attrs (see :class:`StudyKey`)."""

    spec: dict[str, Any] | None = None
    spec_artifact: str | None = None
    spec_summary: dict[str, str] | None = None
    run: str | None = None
    stage: str | None = None
    verdict: str | None = None
    train_size: int | None = None
    num_classes: int | None = None
    data: dict[str, Any] | None = None
    sizes: dict[str, int] | None = None
    ranges: dict[str, list[Any]] | None = None
    pruner: str | None = None
    sampler: str | None = None
    pruner_rule: str | None = None
    lr_range_test: dict[str, Any] | None = None
    lr_anchor: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None
    lr_probe: dict[str, Any] | None = None
    moved: dict[str, Any] | None = None
    narrowed: dict[str, Any] | None = None
    recovery: str | None = None
    checkpoint: dict[str, Any] | None = None
    published: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    budget_rule: str | None = None
    target: int | None = None
    epochs: int | None = None
    deadline: float | None = None
    trial_cost: float | None = None
    time_up: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialAttrs(_Attrs):
    """A trial's user attrs (see :class:`TrialKey`)."""

    stage: str | None = None
    worker: str | None = None
    key: str | None = None
    reason: str | None = None
    note: str | None = None
    verdict: str | None = None
    seconds: float | None = None
    examples: int | None = None
    status: str | None = None
    initial_loss: float | None = None
    expected_loss: float | None = None
    loss_with_reg: float | None = None
    reg: float | None = None
    tolerance: float | None = None
    tolerance_unit: str | None = None
    max_logit_std: float | None = None
    logit_std: float | None = None
    top_class_share: float | None = None
    top_class: int | None = None
    nonfinite_outputs: int | None = None
    nonfinite_first_batch: int | None = None
    outputs: int | None = None
    independent_loss: float | None = None
    aligned_loss: float | None = None
    opposed_loss: float | None = None
    true_class_first: float | None = None
    true_class_last: float | None = None
    probability_rows: float | None = None
    curve: list[dict[str, float]] | None = None
    steps: int | None = None
    samples: int | None = None
    train_accuracy: float | None = None
    curves: dict[str, list[float]] | None = None
    epochs_run: int | None = None
    diverged_at_step: int | None = None
    diagnostics: list[dict[str, Any]] | None = None
    readings: list[str] | None = None
    filters_artifact: str | None = None
    resumed_from_epoch: int | None = None
    final_procs: int | None = None
    best_epoch: int | None = None
    epochs_saved: int | None = None
    stopped: str | None = None
    checkpoints_written: int | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    batch: dict[str, int] | None = None
    model_artifact: str | None = None
    model_path: str | None = None
    data: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Narrowed(_Attrs):
    """Narrowing's result (babysit/stages/narrow.py), stored on the fine study as
    ``narrowed``: the fine ranges, the rule in words, the coarse trials it kept, the
    threshold and chance it measured against, the edge warnings, and the divergence bound
    on fine's lr (``ceiling``: the lowest lr that diverged, fine's top lr and the rule; None
    when no coarse trial diverged in the good region, stored as such)."""

    ranges: dict[str, list[Any]] = field(default_factory=dict)
    rule: str = ""
    top: list[int] = field(default_factory=list)
    threshold: float | None = None
    chance: float | None = None
    warnings: list[str] = field(default_factory=list)
    ceiling: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        # ``ceiling`` is stored even when None: the summary JSON reads it as "no bound".
        return {**super().to_attrs(), "ceiling": self.ceiling}


def trial_attrs(t: FrozenTrial) -> TrialAttrs:
    """The trial's attrs as stored; the artifact-kept fields are None (see trial_data)."""
    return TrialAttrs.from_attrs(t.user_attrs)


def real(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count: not the surplus ones a worker closed at once."""
    return [t for t in trials if trial_attrs(t).reason != Reason.SURPLUS]


def diverged(t: FrozenTrial) -> bool:
    """A search trial stopped on divergence. Stored COMPLETE with the chance accuracy (see
    search._search_trial); a run of an older babysit stored it PRUNED with no value."""
    return trial_attrs(t).reason == Reason.DIVERGED


def scored(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The COMPLETE trials with a value that training earned: not the diverged ones, whose
    value is the chance accuracy they were given."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and not diverged(t)
    ]


class Outcome:
    """How a trial of a stage ended, as every count of trials says it (:func:`outcome`)."""

    COMPLETE = "complete"
    DIVERGED = "diverged"
    PRUNED = "pruned"
    FAILED = "failed"
    RUNNING = "running"
    WAITING = "waiting"


# The outcomes of a finished trial, in the order every count lists them.
FINISHED_OUTCOMES = (Outcome.COMPLETE, Outcome.DIVERGED, Outcome.PRUNED)


def outcome(t: FrozenTrial) -> str | None:
    """How the trial ended, the one reading every count uses (status, the stage verdicts,
    the report, the summary JSON, `babysit export`'s ``outcome`` column). A diverged
    trial is "diverged" whether it was stored COMPLETE at chance (this babysit) or PRUNED
    (older runs): never complete, never pruned. None for a surplus trial, which no stage
    counts."""
    if trial_attrs(t).reason == Reason.SURPLUS:
        return None
    if t.state in FINISHED and diverged(t):
        return Outcome.DIVERGED
    return {
        TrialState.COMPLETE: Outcome.COMPLETE,
        TrialState.PRUNED: Outcome.PRUNED,
        TrialState.FAIL: Outcome.FAILED,
        TrialState.RUNNING: Outcome.RUNNING,
        TrialState.WAITING: Outcome.WAITING,
    }[t.state]


def counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials that count, by :func:`outcome`: complete, diverged, pruned, failed, running;
    ``finished`` is complete + diverged + pruned (a stage's target counts these)."""
    n = {o: 0 for o in (*FINISHED_OUTCOMES, Outcome.FAILED, Outcome.RUNNING)}
    for t in trials:
        o = outcome(t)
        if o in n:
            n[o] += 1
    return {"finished": sum(n[o] for o in FINISHED_OUTCOMES), **n}


def counts_text(n: Mapping[str, int]) -> str:
    """A count of trials in words, the same wherever it is shown: "5 complete, 3 diverged,
    4 pruned, 0 failed"."""
    return ", ".join(f"{n.get(o, 0)} {o}" for o in (*FINISHED_OUTCOMES, Outcome.FAILED))


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The complete trial of highest value; the earlier one on a tie; never a diverged one."""
    complete = scored(trials)
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def best_of(trials: list[FrozenTrial]) -> dict[str, Any] | None:
    """The best trial as the summary shows it: number, value, params."""
    t = best_trial(trials)
    return None if t is None else {"number": t.number, "value": t.value, "params": dict(t.params)}


def examples(trials: list[FrozenTrial]) -> int:
    """Training examples the trials processed (what "epochs spent" is made of)."""
    return sum(int(trial_attrs(t).examples or 0) for t in trials)


def timing(
    trials: list[FrozenTrial],
    now: datetime.datetime | None = None,
) -> tuple[float | None, float | None]:
    """(sum of trial durations, wall from the first start to the last end), in seconds.

    From Optuna's own trial times, so every run has them, old ones too. A RUNNING trial
    ends ``now`` (default: the present), so a stage in progress shows its time so far.
    """
    now = now or datetime.datetime.now()
    spans = [
        (t.datetime_start, t.datetime_complete or now)
        for t in trials
        if t.datetime_start is not None
        and (t.datetime_complete is not None or t.state == TrialState.RUNNING)
    ]
    if not spans:
        return None, None
    busy = sum((b - a).total_seconds() for a, b in spans)
    wall = (max(b for _, b in spans) - min(a for a, _ in spans)).total_seconds()
    return busy, wall
