"""Parameterisations: conversions round-trip and the denoiser answers consistently."""

import pytest
import torch

from deepgm.diffusion.denoiser import PARAMETERIZATIONS, Denoiser, Thresholded, from_x0_eps, to_x0_eps
from deepgm.diffusion.schedules import DiscreteVP


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("variance_preserving", [True, False])
def test_conversions_round_trip(parameterization, variance_preserving):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 64, 3, generator=g, dtype=torch.float64)
    alpha = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    free_sigma = 10 * torch.rand(64, 1, generator=g, dtype=torch.float64)
    sigma = torch.sqrt(1 - alpha**2) if variance_preserving else free_sigma
    x = alpha * x0 + sigma * eps
    target = from_x0_eps(x0, eps, alpha, sigma, parameterization)
    got_x0, got_eps = to_x0_eps(target, x, alpha, sigma, parameterization)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def test_v_is_salimans_ho_v_on_vp():
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    x0, eps = torch.randn(2, 5)
    torch.testing.assert_close(from_x0_eps(x0, eps, alpha, sigma, "v"), alpha * eps - sigma * x0)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_denoiser_from_fn_recovers_truth_for_every_parameterization(parameterization):
    """A callable that outputs the true target in any parameterisation yields the true x0 and eps."""
    schedule = DiscreteVP.cosine(T=100)
    x0, eps = torch.randn(2, 8, 4, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) * 0.9 + 0.05
    alpha, sigma = (v[:, None] for v in schedule.alpha_sigma(t))
    x_t = alpha * x0 + sigma * eps
    fn = lambda x, tt: from_x0_eps(x0, eps, alpha, sigma, parameterization)
    pred = Denoiser.from_fn(fn, schedule, parameterization)(x_t, t)
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, eps)
    torch.testing.assert_close(Denoiser.from_fn(fn, schedule, parameterization).score(x_t, t), -eps / sigma)


def test_denoiser_rejects_bad_parameterization_and_shape():
    schedule = DiscreteVP.linear(T=100)
    with pytest.raises(ValueError, match="unknown parameterization"):
        Denoiser.from_fn(lambda x, t: x, schedule, "score")
    bad = Denoiser.from_fn(lambda x, t: x[:, :1], schedule, "eps")
    with pytest.raises(ValueError, match="output shape"):
        bad(torch.zeros(3, 2), torch.tensor(0.5))


def test_thresholding_clips_x0_and_keeps_x_consistent():
    schedule = DiscreteVP.linear(T=100)
    inner = Denoiser.from_fn(lambda x, t: 3 * torch.ones_like(x), schedule, "x0")
    x = torch.randn(4, 16)
    t = torch.full((4,), 0.5)
    for percentile in (None, 0.9):
        pred = Thresholded(inner, percentile)(x, t)
        assert pred.x0.abs().max() <= 1
        alpha, sigma = schedule.alpha_sigma(t.double())
        torch.testing.assert_close(alpha[:, None].float() * pred.x0 + sigma[:, None].float() * pred.eps, x)


def test_a_network_in_float64_runs_in_float64_and_matches_float32():
    """The samplers' references solve a trained network's ODE in float64: the time embedding follows the net."""
    from deepgm.nets.mlp import MLP

    torch.manual_seed(0)
    net = MLP(2, width=32, depth=2)
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.full((5,), 0.37, dtype=torch.float64)
    single = net(x.float(), t)
    double = net.double()(x, t)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, rtol=1e-5, atol=1e-5)
