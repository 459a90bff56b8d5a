"""The trainable diffusion model: a denoiser plus the loss it is trained with."""

from __future__ import annotations

import torch
from torch import nn

from deepgm.diffusion.denoiser import Denoiser
from deepgm.diffusion.losses import LOSSES, simple_loss, vlb_loss
from deepgm.diffusion.schedules import Schedule


class DiffusionModel(nn.Module):
    """Holds the denoiser; `loss` is what the trainer minimises.

    With a class-conditional network, labels are replaced by the "no label" token with probability
    `label_dropout`, so the same network also learns p(x) for classifier-free guidance.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, parameterization: str = "eps", loss: str = "simple",
                 levels: int | None = None, label_dropout: float = 0.0):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        if loss == "vlb" and schedule.T is None:
            raise ValueError("loss 'vlb' is the discrete bound and needs a discrete schedule")
        self.denoiser = Denoiser(net, schedule, parameterization)
        self.loss_name = loss
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
        if self.loss_name == "simple":
            per_example = simple_loss(self.denoiser, x0, generator, cond)
            return per_example.mean(), {"eps_mse": per_example.mean().detach()}
        per_example = vlb_loss(self.denoiser, x0, self.levels, generator, cond)
        return per_example.mean() / x0[0].numel(), {"vlb_nats": per_example.mean().detach()}
