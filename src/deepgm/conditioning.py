"""Conditions with owners: each key of `cond` has one object that takes it from a batch, knows its null value,
drops it for classifier-free guidance, says what n samples are conditioned on, and builds the network's reader.

A model's `Conditioning` is the set of its conditions. Networks turn `cond` into one `Context` (a vector added to
the time embedding, tokens for cross-attention, an image concatenated to the input), so a new condition is a new
`Condition` subclass and, at most, a new kind of block that reads the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Context:
    """What the network reads from `cond`: vector (B, E) added to the time embedding, image (B, C, H, W)
    concatenated to x_t; tokens (B, L, D) with mask (B, L) for cross-attention."""

    vector: torch.Tensor | None = None
    image: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class Condition:
    """One key of `cond`. Subclasses set `key`, `kind` ('vector', 'image' or 'tokens') and `droppable` (whether
    classifier-free guidance drops it), and implement the methods below."""

    key: str = ""
    kind: str = "vector"
    droppable: bool = True
    needs_examples: bool = False  # True: samples take their values from data (captions, images), no default

    def prepare(self, data) -> None:
        """Derive what batches need from a dataset, once (e.g. token ids of its captions into data.extras)."""

    def from_batch(self, batch: dict) -> torch.Tensor:
        """The condition's value for a training batch."""
        if self.key not in batch:
            raise ValueError(f"the model is conditioned on {self.key!r} but the batch has only {sorted(batch)}")
        return batch[self.key]

    def null(self, value: torch.Tensor) -> torch.Tensor:
        """The "no condition" value of the same batch size as `value`."""
        raise NotImplementedError

    def drop(self, value: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
        """Replace each example's value by the null value with probability p."""
        if p <= 0 or not self.droppable:
            return value
        drop = torch.rand(value.shape[:1], generator=generator, device=value.device) < p  # (B,)
        return torch.where(drop.reshape(-1, *([1] * (value.dim() - 1))), self.null(value), value)

    def for_samples(self, start: int, n: int, device=None) -> torch.Tensor:
        """The default value for samples start, ..., start + n - 1 (depends on the sample's index only)."""
        raise NotImplementedError

    def reader(self, dim: int) -> nn.Module:
        """The network module that maps a value to this condition's part of the Context (width `dim`)."""
        raise NotImplementedError

    def check(self, value: torch.Tensor, batch: int) -> None:
        """A clear error for a value of the wrong size or range."""
        if value.shape[0] != batch:
            raise ValueError(f"cond[{self.key!r}] has {value.shape[0]} entries for a batch of {batch}")

    def spec(self) -> dict:
        """What config.yaml records to rebuild this condition."""
        raise NotImplementedError


class _LabelEmbedding(nn.Embedding):
    """Class embedding whose last row is the "no label" token."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return super().forward(y.long())


class ClassLabel(Condition):
    """An integer class y in [0, K); K itself is the "no label" token of classifier-free guidance."""

    key, kind = "y", "vector"

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)

    def null(self, value: torch.Tensor) -> torch.Tensor:
        return torch.full_like(value, self.num_classes)

    def for_samples(self, start: int, n: int, device=None) -> torch.Tensor:
        return torch.arange(start, start + n, device=device) % self.num_classes  # the classes in turn

    def reader(self, dim: int) -> nn.Module:
        return _LabelEmbedding(self.num_classes + 1, dim)

    def check(self, value: torch.Tensor, batch: int) -> None:
        super().check(value, batch)
        if value.dtype.is_floating_point or value.dim() != 1:
            raise ValueError(f"class labels must be a 1-D integer tensor, got {value.dtype} of shape "
                             f"{tuple(value.shape)}")
        if not torch.compiler.is_compiling() and len(value) and (value.min() < 0 or value.max() > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] (index {self.num_classes} means 'no "
                             f"label'); got values in [{int(value.min())}, {int(value.max())}]")

    def spec(self) -> dict:
        return {"kind": "class", "num_classes": self.num_classes}


class ImageCondition(Condition):
    """An image concatenated to the network's input channels (e.g. an upsampled low-resolution image);
    never dropped by guidance; its null value is zeros."""

    kind, droppable, needs_examples = "image", False, True

    def __init__(self, channels: int, key: str = "cond_image"):
        self.channels, self.key = int(channels), key

    def null(self, value: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(value)

    def for_samples(self, start: int, n: int, device=None) -> torch.Tensor:
        raise ValueError(f"samples of a model conditioned on an image need cond[{self.key!r}] given explicitly")

    def reader(self, dim: int) -> nn.Module:
        return nn.Identity()

    def check(self, value: torch.Tensor, batch: int) -> None:
        super().check(value, batch)
        if value.dim() != 4 or value.shape[1] != self.channels:
            raise ValueError(f"cond[{self.key!r}] must have shape (B, {self.channels}, H, W), got "
                             f"{tuple(value.shape)}")

    def spec(self) -> dict:
        return {"kind": "image", "channels": self.channels, "key": self.key}


class LowResImage(ImageCondition):
    """The low-resolution image a super-resolution model refines, held in `cond` already upsampled to the model's
    size (bilinear), so that noise-conditioning augmentation noises it at the resolution the network reads (as
    imagen-pytorch does). In training it is derived from the batch's own images: box-filtered down to `low_size`
    (the filter deepgm.data.shapes renders lower resolutions with), then upsampled back."""

    key = "low_res"

    def __init__(self, channels: int, low_size: int, size: int):
        super().__init__(channels, key="low_res")
        if low_size < 1 or size <= low_size or size % low_size:
            raise ValueError(f"a super-resolution stage needs a low resolution that divides its own: low_res="
                             f"{low_size} does not divide {size} (or is not smaller)")
        self.low_size, self.size = int(low_size), int(size)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, size, size) -> (B, C, low_size, low_size) by averaging each block (a box filter)."""
        return F.avg_pool2d(x, self.size // self.low_size)

    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        """(B, C, low_size, low_size) -> (B, C, size, size), bilinear: what the network reads."""
        if low.dim() != 4 or low.shape[1] != self.channels or tuple(low.shape[2:]) != (self.low_size,) * 2:
            raise ValueError(f"this super-resolution stage upsamples ({self.channels}, {self.low_size}, "
                             f"{self.low_size}) images, got shape {tuple(low.shape[1:])}")
        return F.interpolate(low, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def from_batch(self, batch: dict) -> torch.Tensor:
        if self.key in batch:
            return batch[self.key]
        return self.upsample(self.downsample(batch["x"]))

    def check(self, value: torch.Tensor, batch: int) -> None:
        super().check(value, batch)
        if tuple(value.shape[2:]) != (self.size, self.size):
            raise ValueError(f"cond['low_res'] is the low-resolution image upsampled to {self.size}x{self.size}, "
                             f"got {tuple(value.shape[2:])}; upsample it with LowResImage.upsample")

    def spec(self) -> dict:
        return {"kind": "low_res", "channels": self.channels, "low_size": self.low_size, "size": self.size}


class _TokenRefiner(nn.Module):
    """Trainable pre-norm transformer layers over a caption's projected tokens (B, L, D) with mask (B, L): a text
    transformer trained with the image model, as in GLIDE, on top of the frozen encoder. Meant to let the tokens say
    which object the relation puts where, which a linear projection may hide from the U-Net's queries; on captioned
    shapes 2 or 4 layers did not lift two-object captions within 5,000 steps (README). A learned token is always
    attended to, so a caption with no tokens (guidance's null condition) stays well defined."""

    def __init__(self, dim: int, layers: int, heads: int = 4):
        super().__init__()
        self.register = nn.Parameter(torch.zeros(1, 1, dim))
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        h = torch.cat([self.register.expand(b, 1, -1).to(tokens.dtype), tokens], dim=1)
        pad = ~torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        return self.norm(h[:, 1:])


class _TextReader(nn.Module):
    """Runs the condition's frozen encoder (held outside this module, so outside the state dict and the EMA) and
    projects its output: the pooled embedding to the time embedding's width, the tokens to `dim` for
    cross-attention, then through the condition's trainable transformer layers, if any. A caption with no tokens
    (the null value) reads as zeros with an all-False mask."""

    def __init__(self, condition: TextCondition, dim: int):
        super().__init__()
        self._condition = condition  # a plain attribute: not a submodule
        width = condition.encoder_dim
        self.pooled = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim)) if condition.pooled else None
        self.tokens = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.refiner = _TokenRefiner(dim, condition.layers) if condition.layers else None

    def forward(self, ids: torch.Tensor) -> Context:
        text = self._condition.embed(ids)
        device = self.tokens[1].weight.device
        mask = text.mask.to(device)
        tokens = self.tokens(text.tokens.to(device))
        if self.refiner is not None:
            tokens = self.refiner(tokens, mask)
        tokens = tokens * mask[..., None]
        if self.pooled is None:
            return Context(tokens=tokens, mask=mask)
        pooled = self.pooled(text.pooled.to(device)) * mask.any(1, keepdim=True)  # null caption: no pooled vector
        return Context(vector=pooled, tokens=tokens, mask=mask)


class TextCondition(Condition):
    """A caption, held in `cond` as token ids (B, L) of a frozen pretrained text encoder (deepgm.text), padded
    with the encoder's pad id. The network reads the encoder's token embeddings (cross-attention) and its pooled
    embedding (added to the time embedding; `pooled=False` leaves it out, so the caption reaches the network only
    through cross-attention). The null value, for dropout and guidance, is the caption with no tokens at all. The
    encoder loads on first use, from the installed package or local path it is named by."""

    key, kind, needs_examples = "text", "tokens", True

    def __init__(self, encoder: str = "minilm-l6", max_length: int = 32, encoder_dim: int | None = None,
                 pooled: bool = True, layers: int = 0):
        self.encoder_name, self.max_length, self.pooled = str(encoder), int(max_length), bool(pooled)
        self.layers = int(layers)
        self._encoder = None
        self._dim = encoder_dim

    @property
    def encoder(self):
        if self._encoder is None:
            from deepgm.text import load_text_encoder  # the run layer and the nets do not need deepgm.text

            self._encoder = load_text_encoder(self.encoder_name, max_length=self.max_length)
        return self._encoder

    @property
    def encoder_dim(self) -> int:
        if self._dim is None:
            self._dim = self.encoder.dim
        return self._dim

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids (B, max_length) of captions (clear errors for empty or too long ones)."""
        ids, mask = self.encoder.tokenize(list(captions))
        return torch.where(mask, ids, torch.full_like(ids, self.pad_id))

    @property
    def pad_id(self) -> int:
        return int(self.encoder.pad_id)

    def embed(self, ids: torch.Tensor):
        """The frozen encoder's TextEmbedding of token ids (cached per caption by the encoder)."""
        mask = ids != self.pad_id
        return self.encoder.embed(ids.cpu(), mask.cpu())

    def prepare(self, data) -> None:
        """Tokenize a captioned dataset once: its ids go into every batch under this condition's key."""
        if data.captions is None:
            raise ValueError(f"a text-conditioned model needs captioned data; {data.name!r} has no captions")
        if self.key not in data.extras:
            data.extras[self.key] = self.tokenize(data.captions)

    def null(self, value: torch.Tensor) -> torch.Tensor:
        return torch.full_like(value, self.pad_id)

    def for_samples(self, start: int, n: int, device=None) -> torch.Tensor:
        raise ValueError("samples of a text-conditioned model need captions: pass cond={'text': "
                         "condition.tokenize(captions)}, or use `deepgm generate RUN \"a caption\"`")

    def reader(self, dim: int) -> nn.Module:
        return _TextReader(self, dim)

    def check(self, value: torch.Tensor, batch: int) -> None:
        super().check(value, batch)
        if value.dtype.is_floating_point or value.dim() != 2:
            raise ValueError(f"cond[{self.key!r}] must be token ids of shape (B, L), got {value.dtype} of shape "
                             f"{tuple(value.shape)}; tokenize captions with TextCondition.tokenize")

    def spec(self) -> dict:
        return {"kind": "text", "encoder": self.encoder_name, "max_length": self.max_length,
                "encoder_dim": self.encoder_dim, "pooled": self.pooled, "layers": self.layers}


class _ScalarEmbedding(nn.Module):
    """Sinusoidal features of a scalar and a two-layer MLP whose last layer starts at zero, so the input has no
    effect until trained: a student built from a teacher without this input starts out as exactly that teacher,
    and a super-resolution model trained without augmentation ignores the level it is told."""

    def __init__(self, dim: int, scale: float, features: int = 32):
        super().__init__()
        self.features, self.scale = features, scale
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        from deepgm.nets.embeddings import timestep_embedding

        # timestep_embedding scales by 1000 for t in [0, 1]; `scale` maps the value's range into [0, 1]
        weight = self.mlp[0].weight
        return self.mlp(timestep_embedding(value / self.scale, self.features, dtype=weight.dtype))


class ScalarCondition(Condition):
    """A number per example that the network reads through a _ScalarEmbedding (zero-initialised, so it has no effect
    until trained); never dropped by guidance; `default` where a batch or a sample has none. Subclasses set key,
    default, scale (the range mapped into [0, 1] for the embedding), `what` and `valid`."""

    kind, droppable = "vector", False
    default, scale, what, valid_range = 0.0, 1.0, "values", "valid"

    def valid(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_batch(self, batch: dict) -> torch.Tensor:
        if self.key in batch:
            return batch[self.key]
        return torch.full((len(batch["x"]),), self.default, dtype=torch.float32, device=batch["x"].device)

    def null(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def for_samples(self, start: int, n: int, device=None) -> torch.Tensor:
        return torch.full((n,), self.default, device=device)

    def reader(self, dim: int) -> nn.Module:
        return _ScalarEmbedding(dim, scale=self.scale)

    def check(self, value: torch.Tensor, batch: int) -> None:
        super().check(value, batch)
        if not value.dtype.is_floating_point or value.dim() != 1:
            raise ValueError(f"cond[{self.key!r}] must be a 1-D float tensor of {self.what}, got {value.dtype} of "
                             f"shape {tuple(value.shape)}")
        if not torch.compiler.is_compiling() and not bool(self.valid(value).all()):
            raise ValueError(f"{self.what} cond[{self.key!r}] must be {self.valid_range}")


class NoiseAugmentation(ScalarCondition):
    """The level s in [0, 1] of noise-conditioning augmentation (Ho et al. 2021, "Cascaded diffusion models";
    Saharia et al. 2022): the low-resolution image is noised with the model's own forward kernel at time s, and
    the network is told s. Training draws s ~ U[0, max_level] per example (DiffusionModel.augment); sampling uses
    the plan's level. max_level = 0 trains without augmentation (the ablation)."""

    key, default, scale, what, valid_range = "aug", 0.0, 1.0, "augmentation levels", "in [0, 1]"

    def __init__(self, max_level: float):
        if not 0 <= max_level <= 1:
            raise ValueError(f"the augmentation level is a diffusion time in [0, 1]; max_augmentation={max_level}")
        self.max_level = float(max_level)

    def valid(self, value: torch.Tensor) -> torch.Tensor:
        return (value >= 0) & (value <= 1)

    def spec(self) -> dict:
        return {"kind": "augmentation", "max_level": self.max_level}


class GuidanceWeight(ScalarCondition):
    """The classifier-free guidance weight w as an input of the network (Meng et al. 2023, "On distillation of
    guided diffusion models", sec. 3.1): a student distilled from a guided teacher takes w and gives the guided
    prediction in one evaluation. The default is w = 1 (the conditional model): training data has no w, and a
    distillation objective draws the weights it trains on."""

    key, default, scale, what, valid_range = "w", 1.0, 10.0, "guidance weights", "finite and >= 0"

    def valid(self, value: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(value) & (value >= 0)

    def spec(self) -> dict:
        return {"kind": "guidance"}


CONDITIONS = {"class": lambda s: ClassLabel(s["num_classes"]),
              "image": lambda s: ImageCondition(s["channels"], s.get("key", "cond_image")),
              "text": lambda s: TextCondition(s.get("encoder", "minilm-l6"), s.get("max_length", 32),
                                              s.get("encoder_dim"), s.get("pooled", True),
                                              s.get("layers", 0)),
              "low_res": lambda s: LowResImage(s["channels"], s["low_size"], s["size"]),
              "augmentation": lambda s: NoiseAugmentation(s["max_level"]),
              "guidance": lambda s: GuidanceWeight()}


class Conditioning:
    """The conditions of one model, by key (possibly none)."""

    def __init__(self, conditions: list[Condition] | tuple[Condition, ...] = ()):
        self.conditions = {c.key: c for c in conditions}
        if len(self.conditions) != len(conditions):
            raise ValueError("two conditions share a key")

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def __contains__(self, key: str) -> bool:
        return key in self.conditions

    def __getitem__(self, key: str) -> Condition:
        return self.conditions[key]

    @property
    def keys(self) -> list[str]:
        return list(self.conditions)

    @property
    def guidable(self) -> bool:
        """Whether classifier-free guidance has anything to drop."""
        return any(c.droppable for c in self.conditions.values())

    def prepare(self, data):
        """The dataset with what each condition derives from it (token ids of captions); returns it."""
        for c in self.conditions.values():
            c.prepare(data)
        return data

    def from_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        return {key: c.from_batch(batch) for key, c in self.conditions.items()}

    def drop(self, cond: dict, p: float, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        return {key: self.conditions[key].drop(v, p, generator) for key, v in cond.items()}

    def null(self, cond: dict) -> dict[str, torch.Tensor]:
        """cond with every droppable condition replaced by its null value (what guidance compares against)."""
        return {key: self.conditions[key].null(v) if self.conditions[key].droppable else v for key, v in cond.items()}

    def for_samples(self, start: int, n: int, device=None) -> dict[str, torch.Tensor]:
        """The default values of the conditions that have one (class labels in turn)."""
        return {key: c.for_samples(start, n, device) for key, c in self.conditions.items() if not c.needs_examples}

    def for_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """cond for one sample per caption: the token ids of each text condition (clear errors for empty or too
        long captions, or a model that reads no text)."""
        text = [c for c in self.conditions.values() if c.kind == "tokens"]
        if not text:
            what = f"its conditions are {self.keys}" if self else "it is unconditional"
            raise ValueError(f"this model is not text-conditioned ({what}); sample it with `deepgm sample`")
        if not captions:
            raise ValueError("give at least one caption")
        return {c.key: c.tokenize(list(captions)) for c in text}

    def examples(self, data, n: int, start: int = 0) -> dict[str, torch.Tensor]:
        """Values for samples start, ..., start + n - 1 of the conditions without a default, from the (prepared)
        data's examples in order (cycled): e.g. the test captions for an evaluation, the training captions for a
        preview."""
        wanted = [c for c in self.conditions.values() if c.needs_examples]
        if not wanted:
            return {}
        batch = data.batch(torch.arange(start, start + n) % len(data))
        return {c.key: c.from_batch(batch) for c in wanted}

    def check(self, cond: dict | None, batch: int) -> dict[str, torch.Tensor]:
        """cond as a dict with known keys and well-formed values; missing keys get their null value only if
        the condition has one that needs no example (the caller passes what it has)."""
        cond = dict(cond or {})
        unknown = sorted(set(cond) - set(self.conditions))
        if unknown:
            what = f"it takes {self.keys}" if self else "it is unconditional"
            raise ValueError(f"this model has no condition(s) {unknown}; {what}")
        for key, value in cond.items():
            self.conditions[key].check(value, batch)
        return cond

    def spec(self) -> list[dict]:
        return [c.spec() for c in self.conditions.values()]

    @classmethod
    def from_spec(cls, spec: list[dict] | None) -> Conditioning:
        out = []
        for s in spec or []:
            if s.get("kind") not in CONDITIONS:
                raise ValueError(f"unknown condition kind {s.get('kind')!r}; choose one of {sorted(CONDITIONS)}")
            out.append(CONDITIONS[s["kind"]](s))
        return cls(out)


class ContextReader(nn.Module):
    """Builds a network's Context from `cond`: the readers of the model's conditions, created once."""

    def __init__(self, conditioning: Conditioning, dim: int):
        super().__init__()
        self.conditioning = conditioning
        self.readers = nn.ModuleDict({key: c.reader(dim) for key, c in conditioning.conditions.items()})

    def forward(self, cond: dict, batch: int) -> Context:
        """Missing conditions read as their null value where one exists without an example (class labels)."""
        cond = self.conditioning.check(cond, batch)
        vectors, images, tokens, masks = [], [], [], []
        for key, c in self.conditioning.conditions.items():
            value = cond.get(key)
            if value is None:
                if c.kind != "vector":
                    raise ValueError(f"this network is conditioned on {key!r} ({c.kind}): pass {key}=")
                value = c.null(c.for_samples(0, batch, self.device))
            out = self.readers[key](value)
            if c.kind == "vector":
                vectors.append(out)
            elif c.kind == "image":
                images.append(out)
            else:  # tokens: a Context of its own (tokens, mask and a pooled vector)
                tokens.append(out.tokens)
                masks.append(out.mask)
                if out.vector is not None:
                    vectors.append(out.vector)
        return Context(vector=sum(vectors) if vectors else None, image=torch.cat(images, dim=1) if images else None,
                       tokens=torch.cat(tokens, dim=1) if tokens else None,
                       mask=torch.cat(masks, dim=1) if masks else None)

    @property
    def device(self):
        p = next(self.parameters(), None)
        return p.device if p is not None else None
