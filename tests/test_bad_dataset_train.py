"""Damaged dataset files through `deepgm train` (issue 17, "Hardening"), property-based (Hypothesis): MNIST idx
files, CIFAR-10 python batches and image folders, written as tests/test_data_files.py writes them, then cut short,
given another magic number, other dimensions in their header, garbage bytes, or joined by files that are no images.
Each case trains (the damage left a valid file: pixels are not checksummed) or ends in one error line naming the
damaged file (exit status 2, or 1), with no traceback and no run directory: the data is read, the model and the
trainer are built before anything is written. The number of cases each property tries is its max_examples."""

import gzip
import io
import pickle
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from test_bad_input_trained import cli, error_line
from test_data_files import cifar_batch_bytes, idx_bytes, write_cifar, write_images, write_mnist

TINY = ["train.steps=1", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=1",
        "train.sample_every=0", "model.net.channels=8", "model.schedule.T=10", "sample.steps=2", "data.size=8"]
MNIST_CASES, CIFAR_CASES, IMAGE_CASES = 120, 80, 40  # tries per property (README, "Reliability")
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(capsys, root: Path, data: list[str]) -> tuple[int, str, Path]:
    """deepgm train on the files under root: (exit status, stderr, the run directory asked for)."""
    out = root / "run"
    code, _, err = cli(capsys, ["train", "demo-digits", *data, f"data.root={root / 'data'}", *TINY, "--out",
                                str(out), "--quiet"])
    return code, err, out


def check(code: int, err: str, out: Path, damaged: Path) -> None:
    """The property: a complete run, or one error line naming the damaged file and no run directory at all."""
    event(f"exit {code}")
    if code == 0:
        assert (out / "checkpoints" / "latest").is_file() and (out / "config.yaml").is_file()
        return
    assert code in (1, 2), (code, err)
    line = error_line("train", err)
    assert str(damaged) in line, line
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def damage(draw, raw: bytes, header: int) -> bytes:
    """The file's bytes cut short, overwritten with garbage (often in its header), or replaced by garbage."""
    how = draw(st.sampled_from(["truncate", "garbage", "replace"]), label="damage")
    if how == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1), label="cut at")]
    if how == "garbage":
        at = draw(st.one_of(st.integers(0, header), st.integers(0, len(raw) - 1)), label="garbage at")
        junk = draw(st.binary(min_size=1, max_size=16), label="garbage")
        return raw[:at] + junk + raw[at + len(junk):]
    return draw(st.binary(max_size=64), label="content")


SIZES = st.sampled_from([0, 1, 2, 3, 7, 8, 28, 784, 6272, 2**16, 2**31, 2**32 - 1])


def idx_header_damage(draw, content: bytes) -> bytes:
    """Another magic number, or another number of dimensions and sizes in front of the same data."""
    if draw(st.booleans(), label="magic"):
        return draw(st.binary(min_size=4, max_size=4), label="magic number") + content[4:]
    dims = draw(st.lists(SIZES, max_size=4), label="dimensions")
    old = 4 + 4 * content[3]
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + content[old:]


# --- MNIST ------------------------------------------------------------------------------------------------------

@settings(SETTINGS, max_examples=MNIST_CASES)
@given(file=st.sampled_from(["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]), gz=st.booleans(),
       header=st.booleans(), data=st.data())
def test_a_damaged_mnist_file_is_one_error_naming_it_and_no_run(tmp_path, capsys, file, gz, header, data):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    folder = root / "data" / "mnist"
    write_mnist(folder, n_train=8, gz=(gz, gz))
    path = folder / (file + ".gz" if gz else file)
    stored = path.read_bytes()
    if header:  # in the idx content, under the gzip layer if there is one
        content = gzip.decompress(stored) if gz else stored
        damaged = idx_header_damage(data.draw, content)
        path.write_bytes(gzip.compress(damaged) if gz else damaged)
    else:
        path.write_bytes(damage(data.draw, stored, 24))
    check(*train(capsys, root, ["data.name=mnist"]), path)


# --- CIFAR-10 ---------------------------------------------------------------------------------------------------

@settings(SETTINGS, max_examples=CIFAR_CASES)
@given(batch=st.integers(1, 5), contents=st.booleans(), data=st.data())
def test_a_damaged_cifar_batch_is_one_error_naming_it_and_no_run(tmp_path, capsys, batch, contents, data):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    folder, _ = write_cifar(root / "data", n=2)
    path = folder / f"data_batch_{batch}"
    if contents:  # a well-formed pickle of the wrong things: other shapes, types or labels
        rows = data.draw(st.sampled_from([2, 0]), label="rows")
        width = data.draw(st.sampled_from([3072, 3072, 100, 3073]), label="row length")
        dtype = data.draw(st.sampled_from(["uint8", "uint8", "int16", "float32"]), label="dtype")
        labels = data.draw(st.lists(st.integers(0, 12), max_size=3), label="labels")
        array = np.zeros((rows, width), dtype)
        if dtype == "uint8":  # laid out as the published files are
            path.write_bytes(cifar_batch_bytes(array, labels))
        else:  # as numpy 2 pickles them
            path.write_bytes(pickle.dumps({"data": array, "labels": labels}, protocol=4))
    else:
        path.write_bytes(damage(data.draw, path.read_bytes(), 300))
    check(*train(capsys, root, ["data.name=cifar10"]), path)


def test_a_damaged_numpy_dtype_in_a_cifar_batch_is_an_error_not_a_crash(tmp_path):
    """Found by the property: one byte of the dtype's pickled state (None -> an int) made numpy's dtype.__setstate__
    crash the interpreter (a segfault: no error, no message). Run in a child process, so a regression fails this
    test rather than the whole session."""
    good = cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [1, 2])
    state = b"U\x01|NNN"  # the dtype's state: byte order, then subarray, names, fields (None each)
    assert good.count(state) == 1
    path = tmp_path / "data_batch_1"
    path.write_bytes(good.replace(state, b"U\x01|MNN"))
    code = ("from deepgm.data.files import load_pickle_batch, DatasetFileError\n"
            f"try:\n    load_pickle_batch({str(path)!r})\nexcept DatasetFileError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert str(path) in done.stdout and "damaged (or unsupported) numpy dtype" in done.stdout, done.stdout


# --- image folders ----------------------------------------------------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a right checksum) claims width x height pixels: a decompression bomb's."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, "PNG")
    raw = buffer.getvalue()
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    return raw[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + raw[33:]


@settings(SETTINGS, max_examples=IMAGE_CASES)
@given(how=st.sampled_from(["damage", "not an image", "other suffix", "bomb"]), grey=st.booleans(),
       suffix=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".tiff", ".webp"]), data=st.data())
def test_a_damaged_or_foreign_file_in_an_image_folder_is_one_error_naming_it(tmp_path, capsys, how, grey, suffix,
                                                                             data):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    images = root / "data"
    mode = "L" if grey else "RGB"
    write_images(images / "train", [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)], (8, 8), mode)
    write_images(images / "test", ["cat/0.png", "dog/0.png"], (8, 8), mode)
    if how == "damage":  # one of the training images
        path = images / "train" / data.draw(st.sampled_from(["cat", "dog"])) / f"{data.draw(st.integers(0, 2))}.png"
        path.write_bytes(damage(data.draw, path.read_bytes(), 40))
    elif how == "bomb":
        path = images / "train" / "cat" / "huge.png"
        path.write_bytes(png_claiming(*data.draw(st.sampled_from([(20000, 20000), (100000, 100000),
                                                                 (2**31 - 1, 1)]), label="claimed size")))
    else:  # a text file, or garbage, among the images: read if its suffix is an image's, else ignored
        path = images / "train" / "dog" / ("notes" + (suffix if how == "not an image" else ".txt"))
        path.write_bytes(data.draw(st.one_of(st.binary(max_size=64), st.just(b"just some notes\n"))))
    code, err, out = train(capsys, root, ["data.name=image-folder"])
    if how == "other suffix":
        assert code == 0, err  # not an image file: not read
    check(code, err, out, path)


# --- what the properties found, and files that hold too little -------------------------------------------------

@pytest.mark.parametrize("shape,expected", [
    ((2**31, 2**31, 4), "needs 18446744073709551616"),  # int64 wrapped this to 0 bytes "needed": numpy's reshape error
    ((8, 0, 0), "holds no pixels"),  # was torch's RuntimeError resizing the empty images
    ((0, 28, 28), "holds 0 images"),
])
def test_idx_headers_of_impossible_sizes_are_named(tmp_path, capsys, shape, expected):
    folder = tmp_path / "data" / "mnist"
    write_mnist(folder, n_train=8, gz=(False, False))
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", *shape))  # and no data
    code, err, out = train(capsys, tmp_path, ["data.name=mnist"])
    assert code == 2 and expected in error_line("train", err) and str(path) in err, err
    assert not out.exists()


def test_an_image_claiming_billions_of_pixels_is_named(tmp_path, capsys):
    """Was PIL's DecompressionBombError (no OSError) as a traceback."""
    write_images(tmp_path / "data" / "cat", ["0.png", "1.png"], (8, 8))
    write_images(tmp_path / "data" / "dog", ["0.png", "1.png", "2.png"], (8, 8))
    (tmp_path / "data" / "dog" / "3.png").write_bytes(png_claiming(100000, 100000))
    code, err, out = train(capsys, tmp_path, ["data.name=image-folder", "data.test_fraction=0.2"])
    assert code == 2 and "3.png is not a readable image" in error_line("train", err) and "pixels" in err, err
    assert not out.exists()


def test_a_dataset_smaller_than_a_batch_leaves_no_run_directory(tmp_path, capsys):
    """Valid files of 3 examples and a batch of 4: one clear error, and no run directory (it was a directory holding
    only config.yaml, which `deepgm train` then refused without --resume)."""
    folder = tmp_path / "data" / "mnist"
    write_mnist(folder, n_train=3, gz=(False, False))
    code, err, out = train(capsys, tmp_path, ["data.name=mnist"])
    assert code == 2 and "batch_size 4 is larger than the dataset (3 examples)" in error_line("train", err)
    assert not out.exists()
    write_mnist(folder, n_train=8, gz=(False, False))  # the data fixed, the same command trains
    assert train(capsys, tmp_path, ["data.name=mnist"])[0] == 0


def test_the_labels_of_the_wrong_count_or_range_name_their_file(tmp_path, capsys):
    folder = tmp_path / "data" / "mnist"
    write_mnist(folder, n_train=8, gz=(False, False))
    labels = folder / "train-labels-idx1-ubyte"
    for array, expected in ((np.zeros(7, np.uint8), "holds 8 images but"), (np.full(8, 10, np.uint8), "label 10")):
        labels.write_bytes(idx_bytes(array))
        code, err, out = train(capsys, tmp_path, ["data.name=mnist"])
        assert code == 2 and expected in err and str(labels) in error_line("train", err), err
        assert not out.exists()
