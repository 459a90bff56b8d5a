"""Weightings over log-SNR: each is the objective it claims to be (exact identities on any denoiser), and every
time proposal, importance-weighted, estimates the same expectation (closed form on Gaussian data)."""

import math

import pytest
import torch

from deepgm.config import load_config
from deepgm.data import load_dataset
from deepgm.diffusion.denoiser import Denoiser, from_x0_eps
from deepgm.diffusion.losses import noise_data, simple_loss
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.schedules import DiscreteVP
from deepgm.diffusion.sde import VESDE, VPSDE, CosineVP, EDMSchedule, LearnedSchedule
from deepgm.diffusion.weighting import Weighting, log_snr_range, weighted_loss
from deepgm.models import build_model
from deepgm.nets.mlp import MLP

F64 = torch.float64
M, S2, D = 0.3, 0.5, 4  # Gaussian data N(M, S2 I) in D dimensions


def gaussian_denoiser(schedule):
    """The exact posterior mean of N(M, S2 I) data under any schedule."""

    def posterior_mean(x, t):
        alpha, sigma = (v.to(x.dtype)[:, None] for v in schedule.alpha_sigma(t.double()))
        return M + alpha * S2 / (alpha**2 * S2 + sigma**2) * (x - alpha * M)

    return Denoiser.from_fn(posterior_mean, schedule, "x0")


def expected_loss(weighting, schedule, n=200_001):
    """E_{t ~ U[t_min, 1]} omega(t) E||eps_hat - eps||^2 / D by Simpson's rule, with the exact denoiser's per-dim
    eps-MSE Var(eps | x_t) = alpha^2 S2 / (alpha^2 S2 + sigma^2) = sigmoid(lambda + log S2)."""
    t_min, _, _ = log_snr_range(schedule)
    t = torch.linspace(t_min, 1, n, dtype=F64)
    lam = schedule.log_snr(t)
    slope = schedule.log_snr_slope(t)
    values = weighting.omega(lam, slope, t_min) * torch.sigmoid(lam + math.log(S2))
    w = torch.ones(n, dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((values * w).sum() / (3 * (n - 1)))


CASES = [
    ("simple", "uniform", VPSDE()), ("simple", "log-snr", CosineVP()), ("elbo", "log-snr", VPSDE()),
    ("elbo", "stratified", CosineVP()), ("elbo", "log-snr", VESDE()), ("snr", "uniform", VPSDE()),
    ("min-snr", "log-snr", CosineVP()), ("v", "stratified", VPSDE()), ("edm", "lognormal", EDMSchedule()),
    ("edm", "lognormal", EDMSchedule(sigma_min=0.05, sigma_max=1.0)), ("edm", "lognormal", VPSDE()),
    ("edm", "uniform", CosineVP()),
]


@pytest.mark.parametrize("name,t_sampling,schedule", CASES, ids=lambda c: c if isinstance(c, str) else repr(c))
def test_every_proposal_estimates_the_weighted_objective(name, t_sampling, schedule):
    """Importance weights are right: the Monte-Carlo loss matches its quadrature under every proposal."""
    weighting = Weighting(name, t_sampling)
    g = torch.Generator().manual_seed(0)
    x0 = M + math.sqrt(S2) * torch.randn(20_000, D, generator=g, dtype=F64)
    loss = weighted_loss(gaussian_denoiser(schedule), x0, weighting, g)
    se = float(loss.std()) / math.sqrt(len(loss))
    assert abs(float(loss.mean()) - expected_loss(weighting, schedule)) < 4 * se + 1e-9


def test_elbo_diffusion_term_has_its_closed_form_and_log_snr_sampling_removes_the_slope_variance():
    """(1/2) int sigmoid(lambda + log S2) dlambda = (1/2)[log(1 + S2 e^lambda)] over [lambda(1), lambda(t_min)],
    per dimension."""
    schedule = VPSDE()
    _, lo, hi = log_snr_range(schedule)
    want = 0.5 * (math.log1p(S2 * math.exp(hi)) - math.log1p(S2 * math.exp(lo)))
    g = torch.Generator().manual_seed(1)
    x0 = M + math.sqrt(S2) * torch.randn(20_000, D, generator=g, dtype=F64)
    den = gaussian_denoiser(schedule)
    is_loss = weighted_loss(den, x0, Weighting("elbo", "log-snr"), g)
    uniform_loss = weighted_loss(den, x0, Weighting("elbo", "uniform"), g)
    for loss in (is_loss, uniform_loss):
        assert abs(float(loss.mean()) - want) < 4 * float(loss.std()) / math.sqrt(len(loss))
    assert is_loss.var() < 0.1 * uniform_loss.var()


def test_weightings_are_the_objectives_they_name():
    """On any denoiser: v = v-MSE, snr = max(SNR, 1) x0-MSE, min-snr = min(SNR, gamma) x0-MSE, edm = EDM's
    lambda(sigma) ||D - x0||^2 times the truncation mass of its log-normal, simple = DDPM's L_simple."""
    schedule = VPSDE()
    torch.manual_seed(0)
    net = MLP(dim=D, width=16, depth=1)
    den = Denoiser(net, schedule, "eps")
    x0 = torch.randn(256, D)

    def run(weighting, seed):
        g = torch.Generator().manual_seed(seed)
        loss = weighted_loss(den, x0, weighting, g)
        g = torch.Generator().manual_seed(seed)
        t, _ = weighting.draw(schedule, len(x0), g)
        x_t, eps = noise_data(schedule, x0, t, g)
        pred = den(x_t, t)
        alpha, sigma = (v[:, None].float() for v in schedule.alpha_sigma(t))
        return loss, pred, x0, eps, alpha, sigma, schedule.log_snr(t).float()

    with torch.no_grad():
        loss, pred, x0_, eps, alpha, sigma, lam = run(Weighting("v"), 0)
        v_mse = (from_x0_eps(pred.x0, pred.eps, alpha, sigma, "v") - from_x0_eps(x0_, eps, alpha, sigma, "v"))
        torch.testing.assert_close(loss, v_mse.pow(2).mean(1), rtol=1e-4, atol=1e-6)
        x0_mse = lambda p: (p.x0 - x0_).pow(2).mean(1)
        loss, pred, *_ , lam = run(Weighting("snr"), 1)
        torch.testing.assert_close(loss, torch.clamp(lam.exp(), min=1) * x0_mse(pred), rtol=1e-4, atol=1e-6)
        loss, pred, *_, lam = run(Weighting("min-snr", gamma=5.0), 2)
        torch.testing.assert_close(loss, torch.clamp(lam.exp(), max=5.0) * x0_mse(pred), rtol=1e-4, atol=1e-6)
        loss, pred, *_, lam = run(Weighting("edm"), 3)
        s2, sd = torch.exp(-lam), 0.5
        t_min, lo, hi = log_snr_range(schedule)
        normal = torch.distributions.Normal(0.0, 1.0)
        z_lo, z_hi = torch.tensor((-0.5 * hi + 1.2) / 1.2), torch.tensor((-0.5 * lo + 1.2) / 1.2)
        mass = float(normal.cdf(z_hi) - normal.cdf(z_lo))  # of ln(sigma/alpha) ~ N(-1.2, 1.2^2) in the range
        torch.testing.assert_close(loss, mass * (s2 + sd**2) / (s2 * sd**2) * x0_mse(pred), rtol=1e-4, atol=1e-6)
        ddpm = DiscreteVP.cosine(T=100)
        den_d = Denoiser(net, ddpm, "eps")
        a = weighted_loss(den_d, x0, Weighting("simple"), torch.Generator().manual_seed(4))
        b = simple_loss(den_d, x0, torch.Generator().manual_seed(4))
        torch.testing.assert_close(a, b)


def test_unknown_weightings_and_learned_schedule_with_log_snr_sampling_fail():
    with pytest.raises(ValueError, match="unknown weighting"):
        Weighting("huber")
    with pytest.raises(ValueError, match="unknown t_sampling"):
        Weighting("elbo", "sobol")
    with pytest.raises(ValueError, match="unknown key"):
        Weighting.from_config({"name": "elbo", "gama": 3})
    with pytest.raises(ValueError, match="learned schedule"):
        Weighting("elbo").draw(LearnedSchedule(features=4), 4)
    assert Weighting.from_config("edm").t_sampling == "lognormal"


def test_learned_schedule_shape_follows_the_variance_gradient_and_endpoints_the_elbo():
    """VDM app. I.2: with minimize_variance the shape parameters get d mean(L_i^2)/d eta of the per-example
    diffusion loss L_i (nats/dim) and the endpoints d ELBO / d endpoints, from one backward pass."""
    torch.manual_seed(0)
    x0 = torch.randn(32, D)

    def model(minimize):
        sched = LearnedSchedule(features=8, minimize_variance=minimize)
        torch.manual_seed(1)
        return DiffusionModel(MLP(dim=D, width=16, depth=1), sched, "eps", {"name": "elbo", "t_sampling": "stratified"})

    shape = ("w1", "w2", "b2", "w3")
    trick = model(True)
    loss, terms = trick.loss({"x": x0}, torch.Generator().manual_seed(2))
    loss.backward()
    plain = model(False)
    plain.load_state_dict(trick.state_dict())
    g = torch.Generator().manual_seed(2)
    loss_plain, _ = plain.loss({"x": x0}, g)
    grads_elbo = torch.autograd.grad(loss_plain, [plain.schedule.lam_min, plain.schedule.lam_max], retain_graph=True)
    g = torch.Generator().manual_seed(2)
    per_dim = weighted_loss(plain.denoiser, x0, plain.objective.weighting, g)  # same draws: L_i in nats/dim
    torch.testing.assert_close(loss_plain.detach(), loss.detach())
    second = torch.autograd.grad(per_dim.pow(2).mean(), [getattr(plain.schedule, n) for n in shape])
    for name, want in zip(shape, second, strict=True):
        torch.testing.assert_close(getattr(trick.schedule, name).grad, want, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(trick.schedule.lam_min.grad, grads_elbo[0])
    torch.testing.assert_close(trick.schedule.lam_max.grad, grads_elbo[1])
    assert set(terms) == {"elbo_bpd", "diffusion_bpd", "prior_bpd", "decoder_bpd"}


def test_a_mixture_of_weightings_estimates_their_average_objective():
    """A list of weightings splits the batch among them: its loss is the mean over shares, an unbiased estimate of
    the average of their quadratures (one where the time law is uniform, one log-normal at high noise)."""
    schedule = VPSDE()
    parts = [{"name": "simple", "t_sampling": "uniform"}, {"name": "edm", "p_mean": 1.5, "p_std": 1.2}]
    model = DiffusionModel(MLP(dim=D, width=8, depth=1), schedule, "x0", parts)
    model.denoiser = gaussian_denoiser(schedule)  # the exact denoiser: the expectation is known in closed form
    g = torch.Generator().manual_seed(0)
    x0 = M + math.sqrt(S2) * torch.randn(40_000, D, generator=g, dtype=F64)
    loss, terms = model.loss({"x": x0}, g)
    want = sum(expected_loss(Weighting(**p), schedule) for p in parts) / 2
    per_share = [float(v) for v in terms.values()]
    assert set(terms) == {"eps_mse_0", "edm_loss_1"} and float(loss) == pytest.approx(sum(per_share) / 2)
    # each share is 20,000 draws: the two shares' standard errors, added in quadrature, halved
    g = torch.Generator().manual_seed(1)
    spread = [weighted_loss(model.denoiser, x0[:20_000], Weighting(**p), g).std() / math.sqrt(20_000) for p in parts]
    assert abs(float(loss) - want) < 4 * float(sum(s**2 for s in spread).sqrt()) / 2
    assert abs(per_share[0] - per_share[1]) > 0.1 * want  # the two weightings differ: the mixture is not one of them
    # a config names it as a list (`model.loss=[simple, {name: edm, ...}]` on the command line)
    config = load_config("ddpm-toy", ["model.loss=[simple, {name: edm, p_mean: 1.5, p_std: 1.2}]"])
    built = build_model(config["model"], load_dataset(**config["data"]))
    assert [part.weighting for part in built.objective.parts] == [Weighting("simple"),
                                                                  Weighting("edm", p_mean=1.5, p_std=1.2)]
    with pytest.raises(ValueError, match="denoising weightings only"):
        DiffusionModel(MLP(dim=D, width=8, depth=1), schedule, "x0", ["simple", "elbo"])
    with pytest.raises(ValueError, match="at least two"):
        DiffusionModel(MLP(dim=D, width=8, depth=1), schedule, "x0", ["simple"])
