"""The order of the five stages: prepare the run once, then sanity, overfit, coarse,
narrow, fine and final, each skipped when storage says it is done (babysit/protocol/run.py).
Torch-side: imported by the CLI only when a run starts."""
