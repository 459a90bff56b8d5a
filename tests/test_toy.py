"""The analytic mixture: density, score and posterior mean against independent computations."""

import math

import pytest
import torch

from deepgm.data import load_dataset, make_mixture
from deepgm.data.toy import GaussianMixture


@pytest.mark.parametrize("name,options", [("ring", {}), ("grid", {}), ("mixture", {"dim": 5})])
def test_score_is_gradient_of_log_density(name, options):
    gmm = make_mixture(name, **options)
    x = gmm.sample(16, generator=torch.Generator().manual_seed(0)).double().requires_grad_(True)
    alpha, sigma = 0.7, 0.5
    grad = torch.autograd.grad(gmm.log_prob(x, alpha, sigma).sum(), x)[0]
    torch.testing.assert_close(gmm.score(x.detach(), alpha, sigma), grad)


def test_log_prob_normalises_in_2d():
    gmm = make_mixture("ring")
    ticks = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xy = torch.cartesian_prod(ticks, ticks)
    mass = gmm.log_prob(xy, 0.9, 0.3).exp().sum() * (ticks[1] - ticks[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=1e-6)


def test_posterior_mean_matches_monte_carlo_conditioning():
    """E[x0 | x_t] by self-normalised importance sampling from the prior, for one fixed x_t."""
    gmm = make_mixture("mixture", dim=3, seed=1)
    g = torch.Generator().manual_seed(0)
    alpha, sigma = 0.8, 0.6
    x0 = gmm.sample(400_000, generator=g).double()
    x_t = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    logw = -0.5 * ((x_t - alpha * x0) ** 2).sum(1) / sigma**2
    w = torch.softmax(logw, 0)
    mc = (w[:, None] * x0).sum(0)
    ess = 1 / (w**2).sum()
    assert ess > 1000
    torch.testing.assert_close(gmm.posterior_mean(x_t, alpha, sigma)[0], mc, atol=5 / math.sqrt(ess), rtol=0)


def test_single_gaussian_posterior_is_linear_shrinkage():
    m, s2 = torch.tensor([[1.0, -2.0]]), 0.25
    gmm = GaussianMixture(torch.ones(1), m, s2 * torch.eye(2)[None])
    x = torch.randn(5, 2, dtype=torch.float64)
    alpha, sigma = 0.6, 0.8
    want = m + alpha * s2 / (alpha**2 * s2 + sigma**2) * (x - alpha * m)
    torch.testing.assert_close(gmm.posterior_mean(x, alpha, sigma), want.double())


def test_bad_mixtures_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError, match="unknown toy mixture"):
        make_mixture("spiral")


def test_datasets_have_fixed_splits_and_levels():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and train.levels == 17 and train.num_classes == 10
    values = torch.unique(train.x)
    torch.testing.assert_close(values, torch.linspace(-1, 1, 17))
    again = load_dataset("digits", "test")
    assert torch.equal(again.x, test.x)
    assert load_dataset("digits", "train", size=16).x.shape[1:] == (1, 16, 16)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="bad options"):
        load_dataset("digits", "train", colour=True)


def test_assign_finds_the_component_a_sample_came_from():
    gmm = make_mixture("mixture", dim=16, n_modes=5, seed=1)
    assert gmm.assign(gmm.means).tolist() == list(range(5))
    # points drawn from one component, by hand: its index comes back for nearly all of them
    k = 3
    z = torch.randn(400, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = gmm.means[k] + z @ torch.linalg.cholesky(gmm.covs[k]).T
    assert (gmm.assign(x) == k).double().mean() > 0.95


def test_moments_of_a_symmetric_pair_are_known_in_closed_form():
    # 1/2 N(m, S) + 1/2 N(-m, S): mean 0, covariance S + m m^T
    m = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.1], [0.0, 0.1, 0.5]], dtype=torch.float64)
    gmm = GaussianMixture(torch.tensor([0.5, 0.5]), torch.stack([m, -m]), torch.stack([s, s]))
    mean, cov = gmm.moments()
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(cov, s + torch.outer(m, m), atol=1e-12)
    # and an asymmetric mixture against its own samples
    gmm = make_mixture("mixture", dim=4, n_modes=3, seed=2)
    x = gmm.sample(400_000, generator=torch.Generator().manual_seed(0)).double()
    mean, cov = gmm.moments()
    assert torch.allclose(mean, x.mean(0), atol=0.02)
    assert torch.allclose(cov, torch.cov(x.T), atol=0.05)


def test_projected_quantiles_invert_the_mixture_cdf():
    gmm = make_mixture("mixture", dim=6, n_modes=4, seed=3)
    u = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    q = torch.tensor([1e-4, 0.1, 0.5, 0.9, 1 - 1e-4], dtype=torch.float64)
    y = gmm.projected_quantiles(u, q)
    std = torch.einsum("pi,kij,pj->pk", u, gmm.covs, u).sqrt()
    cdf = torch.distributions.Normal(u @ gmm.means.T, std).cdf(y.T[:, :, None]) @ gmm.weights  # (Q, P)
    assert torch.allclose(cdf, q[:, None].expand(-1, 5), atol=1e-10)
    # one Gaussian: mean + std * Phi^-1(q) exactly
    one = GaussianMixture(torch.tensor([1.0]), gmm.means[:1], gmm.covs[:1])
    want = (u @ gmm.means[0])[:, None] + std[:, :1] * torch.distributions.Normal(0.0, 1.0).icdf(q)
    assert torch.allclose(one.projected_quantiles(u, q), want, atol=1e-9)
    with pytest.raises(ValueError, match="strictly inside"):
        gmm.projected_quantiles(u, torch.tensor([0.0, 0.5]))
