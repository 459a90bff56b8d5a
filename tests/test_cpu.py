"""deepgm.cpu: free cores from two /proc/stat readings (the demo sizes its thread pool to them)."""

import os
import subprocess
import sys

import pytest

from deepgm import cpu


def stat_line(busy: int, idle: int, iowait: int = 0) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice: busy time split over user and system
    return f"cpu  {busy - busy // 3} 0 {busy // 3} {idle} {iowait} 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n"


def test_busy_cores_is_the_busy_share_of_the_elapsed_time():
    assert cpu.busy_cores((100, 1000), (400, 1400), 4) == pytest.approx(3.0)  # 300 of 400 jiffies: 3 of 4 cores
    assert cpu.busy_cores((100, 1000), (100, 1200), 2) == 0.0
    assert cpu.busy_cores((5, 10), (5, 10), 2) == 0.0  # no time elapsed: nothing known to be busy


@pytest.mark.parametrize("busy, idle, iowait, expected", [
    (0, 200, 0, 2),     # a quiet 2-core machine: both cores
    (100, 100, 0, 1),   # one core's worth busy: one left
    (180, 20, 0, 1),    # both nearly busy: never fewer than one
    (100, 50, 50, 1),   # iowait counts as idle: one core's worth
])
def test_free_cores_reads_proc_stat_twice(tmp_path, monkeypatch, busy, idle, iowait, expected):
    stat = tmp_path / "stat"
    stat.write_text(stat_line(1000, 5000))
    monkeypatch.setattr(cpu, "STAT", stat)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    # the interval passes: the second reading is the first plus this interval's jiffies
    monkeypatch.setattr(cpu.time, "sleep", lambda s: stat.write_text(stat_line(1000 + busy, 5000 + idle, iowait)))
    assert cpu.free_cores() == expected


def test_free_cores_without_proc_stat_is_every_usable_core(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "STAT", tmp_path / "missing")
    assert cpu.free_cores() == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


@pytest.mark.skipif(not cpu.STAT.exists(), reason="needs Linux's /proc/stat")
def test_free_cores_sees_other_processes_spinning():
    cores = os.cpu_count() or 1
    spin = "import time\nend = time.time() + 6\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores)]
    try:
        assert cpu.free_cores(interval=1.0) == 1  # every core busy: the floor of one thread
    finally:
        for p in spinners:
            p.kill()
            p.wait()
