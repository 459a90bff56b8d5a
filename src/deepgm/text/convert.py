"""paraphrase-MiniLM-L3-v2: from the ONNX file on PyPI to a transformers BertModel directory, once.

The ONNX export keeps the BERT parameter names for embeddings, biases and LayerNorms but stores each linear
layer's weight as an anonymous `onnx::MatMul_N` initializer, transposed. Each such weight feeds a MatMul
whose output goes to an Add with the layer's named bias, so its name is read off that bias.

The converted model is checked against onnxruntime on a few captions before the directory is published; the
directory is written under a temporary name and renamed, so a reader sees all of it or none of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

from deepgm.files import file_sha256
from deepgm.text.weights import cache_root, minilm_l3_onnx, minilm_l6_dir, quiet_transformers, require_transformers

ONNX_PREFIX = "model.0.auto_model."  # sentence-transformers module 0 wraps the BertModel as `auto_model`
# Not stored in the weights; paraphrase-MiniLM-L3-v2's config has 12 heads of 32 (a wrong count would fail
# the onnxruntime check below).
NUM_ATTENTION_HEADS = 12
CHECK_CAPTIONS = (
    "a red circle in the top left",
    "two small blue squares next to a large green triangle",
    "an empty canvas",
)
CHECK_TOLERANCE = 1e-4
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def minilm_l3_cache_dir() -> Path:
    return cache_root() / "text" / "minilm-l3"


def onnx_bert_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """The BertModel state dict (no pooler) held by the ONNX file's initializers."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith(ONNX_PREFIX):
            state[name[len(ONNX_PREFIX) :]] = torch.from_numpy(array.copy())
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(ONNX_PREFIX):
            continue
        bias = _bias_after(node, consumers, arrays)
        key = bias[len(ONNX_PREFIX) : -len("bias")] + "weight"
        # MatMul computes x @ W with W (in, out); nn.Linear stores (out, in)
        state[key] = torch.from_numpy(arrays[node.input[1]].T.copy())

    unused = [n for n in arrays if not n.startswith(ONNX_PREFIX) and not _is_matmul_weight(n, graph)]
    if unused:
        raise ValueError(f"{onnx_path}: initializers not mapped to BertModel parameters: {unused[:5]}")
    return state


def _is_matmul_weight(name: str, graph) -> bool:
    return any(node.op_type == "MatMul" and node.input[1] == name for node in graph.node)


def _bias_after(matmul, consumers: dict, arrays: dict) -> str:
    for node in consumers.get(matmul.output[0], []):
        if node.op_type == "Add":
            named = [i for i in node.input if i in arrays and i.startswith(ONNX_PREFIX) and i.endswith(".bias")]
            if named:
                return named[0]
    raise ValueError(f"MatMul weight {matmul.input[1]} is not followed by an Add of a named bias")


def bert_config_from_state(state: dict[str, torch.Tensor]):
    """A BertConfig whose sizes are read off the weights (all but the head count)."""
    transformers = require_transformers()
    vocab_size, hidden_size = state["embeddings.word_embeddings.weight"].shape
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=len(layers),
        num_attention_heads=NUM_ATTENTION_HEADS,
        intermediate_size=state["encoder.layer.0.intermediate.dense.bias"].shape[0],
        max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
        hidden_act="gelu",  # the graph uses Erf: exact GELU
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )


def onnxruntime_hidden_states(onnx_path: str | Path, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The ONNX model's last hidden states (its one rank-3 output) for token ids and mask."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.long().numpy(), "attention_mask": mask.long().numpy()}
    outputs = session.run(None, feeds)
    hidden = [out for out in outputs if out.ndim == 3]
    if len(hidden) != 1:
        raise ValueError(f"{onnx_path}: expected one (B, L, D) output, got shapes {[o.shape for o in outputs]}")
    return hidden[0]


def max_abs_diff_to_onnx(model, tokenizer, onnx_path: str | Path, captions=CHECK_CAPTIONS) -> float:
    """Largest |difference| between the model's and onnxruntime's last hidden states at the real tokens."""
    batch = tokenizer(list(captions), padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    reference = torch.from_numpy(onnxruntime_hidden_states(onnx_path, ids, mask))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    return float((ours - reference)[mask].abs().max())


def convert_onnx_minilm_l3(out_dir: str | Path, onnx_path: str | Path | None = None, replace: bool = True) -> Path:
    """Write paraphrase-MiniLM-L3-v2 as a transformers directory (config.json, model.safetensors, the
    tokenizer, conversion.json) at out_dir, after checking it against onnxruntime. Returns out_dir.

    An existing out_dir is replaced, or with replace=False kept (another process converted first)."""
    transformers = require_transformers()
    onnx_path = Path(onnx_path) if onnx_path is not None else minilm_l3_onnx()
    out_dir = Path(out_dir)
    tokenizer_dir = minilm_l6_dir()

    state = onnx_bert_state_dict(onnx_path)
    config = bert_config_from_state(state)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dict(model.named_buffers())]  # position ids are rebuilt
    if missing or unexpected:
        raise ValueError(f"{onnx_path}: missing BertModel parameters {missing}, unexpected {unexpected}")

    with quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"the MiniLM-L6 tokenizer has {len(tokenizer)} tokens but the ONNX embedding matrix has "
            f"{config.vocab_size} rows: it is not the vocabulary this model was trained with"
        )
    diff = max_abs_diff_to_onnx(model, tokenizer, onnx_path)
    if not diff < CHECK_TOLERANCE:
        raise ValueError(f"converted MiniLM-L3 differs from onnxruntime by {diff:.3g} (tolerance {CHECK_TOLERANCE})")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".", suffix=".tmp"))
    try:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
        record = {
            "source": str(onnx_path),
            "source_sha256": file_sha256(onnx_path),
            "tokenizer_from": str(tokenizer_dir),
            "check_captions": list(CHECK_CAPTIONS),
            "max_abs_diff_vs_onnxruntime": diff,
        }
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2))
        _publish(tmp, out_dir, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def converted_minilm_l3_dir() -> Path:
    """The converted MiniLM-L3 directory in the cache, converting on first use."""
    directory = minilm_l3_cache_dir()
    if not (directory / "model.safetensors").is_file():
        convert_onnx_minilm_l3(directory, replace=False)
    return directory


def _publish(tmp: Path, out_dir: Path, replace: bool) -> None:
    """Rename tmp to out_dir; an existing out_dir is moved aside first (renames are atomic, rmtree is not)."""
    aside = None
    if out_dir.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if out_dir.exists():
        aside = out_dir.with_name(f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, aside)
    os.replace(tmp, out_dir)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
