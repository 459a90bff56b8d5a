"""Time grids for samplers: decreasing float64 times from t = 1 (or a later start, t_max) to exactly t = 0.

Every grid has `steps` positive times, from t = 1 (t_max) down to the schedule's smallest sampling time
t_min, spaced uniformly in a grid-specific coordinate, and then ends at t = 0, where alpha = 1 and
sigma = 0: the last step is the final "denoise" jump onto the x0-prediction made at t_min. A sampler
that spends one network evaluation per step therefore spends exactly `steps` evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from deepgm.diffusion.schedules import Schedule

DEFAULT_T_MIN = 1e-3  # continuous schedules without a t_min of their own (Song et al. 2021 use 1e-3 for VP)


def smallest_time(schedule: Schedule) -> float:
    """The last positive time of a grid: the schedule's `t_min` if it has one, else 1/T, else 1e-3."""
    t_min = getattr(schedule, "t_min", None)
    if t_min is not None:
        return float(t_min)
    return 1.0 / schedule.T if schedule.T is not None else DEFAULT_T_MIN


def scaled_noise(schedule: Schedule, times) -> torch.Tensor:
    """s = sigma/alpha = exp(-lambda/2) at the given times, float64: the noise level of x_t / alpha = x0 + s eps."""
    return torch.exp(-schedule.log_snr(torch.as_tensor(times, dtype=torch.float64)) / 2)


def _finish(schedule: Schedule, positive: torch.Tensor) -> torch.Tensor:
    """Append t = 0; times of a discrete schedule that land within 1e-9 of a timestep snap onto it."""
    if schedule.T is not None:
        pos = positive * schedule.T
        positive = torch.where((pos - pos.round()).abs() < 1e-9, pos.round() / schedule.T, positive)
    times = torch.cat([positive, positive.new_zeros(1)])
    if not bool((times[1:] < times[:-1]).all()):
        raise ValueError(f"grid of {len(positive)} steps is not strictly decreasing on {schedule!r}; use fewer steps")
    return times


def start_std(schedule: Schedule, t_max: float = 1.0) -> float:
    """The standard deviation of x at the first step: the prior's at t = 1, else sigma(t_max), the noise's share of
    the marginal there (the data's, alpha^2 Cov(x0), is what starting later neglects)."""
    if t_max == 1.0:
        return schedule.prior_std()
    return float(schedule.alpha_sigma(torch.tensor(t_max, dtype=torch.float64))[1])


def _check(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _ends(schedule: Schedule, t_min: float | None, t_max: float) -> torch.Tensor:
    return torch.tensor([t_max, smallest_time(schedule) if t_min is None else t_min], dtype=torch.float64)


def start_time(schedule: Schedule, start: float) -> float:
    """The time where sigma/alpha = `start`, where sampling begins instead of t = 1 (docs/samplers.md, "Where
    sampling starts"); on a discrete schedule the timestep at or below it, so that every grid starts on one."""
    top = float(scaled_noise(schedule, [1.0])[0])
    if isinstance(start, bool) or not (isinstance(start, (int, float)) and 0 < start < top):
        raise ValueError(f"start is the noise level sigma/alpha where sampling begins, between 0 and this "
                         f"schedule's own {top:.4g} (at t = 1); got {start!r}")
    t = float(schedule.t_from_log_snr(torch.tensor(-2 * math.log(start), dtype=torch.float64)))
    if schedule.T is not None:
        t = math.floor(t * schedule.T + 1e-9) / schedule.T
    if not t > smallest_time(schedule):
        raise ValueError(f"start={start:g} is at or below the schedule's smallest sampling time; use a larger start")
    return t


def uniform(schedule: Schedule, steps: int, t_min: float | None = None, t_max: float = 1.0) -> torch.Tensor:
    """Uniform in t on [t_min, t_max], then 0; a discrete schedule keeps integer timesteps (rounded)."""
    _check(steps)
    t_min = smallest_time(schedule) if t_min is None else t_min
    positive = torch.linspace(t_max, t_min, steps, dtype=torch.float64)
    if schedule.T is not None:
        if steps > schedule.T:
            raise ValueError(f"steps={steps} exceeds this schedule's T={schedule.T} discrete steps")
        positive = torch.round(positive * schedule.T) / schedule.T
    return _finish(schedule, positive)


def student(schedule: Schedule, steps: int, t_max: float = 1.0) -> torch.Tensor:
    """Exactly t_i = i/steps for i = steps, ..., 1, then 0, with no rounding to a discrete schedule's timesteps: the
    grid a progressive-distillation student is trained on and samples with (Salimans & Ho 2022, Algorithm 2)."""
    _check(steps)
    if t_max != 1.0:
        raise ValueError("a distilled student's grid is the one it was trained on, from t = 1: drop start")
    positive = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    return torch.cat([positive, positive.new_zeros(1)])


def log_snr(schedule: Schedule, steps: int, t_min: float | None = None, t_max: float = 1.0) -> torch.Tensor:
    """Uniform in log-SNR lambda between lambda(t_max) and lambda(t_min), then 0 (Lu et al. 2022, sec. 3.3)."""
    _check(steps)
    ends = _ends(schedule, t_min, t_max)
    lam = schedule.log_snr(ends)
    positive = schedule.t_from_log_snr(torch.linspace(float(lam[0]), float(lam[1]), steps, dtype=torch.float64))
    positive[0] = t_max  # the bisection/inverse lands within rounding of the ends; pin them
    if steps > 1:
        positive[-1] = ends[1]
    return _finish(schedule, positive)


def karras(schedule: Schedule, steps: int, rho: float = 7.0, t_min: float | None = None,
           t_max: float = 1.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 in the scaled noise level s = sigma/alpha, then 0:
    s_i = (s_max^(1/rho) + i/(steps-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    _check(steps)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    s_max, s_min = scaled_noise(schedule, _ends(schedule, t_min, t_max)).tolist()
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return from_scaled_noise(schedule, s, t_min, t_max)


def trig(schedule: Schedule, steps: int, scale: float = 1.0, t_min: float | None = None,
         t_max: float = 1.0) -> torch.Tensor:
    """Uniform in theta = arctan(s / scale), s = sigma/alpha, between t_max and t_min, then 0: the time grid
    of TrigFlow (Lu & Song 2024) / a cosine schedule whose log-SNR is shifted to data of scale `scale`."""
    _check(steps)
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    theta = torch.atan(scaled_noise(schedule, _ends(schedule, t_min, t_max)) / scale).tolist()
    s = scale * torch.tan(torch.linspace(theta[0], theta[1], steps, dtype=torch.float64))
    return from_scaled_noise(schedule, s, t_min, t_max)


def from_scaled_noise(schedule: Schedule, s: torch.Tensor, t_min: float | None = None,
                      t_max: float = 1.0) -> torch.Tensor:
    """The grid through the scaled noise levels s = sigma/alpha (decreasing, from s(t_max) to s(t_min)), then 0;
    the inverse lands within rounding of the ends, so they are pinned to exactly t_max and t_min."""
    positive = schedule.t_from_log_snr(-2 * torch.log(s))
    positive[0] = t_max
    if len(positive) > 1:
        positive[-1] = smallest_time(schedule) if t_min is None else t_min
    return _finish(schedule, positive)


GRIDS: dict[str, Callable[..., torch.Tensor]] = {"uniform": uniform, "log-snr": log_snr, "karras": karras, "trig": trig,
                                                 "student": student}
CALIBRATED = "calibrated"  # made from the model, not the schedule alone: deepgm.diffusion.calibration


def available_grids() -> list[str]:
    """The grids made from a schedule alone; deepgm.sample also takes CALIBRATED."""
    return sorted(GRIDS)


def make_grid(name: str, schedule: Schedule, steps: int, **options) -> torch.Tensor:
    """A grid by name: make_grid('karras', schedule, 10, rho=7) -> 11 decreasing times ending at 0."""
    if name == CALIBRATED:
        raise ValueError("the calibrated grid is made from the model: use deepgm.sample(..., grid='calibrated') "
                         "or deepgm.diffusion.calibration.calibrate")
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {available_grids()}")
    try:
        return GRIDS[name](schedule, steps, **options)
    except TypeError as err:
        raise ValueError(f"bad options for grid {name!r}: {err}") from None
