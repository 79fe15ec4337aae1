"""The command line's parser: every verb's flags, shared where verbs share them (the spec's
flags of `run` and `check`, the storage flags of every verb that opens one). The handlers
are in cli.py; the words (descriptions, examples) in verbs.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from babysit.cli.verbs import VerbListFormat
from babysit.cli.verbs import add_verb
from babysit.cli.verbs import version
from babysit.errors import UsageError
from babysit.spec import rules


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
    p.add_argument(
        "--optimizer",
        help=f"{rules.either(rules.OPTIMIZERS)} (sgd and nesterov with momentum 0.9)",
    )
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
