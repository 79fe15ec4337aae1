"""``--jobs N``: the N-1 `babysit worker` processes started beside the run, and how
they are waited for or stopped.

The helpers start before sanity, so that their imports and data loading overlap the
owner's sanity and overfit stages, and the owner waits (at most :data:`READY_SECONDS`) for
each to reach the searches before it starts them: `--jobs 2` then means two processes
from the first coarse trial, whatever the machine's load, not a helper that arrives when
the searches are over. Each helper says it is ready by writing to a pipe the owner passed
it (``BABYSIT_READY_FD``); a helper that dies closes the pipe, which ends the wait too.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from babysit.parallel.lifeline import die_with_parent
from babysit.stages.context import Context
from babysit.terminal import plural

READY_FD = "BABYSIT_READY_FD"
READY_SECONDS = 120.0


@dataclass
class Helper:
    proc: subprocess.Popen
    ready: int  # the read end of the pipe the helper writes to once it reaches the searches


def _spawn_workers(ctx: Context, jobs: int) -> list[Helper]:
    """``--jobs N``: N-1 `babysit worker` processes join the searches.

    For networks too small to fill a GPU alone. With several GPUs visible, helper i is
    pinned (CUDA_VISIBLE_DEVICES) to device i mod count, round robin with this process on
    the first. The storage URL travels in the environment,
    not on the command line, where `ps` would show a password.
    """
    if jobs <= 1:
        return []
    env = dict(os.environ)
    env["BABYSIT_STORAGE"] = ctx.storage.url
    if ctx.device.type == "cpu":
        # Share the cores instead of every process spinning up one thread per core.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    cmd = [
        sys.executable,
        "-m",
        "babysit",
        "worker",
        "--name",
        ctx.spec.name,
        *ctx.storage.artifact_flags(),
        "--device",
        ctx.device.type,
        "--quiet",
    ]
    if ctx.compile:
        cmd.append("--compile")
    if ctx.final_procs > 1:
        # Whichever process takes the final trains it the way this run was asked to.
        cmd += ["--final-procs", str(ctx.final_procs)]
    if ctx.data_dir:
        cmd += ["--data-dir", str(ctx.data_dir)]
    ctx.log(f"--jobs {jobs}: starting {plural(jobs - 1, 'worker process')} beside this one")
    from babysit.stages.final.launch import helper_env

    count = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    helpers = []
    for i in range(1, jobs):
        read, write = os.pipe()
        child = helper_env(env, i, ctx.device.type, count)
        child[READY_FD] = str(write)
        proc = subprocess.Popen(
            cmd,
            env=child,
            stdout=subprocess.DEVNULL,
            pass_fds=(write,),
            preexec_fn=die_with_parent(),  # a SIGKILLed run takes them along
        )
        os.close(write)  # the helper holds the only write end: its exit ends the wait
        helpers.append(Helper(proc, read))
    return helpers


def say_ready() -> None:
    """In a `--jobs` helper: tell the owner this process has reached the searches."""
    fd = os.environ.pop(READY_FD, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except (OSError, ValueError):
        pass  # not a pipe from an owner (a variable inherited by hand): nothing to tell


def await_ready(ctx: Context, helpers: list[Helper], seconds: float = READY_SECONDS) -> None:
    """Wait until every helper has reached the searches or exited, at most ``seconds``."""
    pending = {h.ready for h in helpers}
    deadline = time.monotonic() + seconds
    said = False
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            ctx.log(
                f"{plural(len(pending), 'worker process')} not ready after {seconds:.0f} s; "
                "the searches start without waiting for it"
            )
            break
        ready, _, _ = select.select(list(pending), [], [], min(left, 2.0))
        if not ready and not said:
            ctx.log(f"waiting for {plural(len(pending), 'worker process')} to load")
            said = True
        for fd in ready:
            os.read(fd, 64)  # "ready", or b"" where the helper exited first
            pending.discard(fd)
    _close(helpers)


def _close(helpers: list[Helper]) -> None:
    for h in helpers:
        try:
            os.close(h.ready)
        except OSError:
            pass  # closed already


def _reap(helpers: list[Helper]) -> None:
    """Workers exit by themselves once final is taken; give them a moment to do so."""
    for h in helpers:
        try:
            h.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            _stop([h])


def _stop(helpers: list[Helper]) -> None:
    """SIGINT first, so each worker marks its running trial FAIL before it goes."""
    _close(helpers)
    for h in helpers:
        if h.proc.poll() is None:
            h.proc.send_signal(signal.SIGINT)
    for h in helpers:
        try:
            h.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            h.proc.kill()
