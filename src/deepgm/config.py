"""Experiment configs: YAML files plus `key=value` overrides, checked before anything runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from deepgm.family import SamplingPlan

PACKAGED = Path(__file__).parent / "configs"

DEFAULTS: dict[str, Any] = {
    "name": None,
    "seed": 0,
    "data": {"name": "digits"},
    "model": {"kind": "ddpm"},
    "train": {},
    "sample": {"sampler": "ddim", "steps": 50, "n": 64, "clip": True, "guidance": 1.0},
    "eval": {"n_samples": 1000, "sampler": "ddim", "steps": 50, "vlb": True, "vlb_examples": 256},
    "resolved": {},  # written by `deepgm train`: the data's shape, levels and classes, the model's conditions
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_config_path(spec: str | Path) -> Path:
    """A config file path, or the name of a config shipped with deepgm (e.g. 'ddpm-digits')."""
    path = Path(spec)
    if path.is_file():
        return path
    packaged = PACKAGED / f"{path.stem}.yaml"
    if packaged.is_file() and path.suffix in ("", ".yaml", ".yml"):
        return packaged
    shipped = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.yaml")))
    raise FileNotFoundError(f"config {str(spec)!r} not found: give a YAML file path or one of: {shipped}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=200' -> (['train', 'steps'], 200); the value is read as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r} has an empty key part")
    try:
        return parts, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ValueError(f"override {text!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                         f"{key}='...'") from None


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    config = copy.deepcopy(config)
    for text in overrides:
        parts, value = parse_override(text)
        node = config
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return config


def load_config(spec: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a YAML config, fill defaults, apply overrides and check the top-level sections."""
    path = resolve_config_path(spec)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    config = apply_overrides(_merge(DEFAULTS, raw), overrides or [])
    config["name"] = config["name"] or path.stem
    check_config(config)
    return config


# deepgm.family.SamplingPlan
PLAN_KEYS = {"sampler", "steps", "grid", "guidance", "threshold", "clip", "options", "augmentation", "start"}
SECTION_KEYS = {"sample": PLAN_KEYS | {"n"}, "eval": PLAN_KEYS | {"n_samples", "vlb", "vlb_examples", "iwae_k"}}


def check_config(config: dict) -> None:
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid sections are {sorted(DEFAULTS)}")
    for section in ("data", "model", "train", "sample", "eval", "resolved"):
        if not isinstance(config[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping")
    if not isinstance(config["seed"], int):
        raise ValueError(f"seed must be an integer, got {config['seed']!r}")
    for section, keys in SECTION_KEYS.items():
        unknown = sorted(set(config[section]) - keys)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the {section!r} section; valid keys are {sorted(keys)}")
        SamplingPlan.from_config(config[section])  # a bad guidance weight or threshold fails before training


def save_config(config: dict, path: Path) -> None:
    """Write the resolved config atomically next to a run's outputs."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
