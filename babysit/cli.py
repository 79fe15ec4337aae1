"""The command line: verbs that parse flags and call the library; no logic of their own."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from babysit import spec_rules as rules
from babysit.errors import INTERRUPTED
from babysit.errors import BabysitError
from babysit.errors import UsageError
from babysit.rejected import nothing_left_if_rejected
from babysit.terminal import install_warning_format
from babysit.terminal import plural
from babysit.verbs import VerbListFormat
from babysit.verbs import add_verb
from babysit.verbs import version


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2, like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default: $BABYSIT_STORAGE, else sqlite:///babysit.db)",
    )
    p.add_argument(
        "--artifact-dir",
        help="artifact store folder (default: next to an SQLite file, else ./babysit-artifacts)",
    )
    p.add_argument(
        "--artifact-store",
        help="s3://BUCKET/PREFIX: artifacts on S3-compatible "
        "object storage (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY; default: $BABYSIT_ARTIFACT_STORE)",
    )
    p.add_argument("--heartbeat", type=int, help="seconds between a worker's heartbeats")
    p.add_argument(
        "--grace", type=int, help="seconds without a heartbeat before a trial is presumed dead"
    )


def _spec_flags(p: argparse.ArgumentParser, force_help: str) -> None:
    """The flags that make a run's spec and find its data: shared by `run` and `check`."""
    p.add_argument("--config", type=Path, help="a TOML spec, e.g. studies/digits.toml")
    p.add_argument("--name", help="run name; studies are <name>/<stage> (default: the dataset)")
    p.add_argument("--dataset", help=f"{', '.join(rules.DATASETS)}, or module:callable")
    p.add_argument(
        "--data-dir",
        help="where dataset files live (default: $BABYSIT_DATA, else ~/.cache/babysit)",
    )
    p.add_argument(
        "--download", action="store_true", help="download the dataset if missing (needs internet)"
    )
    p.add_argument("--model", help=f"{rules.either(rules.MODELS)} or module:callable")
    p.add_argument("--optimizer", help=f"{rules.either(rules.OPTIMIZERS)} (sgd with momentum 0.9)")
    p.add_argument("--device", default="auto", choices=rules.DEVICES)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set coarse.trials=20 (repeatable)",
    )
    p.add_argument("--summary-json", type=Path, help="write the run's summary here")
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved spec, each "
        "value with where it came from and why, and exit (touches no storage)",
    )


def _run_flags(p: argparse.ArgumentParser) -> None:
    _spec_flags(p, "go on after a failed sanity or overfit check")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trial processes sharing the device "
        "(this one plus N-1 workers), for models too small to fill it alone",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each network (pays on a GPU for long trials)",
    )
    _final_procs_flag(p)
    _storage_flags(p)


def _final_procs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--final-procs",
        type=int,
        default=1,
        metavar="N",
        help="train the final "
        "on N processes (DistributedDataParallel, launched like torchrun; one GPU "
        "each, or gloo on the CPU); the global batch stays the spec's",
    )


def _check_flags(p: argparse.ArgumentParser) -> None:
    """`run`'s flags that make sense before the searches: the same spec, the same storage."""
    _spec_flags(
        p,
        "run the overfit check even after a failed sanity check (the exit code "
        "still says it failed)",
    )
    _storage_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="babysit",
        description="Babysit the training of an image "
        "classifier: sanity, overfit, coarse, fine, final.",
        epilog="`babysit VERB --help` shows a verb's flags and examples.",
        formatter_class=VerbListFormat,
    )
    parser.add_argument("--version", action="version", version=f"babysit {version()}")
    sub = parser.add_subparsers(
        dest="command", title="verbs", metavar="VERB", parser_class=_Parser
    )

    p = add_verb(sub, "run")
    _run_flags(p)

    p = add_verb(sub, "check")
    _check_flags(p)

    p = add_verb(sub, "worker")
    p.add_argument("--name", required=True)
    p.add_argument("--device", default="auto", choices=rules.DEVICES)
    p.add_argument("--data-dir")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--compile", action="store_true")
    _final_procs_flag(p)
    _storage_flags(p)

    p = add_verb(sub, "status")
    p.add_argument("--name")
    p.add_argument("--json", action="store_true", help="machine output on stdout")
    _storage_flags(p)

    p = add_verb(sub, "datasets")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true")

    p = add_verb(sub, "dashboard")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1: the dashboard has no login and can delete studies)",
    )
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--quiet", action="store_true")
    _storage_flags(p)

    p = add_verb(sub, "report")
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, help="folder to write into (default: report-<name>)")
    _storage_flags(p)

    p = add_verb(sub, "export")
    p.add_argument("--name", required=True)
    p.add_argument("--format", choices=rules.EXPORT_FORMATS, default="csv")
    p.add_argument("--out", type=Path, help="file to write (default: <name>-trials.<format>)")
    p.add_argument(
        "--curves",
        type=Path,
        nargs="?",
        const=True,
        metavar="FILE",
        help="also write every curve point (run, stage, trial, epoch, step, "
        "metric, value) to FILE (default: <name>-curves.<format> beside --out)",
    )
    _storage_flags(p)

    p = add_verb(sub, "copy")
    p.add_argument("--name", required=True)
    p.add_argument("--from", dest="src", required=True, metavar="URL")
    p.add_argument("--to", dest="dst", required=True, metavar="URL")
    p.add_argument("--from-artifact-dir", help="artifact store of the source storage")
    p.add_argument("--to-artifact-dir", help="artifact store of the target storage")

    p = add_verb(sub, "storage-proxy")
    p.add_argument(
        "--storage",
        help="the database it serves (default: $BABYSIT_STORAGE, else sqlite:///babysit.db)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1; the "
        "proxy has no login: anyone who reaches it can change or delete studies)",
    )
    p.add_argument("--port", type=int, default=13000, help="default 13000, Optuna's")
    p.add_argument(
        "--threads", type=int, default=10, help="requests served at once (Optuna's default 10)"
    )

    p = add_verb(sub, "ablate")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="auto", choices=rules.DEVICES)
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path, help="folder for the table (default: ablation-<name>)")
    p.add_argument("--quiet", action="store_true")
    _storage_flags(p)
    return parser


def _open(args: argparse.Namespace, create: bool = True):  # noqa: ANN202
    from babysit.storage import open_storage

    return open_storage(
        args.storage,
        args.artifact_dir,
        heartbeat=args.heartbeat,
        grace=args.grace,
        create=create,
        artifact_store=args.artifact_store,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from babysit.spec import build_spec

    flags: dict[str, Any] = {
        "name": args.name,
        "dataset": args.dataset,
        "model": args.model,
        "optimizer": args.optimizer,
        "seed": args.seed,
    }
    # The spec is checked before torch and optuna are imported: a bad input costs no wait.
    spec = build_spec(args.config, args.sets, flags)
    if args.print_config:
        return _print_config(args, flags, spec)
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    from babysit.protocol import prepare
    from babysit.protocol import run_protocol

    with nothing_left_if_rejected(args.storage):
        storage = _open(args)
        ctx = prepare(
            spec,
            storage,
            device=args.device,
            data_dir=args.data_dir,
            download=args.download,
            force=args.force,
            quiet=args.quiet,
            compile=args.compile,
            final_procs=args.final_procs,
        )
    summary = None
    code = 0
    try:
        summary = run_protocol(ctx, jobs=args.jobs)
    except BabysitError as err:
        code = err.exit_code
        print(f"babysit: {err}", file=sys.stderr)
    finally:
        if args.summary_json is not None:
            from babysit.protocol import summarize

            if summary is None:
                summary = summarize(storage, spec.name)
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    if code == 0 and summary is not None:
        _closing_lines(summary, storage)
    return code


def _print_config(args: argparse.Namespace, flags: dict[str, Any], spec: Any) -> int:
    from babysit.spec_view import spec_lines

    print("\n".join(spec_lines(spec, args.config, args.sets, flags)))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Sanity and overfit only, stored as the run's first two stages."""
    from babysit.protocol import prepare
    from babysit.protocol import run_check
    from babysit.protocol import summarize
    from babysit.spec import build_spec

    flags: dict[str, Any] = {
        "name": args.name,
        "dataset": args.dataset,
        "model": args.model,
        "optimizer": args.optimizer,
        "seed": args.seed,
    }
    spec = build_spec(args.config, args.sets, flags)
    if args.print_config:
        return _print_config(args, flags, spec)
    with nothing_left_if_rejected(args.storage):
        storage = _open(args)
        ctx = prepare(
            spec,
            storage,
            device=args.device,
            data_dir=args.data_dir,
            download=args.download,
            force=args.force,
            quiet=args.quiet,
        )
    summary = None
    code = 0
    try:
        summary = run_check(ctx)
    except BabysitError as err:
        code = err.exit_code
        print(f"babysit: {err}", file=sys.stderr)
    finally:
        if summary is None:
            try:
                summary = summarize(storage, spec.name)
            except BabysitError:
                pass  # the error above has been said; there is nothing more to write
        if args.summary_json is not None and summary is not None:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    if (
        code == 0
        and summary is not None
        and any(summary["stages"][s]["status"] != "passed" for s in ("sanity", "overfit"))
    ):
        code = 1  # --force ran on past a failure; the check still failed
    if code == 0:
        print(
            f"check passed: sanity and overfit; `babysit run --name {spec.name}` with the "
            "same flags goes on from the coarse search",
            file=sys.stderr,
        )
    return code


def _closing_lines(summary: dict[str, Any], storage: Any) -> None:
    final = summary["stages"]["final"]
    out = sys.stderr
    if final["status"] == "passed":
        params = ", ".join(f"{k}={v:.3g}" for k, v in final["params"].items())
        print(f"chosen: {params}", file=out)
        # The test accuracy is the run's result; validation (which chose the epoch) beside it.
        val = final.get("val_accuracy")
        beside = f" (val {val:.4f})" if val is not None else ""
        print(
            f"test accuracy {final['test_accuracy']:.4f}{beside}, test loss "
            f"{final['test_loss']:.4f} after {plural(final['epochs'], 'epoch', 'epochs')}; "
            f"{summary['epochs_spent']:.1f} epochs spent in all stages",
            file=out,
        )
        if final.get("model_path"):
            print(
                f"model: {final['model_path']} (babysit.load_model(PATH) rebuilds the network)",
                file=out,
            )
    url = storage.shown
    flag = "" if url == "sqlite:///babysit.db" else f" --storage '{url}'"
    print(
        f"storage: {url}; studies {summary['name']}/<stage>; dashboard: babysit dashboard{flag}",
        file=out,
    )


def _cmd_worker(args: argparse.Namespace) -> int:
    from babysit.protocol import prepare
    from babysit.protocol import run_protocol
    from babysit.protocol import stored_spec

    storage = _open(args, create=False)
    spec = stored_spec(storage, args.name)
    ctx = prepare(
        spec,
        storage,
        device=args.device,
        data_dir=args.data_dir,
        quiet=args.quiet,
        owner=False,
        compile=args.compile,
        final_procs=args.final_procs,
    )
    try:
        run_protocol(ctx)
    except BabysitError as err:
        print(f"babysit: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    # babysit.status reads storage without torch: it answers in well under a second.
    from babysit.status import status_lines
    from babysit.status import statuses

    storage = _open(args, create=False)
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


def _cmd_datasets(args: argparse.Namespace) -> int:
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


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from babysit.dashboard import serve

    return serve(_open(args, create=False), host=args.host, port=args.port, quiet=args.quiet)


def _cmd_report(args: argparse.Namespace) -> int:
    from babysit.report import write_report

    out = args.out or Path(f"report-{args.name.replace('/', '-')}")
    html, md = write_report(_open(args, create=False), args.name, out)
    print(f"report: {html} (and {md.name})", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    # babysit.export, not babysit.report: no torch, no matplotlib, pandas only here.
    from babysit.export import export_trials

    out = args.out or Path(f"{args.name.replace('/', '-')}-trials.{args.format}")
    curves = args.curves
    if curves is True:
        curves = out.with_name(f"{out.stem.removesuffix('-trials')}-curves{out.suffix}")
    path, rows = export_trials(
        _open(args, create=False), args.name, args.format, out, curves=curves
    )
    print(f"exported {plural(rows, 'trial')} to {path}", file=sys.stderr)
    if curves is not None:
        print(f"exported the curves to {curves}", file=sys.stderr)
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    from babysit.storage import open_storage
    from babysit.transfer import copy_run

    src = open_storage(args.src, args.from_artifact_dir, create=False)
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


def _cmd_storage_proxy(args: argparse.Namespace) -> int:
    from babysit.remote import serve_proxy
    from babysit.storage import open_storage
    from babysit.storage import resolve_url

    if resolve_url(args.storage).startswith("grpc://"):
        raise UsageError(
            "--storage of a storage proxy is the database itself (sqlite:/// or "
            "postgresql+psycopg://), not another proxy"
        )
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"babysit: warning: the storage proxy listens on {args.host}, reachable from "
            "other machines, without login or encryption; keep it on a private network",
            file=sys.stderr,
            flush=True,
        )
    # The proxy comes first in a new deployment, so it creates an SQLite file if need be.
    storage = open_storage(args.storage)
    return serve_proxy(storage.rdb, args.host, args.port, storage.shown, threads=args.threads)


def _cmd_ablate(args: argparse.Namespace) -> int:
    from babysit.ablate import run_ablation

    return run_ablation(
        args.config,
        _open(args),
        sets=args.sets,
        device=args.device,
        data_dir=args.data_dir,
        out=args.out,
        quiet=args.quiet,
    )


COMMANDS = {
    "run": _cmd_run,
    "check": _cmd_check,
    "worker": _cmd_worker,
    "status": _cmd_status,
    "datasets": _cmd_datasets,
    "dashboard": _cmd_dashboard,
    "report": _cmd_report,
    "export": _cmd_export,
    "copy": _cmd_copy,
    "ablate": _cmd_ablate,
    "storage-proxy": _cmd_storage_proxy,
}


def _interrupt(signum: int, frame: object) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt


def _storage_refusal(err: BaseException) -> BabysitError | None:
    if "babysit.storage" not in sys.modules:
        return None  # no storage was opened
    from babysit.storage import storage_refusal

    return storage_refusal(err)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (docker stop, a scheduler) stops like Ctrl-C: the running trial is marked.
    # SIGINT is set explicitly: a shell without job control starts background commands
    # with it ignored, and an interrupt must still stop a run cleanly.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    install_warning_format()
    from babysit.coordination import quiet_optuna

    quiet_optuna()  # Optuna's logging and warnings, set once for every command
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # bare `babysit`: the verbs, as `pip` with no arguments
            parser.print_help()
            return 0
        return COMMANDS[args.command](args)
    except BabysitError as err:
        print(f"babysit: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        # A refusal raised outside the retrying storage (Optuna's own calls, report code
        # reading the database) is still one line; anything else keeps its traceback.
        refusal = _storage_refusal(err)
        if refusal is None:
            raise
        print(f"babysit: {refusal}", file=sys.stderr)
        return refusal.exit_code
    except KeyboardInterrupt:
        print(
            "babysit: interrupted; the running trial is marked FAIL and the study is intact. "
            "Rerun the same command to carry on.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
