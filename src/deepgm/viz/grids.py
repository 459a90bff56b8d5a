"""Image grids and strips as PNGs (PIL only): [-1, 1] tensors -> uint8, nearest-neighbour upscaled."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from deepgm.files import atomic_write

PAD_VALUE = 128  # mid-grey separators show against both black and white backgrounds
MIN_WIDTH = 256


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, with -1 -> 0 and 1 -> 255 exactly (NaN -> 0)."""
    x = torch.nan_to_num(x.detach().cpu().float(), nan=-1.0).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _check_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ValueError(f"expected images (N, C, H, W) with C in (1, 3) and N > 0, got shape {tuple(x.shape)}")
    return x


def _tile(pixels: np.ndarray, ncol: int, pad: int, scale: int) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into rows of ncol, upscaled by scale, with pad grey pixels between/around."""
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = pixels.shape
    nrows = math.ceil(n / ncol)
    canvas = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), PAD_VALUE, dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top:top + h, left:left + w] = img
    return canvas


def _to_pil(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(canvas[..., 0], mode="L") if canvas.shape[2] == 1 else Image.fromarray(canvas, mode="RGB")


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Image.Image:
    """Images (N, C, H, W) in [-1, 1] as one PIL image with nrow images per row (default ~square); grey or RGB."""
    x = _check_images(x)
    ncol = max(1, min(nrow or math.ceil(math.sqrt(len(x))), len(x)))
    if scale < 1 or pad < 0:
        raise ValueError(f"scale must be >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    return _to_pil(_tile(to_uint8(x), ncol, pad, scale))


def _default_scale(width_px: int, min_width: int = MIN_WIDTH) -> int:
    return max(1, math.ceil(min_width / max(width_px, 1)))


def _save(img: Image.Image, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_image_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Write a grid PNG; the default scale makes it at least ~256 px wide."""
    x = _check_images(x)
    ncol = max(1, min(nrow or math.ceil(math.sqrt(len(x))), len(x)))
    scale = scale or _default_scale(ncol * x.shape[-1])
    return _save(image_grid(x, ncol, pad=1, scale=scale), path)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def save_strip(rows: list[torch.Tensor], path: str | Path, labels: list[str] | None = None,
               scale: int | None = None) -> Path:
    """Rows of image sequences (K, C, H, W) stacked vertically, e.g. x0 -> x_T.

    `labels` names the K columns (drawn above them), or, when there is one per row instead, the rows (drawn left).
    """
    rows = [_check_images(r) for r in rows]
    if not rows:
        raise ValueError("save_strip needs at least one row")
    k = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    if any(r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise ValueError(f"all rows need the same image shape, got {[tuple(r.shape[1:]) for r in rows]}")
    labels = list(labels) if labels else []
    by_column = len(labels) == k
    if labels and not by_column and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {k} columns and {len(rows)} rows; give one per column or row")
    font = _font()
    text_w = max((_text_size(font, s)[0] for s in labels), default=0)
    text_h = max((_text_size(font, s)[1] for s in labels), default=0)
    if scale is None:
        scale = _default_scale(k * w, 384)
        if by_column:  # each column wide enough for its label
            scale = max(scale, math.ceil((text_w + 4) / w))
    blank = torch.full((1, *rows[0].shape[1:]), -1.0)
    images = torch.cat([torch.cat([r, blank.expand(k - len(r), -1, -1, -1)]) for r in rows])
    canvas = _to_pil(_tile(to_uint8(images), k, 1, scale)).convert("RGB")
    margin_top = text_h + 6 if by_column else 0
    margin_left = text_w + 8 if labels and not by_column else 0
    out = Image.new("RGB", (canvas.width + margin_left, canvas.height + margin_top), "white")
    out.paste(canvas, (margin_left, margin_top))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        tw, _ = _text_size(font, text)
        if by_column:
            centre = margin_left + 1 + i * (w * scale + 1) + w * scale // 2
            draw.text((centre - tw // 2, 2), text, fill="black", font=font)
        else:
            middle = margin_top + 1 + i * (h * scale + 1) + h * scale // 2
            draw.text((margin_left - tw - 4, middle - text_h // 2), text, fill="black", font=font)
    return _save(out, path)
