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


class WeightingMixture:
    """Several weightings at once: the batch split into equal shares, each share's training times drawn under one of
    them. The loss is the shares' mean, an unbiased estimate of the weightings' average objective, whose times follow
    the mixture of their laws: e.g. one that dwells where a scene's layout is decided (high noise) and one where its
    shapes take form (README, text-to-image). Named in a config as a list: loss: [simple, {name: edm, p_mean: 1.5}]."""

    def __init__(self, weightings: list[Weighting]):
        if len(weightings) < 2:
            raise ValueError(f"a mixture of weightings needs at least two, got {len(weightings)}")
        if any(w.name in ("vlb", "elbo") for w in weightings):
            raise ValueError("a mixture of weightings takes denoising weightings only (not 'vlb' or 'elbo', which "
                             "are bounds with terms of their own)")
        self.parts = [DenoisingObjective(w) for w in weightings]

    def __call__(self, denoiser, x0: torch.Tensor, cond: dict, generator: torch.Generator):
        if len(x0) < len(self.parts):
            raise ValueError(f"a batch of {len(x0)} cannot be shared among {len(self.parts)} weightings; "
                             "use a batch at least as large as the number of weightings")
        shares = x0.tensor_split(len(self.parts))
        conds = {k: v.tensor_split(len(self.parts)) for k, v in cond.items()}
        losses = [weighted_loss(denoiser, share, part.weighting, generator, {k: v[i] for k, v in conds.items()})
                  for i, (part, share) in enumerate(zip(self.parts, shares, strict=True))]
        terms = {f"{part.term}_{i}": loss.mean().detach() for i, (part, loss) in enumerate(zip(self.parts, losses,
                                                                                              strict=True))}
        return torch.cat(losses).mean(), terms


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


def make_objective(weighting: str | dict | Weighting | list, schedule, levels: int | None):
    """The objective a `weighting` names: 'vlb' the discrete bound, 'elbo' the continuous ELBO, a list a mixture of
    weightings, else weighted DSM."""
    if isinstance(weighting, (list, tuple)):
        return WeightingMixture([w if isinstance(w, Weighting) else Weighting.from_config(w) for w in weighting])
    weighting = weighting if isinstance(weighting, Weighting) else Weighting.from_config(weighting)
    if weighting.name == "vlb":
        if schedule.T is None:
            raise ValueError("loss 'vlb' is the discrete bound and needs a discrete schedule")
        return DiscreteVLB(levels)
    if weighting.name == "elbo":
        return ContinuousELBO(weighting, levels)
    return DenoisingObjective(weighting)
