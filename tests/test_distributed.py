"""Data-parallel training on 2 real gloo processes on this machine, against single-process training.

What "matches" means. Each rank draws its own noise (its own generator, seeded by rank), so a 2-process
run cannot equal a plain 1-process run of a noisy model draw for draw. The reference here is therefore the
single-process Trainer on the same global batches with the same per-example noise: its model evaluates the
loss on the two halves of each global batch with the two ranks' generators and averages them — exactly what
DDP's gradient average computes. Weights, EMA and logged metrics must agree to float rounding (the sums are
ordered differently), and the two ranks must hold bitwise-identical weights. A deterministic model (no noise
at all) checks the plain statement too, and resuming across world sizes (2 -> 1, 1 -> 2), where only the
data order and the state carry over.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from deepgm.data.base import Dataset
from deepgm.train import TrainConfig, Trainer, latest_checkpoint
from deepgm.train.distributed import rank_seed
from tiny_models import NoisyMLP, Regression

WORLD = 2
SEED = 5


class NanOnRank1(nn.Module):
    """Finite gradients everywhere, but a non-finite loss value on rank 1 only: every rank must skip."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def loss(self, batch, generator):
        import torch.distributed as dist

        mse = self.fc(batch["x"]).pow(2).mean()
        flag = torch.tensor(float("nan") if dist.get_rank() == 1 else 0.0)
        return mse + flag, {"mse": mse.detach()}


class TwoRanks(nn.Module):
    """The single-process reference: each half of the global batch with that rank's noise stream, averaged."""

    def __init__(self, inner: nn.Module, seed: int):
        super().__init__()
        self.inner = inner
        self.rank1 = torch.Generator().manual_seed(rank_seed(seed, 1))

    def loss(self, batch, generator):
        half = len(batch["x"]) // 2
        parts = [self.inner.loss({k: v[:half] for k, v in batch.items()}, generator),
                 self.inner.loss({k: v[half:] for k, v in batch.items()}, self.rank1)]
        terms = {k: (torch.as_tensor(parts[0][1][k]) + torch.as_tensor(parts[1][1][k])) / 2 for k in parts[0][1]}
        return (parts[0][0] + parts[1][0]) / 2, terms


def vectors() -> Dataset:
    return Dataset("vectors", torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))


def regression() -> Dataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    return Dataset("regression", x, x @ torch.randn(4, 2, generator=g))


def config(**overrides) -> TrainConfig:
    # constant learning rate: a first leg with steps=6 then follows the same schedule as the straight run
    options = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=3, lr_schedule="constant", ema_decay=0.8,
                   log_every=4, checkpoint_every=6, device="cpu", seed=SEED)
    return TrainConfig(**{**options, **overrides})


def build(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


def states(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
            **{f"ema.{k}": v for k, v in trainer.ema_model.state_dict().items()}}


def _worker(rank: int, port: int, out: str) -> None:
    """One of the two ranks: several runs in one process group (process start-up is the slow part)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # C++ aborts (gloo, c10d) write to fd 2 and kill the process: keep them in a file the fixture can show
    log = os.open(os.path.join(out, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    from deepgm.train import distributed

    out = Path(out)
    # rank 1 starts from other weights: DDP must hand it rank 0's
    straight = Trainer(build(NoisyMLP, seed=rank), vectors(), config(), out / "noisy", progress=False)
    straight.fit()
    save_file(states(straight), out / f"noisy-rank{rank}.safetensors")

    first = Trainer(build(NoisyMLP), vectors(), config(steps=6), out / "noisy-resumed", progress=False)
    first.fit()
    second = Trainer(build(NoisyMLP, seed=7), vectors(), config(), out / "noisy-resumed", progress=False)
    assert second.resume() and second.step == 6
    second.fit()
    save_file(states(second), out / f"noisy-resumed-rank{rank}.safetensors")

    linear = Trainer(build(Regression), regression(), config(), out / "linear", progress=False)
    linear.fit()
    save_file(states(linear), out / f"linear-rank{rank}.safetensors")
    Trainer(build(Regression), regression(), config(steps=6), out / "linear-2to1", progress=False).fit()
    from_one = Trainer(build(Regression, seed=3), regression(), config(), out / "linear-1to2", progress=False)
    assert from_one.resume() and from_one.step == 6
    from_one.fit()
    save_file(states(from_one), out / f"linear-1to2-rank{rank}.safetensors")

    broken = Trainer(build(NanOnRank1), vectors(), config(max_skipped_steps=3), out / "nan", progress=False)
    before = {k: v.clone() for k, v in broken.model.state_dict().items()}
    try:
        broken.fit()
        outcome = "no error"
    except FloatingPointError as err:
        outcome = str(err)
    unchanged = all(torch.equal(before[k], v) for k, v in broken.model.state_dict().items())
    (out / f"nan-rank{rank}.json").write_text(json.dumps({"error": outcome, "unchanged": unchanged,
                                                           "skipped": broken.skipped_steps}))
    distributed.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_close(a: dict, b: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), (k, (a[k] - b[k]).abs().max())


def prefixed(module_states: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in module_states.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The 2-process runs (after the single-process checkpoint that one of them resumes from)."""
    out = tmp_path_factory.mktemp("ddp")
    Trainer(build(Regression), regression(), config(steps=6), out / "linear-1to2", progress=False).fit()
    try:
        mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    except mp.ProcessExitedException as err:
        tails = {r: (out / f"rank{r}.log").read_text(errors="replace")[-3000:] if (out / f"rank{r}.log").exists()
                 else "(no log)" for r in range(WORLD)}
        raise RuntimeError(f"{err}\n" + "\n".join(f"--- rank {r} log tail ---\n{t}" for r, t in tails.items())) \
            from err
    return out


def test_ddp_matches_single_process_with_the_same_per_example_noise(ddp_runs, tmp_path):
    reference = Trainer(TwoRanks(build(NoisyMLP), SEED), vectors(), config(), tmp_path, progress=False)
    reference.fit()
    ranks = [load_file(ddp_runs / f"noisy-rank{r}.safetensors") for r in range(WORLD)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # ranks agree bit for bit
    for which in ("model.", "ema."):
        expected = {k: v for k, v in states(reference).items() if k.startswith(which)}
        assert_close(prefixed(ranks[0], which), prefixed({k.replace("inner.", ""): v for k, v in expected.items()},
                                                         which))
    assert not torch.equal(ranks[0]["model.net.0.weight"], build(NoisyMLP).state_dict()["net.0.weight"])
    ours, theirs = lines(ddp_runs / "noisy" / "metrics.jsonl"), lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [4, 8, 12]  # one line per log: rank 0's
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "mse", "noise_std", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert len(list((ddp_runs / "noisy" / "tb").glob("events.out.tfevents.*"))) == 1


def test_ddp_checkpoints_hold_every_ranks_noise_and_resume_exactly(ddp_runs):
    with open(latest_checkpoint(ddp_runs / "noisy") / "trainer.json") as f:
        assert json.load(f)["world_size"] == WORLD
    from safetensors import safe_open

    with safe_open(latest_checkpoint(ddp_runs / "noisy") / "trainer.safetensors", "pt") as f:
        assert {"generator.noise", "generator.noise.rank1", "generator.data"} <= set(f.keys())
    for r in range(WORLD):  # killed at 6 and resumed at the same world size: bitwise the straight run
        resumed, straight = (load_file(ddp_runs / f"{name}-rank{r}.safetensors") for name in ("noisy-resumed", "noisy"))
        assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_deterministic_model_matches_single_process_and_resumes_across_world_sizes(ddp_runs, tmp_path):
    single = Trainer(build(Regression), regression(), config(), tmp_path / "single", progress=False)
    single.fit()
    two = load_file(ddp_runs / "linear-rank0.safetensors")
    assert_close(two, states(single))
    # 2 processes to step 6, then 1 process to step 12
    with pytest.warns(UserWarning, match="written by 2 process"):
        resumed = Trainer(build(Regression, seed=9), regression(), config(), ddp_runs / "linear-2to1", progress=False)
        assert resumed.resume() and resumed.step == 6
    resumed.fit()
    assert_close(states(resumed), states(single))
    # 1 process to step 6, then 2 processes to step 12
    assert_close(load_file(ddp_runs / "linear-1to2-rank1.safetensors"), states(single))


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(ddp_runs):
    for r in range(WORLD):
        record = json.loads((ddp_runs / f"nan-rank{r}.json").read_text())
        assert "non-finite loss at step 3" in record["error"]
        assert record["unchanged"] and record["skipped"] == 3


def test_deepgm_train_under_torchrun(tmp_path):
    """The CLI as users start it: torchrun, 2 processes, the U-Net DDPM on digits."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "deepgm.cli", "train", "demo-digits", "train.steps=4",
               "train.batch_size=16", "train.log_every=2", "train.checkpoint_every=2", "train.sample_every=4",
               "model.net.channels=16", "model.schedule.T=40", "sample.steps=3", "--out", str(run), "--quiet"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained demo-digits to step 4") == 1  # printed by rank 0 only
    assert [r["step"] for r in lines(run / "metrics.jsonl")] == [2, 4]
    assert (run / "samples" / "step-00000004.png").is_file() and (run / "config.yaml").is_file()
    assert latest_checkpoint(run).name == "step-00000004"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_rank_killed_mid_run_stops_the_others_within_a_bounded_time_and_the_run_resumes_alone(tmp_path):
    """kill -9 of one of two workers: nothing hangs (torchrun's agent sees the lost rank and stops the other), the
    exit status says the run failed, and the run resumes from its last checkpoint at another world size."""
    import signal
    import time

    from deepgm.cli import main

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = ["ddpm-toy", "train.steps=600", "train.batch_size=16", "train.log_every=20",
              "train.checkpoint_every=20", "train.sample_every=100000", "sample.steps=3"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "--monitor-interval=1", "-m", "deepgm.cli", "train", *config,
               "--out", str(run), "--quiet"]
    agent = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while latest_checkpoint(run) is None and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _children(agent.pid)
        assert agent.poll() is None and len(workers) == 2, "the run ended or never checkpointed before the kill"
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = agent.communicate(timeout=60)  # a hang would end here, as a failure
        stopped = time.monotonic() - killed
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0 and stopped < 30, f"{stopped:.0f} s"
    assert "Signal 9 (SIGKILL)" in err  # the agent's report names the lost rank's signal
    step = int(latest_checkpoint(run).name.split("-")[1])
    assert 0 < step < 600
    assert main(["train", *config, "--out", str(run), "--resume", "--quiet"]) == 0  # alone
    assert latest_checkpoint(run).name == "step-00000600"
