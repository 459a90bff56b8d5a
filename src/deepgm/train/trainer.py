"""The training loop: AdamW with warm-up, clipping, EMA, AMP, skipped non-finite steps, logs and exact resume.

A trainable model is any nn.Module with `loss(batch, generator) -> (scalar loss, {name: term})` that draws
all its randomness from `generator`; with that, a resumed run is bitwise the run that never stopped.

Under torchrun the same loop is data-parallel (DistributedDataParallel; see distributed.py): `batch_size` is
the global batch, each process computes the mean loss on its own slice with its own noise stream, and DDP's
gradient average makes the update that of the whole batch. Scalars are averaged over processes before
they are logged or checked for non-finite values, so every process takes the same decisions and holds the
same weights and EMA; only rank 0 writes logs, checkpoints and pictures.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from deepgm.data.base import Dataset
from deepgm.train import distributed
from deepgm.train.checkpoint import CheckpointError, intact_checkpoint, load_checkpoint, save_checkpoint
from deepgm.train.ema import EMA


@dataclass
class TrainConfig:
    """Hyper-parameters of a run; 0 turns off grad_clip, ema_decay (EMA = copy), sample_every, checkpoint_every."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # or "cosine": decays to 0 at `steps` after the warm-up
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    amp: str = "none"  # "bf16" (CPU or CUDA), "fp16" (CUDA, with a GradScaler) or "auto" (see resolve_amp)
    channels_last: bool = False  # channels-last memory format for the model's 4-D weights and image batches
    compile: bool = False  # torch.compile the model's loss (forward and backward)
    device: str = "auto"
    seed: int = 0
    log_every: int = 50
    sample_every: int = 0  # sample_fn also runs at the end
    checkpoint_every: int = 500  # checkpoints are also written at the end
    keep_checkpoints: int = 2  # 0 keeps all
    max_skipped_steps: int = 20  # consecutive skipped (non-finite) updates before FloatingPointError
    init_from: str = ""  # a run (or checkpoint) directory whose EMA weights a new run starts from (train_run)

    def __post_init__(self):
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"train option {name} must be {what}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size"):
            need(_is_int(getattr(self, name)) and getattr(self, name) > 0, name, "a positive integer")
        for name in ("warmup_steps", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                     "max_skipped_steps"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(_is_int(self.seed), "seed", "an integer")
        need(_is_real(self.lr) and 0 < self.lr < math.inf, "lr", "a finite number > 0")
        need(_is_real(self.weight_decay) and 0 <= self.weight_decay < math.inf, "weight_decay", "a finite number >= 0")
        need(len(self.betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in self.betas), "betas",
             "two numbers in [0, 1)")
        need(self.grad_clip is None or _is_real(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "None or >= 0")
        need(_is_real(self.ema_decay) and 0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)")
        need(self.lr_schedule in ("constant", "cosine"), "lr_schedule", "'constant' or 'cosine'")
        need(self.amp in ("none", "bf16", "fp16", "auto"), "amp", "'none', 'bf16', 'fp16' or 'auto'")
        need(isinstance(self.device, str), "device", "a string such as 'auto', 'cpu' or 'cuda'")
        for name in ("channels_last", "compile"):
            need(isinstance(getattr(self, name), bool), name, "true or false")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a config mapping, naming unknown keys and coercing YAML's strings/ints to numbers."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown train option(s) {unknown}; valid options are {valid}")
        defaults = cls()
        return cls(**{k: _coerce(k, v, getattr(defaults, k)) for k, v in d.items()})


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coerce(name: str, value, default):
    """YAML reads `2e-4` as a string and `1` as an int: convert to the field's type or say which option is wrong."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if value is None or isinstance(default, str) or _is_int(value) and _is_int(default):
            return value
        if isinstance(value, bool):
            raise TypeError
        if _is_int(default):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if isinstance(default, float):
            return float(value)
        return tuple(float(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"train option {name} must be like {default!r}, got {value!r}") from None


def resolve_amp(amp: str, device: torch.device) -> str:
    """amp='auto' is bf16 autocast where the device has fast bf16 kernels (a CUDA GPU that supports bf16; a CPU
    with oneDNN's bf16 kernels, i.e. AVX-512 or Arm bf16) and none elsewhere; other values are returned as given."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        try:
            return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
                else "none"
        except (AttributeError, RuntimeError):
            return "none"
    return "none"


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of update `step` (0-based): linear warm-up, then constant or cosine decay to 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr


class BatchSampler:
    """Example indices for step k as a function of (seed, k) only: one shuffle per epoch, last partial batch
    dropped. `batch_size` is global; rank r of world_size takes the r-th disjoint slice of each batch."""

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} (rank {rank})")
        if num_examples < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_examples} examples)")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.local = rank, batch_size // world_size
        self.generator = torch.Generator()
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.num_examples // self.batch_size)
        if epoch != self._epoch:
            # a stream of its own per epoch, distinct from the noise generator's (seeded with `seed`)
            self.generator.manual_seed((self.seed * 0x9E3779B1 + epoch + 1) % 2**63)
            self._perm = torch.randperm(self.num_examples, generator=self.generator)
            self._epoch = epoch
        start = k * self.batch_size + self.rank * self.local
        return self._perm[start:start + self.local]


def _floats(values: dict, mean_over_ranks: bool = False) -> dict[str, float]:
    """Scalars as Python floats with a single device-to-host copy (one sync per step); with mean_over_ranks,
    each is first averaged over the processes (one all-reduce; the same key order on every rank)."""
    keys = sorted(k for k, v in values.items() if torch.is_tensor(v))
    if mean_over_ranks:
        device = values[keys[0]].device if keys else torch.device("cpu")
        plain = sorted(k for k in values if k not in keys)
        stacked = torch.cat([torch.stack([values[k].detach().double().mean().to(device) for k in keys])
                             if keys else torch.zeros(0, dtype=torch.float64, device=device),
                             torch.tensor([float(values[k]) for k in plain], dtype=torch.float64, device=device)])
        return dict(zip(keys + plain, distributed.all_reduce_mean(stacked).tolist(), strict=True))
    if keys:
        device = values[keys[0]].device
        stacked = torch.stack([values[k].detach().double().mean().to(device) for k in keys]).tolist()
        values = {**values, **dict(zip(keys, stacked, strict=True))}
    return {k: float(v) for k, v in values.items()}


class _LossForward(nn.Module):
    """`model.loss` as a module's forward: the call DistributedDataParallel and torch.compile wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        return self.model.loss(batch, generator)


class Trainer:
    """Trains `model` on `data` into `run_dir` (metrics.jsonl, tb/, checkpoints/); see TrainConfig.

    Started by torchrun, it joins the process group and trains data-parallel (module docstring).
    """

    def __init__(self, model: nn.Module, data: Dataset, config: TrainConfig, run_dir: str | Path,
                 sample_fn: Callable[[nn.Module, int], None] | None = None, progress: bool = True):
        self.config, self.data, self.run_dir = config, data, Path(run_dir)
        self.sample_fn, self.progress = sample_fn, progress
        self.dist = distributed.setup(config.device)
        self.device = self.dist.device
        self.amp = resolve_amp(config.amp, self.device)  # what autocast runs: none, bf16 or fp16
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ValueError(f"amp='fp16' needs a CUDA device (got {self.device}); use amp='bf16' on CPU")
        self.model = model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._loss = _LossForward(self.model)
        if self.dist.world_size > 1:  # DDP starts every rank from rank 0's weights and buffers
            self._loss = DistributedDataParallel(
                self._loss, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            self._loss = torch.compile(self._loss)
        self.ema = EMA(self.model, config.ema_decay)
        self.ema_model = self.ema.module
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.sampler = BatchSampler(len(data), config.batch_size, config.seed, self.dist.rank, self.dist.world_size)
        # each rank its own noise stream; rank 0's is the single-process one
        self.noise_generator = torch.Generator(device=self.device).manual_seed(
            distributed.rank_seed(config.seed, self.dist.rank))
        self.step = self.skipped_steps = self.consecutive_skips = 0
        self.metrics: dict = {}

    def _generators(self) -> dict[str, torch.Generator]:
        return {"data": self.sampler.generator, "noise": self.noise_generator}

    def _autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _train_step(self) -> tuple[dict[str, float], bool]:
        """One update at self.step; returns its scalars and whether it was applied (False: skipped)."""
        lr = learning_rate(self.config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.data.batch(self.sampler(self.step)).items()}
        if self.config.channels_last:
            batch = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                     for k, v in batch.items()}
        self._loss.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss, terms = self._loss(batch, self.noise_generator)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip and check the true gradients
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        values = {"loss": loss, **terms}
        values.update(loss=loss, grad_norm=grad_norm)  # the trainer's own names win over same-named terms
        values = _floats(values, mean_over_ranks=self.dist.world_size > 1)  # the same on every rank
        ok = math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])
        if ok:
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.ema.update(self.model, self.step)
        if self.scaler:
            self.scaler.update()  # after a skip this backs the scale off
        return {**values, "lr": lr}, ok

    def fit(self) -> dict:
        """Train until config.steps; returns the last logged metrics."""
        from torch.utils.tensorboard import SummaryWriter  # slow import, only needed here

        cfg = self.config
        if self.step >= cfg.steps:
            return self.metrics or {"step": self.step}
        main = self.dist.is_main
        writer = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_metrics()
            writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step + 1 if self.step else None)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.progress and main), desc="train",
                   dynamic_ncols=True)
        sums: dict[str, float] = {}
        good = steps = 0
        seconds = 0.0
        try:
            while self.step < cfg.steps:
                start = time.perf_counter()
                values, ok = self._train_step()
                seconds += time.perf_counter() - start
                self.step += 1
                steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
                if ok:
                    self.consecutive_skips = 0
                    good += 1
                    sums = {k: sums.get(k, 0.0) + v for k, v in values.items()}
                else:
                    self._skip(values)
                end = self.step == cfg.steps
                if end or (cfg.log_every and self.step % cfg.log_every == 0):
                    # means over the applied updates since the last line; the latest values if none was applied
                    means = {k: v / good for k, v in sums.items()} if good else values
                    self._log({**means, "lr": values["lr"]}, steps, seconds, writer)
                    sums, good, steps, seconds = {}, 0, 0, 0.0
                if end or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    self.save()
                if self.sample_fn and (end or (cfg.sample_every and self.step % cfg.sample_every == 0)):
                    if main:
                        self.ema_model.eval()
                        with torch.no_grad():
                            self.sample_fn(self.ema_model, self.step)
                    distributed.barrier()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return self.metrics

    def _skip(self, values: dict[str, float]) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.config.max_skipped_steps:
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            raise FloatingPointError(
                f"non-finite {', '.join(bad)} at step {self.step}: {self.consecutive_skips} consecutive updates "
                f"skipped (max_skipped_steps={self.config.max_skipped_steps}); weights are those of the last "
                f"finite update")

    def _log(self, values: dict[str, float], steps: int, seconds: float, writer) -> None:
        """Record a metrics line (on every rank, so all return the same metrics); rank 0 writes it."""
        record = {"step": self.step, **values, "skipped_steps": self.skipped_steps,
                  "sec_per_step": seconds / max(steps, 1),
                  "examples_per_sec": self.config.batch_size * steps / max(seconds, 1e-12)}
        self.metrics = record
        if writer is None:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(f"train/{key}", value, self.step)

    def _truncate_metrics(self) -> None:
        """Drop log lines past self.step (written after the checkpoint we resumed from) and any cut-off line."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= self.step:
                kept.append(line + "\n")
                self.metrics = record
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically; see checkpoint.py). Under DDP every rank calls
        it: rank 0 writes, with every rank's noise generator state (`generator.noise.rankR` for R > 0)."""
        path = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        generators = self._generators()
        states = distributed.all_gather(self.noise_generator.get_state())
        for r, state in enumerate(states[1:], start=1):
            generators[f"noise.rank{r}"] = torch.Generator(device=self.device)
            generators[f"noise.rank{r}"].set_state(state)
        if self.dist.is_main:
            extra = {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                     "world_size": self.dist.world_size, "amp": self.amp, "config": asdict(self.config)}
            path = save_checkpoint(self.run_dir, self.step, self.model, self.ema_model, self.optimizer,
                                   generators, extra, self.scaler, self.config.ema_decay,
                                   self.config.keep_checkpoints)
        distributed.barrier()  # the checkpoint is complete before any rank goes on
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint in run_dir if there is one; returns whether it did.

        Resuming at the world size that wrote the checkpoint is bitwise exact (each rank restores its own noise
        stream). At another world size the weights, EMA, optimizer, step and data order (global batches depend
        on (seed, step) only) carry over exactly; rank 0 restores its noise stream and ranks the checkpoint has
        none for start a fresh one, rank_seed(seed, rank, step), so the noise differs from an uninterrupted run.
        """
        path, damaged = intact_checkpoint(self.run_dir)
        if damaged and path is None:
            raise CheckpointError(f"no intact checkpoint in {self.run_dir / 'checkpoints'} to resume from; "
                                  "train again without --resume into a new directory")
        if damaged and self.dist.rank == 0:
            for bad, problem in damaged:
                print(f"checkpoint {bad} is damaged: {problem}; skipped", flush=True)
            print(f"resuming from {path.name}, the newest intact checkpoint", flush=True)
        if self.dist.world_size > 1:  # every rank must see the same checkpoint (a filesystem all nodes share)
            seen = distributed.all_gather(torch.tensor([-1 if path is None else int(path.name[5:13])]))
            if len({int(s) for s in seen}) > 1:
                raise FileNotFoundError(
                    f"ranks see different latest checkpoints in {self.run_dir / 'checkpoints'} (steps by rank: "
                    f"{[int(s) for s in seen]}, -1 = none): multi-node runs need run_dir on a shared filesystem")
        if path is None:
            return False
        generators = {"data": self.sampler.generator}
        noise = "noise" if self.dist.rank == 0 else f"noise.rank{self.dist.rank}"
        if (path / "trainer.safetensors").is_file():
            with safe_open(path / "trainer.safetensors", "pt") as f:
                if f"generator.{noise}" in f.keys():
                    generators[noise] = self.noise_generator
        record = load_checkpoint(path, self.model, self.ema_model, self.optimizer, generators, self.scaler,
                                 verified=True)
        self.step = record["step"]
        if noise not in generators:
            self.noise_generator.manual_seed(distributed.rank_seed(self.config.seed, self.dist.rank, self.step))
        self.skipped_steps = record.get("skipped_steps", 0)
        self.consecutive_skips = record.get("consecutive_skips", 0)
        saved = record.get("config", {})
        changed = [k for k in ("seed", "batch_size") if k in saved and saved[k] != getattr(self.config, k)]
        if changed:
            warnings.warn(f"resuming with a different {', '.join(changed)}: the data order and noise will differ "
                          f"from an uninterrupted run", stacklevel=2)
        if record.get("world_size", 1) != self.dist.world_size and self.dist.is_main:
            warnings.warn(f"resuming a checkpoint written by {record.get('world_size', 1)} process(es) with "
                          f"{self.dist.world_size}: weights, EMA, optimizer and data order carry over exactly; the "
                          f"per-example noise differs from an uninterrupted run (each process draws its own)",
                          stacklevel=2)
        if self.dist.is_main:
            self._truncate_metrics()
        return True
