"""Text-image alignment: does a generated image show what its caption says? An attribute classifier trained on
real scenes (deepgm.eval.features, one head per attribute) reads each sample; a sample is aligned when every
attribute its caption names is predicted as named. Reported overall (with a 95% interval) and per kind of
attribute (shape, colour, size, position, relation, number of objects)."""

from __future__ import annotations

import math

import torch


def alignment(predicted: torch.Tensor, wanted: torch.Tensor, mentioned: torch.Tensor,
              names: tuple[str, ...]) -> dict:
    """predicted, wanted: attributes (N, A) (-1: absent); mentioned: (N, A) bool, what each caption names."""
    if predicted.shape != wanted.shape or mentioned.shape != wanted.shape or wanted.shape[1] != len(names):
        raise ValueError(f"attributes of shapes {tuple(predicted.shape)}, {tuple(wanted.shape)} and mentioned "
                         f"{tuple(mentioned.shape)} must agree, with one column per name ({len(names)})")
    right = predicted == wanted
    aligned = (right | ~mentioned).all(dim=1).double()
    p, n = float(aligned.mean()), len(aligned)
    out = {"alignment": p, "alignment_ci95": 1.96 * math.sqrt(p * (1 - p) / n)}
    kinds: dict[str, list[int]] = {}
    for a, name in enumerate(names):
        kinds.setdefault(name.rstrip("01"), []).append(a)
    for kind, columns in kinds.items():
        named = mentioned[:, columns]
        if named.any():
            out[f"alignment_{kind}"] = float(right[:, columns][named].double().mean())
    return out
