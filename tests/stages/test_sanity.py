"""Sanity tells the truth: babysit's own network passes it on any data and any seed (no
false alarms), and a user's network with a planted defect is caught before any training,
with the cause named. Also `babysit check`, and the small input fixes that came with it."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

from babysit.data import DataError
from babysit.data import DataRequest
from babysit.data.user import load_user_dataset
from babysit.protocol.prepare import prepare
from babysit.spec import DataSpec
from babysit.spec import build_spec
from babysit.stages.context import fresh_model
from babysit.stages.context import seed_for
from babysit.stages.sanity import _sanity_verdict
from babysit.stages.sanity import read_untrained
from babysit.stages.sanity import sanity
from babysit.storage import open_storage
from babysit.training.models import HEAD_LOGIT_STD
from babysit.training.models import AlexNet
from babysit.training.models import calibrate_head
from babysit.training.models import fit_head_to_data
from babysit.training.models import logit_spread
from babysit.training.step import expected_initial_loss
from tests.conftest import ROOT
from tests.conftest import babysit
from tests.conftest import cli_env

SEEDS = range(5)

# Photo-like images at full pixel scale: strong stripes of a class-dependent frequency and
# angle over the whole 0..255 range, per-image phase and colour, light noise. The LFW faces
# and photos are where the fixed N(0, 0.01) head gave logits of std 0.4-1.3.
PHOTOS = """
import torch


def _part(n, seed, classes, size=32):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    freq = 1 + (y % 5).float() + torch.rand(n, generator=g)
    slope = (y // 5).float() + 0.3
    phase = torch.rand(n, 3, 1, 1, generator=g) * 6.28
    wave = torch.sin((xx + yy * slope[:, None, None, None]) * freq[:, None, None, None] * 0.3
                     + phase)
    img = 127.5 + 110 * wave + 30 * (torch.rand(n, 3, size, size, generator=g) - 0.5)
    return img.clamp(0, 255).to(torch.uint8), y


def photos2():
    return {"classes": ["a", "b"], "train": _part(256, 0, 2), "val": _part(64, 1, 2),
            "test": _part(64, 2, 2)}


def photos10():
    return {"classes": [str(i) for i in range(10)], "train": _part(256, 0, 10),
            "val": _part(64, 1, 10), "test": _part(64, 2, 10)}


def unnamed():
    x, y = _part(96, 3, 4)
    return {"train": (x[:64], y[:64]), "val": (x[64:80], y[64:80]),
            "test": (x[80:], y[80:])}


# Easy 12x12 grey sets for a plain MLP (144 inputs): a bright 4x4 square in one of four
# corners on black, light noise. corners_skewed has the class shares 85/5/5/5; leaky also
# marks the label in the top row (pixel k of row 0 bright for class k).
def _corners(n, seed, shares, leak=False, size=12):
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor(shares), n, replacement=True, generator=g)
    img = 10 * torch.rand(n, 1, size, size, generator=g)
    for k, (r, c) in enumerate([(1, 1), (1, 7), (7, 1), (7, 7)]):
        img[y == k, :, r:r + 4, c:c + 4] += 230
    if leak:
        img[torch.arange(n), 0, 0, y] = 255
    return img.clamp(0, 255).to(torch.uint8), y


def _corner_splits(shares, leak=False):
    return {"classes": ["nw", "ne", "sw", "se"], "train": _corners(512, 0, shares, leak),
            "val": _corners(64, 1, shares, leak), "test": _corners(64, 2, shares, leak)}


def corners():
    return _corner_splits([0.25] * 4)


def corners_skewed():
    return _corner_splits([0.85, 0.05, 0.05, 0.05])


def leaky():
    return _corner_splits([0.25] * 4, leak=True)
"""

# The user's own networks, each with one planted defect (and healthy ones).
USER_MODELS = '''
import torch
from torch import nn


def _features(in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten())


def healthy(num_classes, in_channels, image_size):
    head = nn.Linear(32, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return nn.Sequential(_features(in_channels), head)


def loud(num_classes, in_channels, image_size):
    """PyTorch's default init for the head, then scaled x50."""
    head = nn.Linear(32, num_classes)
    with torch.no_grad():
        head.weight.mul_(50.0)
        head.bias.mul_(50.0)
    return nn.Sequential(_features(in_channels), head)


def too_many(num_classes, in_channels, image_size):
    return nn.Sequential(_features(in_channels), nn.Linear(32, num_classes + 5))


class LogOfNegative(nn.Module):
    """log of a ReLU's negation: NaN wherever a feature fires, -inf elsewhere."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.body = nn.Sequential(_features(in_channels), nn.Linear(32, num_classes))

    def forward(self, x):
        return torch.log(-torch.relu(self.body(x)) - 1e-3)


def nan(num_classes, in_channels, image_size):
    return LogOfNegative(num_classes, in_channels)


def mlp(num_classes, in_channels, image_size):
    """A plain MLP with PyTorch's default init (healthy)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, 64), nn.ReLU(),
                         nn.Linear(64, num_classes))


def softmax(num_classes, in_channels, image_size):
    """The plain MLP with a softmax at the end: probabilities, not logits."""
    return nn.Sequential(mlp(num_classes, in_channels, image_size), nn.Softmax(dim=1))


class ReadsLabel(nn.Module):
    """A small linear head, plus the label read off the top row (truthphotos:leaky marks
    it there): logits about sign * 0.65 * one-hot(label)."""

    def __init__(self, num_classes, in_channels, image_size, sign):
        super().__init__()
        self.head = nn.Linear(in_channels * image_size**2, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.num_classes, self.sign = num_classes, sign

    def forward(self, x):
        return self.head(x.flatten(1)) + self.sign * 0.2 * x[:, 0, 0, : self.num_classes]


def reads_label(num_classes, in_channels, image_size):
    return ReadsLabel(num_classes, in_channels, image_size, 1.0)


def reads_label_negated(num_classes, in_channels, image_size):
    return ReadsLabel(num_classes, in_channels, image_size, -1.0)
'''


def _photo_module(tmp: Path) -> None:
    (tmp / "truthphotos.py").write_text(PHOTOS)
    (tmp / "usernets.py").write_text(USER_MODELS)
    if str(tmp) not in sys.path:
        sys.path.insert(0, str(tmp))


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory):
    """One loaded dataset per name, shared by every seed (loading is the slow part)."""
    tmp = tmp_path_factory.mktemp("sanity")
    _photo_module(tmp)
    made: dict[tuple[str, str], object] = {}

    def get(dataset: str, model: str = "alexnet"):  # noqa: ANN202
        if (dataset, model) not in made:
            spec = build_spec(None, [], {"dataset": dataset, "model": model, "name": "base"})
            db = f"{dataset}-{model}".replace(":", "-")
            storage = open_storage(f"sqlite:///{tmp / (db + '.db')}")
            made[dataset, model] = prepare(spec, storage, device="cpu", quiet=True)
        return made[dataset, model]

    return get


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "dataset", ["digits", "faces", "truthphotos:photos2", "truthphotos:photos10"]
)
def test_babysits_own_model_passes_sanity_on_any_data_and_seed(
    contexts, dataset: str, seed: int
) -> None:
    base = contexts(dataset)
    # The default network (4096-wide AlexNet, He init) as the sanity stage builds it for
    # this seed, read and judged by the stage's own functions; one batch instead of four
    # (the 4096-wide head on 512 images takes seconds on a loaded 2-core machine).
    spec = dataclasses.replace(
        base.spec, seed=seed, sanity=dataclasses.replace(base.spec.sanity, batches=1)
    )
    ctx = dataclasses.replace(base, spec=spec)
    r = read_untrained(ctx, fresh_model(ctx, seed_for(spec, "sanity", 0)))
    expected = math.log(ctx.data.num_classes)
    status, verdict = _sanity_verdict(
        r["initial_loss"],
        expected,
        r["loss_with_reg"],
        spec.sanity.tolerance,
        spec.loss,
        ctx.data.num_classes,
        r,
        r["l2"],
    )
    assert status == "passed", verdict
    # ln C up to a few hundredths, whatever the pixel scale.
    assert abs(r["initial_loss"] - expected) < 0.03, verdict
    assert r["logit_std"] < 2 * HEAD_LOGIT_STD
    assert 0 < r["top_class_share"] <= 1


def test_the_sanity_stage_stores_its_readings(contexts) -> None:
    base = contexts("faces")
    ctx = dataclasses.replace(base, spec=dataclasses.replace(base.spec, name="stored"))
    result = sanity(ctx)
    assert result.status == "passed", result.verdict
    import optuna

    attrs = (
        optuna.load_study(study_name="stored/sanity", storage=ctx.storage.rdb).trials[0].user_attrs
    )
    for key in (
        "initial_loss",
        "expected_loss",
        "loss_with_reg",
        "status",
        "verdict",
        "logit_std",
        "top_class_share",
        "independent_loss",
        "aligned_loss",
        "opposed_loss",
        "true_class_first",
        "true_class_last",
        "probability_rows",
    ):
        assert key in attrs, key
    assert attrs["logit_std"] == result.values["logit_std"] < 2 * HEAD_LOGIT_STD
    assert attrs["tolerance_unit"] == "nats"
    assert attrs["probability_rows"] == 0.0
    # The loss lies between the logits' own bounds, and above ln C + their spread's cost
    # only by how they line up with the labels.
    assert attrs["aligned_loss"] <= attrs["initial_loss"] <= attrs["opposed_loss"]
    assert attrs["expected_loss"] <= attrs["independent_loss"]


def _seeded(base, seed: int, **changes):  # noqa: ANN001, ANN202
    return dataclasses.replace(base, spec=dataclasses.replace(base.spec, seed=seed, **changes))


def _judge(ctx) -> tuple[dict, str, str]:  # noqa: ANN001
    """The sanity stage's own reading and verdict of the network it builds for ctx's seed."""
    spec, classes = ctx.spec, ctx.data.num_classes
    r = read_untrained(ctx, fresh_model(ctx, seed_for(spec, "sanity", 0)))
    status, verdict = _sanity_verdict(
        r["initial_loss"],
        expected_initial_loss(spec.loss, classes),
        r["loss_with_reg"],
        spec.sanity.tolerance,
        spec.loss,
        classes,
        r,
        r["l2"],
    )
    return r, status, verdict


MLP_SEEDS = range(10)


@pytest.mark.parametrize("seed", MLP_SEEDS)
@pytest.mark.parametrize("dataset", ["truthphotos:corners", "truthphotos:corners_skewed"])
def test_a_plain_mlp_passes_sanity_on_easy_data_for_every_seed(
    contexts, dataset: str, seed: int
) -> None:
    """Issue 20: Flatten -> Linear(144, 64) -> ReLU -> Linear(64, 4), PyTorch's default
    init, on easy 4-class 12x12 images. A random network's small logits line up with the
    classes because the inputs (and the class shares) do; that is no defect. On
    corners_skewed (shares 85/5/5/5) 4 of these 10 seeds start more than 0.25 nats off
    ln 4 = 1.386 (seeds 1, 3, 4: 1.67, 1.71, 1.66, the issue's "higher than chance"; seed
    6: 1.10), all with logit std 0.25-0.36, and the old rule failed all four; on the
    balanced corners none does (test_the_mlp_seeds_include_ones_the_old_rule_failed)."""
    ctx = _seeded(contexts(dataset, "usernets:mlp"), seed)
    r, status, verdict = _judge(ctx)
    assert status == "passed", verdict
    assert len(verdict) < 150, verdict
    # The loss is explained by the logits: between the bounds they allow, and the true class
    # ranked first (or last) for only part of each class's samples.
    assert r["aligned_loss"] <= r["initial_loss"] <= r["opposed_loss"]
    assert max(r["true_class_first"], r["true_class_last"]) < 0.95
    off = abs(r["initial_loss"] - math.log(4)) > ctx.spec.sanity.tolerance
    assert ("line up with the classes by chance" in verdict) == off, verdict


def test_the_mlp_seeds_include_ones_the_old_rule_failed(contexts) -> None:
    """What makes the test above worth having: seeds that the rule before issue 20 (loss
    within 0.25 nats of ln C, whatever the logits) failed, on both sides of ln 4."""
    offs = {}
    for dataset in ("truthphotos:corners", "truthphotos:corners_skewed"):
        base = contexts(dataset, "usernets:mlp")
        for seed in MLP_SEEDS:
            r, _, _ = _judge(_seeded(base, seed))
            assert r["logit_std"] <= 0.71  # small logits: the old rule blamed the labels
            offs[dataset, seed] = r["initial_loss"] - math.log(4)
    old_failed = sorted(k for k, v in offs.items() if abs(v) > 0.25)
    assert len(old_failed) >= 3, offs
    assert any(offs[k] > 0.25 for k in old_failed) and any(offs[k] < -0.25 for k in old_failed)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "model, dataset, cause",
    [
        ("usernets:loud", "truthphotos:corners", "logits too large"),
        ("usernets:nan", "truthphotos:corners", "outputs are NaN/inf on the first batch"),
        ("usernets:softmax", "truthphotos:corners", "outputs are probabilities, not logits"),
        (
            "usernets:reads_label",
            "truthphotos:leaky",
            "ranks the true class first for 100% of each class's samples",
        ),
        (
            "usernets:reads_label_negated",
            "truthphotos:leaky",
            "ranks the true class last for 100% of each class's samples",
        ),
    ],
)
def test_planted_defects_still_fail_sanity_with_the_cause_named(
    contexts, model: str, dataset: str, cause: str, seed: int
) -> None:
    """The head x50, NaN outputs, a softmax inside the network, and a network that reads the
    label off the image (either sign): each fails, naming its cause, before any training."""
    r, status, verdict = _judge(_seeded(contexts(dataset, model), seed))
    assert status == "failed", verdict
    assert cause in verdict, verdict


def test_one_hot_bce_keeps_its_rule_and_still_catches_probabilities(contexts) -> None:
    """One-hot BCE reads each output on its own (a shared shift moves its loss), so the
    bounds by alignment are CE's only: under BCE they are not stored, the plain MLP passes,
    and a softmax inside the network still fails."""
    for seed in range(3):
        ctx = _seeded(contexts("truthphotos:corners_skewed", "usernets:mlp"), seed, loss="bce")
        r, status, verdict = _judge(ctx)
        assert status == "passed", verdict
        assert "independent_loss" not in r and "aligned_loss" not in r
        assert 0 <= r["true_class_first"] <= 1
    ctx = _seeded(contexts("truthphotos:corners", "usernets:softmax"), 0, loss="bce")
    _, status, verdict = _judge(ctx)
    assert status == "failed" and "outputs are probabilities" in verdict, verdict


def test_the_head_scale_follows_the_data_not_a_constant() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 3, 16, 16)
    for scale in (1.0, 30.0):
        model = AlexNet(10, fc_width=256, init="he")
        before = logit_spread(model.eval()(scale * x).detach())
        factor = calibrate_head(model, scale * x)
        after = logit_spread(model.eval()(scale * x).detach())
        assert after == pytest.approx(min(before, HEAD_LOGIT_STD), rel=1e-3)
        assert factor == pytest.approx(min(1.0, HEAD_LOGIT_STD / before), rel=1e-3)
    # BatchNorm's running statistics are as built: the measurement leaves no trace.
    model = AlexNet(10, fc_width=64, batch_norm="all", init="he")
    calibrate_head(model, 30 * x)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.all(bn.running_mean == 0) and int(bn.num_batches_tracked) == 0
    assert logit_spread(model.train()(30 * x).detach()) <= HEAD_LOGIT_STD * 1.001


def test_only_babysits_own_model_is_rescaled_and_the_same_seed_gives_the_same_model(
    contexts,
) -> None:
    ctx = contexts("faces")
    one, two = fresh_model(ctx, 7), fresh_model(ctx, 7)
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # A user's network is diagnosed, never re-initialised, even when it is babysit's class.
    torch.manual_seed(0)
    user = AlexNet(2, in_channels=ctx.data.in_channels, fc_width=64, init="he")
    with torch.no_grad():
        user.classifier[-1].weight.mul_(1000.0)  # logits far too large: babysit's would shrink
    head = user.classifier[-1].weight.clone()
    fit_head_to_data(user, "mynets:build", ctx.data)
    assert torch.equal(user.classifier[-1].weight, head)
    fit_head_to_data(user, "alexnet", ctx.data)
    assert not torch.equal(user.classifier[-1].weight, head)


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def _check(tmp_path: Path, model: str, *extra: str):  # noqa: ANN202
    return babysit(
        "check",
        "--model",
        model,
        "--summary-json",
        str(tmp_path / "s.json"),
        "--set",
        "overfit.steps=40",
        "--quiet",
        *extra,
        cwd=tmp_path,
        env=cli_env(OMP_NUM_THREADS="1"),
        timeout=240,
    )


@pytest.fixture
def user_models(tmp_path: Path) -> Path:
    (tmp_path / "usernets.py").write_text(USER_MODELS)
    return tmp_path


@pytest.mark.slow
def test_last_layer_scaled_50x_fails_sanity_and_says_so(user_models: Path) -> None:
    proc = _check(user_models, "usernets:loud")
    assert proc.returncode == 1, proc.stderr
    assert "sanity failed: logits too large" in proc.stderr
    assert "scale the last layer's init down" in proc.stderr
    assert "Traceback" not in proc.stderr
    s = _summary(user_models / "s.json")
    assert s["stages"]["sanity"]["status"] == "failed"
    assert s["stages"]["sanity"]["logit_std"] > 5
    assert s["stages"]["overfit"]["status"] == "skipped"  # caught before any training


@pytest.mark.slow
def test_nan_outputs_fail_sanity_and_say_so(user_models: Path) -> None:
    proc = _check(user_models, "usernets:nan")
    assert proc.returncode == 1, proc.stderr
    assert "sanity failed: outputs are NaN/inf on the first batch" in proc.stderr
    assert _summary(user_models / "s.json")["stages"]["overfit"]["status"] == "skipped"


@pytest.mark.slow
def test_more_outputs_than_classes_is_refused_and_leaves_no_database(user_models: Path) -> None:
    proc = _check(user_models, "usernets:too_many")
    assert proc.returncode == 2, proc.stderr
    assert "returns 15 outputs but the data has 10 classes" in proc.stderr
    assert not (user_models / "babysit.db").exists()


@pytest.mark.slow
def test_a_healthy_user_model_is_not_touched_and_passes(user_models: Path) -> None:
    proc = _check(
        user_models,
        "usernets:healthy",
        "--set",
        "overfit.lrs={adam=[1e-2]}",
        "--set",
        "overfit.steps=150",
    )
    assert proc.returncode == 0, proc.stderr
    assert "sanity passed" in proc.stderr and "check passed" in proc.stderr


def test_penalty_that_reaches_no_parameter_fails() -> None:
    from babysit.stages.sanity import sanity_readings

    logits = torch.zeros(8, 3)
    status, verdict = _sanity_verdict(
        math.log(3),
        math.log(3),
        math.log(3),
        0.25,
        "ce",
        3,
        sanity_readings(logits, logits, "ce", torch.arange(8) % 3),
        0.0,
    )
    assert status == "failed"
    assert "the penalty does not raise the loss: no parameter reaches it" in verdict


@pytest.mark.parametrize("classes", [2, 1000])
def test_the_tolerance_means_the_same_for_2_classes_as_for_1000(classes: int) -> None:
    from babysit.stages.sanity import sanity_readings

    torch.manual_seed(0)
    expected = math.log(classes)
    for std, ok in ((0.5, "passed"), (1.0, "failed")):
        logits = std * torch.randn(256, classes)
        y = torch.randint(0, classes, (256,))
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        status, verdict = _sanity_verdict(
            loss,
            expected,
            loss + 1,
            0.25,
            "ce",
            classes,
            sanity_readings(logits, logits, "ce", y),
            1.0,
        )
        assert status == ok, verdict


def test_a_mapping_without_classes_takes_them_from_the_labels(
    tmp_path: Path, capsys, monkeypatch
) -> None:  # noqa: ANN001
    _photo_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    request = DataRequest(tmp_path, 0, False, DataSpec())
    splits = load_user_dataset("truthphotos:unnamed", request)
    labels = torch.cat([splits.train_y, splits.val_y, splits.test_y])
    assert splits.classes == [str(i) for i in range(int(labels.max()) + 1)]
    err = capsys.readouterr().err
    assert f"the labels define {len(splits.classes)} classes" in err
    (tmp_path / "nolabels.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def load():\n"
        "    d = TensorDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4))\n"
        "    return {'train': d, 'val': d, 'test': d}\n"
    )
    with pytest.raises(DataError, match="add 'classes'"):
        load_user_dataset("nolabels:load", request)


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--dataset", "nosuch"],
        ["check", "--dataset", "nosuch"],
        ["run", "--set", "coarse.trials=many"],
        ["run", "--model", "nosuchmodule:build"],
    ],
)
@pytest.mark.slow
def test_a_rejected_command_leaves_no_database(tmp_path: Path, args: list[str]) -> None:
    proc = babysit(*args, "--quiet", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert list(tmp_path.iterdir()) == [], proc.stderr


# Budgets for tinynet on 60 shapes: the whole protocol in seconds.
SHAPES = [
    "--model",
    "tinynet:build",
    "--dataset",
    "imagefolder",
    "--data-dir",
    "shapes",
    "--set",
    "data.patch_size=16",
    "--set",
    "batch_size=16",
    "--set",
    "overfit.lrs={adam=[3e-3,1e-2]}",
    "--set",
    "overfit.steps=150",
    "--set",
    "coarse.trials=2",
    "--set",
    "coarse.epochs=1",
    "--set",
    "coarse.lr=[1e-3,1e-2]",
    "--set",
    "coarse.extend=false",
    "--set",
    "fine.trials=1",
    "--set",
    "fine.epochs=1",
    "--set",
    "final.epochs=1",
    "--quiet",
]


@pytest.mark.slow
def test_check_on_the_examples_then_run_goes_on_from_there(tmp_path: Path) -> None:
    import subprocess

    for name in ("tinynet.py", "make_shapes.py"):
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    subprocess.run(
        [sys.executable, "make_shapes.py", "shapes", "--per-class", "20", "--size", "16"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    env = cli_env(OMP_NUM_THREADS="1")
    check = babysit(
        "check", "--name", "shapes", *SHAPES, "--summary-json", "c.json", cwd=tmp_path, env=env
    )
    assert check.returncode == 0, check.stderr
    assert "sanity passed" in check.stderr and "overfit passed" in check.stderr
    s = _summary(tmp_path / "c.json")
    assert s["stages"]["sanity"]["status"] == "passed"
    assert s["stages"]["overfit"]["status"] == "passed"
    assert s["stages"]["coarse"]["status"] == "skipped"

    db = tmp_path / "babysit.db"

    def trials(study: str) -> list[tuple[int, str]]:
        with sqlite3.connect(db) as conn:
            return conn.execute(
                "SELECT t.trial_id, t.state FROM trials t JOIN studies s USING (study_id) "
                "WHERE s.study_name = ? ORDER BY t.trial_id",
                (study,),
            ).fetchall()

    before = {stage: trials(f"shapes/{stage}") for stage in ("sanity", "overfit")}
    assert before["sanity"] and before["overfit"]

    # A refused command on the same storage leaves what is stored alone.
    assert (
        babysit(
            "check", "--name", "other", "--dataset", "nosuch", cwd=tmp_path, env=env
        ).returncode
        == 2
    )
    assert db.exists()

    run = babysit(
        "run", "--name", "shapes", *SHAPES, "--summary-json", "r.json", cwd=tmp_path, env=env
    )
    assert run.returncode == 0, run.stderr
    # The checks were not run again: the same trials, and the run carried on to the end.
    assert {stage: trials(f"shapes/{stage}") for stage in ("sanity", "overfit")} == before
    r = _summary(tmp_path / "r.json")
    assert r["stages"]["coarse"]["trials"] == 2
    assert r["stages"]["final"]["status"] == "passed"
