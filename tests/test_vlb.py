"""The discrete variational bound against its closed form on Gaussian data with the exact denoiser."""

import math

import pytest
import torch

from deepgm.diffusion.denoiser import Denoiser
from deepgm.diffusion.losses import vlb, vlb_loss
from deepgm.diffusion.schedules import DiscreteVP, posterior, transition
from deepgm.likelihood import bits_per_dim

M, S2, D = 0.5, 0.3, 2  # data: x0 ~ N(M, S2 I) in D dimensions


def exact_denoiser(schedule):
    def posterior_mean(x, t):
        alpha, sigma = (v.to(x.dtype)[:, None] for v in schedule.alpha_sigma(t.double()))
        return M + alpha * S2 / (alpha**2 * S2 + sigma**2) * (x - alpha * M)

    return Denoiser.from_fn(posterior_mean, schedule, "x0")


def closed_form_vlb(schedule, variance):
    """E_x0[L_T + sum L_{t-1} + L_0] in nats, using Var(x0 | x_t) = S2 sigma^2 / (alpha^2 S2 + sigma^2)."""
    T = schedule.T
    alpha1, sigma1 = schedule.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))
    total = 0.5 * D * (sigma1**2 + alpha1**2 * (M**2 + S2) - 1 - torch.log(sigma1**2))
    for i in range(1, T + 1):
        t, s = torch.tensor(i / T, dtype=torch.float64), torch.tensor((i - 1) / T, dtype=torch.float64)
        alpha, sigma = schedule.alpha_sigma(t)
        post_var = S2 * sigma**2 / (alpha**2 * S2 + sigma**2)
        c_x0, _, q_var = posterior(schedule, t, s)
        step_var = transition(schedule, t, s)[1]
        if i == 1:
            total += 0.5 * D * (math.log(2 * math.pi) + torch.log(step_var) + post_var / step_var)
        else:
            p_var = q_var if variance == "beta_tilde" else step_var
            total += 0.5 * D * (torch.log(p_var / q_var) + q_var / p_var - 1 + c_x0**2 * post_var / p_var)
    return float(total)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_vlb_of_exact_denoiser_matches_closed_form(variance):
    schedule = DiscreteVP.linear(T=100)
    g = torch.Generator().manual_seed(0)
    x0 = M + math.sqrt(S2) * torch.randn(4000, D, generator=g, dtype=torch.float64)
    terms = vlb(exact_denoiser(schedule), x0, levels=None, generator=g, variance=variance)
    want = closed_form_vlb(schedule, variance)
    se = terms["total"].std() / math.sqrt(len(x0))
    assert abs(terms["total"].mean() - want) < 4 * se + 1e-3
    # a bound: above the true NLL, the entropy of N(M, S2 I)
    assert want > 0.5 * D * math.log(2 * math.pi * math.e * S2)


def test_one_sample_vlb_loss_is_unbiased_for_the_full_bound():
    schedule = DiscreteVP.linear(T=100)
    g = torch.Generator().manual_seed(1)
    x0 = M + math.sqrt(S2) * torch.randn(40_000, D, generator=g, dtype=torch.float64)
    estimate = vlb_loss(exact_denoiser(schedule), x0, levels=None, generator=g)
    se = estimate.std() / math.sqrt(len(x0))
    assert abs(estimate.mean() - closed_form_vlb(schedule, "beta_tilde")) < 4 * se


def test_discrete_decoder_gives_probabilities_and_bits_per_dim():
    """On discrete data the bound is on -log P(x) of a distribution over levels, so it is >= 0."""
    schedule = DiscreteVP.linear(T=1000)  # beta_1 = 1e-4: the decoder's std is far below the bin width
    levels = 17
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, levels, (64, 1, 4, 4), generator=g).float() / (levels - 1)) * 2 - 1
    perfect = Denoiser.from_fn(lambda x, t: x0, schedule, "x0")
    terms = vlb(perfect, x0, levels=levels, generator=g)
    assert torch.all(terms["decoder"] >= 0)
    bpd = bits_per_dim(terms["total"].mean(), 16)
    # a denoiser that knows x0 leaves only the prior term and the decoder's tiny bin error
    assert 0 <= float(bpd) < 1e-3
