"""The diffusion family's builder: a config's `model:` section (kind: ddpm) -> DiffusionModel."""

from __future__ import annotations

from deepgm.data.base import DataSpec
from deepgm.diffusion.distill import make_distillation
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.nets.build import build_net
from deepgm.options import check_options, model_conditioning

OPTIONS = {"kind", "net", "schedule", "parameterization", "loss", "weighting", "sigma_data", "class_conditional",
           "text", "cond_dropout", "label_dropout", "guidance_input", "distill", "super_resolution"}


def build_ddpm(spec: dict, data: DataSpec) -> DiffusionModel:
    """A diffusion model: `weighting` is a name or {name, t_sampling, gamma, ...} (`loss` is its older spelling);
    `cond_dropout` (older spelling `label_dropout`) is the probability of training on the null condition (no label,
    no caption), which classifier-free guidance needs; `text` conditions on captions (deepgm.options);
    `guidance_input` makes the guidance weight an input; `distill: {teacher, steps, guidance}` makes the model a
    student of a teacher run (deepgm.diffusion.distill)."""
    spec = check_options(spec, OPTIONS, "model (ddpm)")
    for new, old in (("weighting", "loss"), ("cond_dropout", "label_dropout")):
        if new in spec and old in spec:
            raise ValueError(f"model: give either `{new}` or its older spelling `{old}`, not both")
    schedule_spec = dict(spec.get("schedule", {"name": "cosine", "T": 1000}))
    schedule = make_schedule(schedule_spec.pop("name", "cosine"), **schedule_spec)
    conditioning = model_conditioning(spec, data)
    net = build_net(spec.get("net", {}), data, conditioning)
    model = DiffusionModel(net, schedule, spec.get("parameterization", "eps"),
                           spec.get("weighting", spec.get("loss", "simple")), levels=data.levels,
                           cond_dropout=float(spec.get("cond_dropout", spec.get("label_dropout", 0.0))),
                           sigma_data=float(spec.get("sigma_data", 0.5)), data_shape=data.shape)
    if spec.get("distill"):  # a student: its objective holds the teacher (loaded when training first asks)
        distill = dict(spec["distill"])
        if distill.get("guidance") is not None and "w" not in conditioning:
            raise ValueError("model.distill.guidance distils guidance into the student, which must read w: "
                             "set model.guidance_input: true")
        model.objective = make_distillation(distill, model.denoiser.parameterization)
        model.distilled = {"steps": distill.get("steps"), "guidance": distill.get("guidance")}
    return model
