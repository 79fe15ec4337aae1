"""Torch: the training step and the loops on it (step.py), the networks (models.py, the
user's in user_model.py) and the readings taken while training (diagnostics.py).
Empty on purpose, so that importing a sibling never loads torch by accident."""
