"""Posterior-collapse diagnostics on constructed encoders whose answers are known: one that ignores x (no
active units, zero mutual information) and one that copies part of x through a Gaussian channel (exactly the
copied units active, I(x; z) = (d/2) log(1 + 1/sigma^2))."""

import math

import pytest
import torch

from deepgm.data import Dataset
from deepgm.vae.diagnostics import (
    active_units,
    diagnose,
    gaussian_log_q_matrix,
    model_mutual_information,
    mutual_information,
)
from deepgm.vae.heads import GaussianHead
from deepgm.vae.vae import VAE, MLPDecoder

N, D, LATENT = 2000, 4, 3


class FixedEncoder(torch.nn.Module):
    """q(z | x) = N(P x + c, diag e^logvar) with fixed P, c, logvar (a constructed, not a trained, encoder)."""

    def __init__(self, P: torch.Tensor, c: torch.Tensor, logvar: torch.Tensor):
        super().__init__()
        self.register_buffer("P", P)
        self.register_buffer("c", c)
        self.register_buffer("lv", logvar)
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # so the model has a device and a dtype

    def forward(self, x, y=None):
        mu = x @ self.P.T + self.c
        return mu, self.lv.expand_as(mu)


def _vae(P, c, logvar):
    head = GaussianHead(logvar=0.0)
    return VAE(FixedEncoder(P, c, logvar), MLPDecoder((D,), LATENT, 1, hidden=8), head, LATENT, (D,)).double()


@pytest.fixture(scope="module")
def data():
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return Dataset(name="gauss", x=x)


def test_an_encoder_that_ignores_x_has_no_active_units_and_no_information(data):
    vae = _vae(torch.zeros(LATENT, D, dtype=torch.float64), torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64),
               torch.full((LATENT,), -1.0, dtype=torch.float64))
    out = diagnose(vae, data, mi_examples=500)
    assert out["active_units"] == 0 and max(out["activity"]) == 0.0
    assert out["mutual_information"] == pytest.approx(0.0, abs=1e-12)  # q(z|x) = q(z): the estimate is exactly 0
    # KL per unit of N(c, e^-1) against N(0, 1), the same for every example
    expected = [0.5 * (c**2 + math.exp(-1.0) - 1 + 1.0) for c in (0.3, -1.0, 2.0)]
    assert out["kl_per_dim"] == pytest.approx(expected, rel=1e-9)


def test_an_encoder_that_copies_x_has_exactly_the_copied_units_active(data):
    sigma2 = 0.25
    P = torch.zeros(LATENT, D, dtype=torch.float64)
    P[0, 0] = P[1, 1] = 1.0  # z_0 = x_0 + noise, z_1 = x_1 + noise, z_2 = noise
    logvar = torch.full((LATENT,), math.log(sigma2), dtype=torch.float64)
    vae = _vae(P, torch.zeros(LATENT, dtype=torch.float64), logvar)
    count, activity = active_units(vae.encode(data.x)[0])
    assert count == 2 and activity[2] == 0 and (activity[:2] - 1).abs().max() < 0.1
    # Gaussian channel: I(x; z) = 2 * (1/2) log(1 + Var x / sigma^2) = log 5 nats for the two copied units
    mi = model_mutual_information(vae, data, n=N)
    assert mi == pytest.approx(math.log(1 + 1 / sigma2), abs=0.05)
    assert mi < math.log(N)  # the estimator is capped at log N


def test_mutual_information_estimator_on_a_matrix():
    # two examples with disjoint posteriors: z_n is certain to have come from x_n, so I = log 2
    log_q = torch.tensor([[0.0, -1e4], [-1e4, 0.0]])
    assert mutual_information(log_q) == pytest.approx(math.log(2))
    assert mutual_information(torch.zeros(5, 5)) == pytest.approx(0.0)


def test_gaussian_log_q_matrix_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    z, mu, lv = (torch.randn(7, 3, generator=g, dtype=torch.float64) for _ in range(3))
    got = gaussian_log_q_matrix(z, mu, lv, chunk=3)
    for n in range(7):
        for m in range(7):
            ref = torch.distributions.Normal(mu[m], torch.exp(0.5 * lv[m])).log_prob(z[n]).sum()
            assert got[n, m].item() == pytest.approx(ref.item(), rel=1e-12)
