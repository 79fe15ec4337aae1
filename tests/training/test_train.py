from __future__ import annotations

import contextlib
import math

import pytest
import torch

from babysit.data import Splits
from babysit.data.augment import build_preprocess
from babysit.data.device import DeviceData
from babysit.errors import UsageError
from babysit.protocol.prepare import prepare
from babysit.spec import DataSpec
from babysit.spec import build_spec
from babysit.storage import open_storage
from babysit.training.models import AlexNet
from babysit.training.step import autocast
from babysit.training.step import device_for
from babysit.training.step import evaluate
from babysit.training.step import expected_initial_loss
from babysit.training.step import fit
from babysit.training.step import make_optimizer


def _data(n: int = 96, side: int = 8) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    # Learnable: each class is a different brightness.
    x = y.view(n, 1, 1, 1) * 80 + torch.randint(0, 20, (n, 1, side, side), generator=g)
    x = x.to(torch.uint8)
    splits = Splits(["a", "b", "c"], x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:])
    return DeviceData.from_splits(
        splits, build_preprocess(splits.train_x, DataSpec()), torch.device("cpu")
    )


def test_device_selection_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for("auto").type == "cpu"
    assert device_for("cpu").type == "cpu"
    assert device_for("cuda").type == "cuda"


def test_asking_for_cuda_without_one_is_an_input_error(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(UsageError, match="no CUDA device"):
        prepare(build_spec(flags={"name": "c"}), storage, device="cuda")


def test_autocast_is_off_on_the_cpu() -> None:
    ctx = autocast(torch.device("cpu"))
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32


def test_expected_initial_loss() -> None:
    assert expected_initial_loss("ce", 10) == pytest.approx(math.log(10))
    assert expected_initial_loss("bce", 10) == pytest.approx(math.log(2))


def test_fit_learns_and_counts_examples() -> None:
    data = _data()
    torch.manual_seed(0)
    model = AlexNet(3, in_channels=1, fc_width=64, dropout=0.0)
    opt = make_optimizer("adam", model.parameters(), 1e-3, 0.0)
    seen = []
    history = fit(
        model,
        opt,
        data,
        epochs=8,
        batch_size=16,
        loss="ce",
        generator=torch.Generator().manual_seed(0),
        on_epoch=seen.append,
    )
    assert [s.epoch for s in seen] == list(range(1, 9))
    assert history.examples == 8 * 64 and history.steps == 8 * 4
    assert history.epochs[-1].val_acc > 0.9
    loss, acc = evaluate(model, data, "test", "ce")
    assert acc > 0.9 and loss < 1.0


def test_divergence_can_be_switched_off_to_train_like_the_seeds() -> None:
    data = _data()
    torch.manual_seed(0)
    model = AlexNet(3, in_channels=1, fc_width=64)
    opt = make_optimizer("sgd", model.parameters(), 1e4, 0.0)
    stopped = fit(
        model,
        opt,
        data,
        epochs=3,
        batch_size=16,
        loss="ce",
        generator=torch.Generator().manual_seed(0),
        diverge_above=3 * math.log(3),
    )
    assert stopped.stopped == "diverged" and stopped.stopped_at_step <= 4
    torch.manual_seed(0)
    model = AlexNet(3, in_channels=1, fc_width=64)
    opt = make_optimizer("sgd", model.parameters(), 1e4, 0.0)
    full = fit(
        model,
        opt,
        data,
        epochs=3,
        batch_size=16,
        loss="ce",
        generator=torch.Generator().manual_seed(0),
        diverge_above=3 * math.log(3),
        stop_on_divergence=False,
    )
    assert full.stopped is None and len(full.epochs) == 3 and full.steps == 12


def test_same_seed_same_batches() -> None:
    data = _data()
    a = [y.tolist() for _, y in data.train_batches(16, torch.Generator().manual_seed(3))]
    b = [y.tolist() for _, y in data.train_batches(16, torch.Generator().manual_seed(3))]
    c = [y.tolist() for _, y in data.train_batches(16, torch.Generator().manual_seed(4))]
    assert a == b and a != c
    assert sorted(sum(a, [])) == sorted(data.train_y.tolist())
