"""The VAE family's builders: a config's `model:` section (kind: vae | hvae) -> VAE or HVAE."""

from __future__ import annotations

from torch import nn

from deepgm.data.base import DataSpec
from deepgm.options import check_options, class_conditioning
from deepgm.vae.heads import head_from_spec
from deepgm.vae.hvae import HVAE
from deepgm.vae.vae import VAE, make_decoder, make_encoder

_LATENT_OPTIONS = {"kind", "head", "beta", "warmup_steps", "free_bits", "free_bits_mode"}


def _latent_options(spec: dict) -> dict:
    return {"beta": float(spec.get("beta", 1.0)), "warmup_steps": int(spec.get("warmup_steps", 0)),
            "free_bits": float(spec.get("free_bits", 0.0))}


def build_vae(spec: dict, data: DataSpec) -> nn.Module:
    """A VAE (conditional with class_conditional): encoder mlp|conv, decoder mlp|conv|pixelcnn, a likelihood head."""
    allowed = _LATENT_OPTIONS | {"latent_dim", "encoder", "decoder", "class_conditional", "aggressive"}
    spec = check_options(spec, allowed, "model (vae)")
    classes = data.num_classes if class_conditioning(spec, data) else None
    head = head_from_spec(spec.get("head", "discretized_logistic"), data.levels)
    latent = int(spec.get("latent_dim", 16))
    encoder = make_encoder(spec.get("encoder", "mlp"), data.shape, latent, classes)
    decoder = make_decoder(spec.get("decoder", "mlp"), data.shape, latent, head.params_per_dim, classes)
    return VAE(encoder, decoder, head, latent, data.shape, classes, free_bits_mode=spec.get("free_bits_mode", "dim"),
               aggressive=spec.get("aggressive"), **_latent_options(spec))


def build_hvae(spec: dict, data: DataSpec) -> nn.Module:
    """A top-down hierarchical VAE over `group_dims` (top group first): vector groups with an mlp|conv stem and
    decoder, or, with `resolutions`, groups of group_dims[l] feature maps at those resolutions (all conv)."""
    spec = check_options(spec, _LATENT_OPTIONS | {"group_dims", "hidden", "encoder", "decoder", "channels", "dropout",
                                                  "resolutions"}, "model (hvae)")
    head = head_from_spec(spec.get("head", "discretized_logistic"), data.levels)
    groups = [int(d) for d in spec.get("group_dims", [16, 16, 16])]
    return HVAE(head, data.shape, groups, int(spec.get("hidden", 256)), spec.get("encoder", "mlp"),
                spec.get("decoder", "mlp"), int(spec.get("channels", 32)), float(spec.get("dropout", 0.0)),
                free_bits_mode=spec.get("free_bits_mode", "group"), resolutions=spec.get("resolutions"),
                **_latent_options(spec))
