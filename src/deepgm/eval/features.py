"""A small classifier trained on the dataset itself, standing in for Inception where its weights can't be fetched.

On labelled data (digits) it predicts the class; on captioned scenes (deepgm.data.shapes) it has one head per
attribute (shape, colour, size, position of each object, their relation; an extra index for "absent"), which
text-to-image evaluation uses for alignment. Its penultimate features give FID either way."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from deepgm.eval.metrics import fid, precision_recall
from deepgm.files import atomic_write, write_json

FEATURE_DIM = 64
MEMO_ENTRIES = 16  # outputs a FeatureNet remembers (features are N x 64: small beside the images they stand for)
# changing these (or the architecture) changes the cache key, so stale weights are never reused
TRAIN_SETTINGS = {"arch": "digitcnn-v1", "epochs": 20, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4,
                  "shift": 1, "feature_dim": FEATURE_DIM, "width": 32}
# attributes: no random shifts (positions are attributes), fewer epochs over the larger scene sets
# trained on the 'evaluator' split (every colour-shape pair, so held-out combinations are read too); SiLU, not
# ReLU: ReLU left half the feature units dead on these scenes, a singular covariance that made FID explode.
# attrcnn-v4 (AttributeClassifier) replaced the digit CNN, which misread 16-24% of shapes at 32x32 (cross vs
# diamond, even large ones): 0.84 -> 0.997 shape accuracy at 32x32 in 6 epochs instead of 15
ATTRIBUTE_SETTINGS = {**TRAIN_SETTINGS, "arch": "attrcnn-v4", "epochs": 6, "shift": 0, "activation": "silu",
                      "train_split": "evaluator"}
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


class DigitClassifier(nn.Module):
    """Small CNN for (N, C, H, W) images in [-1, 1], H, W >= 8; `features` gives the penultimate activations.
    num_classes: one class count, or one per head (the logits of the heads side by side). stem_stride 2 (64x64
    images) lets the first conv see every pixel while the rest runs at half the resolution, at a quarter of the
    cost."""

    def __init__(self, in_channels: int = 1, num_classes: int | tuple[int, ...] = 10, width: int = 32,
                 feature_dim: int = FEATURE_DIM, activation: str = "relu", stem_stride: int = 1):
        super().__init__()
        self.heads = (num_classes,) if isinstance(num_classes, int) else tuple(num_classes)
        self.body = nn.Sequential(*self.layers(in_channels, width, feature_dim, ACTIVATIONS[activation], stem_stride))
        self.head = nn.Linear(feature_dim, sum(self.heads))

    @staticmethod
    def layers(in_channels: int, width: int, feature_dim: int, act: type[nn.Module], stem_stride: int):
        return [
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1), act(),
            nn.Conv2d(width, width, 3, padding=1), act(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), act(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), act(),
        ]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class AttributeClassifier(DigitClassifier):
    """The attribute reader for captioned scenes: the digit CNN two convolutions deeper, with batch norm. The
    digit CNN reads colour and position but not the shape of a 5-10 pixel object; depth and normalisation are
    what it lacked (see ATTRIBUTE_SETTINGS)."""

    @staticmethod
    def layers(in_channels: int, width: int, feature_dim: int, act: type[nn.Module], stem_stride: int):
        def conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), act()]

        w = width
        return [*conv(in_channels, w, stem_stride), *conv(w, w), nn.MaxPool2d(2),
                *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2), *conv(2 * w, 2 * w),
                nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * w * 16, feature_dim), act()]


CLASSIFIERS = {"digitcnn-v1": DigitClassifier, "attrcnn-v4": AttributeClassifier}


@dataclass
class FeatureNet:
    """A trained classifier (eval mode) plus what is known about it."""

    classifier: DigitClassifier
    test_accuracy: float  # attributes: the fraction of test scenes with every attribute the image shows right
    num_classes: int
    name: str
    from_cache: bool = False
    path: Path | None = None
    train_seconds: float | None = None
    attribute_names: tuple[str, ...] = ()  # one per head when the net predicts attributes
    attribute_accuracy: dict[str, float] | None = None
    # outputs by input content: every evaluation reads the same real images (a split, its first n) again
    _memo: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    @torch.no_grad()
    def _map(self, kind: str, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous()
        key = (kind, tuple(x.shape), hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest())
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        fn = self.classifier.features if kind == "features" else self.classifier
        device = next(self.classifier.parameters()).device
        out = torch.cat([fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
        self._memo[key] = out
        if len(self._memo) > MEMO_ENTRIES:
            self._memo.popitem(last=False)
        return out

    def features(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Feature vectors (N, F) of images (N, C, H, W) in [-1, 1]."""
        return self._map("features", x, batch_size)

    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class labels (N,); for an attribute net, attributes (N, A) with -1 where absent."""
        logits = self._map("logits", x, batch_size)
        if len(self.classifier.heads) == 1:
            return logits.argmax(dim=1)
        return _decode(logits, self.classifier.heads)


def _decode(logits: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    """Per head argmax; each head's last index means "absent", -1 as in Dataset.attributes."""
    out = [part.argmax(dim=1) for part in logits.split(heads, dim=1)]
    return torch.stack([torch.where(v == k - 1, -1, v) for v, k in zip(out, heads, strict=True)], dim=1)


def _encode(attributes: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    """Attributes (N, A) with -1 for absent -> head targets with the absent index last."""
    return torch.where(attributes < 0, torch.tensor(heads) - 1, attributes)


def _loss(logits: torch.Tensor, targets: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return sum(F.cross_entropy(part, targets[:, i]) for i, part in enumerate(logits.split(heads, dim=1)))


def _random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an independent random offset in [-shift, shift]^2 (edges replicated)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * shift)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return cropped.gather(3, cols)


def stem_stride(image_size: int) -> int:
    """The classifier's first stride: 2 from 64x64 up (its cost at 64x64 is then that of 32x32), else 1."""
    return 2 if image_size >= 64 else 1


def _train(train_x, train_y, num_classes: int | tuple[int, ...], seed: int, settings: dict) -> DigitClassifier:
    """train_y: labels (N,), or head targets (N, A) for a multi-head net."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLASSIFIERS[settings["arch"]](train_x.shape[1], num_classes, settings["width"],
                                              settings["feature_dim"], settings.get("activation", "relu"),
                                              stem_stride(train_x.shape[-1]))
    steps_per_epoch = -(-len(train_x) // settings["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings["lr"], total_steps=settings["epochs"] * steps_per_epoch)
    model.train()
    for _ in range(settings["epochs"]):
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(train_x), settings["batch_size"]):
            idx = order[i:i + settings["batch_size"]]
            x = _random_shift(train_x[idx], settings["shift"], generator) if settings["shift"] else train_x[idx]
            loss = _loss(model(x), train_y[idx], model.heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("DEEPGM_CACHE") or Path.home() / ".cache" / "deepgm")


def _load_cached(stem: Path, name: str) -> FeatureNet | None:
    meta_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (meta_path.is_file() and weights_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        s = meta["settings"]
        heads = tuple(meta["heads"]) if "heads" in meta else meta["num_classes"]
        model = CLASSIFIERS[s["arch"]](meta["in_channels"], heads, s["width"], s["feature_dim"],
                                       s.get("activation", "relu"), meta.get("stem_stride", 1))
        model.load_state_dict(load_file(weights_path))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None  # corrupt or from an incompatible version: retrain
    return FeatureNet(model.eval(), meta["test_accuracy"], meta["num_classes"], name, from_cache=True,
                      path=weights_path, train_seconds=meta.get("train_seconds"),
                      attribute_names=tuple(meta.get("attribute_names", ())),
                      attribute_accuracy=meta.get("attribute_accuracy"))


_LOADED: dict[tuple[Path, int | None], FeatureNet] = {}


def get_feature_net(dataset: str = "digits", dataset_options: dict | None = None,
                    cache_dir: str | Path | None = None, seed: int = 0) -> FeatureNet:
    """A classifier giving FID features for `dataset`: loaded from the cache, else trained on its train split."""
    from deepgm.data import load_dataset

    options = dict(dataset_options or {})
    attributes = dataset == "shapes"  # captioned scenes: one head per attribute
    settings = ATTRIBUTE_SETTINGS if attributes else TRAIN_SETTINGS
    key = json.dumps({"dataset": dataset, "options": options, "seed": seed, "settings": settings},
                     sort_keys=True, default=str)
    slug = "-".join([dataset, *(f"{k}{v}" for k, v in sorted(options.items())), f"seed{seed}"])
    root = _cache_dir(cache_dir)
    stem = root / f"featnet-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    weights = stem.with_suffix(".safetensors")
    version = (stem, weights.stat().st_mtime_ns if weights.is_file() else None)
    if version in _LOADED:  # one net per process, so its memory of real images' features lasts across evaluations
        return _LOADED[version]
    cached = _load_cached(stem, dataset)
    if cached is not None:
        _LOADED[version] = cached
        return cached

    train = load_dataset(dataset, settings.get("train_split", "train"), **options)
    test = load_dataset(dataset, "test", **options)
    if attributes:
        heads = tuple(len(train.attribute_values[name]) + 1 for name in train.attribute_names)  # + "absent"
        read = train.canonical or (lambda a: a)  # the order the image shows (objects in reading order)
        targets, names = _encode(read(train.attributes), heads), tuple(train.attribute_names)
    elif train.y is None or not train.num_classes or test.y is None:
        raise ValueError(f"FID feature network needs a labelled dataset; {dataset!r} has no class labels "
                         f"(use sliced_wasserstein for unlabelled or toy data)")
    else:
        heads, targets, names = train.num_classes, train.y, ()
    if not train.is_image or min(train.shape[1:]) < 8:
        raise ValueError(f"FID feature network needs images of at least 8x8, {dataset!r} has shape {train.shape}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is as fast unloaded and far faster on a busy machine
    try:
        start = time.perf_counter()
        model = _train(train.x, targets, heads, seed, settings)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    net = FeatureNet(model, 0.0, len(model.heads) if attributes else heads, dataset,
                     path=stem.with_suffix(".safetensors"), train_seconds=seconds, attribute_names=names)
    meta = {"dataset": dataset, "options": options, "seed": seed, "settings": settings,
            "num_classes": net.num_classes, "in_channels": train.shape[0], "image_shape": list(train.shape),
            "stem_stride": stem_stride(train.shape[-1]),
            "n_train": len(train), "n_test": len(test), "train_seconds": round(seconds, 3)}
    if attributes:
        right = net.predict(test.x) == read(test.attributes)  # (N, A)
        # an image shows its objects' cells, not which of two true relations (diagonal cells) its caption named
        shown = [i for i, name in enumerate(names) if name != "relation"]
        net.test_accuracy = float(right[:, shown].all(dim=1).double().mean())
        net.attribute_accuracy = {name: float(right[:, i].double().mean()) for i, name in enumerate(names)}
        meta.update(attribute_accuracy=net.attribute_accuracy, attribute_names=list(names), heads=list(heads))
    else:
        net.test_accuracy = float((net.predict(test.x) == test.y).double().mean())
    meta["test_accuracy"] = net.test_accuracy
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(stem.with_suffix(".safetensors"), lambda p: save_file(state, p))
    write_json(stem.with_suffix(".json"), meta)
    return net


def evaluate_samples(samples: torch.Tensor, feature_net: FeatureNet, real_train: torch.Tensor,
                     real_test: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """FID (samples vs test), the data's own FID floor (test vs train), precision/recall, and class accuracy."""
    fake, train, test = (feature_net.features(x) for x in (samples, real_train, real_test))
    precision, recall = precision_recall(test, fake)
    out = {"fid": fid(fake, test), "fid_floor": fid(test, train), "precision": precision, "recall": recall,
           "feature_net_test_accuracy": feature_net.test_accuracy}
    if labels is not None:
        predicted = feature_net.predict(samples)
        out["class_accuracy"] = float((predicted == labels.cpu().reshape(-1)).double().mean())
    return out
