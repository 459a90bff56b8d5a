"""Sample-quality metrics on feature vectors: Fréchet distance, improved precision/recall, sliced Wasserstein."""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import torch

EPS = 1e-6


def _sqrtm_product(cov1: np.ndarray, cov2: np.ndarray) -> np.ndarray:
    """Real square root of cov1 @ cov2, retried with eps*I on both diagonals when the product is near-singular."""
    product = cov1 @ cov2
    with warnings.catch_warnings():  # a singular product is handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(product)
        residual = np.linalg.norm(root @ root - product) / max(np.linalg.norm(product), 1e-300)
        if not np.isfinite(root).all() or residual > 1e-4:
            offset = np.eye(len(cov1)) * EPS
            root = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part ({np.abs(root.imag).max():.3g})")
        root = root.real
    return root


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2): |mu1-mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^1/2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {cov1.shape} vs {cov2.shape}")
    diff = mu1 - mu2
    root = _sqrtm_product(cov1, cov2)
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root)
    return float(max(value, 0.0))


def gaussian_fit(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64 numpy) of an (N, F) matrix, rows flattened: the Gaussian FID compares."""
    x = feats.detach().cpu().double().reshape(len(feats), -1).numpy()
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors to estimate a covariance, got {len(x)}")
    return x.mean(0), np.cov(x, rowvar=False)


def fid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two (N, F) feature matrices."""
    return frechet_distance(*gaussian_fit(feats_a), *gaussian_fit(feats_b))


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def fid_of_samples(a: torch.Tensor, b: torch.Tensor) -> float:
    """fid(a, b) for two sample sets of equal size N, at the cost of an SVD of side min(N, D): with the centred rows
    A and B, tr (C_a C_b)^1/2 = ||A B^T||_* / (N - 1), the nuclear norm, since the nonzero eigenvalues of C_a C_b
    are the squared singular values of A B^T / (N - 1); for D < N the same singular values are those of
    (A^T A)^1/2 (B^T B)^1/2. fid's general D x D matrix root (not symmetric) is slower, and the calibration pilot
    compares dozens of candidates this way, on 2,048 2-D samples and on 256 images alike."""
    a, b = (v.detach().double().reshape(len(v), -1) for v in (a, b))
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need two sample sets of one shape with at least 2 samples, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    a, b = a - mean_a, b - mean_b
    if a.shape[1] < len(a):  # D < N: the same nuclear norm is that of (A^T A)^1/2 (B^T B)^1/2, D x D
        root = torch.linalg.svdvals(_psd_sqrt(a.T @ a) @ _psd_sqrt(b.T @ b)).sum()
    else:
        root = torch.linalg.svdvals(a @ b.T).sum()
    value = (mean_a - mean_b).pow(2).sum() + (a.pow(2).sum() + b.pow(2).sum() - 2 * root) / (len(a) - 1)
    return float(value.clamp(min=0.0))


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    if not 0 < k < len(x):
        raise ValueError(f"k must be in [1, {len(x) - 1}] for {len(x)} points, got {k}")
    radii = [torch.cdist(x[i:i + batch_size], x).topk(k + 1, dim=1, largest=False).values[:, k]
             for i in range(0, len(x), batch_size)]
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of queries inside the union of balls B(centres[i], radii[i])."""
    inside = [(torch.cdist(queries[i:i + batch_size], centres) <= radii[None]).any(dim=1)
              for i in range(0, len(queries), batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3,
                     batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) from k-NN balls around each set."""
    real = real_feats.detach().cpu().double().reshape(len(real_feats), -1)
    fake = fake_feats.detach().cpu().double().reshape(len(fake_feats), -1)
    precision = _coverage(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance between two point clouds (rows flattened), by sorting random projections."""
    a = a.detach().cpu().double().reshape(len(a), -1)
    b = b.detach().cpu().double().reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"point dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    n = min(len(a), len(b))
    if len(a) > n:
        a = a[torch.randperm(len(a), generator=generator)[:n]]
    if len(b) > n:
        b = b[torch.randperm(len(b), generator=generator)[:n]]
    theta = torch.randn(n_projections, a.shape[1], generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).numpy()
    a, b = a.numpy(), b.numpy()
    total = 0.0
    for i in range(0, n_projections, 64):  # (64, N) projections at a time, sorted along contiguous rows
        pa = np.sort(theta[i:i + 64] @ a.T, axis=1)
        pb = np.sort(theta[i:i + 64] @ b.T, axis=1)
        total += float(np.square(pa - pb).sum())
    return math.sqrt(total / (n * n_projections))
