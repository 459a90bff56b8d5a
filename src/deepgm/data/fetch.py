"""`deepgm data fetch NAME --root DIR`: download MNIST, Fashion-MNIST or CIFAR-10 into DIR/NAME/.

Each file is tried at its mirrors in turn and checked against the checksum its publishers give (MD5 for
these three). Bytes go to `FILE.part`; an interrupted download resumes from there with an HTTP Range request
(a server that ignores Range sends the whole file and the part is rewritten), and only a verified file is
renamed, atomically, to its final name. A file already present with the right checksum is not fetched again.
CIFAR-10's archive is unpacked after verification (into a temporary folder, then renamed into place).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


class DownloadError(OSError):
    """A file could not be fetched from any mirror; the message says what each mirror did."""


@dataclass(frozen=True)
class RemoteFile:
    """A file of a dataset, with the checksum its publishers give (md5 and/or sha256, hex)."""

    name: str
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from: base URLs tried in order; tar archives are unpacked after checking."""

    files: tuple[RemoteFile, ...]
    mirrors: tuple[str, ...]
    unpack: tuple[str, ...] = ()  # names of archives (among files) to extract
    unpacked: str | None = None  # the folder an archive holds; its presence means it was extracted


_MNIST_LIKE = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")
SOURCES: dict[str, Source] = {
    "mnist": Source(
        files=tuple(RemoteFile(n, md5=m) for n, m in zip(_MNIST_LIKE, (
            "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"), strict=True)),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/")),
    "fashion-mnist": Source(
        files=tuple(RemoteFile(n, md5=m) for n, m in zip(_MNIST_LIKE, (
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"), strict=True)),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")),
    "cifar10": Source(
        files=(RemoteFile("cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a"),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",), unpack=("cifar-10-python.tar.gz",),
        unpacked="cifar-10-batches-py"),
}


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(path: Path, md5: str | None, sha256: str | None) -> str | None:
    """None when the file matches every checksum given, else what differs."""
    for algorithm, want in (("sha256", sha256), ("md5", md5)):
        if want and (got := file_digest(path, algorithm)) != want.lower():
            return f"{algorithm} {got}, expected {want.lower()}"
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _transfer(url: str, part: Path, timeout: float, progress: bool) -> bool:
    """Append the rest of `url` to `part` (or rewrite it); returns whether it resumed from earlier bytes."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "deepgm-fetch", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing after `have`: the part may already be whole; the checksum decides
            return True
        raise
    with response:
        resumed = False
        if have and response.status == 206:
            start = (response.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if start != str(have):
                raise DownloadError(f"asked for bytes {have}- and got range {response.headers.get('Content-Range')}")
            resumed = True
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        written = 0
        bar = None
        if progress:
            from tqdm import tqdm

            total = expected + (have if resumed else 0) if expected is not None else None
            bar = tqdm(total=total, initial=have if resumed else 0, unit="B", unit_scale=True, desc=part.name[:-5],
                       leave=False)
        try:
            with open(part, "ab" if resumed else "wb") as f:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    f.write(chunk)
                    written += len(chunk)
                    if bar:
                        bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        finally:
            if bar:
                bar.close()
    if expected is not None and written != expected:
        raise DownloadError(f"the connection closed after {written} of {expected} bytes; run again to resume")
    return resumed


def download(urls: list[str] | tuple[str, ...], dest: str | Path, md5: str | None = None, sha256: str | None = None,
             timeout: float = 60.0, progress: bool = False) -> Path:
    """Fetch `dest` from the first of `urls` that yields bytes with the given checksum(s); see the module doc."""
    if not md5 and not sha256:
        raise ValueError(f"download of {dest}: give md5 or sha256, so the file can be verified")
    dest = Path(dest)
    if dest.is_file() and _mismatch(dest, md5, sha256) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        for attempt in range(2):  # a resumed download that fails its checksum is tried once more from scratch
            try:
                resumed = _transfer(url, part, timeout, progress)
            except urllib.error.HTTPError as err:
                failures.append(f"{url}: HTTP {err.code} {err.reason}")
                break
            except urllib.error.URLError as err:
                failures.append(f"{url}: {err.reason}")
                break
            except (http.client.HTTPException, OSError) as err:  # timeouts, resets, short reads
                failures.append(f"{url}: {err}")
                break
            bad = _mismatch(part, md5, sha256)
            if bad is None:
                os.replace(part, dest)  # atomic: dest is either absent or complete and verified
                _fsync_dir(dest.parent)
                return dest
            part.unlink()
            if not (resumed and attempt == 0):
                failures.append(f"{url}: checksum mismatch, got {bad}")
                break
    raise DownloadError(f"could not fetch {dest.name} into {dest.parent}:\n  " + "\n  ".join(failures) +
                        (f"\n(partial bytes are kept in {part} and a later run resumes from them)"
                         if part.exists() else ""))


def _extract(archive: Path, into: Path, folder: str) -> None:
    """Unpack a verified tar archive's `folder` into `into`, refusing members that would land outside it."""
    tmp = into / f".{folder}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")  # no absolute paths, '..', links out or device files
            else:  # pragma: no cover - Python without extraction filters
                for member in tar.getmembers():
                    target = (tmp / member.name).resolve()
                    if not (member.isfile() or member.isdir()) or tmp.resolve() not in target.parents:
                        raise DownloadError(f"{archive}: refusing to extract {member.name!r}")
                tar.extractall(tmp)
        if not (tmp / folder).is_dir():
            raise DownloadError(f"{archive} does not hold the folder {folder!r}")
        shutil.rmtree(into / folder, ignore_errors=True)
        os.replace(tmp / folder, into / folder)
    except (tarfile.TarError, EOFError) as err:
        raise DownloadError(f"{archive} could not be unpacked: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str, root: str | Path = "data", mirrors: list[str] | None = None, timeout: float = 60.0,
          progress: bool = True) -> Path:
    """Download dataset `name` (a key of SOURCES) into root/name/, verified; `mirrors` (base URLs) replace the
    built-in ones. Returns the dataset folder, which `data: {name: NAME, root: ROOT}` then reads."""
    if name not in SOURCES:
        raise ValueError(f"no download source for dataset {name!r}; choose one of {sorted(SOURCES)}")
    source = SOURCES[name]
    folder = Path(root) / name
    bases = list(mirrors) if mirrors else list(source.mirrors)
    for remote in source.files:
        urls = [base.rstrip("/") + "/" + remote.name for base in bases]
        path = download(urls, folder / remote.name, remote.md5, remote.sha256, timeout, progress)
        if remote.name in source.unpack and source.unpacked and not (folder / source.unpacked).is_dir():
            _extract(path, folder, source.unpacked)
    return folder
