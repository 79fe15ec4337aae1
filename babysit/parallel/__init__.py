"""Trials across processes: exactly N finished trials however many processes fill a
stage, single-trial stages held by one, dead workers' trials failed with a reason,
interrupts written on the trial, helpers that die with their parent. Works on an
``optuna.Study`` alone: no Context, no Spec, no torch."""
