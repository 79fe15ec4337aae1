from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from babysit.errors import UsageError
from babysit.protocol.prepare import prepare
from babysit.spec import ModelSpec
from babysit.spec import build_spec
from babysit.stages.sanity import sanity
from babysit.storage import open_storage
from babysit.training.models import AlexNet
from babysit.training.models import build_model
from babysit.training.models import input_size
from babysit.training.step import loss_fn


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202
    # Two cores shared by several test runs: one thread per process beats two that fight.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("side", [8, 25, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_alexnet_accepts_sizes_and_channels(side: int, channels: int) -> None:
    model = AlexNet(10, in_channels=channels, fc_width=64)
    out = model(torch.randn(2, channels, side, side))
    assert out.shape == (2, 10)


def test_seed_geometry_flattens_256x2x2_at_32() -> None:
    model = AlexNet(10, fc_width=64)
    feats = model.features(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 256, 2, 2)
    assert model.classifier[1].in_features == 256 * 2 * 2


def test_he_init_starts_near_chance() -> None:
    torch.manual_seed(0)
    model = AlexNet(10, in_channels=1, init="he").eval()
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    loss = F.cross_entropy(model(x), y).item()
    assert abs(loss - math.log(10)) < 0.1


# ---------------------------------------------------------------------------- seed 000's knobs

KNOBS = [
    {},
    {"conv_layers": 3},
    {"conv_layers": 4},
    {"fc_layers": 1},
    {"fc_layers": 2},
    {"activation": "leaky_relu"},
    {"batch_norm": "first2"},
    {"batch_norm": "all"},
    {"dropout": 0.0},
    {"init": "he"},
    {"init": "default"},
    {"fc_width": 32},
]


def _one_step(model: torch.nn.Module, x: torch.Tensor, loss: str) -> float:
    """One Adam step; returns the loss and checks every trainable weight moved."""
    y = torch.arange(x.shape[0]) % 10
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    value = loss_fn(loss, model(x), y)
    value.backward()
    opt.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(moved), "some parameter got no update"
    return float(value.detach())


def _structure(model: AlexNet) -> dict[str, object]:
    mods = list(model.modules())
    return {
        "convs": [m.out_channels for m in mods if isinstance(m, nn.Conv2d)],
        "fcs": [m.out_features for m in mods if isinstance(m, nn.Linear)],
        "bn": sum(isinstance(m, nn.BatchNorm2d) for m in mods),
        "leaky": sum(isinstance(m, nn.LeakyReLU) for m in mods),
        "relu": sum(type(m) is nn.ReLU for m in mods),
        "dropout": [m.p for m in mods if isinstance(m, nn.Dropout)],
    }


@pytest.mark.parametrize("side", [8, 32])
@pytest.mark.parametrize(
    "knob", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults"
)
def test_each_knob_builds_and_trains_one_step(knob: dict, side: int) -> None:
    torch.manual_seed(0)
    channels = 1 if side == 8 else 3
    kwargs = {"fc_width": 64, **knob}
    model = AlexNet(10, in_channels=channels, **kwargs)
    s = _structure(model)
    conv_layers = kwargs.get("conv_layers", 5)
    fc_layers = kwargs.get("fc_layers", 3)
    assert s["convs"] == [64, 192, 384, 256, 256][: conv_layers - 1] + [
        {3: 384, 4: 256, 5: 256}[conv_layers]
    ]
    assert s["fcs"] == [kwargs["fc_width"]] * (fc_layers - 1) + [10]
    assert (
        s["bn"] == {"none": 0, "first2": 2, "all": conv_layers}[kwargs.get("batch_norm", "none")]
    )
    activations = conv_layers + fc_layers - 1
    if kwargs.get("activation") == "leaky_relu":
        assert (s["leaky"], s["relu"]) == (activations, 0)
    else:
        assert (s["leaky"], s["relu"]) == (0, activations)
    assert s["dropout"] == ([0.5] * (fc_layers - 1) if kwargs.get("dropout", 0.5) else [])
    for loss in ("ce", "bce"):
        value = _one_step(model, torch.randn(4, channels, side, side), loss)
        assert math.isfinite(value)


def test_he_init_draws_from_kaiming_and_keeps_the_last_layer_small() -> None:
    torch.manual_seed(0)
    he = AlexNet(10, init="he", fc_width=512)
    conv2 = he.features[3]
    assert conv2.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert he.classifier[-1].weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert all(
        float(m.bias.detach().abs().max()) == 0.0
        for m in he.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    default = AlexNet(10, init="default", fc_width=512)
    assert default.features[3].weight.std().item() < 0.5 * conv2.weight.std().item()


@pytest.mark.parametrize(
    ("conv_layers", "plan"),
    [(5, [96, 256, 384, 384, 256]), (4, [96, 256, 384, 256]), (3, [96, 256, 384])],
)
def test_alexnet227_is_the_papers_network(conv_layers: int, plan: list[int]) -> None:
    model = AlexNet(10, conv_layers=conv_layers, geometry="alexnet227", fc_width=64)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == plan
    assert convs[0].kernel_size == (11, 11) and convs[0].stride == (4, 4)
    assert convs[1].kernel_size == (5, 5)
    assert model.classifier[1].in_features == plan[-1] * 6 * 6


@pytest.mark.parametrize(
    "knob",
    [{"batch_norm": "first2"}, {"conv_layers": 3, "fc_layers": 1, "activation": "leaky_relu"}],
)
def test_alexnet227_trains_one_step_at_227(knob: dict) -> None:
    torch.manual_seed(0)
    model = AlexNet(10, geometry="alexnet227", fc_width=64, **knob)
    assert model.features(torch.randn(1, 3, 227, 227)).shape[-2:] == (6, 6)
    assert math.isfinite(_one_step(model, torch.randn(2, 3, 227, 227), "bce"))


def test_bad_knobs_are_rejected() -> None:
    with pytest.raises(ValueError, match="conv_layers"):
        AlexNet(10, conv_layers=2)
    with pytest.raises(ValueError, match="activation"):
        AlexNet(10, activation="gelu")
    spec = ModelSpec(name="alexnet", geometry="alexnet227")
    with pytest.raises(UsageError, match="at least 63 px"):
        build_model(spec, 10, 3, 32)
    assert build_model(spec, 10, 3, 63)(torch.randn(1, 3, 63, 63)).shape == (1, 10)
    assert input_size(spec, 32, 0) == 227


@pytest.mark.parametrize(("loss", "expected"), [("bce", math.log(2)), ("ce", math.log(10))])
def test_sanity_expects_the_loss_functions_chance_level(
    tmp_path: Path, loss: str, expected: float
) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'b.db'}", tmp_path / "art")
    spec = build_spec(None, [f"loss={loss}", "model.fc_width=128", "name=s"])
    ctx = prepare(spec, storage, device="cpu", quiet=True)
    result = sanity(ctx)
    assert result.values["expected_loss"] == pytest.approx(expected)
    assert result.status == "passed", result.verdict
    assert abs(result.values["initial_loss"] - expected) < 0.05 * expected
