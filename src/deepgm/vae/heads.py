"""Likelihood heads p(x | decoder output) for VAE decoders, over the conventions of `deepgm.likelihood`.

A head says how many numbers per data dimension the decoder must output (`params_per_dim`), scores data
(`log_prob`, summed over all dimensions, in nats per example) after `observe` has mapped the data to what it
models, samples, and gives the mean. Heads that model
discrete levels (discretised Gaussian / logistic) give a log-probability on the same scale as the diffusion
VLB; the continuous Gaussian head, on data with levels, is trained on uniformly dequantised data and its
log-density is turned into a bound on the discrete log-probability (`discrete_log_prob`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deepgm.likelihood import (
    bernoulli_log_prob,
    discretized_gaussian_log_prob,
    discretized_logistic_log_prob,
    gaussian_log_prob,
)

LOGVAR_MIN, LOGVAR_MAX = -12.0, 6.0  # bounds of every learned log-variance (std from 2.5e-3 to 20)


def soft_clamp(v: torch.Tensor, lo: float = LOGVAR_MIN, hi: float = LOGVAR_MAX) -> torch.Tensor:
    """Smooth, strictly increasing map of R onto (lo, hi), close to the identity in between:
    lo + softplus(v - lo) - softplus(v - hi)."""
    return lo + F.softplus(v - lo) - F.softplus(v - hi)


def _sum_dims(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(1)  # (B,)


def _split(params: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Decoder output (B, n*C, ...) or (B, n*D) -> n tensors shaped like the data."""
    return params.chunk(n, dim=1)


class Head:
    """Base class: a factorised likelihood over the data dimensions given decoder parameters."""

    name = "head"
    params_per_dim = 1
    levels: int | None = None

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x | params) per example (B,), nats, for x = observe(data)."""
        raise NotImplementedError

    def sample(self, params: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A draw of x in [-1, 1] (on the data's levels for discrete heads)."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x] in [-1, 1] (what reconstructions and interpolations show)."""
        raise NotImplementedError

    def observe(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The data as the model sees and scores it, in [-1, 1]: binarised for Bernoulli, uniformly
        dequantised for a continuous head on discrete data, else x itself."""
        return x

    def discrete_correction(self, dims: int) -> float:
        """Add to a log-density of `observe(x)` to bound the log-probability of the discrete data (0 if exact)."""
        return 0.0

    def describe(self) -> str:
        return self.name


class BernoulliHead(Head):
    """p(b | logits) for the binarised data b = [x > 0] (the classical binary-MNIST likelihood)."""

    name = "bernoulli"
    levels = 2

    def observe(self, x, generator):
        return (x > 0).to(x.dtype) * 2 - 1

    def log_prob(self, x, params):
        return _sum_dims(bernoulli_log_prob((x > 0).to(params.dtype), params))

    def sample(self, params, generator):
        u = torch.rand(params.shape, generator=generator, device=params.device, dtype=params.dtype)
        return (u < torch.sigmoid(params)).to(params.dtype) * 2 - 1

    def mean(self, params):
        return torch.sigmoid(params) * 2 - 1

    def describe(self):
        return "Bernoulli over binarised data (x > 0), 2 levels"


class GaussianHead(Head):
    """N(x; mean, sigma^2): fixed log-variance, or learned per dimension (two outputs) when `logvar` is None.

    With `levels`, the data are discrete: training uses x + u, u ~ U(bin), and `discrete_correction`
    adds D log(bin width), so -log p(x + u) - D log(2/(K-1)) bounds -log P(x) (Theis et al. 2016)."""

    name = "gaussian"

    def __init__(self, logvar: float | None = None, levels: int | None = None):
        self.fixed_logvar = logvar
        self.params_per_dim = 1 if logvar is not None else 2
        self.levels = levels

    def _mean_logvar(self, params):
        if self.fixed_logvar is not None:
            return params, torch.full_like(params, self.fixed_logvar)
        mean, raw = _split(params, 2)
        return mean, soft_clamp(raw)

    def log_prob(self, x, params):
        mean, logvar = self._mean_logvar(params)
        return _sum_dims(gaussian_log_prob(x, mean, logvar))

    def sample(self, params, generator):
        mean, logvar = self._mean_logvar(params)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def mean(self, params):
        return self._mean_logvar(params)[0]

    def observe(self, x, generator):
        if self.levels is None:
            return x
        half_bin = 1.0 / (self.levels - 1)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (2 * u - 1) * half_bin

    def discrete_correction(self, dims):
        return 0.0 if self.levels is None else dims * math.log(2.0 / (self.levels - 1))

    def describe(self):
        var = "learned variance" if self.fixed_logvar is None else f"fixed log-variance {self.fixed_logvar:g}"
        deq = f", uniformly dequantised over {self.levels} levels" if self.levels else ", continuous data"
        return f"Gaussian density, {var}{deq}"


class _DiscretizedHead(Head):
    """Shared by the discretised heads: a location and a (learned or fixed) log-scale per dimension."""

    def __init__(self, levels: int, log_scale: float | None = None):
        if not levels or levels < 2:
            raise ValueError(f"{self.name} needs data with discrete levels, got levels={levels}")
        self.levels = levels
        self.fixed = log_scale
        self.params_per_dim = 1 if log_scale is not None else 2

    def _loc_scale(self, params):
        if self.fixed is not None:
            return params, torch.full_like(params, self.fixed)
        loc, raw = _split(params, 2)
        return loc, self._clamp(raw)

    def _quantize(self, x):
        k = self.levels - 1
        return torch.round((x.clamp(-1, 1) + 1) * k / 2) * 2 / k - 1

    def mean(self, params):
        return self._loc_scale(params)[0].clamp(-1, 1)


class DiscretizedGaussianHead(_DiscretizedHead):
    """N(mean, e^logvar) integrated over each level's bin, edge bins open (the diffusion L_0 decoder)."""

    name = "discretized_gaussian"

    def _clamp(self, raw):
        return soft_clamp(raw)

    def log_prob(self, x, params):
        mean, logvar = self._loc_scale(params)
        return _sum_dims(discretized_gaussian_log_prob(x, mean, logvar, self.levels))

    def sample(self, params, generator):
        mean, logvar = self._loc_scale(params)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self._quantize(mean + torch.exp(0.5 * logvar) * eps)

    def describe(self):
        return f"discretised Gaussian over {self.levels} levels (bins of width 2/{self.levels - 1}, open edges)"


class DiscretizedLogisticHead(_DiscretizedHead):
    """Logistic(mean, e^log_scale) integrated over each level's bin, edge bins open (PixelCNN++, one component)."""

    name = "discretized_logistic"

    def _clamp(self, raw):
        return soft_clamp(raw, 0.5 * LOGVAR_MIN, 0.5 * LOGVAR_MAX)  # a log-scale is half a log-variance

    def log_prob(self, x, params):
        mean, log_scale = self._loc_scale(params)
        return _sum_dims(discretized_logistic_log_prob(x, mean, log_scale, self.levels))

    def sample(self, params, generator):
        mean, log_scale = self._loc_scale(params)
        u = torch.rand(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype).clamp(1e-6, 1 - 1e-6)
        return self._quantize(mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u)))

    def describe(self):
        return f"discretised logistic over {self.levels} levels (bins of width 2/{self.levels - 1}, open edges)"


class CategoricalHead(Head):
    """A free softmax over the K levels of each dimension (van den Oord et al. 2016, PixelRNN sec. 5.3): the most
    flexible per-pixel law (it can be bimodal), which makes an autoregressive decoder strong enough to ignore z."""

    name = "categorical"

    def __init__(self, levels: int):
        if not levels or levels < 2:
            raise ValueError(f"{self.name} needs data with discrete levels, got levels={levels}")
        self.levels = levels
        self.params_per_dim = levels

    def _logits(self, params):
        return params.reshape(params.shape[0], self.levels, -1, *params.shape[2:])  # (B, K, C, ...)

    def _index(self, x):
        return torch.round((x.clamp(-1, 1) + 1) * (self.levels - 1) / 2).long()

    def log_prob(self, x, params):
        logp = torch.log_softmax(self._logits(params), dim=1)
        return _sum_dims(logp.gather(1, self._index(x)[:, None]).squeeze(1))

    def sample(self, params, generator):
        probs = torch.softmax(self._logits(params), dim=1)
        u = torch.rand((probs.shape[0], 1, *probs.shape[2:]), generator=generator, device=probs.device,
                       dtype=probs.dtype)
        index = (probs.cumsum(1) < u).sum(1).clamp(max=self.levels - 1)  # inverse CDF
        return index.to(params.dtype) * 2 / (self.levels - 1) - 1

    def mean(self, params):
        probs = torch.softmax(self._logits(params), dim=1)
        grid = torch.linspace(-1, 1, self.levels, device=params.device, dtype=params.dtype)
        return (probs * grid.reshape(1, -1, *([1] * (probs.dim() - 2)))).sum(1)

    def describe(self):
        return f"categorical (softmax) over {self.levels} levels"


HEADS = ("bernoulli", "gaussian", "discretized_gaussian", "discretized_logistic", "categorical")


def make_head(name: str, levels: int | None, learn_variance: bool = True, logvar: float = 0.0) -> Head:
    """A head by name; `logvar` is the fixed log-variance used when learn_variance is False."""
    if name == "bernoulli":
        return BernoulliHead()
    if name == "gaussian":
        return GaussianHead(None if learn_variance else logvar, levels)
    if name == "discretized_gaussian":
        return DiscretizedGaussianHead(levels, None if learn_variance else logvar)
    if name == "discretized_logistic":
        return DiscretizedLogisticHead(levels, None if learn_variance else 0.5 * logvar)
    if name == "categorical":
        return CategoricalHead(levels)
    raise ValueError(f"unknown likelihood head {name!r}; choose one of {list(HEADS)}")


def head_from_spec(spec: str | dict, levels: int | None) -> Head:
    """A head from a config entry: a name, or {name, learn_variance, logvar}."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    unknown = set(spec) - {"name", "learn_variance", "logvar"}
    if unknown:
        raise ValueError(f"unknown head option(s) {sorted(unknown)}; valid are ['learn_variance', 'logvar', 'name']")
    return make_head(spec.get("name", "discretized_logistic"), levels, bool(spec.get("learn_variance", True)),
                     float(spec.get("logvar", 0.0)))
