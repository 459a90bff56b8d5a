"""Gaussian mixtures with exact density, score and posterior mean under any Gaussian forward kernel.

For data x0 ~ sum_k pi_k N(mu_k, S_k) and the kernel q(x_t | x0) = N(alpha x0, sigma^2 I), the
marginal is again a mixture, sum_k pi_k N(alpha mu_k, alpha^2 S_k + sigma^2 I), and Tweedie's
formula / Gaussian conditioning give E[x0 | x_t] exactly. This analytic denoiser is the oracle the
tests and the sampler benchmark run against.
"""

from __future__ import annotations

import math

import torch

from deepgm.data.base import Dataset, register


class GaussianMixture:
    """A mixture of K full-covariance Gaussians in D dimensions; all maths in float64."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)  # (K,)
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)  # (K, D, D)
        if not torch.allclose(self.weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ValueError("mixture weights must sum to 1")
        self._chol = torch.linalg.cholesky(self.covs)  # raises if a covariance is not positive definite

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples, (n, D), float32."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + (self._chol[k] @ z[:, :, None])[:, :, 0]
        return x.float()

    def _noisy_components(self, alpha, sigma):
        """Means (K, D) and covariances (K, D, D) of the components of p_t."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return alpha * self.means, alpha**2 * self.covs + sigma**2 * eye

    def _component_terms(self, x: torch.Tensor, alpha: float, sigma: float):
        """Per-component log pi_k N(x; .), and the whitened residuals C_k^{-1}(x - m_k)."""
        x = x.double()
        means, covs = self._noisy_components(alpha, sigma)
        chol = torch.linalg.cholesky(covs)  # (K, D, D)
        diff = x[:, None, :] - means[None]  # (N, K, D)
        sol = torch.cholesky_solve(diff.permute(1, 2, 0), chol)  # (K, D, N) = C^{-1} diff
        sol = sol.permute(2, 0, 1)  # (N, K, D)
        maha = (diff * sol).sum(-1)  # (N, K)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        logp = -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi)) + torch.log(self.weights)
        return logp, sol

    def denoiser(self, schedule):
        """The exact E[x0 | x_t] under `schedule` as a deepgm Denoiser: the oracle every sampler can run on."""
        from deepgm.diffusion.denoiser import Denoiser  # data does not depend on diffusion otherwise

        def posterior_mean(x, t):
            alpha, sigma = schedule.alpha_sigma(t[0])
            return self.posterior_mean(x, float(alpha), float(sigma)).to(x.dtype)

        return Denoiser.from_fn(posterior_mean, schedule, parameterization="x0")

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's exact mean (D,) and covariance (D, D): sum pi_k (S_k + mu_k mu_k^T) - mean mean^T."""
        mean = self.weights @ self.means
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return mean, second - torch.outer(mean, mean)

    def projected_quantiles(self, directions: torch.Tensor, q: torch.Tensor, newton_steps: int = 3) -> torch.Tensor:
        """Quantiles (P, Q) of the 1-D mixtures u^T x0 for unit rows u of `directions` (P, D) at levels q in (0, 1).

        Each projection is sum_k pi_k N(u^T mu_k, u^T S_k u). Its CDF, tabulated on 4096 points, is inverted by
        interpolation, then Newton steps on the exact CDF (its derivative, the density, is positive) polish that.
        """
        u = torch.as_tensor(directions, dtype=torch.float64)
        q = torch.as_tensor(q, dtype=torch.float64)
        if u.ndim != 2 or u.shape[1] != self.dim or q.ndim != 1 or not bool(((q > 0) & (q < 1)).all()):
            raise ValueError(f"need directions (P, {self.dim}) and levels (Q,) strictly inside (0, 1)")
        chunk = max(1, 2**24 // (len(q) * len(self.weights)))  # bounds the (P, Q, K) temporaries to ~128 MB each
        if len(u) > chunk:
            return torch.cat([self.projected_quantiles(part, q, newton_steps) for part in u.split(chunk)])
        mean = (u @ self.means.T)[:, None, :]  # (P, 1, K)
        std = torch.einsum("pi,kij,pj->pk", u, self.covs, u).sqrt()[:, None, :]

        def cdf(y):  # (P, N) -> (P, N)
            return torch.special.ndtr((y[:, :, None] - mean) / std) @ self.weights

        lo, hi = (mean - 12 * std).amin((1, 2)), (mean + 12 * std).amax((1, 2))
        grid = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, 4096, dtype=torch.float64)
        table = cdf(grid)
        idx = torch.searchsorted(table, q[None].expand(len(u), -1).contiguous()).clamp(1, grid.shape[1] - 1)
        c0, c1 = table.gather(1, idx - 1), table.gather(1, idx)
        g0, g1 = grid.gather(1, idx - 1), grid.gather(1, idx)
        y = g0 + (g1 - g0) * ((q - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0, 1)
        for _ in range(newton_steps):
            density = (torch.exp(-0.5 * ((y[:, :, None] - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
                       ) @ self.weights
            y = (y - (cdf(y) - q) / density.clamp_min(1e-300)).clamp(g0, g1)
        return y

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component of each point, (N,) long: which mode a sample landed in."""
        return self._component_terms(x, 1.0, 0.0)[0].argmax(dim=1)

    def log_prob(self, x: torch.Tensor, alpha: float = 1.0, sigma: float = 0.0) -> torch.Tensor:
        """Exact log density of x under p_t = law of alpha x0 + sigma eps, (N,), float64."""
        logp, _ = self._component_terms(x, alpha, sigma)
        return torch.logsumexp(logp, dim=1)

    def score(self, x: torch.Tensor, alpha: float = 1.0, sigma: float = 0.0) -> torch.Tensor:
        """Exact grad_x log p_t(x), (N, D), float64."""
        logp, sol = self._component_terms(x, alpha, sigma)
        resp = torch.softmax(logp, dim=1)  # (N, K)
        return -(resp[:, :, None] * sol).sum(1)

    def posterior_mean(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """Exact E[x0 | x_t = x] (Tweedie: (x + sigma^2 score) / alpha), (N, D), float64."""
        logp, sol = self._component_terms(x, alpha, sigma)
        resp = torch.softmax(logp, dim=1)  # (N, K)
        # E[x0 | x_t, k] = mu_k + alpha S_k C_k^{-1} (x_t - alpha mu_k)
        cond = self.means[None] + alpha * torch.einsum("kij,nkj->nki", self.covs, sol)  # (N, K, D)
        return (resp[:, :, None] * cond).sum(1)


def ring(n_modes: int = 8, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """Isotropic modes evenly spaced on a circle in 2-D."""
    angles = torch.arange(n_modes, dtype=torch.float64) * 2 * math.pi / n_modes
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(n_modes, 2, 2).clone()
    return GaussianMixture(torch.full((n_modes,), 1.0 / n_modes), means, covs)


def grid(side: int = 4, spacing: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """A side x side square grid of isotropic modes in 2-D, centred at the origin."""
    ticks = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(ticks, ticks)
    covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(side * side, 2, 2).clone()
    return GaussianMixture(torch.full((side * side,), 1.0 / side**2), means, covs)


def random_mixture(dim: int = 8, n_modes: int = 4, scale: float = 1.0, seed: int = 0) -> GaussianMixture:
    """n_modes full-covariance components in `dim` dimensions with random means, weights and covariances."""
    g = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(n_modes, dim, generator=g, dtype=torch.float64)
    a = torch.randn(n_modes, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    covs = 0.1 * scale**2 * (a @ a.transpose(1, 2) + 0.1 * torch.eye(dim, dtype=torch.float64))
    weights = torch.softmax(0.5 * torch.randn(n_modes, generator=g, dtype=torch.float64), 0)
    return GaussianMixture(weights, means, covs)


MIXTURES = {"ring": ring, "grid": grid, "mixture": random_mixture}
TOY_SIZES = {"train": 20_000, "test": 5_000}


def make_mixture(name: str, **options) -> GaussianMixture:
    """A named mixture: 'ring', 'grid' or 'mixture' (n-D, full covariances)."""
    if name not in MIXTURES:
        raise ValueError(f"unknown toy mixture {name!r}; choose one of {sorted(MIXTURES)}")
    return MIXTURES[name](**options)


@register("toy")
def load_toy(split: str = "train", mixture: str = "ring", n: int | None = None, **options) -> Dataset:
    """Samples of a named mixture; train and test draw from disjoint fixed seeds."""
    gmm = make_mixture(mixture, **options)
    n = n or TOY_SIZES[split]
    g = torch.Generator().manual_seed(1 if split == "train" else 2)
    return Dataset(name=f"toy-{mixture}", x=gmm.sample(n, generator=g), levels=None, log_prob=gmm.log_prob)
