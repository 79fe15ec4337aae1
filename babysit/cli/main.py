"""The command line: verbs that parse flags and call the library; no logic of their own."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import TYPE_CHECKING
from typing import Any

from babysit.cli import records
from babysit.cli.parser import build_parser
from babysit.cli.records import open_from
from babysit.cli.rejected import nothing_left_if_rejected
from babysit.errors import INTERRUPTED
from babysit.errors import BabysitError
from babysit.errors import UsageError
from babysit.schema import Stage
from babysit.terminal import epoch_tested
from babysit.terminal import install_warning_format
from babysit.terminal import shown_params

if TYPE_CHECKING:
    from babysit.spec import Spec


def _spec_of(args: argparse.Namespace) -> tuple[dict[str, Any], Spec]:
    """The spec `run` and `check` resolve from TOML, --set and flags, and those flags."""
    from babysit.spec import build_spec

    flags: dict[str, Any] = {
        "name": args.name,
        "dataset": args.dataset,
        "model": args.model,
        "optimizer": args.optimizer,
        "seed": args.seed,
        "budget": getattr(args, "budget", None),
    }
    return flags, build_spec(args.config, args.sets, flags)


def _prepare(args: argparse.Namespace, spec: Spec, **extra: Any) -> Any:
    """The run's Context from the flags `run` and `check` share (``extra``: run's own)."""
    from babysit.protocol.prepare import prepare

    return prepare(
        spec,
        open_from(args),
        device=args.device,
        data_dir=args.data_dir,
        download=True if args.download else None,
        offline=args.offline,
        force=args.force,
        quiet=args.quiet,
        **extra,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    # The spec is checked before torch and optuna are imported: a bad input costs no wait.
    flags, spec = _spec_of(args)
    if args.print_config:
        return _print_config(args, flags, spec)
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    from babysit.protocol.run import run_protocol

    with nothing_left_if_rejected(args.storage):
        ctx = _prepare(args, spec, compile=args.compile, final_procs=args.final_procs)
    storage = ctx.storage
    summary = None
    code = 0
    try:
        summary = run_protocol(ctx, jobs=args.jobs)
    except BabysitError as err:
        code = err.exit_code
        print(f"babysit: {err}", file=sys.stderr)
    finally:
        if args.summary_json is not None:
            from babysit.record import stored

            if summary is None:
                summary = stored.summary(storage, spec.name)
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    if code == 0 and summary is not None:
        _closing_lines(summary, storage)
    return code


def _print_config(args: argparse.Namespace, flags: dict[str, Any], spec: Any) -> int:
    from babysit.cli.print_config import spec_lines

    print("\n".join(spec_lines(spec, args.config, args.sets, flags)))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Sanity and overfit only, stored as the run's first two stages."""
    from babysit.protocol.run import run_check
    from babysit.record import stored

    flags, spec = _spec_of(args)
    if args.print_config:
        return _print_config(args, flags, spec)
    # A budget (from a TOML file) is the searches' and the final's: check measures nothing.
    spec.budget = ""
    with nothing_left_if_rejected(args.storage):
        ctx = _prepare(args, spec)
    storage = ctx.storage
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
                summary = stored.summary(storage, spec.name)
            except BabysitError:
                pass  # the error above has been said; there is nothing more to write
        if args.summary_json is not None and summary is not None:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    if (
        code == 0
        and summary is not None
        and any(summary["stages"][s]["status"] != "passed" for s in (Stage.SANITY, Stage.OVERFIT))
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
    final = summary["stages"][Stage.FINAL]
    out = sys.stderr
    if final["status"] == "passed":
        params = shown_params(final["params"], "=")
        print(f"chosen: {params}", file=out)
        # The test accuracy is the run's result; validation (which chose the epoch) beside it.
        val = final.get("val_accuracy")
        beside = f" (val {val:.4f})" if val is not None else ""
        print(
            f"test accuracy {final['test_accuracy']:.4f} {epoch_tested(final)}{beside}, "
            f"test loss {final['test_loss']:.4f}; "
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
    from babysit.protocol.prepare import prepare
    from babysit.protocol.run import run_protocol
    from babysit.record.stored import stored_spec

    storage = open_from(args, create=False)
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


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from babysit.cli.dashboard import serve

    return serve(open_from(args, create=False), host=args.host, port=args.port, quiet=args.quiet)


def _cmd_predict(args: argparse.Namespace) -> int:
    # babysit.cli.predict imports torch only once the flags, the run and the paths are checked.
    from babysit.cli.predict import predict

    return predict(
        open_from(args, create=False),
        args.name,
        args.paths,
        top=args.top,
        out=args.out,
        device=args.device,
        batch_size=args.batch_size,
    )


def _cmd_submit(args: argparse.Namespace) -> int:
    """The run and its workers as Slurm jobs (babysit/cli/submit.py)."""
    from babysit.cli import submit

    # The spec is checked here, before anything is submitted: a bad one is exit 2 at once.
    flags, spec = _spec_of(args)
    if args.print_config:
        return _print_config(args, flags, spec)
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    from babysit.spec.rules import default_run_name

    plan = submit.plan(args, spec.name or default_run_name(spec.dataset))
    if args.dry_run:
        print(submit.dry_run(plan))
        return 0
    # The storage opens (and a journal file is made) before any job exists: a bad URL is
    # one line and exit 2, and nothing is submitted.
    submit.check_executor(plan)
    made = not plan.folder.exists()
    plan.folder.mkdir(parents=True, exist_ok=True)
    try:
        with nothing_left_if_rejected(plan.storage):
            open_from(args, url=plan.storage)
    except UsageError:
        if made and not any(plan.folder.iterdir()):
            plan.folder.rmdir()
        raise
    return submit.submit(plan, wait=args.wait)


def _cmd_storage_proxy(args: argparse.Namespace) -> int:
    from babysit.storage import open_storage
    from babysit.storage import resolve_url
    from babysit.storage.remote import serve_proxy

    if resolve_url(args.storage).startswith("grpc://"):
        raise UsageError(
            "--storage of a storage proxy is the database itself (sqlite:///, journal:// "
            "or postgresql+psycopg://), not another proxy"
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
    from babysit.ablate.run import run_ablation

    with nothing_left_if_rejected(args.storage):
        return run_ablation(
            args.config,
            open_from(args),
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
    "status": records.cmd_status,
    "runs": records.cmd_runs,
    "delete": records.cmd_delete,
    "datasets": records.cmd_datasets,
    "dashboard": _cmd_dashboard,
    "report": records.cmd_report,
    "export": records.cmd_export,
    "predict": _cmd_predict,
    "copy": records.cmd_copy,
    "ablate": _cmd_ablate,
    "storage-proxy": _cmd_storage_proxy,
    "submit": _cmd_submit,
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
    from babysit.parallel.coordination import quiet_optuna

    quiet_optuna()  # Optuna's logging and warnings, set once for every command
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # bare `babysit`: the verbs, as `pip` with no arguments
            parser.print_help()
            return 0
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, where it is caught, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`babysit run --print-config | head -1`): it has what it
        # wanted. Nothing more is written, and Python's flush at exit must not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
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
