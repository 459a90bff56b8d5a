"""The run layer: config -> data -> model -> trainer -> checkpoint -> samples -> evaluation -> pictures.

A run directory holds everything needed to resume, sample and evaluate:
  config.yaml (with a `resolved` section: the data's shape, levels and classes, and the model's conditions),
  checkpoints/, metrics.jsonl, tb/, samples/, and what `sample` and `evaluate` write.
This layer speaks to models only through the family protocol of deepgm.family (loss, generate, likelihoods,
evaluate, pictures) and builds them through the registry of deepgm.models, so it knows no family by type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from deepgm.config import check_config, save_config
from deepgm.data import Dataset, load_dataset
from deepgm.data.base import DataSpec, dataset_splits
from deepgm.family import SampleOutput, SamplingPlan, generate_chunked
from deepgm.files import beside, write_json, write_npz
from deepgm.models import build_model
from deepgm.train import (
    TrainConfig,
    Trainer,
    distributed,
    init_from,
    latest_checkpoint,
    load_state,
    usable_checkpoint,
)
from deepgm.viz import plot_metrics, save_image_grid, save_strip, scatter_2d

# previews during training: the weights change between them, so a calibrated grid would pay its pilot each time
PREVIEW = {"sampler": "trig-abm", "grid": "trig"}


def load_data(config: dict, split: str) -> Dataset:
    spec = dict(config["data"])
    return load_dataset(spec.pop("name"), split, **spec)


def save_samples_picture(x: torch.Tensor, path: Path, reference: torch.Tensor | None = None) -> Path:
    """A grid for images, a scatter (over the data, if given) for 2-D points."""
    if x.dim() == 4:
        return save_image_grid(x.clamp(-1, 1), path)
    if x.dim() == 2 and x.shape[1] == 2:
        return scatter_2d(x, path, reference=reference)
    return path


def plan_for(run_or_config, section: str = "sample", **overrides) -> SamplingPlan:
    """The sampling plan of a config's `sample:` or `eval:` section (eval's guidance and threshold default to
    sample's), with the given fields replaced where not None."""
    config = getattr(run_or_config, "config", run_or_config)
    spec = dict(config["sample"])
    if section == "eval":
        spec.update({k: v for k, v in config["eval"].items() if k in ("sampler", "steps", "grid", "guidance",
                                                                       "threshold", "clip", "options",
                                                                       "augmentation")})
    return SamplingPlan.from_config(spec, **overrides)


def data_fingerprint(data: Dataset) -> str:
    """SHA-256 of the training tensors (x, and labels y where there are any): the run records which data it saw."""
    digest = hashlib.sha256()
    for tensor in (data.x, data.y):
        if tensor is not None:
            digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def versions() -> dict:
    """The versions a run was trained with: deepgm, torch, python."""
    import deepgm  # the package imports this module

    return {"deepgm": deepgm.__version__, "torch": str(torch.__version__), "python": platform.python_version()}


class RunDirectoryError(OSError):
    """The run directory cannot hold the run: not writable, or too little free space."""


CHECKPOINT_COPIES = 4  # a checkpoint holds the weights, their EMA and AdamW's two moments
SLACK_BYTES = 16 << 20  # logs, sample grids, TensorBoard events


def check_run_dir(run_dir: Path, model: nn.Module, keep: int) -> None:
    """Before training: the run directory can be written, and its disk has room for the checkpoints the run keeps
    plus the one being written; otherwise one clear error, with nothing written."""
    existed = run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirectoryError(f"cannot write to the run directory {run_dir} ({err.strerror}); choose another "
                                "--out") from None
    checkpoint = CHECKPOINT_COPIES * sum(p.numel() * p.element_size() for p in model.parameters())
    need = checkpoint * ((keep or 1) + 1) + SLACK_BYTES
    free = shutil.disk_usage(run_dir).free
    if free < need:
        if not existed:
            run_dir.rmdir()  # leave nothing behind
        raise RunDirectoryError(f"the disk of {run_dir} has {free / 2**20:.1f} MiB free; this run needs about "
                                f"{need / 2**20:.1f} MiB ({keep or 1} checkpoints of {checkpoint / 2**20:.1f} MiB "
                                "kept, one more while it is written, and logs); free some space or choose another "
                                "--out")


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
        if not saved.exists():
            raise FileNotFoundError(f"--resume: {run_dir} holds no run to resume; train without --resume")
        if main:  # stopped before its first checkpoint: nothing to lose, so it starts again
            print(f"{run_dir} has no checkpoint yet (stopped before its first one); starting it from step 0",
                  flush=True)
        resume = False
    distributed.barrier()  # every rank has looked before rank 0 writes
    torch.manual_seed(config["seed"])
    data = load_data(config, "train")
    model = build_model(config["model"], data.spec)  # a bad model spec fails here, before anything is written
    model.conditioning.prepare(data)  # e.g. caption token ids, once
    if train_config.init_from and not resume:  # e.g. a distilled student starts as its teacher
        new = init_from(model, train_config.init_from)
        if main:
            print(f"started from the EMA weights of {train_config.init_from}"
                  + (f"; {len(new)} new tensors keep their initialisation (e.g. {new[0]})" if new else ""), flush=True)
    plan = plan_for(config)  # so does a bad sampling plan
    calibrated = plan.sampler in ("auto", "trig-abm") and plan.grid is None or plan.grid == "calibrated"
    preview = plan.replace(**PREVIEW) if calibrated else plan
    config = {**config, "resolved": {"data": data.spec.to_dict(), "conditions": model.conditioning.spec(),
                                     "data_sha256": data_fingerprint(data), "versions": versions()}}
    if main and resume and saved.exists():
        import yaml

        before = (yaml.safe_load(saved.read_text()).get("resolved") or {}).get("data_sha256")
        if before and before != config["resolved"]["data_sha256"]:
            print(f"warning: the training data of {run_dir} changed since the run started (SHA-256 {before[:12]}... "
                  f"then, {config['resolved']['data_sha256'][:12]}... now); resuming on the new data", flush=True)

    def sample_fn(ema_model: nn.Module, step: int) -> None:
        n = min(config["sample"]["n"], 64)
        result = generate_chunked(ema_model, n, config["seed"], preview, model.conditioning.examples(data, n))
        save_samples_picture(result.x.cpu(), run_dir / "samples" / f"step-{step:08d}.png", data.x[:2000])

    # before anything is written: the trainer refuses a batch larger than the data (e.g. a file of 3 images) and
    # options the device lacks, which would otherwise leave a run directory holding only config.yaml
    trainer = Trainer(model, data, train_config, run_dir, sample_fn=sample_fn, progress=progress)
    if main:
        check_run_dir(run_dir, model, train_config.keep_checkpoints)
        save_config(config, saved)
    if resume:
        trainer.resume()
    metrics = trainer.fit()
    if main:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    return metrics


@dataclasses.dataclass
class Run:
    """A trained run loaded for sampling or evaluation: its config, model, data spec, weights and step."""

    config: dict
    model: nn.Module
    data: DataSpec
    weights: str
    step: int


def load_run(run_dir: str | Path, weights: str = "ema", device: str = "cpu") -> Run:
    """Rebuild a run's model from its config.yaml and load its latest checkpoint (EMA weights by default). The
    data's shape, levels and classes come from the config's `resolved` section (older runs: from the dataset)."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); train one with `deepgm train`")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    checkpoint = usable_checkpoint(run_dir)  # a damaged one: a CheckpointError naming the newest intact one
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}; the run has not saved one yet")
    resolved = config.get("resolved", {}).get("data")
    spec = DataSpec.from_dict(resolved) if resolved else load_data(config, "train").spec
    model = build_model(config["model"], spec)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    file = checkpoint / ("ema.safetensors" if weights == "ema" else "model.safetensors")
    load_state(model, file, load_file(file))  # usable_checkpoint has checked the files: no second hashing
    model.to(device).eval()
    step = json.loads((checkpoint / "trainer.json").read_text()).get("step", 0)
    return Run(config=config, model=model, data=spec, weights=weights, step=step)


def load_prepared(run: Run, split: str) -> Dataset:
    """A split of the run's data with what the model's conditions derive from it (caption token ids)."""
    return run.model.conditioning.prepare(load_data(run.config, split))


def draw(run: Run, n: int, seed: int, plan: SamplingPlan, cond: dict | None = None) -> SampleOutput:
    """n samples of a loaded run; sample i depends only on (seed, i) (deepgm.family.generate_chunked)."""
    return generate_chunked(run.model, n, seed, plan, cond)


def sample_run(run_dir: str | Path, n: int = 64, seed: int = 0, out: str | Path | None = None, weights: str = "ema",
               progress: bool = True, **plan_overrides) -> tuple[Path, SampleOutput]:
    """Write a sample grid (PNG) and the raw samples (.npz, with the grid's times and the conditions) of a trained
    run; plan_overrides (sampler, steps, grid, guidance, threshold, options) replace the config's `sample:`."""
    run = load_run(run_dir, weights)
    plan = plan_for(run, progress=progress, **plan_overrides)
    test = load_prepared(run, "test") if _needs_examples(run) else None
    result = draw(run, n, seed, plan, run.model.conditioning.examples(test, n) if test else None)
    stem = Path(out) if out else Path(run_dir) / "samples" / f"{plan.describe()}-seed{seed}"
    captions = [test.captions[i % len(test)] for i in range(n)] if test and test.captions else None
    _save_samples(stem, result, plan, captions)
    return save_samples_picture(result.x.cpu(), beside(stem, ".png")), result


def _needs_examples(run: Run) -> bool:
    """Whether samples need values from data (captions, images): then `sample` takes the test split's."""
    return any(c.needs_examples for c in run.model.conditioning.conditions.values())


def _save_samples(stem: Path, result: SampleOutput, plan: SamplingPlan, captions: list[str] | None) -> Path:
    """The raw samples (.npz) with the grid's times, the guidance weight, the conditions and the captions."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": result.x.cpu().numpy(), "nfe": np.array(result.nfe), "times": result.times.cpu().numpy(),
              "guidance": np.array(plan.guidance)}
    arrays.update({key: v.cpu().numpy() for key, v in result.cond.items()})
    if captions:
        arrays["captions"] = np.array(captions)
    return write_npz(beside(stem, ".npz"), arrays)


def generate_run(run_dir: str | Path, captions: list[str], n: int = 8, seed: int = 0, out: str | Path | None = None,
                 weights: str = "ema", sweep: list[float] | None = None, progress: bool = True,
                 **plan_overrides) -> tuple[Path, SampleOutput]:
    """n samples per caption of a text-conditioned run, a row per caption; with `sweep` (guidance weights), the
    first caption once per weight, a row per weight, the same noise in every row."""
    run = load_run(run_dir, weights)
    plan = plan_for(run, progress=progress, **plan_overrides)
    captions = [c if isinstance(c, str) else str(c) for c in captions]
    ids = run.model.conditioning.for_captions(captions[:1] if sweep else captions)
    if sweep:
        results = [draw(run, n, seed, plan.replace(guidance=w), {k: v.repeat(n, 1) for k, v in ids.items()})
                   for w in sweep]
        rows, labels = [r.x for r in results], [f"w={w:g}" for w in sweep]
        result = dataclasses.replace(results[0], x=torch.cat(rows), nfe=max(r.nfe for r in results))
        row_captions = [captions[0]] * (n * len(sweep))
        name = f"sweep-{plan.replace(guidance=1).describe()}-seed{seed}"
    else:
        index = torch.arange(len(captions)).repeat_interleave(n)
        result = draw(run, len(index), seed, plan, {k: v[index] for k, v in ids.items()})
        rows, labels = list(result.x.reshape(len(captions), n, *result.x.shape[1:])), captions
        row_captions = [captions[i] for i in index]
        name = f"generate-{plan.describe()}-seed{seed}"
    stem = Path(out) if out else Path(run_dir) / "samples" / name
    _save_samples(stem, result, plan, row_captions)
    picture = save_strip([r.clamp(-1, 1).cpu() for r in rows], beside(stem, ".png"), labels=labels)
    return picture, result


def _data_options(config: dict) -> dict:
    return {k: v for k, v in config["data"].items() if k != "name"}


def sample_metrics(run: Run, result: SampleOutput, test: Dataset, seed: int = 0, train: Dataset | None = None) -> dict:
    """FID / precision / recall / class accuracy in the data's classifier features (labelled images), else the
    sliced Wasserstein distance to the test split, each beside the data's own floor."""
    from deepgm.eval import evaluate_samples, get_feature_net, sliced_wasserstein

    train = train or load_data(run.config, "train")
    if train.attributes is not None:  # captioned scenes: fidelity in the attribute net's features, and alignment
        rows = torch.arange(len(result.x)) % len(test)  # the captions Conditioning.examples gave, in order
        return caption_metrics(result.x.clamp(-1, 1).cpu(), run.config, train, test, rows)
    if train.is_image and train.num_classes:
        features = get_feature_net(run.config["data"]["name"], _data_options(run.config))
        return evaluate_samples(result.x.clamp(-1, 1).cpu(), features, train.x, test.x, labels=result.cond.get("y"))
    g = torch.Generator().manual_seed(seed)
    return {"sliced_wasserstein": sliced_wasserstein(result.x.cpu(), test.x, generator=g),
            "sliced_wasserstein_floor": sliced_wasserstein(train.x[: len(test)], test.x, generator=g)}


def caption_metrics(x: torch.Tensor, config: dict, train: Dataset, test: Dataset, rows: torch.Tensor) -> dict:
    """Images x generated for the captions test.captions[rows]: FID / precision / recall in the features of the
    attribute classifier of the config's data (trained once at that resolution, then cached), beside the data's
    floor, and alignment: the share of images whose every named attribute the classifier reads as named, beside
    the same share for the captions' real images (the ceiling the classifier allows)."""
    from deepgm.data.shapes import COLUMN
    from deepgm.eval import evaluate_samples, get_feature_net
    from deepgm.eval.alignment import alignment

    features = get_feature_net(config["data"]["name"], _data_options(config))
    out = evaluate_samples(x, features, train.x, test.x)
    out["attribute_net_test_accuracy"] = out.pop("feature_net_test_accuracy")  # every attribute right
    out.update({f"attribute_net_accuracy_{k}": v for k, v in (features.attribute_accuracy or {}).items()})
    two = test.attributes[rows][:, COLUMN["n_objects"]] == 1  # binding two objects is where models fail first
    groups = {"one_object": ~two, "two_objects": two}
    out.update(alignment(test.agreement(features.predict(x), test.attributes[rows]), groups))
    real = test.agreement(features.predict(test.x[rows]), test.attributes[rows])
    out["alignment_of_real_images"] = alignment(real)["alignment"]
    return out


def evaluate_run(run_dir: str | Path, n_samples: int | None = None, seed: int = 0, progress: bool = True,
                 vlb_examples: int | None = None, **plan_overrides) -> dict:
    """Sample metrics against the test split, the family's own numbers (test bits/dim, diagnostics), pictures."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    spec = dict(run.config["eval"])
    if vlb_examples:
        spec["vlb_examples"] = vlb_examples
    n_samples = n_samples or spec["n_samples"]
    plan = plan_for(run, "eval", progress=progress, **plan_overrides)
    train, test = load_data(run.config, "train"), load_prepared(run, "test")
    result = draw(run, n_samples, seed, plan, run.model.conditioning.examples(test, n_samples))
    metrics: dict = {"run": str(run_dir), "weights": run.weights, "step": run.step, "sampler": plan.sampler,
                     "steps": plan.steps, "guidance": plan.guidance, "threshold": plan.threshold, "nfe": result.nfe,
                     "n_samples": n_samples}
    metrics.update(sample_metrics(run, result, test, seed, train))
    metrics.update(run.model.evaluate(test, spec, seed, progress))
    for split in dataset_splits(run.config["data"]["name"]):  # held-out splits: combinations, phrasings, ...
        if split not in ("train", "test"):
            held_out = load_prepared(run, split)
            part = draw(run, n_samples, seed, plan, run.model.conditioning.examples(held_out, n_samples))
            metrics.update({f"{split}/{k}": v for k, v in sample_metrics(run, part, held_out, seed, train).items()
                            if not k.startswith(("fid_floor", "attribute_net"))})
            if held_out.captions:
                captioned_rows(run, held_out, plan, seed, run_dir / f"eval_{split}.png")
    write_json(run_dir / "eval.json", metrics)
    save_samples_picture(result.x[:64].cpu(), run_dir / "eval_samples.png", train.x[:2000])
    if test.captions:
        captioned_rows(run, test, plan, seed, run_dir / "eval_captions.png")
    run.model.pictures(test, run_dir, seed)
    return metrics


def captioned_rows(run: Run, data: Dataset, plan: SamplingPlan, seed: int, path: Path, rows: int = 8,
                   per_caption: int = 6) -> Path:
    """A picture: the first `rows` captions of data, each with `per_caption` samples, the caption beside its row."""
    index = torch.arange(rows).repeat_interleave(per_caption)
    cond = {k: v[index] for k, v in run.model.conditioning.examples(data, rows).items()}
    x = draw(run, len(index), seed, plan, cond).x.clamp(-1, 1).cpu()
    return save_strip(list(x.reshape(rows, per_caption, *x.shape[1:])), path, labels=data.captions[:rows])


def likelihood_run(run_dir: str | Path, n_examples: int | None = None, seed: int = 0, weights: str = "ema",
                   **options) -> dict:
    """Test-set likelihoods in bits/dim with 95% intervals, the bounds the family reports for --nll (diffusion:
    probability-flow ODE NLL, uniformly dequantised on discrete data, and the continuous ELBO; VAEs: -IWAE_k).
    options: k (IWAE samples), divergence, probes, elbo_points. Written to RUN/nll.json."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, weights)
    test = load_prepared(run, "test")
    metrics = {"run": str(run_dir), "weights": run.weights, "step": run.step, "levels": test.levels,
               "conditional": bool(run.model.conditioning)}
    metrics.update(run.model.likelihoods(test, None, n_examples, seed, options=options))
    write_json(run_dir / "nll.json", metrics)
    return metrics
