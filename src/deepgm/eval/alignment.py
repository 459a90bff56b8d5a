"""Text-image alignment: does a generated image show what its caption says? An attribute classifier trained on
real scenes (deepgm.eval.features, one head per attribute) reads each sample, and the dataset's `agreement`
(deepgm.data.shapes.agreement) compares what was read with what the caption names, per kind of attribute. A
sample is aligned when every kind agrees. Reported overall (with a 95% interval) and per kind."""

from __future__ import annotations

import math

import torch


def alignment(agree: dict[str, torch.Tensor], groups: dict[str, torch.Tensor] | None = None) -> dict:
    """agree: per kind of attribute, (N,) bool (kinds a caption does not name count as agreeing). groups: named
    (N,) bool masks of captions (e.g. one object, two objects) whose alignment is also reported on its own."""
    if not agree or len({len(v) for v in agree.values()}) != 1:
        raise ValueError("agreement needs one (N,) bool tensor per kind of attribute, all of the same length")
    aligned = torch.stack(list(agree.values()), dim=1).all(dim=1).double()
    p, n = float(aligned.mean()), len(aligned)
    out = {"alignment": p, "alignment_ci95": 1.96 * math.sqrt(p * (1 - p) / n)}
    out.update({f"alignment_{kind}": float(v.double().mean()) for kind, v in agree.items()})
    for name, mask in (groups or {}).items():
        out[f"alignment_{name}"] = float(aligned[mask].mean()) if mask.any() else float("nan")
    return out
