"""Schedules: closed-form kernels and posteriors against first principles."""

import math

import pytest
import torch

from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.diffusion.schedules import DiscreteVP, posterior, transition

SCHEDULES = [DiscreteVP.linear(T=100), DiscreteVP.cosine(T=100)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_closed_form_kernel_matches_iterated_noising(schedule):
    """Iterating x_i = sqrt(1-beta_i) x_{i-1} + sqrt(beta_i) eps gives N(alpha_t x0, sigma_t^2) (DDPM eq. 4)."""
    g = torch.Generator().manual_seed(0)
    n, x0 = 40_000, 1.5
    x = torch.full((n,), x0, dtype=torch.float64)
    for i, beta in enumerate(schedule.betas, start=1):
        x = torch.sqrt(1 - beta) * x + torch.sqrt(beta) * torch.randn(n, generator=g, dtype=torch.float64)
        if i in (1, 10, 50, 100):
            alpha, sigma = schedule.alpha_sigma(torch.tensor(i / schedule.T))
            se = sigma / math.sqrt(n)
            assert abs(x.mean() - alpha * x0) < 5 * se
            assert abs(x.std() / sigma - 1) < 5 / math.sqrt(2 * n)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_grid_ends_exactly_at_data(schedule):
    alpha, sigma = schedule.alpha_sigma(torch.tensor(0.0))
    assert alpha == 1 and sigma == 0
    for steps in (1, 7, 50, 100):
        grid = schedule.time_grid(steps)
        assert grid[0] == 1 and grid[-1] == 0 and len(grid) == steps + 1
        assert torch.all(grid[1:] < grid[:-1])
        assert torch.allclose(grid * schedule.T, torch.round(grid * schedule.T))  # integer timesteps
    with pytest.raises(ValueError, match="exceeds"):
        schedule.time_grid(101)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_posterior_matches_brute_force_conditioning(schedule):
    """q(x_s | x_t, x_0) from the joint Gaussian of (x_s, x_t) given x_0, for arbitrary s < t."""
    for t_i, s_i in [(100, 99), (50, 10), (7, 0), (2, 1), (100, 0)]:
        t, s = torch.tensor(t_i / 100.0), torch.tensor(s_i / 100.0)
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        alpha_ts, _ = transition(schedule, t, s)
        cov_st = alpha_ts * sigma_s**2  # Cov(x_s, x_t | x_0)
        # E[x_s | x_t, x0] = alpha_s x0 + cov_st / sigma_t^2 (x_t - alpha_t x0)
        want_c_xt = cov_st / sigma_t**2
        want_c_x0 = alpha_s - want_c_xt * alpha_t
        want_var = sigma_s**2 - cov_st**2 / sigma_t**2
        c_x0, c_xt, var = posterior(schedule, t, s)
        torch.testing.assert_close(c_x0, want_c_x0)
        torch.testing.assert_close(c_xt, want_c_xt)
        torch.testing.assert_close(var, want_var, atol=1e-12, rtol=1e-9)


def test_posterior_is_ddpm_beta_tilde_on_adjacent_steps():
    """For s = t - 1/T: var = beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (DDPM eq. 7)."""
    schedule = DiscreteVP.linear(T=1000)
    abar = torch.exp(schedule.log_alpha_bar)
    for i in (2, 10, 500, 1000):
        _, _, var = posterior(schedule, torch.tensor(i / 1000), torch.tensor((i - 1) / 1000))
        beta_tilde = (1 - abar[i - 1]) / (1 - abar[i]) * schedule.betas[i - 1]
        torch.testing.assert_close(var, beta_tilde)
        _, step_var = transition(schedule, torch.tensor(i / 1000), torch.tensor((i - 1) / 1000))
        torch.testing.assert_close(step_var, schedule.betas[i - 1])


def test_linear_schedule_matches_ddpm_endpoints_and_sde():
    schedule = DiscreteVP.linear(T=1000)
    assert schedule.betas[0] == pytest.approx(1e-4) and schedule.betas[-1] == pytest.approx(0.02)
    # between grid points beta(t) is constant: g^2 = -T log(1 - beta_i), f = -g^2 / 2 (VP SDE)
    f, g2 = schedule.sde(torch.tensor([0.2505]))
    want = -1000 * torch.log1p(-schedule.betas[250])
    torch.testing.assert_close(g2, want.reshape(1))
    torch.testing.assert_close(f, -want.reshape(1) / 2)


def test_cosine_schedule_matches_its_formula():
    schedule = DiscreteVP.cosine(T=1000)
    t = torch.tensor(0.3, dtype=torch.float64)
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha, _ = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha**2, f(t) / f(torch.tensor(0.0, dtype=torch.float64)))


def test_log_snr_decreases_and_unknown_names_fail():
    schedule = make_schedule("cosine", T=200)
    lam = schedule.log_snr(torch.linspace(0.01, 1, 50))
    assert torch.all(lam[1:] < lam[:-1])
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="bad options"):
        make_schedule("linear", steps=3)
