"""The figures drawn from stored trials, without a run (tests/report/test_report.py draws
them from a whole one)."""

from __future__ import annotations

from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from babysit.report.plots import final_curves
from babysit.schema import Param
from babysit.schema import TrialAttrs


def test_the_finals_plot_marks_the_tested_epoch() -> None:
    # Five epochs run, the third best on validation: its weights were tested.
    curves = {
        "train_loss": [2.0, 1.0, 0.6, 0.4, 0.3],
        "val_loss": [2.1, 1.2, 0.8, 0.9, 1.0],
        "train_acc": [0.3, 0.6, 0.8, 0.9, 0.95],
        "val_acc": [0.3, 0.6, 0.85, 0.84, 0.83],
    }
    dist = FloatDistribution(1e-5, 1.0, log=True)
    trial = create_trial(
        params={Param.LR: 0.01, Param.WEIGHT_DECAY: 0.001},
        distributions={Param.LR: dist, Param.WEIGHT_DECAY: dist},
        value=0.85,
    )
    attrs = TrialAttrs(curves=curves, best_epoch=3, test_accuracy=0.82, test_loss=0.7)
    fig = final_curves(trial, attrs)
    ax_loss, ax_acc = fig.axes
    for ax, value in ((ax_loss, 0.7), (ax_acc, 0.82)):
        (marker,) = ax.collections  # the test result, one point
        assert marker.get_offsets().tolist() == [[3.0, value]]
        tested = [ln for ln in ax.lines if list(ln.get_xdata()) == [3, 3]]
        assert len(tested) == 1 and tested[0].get_linestyle() == ":"
    assert "test 0.820 (epoch 3)" in [t.get_text() for t in ax_acc.get_legend().get_texts()]
    assert fig.get_suptitle().endswith("; test accuracy 0.820 at epoch 3 of 5")
    # A run that stored no best epoch: the result at the last epoch, as before.
    fig = final_curves(trial, TrialAttrs(curves=curves, test_accuracy=0.82, test_loss=0.7))
    assert fig.axes[1].collections[0].get_offsets().tolist() == [[5.0, 0.82]]
