"""A network from a config's `net:` entry, sized for the data and reading the model's conditions."""

from __future__ import annotations

from torch import nn

from deepgm.conditioning import Conditioning
from deepgm.data.base import DataSpec
from deepgm.nets.mlp import MLP
from deepgm.nets.unet import UNet


def build_net(spec: dict, data: DataSpec, conditioning: Conditioning | None = None) -> nn.Module:
    """`mlp` for vectors, `unet` for images."""
    spec = dict(spec)
    name = spec.pop("name", "unet" if data.is_image else "mlp")
    try:
        if name == "mlp":
            if data.is_image:
                raise ValueError("net 'mlp' is for vector data; use 'unet' for images")
            return MLP(dim=data.shape[0], conditioning=conditioning, **spec)
        if name == "unet":
            if not data.is_image:
                raise ValueError("net 'unet' is for images; use 'mlp' for vector data")
            channels, size, _ = data.shape
            for key in ("channel_mult", "attention_resolutions", "cross_attention_resolutions"):
                if key in spec:
                    spec[key] = tuple(spec[key])
            return UNet(in_channels=channels, image_size=size, conditioning=conditioning, **spec)
    except TypeError as err:
        raise ValueError(f"bad options for net {name!r}: {err}") from None
    raise ValueError(f"unknown net {name!r}; choose 'mlp' or 'unet'")
