"""What a person reads at the terminal: --version, the verb list, --help examples,
--print-config, one-line warnings, plurals, progress lines and verdict wording."""

from __future__ import annotations

import dataclasses
import io
import re
import signal
import time
import warnings
from pathlib import Path

import optuna
import pytest

from babysit.cli.main import main
from babysit.cli.print_config import _comments
from babysit.cli.verbs import VERBS
from babysit.spec import SanitySpec
from babysit.spec import build_spec
from babysit.terminal import Progress
from babysit.terminal import epoch_tested
from babysit.terminal import install_warning_format
from babysit.terminal import plural
from tests.conftest import CHEAP
from tests.conftest import TINY
from tests.conftest import babysit
from tests.conftest import cli_env
from tests.conftest import popen


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    proc = babysit("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"babysit {version('babysit')}\n"


def test_bare_babysit_lists_every_verb_with_its_line(tmp_path: Path) -> None:
    proc = babysit(cwd=tmp_path, env=cli_env(COLUMNS="80"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    for verb, (summary, _) in VERBS.items():
        # The verb and its description on one line, as `pip` lists its commands.
        assert any(ln.split() == [verb, *summary.split()] for ln in lines), (verb, proc.stdout)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_help_has_its_description_and_examples(
    verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    summary, examples = VERBS[verb]
    assert summary[1:] in out
    assert "examples:" in out
    shown = [ln.strip() for ln in examples.splitlines() if ln.strip().startswith("babysit ")]
    assert shown and all(" ".join(ex.split()) in out for ex in shown)
    # Every example names this verb (or the verb it hands over to) and only real flags.
    assert any(ex.startswith(f"babysit {verb}") for ex in shown)


def test_every_example_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """An example that argparse would refuse is worse than none."""
    from babysit.cli.parser import build_parser

    parser = build_parser()
    parsed = 0
    for _, examples in VERBS.values():
        for line in examples.replace("\\\n", " ").splitlines():
            words = line.split("#")[0].split()
            while words and "=" in words[0]:
                words = words[1:]  # an environment variable before the command
            if words[:1] == ["babysit"]:
                parser.parse_args(words[1:])  # raises UsageError on a bad flag
                parsed += 1
    assert parsed >= 2 * len(VERBS)


def _config_lines(out: str) -> dict[str, tuple[str, str, list[str]]]:
    """{key: (value, source, the indented lines under it)} from --print-config."""
    found: dict[str, tuple[str, str, list[str]]] = {}
    key = ""
    for line in out.splitlines():
        m = re.match(r"^(\S+) = (.*)  \((.*)\)$", line)
        if m:
            key = m.group(1)
            found[key] = (m.group(2), m.group(3), [])
        elif line.startswith("    ") and key:
            found[key][2].append(line.strip())
    return found


@pytest.mark.parametrize("verb", ["run", "check"])
def test_print_config_shows_values_sources_reasons_and_touches_no_storage(
    tmp_path: Path, verb: str
) -> None:
    cfg = tmp_path / "spec.toml"
    cfg.write_text('optimizer = "sgd"\n[coarse]\ntrials = 7\n[model]\nfc_width = 128\n')
    args = [
        "--config",
        str(cfg),
        "--set",
        "coarse.trials=5",
        "--set",
        "fine.epochs=2",
        "--seed",
        "4",
        "--print-config",
    ]
    proc = babysit(verb, *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == [cfg]  # no babysit.db, no artifact folder
    shown = _config_lines(proc.stdout)
    spec = build_spec(cfg, ["coarse.trials=5", "fine.epochs=2"], {"seed": 4})
    assert shown["coarse.trials"][:2] == ("5", "--set coarse.trials=5")  # --set beats TOML
    assert shown["fine.epochs"][:2] == ("2", "--set fine.epochs=2")
    assert shown["seed"][:2] == ("4", "flag --seed")
    assert shown["optimizer"][:2] == ('"sgd"', f"TOML file {cfg}")
    assert shown["model.fc_width"][:2] == ("128", f"TOML file {cfg}")
    assert shown["final.epochs"][:2] == (str(spec.final.epochs), "default")
    assert shown["coarse.lr"][1].startswith("learned")  # anchored on the overfit LR
    assert shown["name"][1] == "default: the dataset's name, digits"
    # The reason is the comment beside the field in spec.py; the rule is the field's own.
    tolerance = shown["sanity.tolerance"][2]
    assert f"why: {_comments(SanitySpec)['tolerance']}" in tolerance
    rule = next(f for f in dataclasses.fields(SanitySpec) if f.name == "tolerance")
    assert f"allowed: {rule.metadata['rule'].allowed}" in tolerance
    # Every key of the spec is there, with the value the run would use.
    assert shown["sanity.tolerance"][0] == f"{spec.sanity.tolerance:g}"
    # Every key the run uses is there (the model by its name), and only those: digits
    # uses no FDDB folds and patches and no CIFAR-10 validation size.
    fddb_and_cifar = {
        "data.train_folds",
        "data.val_folds",
        "data.test_folds",
        "data.patch_size",
        "data.negatives_per_face",
        "data.val_size",
    }
    assert set(shown) == ({"model"} | set(_all_keys())) - {"model.name"} - fddb_and_cifar
    assert shown["model"][:2] == ('"alexnet"', "default")
    assert shown["momentum"][0] == "0.9"  # sgd's


def _all_keys() -> list[str]:
    from babysit.spec import all_keys

    return all_keys()


@pytest.mark.parametrize(
    "args, shown, left_out",
    [
        # A user's model: no AlexNet knobs; digits: no FDDB or CIFAR-10 settings; adam: no
        # momentum.
        (
            ["--model", "mynets:build"],
            {
                "model": ('"mynets:build"', "flag --model"),
                "data.val_fraction": ("0.15", "default"),
            },
            {"model.fc_width", "model.geometry", "data.patch_size", "data.val_size", "momentum"},
        ),
        # FDDB's own settings, and babysit's AlexNet with its knobs.
        (
            ["--dataset", "fddb", "--optimizer", "sgd"],
            {"data.train_folds": ("[1, 2, 3, 4, 5, 6, 7, 8]", "default")},
            {"data.val_fraction", "data.val_size"},
        ),
        (["--dataset", "cifar10"], {"data.val_size": ("5000", "default")}, {"data.patch_size"}),
    ],
)
def test_print_config_names_the_model_and_only_the_settings_that_apply(
    tmp_path: Path, args: list[str], shown: dict[str, tuple[str, str]], left_out: set[str]
) -> None:
    # The user's module is imported as the run imports it (torch only when it is called).
    (tmp_path / "mynets.py").write_text(
        "def build(num_classes, in_channels, image_size):\n    pass\n"
    )
    proc = babysit("run", *args, "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = _config_lines(proc.stdout)
    for key, (value, source) in shown.items():
        assert found[key][:2] == (value, source), key
    assert not left_out & set(found), left_out & set(found)
    # What is left out is named at the end, with the reason.
    tail = [line for line in proc.stdout.splitlines() if line.startswith("# not used")]
    assert left_out <= {k for line in tail for k in line.partition("): ")[2].split(", ")}
    assert {p.name for p in tmp_path.iterdir()} - {"__pycache__"} == {"mynets.py"}


@pytest.mark.parametrize(
    "args",
    [["--model", "alexnet2"], ["--dataset", "nosuch"], ["--model", "nosuchmodule:build"]],
    ids=["model", "dataset", "model-module"],
)
def test_print_config_refuses_a_bad_choice_as_the_run_does(
    tmp_path: Path, args: list[str]
) -> None:
    printed = babysit("run", *args, "--print-config", cwd=tmp_path)
    ran = babysit("run", *args, "--storage", f"sqlite:///{tmp_path / 'b.db'}", cwd=tmp_path)
    assert printed.returncode == ran.returncode == 2, (printed.stderr, ran.stderr)
    assert printed.stderr == ran.stderr and printed.stderr.count("\n") == 1
    assert printed.stdout == "" and list(tmp_path.iterdir()) == []


def test_print_config_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`babysit run --print-config | head -1`, with head gone before babysit writes (what
    happened in 2 of 3 tries): a pipe whose reading end is already closed."""
    import os
    import subprocess
    import sys

    from tests.conftest import cli_env

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "babysit", "run", "--print-config"],
            cwd=tmp_path,
            env=cli_env(),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_print_config_with_a_bad_value_is_still_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = babysit("run", "--set", "coarse.trials=0", "--print-config", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "coarse.trials" in proc.stderr
    assert not (tmp_path / "babysit.db").exists()


WARNING_MODEL = """
import warnings

from babysit.training.models import AlexNet

warnings.warn("warnnet: this network is experimental,\\n  expect changes")


def wrong_width(num_classes, in_channels, image_size):
    return AlexNet(num_classes + 1, in_channels=in_channels, fc_width=64)
"""


def test_a_warning_reaches_the_terminal_as_one_line(tmp_path: Path) -> None:
    """A user's model module that warns at import: one line `warning: ...`, not Python's
    file:line: UserWarning plus the source line."""
    (tmp_path / "warnnet.py").write_text(WARNING_MODEL)
    proc = babysit("run", "--model", "warnnet:wrong_width", "--quiet", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "warning: warnnet: this network is experimental, expect changes"
    assert len(lines) == 2 and lines[1].startswith("babysit: model 'warnnet:wrong_width'")
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_the_library_leaves_warnings_alone_until_the_cli_installs_its_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess
    import sys

    # In a fresh interpreter (pytest replaces showwarning around each test).
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import warnings, babysit, babysit.cli; "
            "print(warnings.showwarning is warnings._showwarning_orig)",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout == "True\n"
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    install_warning_format()
    out = io.StringIO()
    warnings.showwarning("two\nlines", UserWarning, "/x/y.py", 3, file=out)
    assert out.getvalue() == "warning: two lines\n"


def test_plural() -> None:
    assert plural(1, "epoch") == "1 epoch"
    assert plural(2, "epoch") == "2 epochs" and plural(2, "batch") == "2 batches"
    assert [plural(n, "trial") for n in (0, 2)] == ["0 trials", "2 trials"]
    assert plural(1, "worker process") == "1 worker process"
    assert plural(3, "worker process") == "3 worker processes"
    assert plural(2, "study", "studies") == "2 studies"


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_progress_without_a_tty_is_one_plain_line_per_step() -> None:
    out = io.StringIO()
    bar = Progress("coarse", "trial", stream=out)
    for n in (0, 0, 1, 1, 2, 3):  # repeated reports (polls) say nothing new
        bar.to(n, 3)
    bar.close()
    lines = _lines(out)
    assert "\r" not in out.getvalue()
    assert [ln.split(" (")[0] for ln in lines] == [
        "coarse: 0/3 trials",
        "coarse: 1/3 trials",
        "coarse: 2/3 trials",
        "coarse: 3/3 trials",
    ]
    quiet = io.StringIO()
    Progress("final", "epoch", quiet=True, stream=quiet).to(1, 1)
    assert quiet.getvalue() == ""


def test_a_resumed_stage_starts_counting_from_its_stored_trials() -> None:
    """fill() reports the finished trials a previous run stored before it runs one, so the
    display starts there: one line for them, then one per new trial."""
    from babysit.parallel.coordination import fill

    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for v in (0.1, 0.2):
        study.add_trial(optuna.trial.create_trial(params={"x": v}, distributions=dist, value=v))
    out = io.StringIO()
    bar = Progress("coarse", "trial", stream=out)
    fill(study, 4, lambda trial: trial.suggest_float("x", 0, 1), bar.to)
    lines = _lines(out)
    assert lines[0] == "coarse: 2/4 trials already done"
    assert [ln.split(" (")[0] for ln in lines[1:]] == ["coarse: 3/4 trials", "coarse: 4/4 trials"]


def test_progress_on_a_terminal_is_one_tqdm_bar_started_at_the_stored_count() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = Progress("coarse", "trial", stream=out)
    bar.to(2, 4)
    first = bar.bar
    assert first is not None and first.n == 2 and first.total == 4
    bar.to(3, 4)
    assert bar.bar is first and first.n == 3
    bar.close()
    # tqdm draws at creation and on updates; the first frame is already 2/4, never 0/4.
    frames = [f for f in out.getvalue().split("\r") if "coarse" in f]
    assert "0/4" not in out.getvalue() and "2/4" in frames[0]


# The cheapest whole protocol with progress on: 3 coarse trials, 2 fine, a 1-epoch final.
CHEAP_RUN = [
    *CHEAP,
    "--set",
    "coarse.trials=3",
    "--set",
    "coarse.epochs=1",
    "--set",
    "coarse.lr=[1e-3, 0.1]",
    "--set",
    "coarse.extend=false",
    "--set",
    "fine.trials=2",
    "--set",
    "fine.epochs=1",
    "--set",
    "final.epochs=1",
]


def _progress(stderr: str, stage: str) -> list[str]:
    return [
        ln.split(" (")[0]
        for ln in stderr.splitlines()
        if re.match(rf"^{stage}: \d+/\d+ (trial|epoch)", ln)
    ]


@pytest.mark.slow
def test_a_run_without_a_tty_prints_plain_progress_lines_and_clean_verdicts(
    tmp_path: Path,
) -> None:
    proc = babysit("run", *CHEAP_RUN, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "\r" not in err and "\x1b" not in err
    assert _progress(err, "coarse") == [f"coarse: {n}/3 trials" for n in range(4)]
    assert _progress(err, "fine") == [f"fine: {n}/2 trials" for n in range(3)]
    assert _progress(err, "final") == ["final: 0/1 epoch", "final: 1/1 epoch"]
    # Each verdict names its stage once, and counts agree with their nouns.
    for stage in ("sanity", "overfit", "coarse", "fine", "final"):
        assert not re.search(rf"^{stage} \w+: {stage}:", err, re.M), err
    assert re.search(r"^coarse passed: 3 trials \(", err, re.M)
    assert re.search(
        r"^final passed: test accuracy [0-9.]+ at epoch 1 of 1 \(loss [0-9.]+\), val [0-9.]+; lr ",
        err,
        re.M,
    )
    assert " at epoch 1 of 1 (val " in err and "1 epochs" not in err


def _finished(db: Path, study: str) -> int:
    try:
        s = optuna.load_study(study_name=study, storage=f"sqlite:///{db}")
    except KeyError:
        return 0
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(t.state in states for t in s.get_trials())


@pytest.mark.slow
def test_a_resumed_run_counts_progress_from_the_stored_trials(tmp_path: Path) -> None:
    db = tmp_path / "babysit.db"
    args = [
        "run",
        "--name",
        "p",
        *[a for a in TINY if a != "--quiet"],
        "--set",
        "coarse.trials=6",
        "--set",
        'coarse.pruner="none"',
    ]
    proc = popen(*args, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while _finished(db, "p/coarse") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    stored = _finished(db, "p/coarse")
    assert 2 <= stored < 6
    again = babysit(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    coarse = _progress(again.stderr, "coarse")
    assert coarse[0] == f"coarse: {stored}/6 trials already done"  # not 0/6
    assert coarse[1:] == [f"coarse: {n}/6 trials" for n in range(stored + 1, 7)]


def test_epoch_tested_names_the_epoch_whose_weights_were_tested() -> None:
    assert epoch_tested({"best_epoch": 16, "epochs": 20}) == "at epoch 16 of 20"
    # A run that stored no best epoch (an older babysit) says what it can.
    assert epoch_tested({"best_epoch": None, "epochs": 1}) == "after 1 epoch"
    assert epoch_tested({"epochs": 20}) == "after 20 epochs"
