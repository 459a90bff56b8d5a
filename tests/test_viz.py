"""Image grids, strips and plots: sizes, exact pixel mapping, valid PNGs, clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deepgm.viz import image_grid, plot_curves, plot_metrics, save_image_grid, save_strip, scatter_2d


@pytest.mark.parametrize("n, nrow, pad, scale, h, w", [
    (10, 4, 1, 1, 8, 8), (10, 4, 2, 3, 8, 8), (16, None, 1, 2, 8, 8), (5, 5, 0, 1, 6, 7), (3, 10, 1, 1, 8, 8),
])
def test_grid_size(n, nrow, pad, scale, h, w):
    img = image_grid(torch.zeros(n, 1, h, w), nrow=nrow, pad=pad, scale=scale)
    ncol = min(nrow or 4, n)
    nrows = -(-n // ncol)
    assert img.size == (ncol * (w * scale + pad) + pad, nrows * (h * scale + pad) + pad)
    assert img.mode == "L"


def test_grid_pixel_values_exact_and_rgb():
    x = torch.tensor([-1.0, 1.0, -5.0, 5.0]).reshape(1, 1, 2, 2)
    px = np.asarray(image_grid(x, pad=0))
    assert px.tolist() == [[0, 255], [0, 255]]
    up = np.asarray(image_grid(x, pad=0, scale=3))
    assert up.shape == (6, 6) and (up[:3, :3] == 0).all() and (up[:3, 3:] == 255).all()
    rgb = image_grid(torch.ones(2, 3, 4, 4), pad=0)
    assert rgb.mode == "RGB" and np.asarray(rgb).min() == 255


def test_grid_rejects_bad_channels():
    with pytest.raises(ValueError, match="C in"):
        image_grid(torch.zeros(2, 2, 8, 8))


def test_save_image_grid_writes_png(tmp_path):
    path = save_image_grid(torch.rand(64, 1, 8, 8) * 2 - 1, tmp_path / "sub" / "grid.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (8 * (8 * 4 + 1) + 1,) * 2  # default scale 4 makes 8 columns of 8 px >= 256 px
    path = save_image_grid(torch.zeros(6, 1, 8, 8), tmp_path / "g2.png", nrow=3, scale=2)
    with Image.open(path) as img:
        assert img.size == (3 * 17 + 1, 2 * 17 + 1)


def test_save_strip(tmp_path):
    rows = [torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 1, 8, 8) for _ in range(3)]
    path = save_strip(rows, tmp_path / "strip.png", scale=4)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (5 * 33 + 1, 3 * 33 + 1)
    labelled = save_strip(rows, tmp_path / "labelled.png", labels=[f"t={t:.2f}" for t in np.linspace(0, 1, 5)])
    with Image.open(labelled) as img:
        assert img.width >= 5 * 33 + 1 and img.height > 3 * 33 + 1  # header row for the column labels
    by_row = save_strip(rows, tmp_path / "rows.png", labels=["a", "b", "c"], scale=4)
    with Image.open(by_row) as img:
        assert img.width > 5 * 33 + 1 and img.height == 3 * 33 + 1  # margin on the left for the row labels
    with pytest.raises(ValueError, match="labels"):
        save_strip(rows, tmp_path / "bad.png", labels=["a", "b"])


def test_plot_metrics(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    rng = np.random.default_rng(0)
    lines = [json.dumps({"step": s, "loss": float(1 / (s + 1) + 0.1 * rng.random()), "grad_norm": float(s - 50),
                         "lr": 1e-3, "note": "text is ignored"}) for s in range(100)]
    metrics.write_text("\n".join(lines) + "\n{\"step\": 100, \"loss\"")  # a cut-off last line is skipped
    path = plot_metrics(metrics, tmp_path / "plots" / "loss.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100
    assert plot_metrics(metrics, tmp_path / "one.png", keys=["loss"]).is_file()
    with pytest.raises(ValueError, match="missing_key"):
        plot_metrics(metrics, tmp_path / "x.png", keys=["missing_key"])


def test_plot_metrics_missing_file(tmp_path):
    missing = tmp_path / "nope" / "metrics.jsonl"
    with pytest.raises(FileNotFoundError, match="nope"):
        plot_metrics(missing, tmp_path / "out.png")


def test_scatter_and_curves(tmp_path):
    pts = torch.randn(500, 2)
    with Image.open(scatter_2d(pts, tmp_path / "a" / "scatter.png", reference=torch.randn(1000, 2), title="t")) as img:
        assert img.format == "PNG"
    path = plot_curves([1, 2, 4, 8], {"ddim": [4.0, 2.0, 1.0, 0.5], "ddpm": [8.0, 4.0, 2.0, 1.0]},
                       tmp_path / "b" / "curves.png", "NFE", "error", logx=True, logy=True, title="error vs NFE")
    with Image.open(path) as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="N, 2"):
        scatter_2d(torch.randn(5, 3), tmp_path / "bad.png")
