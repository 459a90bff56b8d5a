"""Likelihoods against exact answers: the probability-flow ODE with the exact Gaussian-mixture denoiser gives the
mixture's log p(x); the continuous ELBO bounds it and is tight with the exact denoiser; Hutchinson is unbiased;
dequantisation and bits/dim follow the discrete VLB's conventions."""

import json
import math

import pytest
import torch

from deepgm.data.toy import random_mixture, ring
from deepgm.diffusion.denoiser import Denoiser
from deepgm.diffusion.likelihood import (
    continuous_elbo,
    decoder_nll,
    dequantize,
    elbo_nll,
    ode_log_likelihood,
    ode_nll,
)
from deepgm.diffusion.losses import vlb
from deepgm.diffusion.schedules import DiscreteVP
from deepgm.diffusion.sde import VESDE, VPSDE, CosineVP, EDMSchedule, SubVPSDE
from helpers import gaussian_denoiser

F64 = torch.float64


def isotropic_mixture_denoiser(gmm, schedule):
    """Exact E[x0 | x_t] of a mixture of isotropic components, with a time per example (as the ELBO asks).
    Kept beside gmm.denoiser(schedule), which takes one time per call (t[0]), as ODE solvers ask."""
    var0 = gmm.covs[:, 0, 0]  # (K,)

    def posterior_mean(x, t):
        alpha, sigma = (v[:, None] for v in schedule.alpha_sigma(t.double()))  # (B, 1)
        x = x.double()
        var = alpha**2 * var0 + sigma**2  # (B, K)
        diff = x[:, None, :] - alpha[:, :, None] * gmm.means  # (B, K, D)
        log_resp = torch.log(gmm.weights) - 0.5 * diff.pow(2).sum(-1) / var - 0.5 * gmm.dim * torch.log(var)
        means = gmm.means + (alpha * var0 / var)[:, :, None] * diff  # E[x0 | x_t, k], (B, K, D)
        return (torch.softmax(log_resp, 1)[:, :, None] * means).sum(1)

    return Denoiser.from_fn(posterior_mean, schedule, "x0")


SCHEDULES = [VPSDE(), SubVPSDE(), VESDE(sigma_min=1e-3), EDMSchedule(), CosineVP(), DiscreteVP.cosine(T=1000)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_probability_flow_likelihood_of_the_exact_denoiser_is_the_mixtures_log_density(schedule):
    """|log p_ODE(x) - log p(x)| < 1e-2 nats for every sample, on every schedule (a DDPM's included)."""
    gmm = ring()
    x = gmm.sample(64, torch.Generator().manual_seed(0)).double()
    result = ode_log_likelihood(gmm.denoiser(schedule), x)
    err = (result.log_prob - gmm.log_prob(x)).abs()
    assert err.max() < 1e-2, f"max error {float(err.max()):.2e} nats"
    assert 20 < result.nfe < 400


def test_probability_flow_likelihood_in_higher_dimension_with_full_covariances():
    gmm = random_mixture(dim=5, n_modes=3, seed=1)
    x = gmm.sample(32, torch.Generator().manual_seed(1)).double()
    result = ode_log_likelihood(gmm.denoiser(VPSDE()), x)
    assert (result.log_prob - gmm.log_prob(x)).abs().max() < 1e-2


def test_gaussian_flow_is_linear_with_the_exact_log_determinant():
    """For x0 ~ N(m, s2 I) the ODE maps x to alpha_1 m + k (x - alpha_0 m), k = sqrt(v_1 / v_0) with
    v = alpha^2 s2 + sigma^2, and the change of variables adds D log k."""
    m, s2, dims = 0.4, 0.3, 3
    schedule = VESDE(sigma_min=0.01, sigma_max=5.0)
    x = torch.randn(8, dims, dtype=F64)
    result = ode_log_likelihood(gaussian_denoiser(schedule, m, s2), x, rtol=1e-8, atol=1e-8)
    (a0, a1), (s0, s1) = schedule.alpha_sigma(torch.tensor([schedule.t_min, 1.0], dtype=F64))
    k = torch.sqrt((a1**2 * s2 + s1**2) / (a0**2 * s2 + s0**2))
    torch.testing.assert_close(result.z, a1 * m + k * (x - a0 * m), rtol=1e-6, atol=1e-6)
    want = torch.full((8,), dims * float(torch.log(k)), dtype=F64)
    torch.testing.assert_close(result.delta, want, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimator_is_unbiased_and_more_probes_help(probe):
    gmm = random_mixture(dim=4, n_modes=3, seed=2)
    den = gmm.denoiser(VPSDE())
    x = gmm.sample(48, torch.Generator().manual_seed(3)).double()
    exact = gmm.log_prob(x)
    errors = {}
    for probes in (1, 8):
        g = torch.Generator().manual_seed(4)
        logp = ode_log_likelihood(den, x, divergence="hutchinson", probes=probes, probe=probe, generator=g).log_prob
        errors[probes] = logp - exact
    for err in errors.values():
        assert abs(float(err.mean())) < 4 * float(err.std()) / math.sqrt(len(err)) + 1e-2
    assert errors[8].pow(2).mean() < 0.4 * errors[1].pow(2).mean()


def test_continuous_elbo_bounds_the_log_density_and_is_tight_for_the_exact_denoiser():
    """E_x[ELBO(x) - (-log p(x))] is ~0 for the exact denoiser (the SDE model is then the data's law) and clearly
    positive for a wrong one (the mixture with wider modes), compared on the same draws of lambda and eps."""
    gmm = ring()
    x = gmm.sample(200, torch.Generator().manual_seed(5)).double()
    nll = -gmm.log_prob(x)
    schedule = VPSDE()
    bound = {}
    for name, mixture in (("exact", gmm), ("wrong", ring(std=0.3))):
        terms = continuous_elbo(isotropic_mixture_denoiser(mixture, schedule), x, n_t=4096,
                                generator=torch.Generator().manual_seed(6))
        bound[name] = terms["total"]
    gap = bound["exact"] - nll
    se = float(gap.std()) / math.sqrt(len(gap))
    assert se < 0.03 and abs(float(gap.mean())) < 4 * se, (float(gap.mean()), se)
    worse = bound["wrong"] - bound["exact"]
    assert float(worse.mean()) > 0.2 + 4 * float(worse.std()) / math.sqrt(len(x))


def test_decoder_and_dequantisation_follow_the_discrete_conventions():
    levels = 17
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (500, 6), generator=g).double() / (levels - 1) * 2 - 1
    xd = dequantize(x, levels, g)
    assert (xd - x).abs().max() <= 1 / (levels - 1) and (xd - x).abs().min() > 0
    # a decoder far sharper than the bins puts (almost) all mass on the right level: -log P ~ 0
    sharp = decoder_nll(VPSDE(t_min=1e-5), x, levels, g)
    assert torch.all(sharp >= 0) and sharp.max() < 1e-6
    # the continuous decoder's expectation E_z[-log N(x; z/alpha, s^2)] = D (log(2 pi s^2) + 1)/2, s = sigma/alpha;
    # on discrete data with bins much wider than s its Monte-Carlo average approaches 0
    schedule = VESDE(sigma_min=0.05, sigma_max=10.0, t_min=1e-12)
    dens = decoder_nll(schedule, x, None, g)
    torch.testing.assert_close(dens, torch.full((500,), 3 * (math.log(2 * math.pi * 0.05**2) + 1), dtype=F64))
    coarse = decoder_nll(schedule, x, levels, g, samples=64)
    # per dimension E_e[-log P(bin | mean x + s e, std s)], by quadrature over e ~ N(0, 1); edge bins are one-sided
    e = torch.linspace(-9, 9, 20001, dtype=F64)
    w = torch.exp(-0.5 * e**2) / math.sqrt(2 * math.pi) * (e[1] - e[0])
    cdf, r = torch.special.ndtr, (1 / 16) / 0.05  # half bin over s
    inner_nll = float((w * -torch.log(cdf(r - e) - cdf(-r - e))).sum())
    edge_nll = float((w * -torch.log(cdf(r - e))).sum())
    edges = (x.abs() == 1).double().sum(1)
    want = edges * edge_nll + (6 - edges) * inner_nll
    assert abs(float((coarse - want).mean())) < 4 * float((coarse - want).std()) / math.sqrt(len(x))


def test_dequantised_ode_nll_of_a_standard_normal_model():
    """With the exact denoiser of N(0, I) data the ODE gives -log N(x + u; 0, I) at the dequantised points, and
    the bound on the discrete data subtracts D log(bin width), bin width 2/(K - 1) (as the discrete VLB's bins)."""
    levels, dims = 17, 2
    schedule = VESDE(sigma_min=1e-3, sigma_max=20.0)
    # standard normal data: the exact denoiser is linear; the ODE gives -log N(x; 0, 1) for any x
    den = gaussian_denoiser(schedule, 0.0, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (16, dims), generator=g).double() / (levels - 1) * 2 - 1
    out = ode_nll(den, x, levels, divergence="exact", generator=torch.Generator().manual_seed(1))
    xd = dequantize(x, levels, torch.Generator().manual_seed(1))
    density_nll = 0.5 * (xd**2).sum(1) + dims * 0.5 * math.log(2 * math.pi)
    want = density_nll - dims * math.log(2 / (levels - 1))
    torch.testing.assert_close(out.nats, want, rtol=0, atol=5e-3)
    torch.testing.assert_close(out.bpd, want / (dims * math.log(2)), rtol=0, atol=5e-3)
    summary = out.summary()
    assert summary["n"] == 16 and summary["bpd_ci95"] > 0 and "dequantisation over 17 levels" in summary["note"]


def test_discrete_vlb_of_a_continuous_model_is_a_looser_bound_than_its_continuous_elbo():
    """A continuous model also has a T-step discrete VLB (t_i = i/T): a valid bound, looser than the continuous
    ELBO, which is tight for the exact denoiser (Kingma et al. 2021, sec. 4: the continuous limit is the best)."""
    gmm = ring()
    schedule = CosineVP(t_min=1e-3)
    den = isotropic_mixture_denoiser(gmm, schedule)
    x = gmm.sample(100, torch.Generator().manual_seed(7)).double()
    nll = float(-gmm.log_prob(x).mean())
    cont = elbo_nll(den, x, None, n_t=1024, generator=torch.Generator().manual_seed(8))
    disc = float(vlb(den, x, None, generator=torch.Generator().manual_seed(9), T=200)["total"].mean())
    se = float(cont.nats.std()) / math.sqrt(len(x))
    assert abs(float(cont.nats.mean()) - nll) < 4 * se + 1e-3
    assert disc > float(cont.nats.mean()) + 1.0
    torch.testing.assert_close(cont.bpd, cont.nats / (2 * math.log(2)))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """`deepgm train configs/sde-vp-toy.yaml` on a tiny budget."""
    from deepgm.cli import main

    run = tmp_path_factory.mktemp("runs") / "toy"
    tiny = ["train.steps=8", "train.batch_size=64", "train.warmup_steps=2", "train.log_every=4",
            "train.checkpoint_every=8", "train.sample_every=0", "data.n=256", "sample.steps=4", "sample.n=16",
            "eval.n_samples=64", "eval.steps=4"]
    assert main(["train", "sde-vp-toy", *tiny, "--out", str(run), "--quiet"]) == 0
    return run


def test_cli_eval_nll_prints_bits_per_dim_with_an_interval(toy_run, capsys):
    """`deepgm eval RUN --nll` on the tiny run."""
    from deepgm.cli import main

    capsys.readouterr()
    assert main(["eval", str(toy_run), "--nll", "--nll-examples", "16", "--divergence", "exact"]) == 0
    printed = capsys.readouterr().out
    assert "probability-flow ODE NLL" in printed and "continuous ELBO" in printed and "±" in printed
    saved = json.loads((toy_run / "nll.json").read_text())
    assert saved["ode"]["n"] == 16 and saved["ode"]["bpd_ci95"] > 0 and saved["levels"] is None
    assert math.isfinite(saved["ode"]["bpd"]) and math.isfinite(saved["elbo"]["bpd"]) and saved["ode"]["nfe"] > 0


def test_cli_eval_of_a_2d_run_draws_score_field_trajectories_and_ode_density(toy_run, monkeypatch):
    """`deepgm eval RUN` on a 2-D run writes the three pictures next to eval.json (density grid shrunk for speed)."""
    from PIL import Image

    import deepgm.diffusion.model
    from deepgm.cli import main

    monkeypatch.setitem(deepgm.diffusion.model.DENSITY_PICTURE, "density_points", 6)
    assert main(["eval", str(toy_run)]) == 0
    for name in ("score_field.png", "sde_vs_ode_trajectories.png", "ode_density.png"):
        assert Image.open(toy_run / name).size[0] > 300, name
