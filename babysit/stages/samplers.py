"""The samplers and pruners a search stage asks Optuna for, built from its ``SearchSpec``.

Only Optuna's public API is used here; the private reads stay in coordination.py. The
coarse stage's successive halving waits for ``HALVING_STARTUP`` finished trials before it
prunes anything (:class:`_StartupHalving`), and ``HALVING_RULE`` is the rule in words, as
stored on the coarse study and quoted by docs/protocol.md.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from babysit.schema import FINISHED
from babysit.spec import SearchSpec

# Successive halving in the coarse stage: every trial gets one epoch, the top third of
# those that reached a rung go on to the next (epoch 1, 3, 9, ...), the rest stop. A coarse
# search only has to find the region, and a trial that is in the bottom two thirds after
# one epoch rarely ends in the top five that narrowing keeps.
HALVING_FACTOR = 3
# Nothing is pruned before this many trials of the stage have finished, as with the median
# pruner. Asynchronous halving with one or two trials at a rung promotes only the best so far:
# in a 3-trial coarse search on three shapes it stopped the one trial at a good lr (2.9e-3,
# val 0.44 after epoch 1) because a slow low-lr trial had 0.49 there.
HALVING_STARTUP = 5
# The rule as stored on the coarse study (``pruner_rule``); docs/protocol.md quotes it word for word.
HALVING_RULE = (
    "successive halving after {startup} finished trials: rungs at epochs 1, "
    "{factor}, {factor2}, ...; a trial goes on past a rung only when its val "
    "accuracy is in the top 1/{factor} of the trials that reached it; never "
    "pruned after its last epoch"
)


class _StartupHalving(optuna.pruners.BasePruner):
    """Successive halving once ``HALVING_STARTUP`` trials have finished; before that, none."""

    def __init__(self) -> None:
        self._halving = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=HALVING_FACTOR, min_early_stopping_rate=0
        )

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        finished = study.get_trials(deepcopy=False, states=FINISHED)
        if len(finished) < HALVING_STARTUP:
            return False
        return self._halving.prune(study, trial)


def pruner_for(search: SearchSpec) -> optuna.pruners.BasePruner:
    if search.pruner == "halving":
        return _StartupHalving()
    if search.pruner == "median":
        # Five trials before anything is pruned: the median of fewer is noise.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def sampler_for(search: SearchSpec, seed: int) -> optuna.samplers.BaseSampler:
    if search.sampler == "tpe":
        # Random start for a third of the budget, then TPE inside the narrowed box.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, search.trials // 3))
    return optuna.samplers.RandomSampler(seed=seed)
