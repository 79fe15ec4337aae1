"""Bad input through the real CLI: one line on stderr, exit 2, no traceback, before any
training, and the run's name still free afterwards (nothing stored under it).

The verdict cases (a stage that cannot go on) end with exit 1 and a verdict in words.
docs/reliability.md lists every case here with its outcome.
"""

from __future__ import annotations

import sqlite3
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest

from babysit.errors import UsageError
from tests.conftest import CHEAP
from tests.conftest import babysit
from tests.conftest import cli_env

RUN = "bad"
# One thread per process: the test machine's cores are shared.
ENV = {"OMP_NUM_THREADS": "1"}
# A rejected input costs no training: the spec cases fail before torch is imported
# (~0.3 s), the user-code cases once the data is loaded. The bound is loose because the
# test machine is shared and loaded; a case that trained would take minutes.
SECONDS = 60


def _stored(db: Path, run: str) -> list[str]:
    """Study names under ``run`` in the SQLite file (read without creating anything)."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        try:
            names = [r[0] for r in con.execute("SELECT study_name FROM studies")]
        except sqlite3.OperationalError:  # no tables yet
            return []
    return [n for n in names if n.startswith(f"{run}/")]


def _one_line(proc, code: int = 2) -> str:  # noqa: ANN001
    """The single line a rejected input prints; every promise of the module checked."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode == code, out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("babysit: "), lines[0]
    return lines[0]


def _reject(
    tmp_path: Path, *args: str, words: tuple[str, ...] = (), name: str = RUN, cmd: str = "run"
) -> str:
    db = tmp_path / "s.db"
    t0 = time.monotonic()
    proc = babysit(
        cmd,
        *(("--name", name) if name is not None else ()),
        "--storage",
        f"sqlite:///{db}",
        "--quiet",
        *args,
        cwd=tmp_path,
        env=cli_env(**ENV),
        timeout=180,
    )
    elapsed = time.monotonic() - t0
    line = _one_line(proc)
    for w in words:
        assert w in line, line
    assert elapsed < SECONDS, f"{elapsed:.1f} s"
    assert _stored(db, name if name is not None else RUN) == []
    return line


# ---------------------------------------------------------------------------- the spec


def S(*assignments: str) -> tuple[str, ...]:  # noqa: N802 - reads like the flag
    return tuple(a for s in assignments for a in ("--set", s))


SPEC_CASES = {
    # From the issue: accepted, then crashed late or misdiagnosed.
    "coarse-lr-inf": (S("coarse.lr=[1e-3, inf]"), ("coarse.lr", "inf", "finite")),
    "narrow-top-k-0": (S("narrow.top_k=0"), ("narrow.top_k = 0", ">= 1")),
    "narrow-pad-negative": (S("narrow.pad=-5"), ("narrow.pad = -5", ">= 0")),
    "overfit-lrs-empty": (S("overfit.lrs={adam=[]}"), ("overfit.lrs", "non-empty")),
    "sanity-batches-0": (S("sanity.batches=0"), ("sanity.batches = 0",)),
    "sgd-momentum-negative": (
        ("--optimizer", "sgd", *S("momentum=-1")),
        ("momentum = -1", "[0, 1)"),
    ),
    "dropout-1.5": (S("model.dropout=1.5"), ("model.dropout = 1.5", "[0, 1)")),
    "overfit-steps-0": (S("overfit.steps=0"), ("overfit.steps = 0",)),
    "sanity-tolerance-negative": (S("sanity.tolerance=-1"), ("sanity.tolerance", "> 0")),
    "fc-width-0": (S("model.fc_width=0"), ("model.fc_width = 0",)),
    "crop-pad-negative": (S("data.crop_pad=-3"), ("data.crop_pad = -3",)),
    # The same families, one step further.
    "coarse-lr-nan": (S("coarse.lr=[nan, 1.0]"), ("coarse.lr",)),
    "coarse-lr-one-bound": (S("coarse.lr=[1e-3]"), ("coarse.lr", "[low, high]")),
    "coarse-lr-three-bounds": (S("coarse.lr=[1e-4, 1e-3, 1e-2]"), ("coarse.lr",)),
    "coarse-lr-reversed": (S("coarse.lr=[1, 0.1]"), ("0 < low < high",)),
    "coarse-wd-zero": (S("coarse.weight_decay=[0, 1e-2]"), ("coarse.weight_decay",)),
    "narrow-edge-negative": (S("narrow.edge=-1"), ("narrow.edge",)),
    "overfit-lrs-negative": (S("overfit.lrs={adam=[-1e-3]}"), ("overfit.lrs",)),
    "overfit-lrs-inf": (S("overfit.lrs={adam=[inf]}"), ("overfit.lrs",)),
    "overfit-lrs-not-a-list": (S("overfit.lrs={adam=1e-3}"), ("overfit.lrs",)),
    "overfit-lrs-unknown-optimizer": (S("overfit.lrs={rmsprop=[1e-3]}"), ("overfit.lrs",)),
    "overfit-lrs-lacks-the-optimizer": (
        ("--optimizer", "sgd", *S("overfit.lrs={adam=[1e-3]}")),
        ("overfit.lrs has no entry for optimizer 'sgd'",),
    ),
    "overfit-samples-1": (S("overfit.samples=1"), ("overfit.samples",)),
    "sanity-reg-0": (S("sanity.reg=0"), ("sanity.reg",)),
    "sgd-momentum-1": (("--optimizer", "sgd", *S("momentum=1")), ("momentum",)),
    "dropout-negative": (S("model.dropout=-0.1"), ("model.dropout",)),
    "resize-negative": (S("data.resize=-1"), ("data.resize",)),
    "resize-huge": (S("data.resize=100000"), ("data.resize", "8 to 1024")),
    "fc-width-huge": (S("model.fc_width=100000000"), ("model.fc_width", "16384")),
    "patch-size-huge": (S("data.patch_size=100000"), ("data.patch_size",)),
    "brightness-inf": (S("data.brightness=inf"), ("data.brightness",)),
    "val-fraction-1": (S("data.val_fraction=1.0"), ("data.val_fraction",)),
    "fractions-leave-no-train": (
        S("data.val_fraction=0.5", "data.test_fraction=0.5"),
        ("no training data",),
    ),
    "folds-overlap": (S("data.val_folds=[8]"), ("share fold",)),
    "folds-out-of-range": (S("data.test_folds=[11]"), ("data.test_folds", "1-10")),
    "folds-empty": (S("data.train_folds=[]"), ("data.train_folds",)),
    "coarse-trials-0": (S("coarse.trials=0"), ("coarse.trials",)),
    "fine-epochs-0": (S("fine.epochs=0"), ("fine.epochs",)),
    "final-epochs-negative": (S("final.epochs=-2"), ("final.epochs",)),
    "diverge-factor-half": (S("fine.diverge_factor=0.5"), ("fine.diverge_factor", "> 1")),
    "flat-tolerance-1": (S("coarse.flat_tolerance=1"), ("coarse.flat_tolerance",)),
    "batch-size-negative": (S("batch_size=-8"), ("batch_size",)),
    "seed-negative": (("--seed", "-1"), ("seed = -1",)),
    "conv-layers-7": (S("model.conv_layers=7"), ("3, 4 or 5",)),
    "unknown-optimizer": (("--optimizer", "rmsprop"), ("unknown optimizer 'rmsprop'",)),
    "unknown-sampler": (S('fine.sampler="grid"'), ("fine.sampler",)),
    "trials-not-a-number": (S("coarse.trials=many"), ("expects int",)),
    "dataset-with-newline": (("--dataset", "dig\nits"), ("dataset", "\\n")),
    "model-empty": (("--model", ""), ()),
    "jobs-0": (("--jobs", "0"), ("--jobs must be at least 1",)),
    # Issue 22's knobs: dropout and the schedule searched, the new optimizers.
    "coarse-dropout-reversed": (S("coarse.dropout=[0.5, 0.1]"), ("coarse.dropout", "low < high")),
    "coarse-dropout-1": (S("coarse.dropout=[0.1, 1.0]"), ("coarse.dropout", "< 1")),
    "coarse-dropout-one-bound": (S("coarse.dropout=[0.3]"), ("coarse.dropout", "[low, high]")),
    "coarse-dropout-words": (S('coarse.dropout=["a", "b"]'), ("coarse.dropout",)),
    "coarse-schedule-unknown": (
        S('coarse.schedule=["none", "linear"]'),
        ("coarse.schedule", "none, step, cosine"),
    ),
    "coarse-schedule-twice": (S('coarse.schedule=["cosine", "cosine"]'), ("distinct",)),
    "coarse-schedule-numbers": (S("coarse.schedule=[1, 2]"), ("coarse.schedule",)),
    "schedule-unknown": (S('schedule="linear"'), ("unknown schedule 'linear'",)),
    "dropout-searched-on-a-head-without-dropout": (
        S("model.fc_layers=1", "coarse.dropout=[0.1, 0.5]"),
        ("model.fc_layers=1 has no dropout",),
    ),
    "nesterov-without-momentum": (
        ("--optimizer", "nesterov", *S("momentum=0")),
        ("nesterov needs momentum > 0",),
    ),
    "heartbeat-0": (("--heartbeat", "0"), ("heartbeat_interval", "positive")),
}


@pytest.mark.parametrize("args, words", SPEC_CASES.values(), ids=SPEC_CASES.keys())
def test_bad_spec_value(tmp_path: Path, args: tuple[str, ...], words: tuple[str, ...]) -> None:
    _reject(tmp_path, *args, words=words)


TOML_CASES = {
    "toml-top-k-0": ("[narrow]\ntop_k = 0\n", ("narrow.top_k = 0",)),
    "toml-lr-inf": ("[coarse]\nlr = [1e-3, inf]\n", ("coarse.lr",)),
    "toml-dropout": ("[model]\ndropout = 2.0\n", ("model.dropout",)),
    "toml-name-slash": ('name = "a/b"\n', ("name = 'a/b'",)),
    "toml-name-newline": ('name = "a\\nb"\n', ("name = 'a\\nb'",)),
}


@pytest.mark.parametrize("text, words", TOML_CASES.values(), ids=TOML_CASES.keys())
def test_bad_value_in_a_toml_file(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    cfg = tmp_path / "spec.toml"
    cfg.write_text(text)
    # --name would override the file's name, so the name cases go without it.
    _reject(
        tmp_path, "--config", str(cfg), words=words, name=None if text.startswith("name") else RUN
    )


def test_python_api_checks_the_same_rules(tmp_path: Path) -> None:
    import babysit

    for kwargs, words in (
        ({"narrow": {"top_k": 0}}, "narrow.top_k = 0"),
        ({"coarse": {"lr": [1e-3, float("inf")]}}, "coarse.lr"),
        ({"momentum": -1.0, "optimizer": "sgd"}, "momentum = -1"),
        ({"name": "two\nlines"}, "'two\\nlines'"),
    ):
        args = {"name": RUN, **kwargs}
        with pytest.raises(UsageError) as err:
            babysit.run(data="digits", storage=tmp_path / "api.db", quiet=True, **args)
        assert words in str(err.value) and "\n" not in str(err.value)
    assert _stored(tmp_path / "api.db", RUN) == []


# ---------------------------------------------------------------------------- run names


NAME_CASES = {
    "129-chars": "x" * 129,
    "300-chars": "x" * 300,  # over the ~238 that SQLite's artifact file names allowed
    "600-chars": "y" * 600,  # over PostgreSQL's study_name VARCHAR(512)
    "newline": "run\nname",
    "tab": "run\tname",
    "control-char": "run\x01name",
    "slash": "a/b",
    "space": "my run",
    "leading-dash": "-run",
    "leading-dot": ".run",
    "dot-dot": "..",
    "non-ascii": "résumé",
    "colon": "run:1",
}


@pytest.mark.parametrize("name", NAME_CASES.values(), ids=NAME_CASES.keys())
def test_bad_run_name(tmp_path: Path, name: str) -> None:
    line = _reject(tmp_path, f"--name={name}", name=None)
    assert "run name" in line or "name =" in line
    assert "1-128 characters" in line


def test_longest_allowed_name_runs_every_storage_path(tmp_path: Path) -> None:
    """128 characters pass the rule and get past every name check (to the data)."""
    from babysit.spec import NAME_MAX
    from babysit.spec import check_run_name

    check_run_name("a" * NAME_MAX)
    with pytest.raises(UsageError):
        check_run_name("a" * (NAME_MAX + 1))
    # An ablation's composed name keeps its '/' parts; a user's --name may not hold one.
    check_run_name("ablation/4-conv/r1", composed=True)
    # A run given no name is named after its dataset, always by the rule.
    from babysit.spec import default_run_name

    for dataset, name in (
        ("digits", "digits"),
        ("pkg.data:load", "pkg.data-load"),
        ("python:__main__.<lambda>", "python-__main__.-lambda"),
        (":::", "run"),
    ):
        assert default_run_name(dataset) == name
    check_run_name(default_run_name("x" * 400))
    with pytest.raises(UsageError):
        check_run_name("ablation/4-conv/r1")


# ---------------------------------------------------------------------------- user code


USER_CODE = {
    "exit0.py": "import sys\nsys.exit(0)\n",
    "exit3.py": "import sys\nsys.exit(3)\n",
    "interrupt.py": "raise KeyboardInterrupt\n",
    "broken.py": "raise RuntimeError('first line\\nsecond line')\n",
    "syntax.py": "def build(:\n",
    "quits.py": (
        "import sys\n\n\ndef build(num_classes, in_channels, image_size):\n    sys.exit(0)\n"
    ),
    "noparams.py": (
        "from torch import nn\n\n\nclass Pick(nn.Module):\n"
        "    def __init__(self, n):\n        super().__init__()\n        self.n = n\n\n"
        "    def forward(self, x):\n        return x.flatten(1)[:, : self.n]\n\n\n"
        "def build(num_classes, in_channels, image_size):\n    return Pick(num_classes)\n"
    ),
    "nodropout.py": (
        "from torch import nn\n\n\ndef build(num_classes, in_channels, image_size):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, "
        "num_classes))\n"
    ),
    "frozen.py": (
        "from torch import nn\n\n\ndef build(num_classes, in_channels, image_size):\n"
        "    net = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "    net(__import__('torch').zeros(1, in_channels, image_size, image_size))\n"
        "    for p in net.parameters():\n        p.requires_grad_(False)\n    return net\n"
    ),
}

MODEL_CASES = {
    "sys-exit-0-at-import": (("--model", "exit0:build"), ("'exit0'", "sys.exit(0)")),
    "sys-exit-3-at-import": (("--model", "exit3:build"), ("'exit3'", "sys.exit(3)")),
    "keyboard-interrupt-at-import": (
        ("--model", "interrupt:build"),
        ("'interrupt'", "KeyboardInterrupt"),
    ),
    "error-with-two-lines-at-import": (
        ("--model", "broken:build"),
        ("'broken'", "first line second line"),
    ),
    "syntax-error": (("--model", "syntax:build"), ("'syntax'", "SyntaxError")),
    "sys-exit-in-builder": (("--model", "quits:build"), ("quits:build", "SystemExit")),
    "dataset-module-exits": (("--dataset", "exit0:load"), ("dataset module 'exit0'",)),
    "model-without-parameters": (("--model", "noparams:build"), ("no trainable parameters",)),
    "model-without-parameters-forced": (
        ("--model", "noparams:build", "--force"),
        ("no trainable parameters",),
    ),
    "model-with-frozen-parameters": (("--model", "frozen:build"), ("no trainable parameters",)),
    "dropout-searched-without-dropout-layers": (
        ("--model", "nodropout:build", "--set", "coarse.dropout=[0.1, 0.5]"),
        ("coarse.dropout is set but model 'nodropout:build' has no Dropout layers",),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("args, words", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_bad_user_code(tmp_path: Path, args: tuple[str, ...], words: tuple[str, ...]) -> None:
    for name, text in USER_CODE.items():
        (tmp_path / name).write_text(text)
    _reject(tmp_path, *args, words=words)


# ---------------------------------------------------------------------------- storage URL


@pytest.mark.parametrize("password", ["s3cr@t-pa55", "p:w@rd/x9"])
def test_password_with_unencoded_at_is_never_printed(tmp_path: Path, password: str) -> None:
    # Port 1 on this host: nothing listens, so the open fails at once.
    url = f"postgresql+psycopg://user:{password}@127.0.0.1:1/db"
    proc = babysit("status", "--storage", url, cwd=tmp_path, env=cli_env(**ENV), timeout=60)
    line = _one_line(proc)
    assert "storage" in line
    for piece in {password, *password.split("@")}:
        assert piece not in proc.stdout + proc.stderr, line


# ---------------------------------------------------------------------------- images


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height: PIL reads the size from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_oversized_images_are_named_and_skipped(tmp_path: Path) -> None:
    from tests.data.test_imagefolder import make_folder

    images = tmp_path / "images"
    make_folder(images, per_class=6)
    # 100 M pixels is over PIL's warning limit (89 M), 400 M over its error limit (179 M).
    (images / "train" / "circle" / "huge.png").write_bytes(_png_header(10_000, 10_000))
    (images / "train" / "square" / "bomb.png").write_bytes(_png_header(20_000, 20_000))
    (tmp_path / "noparams.py").write_text(USER_CODE["noparams.py"])
    # The parameterless model stops the run right after the data is loaded: no training.
    proc = babysit(
        "run",
        "--name",
        RUN,
        "--storage",
        f"sqlite:///{tmp_path / 's.db'}",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(images),
        "--set",
        "data.patch_size=16",
        "--model",
        "noparams:build",
        "--quiet",
        cwd=tmp_path,
        env=cli_env(**ENV),
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert "DecompressionBombWarning" not in out and "DecompressionBombError" not in out, out
    skipped = [line for line in proc.stderr.splitlines() if "imagefolder: skipped" in line]
    assert len(skipped) == 1, out
    assert "skipped 2 unreadable file(s)" in skipped[0]
    for name in ("train/circle/huge.png", "train/square/bomb.png"):
        assert name in skipped[0]
    assert skipped[0].count("oversized image") == 2 and "100000000 pixels" in skipped[0]


def test_oversized_fddb_photo_is_named_and_skipped(tmp_path: Path) -> None:
    import warnings

    from babysit.data import fddb

    pics = tmp_path / fddb.PICS_DIR / "2002"
    pics.mkdir(parents=True)
    (pics / "huge.jpg").write_bytes(_png_header(10_000, 10_000))
    photo = fddb.Photo(
        path="2002/huge",
        fold=1,
        faces=(),
        listed="FDDB-fold-01.txt:1",
        ellipse_file="FDDB-fold-01-ellipseList.txt",
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        built = fddb.build_split(tmp_path, [photo], 16, 1.0, seed=0)
    assert [w for w in seen if "DecompressionBomb" in type(w.message).__name__] == []
    assert len(built.skipped_images) == 1
    assert "2002/huge.jpg is oversized" in built.skipped_images[0]


# ---------------------------------------------------------------------------- verdicts


@pytest.mark.slow
def test_coarse_at_chance_ends_in_a_narrowing_verdict_and_the_name_was_free(
    tmp_path: Path,
) -> None:
    """Every coarse trial at or below chance: narrowing used to raise IndexError after the
    budget was spent. It is a verdict with advice (exit 1). The name was first given to a
    rejected input: nothing was stored, so the real run could take it."""
    _reject(tmp_path, *S("narrow.top_k=0"), name="verdict")
    db = tmp_path / "s.db"
    # An lr of 1e-9 leaves the network as initialised: its one class is at most chance.
    proc = babysit(
        "run",
        "--name",
        "verdict",
        "--storage",
        f"sqlite:///{db}",
        *CHEAP,
        "--set",
        "coarse.trials=1",
        "--set",
        "coarse.epochs=1",
        "--set",
        "coarse.lr=[1e-9, 2e-9]",
        "--set",
        "coarse.extend=false",
        "--set",
        "fine.trials=1",
        "--set",
        "final.epochs=1",
        "--quiet",
        cwd=tmp_path,
        env=cli_env(**ENV),
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "babysit: narrowing failed: none of the 1 complete coarse trials beat chance"
    ), last
    assert "coarse.epochs" in last
    status = babysit(
        "status",
        "--name",
        "verdict",
        "--storage",
        f"sqlite:///{db}",
        cwd=tmp_path,
        env=cli_env(**ENV),
        check=True,
    )
    assert [line.split()[:2] for line in status.stdout.splitlines()[3:6]] == [
        ["coarse", "passed"],
        ["fine", "failed"],
        ["final", "skipped"],
    ]
    report = babysit(
        "report",
        "--name",
        "verdict",
        "--storage",
        f"sqlite:///{db}",
        "--out",
        str(tmp_path / "rep"),
        cwd=tmp_path,
        env=cli_env(**ENV),
    )
    assert report.returncode == 0, report.stderr
    assert "narrowing failed" in (tmp_path / "rep" / "report.md").read_text()


def test_narrow_below_chance_is_a_verdict_not_an_index_error() -> None:
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from babysit.errors import ProtocolError
    from babysit.spec import CoarseSpec
    from babysit.stages.narrow import narrow

    dist = {
        "lr": FloatDistribution(1e-5, 1.0, log=True),
        "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    }
    trials = [
        create_trial(params={"lr": lr, "weight_decay": 1e-4}, distributions=dist, value=v)
        for lr, v in ((1e-3, 0.093), (1e-2, 0.08), (1e-1, 0.1))
    ]
    with pytest.raises(ProtocolError, match="none of the 3 complete coarse trials beat chance"):
        narrow(trials, CoarseSpec(), 5, 0.5, 0.25, chance=0.1015)


@pytest.mark.slow
def test_report_on_degenerate_runs(tmp_path: Path) -> None:
    """Runs with no finished stage, only some stages, failed trials and trials missing a
    parameter: the report is written, and `status` and `report` on an unknown or
    spec-less run are one line."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState
    from optuna.trial import create_trial

    from babysit.spec import Spec

    url = f"sqlite:///{tmp_path / 'd.db'}"
    dist = {
        "lr": FloatDistribution(1e-5, 1.0, log=True),
        "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    }

    def study(run: str, stage: str, spec: bool = True) -> optuna.Study:
        s = optuna.create_study(
            study_name=f"{run}/{stage}",
            storage=url,
            direction="minimize" if stage == "sanity" else "maximize",
        )
        if spec:
            s.set_user_attr("spec", Spec(name=run).to_dict())
        return s

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study("empty", "sanity")
    s = study("failed", "coarse")
    s.add_trial(
        create_trial(
            params={"lr": 1e-3, "weight_decay": 1e-4}, distributions=dist, state=TrialState.FAIL
        )
    )
    study("failed", "final").add_trial(
        create_trial(
            params={"lr": 1e-3, "weight_decay": 1e-4}, distributions=dist, state=TrialState.FAIL
        )
    )
    study("bare", "coarse").add_trial(
        create_trial(params={"lr": 1e-3}, distributions={"lr": dist["lr"]}, value=0.5)
    )
    study("bare", "final").add_trial(
        create_trial(params={"lr": 1e-3, "weight_decay": 1e-4}, distributions=dist, value=0.5)
    )
    study("nospec", "sanity", spec=False)
    from babysit.report.document import write_report
    from babysit.storage import open_storage

    # In this process (the report's code is the same; a subprocess each costs ~15 s here).
    storage = open_storage(url, create=False)
    for run in ("empty", "failed", "bare"):
        html, md = write_report(storage, run, tmp_path / run)
        assert html.stat().st_size > 0 and run in md.read_text()
    with pytest.raises(UsageError, match="no run named 'missing'"):
        write_report(storage, "missing", tmp_path / "missing")
    # A study without babysit's spec (made by another tool) is no run: one line, exit 2.
    proc = babysit(
        "report",
        "--name",
        "nospec",
        "--storage",
        url,
        cwd=tmp_path,
        env=cli_env(**ENV),
        timeout=120,
    )
    assert "no run named 'nospec'" in _one_line(proc)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# Trials told by hand, not by Study.optimize: Optuna warns that the heartbeat is unused.
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_final_without_any_complete_search_trial_is_a_verdict(tmp_path: Path) -> None:
    """best_params() with only failed and pruned search trials: a verdict with advice.
    (A run reaches final this way only through the library: narrowing stops it first.)"""
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from babysit.errors import ProtocolError
    from babysit.spec import Spec
    from babysit.stages.final.stage import best_params
    from babysit.stages.study import open_stage
    from babysit.storage import open_storage

    ctx = SimpleNamespace(
        spec=Spec(name="nothing"),
        storage=open_storage(f"sqlite:///{tmp_path / 'f.db'}"),
        owner=False,
    )
    for stage in ("coarse", "fine"):
        study = open_stage(ctx, stage)
        study.tell(study.ask(), state=TrialState.FAIL)
    with pytest.raises(
        ProtocolError, match="neither the fine nor the coarse search has a complete trial"
    ) as err:
        best_params(ctx)
    assert "coarse.lr" in str(err.value) and "\n" not in str(err.value)
