"""The final stage: its trial (stage.py), its training loop (train.py), its checkpoint and
model file (checkpoint.py), its launch on several processes (launch.py) and the collectives
a rank calls (ddp.py)."""
