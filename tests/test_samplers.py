"""Samplers against the exact mixture denoiser: they must reproduce the data distribution."""

import pytest
import torch

import deepgm
from deepgm.data import make_mixture
from deepgm.diffusion.denoiser import Denoiser
from deepgm.diffusion.schedules import DiscreteVP
from deepgm.eval.metrics import sliced_wasserstein


@pytest.fixture(scope="module")
def ring():
    return make_mixture("ring")


def _floor(gmm, n, seed=10):
    a = gmm.sample(n, generator=torch.Generator().manual_seed(seed))
    b = gmm.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    return sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_1000_step_ancestral_sampling_reproduces_the_mixture(ring, variance):
    schedule = DiscreteVP.linear(T=1000)
    n = 2000
    out = deepgm.sample(ring.denoiser(schedule), schedule, (n, 2), sampler="ddpm", steps=1000, variance=variance,
                        generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert out.nfe == 1000
    truth = ring.sample(n, generator=torch.Generator().manual_seed(3))
    error = sliced_wasserstein(out.x.float(), truth, generator=torch.Generator().manual_seed(0))
    assert error < 1.5 * _floor(ring, n)


@pytest.mark.parametrize("sampler,options", [("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}), ("ddpm", {})])
def test_few_step_samplers_land_on_the_mixture(ring, sampler, options):
    schedule = DiscreteVP.cosine(T=1000)
    n = 2000
    out = deepgm.sample(ring.denoiser(schedule), schedule, (n, 2), sampler=sampler, steps=100,
                        generator=torch.Generator().manual_seed(1), dtype=torch.float64, **options)
    assert out.nfe == 100
    truth = ring.sample(n, generator=torch.Generator().manual_seed(4))
    assert sliced_wasserstein(out.x.float(), truth, generator=torch.Generator().manual_seed(0)) < 2 * _floor(ring, n)


def test_ddim_eta0_is_deterministic_given_x_T(ring):
    schedule = DiscreteVP.cosine(T=1000)
    x_T = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    runs = [deepgm.sample(ring.denoiser(schedule), schedule, sampler="ddim", steps=20, x_T=x_T,
                          generator=torch.Generator().manual_seed(seed)).x for seed in (1, 2)]
    assert torch.equal(runs[0], runs[1])
    stochastic = [deepgm.sample(ring.denoiser(schedule), schedule, sampler="ddim", steps=20, x_T=x_T, eta=1.0,
                                generator=torch.Generator().manual_seed(seed)).x for seed in (1, 2)]
    assert not torch.equal(stochastic[0], stochastic[1])


def test_ddim_eta1_equals_ddpm_beta_tilde_step():
    """DDIM with eta = 1 draws from the same Gaussian as the ancestral beta_tilde step."""
    schedule = DiscreteVP.linear(T=1000)
    denoiser = Denoiser.from_fn(lambda x, t: 0.5 * x, schedule, "x0")
    x_T = torch.randn(1, 3, dtype=torch.float64).expand(100_000, 3).contiguous()
    times = torch.tensor([0.6, 0.3, 0.0], dtype=torch.float64)
    a = deepgm.sample(denoiser, x_T=x_T, times=times[:2].tolist() + [0.0], sampler="ddim", eta=1.0,
                      generator=torch.Generator().manual_seed(0)).x
    b = deepgm.sample(denoiser, x_T=x_T, times=times, sampler="ddpm", generator=torch.Generator().manual_seed(1)).x
    torch.testing.assert_close(a.mean(0), b.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(a.std(0), b.std(0), atol=0.01, rtol=0)


def test_trajectory_and_grid_end_at_data(ring):
    schedule = DiscreteVP.linear(T=1000)
    out = deepgm.sample(ring.denoiser(schedule), schedule, (8, 2), sampler="ddim", steps=10, return_trajectory=True,
                        dtype=torch.float64)
    assert len(out.trajectory) == 11 and out.times[-1] == 0 and torch.equal(out.trajectory[-1], out.x)


def test_sample_rejects_bad_requests(ring):
    schedule = DiscreteVP.linear(T=1000)
    denoiser = ring.denoiser(schedule)
    with pytest.raises(ValueError, match="unknown sampler"):
        deepgm.sample(denoiser, schedule, (4, 2), sampler="euler-maruyama-typo")
    with pytest.raises(ValueError, match="ends exactly at 0"):
        deepgm.sample(denoiser, schedule, (4, 2), sampler="ddim", times=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="differs from the denoiser"):
        deepgm.sample(denoiser, DiscreteVP.linear(T=1000), (4, 2))
    with pytest.raises(ValueError, match="shape or x_T"):
        deepgm.sample(denoiser, schedule)
