"""Procedural captioned scenes for text-to-image: one or two coloured shapes on a dark 3x3 grid, with captions
from a small grammar of templates and synonyms.

Every caption names every attribute it is judged on: size, colour and shape of each object, and the object's
cell (one object) or the relation between the two (two objects). Two held-out splits measure generalisation:
'test-combos' holds colour-shape pairs (HELD_OUT_PAIRS) that no other split contains, and 'test-phrasings' uses
synonyms and templates (the second entry of each SYNONYMS / TEMPLATES pair) that no other split's captions use;
each of those contains a word that is not in the training vocabulary, so a bag-of-words encoder cannot
shortcut them. Example i of a split depends only on (seed, split, i), never on n.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from deepgm.data.base import Dataset, register

# 'evaluator': scenes over every colour-shape pair, for training evaluation networks (the attribute classifier
# must read held-out combinations too); never for training a generative model
SPLITS = ("train", "test", "test-combos", "test-phrasings", "evaluator")
DEFAULT_N = {"train": 20000, "test": 2000, "test-combos": 2000, "test-phrasings": 2000, "evaluator": 20000}
SIZES_ALLOWED = (8, 16, 32, 64)
LEVELS = 256

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
# saturated and far apart in RGB (the closest pair, blue-cyan, is ~150 apart), so colour survives 8x8
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 255),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 230),
}
OBJECT_SIZES = ("small", "large")
POSITIONS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
RELATIONS = ("left of", "right of", "above", "below")  # object 0 is <relation> object 1
BACKGROUND = (10, 10, 10)
# object extent as a fraction of its grid cell
EXTENT = {"small": 0.45, "large": 0.85}
CROSS_ARM = 1 / 3  # arm thickness of the cross as a fraction of its extent

ATTRIBUTE_NAMES = (
    "n_objects", "shape0", "colour0", "size0", "position0", "shape1", "colour1", "size1", "position1", "relation",
)
_KIND_VALUES = {"n_objects": ("one", "two"), "shape": SHAPES, "colour": tuple(COLOURS), "size": OBJECT_SIZES,
                "position": POSITIONS, "relation": RELATIONS}
# n_objects: 'one' or 'two'; every other column names the value of its kind ('colour1' -> a colour)
ATTRIBUTE_VALUES = {name: list(_KIND_VALUES[name.rstrip("01")]) for name in ATTRIBUTE_NAMES}
COLUMN = {name: a for a, name in enumerate(ATTRIBUTE_NAMES)}

# colour-shape pairs seen only in 'test-combos': one per shape, at most one per colour, so every colour and
# shape still appears in training with four other partners
HELD_OUT_PAIRS = (("green", "triangle"), ("blue", "square"), ("red", "diamond"), ("yellow", "circle"),
                  ("magenta", "cross"))

Choices = tuple[tuple[str, ...], tuple[str, ...]]  # (training items, held-out items)
# kind -> value -> (training phrases, held-out phrases); no phrase of one value occurs inside another's
SYNONYMS: dict[str, dict[str, Choices]] = {
    "size": {
        "small": (("small", "tiny"), ("little",)),
        "large": (("large", "big"), ("huge",)),
    },
    "colour": {
        "red": (("red", "crimson"), ("scarlet",)),
        "green": (("green", "lime"), ("emerald",)),
        "blue": (("blue", "cobalt"), ("azure",)),
        "yellow": (("yellow", "golden"), ("lemon",)),
        "magenta": (("magenta", "purple"), ("fuchsia",)),
        "cyan": (("cyan", "turquoise"), ("aqua",)),
    },
    "shape": {
        "circle": (("circle", "ball", "round shape"), ("disc",)),
        "square": (("square", "box"), ("block",)),
        "triangle": (("triangle",), ("pyramid",)),
        "cross": (("cross", "plus"), ("cruciform",)),
        "diamond": (("diamond", "rhombus"), ("lozenge",)),
    },
    "position": {
        "top-left": (("in the top left", "at the top left"), ("in the upper left",)),
        "top": (("in the top middle", "at the top centre"), ("in the upper middle",)),
        "top-right": (("in the top right", "at the top right"), ("in the upper right",)),
        "left": (("on the left", "at the left side"), ("on the far left",)),
        "centre": (("in the centre", "in the middle"), ("in the very middle",)),
        "right": (("on the right", "at the right side"), ("on the far right",)),
        "bottom-left": (("in the bottom left", "at the bottom left"), ("in the lower left",)),
        "bottom": (("in the bottom middle", "at the bottom centre"), ("in the lower middle",)),
        "bottom-right": (("in the bottom right", "at the bottom right"), ("in the lower right",)),
    },
    "relation": {
        "left of": (("to the left of", "left of"), ("west of",)),
        "right of": (("to the right of", "right of"), ("east of",)),
        "above": (("above", "on top of"), ("over",)),
        "below": (("below", "under"), ("beneath",)),
    },
}

# {a}, {b}: noun phrases with their article ("a big red ball"); {pos}: a position phrase; {rel}: a relation
TEMPLATES = {
    "one": (
        ("{a} {pos}", "there is {a} {pos}", "{pos}, {a}", "{pos} there is {a}", "a picture of {a} {pos}",
         "{a} sits {pos}"),
        ("you can see {a} {pos}", "{pos} lies {a}", "an image showing {a} {pos}"),
    ),
    "two": (
        ("{a} {rel} {b}", "there is {a} {rel} {b}", "a picture of {a} {rel} {b}", "{a} placed {rel} {b}",
         "{b}, and {a} {rel} it"),
        ("you can see {a} {rel} {b}", "{a} located {rel} {b}", "an image showing {a} {rel} {b}"),
    ),
}


# ---------------------------------------------------------------------------------------------- scenes


def kind_of(column: str) -> str:
    """The synonym table a column draws from: 'shape1' -> 'shape'."""
    return column.rstrip("01")


def _value(row: Sequence[int], column: str) -> str | None:
    """The value name of one column of an attribute row, None where absent."""
    v = int(row[COLUMN[column]])
    return None if v < 0 else ATTRIBUTE_VALUES[column][v]


def objects(row: Sequence[int]) -> list[dict[str, str]]:
    """The objects of an attribute row as dicts with keys shape, colour, size, position."""
    count = 1 if _value(row, "n_objects") == "one" else 2
    return [{kind: _value(row, f"{kind}{k}") for kind in ("shape", "colour", "size", "position")} for k in range(count)]


def has_held_out_pair(row: Sequence[int]) -> bool:
    """Whether any object of the scene is one of the colour-shape pairs kept for 'test-combos'."""
    return any((obj["colour"], obj["shape"]) in HELD_OUT_PAIRS for obj in objects(row))


def _cell(position: int) -> tuple[int, int]:
    return divmod(position, 3)  # (row, column) on the grid


def relations_between(position0: int, position1: int) -> list[str]:
    """Every relation 'object 0 <relation> object 1' that holds between two distinct cells."""
    (r0, c0), (r1, c1) = _cell(position0), _cell(position1)
    holds = {"left of": c0 < c1, "right of": c0 > c1, "above": r0 < r1, "below": r0 > r1}
    return [rel for rel in RELATIONS if holds[rel]]


_OBJECT_KINDS = ("shape", "colour", "size", "position")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def canonical(attributes: torch.Tensor) -> torch.Tensor:
    """Attribute rows with the two objects of a scene in reading order (object 0 in the earlier cell) and the
    relation turned with them: what an image alone determines, so what a classifier can be trained to read."""
    out = attributes.clone()
    swap = (out[:, COLUMN["n_objects"]] == 1) & (out[:, COLUMN["position0"]] > out[:, COLUMN["position1"]])
    for kind in _OBJECT_KINDS:
        a, b = COLUMN[f"{kind}0"], COLUMN[f"{kind}1"]
        out[swap, a], out[swap, b] = attributes[swap, b], attributes[swap, a]
    inverse = torch.tensor([RELATIONS.index(_INVERSE[r]) for r in RELATIONS])
    rel = COLUMN["relation"]
    out[swap, rel] = inverse[attributes[swap, rel]]
    return out


def agreement(predicted: torch.Tensor, wanted: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per kind of attribute, (N,) bool: does an image whose attributes a classifier read as `predicted`
    (canonical order) show what a caption with attributes `wanted` says? Two-object captions name objects by
    shape, colour and size and one relation between them, not their cells: the named objects are matched to the
    read ones (in the order that agrees best) and the relation must hold between the cells they were read in.
    Kinds a caption does not name count as agreeing."""
    wanted = canonical(wanted)
    n_right = predicted[:, COLUMN["n_objects"]] == wanted[:, COLUMN["n_objects"]]
    two = wanted[:, COLUMN["n_objects"]] == 1
    cols = {kind: [COLUMN[f"{kind}0"], COLUMN[f"{kind}1"]] for kind in _OBJECT_KINDS}
    named = ("shape", "colour", "size")
    same = {k: predicted[:, cols[k]] == wanted[:, cols[k]] for k in named}  # (N, 2) in order
    crossed = {k: predicted[:, cols[k][::-1]] == wanted[:, cols[k]] for k in named}  # read objects swapped
    score = lambda m: sum(m[k].sum(1) for k in named)  # noqa: E731
    pos = predicted[:, cols["position"]]
    holds_same, holds_crossed = _relation_holds(wanted, pos, two), _relation_holds(wanted, pos.flip(1), two)
    # the matching that agrees on more named attributes; on a tie (two alike objects), the one the relation allows
    flip = two & ((score(crossed) > score(same)) | ((score(crossed) == score(same)) & holds_crossed & ~holds_same))
    out = {"n_objects": n_right}
    for k in named:
        matched = torch.where(flip[:, None], crossed[k], same[k])
        out[k] = matched[:, 0] & (matched[:, 1] | ~two)
    out["position"] = two | (predicted[:, COLUMN["position0"]] == wanted[:, COLUMN["position0"]])
    out["relation"] = ~two | torch.where(flip, holds_crossed, holds_same)
    return out


def _relation_holds(wanted: torch.Tensor, cells: torch.Tensor, two: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the caption's relation 'object 0 <rel> object 1' holds between the read cells (N, 2)."""
    holds = torch.zeros_like(two)
    for i in torch.nonzero(two & (cells >= 0).all(1) & (cells[:, 0] != cells[:, 1])).flatten().tolist():
        relation = RELATIONS[int(wanted[i, COLUMN["relation"]])]
        holds[i] = relation in relations_between(int(cells[i, 0]), int(cells[i, 1]))
    return holds


def _sample_pair(rng: np.random.Generator, held_out: bool | None) -> tuple[int, int]:
    """(colour, shape) indices: a held-out pair, one of the pairs seen in training, or (None) any pair."""
    pairs = _ALL_PAIRS if held_out is None else HELD_OUT_PAIRS if held_out else _SEEN_PAIRS
    colour, shape = pairs[rng.integers(len(pairs))]
    return list(COLOURS).index(colour), SHAPES.index(shape)


_ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
_SEEN_PAIRS = tuple(pair for pair in _ALL_PAIRS if pair not in HELD_OUT_PAIRS)


def sample_scene(rng: np.random.Generator, two_objects: float = 0.5, combos: bool = False,
                 any_pair: bool = False) -> list[int]:
    """One attribute row: cells drawn without replacement; with `combos` exactly one object is a held-out pair,
    with `any_pair` every object is any colour-shape pair."""
    count = 2 if rng.random() < two_objects else 1
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    held_out_index = rng.integers(count) if combos else -1
    row = [-1] * len(ATTRIBUTE_NAMES)
    row[COLUMN["n_objects"]] = count - 1
    for k in range(count):
        colour, shape = _sample_pair(rng, held_out=None if any_pair else k == held_out_index)
        row[COLUMN[f"shape{k}"]], row[COLUMN[f"colour{k}"]] = shape, colour
        row[COLUMN[f"size{k}"]] = int(rng.integers(len(OBJECT_SIZES)))
        row[COLUMN[f"position{k}"]] = int(cells[k])
    if count == 2:
        candidates = relations_between(int(cells[0]), int(cells[1]))
        row[COLUMN["relation"]] = RELATIONS.index(candidates[rng.integers(len(candidates))])
    return row


# ---------------------------------------------------------------------------------------------- rendering

_BASE = 64  # every scene is drawn at 64x64 first, then box-filtered to the requested size
_SUPER = 4  # ... and that at 4x (256x256) box-filtered to 64: exact 16-sample anti-aliasing


def geometry(obj: dict[str, str]) -> tuple[float, float, float]:
    """Centre (x, y) and extent (side of the bounding box) of an object, in pixels of the 64x64 scene."""
    row, col = _cell(POSITIONS.index(obj["position"]))
    cell = _BASE / 3
    return (col + 0.5) * cell, (row + 0.5) * cell, EXTENT[obj["size"]] * cell


def _outline(shape: str, cx: float, cy: float, extent: float) -> list[list[tuple[float, float]]]:
    """Polygons (continuous coordinates) of a non-circular shape of side `extent` centred at (cx, cy)."""
    h = extent / 2
    if shape == "square":
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":  # apex up: half the bounding box, centroid extent/6 below its centre
        return [[(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "diamond":
        return [[(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]]
    if shape == "cross":
        t = extent * CROSS_ARM / 2
        return [[(cx - h, cy - t), (cx + h, cy - t), (cx + h, cy + t), (cx - h, cy + t)],
                [(cx - t, cy - h), (cx + t, cy - h), (cx + t, cy + h), (cx - t, cy + h)]]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, str], offset: tuple[int, int] = (0, 0)) -> None:
    """Draw an object on a 4x canvas whose pixel (0, 0) is pixel `offset` of the full 4x scene."""
    cx, cy, extent = (v * _SUPER for v in geometry(obj))
    # Pillow truncates coordinates to whole pixels and fills both ends, so unshifted coordinates keep a shape
    # centred (to a fraction of a 4x pixel); its area comes out about one 4x pixel wider and taller
    dx, dy = offset
    fill = COLOURS[obj["colour"]]
    if obj["shape"] == "circle":
        h = extent / 2
        draw.ellipse([cx - h - dx, cy - h - dy, cx + h - dx, cy + h - dy], fill=fill)
        return
    for polygon in _outline(obj["shape"], cx, cy, extent):
        draw.polygon([(x - dx, y - dy) for x, y in polygon], fill=fill)


def _object_patch(obj: dict[str, str]) -> tuple[int, int, np.ndarray]:
    """The object on background, box-filtered to 64-scale pixels: (left, top, (h, w, 3) uint8).

    Drawing only the object's own box (its edges on multiples of 4 at 4x) is the same as drawing the whole
    canvas and filtering it, at a tenth of the pixels.
    """
    cx, cy, extent = geometry(obj)
    reach = extent / 2 + 1  # a pixel of slack around the bounding box for Pillow's edge pixels
    left, top = max(0, int(np.floor(cx - reach))), max(0, int(np.floor(cy - reach)))
    right, bottom = min(_BASE, int(np.ceil(cx + reach))), min(_BASE, int(np.ceil(cy + reach)))
    width, height = right - left, bottom - top
    patch = Image.new("RGB", (width * _SUPER, height * _SUPER), BACKGROUND)
    _draw_object(ImageDraw.Draw(patch), obj, offset=(left * _SUPER, top * _SUPER))
    return left, top, np.asarray(patch.resize((width, height), Image.Resampling.BOX))


def render_uint8(row: Sequence[int], size: int = 16) -> np.ndarray:
    """The scene of an attribute row as 8-bit RGB, (size, size, 3): drawn at 256, box-filtered to 64, then to size."""
    _check_size(size)
    scene = np.empty((_BASE, _BASE, 3), dtype=np.uint8)
    scene[:] = BACKGROUND
    for obj in objects(row):
        left, top, patch = _object_patch(obj)
        region = scene[top : top + patch.shape[0], left : left + patch.shape[1]]
        # objects sit in different cells, so a patch only overlaps another's background; and every colour
        # channel is brighter than the background, so the maximum keeps exactly the object's pixels
        np.maximum(region, patch, out=region)
    if size == _BASE:
        return scene
    return np.array(Image.fromarray(scene).resize((size, size), Image.Resampling.BOX))  # writable, for torch


def _to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """8-bit (..., H, W, 3) to float (..., 3, H, W) in [-1, 1] on the 256-level grid -1 + 2 v / 255."""
    channels_first = torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3)
    x = torch.empty(channels_first.shape, dtype=torch.float32)
    x.copy_(channels_first)  # in place from here: at 64x64 the training split is a gigabyte of floats
    return x.mul_(2 / (LEVELS - 1)).sub_(1)


def render(row: Sequence[int], size: int = 16) -> torch.Tensor:
    """The scene of an attribute row as a float image (3, size, size) in [-1, 1]."""
    return _to_unit_range(render_uint8(row, size))


# ---------------------------------------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, choices: Choices, phrasing: str) -> tuple[str, bool]:
    """A phrase and whether it is held out; 'train' phrasing draws only training phrases, 'test' from both."""
    seen, held_out = choices
    pool = seen if phrasing == "train" else seen + held_out
    k = int(rng.integers(len(pool)))
    return pool[k], k >= len(seen)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(row: Sequence[int], rng: np.random.Generator, phrasing: str = "train") -> str:
    """A caption naming every object's size, colour and shape, and its cell (one object) or the relation (two).

    phrasing='train' uses only training synonyms and templates; 'test' mixes in the held-out ones and always
    uses at least one of them (drawing again until it does).
    """
    if phrasing not in ("train", "test"):
        raise ValueError(f"phrasing must be 'train' or 'test', got {phrasing!r}")
    while True:
        text, used_held_out = _compose(row, rng, phrasing)
        if phrasing == "train" or used_held_out:
            return text


def _compose(row: Sequence[int], rng: np.random.Generator, phrasing: str) -> tuple[str, bool]:
    """One draw of the grammar: the caption and whether any held-out item went into it."""
    picks = []  # (phrase, held out) of every slot, the template last

    def pick(choices):
        picks.append(_pick(rng, choices, phrasing))
        return picks[-1][0]

    slots = {}
    for key, obj in zip("ab", objects(row), strict=False):
        noun_phrase = " ".join(pick(SYNONYMS[kind][obj[kind]]) for kind in ("size", "colour", "shape"))
        slots[key] = _article(noun_phrase)
    if "b" in slots:
        slots["rel"] = pick(SYNONYMS["relation"][_value(row, "relation")])
        template = pick(TEMPLATES["two"])
    else:
        slots["pos"] = pick(SYNONYMS["position"][_value(row, "position0")])
        template = pick(TEMPLATES["one"])
    return template.format(**slots), any(held for _, held in picks)


def words(text: str) -> list[str]:
    """The words of a caption or phrase, lower case, punctuation and template slots dropped."""
    return re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text.lower()))


def vocabulary(phrasing: str = "train") -> set[str]:
    """Every word a caption of this phrasing can contain ('train': training items only; 'test': all)."""
    index = (0,) if phrasing == "train" else (0, 1)
    tables = [*SYNONYMS["size"].values(), *SYNONYMS["colour"].values(), *SYNONYMS["shape"].values(),
              *SYNONYMS["position"].values(), *SYNONYMS["relation"].values(), *TEMPLATES.values()]
    phrases = [p for table in tables for i in index for p in table[i]]
    # the article comes from _article, in front of a size word
    articles = {_article(p).split()[0] for table in SYNONYMS["size"].values() for i in index for p in table[i]}
    return set(words(" ".join(phrases))) | articles


# ---------------------------------------------------------------------------------------------- the dataset


def _check_size(size: int) -> None:
    if size not in SIZES_ALLOWED:
        raise ValueError(f"shapes size must be one of {SIZES_ALLOWED}, got {size!r}")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example `index`: independent of n, and of the other splits."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def sample_example(seed: int, split: str, index: int, two_objects: float = 0.5) -> tuple[list[int], str]:
    """The attribute row and caption of example `index` of a split."""
    rng = _rng(seed, split, index)
    row = sample_scene(rng, two_objects, combos=split == "test-combos", any_pair=split == "evaluator")
    return row, caption(row, rng, phrasing="test" if split == "test-phrasings" else "train")


@register("shapes", splits=SPLITS)
def load_shapes(
    split: str = "train", size: int = 16, n: int | None = None, seed: int = 0, two_objects: float = 0.5
) -> Dataset:
    """Captioned scenes as (N, 3, size, size) in [-1, 1] on 256 levels, with captions and attribute rows.

    n defaults to 20000 for 'train' and 2000 for each test split; `two_objects` is the probability of a
    two-object scene. Rendering 20000 scenes takes seconds, so nothing is cached.
    """
    if split not in SPLITS:
        raise ValueError(f"shapes has splits {list(SPLITS)}, not {split!r}")
    _check_size(size)
    n = DEFAULT_N[split] if n is None else int(n)
    if n < 1:
        raise ValueError(f"shapes n must be positive, got {n}")
    if not 0 <= two_objects <= 1:
        raise ValueError(f"shapes two_objects is a probability, got {two_objects}")
    examples = [sample_example(seed, split, i, two_objects) for i in range(n)]
    rows = [row for row, _ in examples]
    pixels = np.stack([render_uint8(row, size) for row in rows])
    return Dataset(
        name="shapes",
        x=_to_unit_range(pixels),
        levels=LEVELS,
        num_classes=None,
        captions=[text for _, text in examples],
        attributes=torch.tensor(rows, dtype=torch.long),
        attribute_names=ATTRIBUTE_NAMES,
        attribute_values={name: list(values) for name, values in ATTRIBUTE_VALUES.items()},
        canonical=canonical,
        agreement=agreement,
    )
