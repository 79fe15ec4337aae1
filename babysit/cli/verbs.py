"""The command line's words: each verb's one-line description and its examples, and the
version. Kept apart from babysit.cli.parser so the parser reads as flags, not prose."""

from __future__ import annotations

import argparse

# verb: (one line for the verb list and the top of its --help; the end of its --help:
# what more there is to say, then examples)
VERBS: dict[str, tuple[str, str]] = {
    "run": (
        "sanity, overfit, coarse, fine, final (resumes by name)",
        """\
Run the whole protocol. A run is stored under its name (default: the dataset's); running
the same command again skips the stages already done and goes on where it stopped.


examples:
  babysit run --dataset digits
  babysit run --config studies/digits.toml --name digits-adam
  babysit run --dataset cifar10 --set coarse.trials=20 --device cuda
  babysit run --model mynets:build --dataset faces --jobs 4
  babysit run --config studies/digits.toml --print-config   # what would run, and why
""",
    ),
    "check": (
        "sanity and overfit only, in seconds (then `run` goes on)",
        """\
Is this model and data ready for a run? Stored as the run's first two stages, so
`babysit run` with the same name and flags goes on from the coarse search.


examples:
  babysit check --dataset digits
  babysit check --model mynets:build --dataset mydata:load --name try1
  babysit run --model mynets:build --dataset mydata:load --name try1   # goes on from there
""",
    ),
    "worker": (
        "join a run's searches from another process or machine",
        """\
examples:
  babysit worker --name digits
  BABYSIT_STORAGE=postgresql+psycopg://user@db/babysit babysit worker --name digits
""",
    ),
    "status": (
        "where each stage of a run stands",
        """\
examples:
  babysit status
  babysit status --name digits --json
""",
    ),
    "runs": (
        "list the runs in a storage: stages, best accuracy, time",
        """\
examples:
  babysit runs
  babysit runs --storage postgresql+psycopg://user@db/babysit --json
""",
    ),
    "delete": (
        "remove a run: its studies and its artifacts (asks first)",
        """\
Removes the run's five studies and every artifact they name (the model, curves, plots),
in a local artifact folder or on S3. On a terminal it asks first; elsewhere it needs --yes.


examples:
  babysit delete --name digits
  babysit delete --name digits --storage sqlite:///runs/babysit.db --yes
""",
    ),
    "datasets": (
        "list the datasets and whether their files are here",
        """\
examples:
  babysit datasets
  babysit datasets --data-dir /data --json
""",
    ),
    "dashboard": (
        "optuna-dashboard on the storage, with artifacts",
        """\
examples:
  babysit dashboard
  babysit dashboard --storage sqlite:///runs/babysit.db --port 8081
""",
    ),
    "report": (
        "a self-contained HTML report and its Markdown twin",
        """\
examples:
  babysit report --name digits
  babysit report --name digits --out reports/digits
""",
    ),
    "export": (
        "every trial of every stage as one table (CSV or Parquet)",
        """\
examples:
  babysit export --name digits
  babysit export --name digits --format parquet --out digits.parquet
  babysit export --name digits --curves   # and the curves in digits-curves.csv
""",
    ),
    "predict": (
        "classify image files with a finished run's model",
        """\
One line per image: its path, the likeliest class and its probability (--top K: the K
likeliest). The model is the one the run's final trained, read from the run's artifact
store (a folder or S3), with the run's own preprocessing.


examples:
  babysit predict --name digits photos/7.png photos/
  babysit predict --name digits --top 3 --out preds.csv photos/
  babysit predict --name faces --storage postgresql+psycopg://user@db/babysit \\
      --artifact-store s3://bucket/babysit --device cuda images/
""",
    ),
    "copy": (
        "move a run (studies, attrs, artifacts) between storages",
        """\
examples:
  babysit copy --name digits --from sqlite:///babysit.db \\
      --to postgresql+psycopg://user@db/babysit --to-artifact-dir /shared/artifacts
""",
    ),
    "ablate": (
        "one run per variant of a base spec, and their table",
        """\
examples:
  babysit ablate --config studies/alexnet-ablation.toml
  babysit ablate --config studies/alexnet-ablation.toml --set final.epochs=5 --device cuda
""",
    ),
    "submit": (
        "the run and N workers as Slurm jobs (submitit)",
        """\
One job runs `babysit run`, a job array runs the workers, all on one storage: by default
a journal file in --folder, which must be on a disk every node shares. A job that Slurm
preempts or stops at its time limit stores its trial as interrupted and is requeued.


examples:
  babysit submit --dataset cifar10 --workers 8 --partition gpu --gpus 1 --time 240
  babysit submit --config studies/digits.toml --workers 4 --dry-run   # jobs and sbatch script
  babysit submit --dataset digits --workers 2 --executor local --wait  # on this machine
""",
    ),
    "storage-proxy": (
        "Optuna's gRPC storage proxy, shared by many workers",
        """\
Many workers share the proxy's database connections; they use --storage grpc://HOST:PORT.


examples:
  babysit storage-proxy --storage postgresql+psycopg://user@db/babysit
  babysit worker --name digits --storage grpc://proxy-host:13000
""",
    ),
}


def add_verb(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """The verb's parser: its line in the verb list, and examples at the end of --help."""
    summary, examples = VERBS[name]
    return sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


class VerbListFormat(argparse.HelpFormatter):
    """`babysit --help`: every verb's line beside its name. argparse measures the verbs'
    names at the indent of the options, two short, and so put storage-proxy's line below
    it; the column starts past the longest name instead."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)
        self._action_max_length = 4 + max(len(v) for v in VERBS) + 2


def version() -> str:
    """The installed distribution's version, else the package's own ``__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("babysit")
    except PackageNotFoundError:
        import babysit

        return str(getattr(babysit, "__version__", "unknown"))
