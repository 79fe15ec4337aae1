"""What a run stores beyond the schema (babysit/schema.py), and how it reads back:
JSON artifacts, the stored run read back (stages, spec, summary, status), the model
file's location, optuna-dashboard notes, and copying a run between storages. Optuna
only: no torch, so the read verbs start fast."""
