"""The VAE pictures: reconstructions, prior samples, a latent scatter, interpolations, fixed top groups."""

from __future__ import annotations

from pathlib import Path

import torch

from deepgm.data import Dataset
from deepgm.vae.diagnostics import posterior_means
from deepgm.viz import save_image_grid, save_strip
from deepgm.viz.plots import save_figure


def _pca_2d(z: torch.Tensor) -> torch.Tensor:
    """Project (N, Dz) onto its two leading principal directions (the identity for Dz = 2)."""
    z = z.double()
    if z.shape[1] <= 2:
        return z
    centred = z - z.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T  # (N, 2)


def latent_scatter(z: torch.Tensor, labels: torch.Tensor | None, path: Path, title: str = "") -> Path:
    """Posterior means in 2-D (PCA when Dz > 2), coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = _pca_2d(z).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if labels is None:
        ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.7, lw=0)
    else:
        points = ax.scatter(p[:, 0], p[:, 1], c=labels.numpy(), cmap="tab10", s=8, alpha=0.8, lw=0, vmin=-0.5,
                            vmax=9.5)
        fig.colorbar(points, ax=ax, ticks=range(10), label="class")
    ax.set_xlabel("z1" if z.shape[1] <= 2 else "PC 1 of E_q[z|x]")
    ax.set_ylabel("z2" if z.shape[1] <= 2 else "PC 2 of E_q[z|x]")
    ax.set_title(title or "test posterior means")
    return save_figure(fig, path, dpi=110, crop=True)


@torch.no_grad()
def vae_pictures(model, test: Dataset, out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Reconstructions next to inputs, prior samples (and their decoder means, same z), a latent scatter by class,
    latent interpolations and, for a hierarchy, samples with the top groups fixed and the lower ones resampled."""
    out_dir = Path(out_dir)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    if not test.is_image:
        return []
    paths = []
    batch = test.batch(torch.arange(min(12, len(test))))
    recon = model.reconstruct(batch, g)
    paths.append(save_strip([batch["x"], recon], out_dir / "reconstructions.png", labels=["input", "recon"]))
    cond = {"y": torch.arange(100) // 10 % model.num_classes} if model.num_classes else None
    n = 100 if model.num_classes else 64
    z_seed = int(torch.randint(0, 2**31, (1,), generator=g))
    for name, mean in (("prior_samples.png", False), ("prior_sample_means.png", True)):  # x ~ p(x|z) and E[x|z]
        x = model.draw(n, torch.Generator().manual_seed(z_seed), cond, mean=mean)
        paths.append(save_image_grid(x.clamp(-1, 1), out_dir / name, nrow=10 if model.num_classes else 8))
    means = posterior_means(model, test, seed=seed, samples=4)
    paths.append(latent_scatter(means, test.y, out_dir / "latent_scatter.png"))
    paths.append(_interpolations(model, test, out_dir / "interpolations.png", g))
    if len(model.group_dims) > 1:
        paths.extend(_fixed_top_groups(model, out_dir, g))
    return paths


def _interpolations(model, test: Dataset, path: Path, g: torch.Generator, steps: int = 9, pairs: int = 6) -> Path:
    """Decoded means along straight lines between the posterior latents of test pairs (each group's, for HVAEs)."""
    a = test.batch(torch.arange(pairs))
    b = test.batch(torch.arange(pairs, 2 * pairs))
    weights = torch.linspace(0, 1, steps)
    rows = []
    if len(model.group_dims) == 1:
        za = model.encode(model.head.observe(a["x"], g), a.get("y") if model.num_classes else None)[0]
        zb = model.encode(model.head.observe(b["x"], g), a.get("y") if model.num_classes else None)[0]
        for i in range(pairs):
            z = torch.stack([(1 - w) * za[i] + w * zb[i] for w in weights])  # (steps, Dz)
            y = {"y": a["y"][i].expand(steps)} if model.num_classes else None
            rows.append(model.draw(steps, g, y, z=z, mean=True).clamp(-1, 1))
    else:
        za = model.top_down(model.bottom_up(model.head.observe(a["x"], g)), pairs, g)["z"]
        zb = model.top_down(model.bottom_up(model.head.observe(b["x"], g)), pairs, g)["z"]
        for i in range(pairs):
            fixed = [torch.stack([(1 - w) * p[i] + w * q[i] for w in weights]) for p, q in zip(za, zb, strict=True)]
            rows.append(model.draw(steps, g, fixed=fixed, mean=True).clamp(-1, 1))
    return save_strip(rows, path)


def _fixed_top_groups(model, out_dir: Path, g: torch.Generator, rows: int = 8, cols: int = 10) -> list[Path]:
    """One picture per depth m: each row keeps z_1..z_m of one prior draw and resamples the groups below."""
    paths = []
    for m in range(1, len(model.group_dims)):
        top = model.prior_latents(rows, g)[:m]
        strips = [model.draw(cols, g, fixed=[z[r:r + 1].expand(cols, -1) for z in top]).clamp(-1, 1)
                  for r in range(rows)]
        paths.append(save_strip(strips, out_dir / f"fixed_top{m}_of_{len(model.group_dims)}.png"))
    return paths
