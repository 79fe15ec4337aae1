"""What a training process holds: no scikit-learn (digits and notes are read without it),
gradients from the heap instead of fresh mmaps, and a heap frozen out of each trial's
collection that thaws when the run ends (docs/benchmarks.md, issue 16)."""

from __future__ import annotations

import gc
import subprocess
import sys


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_digits_are_scikit_learns_read_without_importing_it() -> None:
    # Importing sklearn.datasets costs every training process ~170 MB; the file it ships
    # is read directly, and must give scikit-learn's own arrays.
    code = (
        "import sys, numpy as np; from babysit.data.bundled import _digits_arrays; "
        "x, y = _digits_arrays(); assert 'sklearn' not in sys.modules, 'imported'; "
        "from sklearn.datasets import load_digits; b = load_digits(); "
        "assert np.array_equal(x, b.images) and np.array_equal(y, b.target); print('same')"
    )
    assert _python(code) == "same"


def test_a_note_is_written_without_importing_the_dashboard_app() -> None:
    # optuna_dashboard's package imports its app, then optuna.importance, then
    # scikit-learn; a stage's note needs none of it, and the dashboard reads it back.
    code = """
import sys, optuna
from babysit.record.notes import get_note
from babysit.record.notes import save_note
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study()
trial = study.ask()
save_note(study, "# study" + "x" * 5000)
save_note(trial, "trial note")
save_note(trial, "trial note, second version")
assert get_note(trial) == "trial note, second version"
held = [m for m in ("sklearn", "scipy", "optuna_dashboard") if m in sys.modules]
import optuna_dashboard
print(held, optuna_dashboard.get_note(study) == "# study" + "x" * 5000,
      optuna_dashboard.get_note(trial))
"""
    assert _python(code) == "[] True trial note, second version"


def test_large_blocks_come_from_the_heap_after_tuning() -> None:
    # A 64 MiB tensor (the AlexNet's 4096x4096 gradient) is a fresh mapping by default;
    # after tune_for_training it is served from the heap, so no mapping appears.
    code = """
import torch
from babysit.memory import tune_for_training
def maps():
    return sum(1 for _ in open('/proc/self/maps'))
def added():
    before = maps(); t = torch.empty(16 << 20); t.fill_(1.0); after = maps(); del t
    return after - before
default = added()
tune_for_training()
print(default, added())
"""
    default, tuned = map(int, _python(code).split())
    assert default >= 1 and tuned == 0


def test_the_heap_is_frozen_during_a_run_and_thawed_after() -> None:
    from babysit.memory import frozen_heap

    class Node:
        pass

    before = gc.get_freeze_count()
    with frozen_heap():
        assert gc.get_freeze_count() > before
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made inside is still collected
        del a, b
        assert gc.collect() >= 2
    assert gc.get_freeze_count() == 0
