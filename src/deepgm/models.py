"""The registry that turns a config's `model:` section into a trainable module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from deepgm.data.base import Dataset
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.schedules import make_schedule
from deepgm.nets.mlp import MLP
from deepgm.nets.unet import UNet


def _options(section: dict, allowed: set[str], where: str) -> dict:
    unknown = set(section) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {where}; valid keys are {sorted(allowed)}")
    return dict(section)


def build_net(spec: dict, data: Dataset, class_conditional: bool = False) -> nn.Module:
    """A network sized for `data`: `mlp` for vectors, `unet` for images."""
    spec = dict(spec)
    name = spec.pop("name", "unet" if data.is_image else "mlp")
    num_classes = data.num_classes if class_conditional else None
    if class_conditional and not data.num_classes:
        raise ValueError(f"class_conditional needs a labelled dataset; {data.name!r} has no labels")
    try:
        if name == "mlp":
            if data.is_image:
                raise ValueError("net 'mlp' is for vector data; use 'unet' for images")
            return MLP(dim=data.shape[0], num_classes=num_classes, **spec)
        if name == "unet":
            if not data.is_image:
                raise ValueError("net 'unet' is for images; use 'mlp' for vector data")
            channels, size, _ = data.shape
            if "channel_mult" in spec:
                spec["channel_mult"] = tuple(spec["channel_mult"])
            if "attention_resolutions" in spec:
                spec["attention_resolutions"] = tuple(spec["attention_resolutions"])
            return UNet(in_channels=channels, image_size=size, num_classes=num_classes, **spec)
    except TypeError as err:
        raise ValueError(f"bad options for net {name!r}: {err}") from None
    raise ValueError(f"unknown net {name!r}; choose 'mlp' or 'unet'")


def build_ddpm(spec: dict, data: Dataset) -> DiffusionModel:
    allowed = {"kind", "net", "schedule", "parameterization", "loss", "class_conditional", "label_dropout"}
    spec = _options(spec, allowed, "model (ddpm)")
    schedule_spec = dict(spec.get("schedule", {"name": "cosine", "T": 1000}))
    schedule = make_schedule(schedule_spec.pop("name", "cosine"), **schedule_spec)
    conditional = bool(spec.get("class_conditional", False))
    net = build_net(spec.get("net", {}), data, conditional)
    return DiffusionModel(net, schedule, spec.get("parameterization", "eps"), spec.get("loss", "simple"),
                          levels=data.levels, label_dropout=float(spec.get("label_dropout", 0.0)))


MODELS: dict[str, Callable[[dict, Dataset], nn.Module]] = {"ddpm": build_ddpm}


def build_model(spec: dict, data: Dataset) -> nn.Module:
    """The model named by spec['kind'], sized for `data`."""
    kind = spec.get("kind", "ddpm")
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODELS)}")
    return MODELS[kind](spec, data)
