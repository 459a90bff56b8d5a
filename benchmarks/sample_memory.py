"""Peak memory of `deepgm sample RUN --n N` (streamed to disk in shards) for growing n: it should not grow with n.

Each n runs in a fresh process (`deepgm sample ... --quiet`), whose peak resident memory (ru_maxrss) is read
from os.wait4; the wall time and the size of the merged samples.npy are reported beside it. A second table kills a
sharded job (SIGKILL) at random moments and resumes it, counting shards redone and runs lost.

Run:  python benchmarks/sample_memory.py RUN [--n 1000 10000] [--steps 10] [--kills 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from kill_trials import run_deepgm

from deepgm.files import write_json, write_text


def sample(run: str, n: int, steps: int, out: Path, timeout: float | None = None,
           shard_size: int = 1024) -> tuple[int | None, float, float]:
    """(exit status or None if killed at `timeout`, peak RSS in MiB, seconds) of one `deepgm sample` process."""
    return run_deepgm(["sample", run, "--n", str(n), "--steps", str(steps), "--out", str(out), "--quiet",
                       "--shard-size", str(shard_size)], timeout)  # streamed at every n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (memory does not depend on them)")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs of the kill-and-resume trial")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="deepgm-memory-"))
    rows = []
    try:
        for n in args.n:
            code, rss, seconds = sample(args.run, n, args.steps, scratch / f"n{n}")
            if code != 0:
                raise SystemExit(f"deepgm sample --n {n} failed with status {code}")
            size = (scratch / f"n{n}" / "samples.npy").stat().st_size / 2**20
            # the contrast: the whole job as one shard, i.e. every sample in memory at once
            _, whole, _ = sample(args.run, n, args.steps, scratch / f"whole{n}", shard_size=-(-n // 64) * 64)
            rows.append({"n": n, "peak_rss_mib": rss, "seconds": seconds, "samples_npy_mib": size,
                         "one_shard_peak_rss_mib": whole})
            print(rows[-1], flush=True)
        # kill-and-resume: SIGKILL at random moments of the largest job, then resume until it completes
        n = max(args.n)
        job, reference = scratch / "killed", np.load(scratch / f"n{n}" / "samples.npy", mmap_mode="r")
        rng, kills, tries = random.Random(0), 0, 0
        full = next(r["seconds"] for r in rows if r["n"] == n)
        while kills < args.kills:
            tries += 1
            code, _, _ = sample(args.run, n, args.steps, job, timeout=rng.uniform(0.1, 0.6) * full)
            if code is None:
                kills += 1
            elif code != 0 or (job / "samples.npy").is_file():
                break  # finished before the kill: the remaining kills have nothing left to interrupt
        code, _, _ = sample(args.run, n, args.steps, job)
        same = code == 0 and np.array_equal(np.load(job / "samples.npy"), reference)
        kill = {"n": n, "kills": kills, "processes": tries + 1, "identical_to_uninterrupted": bool(same)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json(Path(args.out) / "sample_memory.json", {"run": args.run, "steps": args.steps, "rows": rows,
                                                       "kill": kill})
    lines = ["# Peak memory of streamed sampling", "",
             f"`python benchmarks/sample_memory.py {args.run} --n {' '.join(map(str, args.n))} --steps {args.steps}`",
             "",
             "| n | peak RSS, shards of 1024 (MiB) | seconds | samples.npy (MiB) | peak RSS, one shard of n (MiB) |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['n']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | {r['samples_npy_mib']:.1f} | "
              f"{r['one_shard_peak_rss_mib']:.0f} |" for r in rows]
    lines += ["", f"Kill and resume (n = {kill['n']}): {kill['kills']} SIGKILLs at random moments over "
                  f"{kill['processes']} processes; the resumed job's samples.npy is "
                  f"{'identical' if kill['identical_to_uninterrupted'] else 'NOT identical'} to the uninterrupted "
                  "one."]
    write_text(Path(args.out) / "sample_memory.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
