"""The registry of model families: a config's `model.kind` -> the family's builder (spec, DataSpec) -> model.

Builders live in their families and are imported when first asked for, so the run layer that reads this
registry knows no family by type.
"""

from __future__ import annotations

import importlib

from torch import nn

from deepgm.data.base import DataSpec

MODELS: dict[str, str] = {"ddpm": "deepgm.diffusion.build:build_ddpm", "vae": "deepgm.vae.build:build_vae",
                          "hvae": "deepgm.vae.build:build_hvae"}


def build_model(spec: dict, data: DataSpec) -> nn.Module:
    """The model named by spec['kind'] (default ddpm), sized for `data` (a DataSpec, or a Dataset's .spec)."""
    kind = spec.get("kind", "ddpm")
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODELS)}")
    module, name = MODELS[kind].split(":")
    return getattr(importlib.import_module(module), name)(spec, getattr(data, "spec", data))
