"""The verbs that read, move or delete what runs stored (`status`, `runs`, `delete`,
`report`, `export`, `copy`) and `datasets`, and the one way every verb opens storage from
its flags. None of them trains: no torch is imported on their way (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from babysit.cli.rejected import nothing_left_if_rejected
from babysit.errors import UsageError
from babysit.terminal import plural


def open_from(args: argparse.Namespace, create: bool = True, url: str | None = None) -> Any:
    """The storage a verb's flags name (``url`` in place of ``--storage``, for `submit`)."""
    from babysit.storage import open_storage

    # Read-only verbs have no heartbeat flags, `runs` no artifact flags (babysit/cli/parser.py).
    return open_storage(
        args.storage if url is None else url,
        getattr(args, "artifact_dir", None),
        heartbeat=getattr(args, "heartbeat", None),
        grace=getattr(args, "grace", None),
        create=create,
        artifact_store=getattr(args, "artifact_store", None),
    )


def cmd_status(args: argparse.Namespace) -> int:
    # babysit.report.status reads storage without torch: it answers in well under a second.
    from babysit.report.status import status_lines
    from babysit.report.status import statuses

    storage = open_from(args, create=False)
    summaries = statuses(storage, args.name)
    if args.json:
        print(json.dumps(summaries[0] if args.name else summaries, indent=2))
        return 0
    if not summaries:
        print(f"no runs in {storage.shown}; start one with `babysit run`")
        return 0
    for s in summaries:
        print("\n".join(status_lines(s)))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from babysit.report.status import run_rows
    from babysit.report.status import runs_lines

    storage = open_from(args, create=False)
    rows = run_rows(storage)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs in {storage.shown}; start one with `babysit run`")
    else:
        print("\n".join(runs_lines(rows)))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from babysit.record.remove import delete_run
    from babysit.record.remove import doomed

    storage = open_from(args, create=False)
    what = doomed(storage, args.name)
    said = (
        f"run {args.name} in {storage.shown}: {plural(len(what.studies), 'study', 'studies')}, "
        f"{plural(what.trials, 'trial')}, {plural(len(what.artifacts), 'artifact')} in "
        f"{storage.artifact_where}"
    )
    if what.running:
        said += (
            f", {plural(what.running, 'trial')} still RUNNING (stop the run and its "
            "workers first, or they fail on a missing study)"
        )
    if not args.yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise UsageError(
                f"not deleting {said} without --yes (no terminal to ask on); "
                "add --yes to delete it"
            )
        print(f"delete {said}? [y/N] ", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            print("babysit: nothing deleted", file=sys.stderr)
            return 1
    removed = delete_run(storage, what)
    print(
        f"deleted run {args.name}: {plural(len(what.studies), 'study', 'studies')}, "
        f"{plural(what.trials, 'trial')}, {plural(removed, 'artifact')} from {storage.shown}",
        file=sys.stderr,
    )
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from babysit.data import default_data_dir
    from babysit.data import describe_dataset
    from babysit.data import registered

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    # The sizes are those a run with the default spec stores: each dataset is loaded as a
    # run loads it (see describe_dataset).
    rows = [describe_dataset(name, data_dir) for name in sorted(registered())]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        if r["sizes"] is None:
            print(f"{r['name']:<12} {r['missing']}")
        else:
            split = "/".join(str(r["sizes"][k]) for k in ("train", "val", "test"))
            print(f"{r['name']:<12} present  {r['image']:<9} train/val/test {split}")
        print(f"{'':<12} {r['summary']}; looks in {r.get('where')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from babysit.report.document import write_report

    out = args.out or Path(f"report-{args.name.replace('/', '-')}")
    html, md = write_report(open_from(args, create=False), args.name, out)
    print(f"report: {html} (and {md.name})", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # babysit.report.export, not babysit.report: no torch, no matplotlib, pandas only here.
    from babysit.report.export import export_trials

    out = args.out or Path(f"{args.name.replace('/', '-')}-trials.{args.format}")
    curves = args.curves
    if curves is True:
        curves = out.with_name(f"{out.stem.removesuffix('-trials')}-curves{out.suffix}")
    path, rows = export_trials(
        open_from(args, create=False), args.name, args.format, out, curves=curves
    )
    print(f"exported {plural(rows, 'trial')} to {path}", file=sys.stderr)
    if curves is not None:
        print(f"exported the curves to {curves}", file=sys.stderr)
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from babysit.record.transfer import copy_run
    from babysit.storage import open_storage

    src = open_storage(args.src, args.from_artifact_dir, create=False)
    with nothing_left_if_rejected(args.dst):  # a missing run leaves no empty target behind
        dst = open_storage(args.dst, args.to_artifact_dir)
        copied = copy_run(src, dst, args.name)
    print(
        f"copied run {args.name}: {plural(copied['studies'], 'study', 'studies')}, "
        f"{plural(copied['trials'], 'trial')}, {plural(copied['artifacts'], 'artifact')} "
        f"from {src.shown} to {dst.shown}",
        file=sys.stderr,
    )
    if copied["interrupted"]:
        print(
            f"warning: {plural(copied['interrupted'], 'trial')} "
            f"{'was' if copied['interrupted'] == 1 else 'were'} RUNNING at the source: FAIL "
            "in the copy, and the stages will be topped up",
            file=sys.stderr,
        )
    if copied["missing"]:
        print(
            f"warning: {plural(len(copied['missing']), 'artifact')} "
            f"{'was' if len(copied['missing']) == 1 else 'were'} not found in "
            f"{src.artifact_dir} (pass --from-artifact-dir); without the final checkpoint "
            "the final training starts over",
            file=sys.stderr,
        )
    return 0
