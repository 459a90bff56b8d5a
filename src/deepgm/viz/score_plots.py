"""Pictures of a 2-D diffusion model: the learned score field, reverse-SDE vs probability-flow-ODE trajectories
from the same starting points, and the density the ODE likelihood assigns, next to the data (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepgm.diffusion.likelihood import ode_log_likelihood  # noqa: E402
from deepgm.diffusion.sampling import sample  # noqa: E402
from deepgm.viz.plots import save_figure  # noqa: E402


def _square(ax, lim: float) -> None:
    """The panel [-lim, lim]^2, equal aspect, no ticks."""
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=110, crop=True)


def _grid(lim: float, n: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    ticks = np.linspace(-lim, lim, n)
    gx, gy = np.meshgrid(ticks, ticks)
    points = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)  # (n*n, 2)
    return gx, gy, points


def _net_dtype(denoiser) -> torch.dtype:
    return next((p.dtype for p in denoiser.parameters()), torch.float64)


@torch.no_grad()
def plot_score_field(denoiser, path: str | Path, data: torch.Tensor | None = None,
                     times: tuple[float, ...] = (0.02, 0.1, 0.3, 0.7), lim: float = 3.0, n: int = 21) -> Path:
    """The learned score -eps_hat(x, t) / sigma_t as arrows at several times, over the data (grey)."""
    gx, gy, points = _grid(lim, n)
    points = points.to(_net_dtype(denoiser))
    fig, axes = plt.subplots(1, len(times), figsize=(3.4 * len(times), 3.6))
    for ax, t in zip(np.atleast_1d(axes), times, strict=True):
        score = denoiser.score(points, torch.tensor(t, dtype=torch.float64)).double().numpy()
        u, v = score[:, 0].reshape(gx.shape), score[:, 1].reshape(gx.shape)
        norm = np.sqrt(u**2 + v**2) + 1e-12
        if data is not None:
            d = data[:2000].double().numpy()
            ax.scatter(d[:, 0], d[:, 1], s=2, c="0.75", lw=0)
        lo, hi = np.percentile(np.log(norm), [5, 95])
        ax.quiver(gx, gy, u / norm, v / norm, np.log(norm), cmap="viridis", clim=(lo, hi), scale=28, width=0.005)
        lam = float(denoiser.schedule.log_snr(torch.tensor(t, dtype=torch.float64)))
        ax.set_title(f"score direction at t={t:g} (log-SNR {lam:.1f})\ncolour: log |score|", fontsize=9)
        _square(ax, lim)
    return _save(fig, path)


def plot_trajectories(denoiser, path: str | Path, data: torch.Tensor | None = None, n: int = 16, steps: int = 200,
                      seed: int = 0, lim: float = 3.5) -> Path:
    """Reverse-SDE (Euler-Maruyama) and probability-flow-ODE (Heun) paths from the same x_T, side by side."""
    g = torch.Generator().manual_seed(seed)
    schedule = denoiser.schedule
    dtype = _net_dtype(denoiser)
    x_T = schedule.prior_std() * torch.randn(n, 2, generator=g, dtype=dtype)
    runs = {"reverse SDE (Euler-Maruyama)": ("euler-maruyama", steps), "probability-flow ODE (Heun)": ("heun",
                                                                                                      steps // 2)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, (title, (sampler, k)) in zip(axes, runs.items(), strict=True):
        out = sample(denoiser, None, sampler=sampler, steps=k, x_T=x_T, generator=torch.Generator().manual_seed(seed),
                     return_trajectory=True, dtype=dtype)
        path_xy = torch.stack(out.trajectory).double().numpy()  # (steps + 1, n, 2)
        if data is not None:
            d = data[:2000].double().numpy()
            ax.scatter(d[:, 0], d[:, 1], s=2, c="0.8", lw=0)
        for i in range(n):
            ax.plot(path_xy[:, i, 0], path_xy[:, i, 1], lw=0.7, alpha=0.8, c=plt.cm.tab20(i % 20))
        ax.scatter(path_xy[0, :, 0], path_xy[0, :, 1], s=10, c="k", marker="x", label="x_T (shared)")
        ax.scatter(path_xy[-1, :, 0], path_xy[-1, :, 1], s=14, c="C3", label="x_0")
        ax.set_title(f"{title}, NFE {out.nfe}", fontsize=10)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_ode_density(denoiser, path: str | Path, data: torch.Tensor, lim: float = 3.0, n: int = 90,
                     true_log_prob=None, rtol: float = 1e-5, atol: float = 1e-5) -> Path:
    """exp(log p_ODE(x)) on an n x n grid (exact divergence) next to the data, and the true density if given."""
    gx, gy, points = _grid(lim, n)
    logp = ode_log_likelihood(denoiser, points.double(), rtol=rtol, atol=atol).log_prob.numpy().reshape(gx.shape)
    panels = [("data", None), (r"$p_{ODE}(x)$, probability-flow likelihood", logp)]
    if true_log_prob is not None:
        panels.append(("true density", true_log_prob(points.double()).numpy().reshape(gx.shape)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    vmax = float(np.exp(logp).max())
    for ax, (title, values) in zip(axes, panels, strict=True):
        if values is None:
            d = data[:5000].double().numpy()
            ax.scatter(d[:, 0], d[:, 1], s=1.5, c="k", alpha=0.5, lw=0)
        else:
            ax.pcolormesh(gx, gy, np.exp(values), shading="gouraud", cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=10)
        _square(ax, lim)
    return _save(fig, path)


def score_pictures(denoiser, out_dir: str | Path, data: torch.Tensor, true_log_prob=None, lim: float = 3.0,
                   seed: int = 0, density_points: int = 90, density_tol: float = 1e-5) -> list[Path]:
    """All three pictures for a 2-D model into out_dir; the ODE density on density_points^2 points, solved to
    rtol = atol = density_tol."""
    out_dir = Path(out_dir)
    return [plot_score_field(denoiser, out_dir / "score_field.png", data, lim=lim),
            plot_trajectories(denoiser, out_dir / "sde_vs_ode_trajectories.png", data, seed=seed, lim=lim + 0.5),
            plot_ode_density(denoiser, out_dir / "ode_density.png", data, lim=lim, n=density_points,
                             true_log_prob=true_log_prob, rtol=density_tol, atol=density_tol)]
