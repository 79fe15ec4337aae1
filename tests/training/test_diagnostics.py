"""Each reading fires on a case built to trigger it and stays silent on a healthy run."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import optuna
import pytest
import torch

from babysit.data.device import DeviceData
from babysit.protocol.prepare import prepare
from babysit.record.artifacts import trial_data
from babysit.record.stored import narrowing_warnings
from babysit.record.stored import trial_readings
from babysit.report.plots import first_layer_filters
from babysit.report.plots import lr_range_figure
from babysit.report.plots import png
from babysit.spec import build_spec
from babysit.stages.final.stage import final
from babysit.stages.lr_range import lr_range_test
from babysit.stages.lr_range import propose_coarse_lr
from babysit.stages.search import search
from babysit.storage import open_storage
from babysit.training.diagnostics import DEAD_FRACTION
from babysit.training.diagnostics import Monitor
from babysit.training.diagnostics import readings
from babysit.training.diagnostics import record_diagnostics
from babysit.training.models import AlexNet
from babysit.training.step import fit
from babysit.training.step import make_optimizer

PNG = b"\x89PNG\r\n\x1a\n"
# A small AlexNet that learns digits within a few epochs: three convs, a 64-wide head.
SMALL = ["model.conv_layers=3", "model.fc_layers=2", "model.fc_width=64"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # noqa: ANN202
    # Two cores shared by several test runs: one thread per process beats two that fight.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("diag")
    storage = open_storage(f"sqlite:///{tmp / 'b.db'}", tmp / "art")
    spec = build_spec(
        None,
        [
            *SMALL,
            "name=diag",
            "batch_size=64",
            "coarse.trials=1",
            "coarse.epochs=1",
            "final.epochs=1",
        ],
    )
    return prepare(spec, storage, device="cpu", quiet=True)


def _model(dropout: float = 0.5) -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(
        10, in_channels=1, conv_layers=3, fc_layers=2, fc_width=64, init="he", dropout=dropout
    )


def _subset(data: DeviceData, n: int) -> DeviceData:
    return replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])


def _train(
    model: torch.nn.Module, data: DeviceData, lr: float, epochs: int, batch_size: int = 64
) -> tuple[Monitor, dict[str, list[float]]]:
    opt = make_optimizer("adam", model.parameters(), lr, 0.0)
    monitor = Monitor(model)
    curves: dict[str, list[float]] = {
        k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc")
    }

    def on_epoch(stats) -> None:  # noqa: ANN001
        for k in curves:
            curves[k].append(getattr(stats, k))
        monitor.close_epoch(stats.epoch)

    fit(
        model,
        opt,
        data,
        epochs=epochs,
        batch_size=batch_size,
        loss="ce",
        generator=torch.Generator().manual_seed(0),
        stop_on_divergence=False,
        on_epoch=on_epoch,
        monitor=monitor,
    )
    monitor.finish(len(curves["train_loss"]) + 1)
    return monitor, curves


def test_healthy_run_is_silent_and_records_every_layer(ctx) -> None:  # noqa: ANN001
    model = _model()
    monitor, curves = _train(model, ctx.data, lr=1e-3, epochs=3)
    assert curves["val_acc"][-1] > 0.7  # it did learn
    assert readings(monitor.epochs, curves) == []
    assert [e["epoch"] for e in monitor.epochs] == [1, 2, 3]
    # ~20 steps an epoch: step 1, every 20th, and each epoch's first step are sampled.
    assert monitor.epochs[0]["steps"][:2] == [1, 20]
    assert monitor.epochs[1]["steps"][0] == 21
    layers = monitor.epochs[-1]["layers"]
    assert set(layers) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    for name in ("conv1", "conv2", "conv3", "fc1"):
        entry = layers[name]
        assert 1e-5 < entry["update_ratio"] < 1e-1
        assert entry["grad_norm"] > 0
        assert 0.0 <= entry["dead"] < DEAD_FRACTION
        assert entry["act_mean"] > 0 and entry["act_std"] > 0
    assert "dead" not in layers["fc2"]  # the classifier has no ReLU
    # Hooks come off once training is over.
    assert all(not m._forward_hooks for m in model.modules())


def test_update_ratio_is_the_actual_step_over_the_weights(ctx) -> None:  # noqa: ANN001
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    monitor = Monitor(model)
    x = ctx.data.pre(ctx.data.train_x[:32], train=False)
    loss = torch.nn.functional.cross_entropy(model(x), ctx.data.train_y[:32])
    loss.backward()
    conv1 = model.features[0].weight
    expected = 0.1 * conv1.grad.norm().item() / conv1.detach().norm().item()
    monitor(1, model, opt, loss)
    opt.step()
    record = monitor.close_epoch(1)
    assert record["layers"]["conv1"]["update_ratio"] == pytest.approx(expected, rel=1e-4)
    assert record["loss"] == [pytest.approx(loss.item())]


def test_huge_lr_reads_as_update_ratio_too_high(ctx) -> None:  # noqa: ANN001
    monitor, curves = _train(_model(), _subset(ctx.data, 128), lr=1.0, epochs=1)
    found = [r for r in readings(monitor.epochs, curves) if r.startswith("LR too high")]
    assert found and "update ratio" in found[0], readings(monitor.epochs, curves)
    worst = max(monitor.epochs[-1]["layers"].values(), key=lambda v: v["update_ratio"])
    assert worst["update_ratio"] > 0.1


def test_negative_bias_reads_as_dead_units(ctx) -> None:  # noqa: ANN001
    model = _model()
    with torch.no_grad():
        model.features[6].bias.fill_(-100.0)  # conv3: no input can lift it above zero
    monitor, curves = _train(model, _subset(ctx.data, 128), lr=1e-4, epochs=1)
    assert monitor.epochs[-1]["layers"]["conv3"]["dead"] == 1.0
    assert "dead units: 100 % of conv3 never fire" in readings(monitor.epochs, curves)


def test_tiny_lr_reads_as_flat_loss(ctx) -> None:  # noqa: ANN001
    monitor, curves = _train(_model(), _subset(ctx.data, 256), lr=1e-9, epochs=1)
    found = [r for r in readings(monitor.epochs, curves) if r.startswith("LR too low")]
    assert found == [
        f"LR too low: loss moved less than 1 % in 4 steps "
        f"({monitor.epochs[0]['loss'][0]:.3f} -> {curves['train_loss'][-1]:.3f})"
    ]


def test_memorising_a_tiny_train_set_reads_as_overfitting(ctx) -> None:  # noqa: ANN001
    monitor, curves = _train(
        _model(dropout=0.0), _subset(ctx.data, 32), lr=3e-3, epochs=40, batch_size=32
    )
    assert curves["train_acc"][-1] == 1.0
    gap = round(100 * (curves["train_acc"][-1] - curves["val_acc"][-1]))
    assert gap > 15
    assert f"overfitting: train/val gap {gap} points after epoch 40" in readings(
        monitor.epochs, curves
    )


def test_nan_loss_and_edge_warnings_pass_through() -> None:
    diagnostics = [
        {"epoch": 1, "steps": [1, 20], "loss": [2.3, None], "last_step": 25, "layers": {}}
    ]
    edge = "best lr 0.9 sits at the upper edge of the coarse range [1e-05, 1]: widen coarse.lr"
    out = readings(diagnostics, {}, warnings=[edge])
    assert out == ["LR too high: the loss was NaN/inf by step 20", edge]


def test_stages_store_diagnostics_readings_and_filters(ctx) -> None:  # noqa: ANN001
    result = search(
        ctx,
        "coarse",
        ctx.spec.coarse,
        {"lr": [1e-3, 1e-3], "weight_decay": [1e-6, 1e-6]},
        initial_loss=math.log(10),
    )
    assert result.status == "passed"
    study = optuna.load_study(study_name="diag/coarse", storage=ctx.storage.rdb)
    trial = trial_data(ctx.storage, study.trials[0])  # JSON artifacts, named by "data"
    assert [d["epoch"] for d in trial.diagnostics] == [1]
    assert "conv1" in trial.diagnostics[0]["layers"]
    assert isinstance(trial.readings, list)

    done = final(ctx, params={"lr": 1e-3, "weight_decay": 1e-6})
    assert done.status == "passed"
    study = optuna.load_study(study_name="diag/final", storage=ctx.storage.rdb)
    t = study.trials[0]
    assert t.params == {"lr": pytest.approx(1e-3), "weight_decay": pytest.approx(1e-6)}
    assert len(trial_data(ctx.storage, t).diagnostics) == 1
    with ctx.storage.artifacts.open_reader(t.user_attrs["filters_artifact"]) as fh:
        assert fh.read(8) == PNG
    # The report's view: every trial's readings, by trial, plus narrowing's warnings.
    assert narrowing_warnings(ctx.storage, "diag") == []
    fine = optuna.create_study(study_name="diag/fine", storage=ctx.storage.rdb)
    fine.set_user_attr("narrowed", {"warnings": ["best lr 1 sits at the upper edge"]})
    assert trial_readings(ctx.storage, "diag")["narrowing"] == ["best lr 1 sits at the upper edge"]


def test_lr_range_test_grows_the_lr_stops_on_divergence_and_proposes_a_range(
    ctx, tmp_path: Path
) -> None:  # noqa: ANN001
    out = lr_range_test(
        _model(), _subset(ctx.data, 512), batch_size=64, start=1e-6, end=10.0, steps=60
    )
    lrs, losses = out["lrs"], out["losses"]
    assert out["stopped"] in ("diverged", "nan") and len(lrs) < 60
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios)) and ratios[0] > 1
    assert all(math.isfinite(v) for v in losses)
    low, high = out["suggested"]
    assert 1e-6 <= low <= high / 100 and 1e-4 <= high <= 1.0
    assert losses[lrs.index(high)] == min(losses)
    assert png(lr_range_figure(out))[:8] == PNG
    # The same on the run's own network and data, as the coarse stage would use it.
    # All 20 steps, or fewer when the loss blew up near the range's top (init-dependent).
    proposed = propose_coarse_lr(ctx, steps=20)
    steps = len(proposed["lrs"])
    assert steps == 20 or (10 <= steps < 20 and proposed["stopped"] in ("diverged", "nan"))
    assert proposed["suggested"][0] < proposed["suggested"][1]


@pytest.mark.parametrize("channels", [1, 3])
def test_first_layer_filters_png(tmp_path: Path, channels: int) -> None:
    model = AlexNet(10, in_channels=channels, fc_width=32)
    path = tmp_path / "filters.png"
    path.write_bytes(png(first_layer_filters(model)))
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_record_diagnostics_closes_a_diverged_partial_epoch(ctx) -> None:  # noqa: ANN001
    model = _model()
    opt = make_optimizer("adam", model.parameters(), 10.0, 0.0)
    monitor = Monitor(model)
    history = fit(
        model,
        opt,
        ctx.data,
        epochs=1,
        batch_size=64,
        loss="ce",
        generator=torch.Generator().manual_seed(0),
        diverge_above=3 * math.log(10),
        monitor=monitor,
    )
    assert history.stopped == "diverged" and not history.epochs
    out = record_diagnostics(monitor, {"train_loss": []})
    assert [d["epoch"] for d in out["diagnostics"]] == [1]
    assert any(r.startswith("LR too high") for r in out["readings"])
