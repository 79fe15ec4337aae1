"""Peak resident memory of a command, and which stage of a babysit run it was reached in.

    python benchmarks/peak_rss.py -- python -m babysit run --summary-json s.json

Samples the resident set size of the child (/proc/PID/status: VmRSS) every 0.1 s,
reads the child's stderr as it goes, and prints the peak with the last stage line babysit
printed before it ("sanity passed", "coarse: ...", ...), then the peak per stage. The
kernel's own high-water mark (getrusage RUSAGE_CHILDREN) is printed beside it: sampling
can miss a spike shorter than 0.1 s, the kernel cannot.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import threading
import time


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the kernel's high-water mark of this process), in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    stage = ["start"]
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            word = line.split(":")[0].split()[0] if line.strip() else ""
            if word in ("sanity", "overfit", "coarse", "narrowed", "fine", "final", "chosen"):
                stage[0] = f"after '{line.strip()[:60]}'"

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, peak_at, hwm = 0, "", 0
    per_stage: dict[str, int] = {}
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            status = _status(proc.pid)
        except (OSError, ValueError):
            break
        rss = status.get("VmRSS", 0)
        hwm = max(hwm, status.get("VmHWM", 0))
        per_stage[stage[0]] = max(per_stage.get(stage[0], 0), rss)
        if rss > peak:
            peak, peak_at = rss, stage[0]
        time.sleep(0.1)
    proc.wait()
    reader.join(timeout=5)
    kernel = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"exit {proc.returncode} after {time.perf_counter() - t0:.0f} s")
    print(f"peak RSS sampled {peak / 2**20:.0f} MB, {peak_at}")
    print(
        f"peak RSS kernel: VmHWM {hwm / 2**20:.0f} MB (last sample), ru_maxrss "
        f"{kernel / 2**20:.0f} MB"
    )
    for name, value in per_stage.items():
        print(f"  {value / 2**20:6.0f} MB  {name}")
    if proc.returncode:
        sys.stderr.write("".join(lines[-20:]))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
