"""Variational autoencoders: the ELBO with an amortised Gaussian encoder and the reparameterisation trick.

log p(x) >= ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))            (Kingma & Welling 2014, eq. 3)
log p(x) >= IWAE_k(x) = E[log (1/k) sum_i p(x, z_i) / q(z_i|x)], z_i ~ q   (Burda et al. 2016, eq. 8)

`LatentVariableModel` holds what every VAE here shares: the training step counter (a buffer, so KL warm-up
resumes exactly), the β / warm-up / free-bits objective, and the importance-weighted bound. `VAE` is the
single-latent model: an MLP or conv encoder, an MLP, conv or PixelCNN decoder, any likelihood head, optional
class conditioning (p(x|z,y), q(z|x,y)) and aggressive encoder updates (He et al. 2019). All numbers are
nats per example unless a name says bits/dim; log-likelihoods of discrete data follow `deepgm.likelihood`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepgm.conditioning import ClassLabel, Conditioning
from deepgm.family import SampleOutput
from deepgm.likelihood import LOG_2PI, NLL, bits_per_dim, normal_kl
from deepgm.nets.pixelcnn import PixelCNN
from deepgm.vae.heads import Head, soft_clamp
from deepgm.vae.objectives import RegularizedELBO


def one_hot(y: torch.Tensor | None, num_classes: int | None, like: torch.Tensor) -> torch.Tensor | None:
    """Labels as float one-hot vectors (B, K), or None for an unconditional model."""
    if not num_classes:
        return None
    if y is None:
        raise ValueError("this model is class-conditional: pass labels y")
    return F.one_hot(y.long(), num_classes).to(like.dtype)


def _cat(*parts: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([p for p in parts if p is not None], dim=1)


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag e^logvar) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def _numel(shape) -> int:
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------- networks


def _zero_init(layer: nn.Linear) -> nn.Linear:
    """Zero the output layer of an encoder, so q(z|x) = N(0, I) = p(z) for every x at the start: a unit becomes
    active only when training moves it there, and the active-units count does not measure leftover init."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class MLPEncoder(nn.Module):
    """q(z | x [, y]) = N(mu, diag e^logvar) from the flattened data through an MLP; logvar soft-clamped."""

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, hidden: int = 256, depth: int = 2,
                 num_classes: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        layers, width = [], _numel(data_shape) + (num_classes or 0)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = _zero_init(nn.Linear(width, 2 * latent_dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(_cat(x.reshape(x.shape[0], -1), one_hot(y, self.num_classes, x)))  # (B, D [+K])
        mu, raw = self.out(h).chunk(2, dim=1)
        return mu, soft_clamp(raw)


class ConvEncoder(nn.Module):
    """q(z | x [, y]) for images: 3x3 convs halving the resolution down to 4x4, then a linear layer; the label
    enters as constant extra input channels."""

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, channels: int = 32, hidden: int = 256,
                 num_classes: int | None = None):
        super().__init__()
        c, size, _ = data_shape
        self.num_classes = num_classes
        layers, width = [nn.Conv2d(c + (num_classes or 0), channels, 3, padding=1), nn.SiLU()], channels
        while size > 4:
            layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU()]
            width, size = 2 * width, size // 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * size * size, hidden), nn.SiLU())
        self.out = _zero_init(nn.Linear(hidden, 2 * latent_dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        label = one_hot(y, self.num_classes, x)
        if label is not None:
            x = torch.cat([x, label[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)  # (B, C+K, H, W)
        mu, raw = self.out(self.body(x)).chunk(2, dim=1)
        return mu, soft_clamp(raw)


class MLPDecoder(nn.Module):
    """Head parameters (B, P*C, H, W) (or (B, P*D) for vectors) from [z, y] through an MLP."""

    autoregressive = False

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, params_per_dim: int, hidden: int = 256,
                 depth: int = 2, num_classes: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.out_shape = (params_per_dim * data_shape[0], *data_shape[1:])
        layers, width = [], latent_dim + (num_classes or 0)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers, nn.Linear(width, _numel(self.out_shape)))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        out = self.body(_cat(z, one_hot(y, self.num_classes, z)))
        return out.reshape(z.shape[0], *self.out_shape)  # (B, P*C, H, W)


class ConvDecoder(nn.Module):
    """Head parameters (B, P*C, H, W) from [z, y]: a linear layer to a 4x4 map, then upsampling 3x3 convs."""

    autoregressive = False

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, params_per_dim: int, channels: int = 32,
                 num_classes: int | None = None):
        super().__init__()
        c, size, _ = data_shape
        self.num_classes = num_classes
        steps = int(math.log2(size // 4)) if size > 4 else 0
        width = channels * 2**steps
        self.width = width
        self.inp = nn.Linear(latent_dim + (num_classes or 0), width * min(size, 4) ** 2)
        layers = []
        for _ in range(steps):
            layers += [nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(width, width // 2, 3, padding=1)]
            width //= 2
        self.body = nn.Sequential(*layers, nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(width, params_per_dim * c, 3, padding=1))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(_cat(z, one_hot(y, self.num_classes, z)))
        side = int(math.isqrt(h.shape[1] // self.width))
        return self.body(h.reshape(z.shape[0], self.width, side, side))  # (B, P*C, H, W)


class PixelCNNDecoder(nn.Module):
    """p(x | z [, y]) = prod_i p(x_i | x_<i, z, y): a gated PixelCNN whose layers are biased by [z, y] (the
    strong autoregressive decoder of the posterior-collapse study; Gulrajani et al. 2017, Chen et al. 2017)."""

    autoregressive = True

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, params_per_dim: int, channels: int = 32,
                 layers: int = 5, kernel: int = 3, num_classes: int | None = None):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError("the PixelCNN decoder is for images (C, H, W)")
        self.num_classes = num_classes
        self.net = PixelCNN(data_shape[0], params_per_dim * data_shape[0], channels, layers, kernel,
                            cond_dim=latent_dim + (num_classes or 0))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            raise ValueError("an autoregressive decoder needs the (teacher-forced) image x")
        return self.net(x, _cat(z, one_hot(y, self.num_classes, z)))


# ----------------------------------------------------------------------------------------------- models


class LatentVariableModel(nn.Module):
    """What the VAEs share: the objective (deepgm.vae.objectives.RegularizedELBO, held as `objective`), the step
    counter its KL warm-up reads, and the family protocol (deepgm.family).

    Subclasses implement `elbo_terms(batch, generator)` -> {"log_px_z": (B,), "kl": (B, Dz)} and
    `log_weights(batch, k, generator)` -> (B, k) float64, plus `draw(n, generator, cond)`.
    """

    num_classes: int | None = None

    def __init__(self, head: Head, data_shape: tuple[int, ...], group_dims: list[int], beta: float = 1.0,
                 warmup_steps: int = 0, free_bits: float = 0.0, free_bits_mode: str = "dim"):
        super().__init__()
        self.objective = RegularizedELBO(group_dims, beta, warmup_steps, free_bits, free_bits_mode)
        self.head = head
        self.data_shape = tuple(data_shape)
        self.dims = _numel(data_shape)
        self.group_dims = list(group_dims)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training updates seen, checkpointed

    @property
    def latent_dim(self) -> int:
        return sum(self.group_dims)

    def kl_weight(self, step: int | None = None) -> float:
        """beta_t of the objective's warm-up at `step` (default: the model's own counter)."""
        return self.objective.kl_weight(int(self.step) if step is None else step)

    def elbo_terms(self, batch: dict, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def log_weights(self, batch: dict, k: int, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(rec + beta_t KL_free-bits) / D for the trainer, with the ELBO terms in nats and bits/dim."""
        beta = self.kl_weight()
        if self.training:
            self.step += 1
        terms = self.elbo_terms(batch, generator)
        return self.objective(terms["log_px_z"], terms["kl"], beta, self.dims), self._report(terms, beta)

    def _report(self, terms: dict, beta: float) -> dict[str, torch.Tensor]:
        kl = terms["kl"].detach()
        elbo = (terms["log_px_z"].detach() - kl.sum(1)).mean()
        out = {"elbo_nats": elbo, "elbo_bpd": bits_per_dim(-elbo, self.dims), "rec_nats": -terms["log_px_z"].mean(),
               "kl_nats": kl.sum(1).mean(), "beta": torch.tensor(beta)}
        if len(self.group_dims) > 1:
            for g, v in enumerate(self.objective.groups(kl).mean(0)):
                out[f"kl_group{g}"] = v
        return {k: v.detach() for k, v in out.items()}

    @torch.no_grad()
    def iwae(self, batch: dict, k: int, generator: torch.Generator | None, chunk: int = 1024) -> torch.Tensor:
        """IWAE_k lower bound on log p(x) per example (B,), float64, drawing the k samples in chunks of
        about `chunk` decoder evaluations (Burda et al. 2016, eq. 8)."""
        n = batch["x"].shape[0]
        per = max(1, chunk // max(n, 1))
        parts = [self.log_weights(batch, min(per, k - s), generator) for s in range(0, k, per)]
        log_w = torch.cat(parts, dim=1)  # (B, k)
        return torch.logsumexp(log_w, dim=1) - math.log(k)

    def draw(self, n: int, generator: torch.Generator | None = None, cond: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    # -- the model-family protocol (deepgm.family)
    BOUNDS = {"iwae": "IWAE_k"}
    NLL_BOUNDS = ("iwae",)

    @property
    def conditioning(self) -> Conditioning:
        return Conditioning([ClassLabel(self.num_classes)]) if self.num_classes else Conditioning()

    @property
    def available_bounds(self) -> tuple[str, ...]:
        return self.NLL_BOUNDS

    @torch.no_grad()
    def generate(self, n: int, cond: dict, generator: torch.Generator | None, plan=None) -> SampleOutput:
        """n ancestral draws x ~ p(x | z [, y]), z ~ p(z); the plan's sampler settings do not apply."""
        if plan is not None and plan.guidance != 1:
            raise ValueError("guidance is for diffusion models; a VAE samples its prior ancestrally")
        x = self.draw(n, generator, cond or None)
        return SampleOutput(x=x, nfe=self.sampling_nfe, cond=dict(cond or {}))

    def likelihoods(self, test, bounds: tuple[str, ...] | None = None, n: int | None = None, seed: int = 0,
                    progress: bool = False, options: dict | None = None) -> dict[str, dict]:
        """{'iwae': -IWAE_k (Burda et al. 2016) per test example as bits/dim with a 95% interval, with the ELBO, KL
        and active units beside it}; options: k (importance samples, default 1000)."""
        from deepgm.vae.diagnostics import active_units, elbo_stats, iwae_per_example, posterior_means

        unknown = sorted(set(bounds or ()) - set(self.BOUNDS))
        if unknown:
            raise ValueError(f"unknown bound(s) {unknown} for a {type(self).__name__}; it has {sorted(self.BOUNDS)}")
        k = int((options or {}).get("k", 1000))
        nats = -iwae_per_example(self, test, k, n, seed)
        note = f"importance-weighted bound IWAE_{k} (Burda et al. 2016) of a {type(self).__name__}; " \
               f"{self.head.describe()}"
        summary = NLL(nats=nats, bpd=bits_per_dim(nats, self.dims), nfe=k, note=note).summary()
        stats = elbo_stats(self, test, n, seed)
        active = active_units(posterior_means(self, test, n, seed, samples=10))[0]
        summary.update(bound=f"IWAE_{k}", elbo_bpd=stats["elbo_bpd"], kl_nats=stats["kl_nats"],
                       active_units=f"{active}/{self.latent_dim}")
        return {"iwae": summary}

    def evaluate(self, test, spec: dict, seed: int = 0, progress: bool = False) -> dict:
        """eval.json's VAE entries: test NLL from IWAE_k (k = eval.iwae_k), ELBO terms, active units, I_q(x; z)."""
        from deepgm.vae.diagnostics import diagnose

        k = int(spec.get("iwae_k", 100))
        d = diagnose(self, test, seed=seed, k=k, mi_examples=500)
        return {"test_bpd": d["nll_bpd"], "test_bpd_ci95": d["nll_bpd_ci95"], "test_nll_nats": d["nll_nats"],
                "bpd_examples": d["examples"], "bpd_levels": test.levels, "iwae_k": k,
                "bpd_note": f"-IWAE_{k} on the test split; {self.head.describe()}",
                **{key: d[key] for key in ("elbo_nats", "elbo_bpd", "rec_nats", "kl_nats", "kl_per_group",
                                           "active_units", "active_units_per_group", "latent_dim",
                                           "mutual_information")}}

    def pictures(self, test, out_dir, seed: int = 0) -> list:
        """Reconstructions, prior samples, a latent scatter, interpolations (and a hierarchy's fixed top groups)."""
        from deepgm.vae.pictures import vae_pictures

        return vae_pictures(self, test, out_dir, seed)

    @property
    def sampling_nfe(self) -> int:
        """Decoder evaluations per batch of samples: one, or one per pixel for an autoregressive decoder."""
        decoder = getattr(self, "decoder", None)
        return math.prod(self.data_shape[1:]) if getattr(decoder, "autoregressive", False) else 1


class VAE(LatentVariableModel):
    """p(z) = N(0, I), p(x | z [, y]) = head(decoder(z, y)), q(z | x [, y]) = N(encoder(x, y)).

    `aggressive = {"inner_steps": n, "until": s, "lr": a}` turns on He et al. (2019)'s remedy for lagging
    inference networks: for the first s training steps, each `loss` call first takes n encoder-only Adam steps
    on the batch (the Adam moments are buffers, so they are checkpointed) and then returns a loss whose
    gradient reaches the decoder only.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: Head, latent_dim: int,
                 data_shape: tuple[int, ...], num_classes: int | None = None, beta: float = 1.0,
                 warmup_steps: int = 0, free_bits: float = 0.0, free_bits_mode: str = "dim",
                 aggressive: dict | None = None):
        super().__init__(head, data_shape, [latent_dim], beta, warmup_steps, free_bits, free_bits_mode)
        self.encoder, self.decoder = encoder, decoder
        self.num_classes = num_classes
        self.aggressive = self._aggressive_options(aggressive)
        if self.aggressive:
            n = sum(p.numel() for p in encoder.parameters())
            self.register_buffer("agg_m", torch.zeros(n))
            self.register_buffer("agg_v", torch.zeros(n))
            self.register_buffer("agg_t", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _aggressive_options(spec: dict | None) -> dict | None:
        if not spec:
            return None
        allowed = {"inner_steps": 10, "until": 1000, "lr": 1e-3}
        unknown = set(spec) - set(allowed)
        if unknown:
            raise ValueError(f"unknown aggressive option(s) {sorted(unknown)}; valid are {sorted(allowed)}")
        out = {**allowed, **spec}
        if int(out["inner_steps"]) < 1 or int(out["until"]) < 0 or float(out["lr"]) <= 0:
            raise ValueError(f"aggressive options must have inner_steps >= 1, until >= 0, lr > 0: {out}")
        return {"inner_steps": int(out["inner_steps"]), "until": int(out["until"]), "lr": float(out["lr"])}

    # -- the pieces
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (soft-clamped) log-variance of q(z | x, y), each (B, Dz)."""
        return self.encoder(x, y)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        """Head parameters of p(x | z, y); an autoregressive decoder reads x (teacher forcing)."""
        return self.decoder(z, y, x)

    def _observe(self, batch: dict, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.head.observe(batch["x"], generator), batch.get("y") if self.num_classes else None

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def elbo_terms(self, batch: dict, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """One-sample ELBO pieces: log p(x|z) (B,) on the discrete scale, analytic KL per dimension (B, Dz)."""
        x, y = self._observe(batch, generator)
        mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar, generator)
        log_px_z = self.head.log_prob(x, self.decode(z, y, x)) + self.head.discrete_correction(self.dims)
        kl = normal_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar))
        return {"log_px_z": log_px_z, "kl": kl, "mu": mu, "logvar": logvar}

    def log_weights(self, batch: dict, k: int, generator: torch.Generator | None) -> torch.Tensor:
        """log p(x, z_i) - log q(z_i | x) for k samples z_i ~ q(z|x), (B, k), float64."""
        x, y = self._observe(batch, generator)
        b = x.shape[0]
        mu, logvar = self.encode(x, y)
        eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        z = (mu + torch.exp(0.5 * logvar) * eps).reshape(k * b, -1)  # (k*B, Dz), sample-major
        rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))  # (k*B, ...)
        xs = rep(x)
        log_px_z = self.head.log_prob(xs, self.decode(z, rep(y), xs)).double()
        log_px_z = log_px_z + self.head.discrete_correction(self.dims)
        log_pz = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).double()
        log_qz = gaussian_log_density(z, rep(mu), rep(logvar)).double()
        return (log_px_z + log_pz - log_qz).reshape(k, b).T  # (B, k)

    # -- training
    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.training and self.aggressive and int(self.step) < self.aggressive["until"]:
            return self._aggressive_loss(batch, generator)
        return super().loss(batch, generator)

    def _aggressive_loss(self, batch: dict, generator: torch.Generator):
        """He et al. (2019), Algorithm 1, in one call: inner encoder-only updates, then a decoder-only loss."""
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        beta = self.kl_weight()
        inner = []
        for _ in range(self.aggressive["inner_steps"]):
            terms = self.elbo_terms(batch, generator)
            inner_loss = self.objective(terms["log_px_z"], terms["kl"], beta, self.dims)
            grads = torch.autograd.grad(inner_loss, params)
            self._adam_step(params, grads)
            inner.append(inner_loss.detach())
        self.step += 1
        # the outer update: the encoder is held fixed (its outputs detached), only the decoder learns
        x, y = self._observe(batch, generator)
        with torch.no_grad():
            mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar, generator)
        log_px_z = self.head.log_prob(x, self.decode(z, y, x)) + self.head.discrete_correction(self.dims)
        kl = normal_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar))
        loss = self.objective(log_px_z, kl, beta, self.dims)
        report = self._report({"log_px_z": log_px_z, "kl": kl}, beta)
        report["inner_loss_first"], report["inner_loss_last"] = inner[0], inner[-1]
        return loss, report

    @torch.no_grad()
    def _adam_step(self, params: list[nn.Parameter], grads: tuple[torch.Tensor, ...], b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8) -> None:
        """Adam (Kingma & Ba 2015, Algorithm 1) on the flattened encoder parameters, state in buffers."""
        g = torch.cat([gr.reshape(-1) for gr in grads]).float()
        self.agg_t += 1
        t = int(self.agg_t)
        self.agg_m.mul_(b1).add_(g, alpha=1 - b1)
        self.agg_v.mul_(b2).addcmul_(g, g, value=1 - b2)
        update = (self.agg_m / (1 - b1**t)) / ((self.agg_v / (1 - b2**t)).sqrt() + eps) * self.aggressive["lr"]
        offset = 0
        for p in params:
            p.sub_(update[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()

    # -- sampling
    def _labels(self, n: int, cond: dict | None, device) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if cond and cond.get("y") is not None:
            return cond["y"].to(device)
        return torch.arange(n, device=device) % self.num_classes

    @torch.no_grad()
    def decode_sample(self, z: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None,
                      mean: bool = False) -> torch.Tensor:
        """x ~ p(x | z, y) (or its mean); an autoregressive decoder draws the pixels one by one in raster order."""
        shape = (z.shape[0], *self.data_shape)
        if not getattr(self.decoder, "autoregressive", False):
            params = self.decode(z, y)
            return self.head.mean(params) if mean else self.head.sample(params, generator)
        x = torch.zeros(shape, device=z.device, dtype=z.dtype)
        _, _, height, width = shape
        for i in range(height):
            for j in range(width):
                params = self.decode(z, y, x)
                draw = self.head.mean(params) if mean else self.head.sample(params, generator)
                x[:, :, i, j] = draw[:, :, i, j]
        return x

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator | None = None, cond: dict | None = None,
                 z: torch.Tensor | None = None, mean: bool = False) -> torch.Tensor:
        """n draws x ~ p(x | z, y), z ~ N(0, I) (or the given z); a conditional model cycles through the
        classes unless cond={"y": labels}. mean=True returns E[x | z] (for a PixelCNN, a greedy chain)."""
        device = self.step.device
        dtype = next(self.parameters()).dtype
        if z is None:
            z = torch.randn(n, self.latent_dim, generator=generator, device=device, dtype=dtype)
        return self.decode_sample(z, self._labels(z.shape[0], cond, device), generator, mean)

    @torch.no_grad()
    def reconstruct(self, batch: dict, generator: torch.Generator | None = None, mean: bool = True) -> torch.Tensor:
        """Decode the posterior mean of each example: E[x | z = mu(x)] (or a sample of x)."""
        x, y = self._observe(batch, generator)
        mu, _ = self.encode(x, y)
        return self.decode_sample(mu, y, generator, mean)


# ------------------------------------------------------------------------------------- config factories

ENCODERS = {"mlp": MLPEncoder, "conv": ConvEncoder}
DECODERS = {"mlp": MLPDecoder, "conv": ConvDecoder, "pixelcnn": PixelCNNDecoder}


def _build(table: dict, spec: dict | str, what: str, *args, **kwargs) -> nn.Module:
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", "mlp")
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
    try:
        return table[name](*args, **kwargs, **spec)
    except TypeError as err:
        raise ValueError(f"bad options for {what} {name!r}: {err}") from None


def make_encoder(spec: dict | str, data_shape: tuple[int, ...], latent_dim: int,
                 num_classes: int | None = None) -> nn.Module:
    """An encoder from a config entry: 'mlp' {hidden, depth} or 'conv' {channels, hidden}."""
    return _build(ENCODERS, spec, "encoder", data_shape, latent_dim, num_classes=num_classes)


def make_decoder(spec: dict | str, data_shape: tuple[int, ...], latent_dim: int, params_per_dim: int,
                 num_classes: int | None = None) -> nn.Module:
    """A decoder from a config entry: 'mlp' {hidden, depth}, 'conv' {channels} or 'pixelcnn' {channels, layers,
    kernel}."""
    return _build(DECODERS, spec, "decoder", data_shape, latent_dim, params_per_dim, num_classes=num_classes)
