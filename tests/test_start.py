"""Sampling from a later start (deepgm.sample(start=sigma/alpha)): the grids begin there, the noise has that
time's sigma, and on Gaussian data the probability-flow ODE from it is the closed-form affine map."""

import math

import pytest
import torch

import deepgm
from deepgm.config import load_config
from deepgm.diffusion.denoiser import Denoiser, Thresholded
from deepgm.diffusion.grids import make_grid, scaled_noise, smallest_time, start_time
from deepgm.diffusion.sampling import AUTO_START, auto_start
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.diffusion.schedules import DiscreteVP
from deepgm.family import SamplingPlan

MU, S = torch.tensor([0.7, -0.4, 0.2], dtype=torch.float64), 0.5  # the data: N(MU, S^2 I)


def gaussian(schedule, parameterization="x0"):
    """The exact denoiser (posterior mean) of N(MU, S^2 I), answering x0 or eps."""

    def fn(x, t):
        alpha, sigma = (v.to(x.dtype).reshape(-1, 1) for v in schedule.alpha_sigma(t))
        x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)
        return x0 if parameterization == "x0" else (x - alpha * x0) / sigma

    return Denoiser.from_fn(fn, schedule, parameterization=parameterization)


def ode_map(schedule, t, x):
    """Where the probability-flow ODE of N(MU, S^2 I) takes x at time t: the monotone affine map of the marginal
    N(alpha MU, (alpha^2 S^2 + sigma^2) I) onto the data."""
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    return MU + S * (x - alpha * MU) / math.sqrt(alpha**2 * S**2 + sigma**2)


@pytest.mark.parametrize("grid", ["uniform", "log-snr", "karras", "trig"])
def test_grids_begin_at_the_start(grid):
    schedule = DiscreteVP.cosine(T=1000)
    t_max = start_time(schedule, 20.0)
    assert t_max == math.floor(t_max * 1000) / 1000  # on a timestep of the discrete schedule
    assert 19.0 < float(scaled_noise(schedule, [t_max])[0]) <= 20.0  # the timestep at or below sigma/alpha = 20
    times = make_grid(grid, schedule, 8, t_max=t_max)
    assert float(times[0]) == t_max and float(times[-1]) == 0.0 and len(times) == 9
    assert bool((times[1:] < times[:-1]).all())
    assert float(times[-2]) == pytest.approx(smallest_time(schedule))
    if grid == "log-snr":
        lam = schedule.log_snr(times[:-1])
        torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(7), rtol=1e-6, atol=1e-9)


def test_the_ode_from_the_start_is_the_closed_form_map():
    schedule = DiscreteVP.cosine(T=1000)
    denoiser = gaussian(schedule)
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for start in (None, 80.0, 20.0):
        out = deepgm.sample(denoiser, x_T=x_T, sampler="rk45", grid="uniform", steps=2, rtol=1e-10, atol=1e-10,
                            start=start, dtype=torch.float64)
        t_max = 1.0 if start is None else start_time(schedule, start)
        assert float(out.times[0]) == t_max
        # the last jump from t_min to 0 is the denoiser's x0 there, which is the map's value up to O(sigma(t_min))
        torch.testing.assert_close(out.x, ode_map(schedule, t_max, x_T), rtol=0, atol=2e-3)


def test_the_start_noise_has_that_times_sigma_and_the_calibration_starts_there():
    schedule = DiscreteVP.linear(T=1000)
    denoiser = gaussian(schedule)
    out = deepgm.sample(denoiser, shape=(4000, 3), sampler="auto", steps=6, start=40.0, return_trajectory=True,
                        generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t_max = start_time(schedule, 40.0)
    sigma = float(schedule.alpha_sigma(torch.tensor(t_max, dtype=torch.float64))[1])
    assert float(out.trajectory[0].std()) == pytest.approx(sigma, rel=0.03)
    assert float(out.calibration.times[0]) == t_max
    again = deepgm.sample(denoiser, shape=(8, 3), sampler="auto", steps=6, dtype=torch.float64)
    assert float(again.calibration.times[0]) == 1.0  # the cache keeps the two starts apart


def test_bad_starts_are_clear_errors():
    schedule = DiscreteVP.linear(T=1000)  # sigma/alpha = 157 at t = 1
    denoiser = gaussian(schedule)
    for bad in (200.0, 0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="start"):
            deepgm.sample(denoiser, shape=(2, 3), sampler="ddim", steps=5, start=bad)
    with pytest.raises(ValueError, match="either start or times"):
        deepgm.sample(denoiser, shape=(2, 3), sampler="ddim", times=make_grid("uniform", schedule, 5), start=20.0)
    with pytest.raises(ValueError, match="student"):
        deepgm.sample(denoiser, shape=(2, 3), sampler="ddim", grid="student", steps=4, start=20.0)
    for bad in (-3, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="start"):
            SamplingPlan(start=bad)
    assert SamplingPlan(sampler="ddim", steps=10, start=20).describe() == "ddim-10steps-start20"
    config = load_config("ddpm-toy", ["sample.start=20"])  # a config's sample: section takes it too
    assert SamplingPlan.from_config(config["sample"]).start == 20.0


def test_auto_starts_eps_networks_at_auto_start_and_nothing_else():
    cosine, edm = DiscreteVP.cosine(T=1000), make_schedule("edm")  # sigma/alpha at t = 1: 2e4 and 80
    t_20 = start_time(cosine, AUTO_START)
    first = lambda denoiser, **kw: float(deepgm.sample(denoiser, shape=(8, 3), steps=6, dtype=torch.float64,
                                                       **kw).times[0])
    assert first(gaussian(cosine, "eps")) == t_20  # the default, sampler="auto"
    assert first(Thresholded(gaussian(cosine, "eps"))) == t_20  # through the sampling wrappers
    assert first(gaussian(cosine, "x0")) == 1.0  # no 1/alpha in its x0
    assert first(gaussian(cosine, "eps"), sampler="dpmpp-2m") == 1.0  # a named sampler is its paper's, from t = 1
    assert first(gaussian(cosine, "eps"), start=80.0) == start_time(cosine, 80.0)  # told otherwise
    assert auto_start(Denoiser.from_fn(lambda x, t: x, edm, parameterization="eps")) == AUTO_START
    assert auto_start(Denoiser.from_fn(lambda x, t: x, make_schedule("ve"), parameterization="x0")) is None
