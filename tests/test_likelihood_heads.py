"""Likelihood heads: exact normalisation over the levels, agreement with float64 closed forms, the
dequantisation bound, sampling frequencies, and the soft clamp that keeps log-variances finite."""

import math

import pytest
import torch

from deepgm.likelihood import (
    bernoulli_log_prob,
    discretized_gaussian_log_prob,
    discretized_logistic_log_prob,
    gaussian_log_prob,
)
from deepgm.vae.heads import (
    LOGVAR_MAX,
    LOGVAR_MIN,
    BernoulliHead,
    DiscretizedGaussianHead,
    DiscretizedLogisticHead,
    GaussianHead,
    head_from_spec,
    make_head,
    soft_clamp,
)

LEVELS = 17
GRID = torch.linspace(-1, 1, LEVELS)


def test_bernoulli_log_prob_is_log_p_and_log_one_minus_p():
    logits = torch.tensor([-30.0, -2.0, 0.0, 1.5, 30.0], dtype=torch.float64)
    p = torch.sigmoid(logits)
    assert torch.allclose(bernoulli_log_prob(torch.ones_like(p), logits), torch.log(p))
    assert torch.allclose(bernoulli_log_prob(torch.zeros_like(p), logits), torch.log(torch.sigmoid(-logits)))
    assert torch.isfinite(bernoulli_log_prob(torch.ones(1), torch.tensor([-200.0]))).all()


def test_bernoulli_head_binarises_at_zero():
    head = BernoulliHead()
    x = torch.tensor([[-1.0, -0.125, 0.0, 0.125, 1.0]])
    assert head.observe(x, None).tolist() == [[-1.0, -1.0, -1.0, 1.0, 1.0]]
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5, -0.2]])
    expected = math.log(torch.sigmoid(torch.tensor(0.5))) + math.log(torch.sigmoid(torch.tensor(-0.2)))
    expected += sum(math.log(1 - float(torch.sigmoid(torch.tensor(v)))) for v in (0.3, -1.0, 2.0))
    assert head.log_prob(head.observe(x, None), logits).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("fn", [discretized_logistic_log_prob, discretized_gaussian_log_prob])
@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.37, -1.0), (-0.9, 0.5), (3.0, -2.0), (-5.0, -6.0),
                                            (0.05, -9.0), (0.0, 4.0)])
def test_discrete_heads_sum_to_one_over_the_levels(fn, mean, log_scale):
    # the edge bins are open, so the 17 probabilities exhaust the real line for any location and scale
    m = torch.full((LEVELS,), mean)
    s = torch.full((LEVELS,), log_scale if fn is discretized_logistic_log_prob else 2 * log_scale)
    total = torch.logsumexp(fn(GRID, m, s, LEVELS).double(), 0)
    assert total.item() == pytest.approx(0.0, abs=2e-5)


def test_discretized_logistic_matches_float64_cdf_differences():
    g = torch.Generator().manual_seed(0)
    x = GRID[torch.randint(0, LEVELS, (2000,), generator=g)].double()
    mean = (torch.rand(2000, generator=g, dtype=torch.float64) * 2.4 - 1.2)
    log_scale = torch.rand(2000, generator=g, dtype=torch.float64) * 4 - 4.5
    half = 1.0 / (LEVELS - 1)
    s = torch.exp(log_scale)
    upper = torch.where(x > 1 - half, torch.ones_like(x), torch.sigmoid((x - mean + half) / s))
    lower = torch.where(x < -1 + half, torch.zeros_like(x), torch.sigmoid((x - mean - half) / s))
    reference = torch.log(upper - lower)
    ok = reference > -30  # where float64 differences of sigmoids are still accurate
    got = discretized_logistic_log_prob(x.float(), mean.float(), log_scale.float(), LEVELS).double()
    assert torch.allclose(got[ok], reference[ok], atol=1e-4, rtol=1e-4)


def test_discretized_logistic_tails_are_finite_with_finite_gradients():
    # far tails: the mass of a bin 40 scales away is ~ e^-40 * (e^{1/8 s} - ...) - no underflow to -inf
    mean = torch.tensor([-0.9, 0.9, 0.0, 0.0], requires_grad=True)
    log_scale = torch.tensor([-5.0, -5.0, -8.0, 3.0], requires_grad=True)
    x = torch.tensor([0.5, -0.5, 1.0, -1.0])
    lp = discretized_logistic_log_prob(x, mean, log_scale, LEVELS)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()
    # the float64 value of the first tail bin, by log sigmoid(b) - log sigmoid(a) with a, b << 0
    a, b = (0.5 - 0.0625 + 0.9) / math.exp(-5.0), (0.5 + 0.0625 + 0.9) / math.exp(-5.0)
    exact = -b + math.log(math.expm1(b - a))  # log(sigmoid(-a) - sigmoid(-b)) for large a, b
    assert lp[0].item() == pytest.approx(exact, rel=1e-5)


def test_dequantised_gaussian_head_bounds_the_discrete_probability():
    """E_u log N(x + u) + log(bin) <= log P(x) (Jensen), and E_u has the closed form with Var(u) = w^2/12."""
    head = GaussianHead(logvar=None, levels=LEVELS)
    w = 2.0 / (LEVELS - 1)
    x = GRID[3:14].double()  # interior levels
    mean, logvar = torch.full_like(x, 0.1), torch.full_like(x, -3.0)
    params = torch.stack([mean, logvar])[None]  # (1, 2, 11): location and log-variance channels
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([gaussian_log_prob(head.observe(x[None], g), mean, logvar)[0] for _ in range(4000)])
    closed = -0.5 * (math.log(2 * math.pi) + logvar + ((x - mean) ** 2 + w**2 / 12) * torch.exp(-logvar))
    assert torch.allclose(draws.mean(0), closed, atol=4 * draws.std(0).max().item() / math.sqrt(4000))
    discrete = discretized_gaussian_log_prob(x, mean, logvar, LEVELS)
    assert (closed + math.log(w) <= discrete + 1e-9).all()
    assert head.discrete_correction(x.numel()) == pytest.approx(x.numel() * math.log(w))
    assert head.log_prob(x[None], params).shape == (1,)


@pytest.mark.parametrize("head", [DiscretizedLogisticHead(LEVELS), DiscretizedGaussianHead(LEVELS)])
def test_discrete_head_samples_follow_its_probabilities(head):
    params = torch.tensor([[[0.2]], [[-1.5]]]).reshape(1, 2, 1)  # one dimension: location 0.2, log-scale -1.5
    g = torch.Generator().manual_seed(1)
    n = 40_000
    draws = head.sample(params.expand(n, 2, 1).contiguous(), g).reshape(-1)  # (n,)
    on_grid = torch.isclose(draws[:, None], GRID[None]).any(1)
    assert on_grid.all()
    freq = torch.stack([(torch.isclose(draws, v)).double().mean() for v in GRID])
    probs = torch.exp(torch.stack([head.log_prob(v.reshape(1, 1), params).double()[0] for v in GRID]))
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(freq, probs, atol=4 * math.sqrt(0.25 / n))


def test_soft_clamp_is_a_smooth_bounded_near_identity_map():
    v = torch.linspace(-1e4, 1e4, 20001, dtype=torch.float64, requires_grad=True)
    out = soft_clamp(v)
    assert torch.isfinite(out).all()
    assert (out >= LOGVAR_MIN).all() and (out <= LOGVAR_MAX).all()
    near = soft_clamp(torch.tensor([-20.0, 14.0], dtype=torch.float64))
    assert (near - torch.tensor([LOGVAR_MIN, LOGVAR_MAX])).abs().min() > 0  # strictly inside
    assert (out[1:] >= out[:-1]).all()
    out.sum().backward()
    assert torch.isfinite(v.grad).all() and (v.grad >= 0).all()
    mid = torch.tensor([-4.0, -1.0, 0.0, 1.0])
    assert torch.allclose(soft_clamp(mid), mid, atol=0.02)  # well inside the bounds it is the identity
    assert soft_clamp(torch.tensor(-1e6)).item() == pytest.approx(LOGVAR_MIN)
    assert soft_clamp(torch.tensor(1e6)).item() == pytest.approx(LOGVAR_MAX)


def test_heads_from_config_and_their_parameter_counts():
    assert head_from_spec("bernoulli", LEVELS).params_per_dim == 1
    assert head_from_spec({"name": "gaussian", "learn_variance": False, "logvar": -2}, LEVELS).params_per_dim == 1
    assert make_head("discretized_gaussian", LEVELS).params_per_dim == 2
    assert make_head("discretized_logistic", LEVELS, learn_variance=False).params_per_dim == 1
    with pytest.raises(ValueError, match="unknown likelihood head"):
        make_head("poisson", LEVELS)
    with pytest.raises(ValueError, match="discrete levels"):
        make_head("discretized_logistic", None)
    with pytest.raises(ValueError, match="unknown head option"):
        head_from_spec({"name": "gaussian", "variance": 1}, LEVELS)


def test_categorical_head_is_a_softmax_over_the_levels_and_samples_from_it():
    head = make_head("categorical", LEVELS)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, LEVELS, 3, generator=g)  # three dimensions, one row of 17 logits each
    params = logits.reshape(1, -1)  # the decoder's layout (B, K * D): level-major
    per_level = torch.stack([head.log_prob(torch.full((1, 3), v.item()), params) for v in GRID])[:, 0]  # (17,)
    # summed over the 17^3 joint outcomes the factorised probabilities total one: prod_d sum_k p_dk = 1
    marginal = torch.log_softmax(logits[0], dim=0)  # (17, 3)
    assert torch.allclose(per_level, marginal.sum(1), atol=1e-5)
    n = 20_000
    draws = head.sample(params.expand(n, -1), g)  # (n, 3)
    freq = torch.stack([torch.isclose(draws[:, 0], v).double().mean() for v in GRID])
    assert torch.allclose(freq, torch.softmax(logits[0, :, 0], 0).double(), atol=4 * math.sqrt(0.25 / n))
    mean = head.mean(params)[0, 0]
    assert mean.item() == pytest.approx(float((torch.softmax(logits[0, :, 0], 0) * GRID).sum()), abs=1e-6)
