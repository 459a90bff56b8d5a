"""Runs end to end: config -> data -> model -> trainer -> checkpoint -> sampler -> evaluation -> pictures.

A run directory holds everything needed to resume, sample and evaluate:
  config.yaml, checkpoints/, metrics.jsonl, tb/, samples/, and what `sample` and `evaluate` write.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepgm.config import check_config, save_config
from deepgm.data import Dataset, load_dataset
from deepgm.diffusion.denoiser import Thresholded
from deepgm.diffusion.grids import CALIBRATED
from deepgm.diffusion.losses import noise_data, vlb
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.samplers import AUTO, AUTO_SAMPLERS, DEFAULT_GRIDS, SampleOutput, sample
from deepgm.files import write_json
from deepgm.likelihood import bits_per_dim
from deepgm.models import build_model
from deepgm.train import TrainConfig, Trainer, distributed, latest_checkpoint, load_weights
from deepgm.vae.experiments import evaluate_latent, iwae_summary
from deepgm.vae.vae import LatentVariableModel
from deepgm.viz import plot_metrics, save_image_grid, save_strip, scatter_2d
from deepgm.viz.score_plots import toy_run_pictures


def load_data(config: dict, split: str) -> Dataset:
    spec = dict(config["data"])
    return load_dataset(spec.pop("name"), split, **spec)


def _sampling_denoiser(model: DiffusionModel, data: Dataset, clip: bool):
    # images live in [-1, 1]: static clipping of x0 is the DDPM convention for them
    return Thresholded(model.denoiser) if clip and data.is_image else model.denoiser


def _class_labels(model: nn.Module, n: int, device) -> dict:
    classes = getattr(model, "num_classes", None)
    if not classes:
        return {}
    return {"y": torch.arange(n, device=device) % classes}


def draw_samples(model: DiffusionModel, data: Dataset, n: int, sampler: str, steps: int, seed: int,
                 clip: bool = True, progress: bool = False, return_trajectory: bool = False, **options):
    """n samples from a trained model; class-conditional models cycle through the classes."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    cond = _class_labels(model, n, device)
    if not isinstance(model, DiffusionModel):  # other families sample themselves: generate(n, generator, cond) -> x
        x = model.generate(n, generator, cond or None)
        return SampleOutput(x=x, nfe=getattr(model, "sampling_nfe", 1), times=torch.empty(0)), cond.get("y")
    return sample(_sampling_denoiser(model, data, clip), None, (n, *data.shape), sampler=sampler, steps=steps,
                  generator=generator, cond=cond, progress=progress, device=device,
                  return_trajectory=return_trajectory, **options), cond.get("y")


def save_samples_picture(x: torch.Tensor, data: Dataset, path: Path) -> Path:
    """A grid for images, a scatter over the data for 2-D points."""
    if data.is_image:
        return save_image_grid(x.clamp(-1, 1), path)
    if x.shape[1] == 2:
        return scatter_2d(x, path, reference=data.x[:2000])
    return path


def train_run(config: dict, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train the model a config describes into run_dir; resume=True continues an interrupted run exactly."""
    check_config(config)
    run_dir = Path(run_dir)
    train_config = TrainConfig.from_dict({"seed": config["seed"], **config["train"]})
    main = distributed.setup(train_config.device).is_main  # under torchrun: join the process group
    saved = run_dir / "config.yaml"
    if saved.exists() and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not latest_checkpoint(run_dir):
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} to resume from")
    distributed.barrier()  # every rank has looked before rank 0 writes
    torch.manual_seed(config["seed"])
    data = load_data(config, "train")
    model = build_model(config["model"], data)  # a bad model spec fails here, before anything is written
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, saved)
    grid = config["sample"]

    # previews: the weights change between them, so a calibrated grid would pay its pilot every time
    preview = {"grid": "trig"} if DEFAULT_GRIDS.get(grid["sampler"]) == CALIBRATED else {}
    preview_sampler = AUTO_SAMPLERS[0] if grid["sampler"] == AUTO else grid["sampler"]

    def sample_fn(ema_model: nn.Module, step: int) -> None:
        x, _ = draw_samples(ema_model, data, min(grid["n"], 64), preview_sampler, grid["steps"], config["seed"],
                            clip=grid.get("clip", True), **preview)
        save_samples_picture(x.x.cpu(), data, run_dir / "samples" / f"step-{step:08d}.png")

    trainer = Trainer(model, data, train_config, run_dir, sample_fn=sample_fn, progress=progress)
    if resume:
        trainer.resume()
    metrics = trainer.fit()
    if main:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    return metrics


@dataclasses.dataclass
class Run:
    """A trained run loaded for sampling or evaluation."""

    config: dict
    model: nn.Module
    data: Dataset
    weights: str
    step: int


def load_run(run_dir: str | Path, weights: str = "ema", device: str = "cpu") -> Run:
    """Rebuild a run's model from its config.yaml and load its latest checkpoint (EMA weights by default)."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); train one with `deepgm train`")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}; the run has not saved one yet")
    data = load_data(config, "train")
    model = build_model(config["model"], data)
    model.load_state_dict(load_weights(checkpoint, which=weights))
    model.to(device).eval()
    step = json.loads((checkpoint / "trainer.json").read_text()).get("step", 0)
    return Run(config=config, model=model, data=data, weights=weights, step=step)


def sample_run(run_dir: str | Path, sampler: str | None = None, steps: int | None = None, n: int = 64, seed: int = 0,
               out: str | Path | None = None, weights: str = "ema", progress: bool = True,
               **options) -> tuple[Path, SampleOutput]:
    """Write a sample grid (PNG) and the raw samples (.npz, with the grid's times) of a trained run; returns the
    PNG path and the samples."""
    run = load_run(run_dir, weights)
    grid = run.config["sample"]
    sampler = sampler or grid["sampler"]
    steps = steps or grid["steps"]
    result, labels = draw_samples(run.model, run.data, n, sampler, steps, seed, clip=grid.get("clip", True),
                                  progress=progress, **options)
    how = f"{sampler}-{steps}steps" if isinstance(run.model, DiffusionModel) else "ancestral"
    stem = Path(out) if out else Path(run_dir) / "samples" / f"{how}-seed{seed}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": result.x.cpu().numpy(), "nfe": np.array(result.nfe), "times": result.times.cpu().numpy()}
    if labels is not None:
        arrays["y"] = labels.cpu().numpy()
    np.savez(stem.with_suffix(".npz"), **arrays)
    return save_samples_picture(result.x.cpu(), run.data, stem.with_suffix(".png")), result


def process_pictures(run: Run, run_dir: Path, seed: int = 0) -> list[Path]:
    """The forward process on real images (x0 -> x_T) and a reverse trajectory, as PNG strips; on 2-D points the
    score field, reverse-SDE vs probability-flow-ODE paths and the ODE density next to the data."""
    if not run.data.is_image:
        return toy_run_pictures(run, run_dir, seed) if run.data.shape == (2,) else []
    schedule = run.model.schedule
    g = torch.Generator().manual_seed(seed)
    x0 = run.data.x[:6]
    times = torch.linspace(0, 1, 9, dtype=torch.float64)
    forward = [noise_data(schedule, x0, t.expand(len(x0)), g)[0] for t in times]
    rows = [torch.stack([f[i] for f in forward]) for i in range(len(x0))]  # (9, C, H, W) per image
    paths = [save_strip(rows, run_dir / "forward_process.png", labels=[f"t={t:.2f}" for t in times.tolist()])]
    result, _ = draw_samples(run.model, run.data, 6, "ddpm", min(schedule.T or 1000, 1000), seed,
                             return_trajectory=True)
    keep = torch.linspace(0, len(result.trajectory) - 1, 9).round().long()
    rows = [torch.stack([result.trajectory[k][i].clamp(-1, 1) for k in keep]) for i in range(6)]
    paths.append(save_strip(rows, run_dir / "reverse_process.png"))
    return paths


def evaluate_run(run_dir: str | Path, n_samples: int | None = None, sampler: str | None = None,
                 steps: int | None = None, vlb_examples: int | None = None, seed: int = 0,
                 progress: bool = True) -> dict:
    """FID / precision / recall against the test split, test bits/dim from the bound, and pictures."""
    from deepgm.eval import evaluate_samples, get_feature_net, sliced_wasserstein

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    spec = run.config["eval"]
    n_samples = n_samples or spec["n_samples"]
    sampler, steps = sampler or spec["sampler"], steps or spec["steps"]
    test = load_data(run.config, "test")
    result, labels = draw_samples(run.model, run.data, n_samples, sampler, steps, seed, progress=progress)
    metrics: dict = {"run": str(run_dir), "weights": run.weights, "step": run.step, "sampler": sampler,
                     "steps": steps, "nfe": result.nfe, "n_samples": n_samples}
    if run.data.is_image and run.data.num_classes:
        data_spec = {k: v for k, v in run.config["data"].items() if k != "name"}
        features = get_feature_net(run.config["data"]["name"], data_spec)
        metrics.update(evaluate_samples(result.x.cpu(), features, run.data.x, test.x, labels=labels))
    else:
        g = torch.Generator().manual_seed(seed)
        metrics["sliced_wasserstein"] = sliced_wasserstein(result.x.cpu(), test.x, generator=g)
        metrics["sliced_wasserstein_floor"] = sliced_wasserstein(run.data.x[: len(test)], test.x, generator=g)
    if spec.get("vlb", True) and getattr(run.model, "schedule", None) is not None and run.model.schedule.T:
        metrics.update(heldout_bits_per_dim(run.model, test, vlb_examples or spec["vlb_examples"], seed, progress))
    if isinstance(run.model, LatentVariableModel):  # IWAE_k NLL, ELBO terms, active units, MI and VAE pictures
        metrics.update(evaluate_latent(run.model, test, spec, run_dir, seed))
    write_json(run_dir / "eval.json", metrics)
    save_samples_picture(result.x[:64].cpu(), run.data, run_dir / "eval_samples.png")
    if isinstance(run.model, DiffusionModel):
        process_pictures(run, run_dir, seed)
    return metrics


def likelihood_run(run_dir: str | Path, n_examples: int | None = None, divergence: str = "hutchinson",
                   probes: int = 1, elbo_points: int = 64, seed: int = 0, weights: str = "ema",
                   iwae_k: int = 1000) -> dict:
    """Test-set likelihoods of a diffusion run in bits/dim with 95% intervals: the probability-flow ODE NLL
    (uniformly dequantised on discrete data) and the continuous ELBO; for a VAE, -IWAE_k. Written to RUN/nll.json."""
    from deepgm.diffusion.likelihood import elbo_nll, ode_nll

    run_dir = Path(run_dir)
    run = load_run(run_dir, weights)
    test = load_data(run.config, "test")
    metrics = {"run": str(run_dir), "weights": run.weights, "step": run.step, "levels": test.levels,
               "conditional": bool(run.model.num_classes) and test.y is not None}
    if isinstance(run.model, LatentVariableModel):  # VAEs: the importance-weighted bound with k = iwae_k samples
        metrics["iwae"] = iwae_summary(run.model, test, iwae_k, n_examples, seed)
    elif isinstance(run.model, DiffusionModel):
        x0 = test.x[:n_examples] if n_examples else test.x
        cond = {"y": test.y[: len(x0)]} if metrics["conditional"] else None
        denoiser = run.model.denoiser
        metrics["ode"] = ode_nll(denoiser, x0, test.levels, cond, divergence, probes,
                                 generator=torch.Generator().manual_seed(seed)).summary()
        metrics["elbo"] = elbo_nll(denoiser, x0, test.levels, elbo_points, torch.Generator().manual_seed(seed + 1),
                                   cond).summary()
    else:
        raise ValueError(f"--nll needs a diffusion model or a VAE; {run_dir} holds a {type(run.model).__name__}")
    write_json(run_dir / "nll.json", metrics)
    return metrics


def heldout_bits_per_dim(model: DiffusionModel, test: Dataset, n: int | None, seed: int, progress: bool) -> dict:
    """The full discrete bound on n test examples, in bits/dim with a 95% interval."""
    x0 = test.x[:n] if n else test.x
    g = torch.Generator().manual_seed(seed)
    cond = {"y": test.y[: len(x0)]} if getattr(model, "num_classes", None) and test.y is not None else None
    totals = []
    for start in range(0, len(x0), 256):
        batch_cond = {"y": cond["y"][start:start + 256]} if cond else None
        terms = vlb(model.denoiser, x0[start:start + 256], test.levels, g, batch_cond, progress=progress)
        totals.append(terms["total"])
    nll = torch.cat(totals)
    dims = x0[0].numel()
    bpd = bits_per_dim(nll, dims)
    return {"test_bpd": float(bpd.mean()), "test_bpd_ci95": float(1.96 * bpd.std() / math.sqrt(len(bpd))),
            "bpd_examples": len(x0), "bpd_levels": test.levels,
            "bpd_note": "discrete VLB over the data's levels, no dequantisation (bins of width 2/(levels-1))"}
