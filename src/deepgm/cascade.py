"""A cascade (Saharia et al. 2022; Ho et al. 2021, "Cascaded diffusion models"): a text-conditioned base run
makes a small image, and super-resolution runs (`model.super_resolution`) refine it stage by stage, each reading the
stage below upsampled, noised at its plan's augmentation level, and the caption.

A cascade is a pipeline of runs named by a small YAML file; run paths are relative to the file's folder:

    stages:
      - run: runs/cas-base                   # the base model, 16x16
        sample: {sampler: ddim, steps: 50, guidance: 3}
      - run: runs/cas-sr32                   # 16 -> 32
        sample: {sampler: ddim, steps: 25, augmentation: 0.2}
      - run: runs/cas-sr64                   # 32 -> 64
        sample: {sampler: ddim, steps: 25, augmentation: 0.2}
    eval: {n_samples: 500}

Each stage's `sample:` replaces fields of its run's own `sample:` section (deepgm.family.SamplingPlan).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepgm.config import PLAN_KEYS
from deepgm.family import SamplingPlan, generate_chunked
from deepgm.files import beside, write_json, write_npz

STAGE_KEYS = {"run", "sample"}
STAGE_SEED = 7919  # stage k draws its noise from seed + k * STAGE_SEED: the stages' noises are unrelated


@dataclasses.dataclass
class Stage:
    """One stage: a diffusion model (a loaded run's), the plan it samples with, and a name for tables."""

    name: str
    model: nn.Module
    plan: SamplingPlan
    config: dict | None = None  # the run's config, where the stage is a run

    @property
    def size(self) -> int:
        return int(self.model.data_shape[-1])

    @property
    def low_res(self):
        """The stage's LowResImage condition, or None for a base model."""
        return self.model.conditioning["low_res"] if "low_res" in self.model.conditioning else None


@dataclasses.dataclass
class CascadeOutput:
    """Each stage's images (in [-1, 1]) for the same captions, with each stage's NFE and seconds."""

    images: list[torch.Tensor]
    nfe: list[int]
    seconds: list[float]
    captions: list[str]


class Cascade:
    """Stages whose resolutions chain: stage 0 a base model without a low-resolution input, and each later stage a
    super-resolution model from the size of the stage below."""

    def __init__(self, stages: list[Stage]):
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        if stages[0].low_res is not None:
            raise ValueError(f"stage 0 ({stages[0].name}) is a super-resolution model (it reads a "
                             f"{stages[0].low_res.low_size}x{stages[0].low_res.low_size} image); the first stage is "
                             "the base model, which reads the caption only")
        for k in range(1, len(stages)):
            below, stage = stages[k - 1], stages[k]
            low = stage.low_res
            if low is None:
                raise ValueError(f"stage {k} ({stage.name}) is not a super-resolution model; every stage after the "
                                 "first needs model.super_resolution")
            if low.low_size != below.size or low.channels != below.model.data_shape[0]:
                raise ValueError(f"stage {k} ({stage.name}) upsamples {low.channels}x{low.low_size}x{low.low_size} "
                                 f"images, but stage {k - 1} ({below.name}) makes {below.model.data_shape[0]}x"
                                 f"{below.size}x{below.size}; order the stages by resolution or train a stage "
                                 f"with model.super_resolution.low_res: {below.size}")
        self.stages = list(stages)

    @property
    def size(self) -> int:
        return self.stages[-1].size

    def with_plans(self, **changes: dict) -> Cascade:
        """The same stages with plan fields replaced: with_plans(base={'guidance': 3}, sr={'augmentation': 0.2})
        changes the base stage and every super-resolution stage."""
        stages = [dataclasses.replace(s, plan=s.plan.replace(**changes.get("sr" if k else "base", {})))
                  for k, s in enumerate(self.stages)]
        return Cascade(stages)

    def generate(self, captions: list[str], seed: int = 0) -> CascadeOutput:
        """One image per caption from every stage; image i depends only on (seed, i), as for a single run
        (deepgm.family.generate_chunked)."""
        if not captions:
            raise ValueError("give at least one caption")
        images, nfe, seconds = [], [], []
        for k in range(len(self.stages)):
            start = time.perf_counter()
            x, evaluations = self.run_stage(k, captions, images[-1] if k else None, seed)
            images.append(x)
            nfe.append(evaluations)
            seconds.append(time.perf_counter() - start)
        return CascadeOutput(images, nfe, seconds, list(captions))

    def run_stage(self, k: int, captions: list[str], below: torch.Tensor | None, seed: int = 0):
        """Stage k's images (clamped to [-1, 1], on the CPU) for the captions, from the images of the stage below
        (None for the base), and its NFE per image."""
        stage = self.stages[k]
        reads_text = any(c.kind == "tokens" for c in stage.model.conditioning.conditions.values())
        cond = stage.model.conditioning.for_captions(captions) if reads_text or not k else {}  # SR: text optional
        if k:
            cond["low_res"] = stage.low_res.upsample(below.to(next(stage.model.parameters()).device))
        with torch.inference_mode():
            result = generate_chunked(stage.model, len(captions), seed + k * STAGE_SEED, stage.plan, cond)
        return result.x.clamp(-1, 1).cpu(), result.nfe


def _check_stage_spec(entry, k: int, path: Path) -> dict:
    if not isinstance(entry, dict) or "run" not in entry:
        raise ValueError(f"{path}: stage {k} must be a mapping with `run: path/to/run` (and optionally `sample:`)")
    unknown = set(entry) - STAGE_KEYS
    if unknown:
        raise ValueError(f"{path}: stage {k} has unknown key(s) {sorted(unknown)}; valid keys are {sorted(STAGE_KEYS)}")
    sample = entry.get("sample") or {}
    if not isinstance(sample, dict) or set(sample) - PLAN_KEYS:
        raise ValueError(f"{path}: stage {k}'s `sample:` takes the keys {sorted(PLAN_KEYS)}, got {sample!r}")
    return entry


def read_cascade_file(path: str | Path) -> dict:
    """The cascade file as a checked mapping: `stages` (a list of {run, sample}) and an optional `eval`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cascade file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"cascade file {path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ValueError(f"cascade file {path} needs `stages:`, a list of stages, each `- run: path/to/run`")
    unknown = set(spec) - {"stages", "eval"}
    if unknown:
        raise ValueError(f"cascade file {path}: unknown key(s) {sorted(unknown)}; valid keys are ['eval', 'stages']")
    spec["stages"] = [_check_stage_spec(e, k, path) for k, e in enumerate(spec["stages"])]
    return spec


def load_cascade(path: str | Path, device: str = "cpu") -> Cascade:
    """The cascade a file names, each stage's run loaded (EMA weights) with its plan; clear errors for a missing
    run or stages whose resolutions do not chain."""
    from deepgm.pipeline import load_run, plan_for

    path = Path(path)
    spec = read_cascade_file(path)
    stages = []
    for k, entry in enumerate(spec["stages"]):
        run_dir = Path(entry["run"])
        run_dir = run_dir if run_dir.is_absolute() else path.parent / run_dir
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{path}: stage {k}'s run {run_dir} is not a run directory (no config.yaml); "
                                    "train it with `deepgm train CONFIG --out DIR` or fix the path (relative to "
                                    "the cascade file's folder)")
        run = load_run(run_dir, device=device)
        if run.config["model"].get("kind") != "ddpm":
            raise ValueError(f"{path}: stage {k}'s run {run_dir} is a {run.config['model'].get('kind')!r} model; "
                             "cascade stages are diffusion models")
        stages.append(Stage(run_dir.name, run.model, plan_for(run, **dict(entry.get("sample") or {})), run.config))
    return Cascade(stages)


def stage_columns(output: CascadeOutput) -> list[torch.Tensor]:
    """One row per caption: each stage's image, enlarged (nearest) to the last stage's size."""
    size = output.images[-1].shape[-1]
    columns = [F.interpolate(x, size=(size, size), mode="nearest") for x in output.images]
    return list(torch.stack(columns, dim=1))  # (N, stages, C, size, size) -> rows


def generate_cascade(path: str | Path, captions: list[str], n: int = 4, seed: int = 0, out: str | Path | None = None,
                     guidance: float | None = None, augmentation: float | None = None) -> tuple[Path, CascadeOutput]:
    """n images per caption through every stage: a picture with a row per image (each stage side by side) and the
    stages' images in an .npz (x_16, x_32, ... and the captions). `guidance` replaces the base stage's weight,
    `augmentation` every super-resolution stage's level."""
    from deepgm.viz import save_strip

    cascade = load_cascade(path)
    base = {"guidance": guidance} if guidance is not None else {}
    sr = {"augmentation": augmentation} if augmentation is not None else {}
    cascade = cascade.with_plans(base=base, sr=sr)
    rows = [c for c in captions for _ in range(n)]
    output = cascade.generate(rows, seed)
    stem = Path(out) if out else Path(path).parent / "samples" / f"{Path(path).stem}-seed{seed}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"x_{x.shape[-1]}": x.numpy() for x in output.images}
    write_npz(beside(stem, ".npz"), {"captions": np.array(rows), "nfe": np.array(output.nfe), **arrays})
    picture = save_strip(stage_columns(output), beside(stem, ".png"), labels=rows)
    return picture, output


def evaluate_cascade(path: str | Path, n_samples: int | None = None, seed: int = 0, out: str | Path | None = None,
                     splits: tuple[str, ...] = ("test", "test-combos")) -> dict:
    """Alignment and FID at the last stage's resolution (the attribute classifier retrained there), on the test
    captions and the held-out combinations, beside the base model's images upsampled bilinearly to that size from
    the same captions and seed; time per image and NFE per stage. Written to OUT/cascade_eval.json (OUT defaults
    to the cascade file's folder / <name>-eval)."""
    from deepgm.pipeline import caption_metrics, load_data

    path = Path(path)
    spec = read_cascade_file(path)
    cascade = load_cascade(path)
    n = int(n_samples or (spec.get("eval") or {}).get("n_samples", 500))
    out_dir = Path(out) if out else path.parent / f"{path.stem}-eval"
    last = cascade.stages[-1].config
    train = load_data(last, "train")
    metrics: dict = {"cascade": str(path), "n_samples": n, "seed": seed, "size": cascade.size,
                     "stages": [{"name": s.name, "size": s.size, "plan": dataclasses.asdict(s.plan)}
                                for s in cascade.stages]}
    for split in splits:
        data = load_data(last, split)
        rows = torch.arange(n) % len(data)
        output = cascade.generate([data.captions[i] for i in rows], seed)
        prefix = "" if split == "test" else f"{split}/"
        final = caption_metrics(output.images[-1], last, train, data, rows)
        upsampled = F.interpolate(output.images[0], size=(cascade.size,) * 2, mode="bilinear", align_corners=False)
        baseline = caption_metrics(upsampled.clamp(-1, 1), last, train, data, rows)
        metrics.update({prefix + k: v for k, v in final.items()})
        metrics.update({f"{prefix}base_upsampled/{k}": v for k, v in baseline.items() if k in ("fid", "alignment",
                                                                                                "alignment_ci95")})
        if split == "test":
            metrics["seconds_per_image"] = [s / n for s in output.seconds]
            metrics["nfe"] = output.nfe
            out_dir.mkdir(parents=True, exist_ok=True)
            from deepgm.viz import save_strip

            save_strip(stage_columns(dataclasses.replace(output, images=[x[:8] for x in output.images])),
                       out_dir / "cascade_stages.png", labels=output.captions[:8])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "cascade_eval.json", metrics)
    return metrics
