"""Captioned shapes scenes: pixels agree with the attributes, captions name them, held-out splits hold out."""

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from deepgm.data import load_dataset, shapes
from deepgm.data.shapes import ATTRIBUTE_VALUES, COLOURS, HELD_OUT_PAIRS, SHAPES, SYNONYMS, TEMPLATES

BACKGROUND = np.array(shapes.BACKGROUND, dtype=np.float64)
PALETTE = {name: np.array(rgb, dtype=np.float64) for name, rgb in COLOURS.items()}
# area of each shape over the square of its extent
AREA_FRACTION = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}


@pytest.fixture(scope="module")
def train():
    return load_dataset("shapes", "train", n=3000, size=16)


@pytest.fixture(scope="module")
def train64():
    return load_dataset("shapes", "train", n=300, size=64)


@pytest.fixture(scope="module")
def phrasings():
    return load_dataset("shapes", "test-phrasings", n=500, size=8)


def one_object(shape, colour="red", size="large", position="centre"):
    """An attribute row of a one-object scene, by value names."""
    row = [-1] * len(shapes.ATTRIBUTE_NAMES)
    for column, value in (("n_objects", "one"), ("shape0", shape), ("colour0", colour), ("size0", size),
                          ("position0", position)):
        row[shapes.COLUMN[column]] = ATTRIBUTE_VALUES[column].index(value)
    return row


def named(dataset, i):
    """Example i's attributes as {column: value name}, absent columns left out."""
    row = dataset.attributes[i].tolist()
    return {c: ATTRIBUTE_VALUES[c][v] for c, v in zip(dataset.attribute_names, row, strict=True) if v >= 0}


def pixels(dataset, i):
    """Example i as float RGB 0..255, (H, W, 3)."""
    return ((dataset.x[i] + 1) * 127.5).permute(1, 2, 0).double().numpy()


def centroid(weight):
    """(x, y) centroid of a (H, W) weight map, in pixel units with pixel centres at i + 0.5."""
    ys, xs = np.mgrid[: weight.shape[0], : weight.shape[1]] + 0.5
    return (weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()


def foreground(img):
    """How far each pixel is from the background (max over channels), (H, W)."""
    return np.abs(img - BACKGROUND).max(-1)


def coverage(img, colour):
    """Per-pixel fraction of the colour over the background, from projecting onto background -> colour."""
    c = PALETTE[colour] - BACKGROUND
    return np.clip((img - BACKGROUND) @ c / (c @ c), 0, 1)


def nearest_colour(rgb, names=tuple(COLOURS)):
    return min(names, key=lambda name: np.linalg.norm(rgb - PALETTE[name]))


def cell_of(x, y, size):
    return 3 * int(y // (size / 3)) + int(x // (size / 3))


def mentioned(caption, kind):
    """Values of a kind whose phrases (training or held-out) occur in the caption as whole words."""
    return {value for value, (seen, held) in SYNONYMS[kind].items()
            if any(re.search(rf"\b{re.escape(p)}\b", caption) for p in seen + held)}


# ---------------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("size", [16, 64])
def test_one_object_lies_in_its_cell_with_its_colour(size, train, train64):
    data = train if size == 16 else train64
    checked = 0
    for i in range(300):
        a = named(data, i)
        if a["n_objects"] != "one":
            continue
        img = pixels(data, i)
        weight = foreground(img)
        assert cell_of(*centroid(weight), size) == shapes.POSITIONS.index(a["position0"]), (i, a)
        core = weight > 0.6 * weight.max()  # mostly-covered pixels, so the mix with background stays small
        assert nearest_colour(img[core].mean(0)) == a["colour0"], (i, a)
        checked += 1
    assert checked > 100


def test_two_objects_stand_in_their_relation(train64):
    checked = 0
    for i in range(len(train64)):
        a = named(train64, i)
        if a["n_objects"] != "two" or a["colour0"] == a["colour1"]:
            continue
        img = pixels(train64, i)
        bright = foreground(img) > 60
        distance = np.stack([np.linalg.norm(img - PALETTE[a[f"colour{k}"]], axis=-1) for k in (0, 1)])
        owner = distance.argmin(0)  # each pixel goes to the nearer of the two stated colours
        (x0, y0), (x1, y1) = (centroid(bright & (owner == k)) for k in (0, 1))
        holds = {"left of": x0 < x1 - 10, "right of": x0 > x1 + 10, "above": y0 < y1 - 10, "below": y0 > y1 + 10}
        assert holds[a["relation"]], (i, a, (x0, y0), (x1, y1))
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("position", ["centre", "top-left", "bottom-right"])
@pytest.mark.parametrize("shape", SHAPES)
def test_shape_area_and_centroid_match_its_geometry(shape, position):
    """At 64x64 a large shape covers its analytic fraction of extent^2, and sits where geometry() says."""
    img = shapes.render_uint8(one_object(shape, position=position), 64).astype(np.float64)
    cover = coverage(img, "red")
    cx, cy, extent = shapes.geometry({"shape": shape, "colour": "red", "size": "large", "position": position})
    assert cover.sum() / extent**2 == pytest.approx(AREA_FRACTION[shape], rel=0.1)
    x, y = centroid(cover)
    below = extent / 6 if shape == "triangle" else 0.0  # a triangle's centroid is a third up from its base
    assert x == pytest.approx(cx, abs=0.25) and y == pytest.approx(cy + below, abs=0.25)


@pytest.mark.parametrize("shape", SHAPES)
def test_large_covers_clearly_more_than_small(shape):
    area = {size: coverage(shapes.render_uint8(one_object(shape, size=size), 64).astype(float), "red").sum()
            for size in ("small", "large")}
    assert area["large"] > 2.5 * area["small"]  # (0.85 / 0.45)^2 = 3.6 by construction


def test_large_shapes_differ_at_16():
    images = {shape: shapes.render(one_object(shape), 16) for shape in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (images[a] - images[b]).abs().sum() > 2.0, (a, b)  # ~ a few pixels fully different


def test_patch_rendering_equals_drawing_the_whole_canvas():
    for i in range(100):
        row, _ = shapes.sample_example(3, "train", i)
        canvas = Image.new("RGB", (256, 256), shapes.BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        for obj in shapes.objects(row):
            shapes._draw_object(draw, obj)
        whole = np.asarray(canvas.resize((64, 64), Image.Resampling.BOX))
        np.testing.assert_array_equal(shapes.render_uint8(row, 64), whole)


# ---------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize("split", ["train", "test-phrasings"])
def test_captions_name_exactly_the_stated_attributes(split, train, phrasings):
    data = train if split == "train" else phrasings
    for i in range(500):
        a, text = named(data, i), data.captions[i]
        k = (0,) if a["n_objects"] == "one" else (0, 1)
        for kind in ("shape", "colour", "size"):
            assert mentioned(text, kind) == {a[f"{kind}{j}"] for j in k}, (text, a, kind)
        if a["n_objects"] == "one":
            assert mentioned(text, "position") == {a["position0"]} and not mentioned(text, "relation"), (text, a)
        else:
            assert mentioned(text, "relation") == {a["relation"]} and not mentioned(text, "position"), (text, a)


def test_synonym_tables_are_unambiguous():
    """No phrase of one value occurs inside a phrase of another value of the same kind."""
    for kind, table in SYNONYMS.items():
        for u, (seen_u, held_u) in table.items():
            for v, (seen_v, held_v) in table.items():
                if u != v:
                    for p in seen_u + held_u:
                        hits = [q for q in seen_v + held_v if re.search(rf"\b{re.escape(p)}\b", q)]
                        assert not hits, (kind, p, hits)


def test_two_object_relation_follows_the_cells(train):
    for i in range(500):
        a = named(train, i)
        if a["n_objects"] == "two":
            (r0, c0), (r1, c1) = (divmod(shapes.POSITIONS.index(a[f"position{k}"]), 3) for k in (0, 1))
            holds = {"left of": c0 < c1, "right of": c0 > c1, "above": r0 < r1, "below": r0 > r1}
            assert holds[a["relation"]], a
        else:
            assert all(f"{kind}1" not in a for kind in ("shape", "colour", "size", "position")) and "relation" not in a


# ---------------------------------------------------------------------------------------------- held-out splits


def pairs_of(data):
    """(colour, shape) of every object of every example, one set per example."""
    out = []
    for i in range(len(data)):
        a = named(data, i)
        out.append({(a[f"colour{k}"], a[f"shape{k}"]) for k in (0, 1) if f"shape{k}" in a})
    return out


def test_held_out_pairs_never_outside_test_combos(train, phrasings):
    held = set(HELD_OUT_PAIRS)
    test = load_dataset("shapes", "test", n=500, size=8)
    for data in (train, test, phrasings):
        assert not any(p & held for p in pairs_of(data)), data.name
    # every other pair still turns up in training, so each colour and shape is seen with four partners
    seen = set().union(*pairs_of(train))
    assert seen == {(c, s) for c in COLOURS for s in SHAPES} - held


def test_every_combos_scene_has_a_held_out_pair():
    combos = load_dataset("shapes", "test-combos", n=300, size=8)
    found = [p & set(HELD_OUT_PAIRS) for p in pairs_of(combos)]
    assert all(found)
    assert set().union(*found) == set(HELD_OUT_PAIRS)


def words(text):
    return set(re.findall(r"[a-z]+", text))


def test_held_out_phrasings_use_words_training_never_shows(train, phrasings):
    train_words = set().union(*(words(t) for t in train.captions))
    assert train_words <= shapes.vocabulary("train")
    combos = load_dataset("shapes", "test-combos", n=300, size=8)
    assert set().union(*(words(t) for t in combos.captions)) <= shapes.vocabulary("train")
    for text in phrasings.captions:
        assert words(text) - shapes.vocabulary("train"), text
    assert set().union(*(words(t) for t in phrasings.captions)) - train_words


def test_every_held_out_item_has_a_new_word():
    """So a bag-of-words encoder cannot read a held-out synonym or template as a training one."""
    known = shapes.vocabulary("train")
    items = [p for table in SYNONYMS.values() for _, held in table.values() for p in held]
    items += [t for _, held in TEMPLATES.values() for t in held]
    for item in items:
        assert shapes.words(item) and set(shapes.words(item)) - known, item


def test_test_phrasings_use_held_out_templates_and_synonyms(phrasings):
    held_templates = [t for _, held in TEMPLATES.values() for t in held]
    # a held-out template's fixed words, e.g. "you can see": some caption starts with each opening
    openings = {t.split("{")[0].strip() for t in held_templates if not t.startswith("{")}
    for opening in openings:
        assert any(text.startswith(opening) for text in phrasings.captions), opening
    held_synonyms = {p for table in SYNONYMS.values() for _, held in table.values() for p in held}
    used = {p for p in held_synonyms if any(re.search(rf"\b{re.escape(p)}\b", t) for t in phrasings.captions)}
    assert len(used) > 0.8 * len(held_synonyms)


# ---------------------------------------------------------------------------------------------- the loader


def test_same_seed_split_index_gives_the_same_example():
    for split in ("train", "test-phrasings"):
        small, large = (load_dataset("shapes", split, n=n, size=16) for n in (10, 50))
        torch.testing.assert_close(small.x, large.x[:10], rtol=0, atol=0)
        assert small.captions == large.captions[:10]
        assert torch.equal(small.attributes, large.attributes[:10])
    other = load_dataset("shapes", "train", n=10, size=16, seed=1)
    assert other.captions != small.captions and not torch.equal(other.x, small.x)
    test = load_dataset("shapes", "test", n=10, size=16)
    assert test.captions != load_dataset("shapes", "train", n=10, size=16).captions


def test_loader_contract():
    data = load_dataset("shapes", "train", n=64, size=16)
    assert data.x.shape == (64, 3, 16, 16) and data.x.dtype == torch.float32
    assert data.x.min() >= -1 and data.x.max() <= 1
    levels = (data.x + 1) * 255 / 2
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)  # on the 8-bit grid
    assert data.name == "shapes" and data.levels == 256 and data.num_classes is None and data.y is None
    assert len(data.captions) == 64 and data.attributes.shape == (64, len(data.attribute_names))
    assert data.attributes.dtype == torch.long
    for a, name in enumerate(data.attribute_names):
        assert data.attributes[:, a].max() < len(data.attribute_values[name]) and data.attributes[:, a].min() >= -1
    assert set(data.attribute_values) == set(data.attribute_names)
    torch.testing.assert_close(data.x[5], shapes.render(data.attributes[5], 16), rtol=0, atol=0)


def test_two_objects_probability_is_honoured():
    assert (load_dataset("shapes", "train", n=50, two_objects=0.0).attributes[:, 0] == 0).all()
    assert (load_dataset("shapes", "train", n=50, two_objects=1.0).attributes[:, 0] == 1).all()


def test_bad_requests_raise_value_error():
    with pytest.raises(ValueError, match="splits"):
        load_dataset("shapes", "valid")
    with pytest.raises(ValueError, match="size must be one of"):
        load_dataset("shapes", "train", n=4, size=12)
    with pytest.raises(ValueError, match="probability"):
        load_dataset("shapes", "train", n=4, two_objects=1.5)
    with pytest.raises(ValueError, match="bad options"):
        load_dataset("shapes", "train", n=4, colour="red")
    with pytest.raises(ValueError, match="phrasing"):
        shapes.caption(one_object("circle"), np.random.default_rng(0), phrasing="valid")


def test_agreement_of_read_attributes_with_the_caption():
    from deepgm.data.shapes import COLUMN, agreement, canonical

    data = load_dataset("shapes", "test", n=300)
    exact = agreement(canonical(data.attributes), data.attributes)
    assert all(bool(v.all()) for v in exact.values())  # reading the image exactly agrees with every caption
    two = data.attributes[:, COLUMN["n_objects"]] == 1
    read = canonical(data.attributes)
    swapped = read.clone()  # the classifier's object order does not matter: objects are matched by what they are
    for kind in ("shape", "colour", "size", "position"):
        a, b = COLUMN[f"{kind}0"], COLUMN[f"{kind}1"]
        swapped[two, a], swapped[two, b] = read[two, b], read[two, a]
    assert all(bool(v.all()) for v in agreement(swapped, data.attributes).values())
    wrong = read.clone()
    wrong[:, COLUMN["colour0"]] = (wrong[:, COLUMN["colour0"]] + 1) % len(COLOURS)
    out = agreement(wrong, data.attributes)
    assert not out["colour"].any() and out["shape"].all()
    moved = read.clone()  # both objects read in each other's cells: the caption's relation fails
    moved[two, COLUMN["position0"]], moved[two, COLUMN["position1"]] = (read[two, COLUMN["position1"]],
                                                                      read[two, COLUMN["position0"]])
    out = agreement(moved, data.attributes)
    alike = two & torch.stack([read[:, COLUMN[f"{k}0"]] == read[:, COLUMN[f"{k}1"]]
                               for k in ("shape", "colour", "size")]).all(0)  # either matching is right for these
    assert not out["relation"][two & ~alike].any() and out["relation"][~two | alike].all() and out["shape"].all()
    one = ~two
    off = read.clone()
    off[one, COLUMN["position0"]] = (off[one, COLUMN["position0"]] + 1) % 9
    assert not agreement(off, data.attributes)["position"][one].any()


def test_the_evaluator_split_covers_every_colour_shape_pair():
    """Evaluation networks must read held-out combinations too, so they train on every pair."""
    from deepgm.data.shapes import has_held_out_pair

    data = load_dataset("shapes", "evaluator", n=400)
    assert any(has_held_out_pair(row) for row in data.attributes.tolist())
    pairs = {(o["colour"], o["shape"]) for row in data.attributes.tolist() for o in shapes.objects(row)}
    assert len(pairs) == len(COLOURS) * len(SHAPES)
