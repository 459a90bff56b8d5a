"""The training loop: exact resume, skipped non-finite steps, schedules, logs, atomic checkpoints, batching."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from deepgm.data.base import Dataset
from deepgm.train import (
    EMA,
    BatchSampler,
    TrainConfig,
    Trainer,
    ema_decay_at,
    latest_checkpoint,
    learning_rate,
    load_weights,
)
from tiny_models import Regression


class Noisy(nn.Module):
    """A tiny denoising MLP: its loss draws noise from the generator, so generator state matters for resume."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.SiLU(), nn.Linear(16, dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def loss(self, batch, generator):
        x = batch["x"]
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        mse = (self.net(x + 0.5 * noise) - x).pow(2).mean()
        self.calls += 1
        return mse, {"mse": mse.detach(), "noise_std": float(noise.std())}


class Broken(nn.Module):
    """Goes non-finite from update `bad_from` on: a NaN term ("nan") or an infinite gradient ("grad")."""

    def __init__(self, mode: str, bad_from: int = 0):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.mode, self.bad_from, self.calls = mode, bad_from, 0

    def loss(self, batch, generator):
        mse = self.fc(batch["x"]).pow(2).mean()
        bad = self.calls >= self.bad_from
        self.calls += 1
        if bad and self.mode == "nan":
            blown = mse * float("nan")
            return blown, {"blown_term": blown.detach(), "fine_term": 1.0}
        if bad:  # sqrt at 0: finite value, infinite gradient
            w = self.fc.weight
            return mse + (w - w.detach()).abs().sum().sqrt(), {"fine_term": 1.0}
        return mse, {"fine_term": 1.0}


def vectors(n: int = 50, dim: int = 4, seed: int = 0) -> Dataset:
    return Dataset("vectors", torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)))


def tiny(**overrides) -> TrainConfig:
    options = dict(steps=24, batch_size=8, lr=1e-2, warmup_steps=5, lr_schedule="cosine", ema_decay=0.9,
                   log_every=5, checkpoint_every=12, device="cpu")
    return TrainConfig(**{**options, **overrides})


def make(cls=Noisy, *args, seed: int = 0):
    torch.manual_seed(seed)
    return cls(*args)


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Killed(Exception):
    pass


def test_resume_is_bitwise_exact(tmp_path):
    straight = Trainer(make(), vectors(), tiny(), tmp_path / "a", progress=False)
    straight.fit()

    def kill_at_12(model, step):  # runs after the step-12 checkpoint: a kill between two steps
        raise Killed

    first = Trainer(make(), vectors(), tiny(sample_every=12), tmp_path / "b", sample_fn=kill_at_12, progress=False)
    with pytest.raises(Killed):
        first.fit()
    del first
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a line written after the checkpoint, then killed
        f.write(json.dumps({"step": 13, "loss": 1.0}) + "\n" + '{"step": 14, "lo')

    resumed = Trainer(make(seed=1), vectors(), tiny(), tmp_path / "b", progress=False)
    assert resumed.resume() and resumed.step == 12
    assert not same_weights(resumed.model, make(seed=1))  # weights really came from the checkpoint
    resumed.fit()
    assert resumed.step == 24
    assert same_weights(resumed.model, straight.model)
    assert same_weights(resumed.ema_model, straight.ema_model)
    assert not same_weights(resumed.model, resumed.ema_model)
    assert torch.equal(resumed.noise_generator.get_state(), straight.noise_generator.get_state())
    assert [r["step"] for r in lines(tmp_path / "b")] == [r["step"] for r in lines(tmp_path / "a")] == [5, 10, 15,
                                                                                                         20, 24]


def test_resume_without_checkpoint_returns_false(tmp_path):
    assert not Trainer(make(), vectors(), tiny(), tmp_path, progress=False).resume()


def test_loss_falls_on_regression(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    data = Dataset("regression", x, x @ torch.randn(4, 2, generator=g))
    config = TrainConfig(steps=150, batch_size=32, lr=3e-2, warmup_steps=10, log_every=10, device="cpu")
    metrics = Trainer(make(Regression), data, config, tmp_path, progress=False).fit()
    losses = [r["loss"] for r in lines(tmp_path)]
    assert metrics["step"] == 150 and losses[-1] < 0.02 * losses[0]


def test_warmup_and_cosine_learning_rates(tmp_path):
    config = tiny(steps=20, warmup_steps=4, lr=1.0, log_every=1)
    assert [learning_rate(config, k) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = [learning_rate(config, k) for k in range(4, 20)]
    assert all(a > b for a, b in zip(cosine, cosine[1:], strict=False)) and cosine[-1] < 0.02
    assert learning_rate(tiny(steps=20, warmup_steps=4, lr=1.0, lr_schedule="constant"), 19) == 1.0
    Trainer(make(), vectors(), config, tmp_path, progress=False).fit()
    assert [r["lr"] for r in lines(tmp_path)] == [learning_rate(config, k) for k in range(20)]


@pytest.mark.parametrize("mode,term", [("nan", "blown_term"), ("grad", "grad_norm")])
def test_non_finite_steps_are_skipped_then_raise(tmp_path, mode, term):
    model = make(Broken, mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, vectors(), tiny(max_skipped_steps=3, checkpoint_every=1), tmp_path, progress=False)
    with pytest.raises(FloatingPointError, match=rf"{term}.*step 3") as info:
        trainer.fit()
    assert "fine_term" not in str(info.value)
    assert trainer.skipped_steps == 3
    assert same_weights(trainer.model, before_module(before)) and same_weights(trainer.ema_model, trainer.model)
    for which in ("raw", "ema"):  # the checkpoints written meanwhile hold the finite weights
        assert all(torch.isfinite(v).all() for v in load_weights(tmp_path, which).values())


def before_module(state: dict) -> nn.Module:
    module = Broken("nan")
    module.load_state_dict(state)
    return module


def test_a_skipped_step_leaves_weights_unchanged(tmp_path):
    config = tiny(steps=2, ema_decay=0.5, lr_schedule="constant")
    two = Trainer(make(Broken, "nan", 99), vectors(), config, tmp_path / "two", progress=False)
    two.fit()
    three = Trainer(make(Broken, "nan", 2), vectors(), tiny(steps=3, ema_decay=0.5, lr_schedule="constant"),
                    tmp_path / "three", progress=False)
    metrics = three.fit()
    assert same_weights(three.model, two.model) and same_weights(three.ema_model, two.ema_model)
    assert three.skipped_steps == 1 and metrics["skipped_steps"] == 1


def test_checkpoints_are_atomic_and_latest_is_respected(tmp_path):
    trainer = Trainer(make(), vectors(), tiny(steps=15, checkpoint_every=5, keep_checkpoints=2), tmp_path,
                      progress=False)
    trainer.fit()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000010", "step-00000015"]
    # a write killed half-way leaves a .tmp directory, even one that looks complete: it is never loaded
    leftover = root / "step-00000020.tmp"
    leftover.mkdir()
    (leftover / "trainer.json").write_text("{}")
    (root / "latest").write_text("step-00000010\n")
    assert latest_checkpoint(tmp_path) == root / "step-00000010"
    resumed = Trainer(make(seed=3), vectors(), tiny(steps=15), tmp_path, progress=False)
    assert resumed.resume() and resumed.step == 10
    # a dangling `latest` falls back to the newest complete checkpoint
    (root / "latest").write_text("step-00000099\n")
    assert latest_checkpoint(tmp_path) == root / "step-00000015"


def test_checkpoint_files_and_load_weights(tmp_path):
    trainer = Trainer(make(), vectors(), tiny(steps=6, checkpoint_every=0), tmp_path, progress=False)
    trainer.fit()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-00000006"
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "model.safetensors", "trainer.json",
                                                      "trainer.safetensors"]
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert f.metadata()["weights"] == "raw" and f.metadata()["step"] == "6"
    with safe_open(ckpt / "ema.safetensors", "pt") as f:
        assert f.metadata()["weights"] == "ema" and float(f.metadata()["decay"]) == 0.9
    with safe_open(ckpt / "trainer.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"generator.data", "generator.noise", "optimizer.net.0.weight.exp_avg"} <= keys
    record = json.loads((ckpt / "trainer.json").read_text())
    assert record["step"] == 6 and record["config"]["batch_size"] == 8
    assert record["optimizer"]["param_groups"][0]["lr"] == learning_rate(trainer.config, 5)
    ema = load_weights(ckpt)
    assert all(torch.equal(ema[k], v) for k, v in trainer.ema_model.state_dict().items())
    raw = load_weights(tmp_path, which="raw")  # a run directory means its latest checkpoint
    assert all(torch.equal(raw[k], v) for k, v in trainer.model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_weights(tmp_path / "nowhere")


def test_metrics_and_tensorboard_are_written(tmp_path):
    metrics = Trainer(make(), vectors(), tiny(steps=12), tmp_path, progress=False).fit()
    records = lines(tmp_path)
    assert [r["step"] for r in records] == [5, 10, 12]
    for key in ("loss", "mse", "noise_std", "lr", "grad_norm", "skipped_steps", "sec_per_step", "examples_per_sec"):
        assert math.isfinite(records[-1][key]), key
    assert metrics == records[-1]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_train_config_from_dict():
    config = TrainConfig.from_dict({"steps": 10, "lr": "2e-4", "betas": [0.9, 0.99], "grad_clip": None})
    assert config.lr == 2e-4 and config.betas == (0.9, 0.99) and config.grad_clip is None
    with pytest.raises(ValueError, match=r"stepz.*valid options.*'steps'"):
        TrainConfig.from_dict({"stepz": 3})
    for bad in ({"steps": 0}, {"batch_size": -1}, {"lr_schedule": "linear"}, {"amp": "fp8"}, {"steps": 2.5},
                {"lr": "fast"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig.from_dict(bad)


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        Trainer(make(), vectors(), tiny(amp="fp16", device="cpu"), tmp_path, progress=False)


def test_bf16_trains_on_cpu(tmp_path):
    trainer = Trainer(make(), vectors(), tiny(steps=6, amp="bf16"), tmp_path, progress=False)
    metrics = trainer.fit()
    assert math.isfinite(metrics["loss"]) and trainer.skipped_steps == 0
    assert all(p.dtype == torch.float32 for p in trainer.ema_model.parameters())


def test_sample_fn_gets_the_ema_model_in_eval_mode(tmp_path):
    calls = []

    def sample_fn(model, step):
        calls.append((step, model is trainer.ema_model, model.training, torch.is_grad_enabled()))

    trainer = Trainer(make(), vectors(), tiny(steps=10, sample_every=4), tmp_path, sample_fn=sample_fn,
                      progress=False)
    trainer.fit()
    assert calls == [(4, True, False, False), (8, True, False, False), (10, True, False, False)]


def test_batch_sampler_is_a_function_of_seed_and_step():
    a, b, other = BatchSampler(50, 8, seed=1), BatchSampler(50, 8, seed=1), BatchSampler(50, 8, seed=2)
    for step in (0, 7, 100, 3):
        assert torch.equal(a(step), b(step))
    assert not torch.equal(a(0), other(0))
    epoch = torch.cat([a(k) for k in range(50 // 8)])  # one epoch: no example twice, last partial batch dropped
    assert len(epoch) == 48 and len(set(epoch.tolist())) == 48
    ranks = [BatchSampler(50, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in (0, 9):
        halves = [r(step) for r in ranks]
        assert len(halves[0]) == len(halves[1]) == 4 and not set(halves[0].tolist()) & set(halves[1].tolist())
        assert torch.equal(torch.cat(halves), a(step))
    with pytest.raises(ValueError, match="larger than the dataset"):
        BatchSampler(5, 8)


def test_ema_warmup_and_zero_decay():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 10**6) == 0.999
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100)
    assert torch.allclose(ema.module.weight, start + 0.5)
    copy = EMA(model, decay=0.0)
    with torch.no_grad():
        model.weight.mul_(3.0)
    copy.update(model, step=0)
    assert torch.equal(copy.module.weight, model.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_resume_is_exact(tmp_path, amp):
    config = tiny(device="cuda", amp=amp, lr_schedule="constant")  # constant: the first leg may stop at 12
    straight = Trainer(make(), vectors(), config, tmp_path / "a", progress=False)
    straight.fit()
    first = Trainer(make(), vectors(), tiny(device="cuda", amp=amp, lr_schedule="constant", steps=12),
                    tmp_path / "b", progress=False)
    first.fit()
    resumed = Trainer(make(), vectors(), config, tmp_path / "b", progress=False)
    assert resumed.resume() and resumed.step == 12
    resumed.fit()
    assert resumed.noise_generator.device.type == "cuda"
    assert same_weights(resumed.ema_model, straight.ema_model) and same_weights(resumed.model, straight.model)
