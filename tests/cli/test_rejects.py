"""Every verb refuses a bad storage URL, a run that is not there and a bad config the same
way: exit 2, one line on stderr that says what to do, no traceback, and no file created
or changed (issue 21: an empty 114 kB database was left by `ablate` and `copy`).

Each case is the real command line in a subprocess. The cases the issue names run in the
quick suite; the whole matrix is `slow` (a subprocess costs seconds on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import optuna
import pytest

from babysit.cli.parser import build_parser
from babysit.schema import Stage
from babysit.schema import study_name
from tests.conftest import babysit

BAD_URL = "nonsense"
# {db}: a storage holding one run, "other"; {new}: an SQLite file that must not appear;
# {dir}: a folder given as a config file.
CASES: dict[str, tuple[str, ...]] = {
    "run-storage": ("run", "--storage", BAD_URL),
    "run-config-folder": ("run", "--config", "{dir}", "--storage", "{new}"),
    "run-config-missing": ("run", "--config", "nosuch.toml", "--storage", "{new}"),
    "check-storage": ("check", "--storage", BAD_URL),
    "check-config-folder": ("check", "--config", "{dir}", "--storage", "{new}"),
    "worker-storage": ("worker", "--name", "other", "--storage", BAD_URL),
    "worker-missing-run": ("worker", "--name", "nosuch", "--storage", "{db}"),
    "status-storage": ("status", "--storage", BAD_URL),
    "status-missing-run": ("status", "--name", "nosuch", "--storage", "{db}"),
    "status-missing-file": ("status", "--storage", "{new}"),
    "runs-storage": ("runs", "--storage", BAD_URL),
    "runs-missing-file": ("runs", "--storage", "{new}"),
    "delete-storage": ("delete", "--name", "other", "--yes", "--storage", BAD_URL),
    "delete-missing-run": ("delete", "--name", "nosuch", "--yes", "--storage", "{db}"),
    "dashboard-storage": ("dashboard", "--storage", BAD_URL),
    "report-storage": ("report", "--name", "other", "--storage", BAD_URL),
    "report-missing-run": ("report", "--name", "nosuch", "--storage", "{db}"),
    "export-storage": ("export", "--name", "other", "--storage", BAD_URL),
    "export-missing-run": ("export", "--name", "nosuch", "--storage", "{db}"),
    "copy-storage": ("copy", "--name", "other", "--from", BAD_URL, "--to", "{new}"),
    "copy-bad-target": ("copy", "--name", "other", "--from", "{db}", "--to", BAD_URL),
    "copy-missing-run": ("copy", "--name", "nosuch", "--from", "{db}", "--to", "{new}"),
    "ablate-storage": ("ablate", "--config", "nosuch.toml", "--storage", BAD_URL),
    "ablate-config-missing": ("ablate", "--config", "nosuch.toml", "--storage", "{new}"),
    "ablate-config-folder": ("ablate", "--config", "{dir}", "--storage", "{new}"),
    "storage-proxy-storage": ("storage-proxy", "--storage", BAD_URL),
    "submit-storage": ("submit", "--storage", BAD_URL, "--dry-run"),
    "predict-storage": ("predict", "--name", "other", "--storage", BAD_URL, "x.png"),
    "predict-missing-run": ("predict", "--name", "nosuch", "--storage", "{db}", "x.png"),
    "submit-config-folder": ("submit", "--config", "{dir}", "--dry-run"),
}
# The ones issue 21 found wrong, and one of each kind: in the quick suite.
QUICK = {
    "run-config-folder",
    "ablate-config-missing",
    "copy-missing-run",
    "status-storage",
    "status-missing-run",
}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_the_matrix_covers_every_verb_with_a_storage() -> None:
    covered = {args[0] for args in CASES.values()}
    with_storage = {
        verb
        for verb, p in _verbs().items()
        if any(o in ("--storage", "--from") for a in p._actions for o in a.option_strings)
    }
    assert with_storage <= covered, with_storage - covered


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=() if c in QUICK else pytest.mark.slow) for c in CASES],
)
def test_every_verb_rejects_bad_input_in_one_line_and_leaves_nothing(
    tmp_path: Path, case: str
) -> None:
    db = tmp_path / "runs.db"
    optuna.create_study(study_name=study_name("other", Stage.SANITY), storage=f"sqlite:///{db}")
    (tmp_path / "configs").mkdir()
    new = tmp_path / "new.db"
    where = {"{db}": f"sqlite:///{db}", "{new}": f"sqlite:///{new}", "{dir}": "configs"}
    args = [where.get(a, a) for a in CASES[case]]
    before = _snapshot(tmp_path)

    proc = babysit(*args, cwd=tmp_path, timeout=120)

    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("babysit: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _snapshot(tmp_path) == before  # nothing created, nothing changed
    assert not new.exists() and not (tmp_path / "babysit.db").exists()
    if BAD_URL in args:
        assert f"'{BAD_URL}'" in proc.stderr  # what was typed, not a placeholder
    if "nosuch" in args and "nosuch.toml" not in args:
        assert "no run named 'nosuch'" in proc.stderr and "runs there: other" in proc.stderr
    if "{dir}" in CASES[case]:
        assert "is a folder" in proc.stderr


# Verbs that read or remove what is stored: no heartbeat, no grace (they run no trial).
READ_ONLY = ("status", "runs", "delete", "report", "export", "copy", "dashboard", "datasets")


def test_every_flag_of_every_verb_has_help() -> None:
    for verb, p in _verbs().items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (verb, action.dest)


def test_read_only_verbs_show_only_the_flags_they_use() -> None:
    verbs = _verbs()
    for verb in READ_ONLY:
        flags = {o for a in verbs[verb]._actions for o in a.option_strings}
        assert not {"--heartbeat", "--grace"} & flags, verb
    runs = {o for a in verbs["runs"]._actions for o in a.option_strings}
    assert runs == {"-h", "--help", "--storage", "--json"}
    for verb in ("run", "check", "worker", "ablate"):
        flags = {o for a in verbs[verb]._actions for o in a.option_strings}
        assert {"--heartbeat", "--grace"} <= flags, verb


def test_run_help_says_the_defaults_of_dataset_model_optimizer_and_seed() -> None:
    text = " ".join(_verbs()["run"].format_help().split())
    for words in (
        "or module:callable (default: digits)",
        "(default: alexnet)",
        "default: adam)",
        "derive from it (default: 0)",
    ):
        assert words in text, words
