"""`sample`: a sampler of deepgm.diffusion.samplers over a grid of deepgm.diffusion.grids (or one calibrated to the
model, deepgm.diffusion.calibration), with network evaluations counted where the network is called."""

from __future__ import annotations

import dataclasses
import inspect

import torch
from tqdm.auto import tqdm

from deepgm.diffusion.calibration import AUTO, AUTO_SAMPLERS, calibrate
from deepgm.diffusion.denoiser import Thresholded
from deepgm.diffusion.grids import CALIBRATED, make_grid, scaled_noise, start_std, start_time
from deepgm.diffusion.samplers import ODE_SAMPLERS, SAMPLERS, STANDARD_ARGS
from deepgm.diffusion.schedules import Schedule
from deepgm.family import SampleOutput

__all__ = ["AUTO", "AUTO_SAMPLERS", "DEFAULT_GRID", "DEFAULT_GRIDS", "DEFAULT_SAMPLER", "SampleOutput",
           "available_samplers", "sample"]

# The defaults of `sample`: the sampler chosen for the model on a grid calibrated to it; the other samplers keep
# fixed grids unless asked.
DEFAULT_SAMPLER, DEFAULT_GRID = AUTO, "trig"
# sampler="auto" on an eps-predicting network starts at sigma/alpha = AUTO_START (where the schedule's own start is
# higher). Its x0 there is (z - sigma eps)/alpha, and on the development networks (benchmarks/start_time.py: three
# MLP DDPMs, and the demo's digits U-Net) the ODE from t = 1 was far from the data (FD 0.22, 0.11 and 3e5 against
# floors of 0.002-0.01; FID 301 for unclipped DEIS-10), from sigma/alpha = 20 at or near the floor (FID 12.3), and
# 40-80 in between. x0-, v- and EDM-parameterised denoisers have no 1/alpha factor and start at t = 1.
AUTO_START = 20.0
DEFAULT_GRIDS = {"ddpm": "uniform", "ddim": "uniform", "trig-abm": CALIBRATED, AUTO: CALIBRATED}


def available_samplers() -> list[str]:
    """The samplers' names, and "auto" (the calibration chooses one)."""
    return [*sorted(SAMPLERS), AUTO]


class _CountingDenoiser(torch.nn.Module):
    """Counts network evaluations per sample so every sampler reports its NFE honestly: a denoiser that
    evaluates its network on several inputs per call (classifier-free guidance: two) says so in `evaluations`."""

    def __init__(self, denoiser):
        super().__init__()
        self.inner = denoiser
        self.schedule = denoiser.schedule
        self.nfe = 0

    def forward(self, x, t, **cond):
        self.nfe += getattr(self.inner, "evaluations", 1)
        return self.inner(x, t, **cond)


@torch.no_grad()
def sample(denoiser, schedule: Schedule | None = None, shape: tuple[int, ...] | None = None,
           sampler: str = DEFAULT_SAMPLER, steps: int = 50, generator: torch.Generator | None = None,
           x_T: torch.Tensor | None = None, times: torch.Tensor | None = None, grid: str | None = None,
           cond: dict | None = None, progress: bool = False, start: float | None = None,
           return_trajectory: bool = False, device=None, dtype=torch.float32, **options) -> SampleOutput:
    """Draw samples: x_T ~ N(0, prior_std^2 I), then `sampler` over a `grid` of `steps` steps.

    `start` (sigma/alpha) begins every grid at the time of that noise level instead of t = 1, from
    x ~ N(0, sigma^2 I) there: an eps-predicting network's x0 near t = 1 multiplies its error by sigma/alpha
    (docs/samplers.md, "Where sampling starts"). sampler="auto" on an eps network starts at AUTO_START unless told.
    A given `x_T` is used as it is at the time sampling starts: draw it with std grids.start_std(schedule,
    grids.start_time(schedule, start)), which differs from prior_std wherever the start is not t = 1 (on a VE
    schedule by a factor of sigma_max / start).

    `schedule` defaults to (and must be) the denoiser's; `grid` names a grid of deepgm.diffusion.grids
    ('uniform', 'log-snr', 'karras', 'trig', or 'calibrated' for the ODE samplers; default: 'uniform' for the
    discrete-time samplers ddpm and ddim, which then keep integer timesteps, 'calibrated' for trig-abm, else
    'trig'); `times` overrides it; `options` go to the sampler (e.g. eta for DDIM, rtol/atol for rk45). NFE is
    counted here, whatever the sampler does. A calibrated grid (deepgm.diffusion.calibration) is made once per
    denoiser, sampler, steps, options and sample shape, and cached on the denoiser; its pilot evaluations are
    reported in `calibration.pilot_nfe`, apart from the per-sample `nfe`. The default, sampler='auto', lets the
    calibration choose among AUTO_SAMPLERS too; `calibration.sampler` says which ran.
    """
    schedule = schedule or denoiser.schedule
    if schedule is not denoiser.schedule:
        raise ValueError("schedule differs from the denoiser's; the grid must come from the schedule it predicts for")
    if sampler == AUTO:
        if options or times is not None or grid not in (None, CALIBRATED):
            raise ValueError("sampler='auto' chooses the sampler, its options and a grid calibrated to the model; "
                             "to set options, a grid or times, name the sampler (e.g. sampler='deis')")
    elif sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {available_samplers()}")
    else:
        allowed = [name for name in inspect.signature(SAMPLERS[sampler]).parameters if name not in STANDARD_ARGS]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for sampler {sampler!r}; it takes {allowed or 'none'}")
    if start is not None and times is not None:
        raise ValueError("give either start or times: start sets where the grid begins, times is the whole grid")
    if sampler == AUTO and start is None:
        start = auto_start(denoiser)
    t_max = 1.0 if start is None else start_time(schedule, start)
    if x_T is None:
        if shape is None:
            raise ValueError("give either shape or x_T")
        x_T = start_std(schedule, t_max) * torch.randn(shape, generator=generator, device=device, dtype=dtype)
    calibration = None
    if times is None:
        grid = grid or DEFAULT_GRIDS.get(sampler, DEFAULT_GRID)
        if grid == CALIBRATED:
            calibration = _calibrated(denoiser, sampler, steps, x_T, cond, options, t_max)
            times, options = calibration.times, {**options, **calibration.options}
            sampler = calibration.sampler
        else:
            times = make_grid(grid, schedule, steps, t_max=t_max)
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.dim() != 1 or len(times) < 2 or not bool((times[1:] < times[:-1]).all()) or float(times[-1]) != 0.0:
        raise ValueError("times must be a strictly decreasing 1-D grid that ends exactly at 0")
    counted = _CountingDenoiser(denoiser)
    trajectory = [x_T] if return_trajectory else []
    bar = tqdm(total=len(times) - 1, desc=f"sampling ({sampler})", disable=not progress, leave=False)

    def callback(i, t, x):
        bar.update(1)
        if return_trajectory:
            trajectory.append(x)

    x = SAMPLERS[sampler](counted, times.to(x_T.device), x_T, generator=generator, cond=cond, callback=callback,
                          **options)
    if isinstance(denoiser, Thresholded):  # its x0 lies in [-1, 1]; a last step that corrects x0 (trig-abm) can leave
        x = x.clamp(-1, 1)
    bar.close()
    return SampleOutput(x=x, nfe=counted.nfe, times=times, trajectory=trajectory, calibration=calibration)


def auto_start(denoiser) -> float | None:
    """Where sampler="auto" starts (sigma/alpha; None: t = 1): AUTO_START for an eps-predicting network whose
    schedule starts above it."""
    inner = denoiser
    while not hasattr(inner, "parameterization") and hasattr(inner, "denoiser"):  # Guided, Thresholded
        inner = inner.denoiser
    if getattr(inner, "parameterization", None) != "eps":
        return None
    return AUTO_START if float(scaled_noise(denoiser.schedule, [1.0])[0]) > AUTO_START else None


def _calibrated(denoiser, sampler: str, steps: int, x_T: torch.Tensor, cond: dict | None, options: dict,
                t_max: float = 1.0):
    """The calibrated grid for these settings: from the denoiser's cache, else made now (pilot_nfe > 0) and kept."""
    if sampler != AUTO and sampler not in ODE_SAMPLERS:
        raise ValueError(f"the calibrated grid is for the ODE samplers {list(ODE_SAMPLERS)}, not {sampler!r}; "
                         "give the grid explicitly (e.g. grid='trig')")
    cache = denoiser.__dict__.setdefault("_calibrated_grids", {})
    # parameter versions: in-place optimiser (and EMA) steps bump them, so a model trained on is calibrated afresh
    weights = tuple(p._version for p in denoiser.parameters())
    key = (sampler, steps, tuple(sorted(options.items())), tuple(x_T.shape[1:]), x_T.dtype, str(x_T.device), weights,
           t_max)
    if key in cache:
        return dataclasses.replace(cache[key], pilot_nfe=0)
    cache[key] = calibrate(denoiser, sampler, steps, tuple(x_T.shape[1:]), cond=cond, device=x_T.device,
                           dtype=x_T.dtype, t_max=t_max, **options)
    return cache[key]
