"""Objectives as objects (as EDM's loss classes): a diffusion model is a denoiser plus an objective.

Each objective is called as objective(denoiser, x0, cond, generator) -> (scalar loss, {term: value}); the model
holds one and the trainer never sees which. A new objective (e.g. a distillation target with a frozen teacher,
held by the objective and outside the student's parameters) is one more class here.
"""

from __future__ import annotations

import torch

from deepgm.diffusion.likelihood import decoder_nll
from deepgm.diffusion.losses import prior_kl, vlb_loss
from deepgm.diffusion.weighting import Weighting, weighted_loss
from deepgm.likelihood import bits_per_dim


class DenoisingObjective:
    """Weighted denoising score matching: E_t[w(lambda_t) ||eps_hat - eps||^2] averaged over dimensions
    (deepgm.diffusion.weighting names the weightings: simple, snr, min-snr, v, edm)."""

    def __init__(self, weighting: Weighting):
        self.weighting = weighting

    @property
    def term(self) -> str:
        return "eps_mse" if self.weighting.name == "simple" else f"{self.weighting.name}_loss"

    def __call__(self, denoiser, x0: torch.Tensor, cond: dict, generator: torch.Generator):
        per_example = weighted_loss(denoiser, x0, self.weighting, generator, cond)
        return per_example.mean(), {self.term: per_example.mean().detach()}


class DiscreteVLB:
    """The discrete variational bound (Ho et al. 2020, eq. 5), one uniformly drawn term per example, in nats/dim."""

    def __init__(self, levels: int | None):
        self.levels = levels

    def __call__(self, denoiser, x0: torch.Tensor, cond: dict, generator: torch.Generator):
        per_example = vlb_loss(denoiser, x0, self.levels, generator, cond)
        return per_example.mean() / x0[0].numel(), {"vlb_nats": per_example.mean().detach()}


class ContinuousELBO:
    """The continuous ELBO (Kingma et al. 2021, eq. 11-17): prior, diffusion and decoder terms, per dimension;
    a learned schedule with `minimize_variance` sends its shape the gradient of the diffusion term's second moment
    (VDM app. I.2)."""

    def __init__(self, weighting: Weighting, levels: int | None):
        self.weighting, self.levels = weighting, levels

    def __call__(self, denoiser, x0: torch.Tensor, cond: dict, generator: torch.Generator):
        schedule, dims = denoiser.schedule, x0[0].numel()
        box = schedule.variance_gradient(x0.shape[0]) if getattr(schedule, "minimize_variance", False) else None
        try:
            diffusion = weighted_loss(denoiser, x0, self.weighting, generator, cond) * dims  # (B,) nats
            prior = prior_kl(schedule, x0.double()).double()
            decoder = decoder_nll(schedule, x0, self.levels, generator)
        finally:
            if box is not None:
                schedule.end_variance_gradient()
        if box is not None:
            box.set_loss(diffusion / dims)
        total = prior + diffusion.double() + decoder
        terms = {"elbo_bpd": total, "diffusion_bpd": diffusion, "prior_bpd": prior, "decoder_bpd": decoder}
        return (total.mean() / dims).float(), {k: bits_per_dim(v.mean().detach(), dims) for k, v in terms.items()}


def make_objective(weighting: str | dict | Weighting, schedule, levels: int | None):
    """The objective a `weighting` names: 'vlb' the discrete bound, 'elbo' the continuous ELBO, else weighted DSM."""
    weighting = weighting if isinstance(weighting, Weighting) else Weighting.from_config(weighting)
    if weighting.name == "vlb":
        if schedule.T is None:
            raise ValueError("loss 'vlb' is the discrete bound and needs a discrete schedule")
        return DiscreteVLB(levels)
    if weighting.name == "elbo":
        return ContinuousELBO(weighting, levels)
    return DenoisingObjective(weighting)
