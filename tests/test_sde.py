"""Continuous-time schedules: marginals against the papers' closed forms and the SDE's moment equations,
inverses, the t = 0 convention, EDM's sigma grid and preconditioning, and the learned schedule."""

import math

import pytest
import torch

from deepgm.diffusion.denoiser import Denoiser, edm_preconditioning, from_x0_eps, to_x0_eps
from deepgm.diffusion.grids import uniform
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.diffusion.schedules import DiscreteVP, Schedule
from deepgm.diffusion.sde import VESDE, VPSDE, CosineVP, EDMSchedule, LearnedSchedule, SubVPSDE, drift

F64 = torch.float64
CONTINUOUS = [VPSDE(), SubVPSDE(), VESDE(), EDMSchedule(), CosineVP(), LearnedSchedule(features=16)]
TIMES = torch.tensor([1e-4, 0.01, 0.1, 0.37, 0.8, 1.0], dtype=F64)


def test_vp_subvp_ve_marginals_match_song_et_al_closed_forms():
    """Song et al. 2021, eq. 29-33: VP mean coefficient exp(-t^2 (b1 - b0)/4 - t b0/2) and std sqrt(1 - m^2);
    sub-VP std 1 - m^2; VE std sigma_min (sigma_max / sigma_min)^t."""
    b0, b1 = 0.1, 20.0
    t = TIMES
    m = torch.exp(-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)
    alpha, sigma = VPSDE(b0, b1).alpha_sigma(t)
    torch.testing.assert_close(alpha, m, rtol=1e-13, atol=0)
    torch.testing.assert_close(sigma, torch.sqrt(1 - m**2), rtol=1e-12, atol=0)
    alpha, sigma = SubVPSDE(b0, b1).alpha_sigma(t)
    torch.testing.assert_close(alpha, m, rtol=1e-13, atol=0)
    torch.testing.assert_close(sigma, 1 - m**2, rtol=1e-12, atol=0)
    alpha, sigma = VESDE(0.01, 50.0).alpha_sigma(t)
    torch.testing.assert_close(alpha, torch.ones_like(t))
    torch.testing.assert_close(sigma, 0.01 * (50.0 / 0.01) ** t, rtol=1e-13, atol=0)


@pytest.mark.parametrize("schedule", CONTINUOUS, ids=repr)
def test_marginals_solve_the_sdes_moment_equations(schedule):
    """For dx = f x dt + g dW: d log alpha/dt = f and d sigma^2/dt = 2 f sigma^2 + g^2, with the closed-form f, g^2."""
    t = TIMES[:-1]
    h = 1e-6
    (a1, s1), (a0, s0) = schedule.alpha_sigma(t + h), schedule.alpha_sigma(t - h)
    f, g2 = schedule.sde(t)
    with torch.no_grad():
        _, sigma = schedule.alpha_sigma(t)
        dlog_alpha = (torch.log(a1) - torch.log(a0)) / (2 * h)
        dvar = (s1**2 - s0**2) / (2 * h)
    torch.testing.assert_close(f.detach(), dlog_alpha, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g2.detach(), dvar - 2 * f.detach() * sigma**2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", CONTINUOUS, ids=repr)
def test_closed_forms_agree_with_the_generic_derivations(schedule):
    """Overrides of sde(), log_snr(), log_snr_slope() and t_from_log_snr() agree with the base class' generic ones."""
    t = TIMES
    f, g2 = schedule.sde(t)
    f_ref, g2_ref = Schedule.sde(schedule, t)
    torch.testing.assert_close(f.detach(), f_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2.detach(), g2_ref, rtol=1e-9, atol=1e-12)
    lam = schedule.log_snr(t).detach()
    torch.testing.assert_close(lam, Schedule.log_snr(schedule, t).detach(), rtol=1e-10, atol=1e-10)
    tt = t.clone().requires_grad_(True)
    slope_ref = torch.autograd.grad(Schedule.log_snr(schedule, tt).sum(), tt)[0]
    torch.testing.assert_close(schedule.log_snr_slope(t).detach(), slope_ref, rtol=1e-8, atol=1e-10)
    assert torch.all(slope_ref < 0)  # log-SNR strictly decreasing
    with torch.no_grad():
        torch.testing.assert_close(schedule.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(Schedule.t_from_log_snr(schedule, lam), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", CONTINUOUS, ids=repr)
def test_time_zero_is_the_data_and_grids_use_the_positive_range(schedule):
    with torch.no_grad():
        alpha, sigma = schedule.alpha_sigma(torch.tensor([0.0, schedule.t_min], dtype=F64))
    assert alpha[0] == 1 and sigma[0] == 0 and 0 < sigma[1] < 0.011
    grid = schedule.time_grid(10)
    assert len(grid) == 11 and grid[0] == 1 and grid[-2] == schedule.t_min and grid[-1] == 0
    torch.testing.assert_close(grid, uniform(schedule, 10))
    t = schedule.sample_t(1000, torch.Generator().manual_seed(0))
    assert t.min() >= schedule.t_min and t.max() <= 1


def test_edm_schedule_is_karras_sigma_grid():
    """A uniform grid on [t_min, 1] is Karras et al. (2022) eq. 5 with sigma_N = 0."""
    edm = EDMSchedule(0.002, 80.0, 7.0)
    n = 18
    i = torch.arange(n, dtype=F64)
    want = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    _, sigma = edm.alpha_sigma(edm.time_grid(n))
    torch.testing.assert_close(sigma[:-1], want, rtol=1e-12, atol=0)
    assert sigma[-1] == 0


def test_edm_preconditioning_is_karras_table_1_and_round_trips():
    """With alpha = 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
    c_noise = ln(s)/4; on a VP schedule the same at s = sigma/alpha with c_in absorbing 1/alpha."""
    sd = 0.5
    s = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(torch.ones_like(s), s, sd)
    torch.testing.assert_close(c_skip, sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(c_out, s * sd / torch.sqrt(s**2 + sd**2))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(s**2 + sd**2))
    torch.testing.assert_close(c_noise, torch.log(s) / 4)
    alpha = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=F64)
    sigma = torch.sqrt(1 - alpha**2)
    c_skip_vp, c_out_vp, c_in_vp, _ = edm_preconditioning(alpha, sigma, sd)
    c_skip_ve, c_out_ve, c_in_ve, _ = edm_preconditioning(torch.ones_like(alpha), sigma / alpha, sd)
    torch.testing.assert_close(c_skip_vp, c_skip_ve)
    torch.testing.assert_close(c_out_vp, c_out_ve)
    torch.testing.assert_close(c_in_vp, c_in_ve / alpha)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, generator=g, dtype=F64)
    a, sg = alpha[:, None], sigma[:, None]
    target = from_x0_eps(x0, eps, a, sg, "edm", sd)
    got_x0, got_eps = to_x0_eps(target, a * x0 + sg * eps, a, sg, "edm", sd)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def test_edm_denoiser_feeds_the_network_c_in_x_and_c_noise():
    schedule = VPSDE()
    seen = {}

    def net(x, c):
        seen["x"], seen["c"] = x, c
        return torch.zeros_like(x)

    t = torch.tensor([0.2, 0.7], dtype=F64)
    x = torch.randn(2, 3, dtype=F64)
    pred = Denoiser.from_fn(net, schedule, "edm", sigma_data=0.5)(x, t)
    alpha, sigma = schedule.alpha_sigma(t)
    c_skip, _, c_in, c_noise = edm_preconditioning(alpha, sigma, 0.5)
    torch.testing.assert_close(seen["x"], c_in[:, None] * x)
    torch.testing.assert_close(seen["c"], c_noise)
    torch.testing.assert_close(pred.x0, c_skip[:, None] * x / alpha[:, None])  # F = 0 leaves the skip path


def test_learned_schedule_is_a_monotone_trainable_module():
    sched = make_schedule("learned", logsnr_min=-6.0, logsnr_max=9.0, features=32, endpoint_scale=4.0)
    assert isinstance(sched, torch.nn.Module) and isinstance(sched, Schedule)
    with torch.no_grad():
        for p in (sched.w2, sched.b2, sched.w3):
            p.normal_(0, 3.0)  # a strongly non-linear shape stays monotone
        t = torch.linspace(sched.t_min, 1, 2001, dtype=F64)
        lam = sched.log_snr(t)
        assert torch.all(lam[1:] < lam[:-1])
        torch.testing.assert_close(lam[[0, -1]], torch.tensor([9.0, -6.0], dtype=F64), rtol=1e-12, atol=1e-12)
        alpha, sigma = sched.alpha_sigma(t)
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
        torch.testing.assert_close(sched.net_time(t[[0, -1]]), torch.tensor([0.0, 1.0], dtype=F64))
    names = {n for n, _ in Denoiser.from_fn(lambda x, t: x, sched, "eps").named_parameters()}
    assert {"schedule.lam_min", "schedule.lam_max", "schedule.w1"} <= names  # saved with the model


def test_discrete_ddpm_is_a_vp_sde_with_piecewise_constant_beta():
    """Continuous samplers and likelihoods run on DDPM schedules: f = -beta/2, g^2 = beta between grid points."""
    ddpm = DiscreteVP.linear(T=1000)
    t = torch.tensor([0.1234, 0.5005, 0.9991], dtype=F64)
    f, g2 = ddpm.sde(t)
    i = torch.ceil(t * 1000).long()
    beta = -1000 * torch.log1p(-ddpm.betas[i - 1])
    torch.testing.assert_close(g2, beta)
    torch.testing.assert_close(f, -beta / 2)


@pytest.mark.parametrize("probability_flow", [True, False])
def test_reverse_drifts_with_the_exact_score_of_gaussian_data(probability_flow):
    """For x0 ~ N(m, s2): score = -(x - alpha m)/(alpha^2 s2 + sigma^2); reverse SDE drift f x - g^2 score,
    probability-flow ODE f x - g^2 score / 2 (Song et al. 2021, eq. 6, 13)."""
    m, s2 = 0.7, 0.2
    schedule = SubVPSDE()

    def posterior_mean(x, t):
        alpha, sigma = (v[:, None] for v in schedule.alpha_sigma(t.double()))
        return m + alpha * s2 / (alpha**2 * s2 + sigma**2) * (x - alpha * m)

    den = Denoiser.from_fn(posterior_mean, schedule, "x0")
    x = torch.randn(5, 3, dtype=F64)
    t = torch.tensor(0.4, dtype=F64)
    got, g2 = drift(schedule, den, x, t.expand(5), probability_flow)
    alpha, sigma = schedule.alpha_sigma(t)
    f, g2_ref = schedule.sde(t)
    score = -(x - alpha * m) / (alpha**2 * s2 + sigma**2)
    torch.testing.assert_close(got, f * x - (0.5 if probability_flow else 1.0) * g2_ref * score)
    assert math.isclose(float(g2[0]), float(g2_ref))
