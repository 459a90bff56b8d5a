"""Helpers every family's builder uses to read its `model:` section."""

from __future__ import annotations

from deepgm.conditioning import (
    ClassLabel,
    Conditioning,
    GuidanceWeight,
    LowResImage,
    NoiseAugmentation,
    TextCondition,
)
from deepgm.data.base import DataSpec


def check_options(section: dict, allowed: set[str], where: str) -> dict:
    """A copy of `section`, or a clear error naming its unknown keys and the valid ones."""
    unknown = set(section) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {where}; valid keys are {sorted(allowed)}")
    return dict(section)


def class_conditioning(spec: dict, data: DataSpec) -> Conditioning:
    """The class label condition when `class_conditional` is set (and the data has labels), else none."""
    if not spec.get("class_conditional", False):
        return Conditioning()
    if not data.num_classes:
        raise ValueError(f"class_conditional needs a labelled dataset; {data.name!r} has no labels")
    return Conditioning([ClassLabel(data.num_classes)])


def model_conditioning(spec: dict, data: DataSpec) -> Conditioning:
    """The conditions a `model:` section asks for: class labels (`class_conditional: true`) and/or a caption
    (`text: {encoder: minilm-l6, max_length: 32}`, read through a frozen pretrained encoder), and the guidance
    weight as an input (`guidance_input: true`, a guidance-distilled student), and a low-resolution image with its
    noise-augmentation level (`super_resolution: {low_res: 16, max_augmentation: 0.5}`, a cascade's SR stage)."""
    conditions = list(class_conditioning(spec, data).conditions.values())
    if spec.get("super_resolution"):
        conditions += super_resolution_conditions(spec["super_resolution"], data)
    text = spec.get("text")
    if text:
        text = check_options(text if isinstance(text, dict) else {"encoder": text},
                             {"encoder", "max_length", "pooled", "layers"}, "model.text")
        pooled, layers = text.get("pooled", True), text.get("layers", 0)
        if not isinstance(pooled, bool):
            raise ValueError(f"model.text.pooled must be true or false, got {pooled!r}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise ValueError(f"model.text.layers must be a whole number >= 0 of trainable transformer layers over "
                             f"the frozen encoder's tokens, got {layers!r}")
        conditions.append(TextCondition(text.get("encoder", "minilm-l6"), int(text.get("max_length", 32)),
                                        pooled=pooled, layers=layers))
    if spec.get("guidance_input", False):  # a guidance-distilled student reads w (deepgm.conditioning.GuidanceWeight)
        if not conditions:
            raise ValueError("model.guidance_input needs a conditional model (class_conditional or text): guidance "
                             "weighs a condition against its absence")
        conditions.append(GuidanceWeight())
    return Conditioning(conditions)


def super_resolution_conditions(spec: dict, data: DataSpec) -> list:
    """A super-resolution stage's conditions: the image at `low_res` (upsampled, concatenated to x_t) and the level of
    noise-conditioning augmentation, drawn from U[0, max_augmentation] in training (0: no augmentation)."""
    spec = check_options(spec, {"low_res", "max_augmentation"}, "model.super_resolution")
    if "low_res" not in spec:
        raise ValueError("model.super_resolution needs low_res: the resolution of the stage below, e.g. 16")
    if not data.is_image or data.shape[1] != data.shape[2]:
        raise ValueError(f"super-resolution needs square images; {data.name!r} has shape {data.shape}")
    return [LowResImage(data.shape[0], int(spec["low_res"]), data.shape[-1]),
            NoiseAugmentation(float(spec.get("max_augmentation", 0.5)))]
