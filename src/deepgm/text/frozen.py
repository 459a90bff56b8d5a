"""A frozen text encoder: fixed-length tokenization, a no-grad forward, and a cache per token sequence.

TextEncoder is a plain object, not an nn.Module, on purpose: assigned as an attribute of a network being
trained, it is not registered as a submodule, so its weights stay out of that network's state dict,
optimizer and `.to()` calls (move it with its own `to`).
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextEmbedding:
    """What a text encoder gives a conditional model."""

    tokens: torch.Tensor  # (B, L, D) float32: last hidden states, zeros at padded positions
    mask: torch.Tensor  # (B, L) bool: True at real tokens
    pooled: torch.Tensor  # (B, D) float32: masked mean of tokens (sentence-transformers' pooling)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _train_stays_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode (dropout off), and a `train()` that keeps it in eval mode even when a parent
    module calls it."""
    model.requires_grad_(False)
    model.eval()
    model.train = types.MethodType(_train_stays_eval, model)
    return model


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens (an all-padding row gives zeros, not NaN)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TextEncoder:
    """A pretrained text encoder, frozen forever.

    `model(input_ids=..., attention_mask=...)` must return the last hidden states, either as a tensor or as
    an output with `last_hidden_state` (every transformers encoder does).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer,
        dim: int,
        max_length: int = 32,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for the special tokens), got {max_length}")
        self.name = name
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.tokenizer = tokenizer
        self.model = freeze(model).to(device=device, dtype=torch.float32)
        self.device = torch.device(device)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        # id used at padded positions; the mask, not this id, says which positions are real
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"TextEncoder({self.name!r}, dim={self.dim}, max_length={self.max_length}, "
            f"num_parameters={self.num_parameters:,}, device={self.device})"
        )

    # --- frozen: these mirror nn.Module so the encoder can stand where a module is expected ---
    @property
    def training(self) -> bool:
        return False

    def train(self, mode: bool = True) -> TextEncoder:
        """Stays in eval mode whatever `mode` is: a frozen encoder never runs dropout."""
        self.model.eval()
        return self

    def eval(self) -> TextEncoder:
        self.model.eval()
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the model and the cached embeddings."""
        self.device = torch.device(device)
        self.model.to(self.device)
        self._cache = {k: (t.to(self.device), p.to(self.device)) for k, (t, p) in self._cache.items()}
        return self

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    # --- text to tensors ---
    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, max_length) long and mask (B, max_length) bool, padded to the fixed max_length.

        Captions are never truncated: one too long for max_length is an error, since a silently cut caption
        would condition on the wrong text.
        """
        if isinstance(captions, str):
            raise TypeError("tokenize takes a list of captions, not one string: wrap it as [caption]")
        captions = list(captions)
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise ValueError(f"caption {i} is a {type(caption).__name__}, not a str: {caption!r}")
            if not caption.strip():
                raise ValueError(f"caption {i} is empty ({caption!r}): every caption needs at least one word")
        ids = torch.full((len(captions), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), self.max_length), dtype=torch.bool)
        if not captions:
            return ids, mask
        rows = self.tokenizer(captions, add_special_tokens=True)["input_ids"]
        for i, (caption, row) in enumerate(zip(captions, rows, strict=True)):
            if len(row) > self.max_length:
                raise ValueError(
                    f"caption {i} ({caption!r}) has {len(row)} tokens (special tokens included) but {self.name} "
                    f"was loaded with max_length={self.max_length}: shorten the caption or load the encoder "
                    f"with max_length>={len(row)}"
                )
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        """Tokenize and embed."""
        return self.embed(*self.tokenize(captions))

    def __call__(self, captions: Sequence[str]) -> TextEmbedding:
        return self.encode(captions)

    # --- the frozen forward ---
    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbedding:
        """Embeddings of token sequences, each computed once: cache misses go through the model in batches."""
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(f"ids and mask must both be (B, L); got {tuple(ids.shape)} and {tuple(mask.shape)}")
        ids = ids.detach().to("cpu", torch.long)
        mask = mask.detach().to("cpu", torch.bool)
        # the key holds the length too (through the byte count), so different paddings never collide
        keys = [ids[i].numpy().tobytes() + mask[i].numpy().tobytes() for i in range(ids.shape[0])]
        missing: dict[bytes, int] = {}
        for row, key in enumerate(keys):
            if key not in self._cache and key not in missing:
                missing[key] = row
        rows = list(missing.values())
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            tokens, pooled = self._forward(ids[chunk], mask[chunk])
            for j, row in enumerate(chunk):
                # only up to the row's last real token: a 10-token caption costs 10 positions, not max_length
                self._cache[keys[row]] = (tokens[j, : _real_length(mask[row])].clone(), pooled[j].clone())
        tokens = torch.zeros(len(keys), ids.shape[1], self.dim, device=self.device)
        pooled = torch.zeros(len(keys), self.dim, device=self.device)
        for i, key in enumerate(keys):
            row_tokens, pooled[i] = self._cache[key]
            tokens[i, : len(row_tokens)] = row_tokens
        return TextEmbedding(tokens=tokens, mask=mask.to(self.device), pooled=pooled)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, used, D), zero at padding, and their masked mean; `used` ends at the last real
        token of any row. The trailing all-padding columns are cut before the forward: real positions do not
        attend to padding, so their outputs are unchanged, and captions ~3x shorter than max_length run ~3x
        faster."""
        used = max(_real_length(mask.any(0)), 1)
        ids, mask = ids[:, :used].to(self.device), mask[:, :used].to(self.device)
        # no_grad, not inference_mode: inference tensors could not be saved for backward by the network
        # that consumes these embeddings; autocast off, so that what the cache holds is the float32 embedding
        # whichever precision the caller trains or samples in
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            out = self.model(input_ids=ids, attention_mask=mask.long())
            hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
            hidden = hidden.float() * mask.unsqueeze(-1)  # padded positions carry nothing
            return hidden, masked_mean(hidden, mask)


def _real_length(mask_row: torch.Tensor) -> int:
    """One past the last True (0 for none): the prefix that holds every real token."""
    real = mask_row.nonzero()
    return int(real.max()) + 1 if len(real) else 0
