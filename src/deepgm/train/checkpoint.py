"""Checkpoints as safetensors + JSON (no pickle), written atomically so a kill never leaves a broken `latest`.

run_dir/checkpoints/step-00000500/
    model.safetensors    raw weights        metadata {"weights": "raw", "step": ...}
    ema.safetensors      EMA weights        metadata {"weights": "ema", "decay": ..., "step": ...}
    trainer.safetensors  optimizer tensors as optimizer.<param>.<state>, generator.<name>, scaler.<key>
    trainer.json         step, counters, optimizer hyper-parameters and non-tensor state, train config, the format
                         version, and each file's size and SHA-256 (so a damaged file is recognised before loading)
run_dir/checkpoints/latest  the name of the newest complete checkpoint directory
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deepgm.files import file_sha256

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FORMAT_VERSION = 1  # what trainer.json's "format_version" says; a newer one is refused, not misread
WEIGHT_FILES = ("model.safetensors", "ema.safetensors", "trainer.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, what is wrong and the fix."""


def damage(path: str | Path) -> str | None:
    """What is wrong with the checkpoint directory `path` (a missing, truncated, corrupted or too new file), or
    None when it is intact. Checkpoints from before the size and checksum records get their headers read instead."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        return "trainer.json is missing (the write did not finish)"
    try:
        record = json.loads((path / "trainer.json").read_text())
    except (ValueError, UnicodeDecodeError):
        return "trainer.json is not valid JSON"
    version = record.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return (f"it was written by a newer deepgm (checkpoint format {version}; this one reads up to "
                f"{FORMAT_VERSION}): upgrade deepgm")
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        expected = record.get("files", {}).get(name)
        if expected:
            size = file.stat().st_size
            if size != expected["bytes"]:
                return f"{name} has {size} bytes where trainer.json recorded {expected['bytes']} (truncated?)"
            if file_sha256(file) != expected["sha256"]:
                return f"{name} does not match the SHA-256 that trainer.json recorded (the file is corrupted)"
        elif problem := _safetensors_damage(file):
            return f"{name} {problem}"
    return None


def _safetensors_damage(file: Path) -> str | None:
    """For files without a recorded size: the safetensors layout itself (8-byte header length, JSON header, then
    the tensors' bytes up to the largest data offset) must account for the file's size exactly."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            return "has no valid safetensors header (garbage or truncated)"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "has no valid safetensors header (garbage or truncated)"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + length + end:
        return f"has {size} bytes where its header needs {8 + length + end} (truncated?)"
    return None


def intact_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of a run, from the one `latest` names down (None if there is none), and the
    newer damaged ones with their faults."""
    root = Path(run_dir) / CHECKPOINTS
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    named = latest_checkpoint(run_dir)
    if named in candidates:  # `latest` first, then the older ones
        candidates = candidates[candidates.index(named):]
    skipped = []
    for path in candidates:
        problem = damage(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def usable_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint to sample or evaluate from: the latest one, if it is intact; a CheckpointError that names the
    fault and the newest intact checkpoint otherwise (silently using older weights would surprise)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    problem = damage(path)
    if problem is None:
        return path
    good, _ = intact_checkpoint(run_dir)
    fix = (f"the newest intact checkpoint is {good.name}: `deepgm train ... --resume` continues from it, and removing "
           f"{path} makes it the one sampled" if good else "no intact checkpoint is left: train again")
    raise CheckpointError(f"checkpoint {path} is damaged: {problem}; {fix}")


def load_state(module: nn.Module, file: Path, state: dict[str, torch.Tensor]) -> None:
    """module.load_state_dict(state), with a checkpoint of another model reported as one clear error."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("tensors missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
        raise CheckpointError(f"{file} holds the weights of another model: {', '.join(parts)}; the run's "
                              "config.yaml and its checkpoint do not belong together (was a checkpoint copied in "
                              "from another run?)")
    module.load_state_dict(state)


def init_from(module: nn.Module, source: str | Path, which: str = "ema") -> list[str]:
    """Start `module` from the weights of another run (its latest intact checkpoint) or checkpoint directory: every
    tensor the two share by name and shape is copied; tensors only `module` has (a new input, such as a student's
    guidance-weight embedding) keep their initialisation and are returned. Tensors only the source has, or of
    another shape, are one clear error."""
    state = load_weights(source, which)
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("tensors this model lacks", unexpected), ("of another shape", shapes)) if v]
        raise CheckpointError(f"train.init_from: {source} holds weights this model cannot start from: "
                              f"{', '.join(parts)}; it needs the same network (model.net) as that run")
    module.load_state_dict(state, strict=False)
    return sorted(set(own) - set(state))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # a fresh contiguous CPU copy: safetensors refuses shared storage (tied weights) and device tensors
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in the order its state_dict numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; if that is missing, the newest complete one; None when there is none."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / "trainer.json").is_file():
            return named
    # trainer.json is written last, so its presence marks a complete directory; *.tmp are unfinished writes
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / "trainer.json").is_file())
    return done[-1] if done else None


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, ema_model: nn.Module,
                    optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator],
                    extra: dict | None = None, scaler: torch.amp.GradScaler | None = None,
                    ema_decay: float = 0.0, keep: int = 2) -> Path:
    """Write checkpoint `step` into run_dir/checkpoints atomically, point `latest` at it, prune to `keep` newest."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    save_file(_tensors(model.state_dict()), tmp / "model.safetensors", {"weights": "raw", "step": str(step)})
    save_file(_tensors(ema_model.state_dict()), tmp / "ema.safetensors",
              {"weights": "ema", "decay": str(ema_decay), "step": str(step)})

    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    opt_state = optimizer.state_dict()
    for index, name in enumerate(_param_names(model, optimizer)):
        for key, value in opt_state["state"].get(index, {}).items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{name}.{key}"] = value
            else:
                plain.setdefault(name, {})[key] = value
    for name, generator in generators.items():
        tensors[f"generator.{name}"] = generator.get_state()
    if scaler is not None and scaler.is_enabled():
        for key, value in scaler.state_dict().items():
            dtype = torch.int64 if isinstance(value, int) else torch.float64  # .item() gives the type back
            tensors[f"scaler.{key}"] = torch.tensor(value, dtype=dtype)
    save_file(_tensors(tensors), tmp / "trainer.safetensors", {"step": str(step)})

    record = {"step": step, **(extra or {}),
              "optimizer": {"param_groups": opt_state["param_groups"], "state": plain},
              "format_version": FORMAT_VERSION,
              "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                        for name in WEIGHT_FILES}}
    (tmp / "trainer.json").write_text(json.dumps(record, indent=2))  # last: marks the directory complete
    for f in tmp.iterdir():
        _fsync(f)

    if final.exists():  # an older copy of this step: move it aside (renames are atomic, rmtree is not)
        aside = root / f"{final.name}.old.tmp"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(tmp, final)
    _write_text_atomic(root / LATEST, final.name + "\n")
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, current: Path) -> None:
    """Keep the `keep` newest checkpoints (0 keeps all) and drop unfinished *.tmp writes."""
    for stale in root.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer,
                    generators: dict[str, torch.Generator], scaler: torch.amp.GradScaler | None = None,
                    verified: bool = False) -> dict:
    """Restore everything save_checkpoint wrote into the given objects; returns the trainer.json record.
    verified=True: the caller has just checked `damage(path)` (intact_checkpoint), so the files are not hashed again."""
    path = Path(path)
    problem = None if verified else damage(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    load_state(model, path / "model.safetensors", load_file(path / "model.safetensors"))
    load_state(ema_model, path / "ema.safetensors", load_file(path / "ema.safetensors"))
    record = json.loads((path / "trainer.json").read_text())
    tensors = load_file(path / "trainer.safetensors")

    names = _param_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, field = key[len("optimizer."):].rsplit(".", 1)
            state.setdefault(index[name], {})[field] = value
    for name, fields in record["optimizer"]["state"].items():
        state.setdefault(index[name], {}).update(fields)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in record["optimizer"]["param_groups"]]  # JSON turned tuples (betas) into lists
    optimizer.load_state_dict({"state": state, "param_groups": groups})

    for name, generator in generators.items():
        generator.set_state(tensors[f"generator.{name}"])
    if scaler is not None and scaler.is_enabled():
        scaler.load_state_dict({k[len("scaler."):]: v.item() for k, v in tensors.items() if k.startswith("scaler.")})
    return record


def load_weights(path: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """The EMA ("ema") or raw ("raw") weights of a checkpoint directory (or a run directory's latest one)."""
    if which not in ("ema", "raw"):
        raise ValueError(f"which must be 'ema' or 'raw', got {which!r}")
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        path = usable_checkpoint(path) or path / CHECKPOINTS
    elif (path / "trainer.json").is_file() and (problem := damage(path)):
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    file = path / ("ema.safetensors" if which == "ema" else "model.safetensors")
    if not file.is_file():
        raise FileNotFoundError(f"no {which} weights at {file}")
    return load_file(file)
