"""Likelihoods of diffusion models in continuous time, in nats per example and bits/dim.

- `ode_log_likelihood`: exact log p(x) of the probability-flow ODE model by the instantaneous change of
  variables (Chen et al. 2018; Song et al. 2021, sec. 4.3 and app. D.2), integrated in float64 from t_min to 1
  with scipy's adaptive RK45; the divergence exactly (D backward passes) or by Hutchinson's estimator
  (Rademacher or Gaussian probes, fixed along the trajectory, averaged over several).
- `continuous_elbo`: VDM's continuous-time bound (Kingma et al. 2021, eq. 11-17): prior KL at t = 1, the
  diffusion term (1/2) int ||eps - eps_hat||^2 dlambda over [lambda(1), lambda(t_min)], and a decoder at t_min.
- `ode_nll`: the ODE NLL of discrete data as a bound on -log P(x) via uniform dequantisation,
  -log P(x) <= E_u[-log p(x + u)] - D log(bin width) (`deepgm.likelihood.dequantized_to_discrete_nll`).

Conventions are the discrete VLB's: data in [-1, 1], K levels in bins of width 2/(K - 1), the decoder a
Gaussian integrated over the bins with the edge bins extended to infinity; bits/dim = nats / (D ln 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from deepgm.diffusion.denoiser import expand_like
from deepgm.diffusion.grids import smallest_time
from deepgm.diffusion.losses import noise_data, prior_kl
from deepgm.diffusion.schedules import Schedule
from deepgm.diffusion.weighting import log_snr_range, stratified_uniform
from deepgm.likelihood import LOG_2PI, NLL, bits_per_dim, dequantized_to_discrete_nll, discretized_gaussian_log_prob

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def _sum_dims(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(1)  # (B,)


def _net_dtype(denoiser) -> torch.dtype:
    """The dtype the network computes in: its parameters', or float64 for a parameter-free (analytic) denoiser."""
    for p in denoiser.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float64


def prior_log_prob(schedule: Schedule, z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, prior_std^2 I) per example (B,), float64."""
    var = schedule.prior_std() ** 2
    z = z.double()
    return -0.5 * _sum_dims(z**2) / var - 0.5 * z[0].numel() * (LOG_2PI + math.log(var))


def probability_flow(denoiser, x: torch.Tensor, t: float, cond=None, divergence: str = "exact",
                     probes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drift v = f x + g^2 eps_hat / (2 sigma) of the probability-flow ODE (Song et al. 2021, eq. 13) and its
    divergence div_x v = f D + g^2 / (2 sigma) div_x eps_hat, exactly or as mean_k p_k^T J p_k over the
    `probes` (K, *x.shape)."""
    schedule = denoiser.schedule
    tt = torch.tensor(float(t), dtype=torch.float64)
    f, g2 = (float(v) for v in schedule.sde(tt))
    sigma = float(schedule.alpha_sigma(tt)[1])
    dims = x[0].numel()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        eps = denoiser(x, tt.to(x.device), **(cond or {})).eps
        if divergence == "exact":
            flat = eps.reshape(x.shape[0], -1)  # (B, D)
            div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            for i in range(dims):  # each example's output depends on its own input only, so one pass per dim
                grad = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < dims - 1)[0]
                div += grad.reshape(x.shape[0], -1)[:, i].double()
        elif divergence == "hutchinson":
            div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            for k, p in enumerate(probes):
                vjp = torch.autograd.grad((eps * p).sum(), x, retain_graph=k < len(probes) - 1)[0]
                div += _sum_dims(vjp * p).double() / len(probes)
        else:
            raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    v = f * x.detach().double() + 0.5 * g2 / sigma * eps.detach().double()
    return v, f * dims + 0.5 * g2 / sigma * div


@dataclass
class ODEResult:
    """log p(x) of the ODE model (B,) float64 nats, its two parts, the latent x(1) and the network evaluations."""

    log_prob: torch.Tensor
    prior: torch.Tensor
    delta: torch.Tensor
    z: torch.Tensor
    nfe: int


@torch.no_grad()
def ode_log_likelihood(denoiser, x: torch.Tensor, cond: dict | None = None, divergence: str = "exact",
                       probes: int = 1, probe: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                       generator: torch.Generator | None = None, t_min: float | None = None) -> ODEResult:
    """log p_{t_min}(x) = log p_1(x(1)) + int_{t_min}^1 div v(x(t), t) dt along the probability-flow ODE
    (instantaneous change of variables, Chen et al. 2018 thm. 1), in float64 with scipy's RK45
    (Song et al. 2021 use rtol = atol = 1e-5)."""
    from scipy.integrate import solve_ivp

    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose one of {PROBES}")
    schedule = denoiser.schedule
    t_min = smallest_time(schedule) if t_min is None else t_min
    dtype, shape, n = _net_dtype(denoiser), x.shape, x.shape[0]
    noise = None
    if divergence == "hutchinson":
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        noise = torch.randn((probes, *shape), generator=generator, device=x.device, dtype=dtype)
        if probe == "rademacher":
            noise = torch.sign(noise)
    elif divergence != "exact":
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    nfe = 0

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        state = torch.from_numpy(y[: x.numel()]).reshape(shape).to(device=x.device, dtype=dtype)
        v, div = probability_flow(denoiser, state, t, cond, divergence, noise)
        return np.concatenate([v.cpu().numpy().reshape(-1), div.cpu().numpy()])

    y0 = np.concatenate([x.detach().double().cpu().numpy().reshape(-1), np.zeros(n)])
    sol = solve_ivp(rhs, (t_min, 1.0), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE integration failed: {sol.message}")
    end = torch.from_numpy(sol.y[:, -1]).to(x.device)
    z = end[: x.numel()].reshape(shape)
    delta = end[x.numel():]
    prior = prior_log_prob(schedule, z)
    return ODEResult(log_prob=prior + delta, prior=prior, delta=delta, z=z, nfe=nfe)


def dequantize(x: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation: x + u, u ~ U(-h, h) per dimension with h half the bin width 2/(levels - 1)."""
    half = 1.0 / (levels - 1)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    return x.double() + (2 * u - 1) * half


def ode_nll(denoiser, x0: torch.Tensor, levels: int | None = None, cond: dict | None = None,
            divergence: str = "hutchinson", probes: int = 1, probe: str = "rademacher", rtol: float = 1e-5,
            atol: float = 1e-5, generator: torch.Generator | None = None, batch_size: int = 512) -> NLL:
    """Probability-flow ODE NLL per example; discrete data (levels) is uniformly dequantised and reported as
    a bound on -log P(x) over the levels, continuous data as the density's -log p(x)."""
    dims = x0[0].numel()
    nats, nfe = [], []
    for start in range(0, len(x0), batch_size):
        x = x0[start:start + batch_size]
        batch_cond = {k: v[start:start + batch_size] for k, v in (cond or {}).items()}
        xd = dequantize(x, levels, generator) if levels else x.double()
        result = ode_log_likelihood(denoiser, xd, batch_cond, divergence, probes, probe, rtol, atol, generator)
        nll = -result.log_prob
        nats.append(dequantized_to_discrete_nll(nll, dims, levels) if levels else nll)
        nfe.append(result.nfe)
    nats = torch.cat(nats)
    nfe = round(sum(nfe) / len(nfe))  # network evaluations each example saw (one solve per batch)
    how = "exact divergence" if divergence == "exact" else f"Hutchinson, {probes} {probe} probe(s)"
    deq = f"uniform dequantisation over {levels} levels (bins of width 2/{levels - 1})" if levels else "density"
    note = f"probability-flow ODE, RK45 rtol={rtol} atol={atol}, {how}; {deq}"
    return NLL(nats=nats, bpd=bits_per_dim(nats, dims), nfe=nfe, note=note)


def decoder_nll(schedule: Schedule, x0: torch.Tensor, levels: int | None, generator=None,
                samples: int = 1) -> torch.Tensor:
    """E_z[-log p(x0 | z)] at t_min per example, z ~ q(z | x0), p(x0 | z) = N(z/alpha, (sigma/alpha)^2) (VDM's
    decoder, Kingma et al. 2021 sec. 3.3). On discrete data (levels) the Gaussian is integrated over the bins
    and the expectation estimated with `samples` draws of z; on continuous data it is exact,
    D (log(2 pi s^2) + 1) / 2 with s = sigma/alpha."""
    t = torch.full((x0.shape[0],), smallest_time(schedule), dtype=torch.float64, device=x0.device)
    alpha, sigma = schedule.alpha_sigma(t)
    log_s = torch.log(sigma) - torch.log(alpha)  # (B,)
    dims = x0[0].numel()
    if not levels:
        return 0.5 * dims * (LOG_2PI + 2 * log_s + 1)
    x = x0.double()
    total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for _ in range(samples):
        z, _ = noise_data(schedule, x, t, generator)
        mean = z / expand_like(alpha, z)
        logvar = expand_like(2 * log_s, z).expand_as(z)
        total = total - _sum_dims(discretized_gaussian_log_prob(x, mean, logvar, levels))
    return total / samples


def diffusion_term(denoiser, x0: torch.Tensor, n_t: int = 1, generator=None,
                   cond=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/2) int_{lambda(1)}^{lambda(t_min)} E||eps - eps_hat(x_lambda)||^2 dlambda per example (VDM eq. 17 in
    lambda), by n_t stratified log-SNRs per example (importance sampling uniform in lambda); (estimate, std. error)."""
    schedule = denoiser.schedule
    _, lam_lo, lam_hi = log_snr_range(schedule)
    b = x0.shape[0]
    u = torch.stack([stratified_uniform(n_t, generator, x0.device) for _ in range(b)])  # (B, n_t)
    lam = lam_hi - u * (lam_hi - lam_lo)
    t = schedule.t_from_log_snr(lam.reshape(-1)).clamp(smallest_time(schedule), 1.0)
    xs = x0.repeat_interleave(n_t, 0)  # (B * n_t, ...)
    x_t, eps = noise_data(schedule, xs, t, generator)
    rep = {k: v.repeat_interleave(n_t, 0) for k, v in (cond or {}).items()}
    mse = _sum_dims((denoiser(x_t, t, **rep).eps - eps).double() ** 2).reshape(b, n_t)
    terms = 0.5 * (lam_hi - lam_lo) * mse
    se = terms.std(1) / math.sqrt(n_t) if n_t > 1 else torch.full((b,), float("nan"), dtype=torch.float64)
    return terms.mean(1), se


@torch.no_grad()
def continuous_elbo(denoiser, x0: torch.Tensor, levels: int | None = None, n_t: int = 16, generator=None,
                    cond: dict | None = None, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """VDM's continuous-time bound per example in nats (float64): prior + diffusion + decoder = total >= -log p(x),
    with the diffusion term's Monte-Carlo standard error."""
    parts: dict[str, list] = {"prior": [], "diffusion": [], "decoder": [], "diffusion_se": []}
    per = max(1, batch_size // n_t)
    for start in range(0, len(x0), per):
        x = x0[start:start + per]
        c = {k: v[start:start + per] for k, v in (cond or {}).items()}
        diff, se = diffusion_term(denoiser, x, n_t, generator, c)
        parts["diffusion"].append(diff)
        parts["diffusion_se"].append(se)
        parts["prior"].append(prior_kl(denoiser.schedule, x.double()).double())
        parts["decoder"].append(decoder_nll(denoiser.schedule, x, levels, generator, samples=n_t))
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["total"] = out["prior"] + out["diffusion"] + out["decoder"]
    return out


def elbo_nll(denoiser, x0: torch.Tensor, levels: int | None = None, n_t: int = 16, generator=None,
             cond: dict | None = None) -> NLL:
    """The continuous ELBO as an NLL bound per example, in nats and bits/dim."""
    terms = continuous_elbo(denoiser, x0, levels, n_t, generator, cond)
    dims = x0[0].numel()
    dec = f"discretised Gaussian decoder over {levels} levels" if levels else "Gaussian density decoder"
    note = f"continuous ELBO (VDM), {n_t} stratified log-SNRs per example; {dec} at t_min"
    return NLL(nats=terms["total"], bpd=bits_per_dim(terms["total"], dims), nfe=n_t, note=note)
