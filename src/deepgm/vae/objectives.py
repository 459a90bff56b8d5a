"""The VAE objective as an object the model holds (as deepgm.diffusion.objectives is for diffusion): -ELBO with a
KL weight beta_t = beta min(1, step / warmup_steps) (Bowman et al. 2016; Higgins et al. 2017) and free bits
(Kingma et al. 2016, eq. 15): each latent dimension ("dim") or group ("group") pays at least `free_bits` nats of
batch-averaged KL. A model computes the ELBO's terms; this turns them into the number the optimiser sees."""

from __future__ import annotations

import torch


class RegularizedELBO:
    """(rec + beta_t KL_free-bits) / D over latent groups of sizes `group_dims`."""

    def __init__(self, group_dims: list[int], beta: float = 1.0, warmup_steps: int = 0, free_bits: float = 0.0,
                 free_bits_mode: str = "dim"):
        if free_bits_mode not in ("dim", "group"):
            raise ValueError(f"free_bits_mode must be 'dim' or 'group', got {free_bits_mode!r}")
        if beta < 0 or warmup_steps < 0 or free_bits < 0:
            raise ValueError("beta, warmup_steps and free_bits must be >= 0")
        self.group_dims = list(group_dims)
        self.beta, self.warmup_steps = float(beta), int(warmup_steps)
        self.free_bits, self.free_bits_mode = float(free_bits), free_bits_mode

    def kl_weight(self, step: int) -> float:
        """beta_t of the warm-up schedule after `step` training updates."""
        if self.warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, step / self.warmup_steps)

    def groups(self, kl: torch.Tensor) -> torch.Tensor:
        """KL per dimension (B, Dz) -> KL per group (B, G)."""
        return torch.stack([part.sum(1) for part in kl.split(self.group_dims, dim=1)], dim=1)

    def kl_penalty(self, kl: torch.Tensor) -> torch.Tensor:
        """The batch-mean KL the optimiser sees: with free bits, sum over units of max(lambda, mean_batch KL)."""
        units = kl if self.free_bits_mode == "dim" else self.groups(kl)
        per_unit = units.mean(0)  # (units,)
        if self.free_bits > 0:
            per_unit = per_unit.clamp(min=self.free_bits)
        return per_unit.sum()

    def __call__(self, log_px_z: torch.Tensor, kl: torch.Tensor, beta: float, dims: int) -> torch.Tensor:
        """The loss per data dimension from log p(x|z) (B,) and KL per latent unit (B, Dz) at KL weight beta."""
        return (-log_px_z.mean() + beta * self.kl_penalty(kl)) / dims
