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
