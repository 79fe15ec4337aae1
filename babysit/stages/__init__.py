"""One module per stage, as docs/protocol.md names them (sanity, overfit, coarse and fine in
search, narrowing, final/), with what they share: the Context (context.py) and the opening
of a stage's study (study.py). Empty on purpose: importing a stage imports torch."""
