"""The final training on N processes: DistributedDataParallel, launched the way `torchrun`
launches it (torch.distributed's elastic launcher, one node, N local workers).

The process that holds the final trial (`babysit run` or `babysit worker`) stays the
launcher: its Optuna heartbeat keeps the trial alive while the ranks train, and it closes
the trial with rank 0's result. Rank 0 alone writes to the storage (curves, checkpoints,
the model); every rank starts from the same checkpoint file when resuming.

Batch split: the global batch is the spec's batch size, split evenly over the ranks
(``batch // N`` each), and every rank takes every N-th index of the epoch's shared
permutation, so step k of all ranks together sees the examples step k of one process
would see, and DDP's gradient all-reduce (a mean) gives the gradient of their mean loss.
The learning rate therefore needs no scaling: it is the searched one, for the batch the
searches used.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import optuna
import torch
import torch.distributed as dist

from babysit.errors import INTERRUPTED
from babysit.errors import UsageError
from babysit.parallel.lifeline import die_with_parent_now

if TYPE_CHECKING:
    from babysit.stages.context import Context


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo on the CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def check_procs(procs: int, device_type: str) -> None:
    """Input errors before anything runs: one rank per GPU (NCCL refuses two on one)."""
    if procs < 1:
        raise UsageError("--final-procs must be at least 1")
    if procs > 1 and device_type == "cuda":
        visible = torch.cuda.device_count()
        if procs > visible:
            raise UsageError(
                f"--final-procs {procs} needs {procs} GPUs, {visible} visible; "
                f"use --final-procs {visible} or fewer"
            )


@dataclass
class _Job:
    """What every rank needs, pickled to it by the launcher (no storage URL on argv)."""

    spec: dict[str, Any]
    storage_url: str
    artifact_dir: str
    artifact_store: str | None
    study_name: str
    trial_id: int
    lr: float
    weight_decay: float
    # The searched dropout and schedule of the final (stages.context.trial_knobs).
    knobs: dict[str, Any]
    checkpoint: str | None
    splits: dict[str, torch.Tensor]
    pre: Any
    num_classes: int
    device_type: str
    check_every: int
    compile: bool
    threads: int
    # What loading the data found (the class names among it), for the model card.
    data_info: dict[str, Any]


def _job(
    ctx: Context,
    study: optuna.Study,
    trial: optuna.Trial,
    lr: float,
    wd: float,
    path: str | None,
    knobs: dict[str, Any] | None = None,
) -> _Job:
    """What every rank needs: the spec, where the storage is, the trial, the splits on the
    CPU, the checkpoint file (``path``) to resume from."""
    from babysit.storage.private import trial_id

    data = ctx.data
    procs = ctx.final_procs
    cpu = torch.device("cpu")
    return _Job(
        spec=ctx.spec.to_dict(),
        storage_url=ctx.storage.url,
        artifact_dir=str(ctx.storage.artifact_dir),
        artifact_store=ctx.storage.artifact_store,
        study_name=study.study_name,
        trial_id=trial_id(trial),
        lr=lr,
        weight_decay=wd,
        knobs=dict(knobs or {}),
        checkpoint=path,
        splits={
            k: getattr(data, k).to(cpu)
            for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
        },
        pre=dataclasses.replace(data.pre, mean=data.pre.mean.to(cpu), std=data.pre.std.to(cpu)),
        num_classes=data.num_classes,
        device_type=ctx.device.type,
        check_every=ctx.check_every,
        compile=ctx.compile,
        # The CPU's cores shared out, not N ranks each spinning one thread per core.
        threads=max(1, (os.cpu_count() or 1) // procs),
        data_info=ctx.data_info,
    )


def _launch_config(procs: int) -> Any:
    """torchrun --standalone's launch: one node, ``procs`` local workers."""
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=procs,
        # torchrun --standalone: a c10d rendezvous on a free local port.
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        run_id=f"babysit-{uuid.uuid4().hex[:12]}",
        # A failed rank fails the trial; a rerun resumes from the checkpoint.
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )


def launch_final(
    ctx: Context,
    study: optuna.Study,
    trial: optuna.Trial,
    lr: float,
    wd: float,
    knobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the final on ``ctx.final_procs`` processes; rank 0's result."""
    from torch.distributed.launcher.api import elastic_launch

    from babysit.data.device import DeviceData
    from babysit.stages.final.checkpoint import load_checkpoint

    procs = ctx.final_procs
    data = ctx.data
    if type(data) is not DeviceData:
        ctx.log(
            "final: streamed data trains on one process (--final-procs needs the "
            "splits as tensors)"
        )
        from babysit.stages.final.train import train_final

        one = dataclasses.replace(ctx, final_procs=1)
        return train_final(one, study, trial, lr, wd, load_checkpoint(one, study), knobs=knobs)
    with tempfile.TemporaryDirectory(prefix="babysit-ddp-") as tmp:
        path = None
        # The launcher reads the checkpoint once from the artifact store; the ranks load it
        # from a local file (one node).
        ckpt = load_checkpoint(ctx, study, map_location="cpu")
        if ckpt is not None:
            path = os.path.join(tmp, "resume.pt")
            torch.save(ckpt, path)
            ctx.log(f"final: resuming from the checkpoint of epoch {int(ckpt['epoch'])}")
            del ckpt
        job = _job(ctx, study, trial, lr, wd, path, knobs)
        config = _launch_config(procs)
        ctx.log(
            f"final: {procs} processes, DistributedDataParallel over "
            f"{backend_for(ctx.device.type)}; global batch {ctx.batch_size} split "
            f"{max(1, ctx.batch_size // procs)} per process, lr unchanged"
        )
        # The elastic agent installs its own SIGINT/SIGTERM handlers (stop the ranks, then
        # raise); ours come back afterwards.
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            results = elastic_launch(config, _rank_main)(job)
        except Exception as err:  # noqa: BLE001 - sorted out below
            from torch.distributed.elastic.multiprocessing.api import SignalException

            if isinstance(err, SignalException) or INTERRUPTED.is_set():
                INTERRUPTED.set()
                raise KeyboardInterrupt from None
            raise RuntimeError(f"a final training process failed: {_first_line(err)}") from err
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    return results[0]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _rank_main(job: _Job) -> dict[str, Any]:
    """One rank: join the process group, rebuild the context, train its shard."""
    die_with_parent_now()
    from babysit.data.device import DeviceData
    from babysit.spec import Spec
    from babysit.stages.context import Context
    from babysit.stages.final.train import train_final
    from babysit.storage import open_storage
    from babysit.training.step import configure_device

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if job.device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(job.threads)
    configure_device(device)
    dist.init_process_group(backend_for(job.device_type))
    try:
        s = job.splits
        data = DeviceData(
            s["train_x"].to(device),
            s["train_y"].to(device),
            s["val_x"].to(device),
            s["val_y"].to(device),
            s["test_x"].to(device),
            s["test_y"].to(device),
            job.pre.to(device),
            job.num_classes,
        )
        storage = study = trial = None
        if rank == 0:
            storage = open_storage(
                job.storage_url, job.artifact_dir, create=False, artifact_store=job.artifact_store
            )
            study = optuna.load_study(study_name=job.study_name, storage=storage.rdb)
            trial = optuna.trial.Trial(study, job.trial_id)
        ctx = Context(
            spec=Spec.from_dict(job.spec),
            # None off rank 0: train_final touches the storage on rank 0 only.
            storage=storage,  # type: ignore[arg-type]
            data=data,
            quiet=True,
            check_every=job.check_every,
            compile=job.compile,
            log=lambda m: print(m, file=sys.stderr, flush=True),
            data_info=job.data_info,
        )
        ckpt = None
        if job.checkpoint:
            ckpt = torch.load(job.checkpoint, map_location=device, weights_only=True)
        return train_final(
            ctx, study, trial, job.lr, job.weight_decay, ckpt, None, rank, world, job.knobs
        )
    finally:
        dist.destroy_process_group()


def helper_env(
    base: dict[str, str], index: int, device_type: str, device_count: int
) -> dict[str, str]:
    """The environment of `--jobs` helper ``index`` (1, 2, ...): on a host with several
    GPUs, pinned round robin to one of the visible devices (this process is on the first),
    so N helpers spread over the devices instead of all sharing device 0."""
    env = dict(base)
    if device_type != "cuda" or device_count <= 1:
        return env
    visible = [d.strip() for d in base.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        visible = [str(i) for i in range(device_count)]
    env["CUDA_VISIBLE_DEVICES"] = visible[index % min(device_count, len(visible))]
    return env
