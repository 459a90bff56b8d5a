"""kill -9 at random moments of training, then `--resume`, until the run finishes: is it bit-identical to an
uninterrupted run, and was any run lost?

One uninterrupted `deepgm train` gives the reference. Then each trial starts the same run in a fresh folder and
SIGKILLs it at a random moment (uniform over the reference's wall time, so kills land in start-up, inside steps,
in checkpoint writes and in the end's sampling and pictures), repeatedly, resuming each time, until a process
finishes. A kill that leaves a `step-N.tmp` folder was inside a checkpoint write. A trial is lost if a resume
fails, and it differs if its final weights (model and EMA) are not bit-identical to the reference's.

Run:  python benchmarks/kill_trials.py [--trials 5] [--kills 4] [--config ddpm-toy] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deepgm.files import write_json, write_text

STEPS = 400
OVERRIDES = [f"train.steps={STEPS}", "train.checkpoint_every=20", "train.log_every=20", "train.sample_every=200"]


def run_deepgm(args: list[str], timeout: float | None = None) -> tuple[int | None, float, float]:
    """(exit status, or None if SIGKILLed at `timeout`; peak RSS in MiB, from os.wait4; seconds) of one `deepgm`
    subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "deepgm.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if timeout is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # it ended just as the timeout fired, and was reaped by Popen.wait
        return proc.returncode, float("nan"), time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    return (None if code == -signal.SIGKILL else code), usage.ru_maxrss / 1024, time.perf_counter() - start


def train(config: str, out: Path, resume: bool, timeout: float | None = None) -> tuple[int | None, float]:
    """(exit status, or None if killed at `timeout`; seconds) of one `deepgm train` process."""
    code, _, seconds = run_deepgm(["train", config, *OVERRIDES, "--out", str(out), "--quiet"]
                                  + (["--resume"] if resume else []), timeout)
    return code, seconds


def final_weights(run: Path) -> dict:
    """The last checkpoint's step and tensors (not the files' bytes: safetensors writes its metadata in the
    order of a Rust HashMap, which differs between processes)."""
    from safetensors.torch import load_file

    last = sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]
    return {"step": last.name, **{f"{f}:{k}": v for f in ("model.safetensors", "ema.safetensors")
                                  for k, v in load_file(last / f).items()}}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] if isinstance(a[k], str) else bool((a[k] == b[k]).all())
                                        for k in a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="ddpm-toy")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kills", type=int, default=4, help="kills per trial before it may finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="deepgm-kills-"))
    try:
        code, full = train(args.config, scratch / "reference", resume=False)
        if code != 0:
            raise SystemExit(f"the uninterrupted run failed with status {code}")
        reference = final_weights(scratch / "reference")
        trials = []
        for t in range(args.trials):
            run = scratch / f"trial{t}"
            kills = in_writes = failures = 0
            while True:
                started = (run / "config.yaml").is_file()  # --resume also restarts a run killed before a checkpoint
                # a moment within what is left of the run: start-up (about a quarter of the uninterrupted run's
                # time here) plus a uniform share of the remaining steps
                done = max((int(c.name[5:]) for c in (run / "checkpoints").glob("step-*[0-9]")), default=0)
                left = 1 - done / STEPS
                timeout = (0.25 + rng.random() * 0.75 * left) * full if kills < args.kills else None
                code, _ = train(args.config, run, resume=started, timeout=timeout)
                if code is None:
                    kills += 1
                    in_writes += any((run / "checkpoints").glob("*.tmp"))
                    continue
                if code == 0:
                    break
                failures += 1  # a resume that fails: the run would be lost to a user
                if failures > 2:
                    break
            identical = code == 0 and same(final_weights(run), reference)
            trials.append({"trial": t, "kills": kills, "kills_inside_checkpoint_writes": in_writes,
                           "failed_resumes": failures, "identical": bool(identical)})
            print(trials[-1], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    kills = sum(t["kills"] for t in trials)
    lost = sum(t["failed_resumes"] > 0 for t in trials)
    identical = sum(t["identical"] for t in trials)
    result = {"config": args.config, "overrides": OVERRIDES, "uninterrupted_seconds": full, "trials": trials,
              "kills": kills, "runs_lost": lost, "identical": identical}
    write_json(Path(args.out) / "kill_trials.json", result)
    text = (f"# kill -9 during training\n\n`python benchmarks/kill_trials.py --config {args.config} --trials "
            f"{args.trials} --kills {args.kills}` ({' '.join(OVERRIDES)}; the uninterrupted run takes {full:.1f} s)"
            f"\n\n{kills} kills at random moments over {len(trials)} runs, "
            f"{sum(t['kills_inside_checkpoint_writes'] for t in trials)} of them inside a checkpoint write; "
            f"runs lost: {lost}; final weights bit-identical to the uninterrupted run: {identical} of "
            f"{len(trials)}.\n")
    write_text(Path(args.out) / "kill_trials.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
