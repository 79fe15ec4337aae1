"""The protocol, one function per stage: sanity, overfit, coarse, narrow, fine, final.

Every stage reads and writes its own Optuna study ``<run>/<stage>`` and nothing else holds
state, so any process that can reach the storage can resume a run or join it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.diagnostics import Monitor
from babysit.diagnostics import narrowing_warnings
from babysit.diagnostics import record_diagnostics
from babysit.diagnostics import upload_filters
from babysit.errors import ProtocolError
from babysit.errors import UsageError
from babysit.errors import raise_if_interrupted
from babysit.models import build_model
from babysit.models import fit_head_to_data
from babysit.spec import CoarseSpec
from babysit.spec import SearchSpec
from babysit.spec import Spec
from babysit.spec import check_run_name
from babysit.storage import STAGES
from babysit.storage import Storage
from babysit.storage import StorageLost
from babysit.storage import StorageRefused
from babysit.storage import study_name
from babysit.train import DeviceData
from babysit.train import EpochStats
from babysit.train import channels_last_pays
from babysit.train import evaluate
from babysit.train import expected_initial_loss
from babysit.train import fit
from babysit.train import loss_fn
from babysit.train import make_optimizer
from babysit.train import memorise

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ACTIVE = (TrialState.RUNNING, TrialState.WAITING)
_POLL_SECONDS = 1.0

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class _Surplus(Exception):
    """This trial was asked for after its stage had filled up; it is closed untrained."""


class _QuietSurplus(logging.Filter):
    """Optuna logs a trial closed by an exception as a failure, traceback and all; a surplus
    trial is closed on purpose, and its traceback on every worker would read like a crash."""

    def __init__(self) -> None:
        super().__init__()
        self._numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        words = record.getMessage().split()
        number = words[1] if len(words) > 1 and words[0] == "Trial" else ""
        if record.exc_info and isinstance(record.exc_info[1], _Surplus):
            self._numbers.add(number)
            return False
        if number in self._numbers and "failed with value" in record.getMessage():
            self._numbers.discard(number)
            return False
        return True


logging.getLogger("optuna.study._optimize").addFilter(_QuietSurplus())


@dataclass
class Context:
    spec: Spec
    storage: Storage
    data: DeviceData
    force: bool = False
    quiet: bool = False
    # False for `babysit worker`: it joins the searches and waits for the rest.
    owner: bool = True
    # Read the loss (a device sync) every this many steps; 1 on the CPU, where it is free.
    check_every: int = 1
    log: Callable[[str], None] = print
    initial_loss: float | None = None
    # Where the data came from, so `--jobs` workers load the same files.
    data_dir: Any = None
    # torch.compile each trial's network (pays on a GPU for long trials; compiling costs
    # tens of seconds per new model).
    compile: bool = False
    # What loading the data found (tensor or streaming path, skipped files), for storage.
    data_info: dict[str, Any] = field(default_factory=dict)
    # Processes training the final data parallel (`--final-procs`; babysit.distributed).
    final_procs: int = 1

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def batch_size(self) -> int:
        return effective_batch_size(self.spec.batch_size, self.data.train_size)


def effective_batch_size(asked: int, train_size: int) -> int:
    """``batch_size = 0`` means auto: 128 (the seeds' choice), halved until an epoch has at
    least 8 steps, so 140 training faces are not two steps an epoch."""
    if asked > 0:
        return asked
    size = 128
    while size > 8 and train_size // size < 8:
        size //= 2
    return size


@dataclass
class StageResult:
    stage: str
    status: str  # passed, failed, skipped
    verdict: str
    values: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- storage side


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_stage(ctx: Context, stage: str, sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None,
               direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(
        study_name=study_name(ctx.spec.name, stage),
        storage=ctx.storage.rdb,
        sampler=sampler,
        pruner=pruner,
        direction=direction,
        load_if_exists=True,
    )
    if "spec" not in study.user_attrs:
        study.set_user_attr("spec", ctx.spec.to_dict())
        study.set_user_attr("run", ctx.spec.name)
        study.set_user_attr("stage", stage)
    return study


def check_spec(storage: Storage, spec: Spec) -> None:
    """A run name reused with a different spec is an input error; nothing is written."""
    # Names composed by babysit itself (ablations' <ablation>/<variant>) are checked here.
    check_run_name(spec.name, composed=True)
    for stage in STAGES:
        try:
            study = optuna.load_study(study_name=study_name(spec.name, stage),
                                      storage=storage.rdb)
        except KeyError:
            continue
        stored = study.user_attrs.get("spec")
        if stored is None:
            continue
        mine = spec.identity()
        theirs = Spec.from_dict(stored).identity()
        if mine != theirs:
            diff = _diff_keys(theirs, mine)
            raise UsageError(
                f"run '{spec.name}' already exists in this storage with a different spec "
                f"(differs in: {', '.join(diff[:6])}); use another --name, or the same settings"
            )


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key not in ("lrs",):
            out.extend(_diff_keys(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append(f"{prefix}{'model' if key == 'arch' else key}")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process its parent has not reaped yet (a `--jobs` helper, a worker under a
    # supervisor) is a zombie: it answers signal 0 but will never write again.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def reclaim(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker is gone.

    Optuna's heartbeat covers every host once the grace period passes; a dead process on
    this very host is recognised at once by its pid, so a rerun after a kill goes on
    without waiting out the grace period. Each failed trial says why in its "reason".
    """
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker", "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and int(pid) != os.getpid():
            if not _pid_alive(int(pid)):
                _fail(study, t._trial_id, "worker died")
    # What optuna.storages.fail_stale_trials does, with the reason written down first.
    storage = study._storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)():
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            _fail(study, trial_id, "heartbeat stale")
        orphaned = getattr(getattr(storage, "_backend", storage), "orphaned_trial_ids", None)
        for trial_id in orphaned(study._study_id) if orphaned else ():
            _fail(study, trial_id, "no heartbeat")


def _fail(study: optuna.Study, trial_id: int, reason: str) -> None:
    try:
        study._storage.set_trial_user_attr(trial_id, "reason", reason)
        study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except RuntimeError:
        pass  # finished meanwhile, or another process failed it first


def _start_trial(trial: optuna.Trial, stage: str) -> None:
    trial.set_user_attr("stage", stage)
    trial.set_user_attr("worker", worker_id())


def _surplus(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("reason", "surplus")
    trial.set_user_attr("note", reason)
    raise _Surplus(reason)


def _run_one(study: optuna.Study, objective: Callable[[optuna.Trial], float]) -> None:
    try:
        study.optimize(objective, n_trials=1, catch=(_Surplus,))
    except Exception as err:
        # Optuna buries a lost database under its own post-processing errors; say it plainly.
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, (StorageLost, StorageRefused)):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        if isinstance(err, ValueError) and str(err).startswith("Cannot tell a FAIL trial"):
            # Its heartbeat went stale (a long database outage) and another worker failed it
            # and runs a replacement; this process carries on with the next trial.
            return
        raise
    finally:
        _release_memory()
    raise_if_interrupted()


def _release_memory() -> None:
    """Hand the freed model and optimiser memory of a finished trial back to the system.

    Each trial allocates and frees a few hundred MB (an AlexNet with its optimiser state);
    glibc keeps freed blocks for reuse, so without a trim the resident size ratchets up
    trial after trial.

    The collection first: a trial's network is held in a reference cycle (the diagnostics'
    forward hooks point at the Monitor, which points back at the layers), and a pruned
    trial's traceback holds its frames, so without it each finished trial's weights and
    optimiser state (~280 MB for the digits AlexNet with Adam) stayed resident until
    Python's next full collection, and the default run peaked at 2.57 GB in the coarse
    stage (docs/benchmarks.md, issue 16).
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass  # not glibc


def claim(study: optuna.Study, trial: optuna.Trial, target: int, stage: str) -> None:
    """The first thing a search trial does: go ahead only while fewer than ``target`` trials
    numbered before it are live (not FAIL); otherwise close itself untrained as surplus.

    Trial numbers come from the database, so every process agrees on who came first and
    a stage ends with exactly ``target`` finished trials however many processes fill it.
    """
    earlier = [t for t in study.get_trials(deepcopy=False)
               if t.number < trial.number and t.state != TrialState.FAIL]
    if len(earlier) >= target:
        _surplus(trial, f"{stage} already had {target} trials")
    _start_trial(trial, stage)


def fill(study: optuna.Study, target: int, objective: Callable[[optuna.Trial], float],
         progress: Callable[[int, int, FrozenTrial | None], None] | None = None) -> None:
    """Run trials of ``objective`` (which starts with :func:`claim`) in this process until
    ``study`` holds ``target`` finished trials, other processes filling it too."""
    while True:
        reclaim(study)
        trials = study.get_trials(deepcopy=False)
        live = [t for t in trials if t.user_attrs.get("reason") != "surplus"]
        finished = sum(t.state in FINISHED for t in live)
        active = sum(t.state in ACTIVE for t in live)
        if progress is not None:
            progress(finished, target, None)
        if finished >= target:
            return
        if finished + active >= target:
            time.sleep(_POLL_SECONDS)  # the last trials run elsewhere; wait for them
            continue
        _run_one(study, objective)


def _examples(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("examples", 0))


def _seed_for(spec: Spec, stage: str, number: int) -> int:
    return (spec.seed * 1_000_003 + STAGES.index(stage) * 10_007 + number) % (2**31)


def _fresh_model(ctx: Context, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    data = ctx.data
    model = build_model(
        ctx.spec.model, data.num_classes, data.in_channels,
        data.pre.resize or data.image_size,
    )
    model = model.to(ctx.device)
    # babysit's own network only: a user's model is diagnosed by sanity, never re-initialised.
    fit_head_to_data(model, ctx.spec.model.name, data, ctx.spec.loss)
    if channels_last_pays(ctx.device, ctx.spec.model.name):
        model = model.to(memory_format=torch.channels_last)
    if ctx.compile:
        model.compile()  # in place: state_dict keys stay those of the plain module
    return model


def _generator(ctx: Context, seed: int) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(seed)


# ---------------------------------------------------------------------------- fixed trials


def _holders(study: optuna.Study, wait: float = 10.0) -> list[str]:
    """Who runs the study's RUNNING trials. A trial is RUNNING a moment before its process
    writes its "worker" attr (Optuna starts it, then the objective's first line names the
    worker), so a reader in that moment waits a little rather than say "held by ?"."""
    deadline = time.monotonic() + wait
    while True:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        named = [t.user_attrs.get("worker") for t in running]
        if all(named) or time.monotonic() > deadline:
            return [n or "?" for n in named]
        time.sleep(_POLL_SECONDS / 4)


def _fixed_trial(ctx: Context, study: optuna.Study, key: str, params: dict[str, Any],
                 objective: Callable[[optuna.Trial], float]) -> FrozenTrial | None:
    """Run the single trial named ``key`` in ``study`` unless it is done or held elsewhere.

    The trial is created WAITING with its key, so two processes racing for it hold two
    numbered trials and the later number closes itself as surplus. Returns the finished
    trial, or None when a live worker elsewhere holds it and this process is not to wait.
    """

    def guarded(trial: optuna.Trial) -> float:
        if trial.user_attrs.get("key") != key:
            _surplus(trial, "a stray waiting trial")
        for t in study.get_trials(deepcopy=False):
            if (t.number < trial.number and t.user_attrs.get("key") == key
                    and t.state != TrialState.FAIL):
                _surplus(trial, f"trial {t.number} already holds {key}")
        _start_trial(trial, study.user_attrs.get("stage", ""))
        return objective(trial)

    while True:
        reclaim(study)
        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("key") == key]
        done = [t for t in mine if t.state in FINISHED]
        if done:
            return done[0]
        if any(t.state == TrialState.RUNNING for t in mine):
            if not ctx.owner and study.user_attrs.get("stage") == "final":
                return None
            time.sleep(_POLL_SECONDS)
            continue
        if not any(t.state == TrialState.WAITING for t in mine):
            study.enqueue_trial(params, user_attrs={"key": key}, skip_if_exists=False)
        _run_one(study, guarded)


# ---------------------------------------------------------------------------- sanity


def _l2(model: torch.nn.Module) -> torch.Tensor:
    return sum((p.float() ** 2).sum() for n, p in model.named_parameters() if p.dim() > 1)


def sanity(ctx: Context) -> StageResult:
    """Untrained model: read its outputs on a few batches of the training data (finite?
    how far the logits spread, how much of the batch one class takes), the loss against
    ln C, and whether adding the L2 penalty raises it."""
    spec = ctx.spec
    study = open_stage(ctx, "sanity", direction="minimize")
    expected = expected_initial_loss(spec.loss, ctx.data.num_classes)

    def objective(trial: optuna.Trial) -> float:
        model = _fresh_model(ctx, _seed_for(spec, "sanity", 0))
        readings = read_untrained(ctx, model)
        initial, with_reg = readings.pop("initial_loss"), readings.pop("loss_with_reg")
        status, verdict = _sanity_verdict(
            initial, expected, with_reg, spec.sanity.tolerance, spec.loss,
            ctx.data.num_classes, readings, readings.pop("l2"))
        for k, v in {
            "initial_loss": initial,
            "expected_loss": expected,
            "loss_with_reg": with_reg,
            "reg": spec.sanity.reg,
            "tolerance": spec.sanity.tolerance,
            "tolerance_unit": "nats",
            "max_logit_std": max_logit_std(spec.sanity.tolerance),
            **readings,
            "status": status,
            "verdict": verdict,
        }.items():
            trial.set_user_attr(k, v)
        return initial if math.isfinite(initial) else float("inf")

    trial = _fixed_trial(ctx, study, "sanity", {}, objective)
    attrs = trial.user_attrs
    ctx.initial_loss = attrs["initial_loss"] if math.isfinite(attrs["initial_loss"]) else expected
    return StageResult("sanity", attrs["status"], attrs["verdict"], {
        "initial_loss": attrs["initial_loss"],
        "expected_loss": attrs["expected_loss"],
        "loss_with_reg": attrs["loss_with_reg"],
        "logit_std": attrs.get("logit_std"),
        "top_class_share": attrs.get("top_class_share"),
    })


def read_untrained(ctx: Context, model: torch.nn.Module) -> dict[str, Any]:
    """The untrained ``model`` in eval mode on the first ``sanity.batches`` batches of the
    training data: its mean loss, the loss with the L2 penalty, and its outputs' readings."""
    spec, data = ctx.spec, ctx.data
    model.eval()
    n = min(data.train_size, ctx.batch_size * spec.sanity.batches)
    xs, ys = data.head(n)
    with torch.no_grad():
        losses, outputs = [], []
        for start in range(0, n, ctx.batch_size):
            xb = data.pre(xs[start:start + ctx.batch_size], train=False)
            yb = ys[start:start + ctx.batch_size]
            out = model(xb).float()
            outputs.append(out)
            losses.append(float(loss_fn(spec.loss, out, yb)))
        initial = sum(losses) / len(losses)
        l2 = float(_l2(model))
    return {"initial_loss": initial, "loss_with_reg": initial + 0.5 * spec.sanity.reg * l2,
            "l2": l2, **sanity_readings(torch.cat(outputs), outputs[0], spec.loss)}


def max_logit_std(tolerance: float) -> float:
    """The logit spread allowed: a spread s alone costs about s^2/2 nats over ln C (the
    log-sum-exp of C logits of std s is ln C + s^2/2), so sqrt(2 * tolerance) is the
    spread that uses up the loss tolerance; 0.71 for 0.25 nats, whatever C is."""
    return math.sqrt(2.0 * tolerance)


def sanity_readings(logits: torch.Tensor, first: torch.Tensor, loss: str) -> dict[str, Any]:
    """What the untrained network's outputs say, beside its loss."""
    from babysit.models import logit_spread

    finite = torch.isfinite(logits)
    good = logits[finite.all(dim=1)]
    top = torch.bincount(good.argmax(dim=1), minlength=logits.shape[1]) if len(good) else None
    return {
        "logit_std": logit_spread(good, loss) if len(good) else float("nan"),
        "top_class_share": float(top.max()) / len(good) if top is not None else float("nan"),
        "top_class": int(top.argmax()) if top is not None else None,
        "nonfinite_outputs": int((~finite).sum()),
        "nonfinite_first_batch": int((~torch.isfinite(first)).sum()),
        "outputs": int(logits.numel()),
    }


def _sanity_verdict(initial: float, expected: float, with_reg: float, tol: float, loss: str,
                    classes: int, r: dict[str, Any], l2: float) -> tuple[str, str]:
    """("passed" | "failed", the reading in words, naming the cause of a failure)."""
    what = "ln 2 (one-hot BCE)" if loss == "bce" else f"ln {classes}"
    std, share = r["logit_std"], r["top_class_share"]
    limit = max_logit_std(tol)
    spread = "root mean square" if loss == "bce" else "std across classes"
    if r["nonfinite_outputs"]:
        where = ("on the first batch" if r["nonfinite_first_batch"]
                 else "on a later batch of the first few")
        return "failed", (
            f"outputs are NaN/inf {where} ({r['nonfinite_outputs']} of {r['outputs']} "
            "output values) before any training: the untrained network overflows or divides by "
            "zero; check the weight init, the input normalisation and any log, sqrt or "
            "division in forward()")
    if not math.isfinite(initial):
        return "failed", (
            f"the outputs are finite but the loss is not ({initial}): check that the "
            "labels lie in 0..C-1 and that the outputs are logits, not probabilities")
    if std > limit:
        one = (f"; the untrained network puts {share:.0%} of the batch on class "
               f"{r['top_class']}" if share >= 0.9 and classes > 1 else "")
        return "failed", (
            f"logits too large ({spread} {std:.3g}, at most {limit:.2f} for a loss within "
            f"{tol:g} nats of chance): initial loss {initial:.2f}, expected {expected:.2f} = "
            f"{what}; scale the last layer's init down (e.g. normal std 0.01, or zero its "
            f"weights){one}")
    if abs(initial - expected) > tol:
        if initial > expected:
            hint = ("higher than chance although the logits spread little: check the label "
                    "encoding and that the outputs are raw logits (no softmax or sigmoid "
                    "inside the network)")
        else:
            hint = ("lower than chance before any training: check for labels leaking into "
                    "the input, or a loss that sees fewer classes than the data has")
        return "failed", (
            f"initial loss {initial:.2f}, expected {expected:.2f} = {what} (tolerance "
            f"{tol:g} nats, logits {spread} {std:.3g}): {hint}")
    if not (math.isfinite(with_reg) and with_reg > initial):
        cause = ("no parameter reaches it: the network has no weight matrix or kernel, or "
                 "all of them are zero" if l2 == 0.0 else
                 f"the weights' sum of squares ({l2:.3g}) is too small to register")
        return "failed", (
            f"the penalty does not raise the loss: {cause} (initial loss {initial:.3f}, "
            f"{with_reg:.3f} with an L2 penalty)")
    return "passed", (
        f"initial loss {initial:.3f} vs expected {expected:.3f} = {what} (within {tol:g} "
        f"nats); logits {spread} {std:.3g} (at most {limit:.2f}), {share:.0%} of the batch "
        f"on the most-predicted class; the L2 penalty raises the loss to {with_reg:.3f}")


# ---------------------------------------------------------------------------- overfit


def overfit(ctx: Context) -> StageResult:
    """Memorise a small subset with no regularisation (weight decay 0, dropout off) and no
    augmentation; try a few LRs before failing."""
    spec = ctx.spec
    study = open_stage(ctx, "overfit")
    data = ctx.data
    n = min(spec.overfit.samples, data.train_size)
    x, y = data.head(n)
    lrs = spec.overfit.lrs[spec.optimizer]
    tried: list[FrozenTrial] = []
    for i, lr in enumerate(lrs):

        def objective(trial: optuna.Trial, lr: float = lr, i: int = i) -> float:
            trial.suggest_float("lr", lr, lr, log=True)
            model = _fresh_model(ctx, _seed_for(spec, "overfit", i))
            # Dropout is regularisation too: switched off, like weight decay, for this check.
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            opt = make_optimizer(spec.optimizer, model.parameters(), lr, 0.0, spec.momentum)
            t0 = time.perf_counter()
            acc, curve, steps = memorise(model, opt, x, y, data.pre, steps=spec.overfit.steps,
                                         loss=spec.loss)
            trial.set_user_attr("curve", curve)
            trial.set_user_attr("steps", steps)
            trial.set_user_attr("samples", n)
            trial.set_user_attr("train_accuracy", acc)
            trial.set_user_attr("examples", steps * n)
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            return acc

        trial = _fixed_trial(ctx, study, f"lr={lr:g}", {"lr": lr}, objective)
        tried.append(trial)
        if trial.value is not None and trial.value >= 1.0:
            verdict = (f"{n} examples memorised (100 % train accuracy) in "
                       f"{trial.user_attrs['steps']} steps at lr {lr:g}")
            study.set_user_attr("verdict", verdict)
            return StageResult("overfit", "passed", verdict,
                               {"train_accuracy": 1.0, "lr": lr,
                                "steps": trial.user_attrs["steps"]})
    verdict = _overfit_verdict(tried, n)
    study.set_user_attr("verdict", verdict)
    best = max((t.value or 0.0) for t in tried)
    return StageResult("overfit", "failed", verdict, {"train_accuracy": best})


def _overfit_verdict(trials: list[FrozenTrial], n: int) -> str:
    parts = []
    for t in trials:
        curve = t.user_attrs.get("curve", [])
        lr = t.params.get("lr")
        acc = t.value or 0.0
        losses = [c["loss"] for c in curve]
        if any(not math.isfinite(v) for v in losses):
            parts.append(f"lr {lr:g}: loss NaN, LR far too high")
        elif losses and abs(losses[-1] - losses[0]) < 0.01 * abs(losses[0]):
            parts.append(f"lr {lr:g}: loss flat at {losses[-1]:.3f}, LR too low")
        else:
            parts.append(f"lr {lr:g}: reached {acc:.0%}")
    return (f"could not memorise {n} examples (reg 0, no dropout, no augmentation): " + "; ".join(parts)
            + ". Check that the labels match the images and that the network has the capacity;"
            " or try other LRs with --set overfit.lrs")


# ---------------------------------------------------------------------------- searches


# Successive halving in the coarse stage: every trial gets one epoch, the top third of
# those that reached a rung go on to the next (epoch 1, 3, 9, ...), the rest stop. A coarse
# search only has to find the region, and a trial that is in the bottom two thirds after
# one epoch rarely ends in the top five that narrowing keeps.
HALVING_FACTOR = 3
# Nothing is pruned before this many trials of the stage have finished, as with the median
# pruner. Asynchronous halving with one or two trials at a rung promotes only the best so far:
# in a 3-trial coarse search on three shapes it stopped the one trial at a good lr (2.9e-3,
# val 0.44 after epoch 1) because a slow low-lr trial had 0.49 there.
HALVING_STARTUP = 5


class _StartupHalving(optuna.pruners.BasePruner):
    """Successive halving once ``HALVING_STARTUP`` trials have finished; before that, none."""

    def __init__(self) -> None:
        self._halving = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=HALVING_FACTOR, min_early_stopping_rate=0)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        finished = study.get_trials(deepcopy=False, states=FINISHED)
        if len(finished) < HALVING_STARTUP:
            return False
        return self._halving.prune(study, trial)


def _pruner(search: SearchSpec) -> optuna.pruners.BasePruner:
    if search.pruner == "halving":
        return _StartupHalving()
    if search.pruner == "median":
        # Five trials before anything is pruned: the median of fewer is noise.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def _sampler(search: SearchSpec, seed: int) -> optuna.samplers.BaseSampler:
    if search.sampler == "tpe":
        # Random start for a third of the budget, then TPE inside the narrowed box.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, search.trials // 3))
    return optuna.samplers.RandomSampler(seed=seed)


def stage_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    real = [t for t in trials if t.user_attrs.get("reason") != "surplus"]
    return {
        "trials": sum(t.state in FINISHED for t in real),
        "complete": sum(t.state == TrialState.COMPLETE for t in real),
        "pruned": sum(t.state == TrialState.PRUNED for t in real),
        "diverged": sum(t.user_attrs.get("reason") == "diverged" for t in real),
        "failed": sum(t.state == TrialState.FAIL for t in real),
    }


def search(ctx: Context, stage: str, search_spec: SearchSpec, ranges: dict[str, list[float]],
           progress: Callable[[int, int, FrozenTrial | None], None] | None = None) -> StageResult:
    """Log-uniform search over lr and weight_decay until ``trials`` trials have finished.

    Several processes may run this on one study at once: each asks Optuna for a trial,
    and a trial whose number comes after the target count of live trials closes itself
    untrained, so the stage ends with exactly its target of finished trials.
    """
    spec = ctx.spec
    target = search_spec.trials
    probe = open_stage(ctx, stage)
    study = open_stage(ctx, stage, sampler=_sampler(search_spec, _seed_for(
        spec, stage, len(probe.get_trials(deepcopy=False)))), pruner=_pruner(search_spec))
    if "ranges" not in study.user_attrs:
        study.set_user_attr("ranges", ranges)
        study.set_user_attr("pruner", search_spec.pruner)
        study.set_user_attr("sampler", search_spec.sampler)
        if search_spec.pruner == "halving":
            study.set_user_attr("pruner_rule", (
                f"successive halving after {HALVING_STARTUP} finished trials: rungs at "
                f"epochs 1, {HALVING_FACTOR}, "
                f"{HALVING_FACTOR**2}, ...; a trial goes on past a rung only when its val "
                f"accuracy is in the top 1/{HALVING_FACTOR} of the trials that reached it; "
                "never pruned after its last epoch"))
    initial = ctx.initial_loss or expected_initial_loss(spec.loss, ctx.data.num_classes)
    diverge_above = search_spec.diverge_factor * initial

    def objective(trial: optuna.Trial) -> float:
        claim(study, trial, target, stage)
        lr = trial.suggest_float("lr", *ranges["lr"], log=True)
        wd = trial.suggest_float("weight_decay", *ranges["weight_decay"], log=True)
        seed = _seed_for(spec, stage, trial.number)
        model = _fresh_model(ctx, seed)
        opt = make_optimizer(spec.optimizer, model.parameters(), lr, wd, spec.momentum)
        curves: dict[str, list[float]] = {k: [] for k in
                                          ("train_loss", "train_acc", "val_loss", "val_acc")}
        t0 = time.perf_counter()
        examples_per_epoch = ctx.data.train_size
        monitor = Monitor(model)  # diagnostics

        def on_epoch(stats: EpochStats) -> None:
            for k in curves:
                curves[k].append(getattr(stats, k))
            trial.set_user_attr("curves", curves)
            record_diagnostics(trial, monitor, curves, epoch=stats.epoch)  # diagnostics
            trial.set_user_attr("epochs_run", stats.epoch)
            trial.set_user_attr("examples", stats.epoch * examples_per_epoch)
            trial.report(stats.val_acc, stats.epoch)
            # A trial that has run all its epochs is complete whatever the pruner says:
            # pruning it would save nothing and hide its result from narrowing.
            if stats.epoch < search_spec.epochs and trial.should_prune():
                trial.set_user_attr("reason", "pruned")
                trial.set_user_attr("verdict", (
                    f"pruned after epoch {stats.epoch}: val accuracy {stats.val_acc:.3f} "
                    + (f"not in the top 1/{HALVING_FACTOR} of the trials that reached that "
                       "epoch (successive halving)" if search_spec.pruner == "halving" else
                       "below the median of earlier trials at that epoch")))
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                raise optuna.TrialPruned()

        history = fit(model, opt, ctx.data, epochs=search_spec.epochs,
                      batch_size=ctx.batch_size, loss=spec.loss,
                      generator=_generator(ctx, seed), diverge_above=diverge_above,
                      stop_on_divergence=search_spec.diverge_factor > 0,
                      check_every=ctx.check_every, on_epoch=on_epoch, monitor=monitor)
        record_diagnostics(trial, monitor, curves)  # diagnostics: a diverged trial's last epoch
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        trial.set_user_attr("examples", history.examples)
        trial.set_user_attr("steps", history.steps)
        if history.stopped == "diverged":
            trial.set_user_attr("reason", "diverged")
            trial.set_user_attr("diverged_at_step", history.stopped_at_step)
            trial.set_user_attr("verdict", (
                f"diverged at step {history.stopped_at_step}: loss {history.last_loss:.3g} "
                f"(NaN/inf or above {search_spec.diverge_factor:g}x the initial "
                f"{initial:.2f}); LR too high"))
            raise optuna.TrialPruned("diverged")
        first, last = history.first_loss, history.last_loss
        if first and last is not None and abs(first - last) < search_spec.flat_tolerance * first:
            trial.set_user_attr("reason", "lr too low")
            trial.set_user_attr("verdict", (
                f"lr too low: the train loss moved {abs(first - last) / first:.1%} "
                f"({first:.3f} -> {last:.3f}) in {history.steps} steps"))
        else:
            trial.set_user_attr("verdict", (
                f"val accuracy {history.epochs[-1].val_acc:.3f} after {len(history.epochs)} "
                f"epochs (train {history.epochs[-1].train_acc:.3f})"))
        return history.epochs[-1].val_acc

    fill(study, target, objective, progress)
    trials = study.get_trials(deepcopy=False)
    counts = stage_counts(trials)
    best = best_of(trials)
    values: dict[str, Any] = {**counts, "best": best, "range": ranges}
    values["examples"] = sum(_examples(t) for t in trials)
    if best is None:
        verdict = (f"{stage}: none of {counts['trials']} trials completed "
                   f"({counts['diverged']} diverged, {counts['pruned'] - counts['diverged']} "
                   "pruned): lower the upper end of the lr range")
        return StageResult(stage, "failed", verdict, values)
    verdict = (f"{stage}: {counts['trials']} trials ({counts['complete']} complete, "
               f"{counts['diverged']} diverged and stopped early, "
               f"{counts['pruned'] - counts['diverged']} pruned); best val accuracy "
               f"{best['value']:.3f} at lr {best['params']['lr']:.3g}, "
               f"weight_decay {best['params']['weight_decay']:.3g}")
    if stage == "fine":
        coarse_best = best_of(open_stage(ctx, "coarse").get_trials(deepcopy=False))
        if coarse_best is not None and coarse_best["value"] > best["value"]:
            values["worse_than_coarse"] = coarse_best
            verdict += (f"; worse than the coarse stage's best {coarse_best['value']:.3f} "
                        f"(trial {coarse_best['number']}), so the final takes that trial's "
                        "parameters")
    return StageResult(stage, "passed", verdict, values)


def best_of(trials: list[FrozenTrial]) -> dict[str, Any] | None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    t = max(complete, key=lambda t: (t.value, -t.number))
    return {"number": t.number, "value": t.value, "params": dict(t.params)}


# ---------------------------------------------------------------------------- narrowing


def narrow(trials: list[FrozenTrial], coarse: CoarseSpec, top_k: int, pad: float,
           edge: float, chance: float = 0.0) -> dict[str, Any]:
    """Fine ranges from the best coarse trials, by a rule stated in full.

    Keep the COMPLETE coarse trials that got at least half of the best trial's gain over
    chance (a trial at chance level says nothing about where the good region is), take
    the top k of them by validation accuracy; for each parameter take the log10 span of
    their values, pad it by ``pad`` decades on both sides and clip it to the coarse range.
    Warn when the best value lies within ``edge`` decades of a coarse bound: the optimum
    may lie outside the range searched.
    """
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        raise ProtocolError("no coarse trial completed, so there is nothing to narrow from: "
                            "every trial diverged or failed; lower the upper end of coarse.lr")
    best_value = max(t.value for t in complete)
    threshold = chance + 0.5 * (best_value - chance)
    good = [t for t in complete if t.value >= threshold]
    if best_value <= chance or not good:
        # Every trial is at chance level (or below): by the rule above none says where the
        # good region is, and with none above chance the half-way threshold keeps no trial.
        raise ProtocolError(
            f"narrowing failed: none of the {len(complete)} complete coarse trials beat "
            f"chance (best val accuracy {best_value:.3f}, chance {chance:.3f}: always "
            "guessing the most common class), so there is no good region to narrow to; "
            "the network learned nothing in the coarse budget. Give coarse more epochs "
            "(coarse.epochs) or trials (coarse.trials), or move coarse.lr, and rerun under a "
            "new --name (`babysit report` shows every coarse trial)")
    top = sorted(good, key=lambda t: (-t.value, t.number))[:top_k]
    best = top[0]
    ranges: dict[str, list[float]] = {}
    warnings_: list[str] = []
    for name in ("lr", "weight_decay"):
        lo_c, hi_c = (math.log10(v) for v in getattr(coarse, name))
        logs = [math.log10(t.params[name]) for t in top]
        lo = max(lo_c, min(logs) - pad)
        hi = min(hi_c, max(logs) + pad)
        ranges[name] = [10**lo, 10**hi]
        b = math.log10(best.params[name])
        if b - lo_c <= edge or hi_c - b <= edge:
            side = "lower" if b - lo_c <= edge else "upper"
            warnings_.append(
                f"best {name} {best.params[name]:.3g} sits at the {side} edge of the coarse "
                f"range [{10**lo_c:.3g}, {10**hi_c:.3g}]: widen coarse.{name} and rerun")
    rule = (f"top {len(top)} of the {len(good)} complete coarse trials with val accuracy >= "
            f"{threshold:.3f} (half-way from chance {chance:.3f} to the best {best_value:.3f}); "
            f"log10 span of each parameter padded by {pad:g} decades, clipped to the coarse "
            "range")
    return {"ranges": ranges, "rule": rule, "top": [t.number for t in top],
            "threshold": threshold, "chance": chance, "warnings": warnings_}


def narrow_stage(ctx: Context) -> dict[str, Any]:
    fine = open_stage(ctx, "fine")
    stored = fine.user_attrs.get("narrowed")
    if stored is not None:
        return stored
    coarse = open_stage(ctx, "coarse")
    spec = ctx.spec
    # Chance: always guessing the most common validation class.
    counts = torch.bincount(ctx.data.val_labels(), minlength=ctx.data.num_classes)
    chance = float(counts.max()) / max(1, int(counts.sum()))
    # Clip to the range the coarse search really used (the LR range test may have set it).
    bounds = dataclasses.replace(spec.coarse, **coarse.user_attrs.get("ranges", {}))
    try:
        result = narrow(coarse.get_trials(deepcopy=False), bounds, spec.narrow.top_k,
                        spec.narrow.pad, spec.narrow.edge, chance=chance)
    except ProtocolError as err:
        # The verdict stays with the run: `babysit status` and the report show it on fine.
        fine.set_user_attr("verdict", str(err))
        raise
    fine.set_user_attr("narrowed", result)
    return result


# ---------------------------------------------------------------------------- final


def best_params(ctx: Context) -> dict[str, float]:
    # The best trial of coarse and fine together, by validation accuracy (a fine trial
    # first on a tie: it trained longer). A fine stage that did worse than coarse does not
    # hand the final its worse parameters.
    found = [best_of(open_stage(ctx, stage).get_trials(deepcopy=False))
             for stage in ("fine", "coarse")]
    found = [b for b in found if b is not None]
    if found:
        return max(found, key=lambda b: b["value"])["params"]
    raise ProtocolError("final cannot start: neither the fine nor the coarse search has a "
                        "complete trial to take lr and weight_decay from (every trial "
                        "diverged, was pruned or failed); lower the upper end of coarse.lr or "
                        "give the searches more epochs, and rerun under a new --name")


_CKPT_ATTR = "checkpoint"


def _save_checkpoint(ctx: Context, study: optuna.Study, trial: optuna.Trial,
                     state: dict[str, Any], epoch: int) -> None:
    """Write the newest checkpoint to the artifact store and drop the one before it.

    One checkpoint is kept, not one per epoch: an AlexNet checkpoint with optimiser state
    is ~200 MB.
    """
    store = ctx.storage.artifacts
    artifact_id = f"{ctx.spec.name.replace('/', '_')}-final-epoch{epoch}-{trial.number}"
    # Through a temporary file, not a BytesIO: one copy of the state in memory, not two.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save(state, path)
        with open(path, "rb") as fh:
            store.write(artifact_id, fh)
    previous = study.user_attrs.get(_CKPT_ATTR)
    study.set_user_attr(_CKPT_ATTR, {"artifact_id": artifact_id, "epoch": epoch,
                                     "trial": trial.number})
    if previous and previous.get("artifact_id") != artifact_id:
        try:
            store.remove(previous["artifact_id"])
        except Exception:  # noqa: BLE001 - an already missing file is fine
            pass


def _load_checkpoint(ctx: Context, study: optuna.Study,
                     map_location: torch.device | str | None = None) -> dict[str, Any] | None:
    meta = study.user_attrs.get(_CKPT_ATTR)
    if not meta:
        return None
    try:
        with ctx.storage.artifacts.open_reader(meta["artifact_id"]) as fh:
            return torch.load(fh, map_location=map_location or ctx.device, weights_only=True)
    except Exception:  # noqa: BLE001 - a missing store is reported, then training restarts
        ctx.log(f"warning: checkpoint {meta['artifact_id']} not found in "
                f"{ctx.storage.artifact_where}; the final training starts over")
        return None


def checkpoint_due(epoch: int, last_epoch: bool, trained_since: float,
                   last_write: float | None, share: float) -> bool:
    """The checkpoint rule (spec ``final.checkpoint_share``): always after the first and
    the last epoch; otherwise once the training since the previous write took at least
    ``1 / share`` times as long as that write, so writes cost at most ``share`` of the
    final's time."""
    if last_epoch or last_write is None:
        return True
    return trained_since * share >= last_write


class _StopFinal(Exception):
    """Raised from the epoch callback to leave ``fit``: plateau or divergence."""


def _synced_stats(stats: EpochStats, world: int) -> EpochStats:
    """Data parallel: train loss and accuracy averaged over the ranks' shards; validation
    (each rank evaluates the whole split) and the flags below as rank 0 has them."""
    if world == 1:
        return stats
    from babysit.distributed import all_mean
    from babysit.distributed import from_rank0

    train_loss, train_acc = all_mean([stats.train_loss, stats.train_acc])
    val_loss, val_acc = from_rank0([stats.val_loss, stats.val_acc])
    return dataclasses.replace(stats, train_loss=train_loss, train_acc=train_acc,
                               val_loss=val_loss, val_acc=val_acc)


def _copy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The best epoch's weights, kept for the test split while later epochs train on (a copy
    on the device, the weights only: no optimiser state)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_final(ctx: Context, study: optuna.Study | None, trial: optuna.Trial | None,
                lr: float, wd: float, ckpt: dict[str, Any] | None,
                progress: Callable[[int, int], None] | None = None,
                rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The final training of one process, or of one rank of ``world`` (DistributedDataParallel
    over an initialised process group; babysit.distributed launches it).

    Only rank 0 has ``study`` and ``trial`` and writes anything: curves, checkpoints, the
    model. Every rank starts from ``ckpt`` when resuming. Returns rank 0's results.
    """
    spec = ctx.spec
    main = rank == 0
    seed = _seed_for(spec, "final", 0)
    model = _fresh_model(ctx, seed)
    net: torch.nn.Module = model
    gen = _generator(ctx, seed)  # the permutation: the same on every rank
    augment = None
    if world > 1:
        from babysit.distributed import wrap

        net = wrap(model)
        # Dropout and augmentation of their own per rank; one shared stream would give
        # example i of every rank's batch the same flip and the same mask.
        torch.manual_seed(seed + 1 + rank)
        augment = _generator(ctx, seed + 1 + rank)
    opt = make_optimizer(spec.optimizer, net.parameters(), lr, wd, spec.momentum)
    curves: dict[str, list[float]] = {k: [] for k in
                                      ("train_loss", "train_acc", "val_loss", "val_acc")}
    start = 0
    best: dict[str, Any] = {"epoch": 0, "val_acc": -math.inf, "val_loss": math.inf}
    best_state: dict[str, torch.Tensor] | None = None  # None: the current weights are best
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"].to(gen.device) if gen.device.type == "cpu"
                      else ckpt["generator"].cpu())
        ranks = ckpt.get("ranks") or []
        if world == 1:
            torch.set_rng_state(ckpt["torch_rng"].cpu())
        elif len(ranks) == world:
            torch.set_rng_state(ranks[rank]["torch_rng"].cpu())
            augment.set_state(ranks[rank]["augment"].cpu())
        start = int(ckpt["epoch"])
        curves = {k: list(map(float, v)) for k, v in ckpt["curves"].items()}
        best = dict(ckpt.get("best") or {"epoch": start, "val_acc": curves["val_acc"][-1],
                                          "val_loss": curves["val_loss"][-1]})
        best_state = ckpt.get("best_model")
        if best_state is None and start < spec.final.epochs:
            best_state = _copy_weights(model)
        if main:
            trial.set_user_attr("resumed_from_epoch", start)
    if main:
        trial.set_user_attr("final_procs", world)
        monitor = Monitor(model)  # diagnostics
        edge = narrowing_warnings(ctx.storage, spec.name)  # diagnostics
    batch = ctx.batch_size
    per_rank = max(1, batch // world)
    t0 = time.perf_counter()
    clock = {"since": time.perf_counter(), "write": None, "writes": 0}
    outcome = {"stopped": "", "epochs": start}

    def on_epoch(stats: EpochStats) -> None:
        nonlocal best_state
        stats = _synced_stats(stats, world)
        for k in curves:
            curves[k].append(getattr(stats, k))
        outcome["epochs"] = stats.epoch
        diverged = not (math.isfinite(stats.train_loss) and math.isfinite(stats.val_loss))
        if not diverged and (stats.val_acc > best["val_acc"] or (
                stats.val_acc == best["val_acc"] and stats.val_loss < best["val_loss"])):
            best.update(epoch=stats.epoch, val_acc=stats.val_acc, val_loss=stats.val_loss)
            best_state = None
        plateau = (spec.final.patience > 0
                   and stats.epoch - best["epoch"] >= spec.final.patience)
        last = diverged or plateau or stats.epoch >= spec.final.epochs
        due = 0.0
        if main:
            trial.set_user_attr("curves", curves)
            record_diagnostics(trial, monitor, curves, epoch=stats.epoch, warnings=edge)
            trial.set_user_attr("epochs_run", stats.epoch)
            trial.set_user_attr("best_epoch", best["epoch"])
            trial.set_user_attr("examples", (stats.epoch - start) * ctx.data.train_size)
            trial.report(stats.val_acc, stats.epoch)
            # No checkpoint of diverged weights: a rerun would resume into NaN.
            due = float(not diverged and checkpoint_due(
                stats.epoch, last, time.perf_counter() - clock["since"], clock["write"],
                spec.final.checkpoint_share))
        if world > 1:
            from babysit.distributed import from_rank0

            due = from_rank0([due])[0]
        if due:
            rng = {"torch_rng": torch.get_rng_state(),
                   "augment": augment.get_state() if augment is not None else None}
            if world > 1:
                from babysit.distributed import gather_to_rank0

                ranks = gather_to_rank0(rng)
            else:
                ranks = None
            if main:
                w0 = time.perf_counter()
                _save_checkpoint(ctx, study, trial, {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "ranks": ranks,
                    "epoch": stats.epoch,
                    "curves": curves,
                    "best": dict(best),
                    "best_model": best_state,
                }, stats.epoch)
                clock["write"] = time.perf_counter() - w0
                clock["since"] = time.perf_counter()
                clock["writes"] += 1
        if best_state is None and not last:
            best_state = _copy_weights(model)
        if progress is not None:
            progress(stats.epoch, spec.final.epochs)
        if diverged or plateau:
            outcome["stopped"] = "diverged" if diverged else "plateau"
            raise _StopFinal

    budget = spec.final.epochs
    if spec.final.patience > 0 and start - best["epoch"] >= spec.final.patience:
        budget = start  # killed after the plateau stop's checkpoint: nothing left to train
    kwargs: dict[str, Any] = {}
    if world > 1:
        kwargs = {"shard": (rank, world), "augment_generator": augment}
    history = None
    try:
        history = fit(net, opt, ctx.data, epochs=budget, batch_size=per_rank,
                      loss=spec.loss, generator=gen, start_epoch=start, diverge_above=None,
                      # Ranks must leave together: a step-level NaN stop on one rank would
                      # leave the others waiting in the next gradient all-reduce, so data
                      # parallel training checks divergence at the end of each epoch.
                      stop_on_divergence=world == 1, check_every=ctx.check_every,
                      on_epoch=on_epoch,
                      monitor=(lambda s, _m, o, v: monitor(s, model, o, v)) if main else None,
                      **kwargs)
    except _StopFinal:
        pass
    if history is not None and history.stopped == "diverged":
        outcome["stopped"] = "diverged"
    if not main:
        return {}
    record_diagnostics(trial, monitor, curves, warnings=edge)  # diagnostics
    trial.set_user_attr("seconds", time.perf_counter() - t0)
    trial.set_user_attr("examples", (outcome["epochs"] - start) * ctx.data.train_size)
    trial.set_user_attr("checkpoints_written", clock["writes"])
    if outcome["stopped"] == "diverged":
        trial.set_user_attr("verdict", "the final training diverged (loss NaN/inf)")
        return {"diverged": True}
    epochs_run = outcome["epochs"]
    if best_state is not None:
        model.load_state_dict(best_state)
    test_loss, test_acc = evaluate(model, ctx.data, "test", spec.loss)
    val_acc = float(best["val_acc"])
    saved = spec.final.epochs - epochs_run
    trial.set_user_attr("test_accuracy", test_acc)
    trial.set_user_attr("test_loss", test_loss)
    trial.set_user_attr("val_accuracy", val_acc)
    trial.set_user_attr("best_epoch", best["epoch"])
    trial.set_user_attr("epochs_saved", saved)
    trial.set_user_attr("stopped", outcome["stopped"] or "budget")
    if world > 1:
        trial.set_user_attr("batch", {"global": per_rank * world, "per_rank": per_rank,
                                      "ranks": world})
    stop = (f"stopped after epoch {epochs_run} of {spec.final.epochs}: no better validation "
            f"for {spec.final.patience} epochs; " if saved > 0 else f"{epochs_run} epochs; ")
    trial.set_user_attr("verdict", (
        f"{stop}best epoch {best['epoch']} at lr {lr:.3g}, weight_decay {wd:.3g}: val "
        f"accuracy {val_acc:.3f}, test accuracy {test_acc:.3f} (loss {test_loss:.3f})"
        + (f"; {world} processes" if world > 1 else "")))
    _save_model(ctx, trial, model)
    upload_filters(ctx.storage, trial, model)  # diagnostics: first-layer filters PNG
    return {"diverged": False, "val_acc": val_acc}


def final(ctx: Context, progress: Callable[[int, int], None] | None = None,
          params: dict[str, float] | None = None) -> StageResult:
    """Train with the best parameters for the long budget, then evaluate on the test split.

    ``params`` ({"lr", "weight_decay"}) skips the searches' choice: `babysit ablate`'s
    mode "final" trains each variant with fixed parameters, as seed 000 did.
    ``ctx.final_procs`` > 1 trains on that many processes (babysit.distributed)."""
    study = open_stage(ctx, "final")
    params = params if params is not None else best_params(ctx)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", params["lr"], params["lr"], log=True)
        wd = trial.suggest_float("weight_decay", params["weight_decay"],
                                 params["weight_decay"], log=True)
        if ctx.final_procs > 1:
            from babysit.distributed import launch_final

            result = launch_final(ctx, study, trial, lr, wd)
        else:
            ckpt = _load_checkpoint(ctx, study)
            if ckpt is not None:
                ctx.log(f"final: resuming from the checkpoint of epoch {int(ckpt['epoch'])}")
            result = train_final(ctx, study, trial, lr, wd, ckpt, progress)
        if result["diverged"]:
            raise ProtocolError("the final training diverged: loss NaN/inf with the chosen "
                                f"lr {lr:.3g}; rerun the fine search or lower fine's range")
        return result["val_acc"]

    trial = _fixed_trial(ctx, study, "final", {}, objective)
    if trial is None:
        holder = _holders(study)
        return StageResult("final", "skipped",
                           f"final training is held by {', '.join(holder) or 'another worker'}",
                           {"held_by": holder})
    if trial.state != TrialState.COMPLETE:
        return StageResult("final", "failed", trial.user_attrs.get("verdict", "final failed"),
                           {})
    a = trial.user_attrs
    return StageResult("final", "passed", a["verdict"], {
        "params": params,
        "epochs": a.get("epochs_run"),
        "best_epoch": a.get("best_epoch"),
        "epochs_saved": a.get("epochs_saved"),
        "val_accuracy": a.get("val_accuracy"),
        "test_accuracy": a.get("test_accuracy"),
        "test_loss": a.get("test_loss"),
    })


def _save_model(ctx: Context, trial: optuna.Trial, model: torch.nn.Module) -> None:
    """The trained weights as an Optuna artifact of the final trial (load with weights_only)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save(model.state_dict(), path)
        artifact_id = optuna.artifacts.upload_artifact(
            artifact_store=ctx.storage.artifacts, file_path=path, study_or_trial=trial)
    trial.set_user_attr("model_artifact", artifact_id)
