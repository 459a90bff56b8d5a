"""Frozen pretrained text encoders for text-to-image models, loaded offline from PyPI weight packages.

    from deepgm.text import load_text_encoder
    encoder = load_text_encoder("minilm-l6")            # or "minilm-l3", "minilm-l6:2", "bow", a local directory
    emb = encoder.encode(["a red circle in the top left"])
    emb.tokens, emb.mask, emb.pooled                     # (B, 32, 384), (B, 32), (B, 384)

Needs the `text` extra: pip install -e '.[text]'. The encoder is a plain object, frozen, with a cache per token
sequence; keep it outside the trained network's state dict.
"""

from deepgm.text.convert import convert_onnx_minilm_l3
from deepgm.text.encoders import (
    ENCODERS,
    EncoderSpec,
    describe_encoders,
    encoder_label,
    keep_first_layers,
    load_text_encoder,
)
from deepgm.text.frozen import TextEmbedding, TextEncoder

__all__ = [
    "ENCODERS",
    "EncoderSpec",
    "TextEmbedding",
    "TextEncoder",
    "convert_onnx_minilm_l3",
    "describe_encoders",
    "encoder_label",
    "keep_first_layers",
    "load_text_encoder",
]
