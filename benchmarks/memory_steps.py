"""Resident memory after each step of a trial, in one process: torch imported, babysit
imported, prepare(), a fresh AlexNet, one epoch with Adam, the final's best-epoch copy, and
Adam's state and the gradients handed back (digits, CPU; MiB from /proc/self/status).

    OMP_NUM_THREADS=2 python benchmarks/memory_steps.py
"""

from __future__ import annotations

import importlib
import tempfile


def status() -> str:
    found = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) // 1024
    return f"VmRSS {found['VmRSS']} MiB (VmHWM {found['VmHWM']})"


def main() -> None:
    importlib.import_module("torch")
    print("import torch:", status())
    from babysit.memory import release
    from babysit.protocol.prepare import prepare
    from babysit.spec import build_spec
    from babysit.stages.context import fresh_model
    from babysit.stages.context import generator_for
    from babysit.stages.final.checkpoint import copy_weights
    from babysit.storage import open_storage
    from babysit.training.step import configure_device
    from babysit.training.step import fit
    from babysit.training.step import make_optimizer

    print("import babysit.protocol:", status())
    tmp = tempfile.mkdtemp()
    spec = build_spec(flags={"name": "m"})
    ctx = prepare(spec, open_storage(f"sqlite:///{tmp}/m.db"), device="cpu", quiet=True)
    configure_device(ctx.device)
    print("prepare():", status())
    model = fresh_model(ctx, 0)
    print("fresh AlexNet:", status())
    opt = make_optimizer("adam", model.parameters(), 1e-3, 1e-5)
    generator = generator_for(ctx, 0)
    fit(model, opt, ctx.data, epochs=1, batch_size=ctx.batch_size, loss="ce", generator=generator)
    print("one epoch (weights, gradients, Adam's state):", status())
    best = copy_weights(model)
    print("+ the final's best-epoch copy:", status())
    opt.state.clear()
    model.zero_grad(set_to_none=True)
    release()
    print("Adam's state and the gradients handed back:", status(), len(best))


if __name__ == "__main__":
    main()
