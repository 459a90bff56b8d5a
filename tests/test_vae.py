"""VAE bounds against exact answers: on a linear-Gaussian model (probabilistic PCA) log p(x) is known in closed
form, so the ELBO and IWAE_k can be checked against it; analytic KLs against Monte Carlo; the objective's
β warm-up and free bits exactly; soft-clamped log-variances against a bad batch."""

import math

import pytest
import torch
from torch import nn

from deepgm.likelihood import normal_kl
from deepgm.vae.heads import GaussianHead, make_head
from deepgm.vae.objectives import RegularizedELBO
from deepgm.vae.vae import VAE, MLPDecoder, MLPEncoder, gaussian_log_density

D, LATENT, NOISE_VAR = 6, 2, 0.3


class LinearGaussianEncoder(nn.Module):
    """q(z | x) = N(A x + c, diag e^logvar): the encoder family that contains PPCA's exact posterior."""

    def __init__(self, A: torch.Tensor, c: torch.Tensor, logvar: torch.Tensor):
        super().__init__()
        self.A, self.c, self.logvar = nn.Parameter(A.clone()), nn.Parameter(c.clone()), nn.Parameter(logvar.clone())

    def forward(self, x, y=None):
        mu = x @ self.A.T + self.c
        return mu, self.logvar.expand_as(mu)


class LinearDecoder(nn.Module):
    autoregressive = False

    def __init__(self, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.W, self.b = nn.Parameter(W.clone()), nn.Parameter(b.clone())

    def forward(self, z, y=None, x=None):
        return z @ self.W.T + self.b  # (B, D): the Gaussian head's means


@pytest.fixture(scope="module")
def ppca():
    """p(z) = N(0, I_2), p(x | z) = N(W z + b, 0.3 I_6), W with orthogonal columns (so the exact posterior is
    diagonal), its data, and the exact log p(x) = log N(x; b, W W^T + 0.3 I)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    W = Q[:, :LATENT] * torch.tensor([2.0, 1.0], dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64) * 0.5
    z = torch.randn(400, LATENT, generator=g, dtype=torch.float64)
    x = z @ W.T + b + math.sqrt(NOISE_VAR) * torch.randn(400, D, generator=g, dtype=torch.float64)
    cov = W @ W.T + NOISE_VAR * torch.eye(D, dtype=torch.float64)
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    M = W.T @ W + NOISE_VAR * torch.eye(LATENT, dtype=torch.float64)  # diagonal
    optimal = (torch.linalg.solve(M, W.T), -torch.linalg.solve(M, W.T) @ b, torch.log(NOISE_VAR / M.diagonal()))
    return {"W": W, "b": b, "x": x, "log_px": log_px, "optimal": optimal}


def _vae(ppca, A, c, logvar) -> VAE:
    head = GaussianHead(logvar=math.log(NOISE_VAR))  # continuous data: no dequantisation
    return VAE(LinearGaussianEncoder(A, c, logvar), LinearDecoder(ppca["W"], ppca["b"]), head, LATENT, (D,)).double()


def closed_form_elbo(ppca, A, c, logvar) -> torch.Tensor:
    """E_q log N(x; W z + b, s^2 I) - KL(q || N(0, I)), exactly, per example."""
    x, W, b = ppca["x"], ppca["W"], ppca["b"]
    mu, var = x @ A.T + c, torch.exp(logvar)
    resid = x - mu @ W.T - b
    trace = (W**2 @ var)  # diag(W diag(var) W^T), (D,)
    rec = -0.5 * (D * math.log(2 * math.pi * NOISE_VAR) + ((resid**2).sum(1) + trace.sum()) / NOISE_VAR)
    kl = 0.5 * (mu**2 + var - 1 - logvar).sum(1)
    return rec - kl


def _random_encoder(g):
    return (torch.randn(LATENT, D, generator=g, dtype=torch.float64) * 0.5,
            torch.randn(LATENT, generator=g, dtype=torch.float64) * 0.3,
            torch.randn(LATENT, generator=g, dtype=torch.float64) - 1)


def test_elbo_never_exceeds_log_px_and_the_model_estimates_it(ppca):
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        A, c, logvar = _random_encoder(g)
        exact = closed_form_elbo(ppca, A, c, logvar)
        assert (exact <= ppca["log_px"] + 1e-10).all()
    # the model's one-sample ELBO (reparameterised z, analytic KL) is unbiased for the closed form
    vae = _vae(ppca, A, c, logvar)
    batch = {"x": ppca["x"][:50].repeat(400, 1)}  # (20000, D): 400 draws per example
    terms = vae.elbo_terms(batch, torch.Generator().manual_seed(2))
    draws = (terms["log_px_z"] - terms["kl"].sum(1)).detach().reshape(400, 50)
    se = draws.std(0) / math.sqrt(400)
    assert ((draws.mean(0) - exact[:50]).abs() < 4 * se + 1e-9).all()


def test_elbo_and_every_importance_weight_equal_log_px_at_the_optimal_encoder(ppca):
    A, c, logvar = ppca["optimal"]
    assert torch.allclose(closed_form_elbo(ppca, A, c, logvar), ppca["log_px"], atol=1e-10, rtol=0)
    vae = _vae(ppca, A, c, logvar)
    log_w = vae.log_weights({"x": ppca["x"]}, 7, torch.Generator().manual_seed(0))  # (400, 7)
    # q is the exact posterior, so p(x, z) / q(z | x) = p(x) for every z
    assert torch.allclose(log_w, ppca["log_px"][:, None].expand(-1, 7), atol=1e-9, rtol=0)
    bound = vae.iwae({"x": ppca["x"]}, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(bound, ppca["log_px"], atol=1e-9, rtol=0)


def test_iwae_rises_with_k_towards_log_px(ppca):
    A, c, logvar = ppca["optimal"]
    vae = _vae(ppca, 0.6 * A, c + 0.2, logvar + 1.0)  # a poor encoder: shrunk means, too wide
    batch = {"x": ppca["x"]}
    log_px = ppca["log_px"].mean().item()
    elbo = closed_form_elbo(ppca, 0.6 * A, c + 0.2, logvar + 1.0).mean().item()
    bounds = {k: vae.iwae(batch, k, torch.Generator().manual_seed(k), chunk=40_000).mean().item()
              for k in (1, 10, 100, 1000)}
    assert bounds[1] == pytest.approx(elbo, abs=0.05)  # IWAE_1 is the ELBO
    assert bounds[1] < bounds[10] < bounds[100] < bounds[1000] <= log_px + 1e-3
    assert log_px - bounds[1000] < 0.05 * (log_px - elbo)


def test_analytic_kl_equals_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mu_q, lv_q = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    mu_p, lv_p = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    n = 400_000
    z = mu_q + torch.exp(0.5 * lv_q) * torch.randn(n, 3, generator=g, dtype=torch.float64)
    for mp, lp in ((mu_p, lv_p), (torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))):
        sample = gaussian_log_density(z, mu_q, lv_q) - gaussian_log_density(z, mp, lp)
        analytic = normal_kl(mu_q, lv_q, mp, lp).sum()
        assert (sample.mean() - analytic).abs() < 4 * sample.std() / math.sqrt(n)


def test_kl_warmup_and_step_counter_live_in_the_checkpoint():
    vae = VAE(MLPEncoder((4,), 2, hidden=8), MLPDecoder((4,), 2, 1, hidden=8), GaussianHead(0.0), 2, (4,),
              beta=0.5, warmup_steps=10)
    assert [vae.kl_weight(s) for s in (0, 5, 10, 50)] == [0.0, 0.25, 0.5, 0.5]
    batch, g = {"x": torch.randn(8, 4)}, torch.Generator().manual_seed(0)
    for _ in range(3):
        _, terms = vae.loss(batch, g)
    assert int(vae.step) == 3 and terms["beta"].item() == pytest.approx(0.5 * 2 / 10)
    vae.eval()
    vae.loss(batch, g)
    assert int(vae.step) == 3  # evaluation does not advance the schedule
    assert vae.state_dict()["step"].item() == 3


def test_free_bits_per_dimension_and_per_group():
    objective = RegularizedELBO([2], free_bits=0.5)
    kl = torch.tensor([[0.1, 2.0], [0.3, 1.0]], requires_grad=True)  # batch means 0.2 and 1.5
    penalty = objective.kl_penalty(kl)
    assert penalty.item() == pytest.approx(0.5 + 1.5)
    penalty.backward()
    assert kl.grad[:, 0].abs().sum() == 0 and torch.allclose(kl.grad[:, 1], torch.tensor([0.5, 0.5]))
    group = RegularizedELBO([2], free_bits=0.5, free_bits_mode="group")  # one group of 2 units: max(0.5, 0.2 + 1.5)
    assert group.kl_penalty(kl).item() == pytest.approx(1.7)
    assert RegularizedELBO([2], free_bits=3.0, free_bits_mode="group").kl_penalty(kl).item() == pytest.approx(3.0)
    log_px_z = torch.tensor([-3.0, -5.0])
    assert objective(log_px_z, kl, 0.5, dims=4).item() == pytest.approx((4.0 + 0.5 * 2.0) / 4)


def test_the_vae_loss_is_its_objective_of_its_elbo_terms():
    vae = VAE(MLPEncoder((4,), 2, hidden=8), MLPDecoder((4,), 2, 1, hidden=8), GaussianHead(0.0), 2, (4,),
              beta=0.7, free_bits=0.1).eval()
    batch = {"x": torch.randn(8, 4)}
    loss, _ = vae.loss(batch, torch.Generator().manual_seed(0))
    terms = vae.elbo_terms(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, vae.objective(terms["log_px_z"], terms["kl"], 0.7, 4))


@pytest.mark.parametrize("head", ["discretized_logistic", "discretized_gaussian", "gaussian", "bernoulli"])
def test_soft_clamped_log_variances_survive_a_bad_batch(head):
    torch.manual_seed(0)
    shape = (1, 8, 8)
    h = make_head(head, 17)
    vae = VAE(MLPEncoder(shape, 4, hidden=16), MLPDecoder(shape, 4, h.params_per_dim, hidden=16), h, 4, shape)
    x = torch.linspace(-1, 1, 17)[torch.randint(0, 17, (16, 1, 8, 8))]
    with torch.no_grad():  # a bad update blew up the rows that output log-variances (means left as they are)
        vae.encoder.out.weight[4:].normal_(0, 1e4, generator=torch.Generator().manual_seed(0))
        if h.params_per_dim == 2:
            vae.decoder.body[-1].weight[64:].mul_(1e4)
    raw_logvar = vae.encoder.out(vae.encoder.body(x.reshape(16, -1))).chunk(2, dim=1)[1]
    assert raw_logvar.abs().max() > 1000  # exp() of this overflows float32 without the clamp
    bad = {"x": x}
    loss, terms = vae.loss(bad, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters())


def test_aggressive_updates_train_the_encoder_inside_loss_and_resume_exactly():
    torch.manual_seed(0)
    shape = (1, 4, 4)
    h = make_head("discretized_logistic", 17)

    def build():
        torch.manual_seed(0)
        return VAE(MLPEncoder(shape, 2, hidden=8), MLPDecoder(shape, 2, 2, hidden=8), h, 2, shape,
                   aggressive={"inner_steps": 3, "until": 5, "lr": 1e-2})

    vae = build()
    batch = {"x": torch.linspace(-1, 1, 17)[torch.randint(0, 17, (8, 1, 4, 4))]}
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in vae.encoder.parameters()]
    loss, terms = vae.loss(batch, g)
    loss.backward()
    assert all(not torch.equal(a, p) for a, p in zip(before, vae.encoder.parameters(), strict=True))
    assert terms["inner_loss_last"] < terms["inner_loss_first"]
    assert all(p.grad is None for p in vae.encoder.parameters())  # the outer step is decoder-only
    assert all(p.grad is not None for p in vae.decoder.parameters())
    # resume: the inner Adam state is in the state dict, so a restored copy continues identically
    vae.loss(batch, g)
    restored = build()
    restored.load_state_dict(vae.state_dict())
    g_state = g.get_state()
    a, _ = vae.loss(batch, g)
    g.set_state(g_state)
    b, _ = restored.loss(batch, g)
    assert torch.equal(a, b) and int(vae.agg_t) == 9
    # after `until` steps the ordinary joint update takes over
    for _ in range(3):
        vae.loss(batch, g)
    vae.zero_grad()
    vae.loss(batch, g)[0].backward()
    assert all(p.grad is not None for p in vae.encoder.parameters())
