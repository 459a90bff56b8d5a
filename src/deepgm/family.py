"""The small protocol every model family implements, and what it speaks in: a sampling plan and sample outputs.

The run layer (deepgm.pipeline: run directories, loading, data) calls only these methods, so it knows no family by
type; studies (deepgm.studies) sit above it. A family is a `torch.nn.Module` with:

  conditioning                        deepgm.conditioning.Conditioning: the keys of `cond` it reads
  loss(batch, generator)              -> (scalar loss, {term name: value}) for the trainer
  generate(n, cond, generator, plan)  -> SampleOutput of n samples (cond: a value per sample, or {})
  likelihoods(test, bounds, ...)      -> {bound: summary with bits/dim and its 95% interval}; BOUNDS names them
  evaluate(test, spec, seed, ...)     -> the family's own entries of eval.json (its bound, diagnostics)
  pictures(test, out_dir, seed)       -> PNGs of the family's processes (forward/reverse, reconstructions, ...)

`generate_chunked` draws samples so that sample i depends only on (seed, i): noise comes per fixed chunk of
CHUNK samples from a generator seeded by (seed, chunk index), and each chunk is generated on its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

CHUNK = 64  # samples per chunk: the unit of reproducible sampling (and the sampling batch)
THRESHOLDS = ("none", "static", "dynamic")
# far above any useful plan (T=1000 discrete steps, a few thousand SDE steps); a larger count would only fail deep in
# torch allocating its time grid (10**12 steps: 8 TB), so it is refused here with the field named
MAX_STEPS = 100_000


@dataclass
class SampleOutput:
    """Samples x (at t=0), network evaluations per sample, the time grid and optionally the trajectory.

    nfe counts evaluations per sample: a guided step evaluates the conditional and the unconditional model, two."""

    x: torch.Tensor
    nfe: int
    times: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    trajectory: list[torch.Tensor] = field(default_factory=list)
    calibration: object | None = None  # a calibrated grid's choice and pilot cost, if one was used
    cond: dict = field(default_factory=dict)  # what the samples were conditioned on


def parse_threshold(spec: str | None) -> tuple[str, float | None]:
    """'none' | 'static' | 'dynamic' | 'dynamic:P' -> (kind, percentile); dynamic's default P is Imagen's 0.995."""
    spec = "static" if spec is None else str(spec)
    kind, _, rest = spec.partition(":")
    if kind not in THRESHOLDS or (rest and kind != "dynamic"):
        raise ValueError(f"threshold must be one of none, static, dynamic or dynamic:P (0 < P < 1), got {spec!r}")
    if kind != "dynamic":
        return kind, None
    try:
        p = float(rest) if rest else 0.995
    except ValueError:
        raise ValueError(f"threshold {spec!r}: the percentile after 'dynamic:' must be a number in (0, 1)") from None
    if not 0 < p < 1:
        raise ValueError(f"threshold {spec!r}: the percentile must lie in (0, 1), e.g. dynamic:0.995")
    return kind, p


def _number(name: str, value) -> float:
    """float(value), or a ValueError naming the field (None, text and the like)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


# Far above any useful weight, far below where w (x0_cond - x0_uncond) overflows float32 (~1e38 / w).
MAX_GUIDANCE = 1e6


@dataclass(frozen=True)
class SamplingPlan:
    """How to sample: sampler, steps and grid (diffusion), classifier-free guidance weight (1: the conditional
    model, 0: the unconditional one) and x0 thresholding of images ('none', 'static', 'dynamic[:P]')."""

    sampler: str = "auto"
    steps: int = 50
    grid: str | None = None
    guidance: float = 1.0
    threshold: str = "static"
    options: tuple = ()  # sampler options as sorted (name, value) pairs, hashable
    augmentation: float = 0.0  # a super-resolution stage's noise-conditioning augmentation level, in [0, 1]
    start: float | None = None  # sigma/alpha where sampling begins (None: t = 1); see deepgm.sample
    progress: bool = False
    return_trajectory: bool = False

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {self.steps!r}")
        w = _number("guidance weight", self.guidance)
        object.__setattr__(self, "guidance", w)  # frozen: set once, as a float
        if not 0 <= w <= MAX_GUIDANCE:  # also refuses NaN
            raise ValueError(f"guidance weight must be a number from 0 to {MAX_GUIDANCE:g} (1: the conditional "
                             f"model, 0: the unconditional one; useful weights lie near 1-30), got {self.guidance!r}")
        if not isinstance(self.threshold, str):
            raise ValueError(f"threshold must be one of none, static, dynamic or dynamic:P, got {self.threshold!r}")
        parse_threshold(self.threshold)
        level = _number("augmentation level", self.augmentation)
        object.__setattr__(self, "augmentation", level)
        if not 0 <= level <= 1:  # also refuses NaN
            raise ValueError(f"the augmentation level is a diffusion time in [0, 1] (0: the low-resolution image as "
                             f"it is), got {self.augmentation!r}")
        if self.start is not None:
            start = _number("start", self.start)
            object.__setattr__(self, "start", start)
            if not 0 < start < np.inf:  # also refuses NaN
                raise ValueError(f"start is the noise level sigma/alpha where sampling begins, a number > 0 "
                                 f"(e.g. 20), got {self.start!r}")

    @classmethod
    def from_config(cls, section: dict, **overrides) -> SamplingPlan:
        """A plan from a config's `sample:` or `eval:` section (`clip: false` is the older threshold: none),
        with the given fields replaced where not None."""
        threshold = section.get("threshold") or ("static" if section.get("clip", True) else "none")
        plan = {"sampler": section.get("sampler", "auto"), "steps": section.get("steps", 50),
                "grid": section.get("grid"), "guidance": section.get("guidance", 1.0), "threshold": threshold,
                "augmentation": section.get("augmentation", 0.0), "start": section.get("start")}  # checked below
        options = dict(section.get("options") or {})
        options.update(overrides.pop("options", None) or {})
        plan.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**plan, options=tuple(sorted(options.items())))

    def replace(self, **changes) -> SamplingPlan:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short name for file names and tables, e.g. 'ddim-50steps-w3-dynamic0.995'."""
        name = f"{self.sampler}-{self.steps}steps"
        if self.guidance != 1:
            name += f"-w{self.guidance:g}"
        if self.threshold != "static":
            name += "-" + self.threshold.replace(":", "")
        if self.augmentation:
            name += f"-aug{self.augmentation:g}"
        if self.start is not None:
            name += f"-start{self.start:g}"
        return name


@runtime_checkable
class ModelFamily(Protocol):
    """What the run layer may ask of a model (see the module notes)."""

    conditioning: object
    BOUNDS: dict

    def loss(self, batch: dict, generator: torch.Generator): ...

    def generate(self, n: int, cond: dict, generator: torch.Generator | None, plan: SamplingPlan) -> SampleOutput: ...

    def likelihoods(self, test, bounds: tuple[str, ...] | None = None, n: int | None = None, seed: int = 0,
                    progress: bool = False, **options) -> dict: ...

    def evaluate(self, test, spec: dict, seed: int = 0, progress: bool = False) -> dict: ...

    def pictures(self, test, out_dir, seed: int = 0) -> list: ...


def chunk_generator(seed: int, chunk: int, device=None) -> torch.Generator:
    """The generator of chunk `chunk` of a sampling job with `seed`: independent streams by (seed, chunk)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(chunk)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def generate_chunked(model: ModelFamily, n: int, seed: int, plan: SamplingPlan, cond: dict | None = None,
                     device=None, chunk: int = CHUNK, start: int = 0) -> SampleOutput:
    """Samples start, ..., start + n - 1 of a job, chunk by chunk: sample i is the same for any n and start, because
    its noise depends only on (seed, i).

    Each chunk of `chunk` samples is generated whole with its own generator (seeded by (seed, chunk index)) and the
    last one is cut to n: a partial chunk would draw its noise at other stream offsets. `start` (a multiple of
    `chunk`) lets a job be split into shards. cond: a value per sample (of these n) for some keys of the model's
    conditioning; the other keys take each condition's default for the sample's index (class labels in turn)."""
    if n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    if start % chunk:
        raise ValueError(f"a shard must start at a multiple of the chunk size {chunk}, got {start}")
    cond = model.conditioning.check(cond, n) if cond else {}
    device = device or next(model.parameters()).device
    outputs = []
    for c, offset in enumerate(range(0, n, chunk)):
        index = torch.arange(offset, offset + chunk).clamp(max=n - 1)  # the cut chunk's extra rows repeat the last
        part = {**(model.conditioning.for_samples(start + offset, chunk, device) if model.conditioning else {}),
                **{k: v[index].to(device) for k, v in cond.items()}}
        outputs.append(model.generate(chunk, part, chunk_generator(seed, start // chunk + c, device), plan))
    first = outputs[0]
    cond_all = {k: torch.cat([o.cond[k] for o in outputs])[:n] for k in first.cond}
    trajectory = ([torch.cat(steps)[:n] for steps in zip(*(o.trajectory for o in outputs), strict=True)]
                  if first.trajectory else [])
    return dataclasses.replace(first, x=torch.cat([o.x for o in outputs])[:n], trajectory=trajectory, cond=cond_all)
