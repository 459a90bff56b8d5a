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
    """A diffusion model: `weighting` is a name or {name, t_sampling, gamma, ...} (`loss` is its older spelling)."""
    allowed = {"kind", "net", "schedule", "parameterization", "loss", "weighting", "sigma_data", "class_conditional",
               "label_dropout"}
    spec = _options(spec, allowed, "model (ddpm)")
    if "loss" in spec and "weighting" in spec:
        raise ValueError("model: give either `weighting` or its older spelling `loss`, not both")
    schedule_spec = dict(spec.get("schedule", {"name": "cosine", "T": 1000}))
    schedule = make_schedule(schedule_spec.pop("name", "cosine"), **schedule_spec)
    conditional = bool(spec.get("class_conditional", False))
    net = build_net(spec.get("net", {}), data, conditional)
    return DiffusionModel(net, schedule, spec.get("parameterization", "eps"),
                          spec.get("weighting", spec.get("loss", "simple")), levels=data.levels,
                          label_dropout=float(spec.get("label_dropout", 0.0)),
                          sigma_data=float(spec.get("sigma_data", 0.5)))


_LATENT_OPTIONS = {"kind", "head", "beta", "warmup_steps", "free_bits", "free_bits_mode"}


def _latent_options(spec: dict) -> dict:
    return {"beta": float(spec.get("beta", 1.0)), "warmup_steps": int(spec.get("warmup_steps", 0)),
            "free_bits": float(spec.get("free_bits", 0.0))}


def build_vae(spec: dict, data: Dataset) -> nn.Module:
    """A VAE (conditional with class_conditional): encoder mlp|conv, decoder mlp|conv|pixelcnn, a likelihood head."""
    from deepgm.vae.heads import head_from_spec
    from deepgm.vae.vae import VAE, make_decoder, make_encoder

    allowed = _LATENT_OPTIONS | {"latent_dim", "encoder", "decoder", "class_conditional", "aggressive"}
    spec = _options(spec, allowed, "model (vae)")
    classes = data.num_classes if spec.get("class_conditional", False) else None
    if spec.get("class_conditional", False) and not classes:
        raise ValueError(f"class_conditional needs a labelled dataset; {data.name!r} has no labels")
    head = head_from_spec(spec.get("head", "discretized_logistic"), data.levels)
    latent = int(spec.get("latent_dim", 16))
    encoder = make_encoder(spec.get("encoder", "mlp"), data.shape, latent, classes)
    decoder = make_decoder(spec.get("decoder", "mlp"), data.shape, latent, head.params_per_dim, classes)
    return VAE(encoder, decoder, head, latent, data.shape, classes, free_bits_mode=spec.get("free_bits_mode", "dim"),
               aggressive=spec.get("aggressive"), **_latent_options(spec))


def build_hvae(spec: dict, data: Dataset) -> nn.Module:
    """A top-down hierarchical VAE over `group_dims` (top group first): vector groups with an mlp|conv stem and
    decoder, or, with `resolutions`, groups of group_dims[l] feature maps at those resolutions (all conv)."""
    from deepgm.vae.heads import head_from_spec
    from deepgm.vae.hvae import HVAE

    spec = _options(spec, _LATENT_OPTIONS | {"group_dims", "hidden", "encoder", "decoder", "channels", "dropout",
                                             "resolutions"}, "model (hvae)")
    head = head_from_spec(spec.get("head", "discretized_logistic"), data.levels)
    groups = [int(d) for d in spec.get("group_dims", [16, 16, 16])]
    return HVAE(head, data.shape, groups, int(spec.get("hidden", 256)), spec.get("encoder", "mlp"),
                spec.get("decoder", "mlp"), int(spec.get("channels", 32)), float(spec.get("dropout", 0.0)),
                free_bits_mode=spec.get("free_bits_mode", "group"), resolutions=spec.get("resolutions"),
                **_latent_options(spec))


MODELS: dict[str, Callable[[dict, Dataset], nn.Module]] = {"ddpm": build_ddpm, "vae": build_vae, "hvae": build_hvae}


def build_model(spec: dict, data: Dataset) -> nn.Module:
    """The model named by spec['kind'], sized for `data`."""
    kind = spec.get("kind", "ddpm")
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODELS)}")
    return MODELS[kind](spec, data)
