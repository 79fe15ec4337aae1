"""``--jobs N``: the N-1 `babysit worker` processes started beside the run, and how
they are waited for or stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

from babysit.parallel.lifeline import die_with_parent
from babysit.stages.context import Context
from babysit.terminal import plural


def _spawn_workers(ctx: Context, jobs: int) -> list[subprocess.Popen]:
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
    return [
        subprocess.Popen(
            cmd,
            env=helper_env(env, i, ctx.device.type, count),
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
        )  # a SIGKILLed run takes them along
        for i in range(1, jobs)
    ]


def _reap(helpers: list[subprocess.Popen]) -> None:
    """Workers exit by themselves once final is taken; give them a moment to do so."""
    for proc in helpers:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            _stop([proc])


def _stop(helpers: list[subprocess.Popen]) -> None:
    """SIGINT first, so each worker marks its running trial FAIL before it goes."""
    for proc in helpers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in helpers:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
