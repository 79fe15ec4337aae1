"""The five stages in order, and the run's summary derived from storage alone."""

from __future__ import annotations

import time
from typing import Any

from babysit.errors import ProtocolError
from babysit.memory import frozen_heap
from babysit.protocol.budget import before_search
from babysit.protocol.budget import final_epochs
from babysit.protocol.helpers import _reap
from babysit.protocol.helpers import _spawn_workers
from babysit.protocol.helpers import _stop
from babysit.protocol.helpers import await_ready
from babysit.protocol.helpers import say_ready
from babysit.protocol.prepare import record_data_facts
from babysit.record.stored import summary as summarize
from babysit.report.publish import publish_stage
from babysit.schema import Stage
from babysit.stages.context import Context
from babysit.stages.context import StageResult
from babysit.stages.final.launch import launch_final
from babysit.stages.final.stage import final
from babysit.stages.learned import _coarse_ranges
from babysit.stages.narrow import narrow_stage
from babysit.stages.overfit import overfit
from babysit.stages.sanity import sanity
from babysit.stages.search import search
from babysit.terminal import Progress
from babysit.terminal import shown_range


def _said(result: StageResult) -> str:
    """The verdict after "<stage> <status>: ", without the stage's name said twice (a
    search's stored verdict starts with it, for readers that show it alone)."""
    prefix = f"{result.stage}: "
    return result.verdict[len(prefix) :] if result.verdict.startswith(prefix) else result.verdict


def _gate(ctx: Context, result: StageResult) -> None:
    ctx.log(f"{result.stage} {result.status}: {_said(result)}")
    if ctx.owner:
        publish_stage(
            ctx.storage, ctx.spec.name, result.stage, result.status, result.verdict, ctx.log
        )
    if result.status == "failed":
        if ctx.force:
            ctx.log(f"{result.stage} failed, continuing because of --force")
        else:
            raise ProtocolError(f"{result.stage} failed: {_said(result)}")


def run_protocol(ctx: Context, jobs: int = 1) -> dict[str, Any]:
    """Sanity, overfit, coarse, narrow, fine, final; each skipped when already done."""
    spec = ctx.spec
    t0 = time.perf_counter()
    ctx.log(
        f"run {spec.name}: dataset {spec.dataset} ({ctx.data.num_classes} classes, "
        f"{ctx.data.train_size} train images), model {spec.model.name}, optimizer "
        f"{spec.optimizer}, batch {ctx.batch_size}, device {ctx.device.type}, "
        f"storage {ctx.storage.shown}"
    )
    record_data_facts(ctx)
    # Everything imported and loaded so far lives as long as the run: out of the
    # collections that free each trial's network.
    with frozen_heap():
        # `--jobs` helpers load while this process checks sanity and overfit (and may take
        # an overfit LR), then all start the searches together (babysit/protocol/helpers.py).
        helpers = _spawn_workers(ctx, jobs)
        try:
            checked = sanity(ctx)
            _gate(ctx, checked)
            _gate(ctx, overfit(ctx))
            await_ready(ctx, helpers)
            say_ready()  # in a helper: the owner waits for this
            summary = _searches_and_final(ctx, checked.initial_loss, t0, jobs)
        except BaseException:
            _stop(helpers)
            raise
        _reap(helpers)
    return summary


def run_check(ctx: Context) -> dict[str, Any]:
    """`babysit check`: sanity and overfit only, stored as the run's first two stages, so
    `babysit run` with the same name and spec skips them and goes on with the searches."""
    spec = ctx.spec
    t0 = time.perf_counter()
    ctx.log(
        f"check {spec.name}: dataset {spec.dataset} ({ctx.data.num_classes} classes, "
        f"{ctx.data.train_size} train images), model {spec.model.name}, optimizer "
        f"{spec.optimizer}, device {ctx.device.type}, storage {ctx.storage.shown}"
    )
    record_data_facts(ctx)
    _gate(ctx, sanity(ctx))
    _gate(ctx, overfit(ctx))
    summary = summarize(ctx.storage, spec.name)
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


def _searches_and_final(
    ctx: Context, initial_loss: float, t0: float, jobs: int = 1
) -> dict[str, Any]:
    """Coarse (and its extra round at an edge), narrow, fine, final. ``initial_loss``: the
    sanity stage's, which the searches' divergence check is measured against. Under a
    --budget each is planned first in the time left (babysit/protocol/budget.py)."""
    spec = ctx.spec
    ends = ctx.budget.end() if ctx.budget is not None else None
    # The bar starts at the search's first report: after the LR range test or the anchoring
    # has said its piece, and at the trials a previous run stored.
    ranges = _coarse_ranges(ctx, initial_loss)
    before_search(ctx, Stage.COARSE, jobs)
    bar = Progress(Stage.COARSE, "trial", ctx.quiet, ends=ends)
    coarse = search(
        ctx, Stage.COARSE, spec.coarse, ranges, initial_loss=initial_loss, progress=bar.to
    )
    bar.close()
    # A first round in which every trial diverged is not the end: the extra round looks
    # below where it diverged (babysit/stages/learned.py), and only then is the stage judged.
    if coarse.status != "failed":
        _gate(ctx, coarse)
    from babysit.stages.learned import extend_coarse

    bar = Progress(Stage.COARSE, "trial", ctx.quiet, ends=ends)
    extended = extend_coarse(ctx, initial_loss, progress=bar.to)
    bar.close()
    if extended is not None:
        _gate(ctx, extended)
    elif coarse.status == "failed":
        _gate(ctx, coarse)

    before_search(ctx, Stage.FINE, jobs)  # before narrowing: workers start fine after it
    narrowed = narrow_stage(ctx)
    shown = ", ".join(f"{k} {shown_range(v)}" for k, v in narrowed.ranges.items())
    ctx.log(f"narrowed: {shown} ({narrowed.rule})")
    for warning in narrowed.warnings:
        ctx.log(f"warning: {warning}")

    bar = Progress(Stage.FINE, "trial", ctx.quiet, ends=ends)
    fine = search(
        ctx, Stage.FINE, spec.fine, narrowed.ranges, initial_loss=initial_loss, progress=bar.to
    )
    bar.close()
    _gate(ctx, fine)

    bar = Progress(Stage.FINAL, "epoch", ctx.quiet, ends=ends)
    result = final(final_epochs(ctx), progress=bar.to, launch=launch_final)
    bar.close()
    if result.status == "skipped":
        ctx.log(f"final: {result.verdict}; this process stops here")
    else:
        _gate(ctx, result)
    summary = summarize(ctx.storage, spec.name)
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary
