"""The command line's parser: every verb's flags, shared where verbs share them (the spec's
flags of `run` and `check`, the storage flags of every verb that opens one). The handlers
are in main.py; the words (descriptions, examples) in verbs.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from babysit.cli.verbs import VerbListFormat
from babysit.cli.verbs import add_verb
from babysit.cli.verbs import version
from babysit.errors import UsageError
from babysit.spec import Spec
from babysit.spec import rules


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2, like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


_DEVICE_HELP = "where trials train: auto (cuda when there is one, else cpu), cpu or cuda"
_DATA_DIR_HELP = "where dataset files live (default: $BABYSIT_DATA, else ~/.cache/babysit)"
_QUIET_HELP = "no progress bars"


def _url_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        help="Optuna storage URL: sqlite:///FILE, journal://PATH, postgresql+psycopg://..., "
        "grpc://HOST:PORT (default: $BABYSIT_STORAGE, else sqlite:///babysit.db)",
    )


def _storage_flags(p: argparse.ArgumentParser, trials: bool = False) -> None:
    """--storage and the artifact store; with ``trials`` (verbs that run trials) the
    heartbeat flags too, which read-only verbs would not use."""
    _url_flag(p)
    p.add_argument(
        "--artifact-dir",
        help="artifact store folder (default: next to an SQLite or journal file, else "
        "./babysit-artifacts)",
    )
    p.add_argument(
        "--artifact-store",
        help="s3://BUCKET/PREFIX: artifacts on S3-compatible "
        "object storage (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY; default: $BABYSIT_ARTIFACT_STORE)",
    )
    if trials:
        p.add_argument("--heartbeat", type=int, help="seconds between a worker's heartbeats")
        p.add_argument(
            "--grace", type=int, help="seconds without a heartbeat before a trial is presumed dead"
        )


def _spec_flags(p: argparse.ArgumentParser, force_help: str) -> None:
    """The flags that make a run's spec and find its data: shared by `run` and `check`."""
    p.add_argument("--config", type=Path, help="a TOML spec, e.g. studies/digits.toml")
    p.add_argument("--name", help="run name; studies are <name>/<stage> (default: the dataset)")
    p.add_argument(
        "--dataset",
        help=f"{', '.join(rules.DATASETS)}, or module:callable (default: {Spec().dataset})",
    )
    p.add_argument("--data-dir", help=_DATA_DIR_HELP)
    fetch = p.add_mutually_exclusive_group()
    fetch.add_argument(
        "--download",
        action="store_true",
        help="download a missing dataset even where BABYSIT_OFFLINE is set",
    )
    fetch.add_argument(
        "--offline",
        action="store_true",
        help="never download: a missing dataset exits 2 with the manual steps "
        "(default: download it, saying its size; also BABYSIT_OFFLINE=1)",
    )
    p.add_argument(
        "--model",
        help=f"{rules.either(rules.MODELS)} or module:callable (default: {Spec().model.name})",
    )
    p.add_argument(
        "--optimizer",
        help=f"{rules.either(rules.OPTIMIZERS)} (sgd and nesterov with momentum 0.9; "
        f"default: {Spec().optimizer})",
    )
    p.add_argument("--device", default="auto", choices=rules.DEVICES, help=_DEVICE_HELP)
    p.add_argument(
        "--seed",
        type=int,
        help="the run's random seed: the data split, the trials' initial weights and the "
        f"searches' samplers derive from it (default: {Spec().seed})",
    )
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
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print what would run: the model, and the resolved spec's sections that apply, "
        "each value with where it came from and why; then exit (touches no storage)",
    )


def _run_flags(p: argparse.ArgumentParser) -> None:
    _spec_flags(p, "go on after a failed sanity or overfit check")
    p.add_argument(
        "--budget",
        metavar="DURATION",
        help="wall-clock time for the whole protocol (10m, 1h30m, 90s, 600): the stages' "
        "trials and epochs are planned to end within it (docs/protocol.md)",
    )
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
    _storage_flags(p, trials=True)


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
    _storage_flags(p, trials=True)


def _submit_flags(p: argparse.ArgumentParser) -> None:
    """`submit`'s own flags, beside `run`'s."""
    p.add_argument("--workers", type=int, default=2, help="worker jobs (a job array; default 2)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    p.add_argument(
        "--time", type=int, default=60, metavar="MINUTES", help="time limit per job (default 60)"
    )
    p.add_argument("--gpus", type=int, default=0, help="GPUs per job (default 0)")
    p.add_argument("--cpus", type=int, default=4, help="CPUs per job (default 4)")
    p.add_argument(
        "--folder",
        type=Path,
        default=Path("babysit-slurm"),
        help="the jobs' logs and files, and the default journal storage, on a disk every "
        "node shares (default ./babysit-slurm)",
    )
    p.add_argument(
        "--executor",
        choices=("slurm", "local"),
        default="slurm",
        help="slurm (default), or local: the same jobs as processes on this machine",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the jobs and sbatch scripts, submit nothing"
    )
    p.add_argument("--wait", action="store_true", help="wait for every job to end")


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
    p.add_argument(
        "--name", required=True, help="the run to join (its spec is read from the storage)"
    )
    p.add_argument("--device", default="auto", choices=rules.DEVICES, help=_DEVICE_HELP)
    p.add_argument("--data-dir", help=_DATA_DIR_HELP)
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each network (pays on a GPU for long trials)",
    )
    _final_procs_flag(p)
    _storage_flags(p, trials=True)

    p = add_verb(sub, "submit")
    _run_flags(p)
    _submit_flags(p)

    p = add_verb(sub, "status")
    p.add_argument("--name", help="one run (default: every run in the storage)")
    p.add_argument("--json", action="store_true", help="machine output on stdout")
    _storage_flags(p)

    p = add_verb(sub, "runs")
    p.add_argument("--json", action="store_true", help="machine output on stdout")
    _url_flag(p)

    p = add_verb(sub, "delete")
    p.add_argument("--name", required=True, help="the run to delete")
    p.add_argument(
        "--yes",
        action="store_true",
        help="delete without asking (needed when not on a terminal)",
    )
    _storage_flags(p)

    p = add_verb(sub, "datasets")
    p.add_argument("--data-dir", help=_DATA_DIR_HELP)
    p.add_argument("--json", action="store_true", help="machine output on stdout")

    p = add_verb(sub, "dashboard")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1: the dashboard has no login and can delete studies)",
    )
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--quiet", action="store_true", help="no request log")
    _storage_flags(p)

    p = add_verb(sub, "report")
    p.add_argument("--name", required=True, help="the run to report on")
    p.add_argument("--out", type=Path, help="folder to write into (default: report-<name>)")
    _storage_flags(p)

    p = add_verb(sub, "export")
    p.add_argument("--name", required=True, help="the run to export")
    p.add_argument(
        "--format", choices=rules.EXPORT_FORMATS, default="csv", help="table format (default csv)"
    )
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

    p = add_verb(sub, "predict")
    p.add_argument("--name", required=True, help="the finished run whose model classifies")
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="image files, or folders searched for images (png, jpg, ...; any depth)",
    )
    p.add_argument(
        "--top", type=int, default=1, metavar="K", help="print the K likeliest classes (default 1)"
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="also write a table (.csv, .json or .parquet): path, class, probability and "
        "every class's probability",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=rules.DEVICES,
        help="where the model runs (default auto: CUDA when there is one)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    _storage_flags(p)

    p = add_verb(sub, "copy")
    p.add_argument("--name", required=True, help="the run to copy")
    p.add_argument("--from", dest="src", required=True, metavar="URL", help="the storage it is in")
    p.add_argument(
        "--to",
        dest="dst",
        required=True,
        metavar="URL",
        help="the storage to copy it to (created if need be)",
    )
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
    p.add_argument(
        "--config",
        type=Path,
        required=True,
        help="the ablation's TOML: a base spec and its variants, e.g. "
        "studies/alexnet-ablation.toml",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the base spec, e.g. --set final.epochs=5 (repeatable)",
    )
    p.add_argument("--device", default="auto", choices=rules.DEVICES, help=_DEVICE_HELP)
    p.add_argument("--data-dir", help=_DATA_DIR_HELP)
    p.add_argument("--out", type=Path, help="folder for the table (default: ablation-<name>)")
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    _storage_flags(p, trials=True)
    return parser
