"""Samplers: plain functions (denoiser, times, x_T, generator) -> x_0 over a decreasing time grid.

Every sampler speaks in alpha/sigma of the denoiser's schedule, so it runs on any schedule, and
takes any grid that ends exactly at t = 0 (where alpha = 1, sigma = 0 and x equals the x0 estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from deepgm.diffusion.denoiser import expand_like
from deepgm.diffusion.schedules import Schedule, posterior, transition

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, t, x after the step)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddpm(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None, callback: Callback | None = None,
         variance: str = "beta_tilde") -> torch.Tensor:
    """Ancestral sampling x_s ~ p(x_s | x_t) = q(x_s | x_t, x0_hat) (Ho et al. 2020, Algorithm 2).

    variance='beta_tilde' uses the posterior variance, 'beta' the forward-step variance sigma_{t|s}^2
    (the two choices of the DDPM paper, generalised to any sub-sequence of times).
    """
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    schedule = denoiser.schedule
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        x0 = denoiser(x, t, **(cond or {})).x0
        c_x0, c_xt, var = posterior(schedule, t, s)
        if variance == "beta":
            var = transition(schedule, t, s)[1]
        x = expand_like(c_x0, x) * x0 + expand_like(c_xt, x) * x
        if s > 0:  # the last step returns the mean: no noise is added at the data end
            x = x + expand_like(var.sqrt(), x) * _noise(x, generator)
        if callback:
            callback(i, s, x)
    return x


def ddim(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None, callback: Callback | None = None,
         eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021a, eq. 12): deterministic at eta=0, ancestral DDPM (beta_tilde) at eta=1."""
    schedule = denoiser.schedule
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        pred = denoiser(x, t, **(cond or {}))
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        c = eta * posterior(schedule, t, s)[2].sqrt()  # std of the fresh noise
        x = expand_like(alpha_s, x) * pred.x0 + expand_like((sigma_s**2 - c**2).clamp(min=0).sqrt(), x) * pred.eps
        if eta > 0 and s > 0:
            x = x + expand_like(c, x) * _noise(x, generator)
        if callback:
            callback(i, s, x)
    return x


SAMPLERS: dict[str, Callable] = {"ddpm": ddpm, "ddim": ddim}


def available_samplers() -> list[str]:
    return sorted(SAMPLERS)


class _CountingDenoiser(torch.nn.Module):
    """Counts network evaluations so every sampler reports its NFE honestly."""

    def __init__(self, denoiser):
        super().__init__()
        self.inner = denoiser
        self.schedule = denoiser.schedule
        self.nfe = 0

    def forward(self, x, t, **cond):
        self.nfe += 1
        return self.inner(x, t, **cond)


@dataclass
class SampleOutput:
    """Samples x (at t=0), the number of network evaluations, and optionally the trajectory."""

    x: torch.Tensor
    nfe: int
    times: torch.Tensor
    trajectory: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def sample(denoiser, schedule: Schedule | None = None, shape: tuple[int, ...] | None = None, sampler: str = "ddim",
           steps: int = 50, generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
           times: torch.Tensor | None = None, cond: dict | None = None, progress: bool = False,
           return_trajectory: bool = False, device=None, dtype=torch.float32, **options) -> SampleOutput:
    """Draw samples: x_T ~ N(0, prior_std^2 I), then `sampler` over `steps` steps of the schedule's grid.

    `schedule` defaults to (and must be) the denoiser's; `times` overrides the grid; `options` go to
    the sampler (e.g. eta for DDIM, variance for DDPM).
    """
    schedule = schedule or denoiser.schedule
    if schedule is not denoiser.schedule:
        raise ValueError("schedule differs from the denoiser's; the grid must come from the schedule it predicts for")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {available_samplers()}")
    if times is None:
        times = schedule.time_grid(steps)
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.dim() != 1 or len(times) < 2 or not bool((times[1:] < times[:-1]).all()) or float(times[-1]) != 0.0:
        raise ValueError("times must be a strictly decreasing 1-D grid that ends exactly at 0")
    if x_T is None:
        if shape is None:
            raise ValueError("give either shape or x_T")
        x_T = schedule.prior_std() * torch.randn(shape, generator=generator, device=device, dtype=dtype)
    counted = _CountingDenoiser(denoiser)
    trajectory = [x_T] if return_trajectory else []
    bar = tqdm(total=len(times) - 1, desc=f"sampling ({sampler})", disable=not progress, leave=False)

    def callback(i, t, x):
        bar.update(1)
        if return_trajectory:
            trajectory.append(x)

    run = SAMPLERS[sampler]
    x = run(counted, times.to(x_T.device), x_T, generator=generator, cond=cond, callback=callback, **options)
    bar.close()
    return SampleOutput(x=x, nfe=counted.nfe, times=times, trajectory=trajectory)
