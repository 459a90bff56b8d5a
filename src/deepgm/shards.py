"""Large sampling jobs, streamed to disk in shards: `deepgm sample RUN --n 100000 [--shard k/K]`.

A job (a run's weights, a plan, a seed, n) is cut into shards of `shard_size` samples (a multiple of the 64-sample
chunk of deepgm.family.generate_chunked): shard j holds samples j*S, ..., min((j+1)*S, n) - 1. Sample i depends only
on (seed, i), so shards can be made in any order and by any number of processes: `--shard k/K` makes the shards j
with j % K == k - 1. Each shard is written atomically and never redone, so a killed job resumes where it stopped.
Whoever finds every shard on disk merges them, streaming, into samples.npy (the samples, in order), cond.npz (what
they were conditioned on) and grid.png (the first 64). Memory is bounded by one shard, whatever n.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from deepgm.family import CHUNK, generate_chunked
from deepgm.files import atomic_write, write_json, write_npz

SHARD_SIZE = 1024  # samples per shard: 16 chunks of 64


@dataclasses.dataclass
class ShardJob:
    """What `sample_shards` did: the job's folder, its shards, the ones made now and whether it is merged."""

    out: Path
    shards: int
    made: list[int]
    already: int
    merged: Path | None
    nfe: int | None


def parse_shard(text: str) -> tuple[int, int]:
    """'k/K' (k = 1, ..., K) -> (k, K), or a clear error."""
    try:
        k, total = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard takes k/K, this process's share of K (e.g. 2/4), got {text!r}") from None
    if not 1 <= k <= total:
        raise ValueError(f"--shard {text}: k must lie in 1..K (shard 1/{max(total, 1)} is the first)")
    return k, total


def _shard_path(out: Path, j: int) -> Path:
    return out / "shards" / f"shard-{j:06d}.npz"


def _check_job(out: Path, job: dict) -> None:
    """The folder holds this job or nothing: another job's shards must never be mixed in."""
    path = out / "job.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != job:
            differ = sorted(k for k in set(before) | set(job) if before.get(k) != job.get(k))
            raise FileExistsError(f"{out} holds another sampling job (it differs in {', '.join(differ)}); choose "
                                  "another --out, or repeat the same command to resume that job")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, job)


def sample_shards(run_dir: str | Path, n: int, seed: int = 0, out: str | Path | None = None,
                  shard: tuple[int, int] = (1, 1), shard_size: int = SHARD_SIZE, weights: str = "ema",
                  progress: bool = True, **plan_overrides) -> ShardJob:
    """Make this process's missing shards of the job, then merge if every shard is on disk."""
    from tqdm.auto import tqdm

    from deepgm.pipeline import load_prepared, load_run, plan_for

    if shard_size < CHUNK or shard_size % CHUNK:
        raise ValueError(f"--shard-size must be a multiple of {CHUNK} (the sampling chunk), got {shard_size}")
    k, total = shard
    run = load_run(run_dir, weights)
    plan = plan_for(run, **plan_overrides)
    out = Path(out) if out else Path(run_dir) / "samples" / f"{plan.describe()}-seed{seed}-n{n}"
    job = {"run": str(Path(run_dir).resolve()), "step": run.step, "weights": weights, "n": n, "seed": seed,
           "shard_size": shard_size, "plan": {k: v for k, v in dataclasses.asdict(plan).items()
                                              if k not in ("progress", "return_trajectory")}}
    job["plan"]["options"] = [list(o) for o in plan.options]
    _check_job(out, job)
    needs_examples = any(c.needs_examples for c in run.model.conditioning.conditions.values())
    test = load_prepared(run, "test") if needs_examples else None
    count = -(-n // shard_size)
    mine = [j for j in range(count) if j % total == k - 1]
    todo = [j for j in mine if not _shard_path(out, j).is_file()]
    nfe = None
    for j in tqdm(todo, desc=f"shards ({len(mine) - len(todo)} of {len(mine)} done before)", unit="shard",
                  disable=not progress):
        start = j * shard_size
        size = min(shard_size, n - start)
        cond = run.model.conditioning.examples(test, size, start) if test is not None else None
        with torch.inference_mode():
            result = generate_chunked(run.model, size, seed, plan, cond, start=start)
        arrays = {"x": result.x.cpu().numpy(), **{f"cond_{key}": v.cpu().numpy() for key, v in result.cond.items()}}
        if test is not None and test.captions:
            arrays["captions"] = np.array([test.captions[i % len(test)] for i in range(start, start + size)])
        _shard_path(out, j).parent.mkdir(exist_ok=True)
        write_npz(_shard_path(out, j), arrays)
        nfe = result.nfe
    merged = merge_shards(out) if all(_shard_path(out, j).is_file() for j in range(count)) else None
    return ShardJob(out, count, todo, len(mine) - len(todo), merged, nfe)


def merge_shards(out: str | Path) -> Path:
    """samples.npy (written through a memory map, one shard at a time), cond.npz and grid.png from a job's
    complete shards; the same files whichever processes made the shards."""
    from deepgm.viz import save_image_grid

    out = Path(out)
    job = json.loads((out / "job.json").read_text())
    n, size = job["n"], job["shard_size"]
    count = -(-n // size)
    missing = [j for j in range(count) if not _shard_path(out, j).is_file()]
    if missing:
        raise FileNotFoundError(f"{out}: shard(s) {missing[:5]}{'...' if len(missing) > 5 else ''} of {count} are "
                                "missing; run the job's remaining --shard processes first")
    with np.load(_shard_path(out, 0)) as first:
        shape, dtype = first["x"].shape[1:], first["x"].dtype

    def write(tmp: str) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, *shape))
        for j in range(count):
            with np.load(_shard_path(out, j)) as part:
                array[j * size: j * size + len(part["x"])] = part["x"]
        array.flush()
        del array

    atomic_write(out / "samples.npy", write)
    small: dict[str, list] = {}
    for j in range(count):  # conditions and captions: a few numbers per sample
        with np.load(_shard_path(out, j)) as part:
            for key in part.files:
                if key != "x":
                    small.setdefault(key, []).append(part[key])
    write_npz(out / "cond.npz", {k: np.concatenate(v) for k, v in small.items()})
    x = np.load(out / "samples.npy", mmap_mode="r")
    if x.ndim == 4:
        save_image_grid(torch.from_numpy(np.array(x[:64])).clamp(-1, 1), out / "grid.png")
    return out / "samples.npy"
