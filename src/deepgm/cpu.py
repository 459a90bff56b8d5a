"""How many CPU cores are free right now, so that a short CPU job can size its thread pool to them.

torch's intra-op threads wait for one another at the end of every operation: with one core taken by another
process, a 2-thread training step of the demo's small U-Net took 3.8x as long as on a quiet machine (499 ms
against 131 ms), while a 1-thread step was unaffected (203 ms against 209 ms). So on a busy machine fewer
threads are much faster, and on a quiet one all of them are.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STAT = Path("/proc/stat")


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies summed over all CPUs from /proc/stat, or None where there is none (not Linux)."""
    try:
        fields = [float(v) for v in STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])  # guest time is already counted in user time


def busy_cores(before: tuple[float, float], after: tuple[float, float], cores: int) -> float:
    """Cores' worth of busy time between two (busy, total) /proc/stat readings of a `cores`-core machine."""
    total = after[1] - before[1]
    return 0.0 if total <= 0 else cores * (after[0] - before[0]) / total


def free_cores(interval: float = 0.5) -> int:
    """Cores this process may use that no other process is busy on, over `interval` seconds (at least 1); all
    usable cores where the load cannot be read."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    machine = os.cpu_count() or cores
    before = _cpu_times()
    if before is None:
        return cores
    time.sleep(interval)
    after = _cpu_times()
    # the other processes may sit on any of the machine's cores; count what is left of ours
    idle = machine - busy_cores(before, after, machine)
    return max(1, min(cores, int(idle + 0.5)))
