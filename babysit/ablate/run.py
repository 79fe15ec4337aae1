"""`babysit ablate`: one run per variant of a base spec, then the ablation lab's table from storage.
The config is read in ablate_config.py, the table built in ablate_table.py.

A config is a run's usual TOML (the base spec) plus an ``[ablation]`` table and a list of
``[[variants]]``::

    [ablation]
    name = "alexnet-ablation"   # runs are <name>/<variant>; default: the config file's stem
    mode = "final"              # "final": only the final training, at `params` (the ablation lab);
                                # "full": the whole five-stage protocol per variant
    params = {lr = 1e-4, weight_decay = 5e-4}   # mode "final" only; a variant may override
    repeats = 1                 # seeded repeats per variant, for the spread

    [[variants]]
    name = "4-conv"                          # letters, digits, - _ . +
    set = {"model.conv_layers" = 4}          # overrides, keyed as --set spells them
    description = "4 conv layers"            # optional: the table's "change" (default: set)
    reported = 0.73                          # optional: the accuracy a report gave, shown beside

Each variant's spec is: defaults, the base TOML, the command line's ``--set``, then the
variant's ``set`` (the variant's own change wins: it is what the ablation is about).

Repeat 0 of a variant is the run ``<ablation>/<variant>`` at the base seed; repeat k >= 1 is
``<ablation>/<variant>/r<k>`` at seed + k. So raising ``repeats`` from 1 to 3 keeps the
finished run as repeat 0 and adds two. Every run lives in the storage like any other
(``babysit status --name alexnet-ablation/4-conv``), and a rerun skips finished ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

from babysit.ablate.config import Ablation
from babysit.ablate.config import Variant
from babysit.ablate.config import load_ablation
from babysit.ablate.table import table_markdown
from babysit.ablate.table import table_rows
from babysit.ablate.table import write_table
from babysit.errors import ProtocolError
from babysit.record import stored
from babysit.schema import Stage
from babysit.spec import Spec
from babysit.storage import Storage
from babysit.terminal import Progress
from babysit.terminal import plural


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _finished(storage: Storage, run: str) -> bool:
    return bool(stored.load_stage(storage, run, Stage.FINAL).complete)


def _train(
    ablation: Ablation,
    variant: Variant,
    spec: Spec,
    storage: Storage,
    device: str,
    data_dir: str | None,
    quiet: bool,
) -> None:
    """One run: the final training at fixed params, or the whole protocol."""
    from babysit.protocol.prepare import prepare
    from babysit.protocol.prepare import record_data_facts
    from babysit.protocol.run import run_protocol
    from babysit.report.publish import publish_stage
    from babysit.stages.final.launch import launch_final
    from babysit.stages.final.stage import final

    ctx = prepare(spec, storage, device=device, data_dir=data_dir, quiet=quiet)
    if ablation.mode == "full":
        run_protocol(ctx)
        return
    record_data_facts(ctx)
    bar = Progress(spec.name, "epoch", quiet)
    try:
        result = final(ctx, progress=bar.to, params=variant.params, launch=launch_final)
    finally:
        bar.close()
    if ctx.owner:
        publish_stage(
            ctx.storage, ctx.spec.name, result.stage, result.status, result.verdict, ctx.log
        )
    if result.status == "failed":
        raise ProtocolError(result.verdict)
    if result.status == "skipped":
        _log(f"{spec.name}: {result.verdict}")


def run_ablation(
    config: Path,
    storage: Storage,
    sets: list[str] | tuple[str, ...] = (),
    device: str = "auto",
    data_dir: str | None = None,
    out: Path | None = None,
    quiet: bool = False,
) -> int:
    """Train every variant not yet finished, then print and write the table. Exit code:
    0 when every run finished, 1 when one failed (its row says why)."""
    from babysit.stages.study import check_spec

    ablation = load_ablation(Path(config), sets)
    for _, _, spec in ablation.runs:
        check_spec(storage, spec)
    n = len(ablation.runs)
    _log(
        f"ablation {ablation.name}: {plural(len(ablation.variants), 'variant')} x "
        f"{plural(ablation.repeats, 'repeat')}, mode {ablation.mode}, storage {storage.shown}"
    )
    failed: list[str] = []
    for i, (variant, _, spec) in enumerate(ablation.runs, 1):
        label = f"[{i}/{n}] {spec.name}"
        if _finished(storage, spec.name):
            _log(f"{label}: finished earlier, skipped")
            continue
        _log(f"{label}: {variant.change}")
        try:
            _train(ablation, variant, spec, storage, device, data_dir, quiet)
        except ProtocolError as err:
            _log(f"{label} failed: {err}")
            failed.append(spec.name)
    rows = table_rows(storage, ablation)
    markdown = table_markdown(rows, ablation)
    print(markdown, flush=True)
    folder = Path(out) if out is not None else Path(f"ablation-{ablation.name.replace('/', '-')}")
    paths = write_table(rows, markdown, folder)
    _log(f"table: {', '.join(str(p) for p in paths)}")
    incomplete = [r["variant"] for r in rows if r["runs_done"] < r["runs"]]
    return 1 if failed or incomplete else 0
