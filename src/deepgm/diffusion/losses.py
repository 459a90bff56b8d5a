"""Training losses and the discrete variational bound (Ho et al. 2020, eq. 5) in bits/dim."""

from __future__ import annotations

import math

import torch

from deepgm.diffusion.denoiser import expand_like
from deepgm.diffusion.schedules import Schedule, posterior, transition
from deepgm.likelihood import discretized_gaussian_log_prob, gaussian_log_prob, normal_kl

LOSSES = ("simple", "vlb")
VARIANCES = ("beta", "beta_tilde")


def _sum_dims(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(1)  # (B,)


def noise_data(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, generator=None):
    """Draw x_t ~ q(x_t | x_0) in closed form (DDPM eq. 4); returns (x_t, eps)."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = schedule.alpha_sigma(t)
    return expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * eps, eps


def simple_loss(denoiser, x0: torch.Tensor, generator=None, cond=None) -> torch.Tensor:
    """L_simple (DDPM eq. 14): ||eps - eps_hat(x_t, t)||^2 averaged over dimensions, per example (B,)."""
    t = denoiser.schedule.sample_t(x0.shape[0], generator, x0.device)
    x_t, eps = noise_data(denoiser.schedule, x0, t, generator)
    pred = denoiser(x_t, t, **(cond or {}))
    return (pred.eps - eps).pow(2).reshape(x0.shape[0], -1).mean(1)


def prior_kl(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_1 | x_0) || N(0, prior_std^2 I)) per example, nats."""
    one = torch.ones(x0.shape[0], dtype=torch.float64, device=x0.device)
    alpha, sigma = (expand_like(v, x0) for v in schedule.alpha_sigma(one))
    prior_logvar = torch.full_like(x0, 2 * math.log(schedule.prior_std()))
    return _sum_dims(normal_kl(alpha * x0, 2 * torch.log(sigma).expand_as(x0), 0.0, prior_logvar))


def vlb_term(denoiser, x0: torch.Tensor, i: torch.Tensor, levels: int | None, variance: str = "beta_tilde",
             generator=None, cond=None, T: int | None = None) -> torch.Tensor:
    """One term of the bound per example (nats): L_{i-1} = KL(q(x_{s}|x_t,x_0) || p(x_s|x_t)) for i > 1,
    and the decoder term L_0 = -log p(x_0 | x_{1/T}) for i = 1, with t = i/T, s = (i-1)/T.

    The decoder is a Gaussian N(x0_hat, sigma_{t|s}^2) integrated over the data's bins when `levels`
    is given (discrete data), else a density. p's variance is beta_tilde or beta (DDPM sec. 3.2).
    T defaults to the schedule's; a continuous schedule is discretised on the grid t_i = i/T.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    schedule = denoiser.schedule
    T = T or schedule.T
    t = i.double() / T
    s = (i - 1).double() / T
    x_t, _ = noise_data(schedule, x0, t, generator)
    x0_hat = denoiser(x_t, t, **(cond or {})).x0
    c_x0, c_xt, post_var = (expand_like(v, x0) for v in posterior(schedule, t, s))
    step_var = expand_like(transition(schedule, t, s)[1], x0)
    model_var = post_var if variance == "beta_tilde" else step_var
    # L_0 always uses beta_1: beta_tilde_1 = 0 would make the decoder a point mass
    decoder_logvar = torch.log(step_var).expand_as(x0)
    if levels is None:
        nll0 = -gaussian_log_prob(x0, x0_hat, decoder_logvar)
    else:
        nll0 = -discretized_gaussian_log_prob(x0, x0_hat, decoder_logvar, levels)
    is_decoder = (i == 1).reshape(-1, *([1] * (x0.dim() - 1)))
    model_logvar = torch.log(torch.where(is_decoder, step_var, model_var)).expand_as(x0)
    kl = normal_kl(c_x0 * x0 + c_xt * x_t, torch.log(torch.where(is_decoder, step_var, post_var)).expand_as(x0),
                   c_x0 * x0_hat + c_xt * x_t, model_logvar)
    return _sum_dims(torch.where(is_decoder, nll0, kl))


def vlb_loss(denoiser, x0: torch.Tensor, levels: int | None, generator=None, cond=None,
             variance: str = "beta_tilde") -> torch.Tensor:
    """Unbiased one-sample estimate of the whole bound per example: L_T + T * L_{i-1}, i ~ U{1..T}."""
    T = denoiser.schedule.T
    if T is None:
        raise ValueError("the discrete variational bound needs a discrete schedule (T steps)")
    i = torch.randint(1, T + 1, (x0.shape[0],), generator=generator, device=x0.device)
    return prior_kl(denoiser.schedule, x0) + T * vlb_term(denoiser, x0, i, levels, variance, generator, cond)


@torch.no_grad()
def vlb(denoiser, x0: torch.Tensor, levels: int | None, generator=None, cond=None, variance: str = "beta_tilde",
        progress: bool = False, T: int | None = None) -> dict[str, torch.Tensor]:
    """The full bound, every term summed exactly, per example in nats: prior, diffusion, decoder, total.

    T defaults to the schedule's steps; give it to bound a continuous-time model discretised on t_i = i/T.
    """
    T = T or denoiser.schedule.T
    if T is None:
        raise ValueError("the discrete variational bound needs a discrete schedule (T steps) or an explicit T")
    from tqdm.auto import tqdm

    diffusion = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    decoder = diffusion.clone()
    for i in tqdm(range(T, 0, -1), desc="VLB", disable=not progress, leave=False):
        index = torch.full((x0.shape[0],), i, device=x0.device)
        term = vlb_term(denoiser, x0, index, levels, variance, generator, cond, T).double()
        if i == 1:
            decoder += term
        else:
            diffusion += term
    prior = prior_kl(denoiser.schedule, x0).double()
    return {"prior": prior, "diffusion": diffusion, "decoder": decoder, "total": prior + diffusion + decoder}
