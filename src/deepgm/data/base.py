"""The in-memory dataset every model trains on, and the registry that names them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Dataset:
    """Examples held as one tensor; images live in [-1, 1] as (N, C, H, W), vectors as (N, D).

    `levels` is the number of discrete values per dimension (17 for digits, 256 for 8-bit images);
    None means continuous data. Bits/dim conversions read it, so it is never hidden in code. `log_prob` is the
    exact log density of the data's distribution where it is known (the toy mixtures), for pictures and checks.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor | None = None
    levels: int | None = None
    num_classes: int | None = None
    log_prob: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    # captioned data (text-to-image): one caption per example and its exact attributes, (N, A) integers whose
    # column a is attribute_names[a] and whose value v names attribute_values[attribute_names[a]][v] (-1: absent)
    captions: list[str] | None = field(default=None, repr=False)
    attributes: torch.Tensor | None = field(default=None, repr=False)
    attribute_names: tuple[str, ...] = ()
    attribute_values: dict[str, list[str]] = field(default_factory=dict, repr=False)
    # attributes -> the order an image shows them in (what a classifier can read), and (read, caption's) -> per
    # kind of attribute, (N,) bool: does the image show what the caption says (deepgm.data.shapes.agreement)
    canonical: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    agreement: Callable[[torch.Tensor, torch.Tensor], dict] | None = field(default=None, repr=False)
    # per-example tensors a model's condition derived from the data (e.g. caption token ids): in every batch
    extras: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> DataSpec:
        """What a model needs to know of the data, without the data."""
        return DataSpec(self.name, self.shape, self.levels, self.num_classes)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4

    def subset(self, index: torch.Tensor) -> Dataset:
        """The examples at `index` as a Dataset of their own, every per-example field sliced alike."""
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda v: None if v is None else v[index]  # noqa: E731
        return dataclasses.replace(
            self, x=self.x[index], y=pick(self.y), attributes=pick(self.attributes),
            captions=None if self.captions is None else [self.captions[i] for i in index.tolist()],
            extras={k: v[index] for k, v in self.extras.items()})

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at `index` as a batch dict with keys x (and y when labelled, and the extras)."""
        out = {"x": self.x[index]}
        if self.y is not None:
            out["y"] = self.y[index]
        out.update({key: v[index] for key, v in self.extras.items()})
        return out


@dataclass(frozen=True)
class DataSpec:
    """One example's shape, the number of discrete levels and of classes: all a model is built from. A run's
    config.yaml records it (section `resolved`), so loading a run for sampling does not need its dataset."""

    name: str
    shape: tuple[int, ...]
    levels: int | None = None
    num_classes: int | None = None

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "levels": self.levels, "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        return cls(d["name"], tuple(int(v) for v in d["shape"]), d.get("levels"), d.get("num_classes"))


_REGISTRY: dict[str, Callable[..., Dataset]] = {}
_SPLITS: dict[str, tuple[str, ...]] = {}


def register(name: str, splits: tuple[str, ...] = ("train", "test")):
    """Decorator that makes a loader `fn(split, **options) -> Dataset` available as `data: name`; `splits` are
    the splits it has (every dataset has 'train' and 'test'; held-out splits come on top)."""

    def wrap(fn):
        _REGISTRY[name], _SPLITS[name] = fn, tuple(splits)
        return fn

    return wrap


def load_dataset(name: str, split: str = "train", **options) -> Dataset:
    """Load a dataset by registry name; split is 'train', 'test' or one of the dataset's held-out splits."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_REGISTRY)}")
    if split not in _SPLITS[name]:
        raise ValueError(f"dataset {name!r} has splits {list(_SPLITS[name])}, not {split!r}")
    try:
        return _REGISTRY[name](split, **options)
    except TypeError as err:  # an option the loader does not take
        raise ValueError(f"bad options for dataset {name!r}: {err}") from None


def dataset_splits(name: str) -> tuple[str, ...]:
    """The splits of a registered dataset: 'train', 'test' and any held-out ones."""
    if name not in _SPLITS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_REGISTRY)}")
    return _SPLITS[name]


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)
