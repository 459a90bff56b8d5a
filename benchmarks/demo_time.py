"""How long `deepgm demo` takes, in units of a fixed reference workload timed in the same run.

A shared machine's speed changes from minute to minute, so seconds alone say little. The reference is a fixed
training loop of a small conv net (the demo's kind of work: 3x3 convs, GroupNorm, SiLU, AdamW, at torch's default
thread count), timed just before and just after the demo. The demo's time divided by the mean reference time is
a ratio that machine load mostly cancels from; times the reference's time on a quiet machine (--quiet-reference,
measured once with nothing else running) it estimates the demo's time on that quiet machine. The demo runs as a
user runs it the first time (`deepgm demo` in a subprocess, with an empty cache, so the classifier behind FID is
trained too) and each of its three phases is timed from its progress lines.

Run:  python benchmarks/demo_time.py [--quiet-reference SECONDS] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepgm.files import write_json, write_text

REFERENCE_STEPS = 200


def reference_workload(steps: int = REFERENCE_STEPS) -> float:
    """Seconds for `steps` AdamW steps of a fixed small conv net on 8x8 images, batch 128 (fixed seed)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.GroupNorm(32, 64), nn.SiLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(32, 64), nn.SiLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(32, 64), nn.SiLU(),
                        nn.Conv2d(64, 1, 3, padding=1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(128, 1, 8, 8)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(net(x), x).backward()
        opt.step()
    return time.perf_counter() - start


def run_demo(out: Path, cache: Path) -> tuple[float, dict[str, float], str]:
    """(seconds, seconds per phase, last lines of output) of `deepgm demo --out out` in a subprocess whose
    feature-network cache is `cache` (empty: the classifier behind FID is trained as on a new user's machine)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEEPGM_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "deepgm.cli", "demo", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    marks, lines = [("start-up", start)], []
    for line in proc.stdout:
        lines.append(line.rstrip())
        for tag, phase in (("[1/3]", "train"), ("[2/3]", "sample"), ("[3/3]", "evaluate")):
            if line.startswith(tag):
                marks.append((phase, time.perf_counter()))
        if line.startswith("done in"):
            marks.append(("summary", time.perf_counter()))
    if proc.wait():
        raise SystemExit(f"deepgm demo failed (exit {proc.returncode}):\n" + "\n".join(lines[-20:]))
    total = time.perf_counter() - start
    phases = {name: round(marks[i + 1][1] - t, 1) for i, (name, t) in enumerate(marks[:-1])}
    return total, phases, "\n".join(lines[-12:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quiet-reference", type=float, default=None,
                        help="the reference's seconds on a quiet machine (default: this run's, if the load is low)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    reference_workload(5)  # warm-up: imports, allocator, oneDNN kernels
    before = reference_workload()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, phases, tail = run_demo(Path(tmp) / "demo", Path(tmp) / "cache")
    after = reference_workload()
    reference = (before + after) / 2
    ratio = seconds / reference
    quiet = args.quiet_reference or reference
    result = {"demo_seconds": round(seconds, 1), "phases_seconds": phases, "reference_seconds_before": round(before, 2),
              "reference_seconds_after": round(after, 2), "demo_in_references": round(ratio, 1),
              "quiet_reference_seconds": round(quiet, 2), "demo_seconds_on_quiet_machine": round(ratio * quiet, 1),
              "load_average_1min_before": round(load_before, 2), "torch_threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "demo_output": tail}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "demo_time.json", result)
    table = (f"# `deepgm demo` time\n\n`python benchmarks/demo_time.py"
             f"{f' --quiet-reference {args.quiet_reference}' if args.quiet_reference else ''}`"
             f" ({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, 1-minute load {load_before:.2f} "
             f"before the run)\n\n"
             "| demo (s) | train / sample / evaluate (s) | reference before / after (s) | demo / reference | "
             "estimated on a quiet machine (s) |\n|---|---|---|---|---|\n"
             f"| {seconds:.0f} | {phases.get('train', 0):.0f} / {phases.get('sample', 0):.0f} / "
             f"{phases.get('evaluate', 0):.0f} | {before:.2f} / {after:.2f} | {ratio:.1f} | {ratio * quiet:.0f} "
             f"(reference {quiet:.2f} s) |\n\n```\n{tail}\n```\n")
    write_text(args.out / "demo_time.md", table)
    print(table)


if __name__ == "__main__":
    main()
