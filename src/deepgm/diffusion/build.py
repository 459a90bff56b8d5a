"""The diffusion family's builder: a config's `model:` section (kind: ddpm) -> DiffusionModel."""

from __future__ import annotations

from deepgm.data.base import DataSpec
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.nets.build import build_net
from deepgm.options import check_options, class_conditioning

OPTIONS = {"kind", "net", "schedule", "parameterization", "loss", "weighting", "sigma_data", "class_conditional",
           "label_dropout"}


def build_ddpm(spec: dict, data: DataSpec) -> DiffusionModel:
    """A diffusion model: `weighting` is a name or {name, t_sampling, gamma, ...} (`loss` is its older spelling);
    `label_dropout` is the probability of training on the "no label" token (for classifier-free guidance)."""
    spec = check_options(spec, OPTIONS, "model (ddpm)")
    if "loss" in spec and "weighting" in spec:
        raise ValueError("model: give either `weighting` or its older spelling `loss`, not both")
    schedule_spec = dict(spec.get("schedule", {"name": "cosine", "T": 1000}))
    schedule = make_schedule(schedule_spec.pop("name", "cosine"), **schedule_spec)
    conditioning = class_conditioning(spec, data)
    net = build_net(spec.get("net", {}), data, conditioning)
    return DiffusionModel(net, schedule, spec.get("parameterization", "eps"),
                          spec.get("weighting", spec.get("loss", "simple")), levels=data.levels,
                          cond_dropout=float(spec.get("label_dropout", 0.0)),
                          sigma_data=float(spec.get("sigma_data", 0.5)), data_shape=data.shape)
