"""scikit-learn's 8x8 handwritten digits: 1,797 images, 17 grey levels, 10 classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepgm.data.base import Dataset, register

LEVELS = 17  # pixel values are integers 0..16
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@register("digits")
def load_digits(split: str = "train", size: int = 8) -> Dataset:
    """Digits scaled to [-1, 1] as (N, 1, size, size), with a fixed train/test split.

    size=16 upsamples bilinearly and re-quantises to the same 17 levels, so bits/dim stays exact
    for a discrete distribution over those levels.
    """
    from sklearn.datasets import load_digits as sk_load

    if size not in (8, 16, 32):
        raise ValueError(f"digits size must be 8, 16 or 32, got {size}")
    raw = sk_load()
    x = torch.tensor(raw.images, dtype=torch.float32)[:, None] / (LEVELS - 1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(raw.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = torch.round(x.clamp(0, 1) * (LEVELS - 1)) / (LEVELS - 1)
    x = x * 2 - 1
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(TEST_FRACTION * len(x)))
    index = order[n_test:] if split == "train" else order[:n_test]
    return Dataset(name="digits", x=x[index].contiguous(), y=y[index], levels=LEVELS, num_classes=10)
