"""A hierarchical VAE with L top-down latent groups and bidirectional inference.

Generative model (top-down, Sønderby et al. 2016 "Ladder VAE"; Vahdat & Kautz 2020 "NVAE"; Child 2021 "VDVAE"):
    h_0 = learned constant;   z_1 ~ N(0, I);   p(z_l | z_<l) = N(mu_p(h_{l-1}), sigma_p(h_{l-1})^2)
    h_l = block_l(h_{l-1} + W_l z_l) (a residual MLP);   p(x | z) = head(decoder(h_L))
Inference shares the top-down path: a bottom-up pass over x gives one feature vector per group (the deepest for
the top group), and the posterior is a residual correction of the prior (NVAE, eq. 3):
    q(z_l | z_<l, x) = N(mu_p + dmu_l, (sigma_p * dsigma_l)^2),  (dmu_l, log dsigma_l^2) = g_l(h_{l-1}, e_l(x))
so the KL of each group, KL(q(z_l | z_<l, x) || p(z_l | z_<l)), is analytic given the upper groups' samples:
    ELBO = E_q[log p(x | z)] - sum_l E_q[KL_l]   (NVAE eq. 2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepgm.likelihood import normal_kl
from deepgm.vae.heads import Head, soft_clamp
from deepgm.vae.vae import ConvDecoder, LatentVariableModel, MLPDecoder, _numel, gaussian_log_density


class _Residual(nn.Module):
    """h + out(dropout(inner(h))), `out` scaled by `scale` at the start (VDVAE's 1/sqrt(depth)); the dropout mask
    is drawn from the caller's generator, so a run stays reproducible."""

    def __init__(self, inner: nn.Module, out: nn.Module, scale: float, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.inner, self.out = inner, out
        with torch.no_grad():
            self.out.weight.mul_(scale)
            self.out.bias.zero_()

    def forward(self, h: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        a = self.inner(h)
        if self.training and self.dropout > 0:
            keep = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype) >= self.dropout
            a = a * keep / (1 - self.dropout)
        return h + self.out(a)


class ResBlock(_Residual):
    """h + W2 dropout(silu(W1 silu(LayerNorm h)))."""

    def __init__(self, width: int, hidden: int | None = None, scale: float = 1.0, dropout: float = 0.0):
        hidden = hidden or width
        super().__init__(nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, hidden), nn.SiLU()),
                         nn.Linear(hidden, width), scale, dropout)


class PosteriorNet(nn.Module):
    """(dmu, dlogvar) of a group from the top-down state h and the bottom-up features e, each layer-normed."""

    def __init__(self, width: int, latent: int):
        super().__init__()
        self.norm_h, self.norm_e = nn.LayerNorm(width), nn.LayerNorm(width)
        self.net = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2 * latent))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(torch.cat([self.norm_h(h), self.norm_e(e)], dim=1)).chunk(2, dim=1)


class ConvStem(nn.Module):
    """x (B, C, H, W) -> (B, width): 3x3 convs halving the resolution down to 4x4, then a linear layer."""

    def __init__(self, data_shape: tuple[int, ...], width: int, channels: int = 32):
        super().__init__()
        c, size, _ = data_shape
        layers, ch = [nn.Conv2d(c, channels, 3, padding=1), nn.SiLU()], channels
        while size > 4:
            layers += [nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1), nn.SiLU()]
            ch, size = 2 * ch, size // 2
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * size * size, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvResBlock(_Residual):
    """h + conv3x3(dropout(silu(conv3x3(silu(h)))))."""

    def __init__(self, width: int, scale: float = 1.0, dropout: float = 0.0):
        super().__init__(nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU()),
                         nn.Conv2d(width, width, 3, padding=1), scale, dropout)


def _zero(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class VectorGroup(nn.Module):
    """One latent group z_l in R^d over a vector state h: prior from LayerNorm(h), residual posterior from
    (h, e_l), and the merge h <- block(h + W z)."""

    def __init__(self, width: int, dim: int, top: bool, scale: float, dropout: float):
        super().__init__()
        self.dim = dim
        self.prior_net = None if top else nn.Sequential(nn.LayerNorm(width), _zero(nn.Linear(width, 2 * dim)))
        self.post = PosteriorNet(width, dim)
        self.z_proj = nn.Linear(dim, width)
        self.block = ResBlock(width, scale=scale, dropout=dropout)

    def prepare(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def prior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prior_net is None:  # the top group: N(0, I)
            zero = h.new_zeros(h.shape[0], self.dim)
            return zero, zero
        mu, raw = self.prior_net(h).chunk(2, dim=1)
        return mu, soft_clamp(raw)

    def posterior(self, h: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.post(h, e)

    def merge(self, h: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.block(h + self.z_proj(z), generator)


class SpatialGroup(nn.Module):
    """One latent group of `channels` maps at `resolution` (NVAE / VDVAE style) over a conv state h (B, W, r, r);
    z is handed around flattened, (B, channels * r * r), so the rest of the model treats every group alike."""

    def __init__(self, width: int, channels: int, resolution: int, top: bool, scale: float, dropout: float):
        super().__init__()
        self.channels, self.resolution = channels, resolution
        self.dim = channels * resolution**2
        self.prior_net = None if top else _zero(nn.Conv2d(width, 2 * channels, 3, padding=1))
        self.post = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(width, 2 * channels, 3, padding=1))
        self.z_proj = nn.Conv2d(channels, width, 1)
        self.block = ConvResBlock(width, scale, dropout)

    def prepare(self, h: torch.Tensor) -> torch.Tensor:
        """Upsample the state to this group's resolution (nearest)."""
        if h.shape[-1] == self.resolution:
            return h
        return F.interpolate(h, size=(self.resolution, self.resolution), mode="nearest")

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1)  # (B, c*r*r)

    def prior(self, h):
        if self.prior_net is None:
            zero = h.new_zeros(h.shape[0], self.dim)
            return zero, zero
        mu, raw = self.prior_net(h).chunk(2, dim=1)
        return self._flat(mu), soft_clamp(self._flat(raw))

    def posterior(self, h, e):
        dmu, dlogvar = self.post(torch.cat([h, e], dim=1)).chunk(2, dim=1)
        return self._flat(dmu), self._flat(dlogvar)

    def merge(self, h, z, generator):
        zz = z.reshape(z.shape[0], self.channels, self.resolution, self.resolution)  # (B, c, r, r)
        return self.block(h + self.z_proj(zz), generator)


class SpatialEncoder(nn.Module):
    """Bottom-up conv pyramid: features at every resolution from the image size down to the smallest group's."""

    def __init__(self, data_shape: tuple[int, ...], width: int, smallest: int, scale: float):
        super().__init__()
        c, size, _ = data_shape
        self.stem = nn.Conv2d(c, width, 3, padding=1)
        self.sizes = []
        while size >= smallest:
            self.sizes.append(size)
            size //= 2
        self.blocks = nn.ModuleList(ConvResBlock(width, scale) for _ in self.sizes)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        h, feats = self.stem(x), {}
        for size, block in zip(self.sizes, self.blocks, strict=True):
            if h.shape[-1] != size:
                h = F.avg_pool2d(h, 2)
            h = block(h)
            feats[size] = h
        return feats


class HVAE(LatentVariableModel):
    """Top-down hierarchical VAE over latent groups (top first); see the module docstring.

    Vector groups: `group_dims` are the sizes d_l, the state is a vector of width `hidden`, the stem (`encoder`)
    and the decoder are 'mlp' or 'conv'. Spatial groups (`resolutions` given): group l is `group_dims[l]` maps at
    resolutions[l] x resolutions[l], the state is a `hidden`-channel feature map and everything is convolutional.
    `dropout` acts in the top-down blocks (the generative path), a regulariser for small data sets.
    """

    def __init__(self, head: Head, data_shape: tuple[int, ...], group_dims: list[int], hidden: int = 256,
                 encoder: str = "mlp", decoder: str = "mlp", channels: int = 32, dropout: float = 0.0,
                 beta: float = 1.0, warmup_steps: int = 0, free_bits: float = 0.0, free_bits_mode: str = "group",
                 resolutions: list[int] | None = None):
        if len(group_dims) < 1 or any(d < 1 for d in group_dims):
            raise ValueError(f"group_dims must be positive sizes, got {group_dims}")
        L = len(group_dims)
        scale = (2 * L) ** -0.5
        if resolutions is not None:
            groups = self._spatial_groups(data_shape, group_dims, resolutions, hidden, scale, dropout)
        else:
            groups = nn.ModuleList(VectorGroup(hidden, d, g == 0, scale, dropout) for g, d in enumerate(group_dims))
        super().__init__(head, data_shape, [grp.dim for grp in groups], beta, warmup_steps, free_bits, free_bits_mode)
        self.groups = groups
        self.resolutions = list(resolutions) if resolutions is not None else None
        params = head.params_per_dim
        if self.resolutions is not None:
            self.encoder = SpatialEncoder(data_shape, hidden, min(self.resolutions), scale)
            self.h0 = nn.Parameter(torch.zeros(hidden, self.resolutions[0], self.resolutions[0]))
            self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(hidden, params * data_shape[0], 3, padding=1))
            return
        if encoder == "mlp":
            stem = nn.Sequential(nn.Flatten(), nn.Linear(_numel(data_shape), hidden))
        elif encoder == "conv":
            stem = ConvStem(data_shape, hidden, channels)
        else:
            raise ValueError(f"unknown HVAE encoder {encoder!r}; choose 'mlp' or 'conv'")
        # bottom-up: e_L (for the lowest group) first, e_1 (for the top group) last, i.e. the deepest
        self.encoder = nn.ModuleDict({"stem": stem, "up": nn.ModuleList(ResBlock(hidden, scale=scale)
                                                                        for _ in range(L))})
        self.h0 = nn.Parameter(torch.zeros(hidden))
        self.out_norm = nn.LayerNorm(hidden)
        if decoder == "mlp":
            self.decoder = MLPDecoder(data_shape, hidden, params, hidden)
        elif decoder == "conv":
            if len(data_shape) != 3:
                raise ValueError("the conv decoder is for images")
            self.decoder = ConvDecoder(data_shape, hidden, params, channels)
        else:
            raise ValueError(f"unknown HVAE decoder {decoder!r}; choose 'mlp' or 'conv'")

    @staticmethod
    def _spatial_groups(data_shape, group_dims, resolutions, hidden, scale, dropout) -> nn.ModuleList:
        if len(data_shape) != 3:
            raise ValueError("spatial latent groups are for images")
        size = data_shape[1]
        if len(resolutions) != len(group_dims):
            raise ValueError(f"give one resolution per group: {len(group_dims)} groups, resolutions {resolutions}")
        ok = all(r >= 1 and size % r == 0 and (size // r) & (size // r - 1) == 0 for r in resolutions)
        if not ok or list(resolutions) != sorted(resolutions):
            raise ValueError(f"resolutions must be non-decreasing (top first) and {size} / r a power of two, "
                             f"got {resolutions}")
        return nn.ModuleList(SpatialGroup(hidden, c, r, g == 0, scale, dropout)
                             for g, (c, r) in enumerate(zip(group_dims, resolutions, strict=True)))

    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features e_l(x) for each group, top group first."""
        if self.resolutions is not None:
            feats = self.encoder(x)
            return [feats[r] for r in self.resolutions]
        e = self.encoder["stem"](x)
        feats = []
        for block in self.encoder["up"]:
            e = block(e)
            feats.append(e)
        return feats[::-1]

    def _start(self, n: int) -> torch.Tensor:
        return self.h0.expand(n, *self.h0.shape)

    def top_down(self, feats: list[torch.Tensor] | None, n: int, generator: torch.Generator | None,
                 fixed: list[torch.Tensor] | None = None, temperature: float = 1.0) -> dict:
        """One pass down the hierarchy: posterior samples when feats (from bottom_up) are given, prior samples
        otherwise; `fixed` gives z for the top groups (used as they are). Returns h, zs and per-group stats."""
        h = self._start(n)
        zs, stats = [], []
        for g, group in enumerate(self.groups):
            h = group.prepare(h)
            mu_p, logvar_p = group.prior(h)
            if feats is not None:
                dmu, dlogvar = group.posterior(h, feats[g])
                mu, logvar = mu_p + dmu, soft_clamp(logvar_p + dlogvar)
            else:
                mu, logvar = mu_p, logvar_p
            if fixed is not None and g < len(fixed):
                z = fixed[g]
            else:
                eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
                z = mu + temperature * torch.exp(0.5 * logvar) * eps
            zs.append(z)
            stats.append((mu, logvar, mu_p, logvar_p))
            h = group.merge(h, z, generator)
        return {"h": h, "z": zs, "stats": stats}

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        if self.resolutions is not None:
            size = self.data_shape[1]
            if h.shape[-1] != size:
                h = F.interpolate(h, size=(size, size), mode="nearest")
            return self.out(h)  # (B, P*C, H, W)
        return self.decoder(self.out_norm(h))

    def _observe(self, batch: dict, generator) -> torch.Tensor:
        return self.head.observe(batch["x"], generator)

    def elbo_terms(self, batch: dict, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """One-sample ELBO pieces: log p(x|z) (B,) and the analytic KL of every group per dimension (B, sum d_l)."""
        x = self._observe(batch, generator)
        out = self.top_down(self.bottom_up(x), x.shape[0], generator)
        log_px_z = self.head.log_prob(x, self._decode(out["h"])) + self.head.discrete_correction(self.dims)
        kl = torch.cat([normal_kl(mu, lv, mp, lvp) for mu, lv, mp, lvp in out["stats"]], dim=1)
        return {"log_px_z": log_px_z, "kl": kl, "mu": torch.cat([s[0] for s in out["stats"]], dim=1)}

    def log_weights(self, batch: dict, k: int, generator: torch.Generator | None) -> torch.Tensor:
        """log p(x | z) + sum_l [log p(z_l | z_<l) - log q(z_l | z_<l, x)] for k joint samples, (B, k), float64."""
        x = self._observe(batch, generator)
        b = x.shape[0]
        rep = lambda t: t.repeat(k, *([1] * (t.dim() - 1)))  # (k*B, ...), sample-major
        xs = rep(x)
        out = self.top_down([rep(f) for f in self.bottom_up(x)], k * b, generator)
        log_w = self.head.log_prob(xs, self._decode(out["h"])).double() + self.head.discrete_correction(self.dims)
        for z, (mu, lv, mp, lvp) in zip(out["z"], out["stats"], strict=True):
            log_w = log_w + (gaussian_log_density(z, mp, lvp) - gaussian_log_density(z, mu, lv)).double()
        return log_w.reshape(k, b).T  # (B, k)

    def posterior_log_prob(self, zs: list[torch.Tensor], feats: list[torch.Tensor],
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """log q(z | x) = sum_l log q(z_l | z_<l, x) of given z under the x whose features are given, (B,)."""
        h = self._start(zs[0].shape[0])
        total = 0
        for group, z, e in zip(self.groups, zs, feats, strict=True):
            h = group.prepare(h)
            mu_p, logvar_p = group.prior(h)
            dmu, dlogvar = group.posterior(h, e)
            total = total + gaussian_log_density(z, mu_p + dmu, soft_clamp(logvar_p + dlogvar))
            h = group.merge(h, z, generator)
        return total

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator | None = None, cond: dict | None = None,
                 fixed: list[torch.Tensor] | None = None, temperature: float = 1.0, mean: bool = False) -> torch.Tensor:
        """n draws from the prior hierarchy; `fixed` holds z of the top groups to keep (each (n, d_l))."""
        out = self.top_down(None, n, generator, fixed, temperature)
        params = self._decode(out["h"])
        return self.head.mean(params) if mean else self.head.sample(params, generator)

    @torch.no_grad()
    def prior_latents(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """z_1..z_L of n prior draws (to fix some of them in `generate`)."""
        return self.top_down(None, n, generator)["z"]

    @torch.no_grad()
    def reconstruct(self, batch: dict, generator: torch.Generator | None = None, mean: bool = True) -> torch.Tensor:
        """Decode one posterior draw of the latents (the hierarchy has no single posterior mean to decode)."""
        x = self._observe(batch, generator)
        out = self.top_down(self.bottom_up(x), x.shape[0], generator)
        params = self._decode(out["h"])
        return self.head.mean(params) if mean else self.head.sample(params, generator)
