"""`babysit ablate`: one run per variant of a base spec (run.py), the config read and
checked before anything trains (config.py), and the table built from storage (table.py)."""
