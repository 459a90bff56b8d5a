"""The trainable diffusion model: a denoiser plus the loss it is trained with."""

from __future__ import annotations

import torch
from torch import nn

from deepgm.diffusion.denoiser import Denoiser
from deepgm.diffusion.losses import prior_kl, vlb_loss
from deepgm.diffusion.schedules import Schedule
from deepgm.diffusion.weighting import Weighting, weighted_loss
from deepgm.likelihood import bits_per_dim


class DiffusionModel(nn.Module):
    """Holds the denoiser; `loss` is what the trainer minimises: a weighting over log-SNR (`weighting.py`),
    the discrete VLB ("vlb") or the continuous ELBO ("elbo", with its prior and decoder terms, in nats/dim).

    With a class-conditional network, labels are replaced by the "no label" token with probability
    `label_dropout`, so the same network also learns p(x) for classifier-free guidance.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, parameterization: str = "eps",
                 weighting: str | dict | Weighting = "simple", levels: int | None = None, label_dropout: float = 0.0,
                 sigma_data: float = 0.5):
        super().__init__()
        self.weighting = Weighting.from_config(weighting)
        if self.weighting.name == "vlb" and schedule.T is None:
            raise ValueError("loss 'vlb' is the discrete bound and needs a discrete schedule")
        self.denoiser = Denoiser(net, schedule, parameterization, sigma_data)
        self.loss_name = self.weighting.name
        self.levels = levels
        self.label_dropout = label_dropout
        self.num_classes = getattr(net, "num_classes", None)

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    def _cond(self, batch: dict, generator) -> dict:
        if not self.num_classes or "y" not in batch:
            return {}
        y = batch["y"]
        if self.label_dropout > 0:
            drop = torch.rand(y.shape, generator=generator, device=y.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return {"y": y}

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        """Mean training loss over the batch and its named terms."""
        x0 = batch["x"]
        cond = self._cond(batch, generator)
        if self.loss_name == "vlb":
            per_example = vlb_loss(self.denoiser, x0, self.levels, generator, cond)
            return per_example.mean() / x0[0].numel(), {"vlb_nats": per_example.mean().detach()}
        if self.loss_name == "elbo":
            return self._elbo(x0, generator, cond)
        per_example = weighted_loss(self.denoiser, x0, self.weighting, generator, cond)
        name = "eps_mse" if self.loss_name == "simple" else f"{self.loss_name}_loss"
        return per_example.mean(), {name: per_example.mean().detach()}

    def _elbo(self, x0: torch.Tensor, generator: torch.Generator, cond: dict):
        """The continuous ELBO (Kingma et al. 2021, eq. 11-17) per dimension; a learned schedule with
        `minimize_variance` sends its shape the gradient of the diffusion term's second moment (VDM app. I.2)."""
        from deepgm.diffusion.likelihood import decoder_nll

        schedule, dims = self.schedule, x0[0].numel()
        box = schedule.variance_gradient(x0.shape[0]) if getattr(schedule, "minimize_variance", False) else None
        try:
            diffusion = weighted_loss(self.denoiser, x0, self.weighting, generator, cond) * dims  # (B,) nats
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
