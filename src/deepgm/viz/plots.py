"""Matplotlib (Agg) figures: training curves from metrics.jsonl, 2-D scatters, generic line plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepgm.files import atomic_write  # noqa: E402

LOG_SPAN = 3.0  # log-y only for positive curves spanning at least this factor: narrower ones read better linear


def save_figure(fig, path: str | Path, dpi: int = 100, crop: bool = False) -> Path:
    """Lay out, save whole (making the folder) and close a matplotlib figure; `crop` trims it to what is drawn."""
    path = Path(path)
    fig.tight_layout()
    options = {"dpi": dpi, "bbox_inches": "tight" if crop else None, "format": path.suffix[1:] or "png"}
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, **options))
    finally:
        plt.close(fig)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """Records of a JSON-lines metrics file; unreadable (e.g. cut-off) lines are skipped."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and _is_number(record.get("step")):
            records.append(record)
    return records


def _moving_average(v: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(v, np.ones(window) / window, mode="valid")


def _is_noisy(v: np.ndarray, log: bool) -> bool:
    """Step-to-step jitter large compared with the range of the curve's second half (where trends have flattened)."""
    if len(v) < 10:
        return False
    u = np.log(v) if log else v
    tail = u[len(u) // 2:]
    spread = tail.max() - tail.min()
    return spread > 0 and np.median(np.abs(np.diff(u))) > 0.1 * spread


def plot_metrics(metrics_jsonl: str | Path, path: str | Path, keys: list[str] | None = None) -> Path:
    """One subplot per numeric metric vs step (log-y when positive over a wide range, smoothed when noisy)."""
    records = read_metrics(metrics_jsonl)
    available = list(dict.fromkeys(k for r in records for k, v in r.items() if k != "step" and _is_number(v)))
    if keys is not None:
        missing = [k for k in keys if k not in available]
        if missing:
            raise ValueError(f"no numeric values for {missing} in {metrics_jsonl}; available: {available}")
        available = list(keys)
    if not available:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
        ax.set_axis_off()
        return save_figure(fig, path)
    ncols = min(3, len(available))
    nrows = math.ceil(len(available) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, available, strict=False):
        pairs = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
        steps, values = (np.array(p, dtype=np.float64) for p in zip(*pairs, strict=True))
        log = bool((values > 0).all()) and values.max() >= LOG_SPAN * values.min()
        noisy = _is_noisy(values, log)
        ax.plot(steps, values, color="C0", alpha=0.3 if noisy else 1.0, lw=1)
        if noisy:
            window = max(3, len(values) // 20)
            smooth = np.exp(_moving_average(np.log(values), window)) if log else _moving_average(values, window)
            ax.plot(steps[window - 1:], smooth, color="C0", lw=1.6)
        if log:
            ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(available):]:
        ax.set_axis_off()
    return save_figure(fig, path)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def scatter_2d(points: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None,
               title: str = "") -> Path:
    """Scatter of (N, 2) points over an optional grey reference cloud (e.g. samples over the data)."""
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"scatter_2d needs (N, 2) points, got shape {tuple(points.shape)}")
    fig, ax = plt.subplots(figsize=(5, 5))
    if reference is not None:
        ref = _numpy(reference)
        ax.scatter(ref[:, 0], ref[:, 1], s=3, c="0.7", alpha=0.6, lw=0, label="data")
    p = _numpy(points)
    ax.scatter(p[:, 0], p[:, 1], s=4, c="C0", alpha=0.7, lw=0, label="samples")
    ax.set_aspect("equal", adjustable="datalim")
    if reference is not None:
        ax.legend(loc="upper right", markerscale=3, fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def plot_curves(xs, ys_by_label: dict[str, list], path: str | Path, xlabel: str, ylabel: str,
                logx: bool = False, logy: bool = False, title: str = "") -> Path:
    """Line plot of several curves; xs is shared, or a dict with each label's own x values."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, ys in ys_by_label.items():
        x = xs[label] if isinstance(xs, dict) else xs
        if len(x) != len(ys):
            raise ValueError(f"curve {label!r}: {len(x)} x values but {len(ys)} y values")
        ax.plot(x, ys, marker="o" if len(ys) <= 30 else None, ms=3, label=label)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if ys_by_label:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)
