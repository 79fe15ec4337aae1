"""The untrained default AlexNet's initial loss against ln C, with the last layer as built
(N(0, 0.01)) and as babysit starts it (scaled on one batch of the data), over the bundled
datasets and a photo-like set at full pixel scale, five seeds each.

    PYTHONPATH=. python benchmarks/sanity_sweep.py

Run from the repository root; the photo-like set is tests/stages/test_sanity.py's PHOTOS module.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from pathlib import Path

import torch

from babysit.protocol.prepare import prepare
from babysit.spec import build_spec
from babysit.stages.context import fresh_model
from babysit.stages.context import seed_for
from babysit.stages.sanity import _sanity_verdict
from babysit.stages.sanity import read_untrained
from babysit.storage import open_storage
from babysit.training.models import build_model


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    from tests.test_sanity import PHOTOS

    (tmp / "truthphotos.py").write_text(PHOTOS)
    sys.path.insert(0, str(tmp))
    print(
        "| dataset | seed | as built: logit std, loss - ln C, verdict "
        "| scaled: logit std, loss - ln C, verdict |"
    )
    print("|---|---|---|---|")
    for dataset in ("digits", "faces", "truthphotos:photos2", "truthphotos:photos10"):
        spec = build_spec(None, ["sanity.batches=1"], {"dataset": dataset, "name": "b"})
        base = prepare(spec, open_storage(f"sqlite:///{tmp / 'b.db'}"), device="cpu", quiet=True)
        for seed in range(5):
            ctx = dataclasses.replace(base, spec=dataclasses.replace(spec, seed=seed))
            cells = []
            for scaled in (False, True):
                if scaled:
                    model = fresh_model(ctx, seed_for(ctx.spec, "sanity", 0))
                else:
                    torch.manual_seed(seed_for(ctx.spec, "sanity", 0))
                    model = build_model(
                        spec.model,
                        ctx.data.num_classes,
                        ctx.data.in_channels,
                        ctx.data.image_size,
                    )
                r = read_untrained(ctx, model)
                expected = math.log(ctx.data.num_classes)
                status, _ = _sanity_verdict(
                    r["initial_loss"],
                    expected,
                    r["loss_with_reg"],
                    spec.sanity.tolerance,
                    spec.loss,
                    ctx.data.num_classes,
                    r,
                    r["l2"],
                )
                cells.append(
                    f"{r['logit_std']:.3f}, {r['initial_loss'] - expected:+.3f}, {status}"
                )
            print(f"| {dataset.split(':')[-1]} | {seed} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
