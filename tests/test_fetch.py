"""Downloads against a real HTTP server on 127.0.0.1 (this machine has no internet): checksums, resuming a
partial `.part` file with an HTTP Range request, atomic results, mirrors, archives, and the CLI."""

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from deepgm.cli import main
from deepgm.data import fetch as fetch_module
from deepgm.data import load_dataset
from deepgm.data.fetch import DownloadError, RemoteFile, Source, download, fetch
from test_data_files import cifar_batch_bytes, write_mnist

BLOB = np.random.default_rng(0).integers(0, 256, size=1_300_000, dtype=np.uint8).tobytes()  # > one 1 MiB read
MD5 = hashlib.md5(BLOB).hexdigest()
SHA256 = hashlib.sha256(BLOB).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """Serves server.files; honours `Range: bytes=N-` unless server.ignore_range; server.cut_after closes the
    connection after that many body bytes (an interrupted transfer); every request is logged."""

    def do_GET(self):
        server = self.server
        server.log.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404, "Not Found")
            return
        start, wanted = 0, self.headers.get("Range")
        if wanted and not server.ignore_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:
            self.wfile.write(body[: server.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.log, httpd.ignore_range, httpd.cut_after = {"blob.bin": BLOB}, [], False, None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_renames_atomically(server, tmp_path):
    dest = download([f"{server.url}/blob.bin"], tmp_path / "sub" / "blob.bin", md5=MD5, sha256=SHA256)
    assert dest.read_bytes() == BLOB and sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]
    assert server.log == [("/blob.bin", None)]
    download([f"{server.url}/blob.bin"], dest, md5=MD5)  # already there and verified: no request
    assert len(server.log) == 1


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError) as info:
        download([f"{server.url}/blob.bin"], tmp_path / "blob.bin", sha256="0" * 64)
    message = str(info.value)
    assert "blob.bin" in message and "checksum mismatch" in message and SHA256 in message and "0" * 64 in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="md5 or sha256"):
        download([f"{server.url}/blob.bin"], tmp_path / "blob.bin")


def test_resumes_a_partial_file_with_a_range_request(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:123_457])
    dest = download([f"{server.url}/blob.bin"], tmp_path / "blob.bin", md5=MD5)
    assert dest.read_bytes() == BLOB and not (tmp_path / "blob.bin.part").exists()
    assert server.log == [("/blob.bin", "bytes=123457-")]


def test_an_interrupted_download_keeps_its_bytes_and_the_next_run_resumes(server, tmp_path):
    server.cut_after = 1_100_000
    with pytest.raises(DownloadError, match="partial bytes are kept"):
        download([f"{server.url}/blob.bin"], tmp_path / "blob.bin", md5=MD5)
    assert not (tmp_path / "blob.bin").exists() and (tmp_path / "blob.bin.part").stat().st_size == 1_100_000
    server.cut_after = None
    download([f"{server.url}/blob.bin"], tmp_path / "blob.bin", md5=MD5)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert server.log[-1] == ("/blob.bin", "bytes=1100000-")


def test_a_server_that_ignores_range_rewrites_the_part(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "blob.bin.part").write_bytes(b"garbage" * 10)
    download([f"{server.url}/blob.bin"], tmp_path / "blob.bin", md5=MD5)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB


def test_a_corrupt_part_is_fetched_again_from_scratch(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(bytes(1000))  # right length prefix, wrong bytes
    download([f"{server.url}/blob.bin"], tmp_path / "blob.bin", md5=MD5)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert server.log == [("/blob.bin", "bytes=1000-"), ("/blob.bin", None)]


def test_a_complete_part_left_by_a_kill_before_the_rename(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(BLOB)  # the server answers 416; the checksum says it is whole
    download([f"{server.url}/blob.bin"], tmp_path / "blob.bin", md5=MD5)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB and len(server.log) == 1


def test_mirrors_are_tried_in_order_and_every_failure_is_reported(server, tmp_path):
    urls = [f"{server.url}/missing/blob.bin", "http://127.0.0.1:9/blob.bin", f"{server.url}/blob.bin"]
    assert download(urls, tmp_path / "blob.bin", md5=MD5).read_bytes() == BLOB
    with pytest.raises(DownloadError) as info:
        download(urls[:2], tmp_path / "other.bin", md5=MD5)
    assert "HTTP 404" in str(info.value) and "127.0.0.1:9" in str(info.value)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_fetch_cifar10_unpacks_the_verified_archive(server, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    archive = _tar_gz({f"cifar-10-batches-py/{n}": cifar_batch_bytes(rng.integers(0, 256, (2, 3072), np.uint8),
                                                                     [1, 2]) for n in names})
    server.files["cifar-10-python.tar.gz"] = archive
    monkeypatch.setitem(fetch_module.SOURCES, "cifar10", Source(
        files=(RemoteFile("cifar-10-python.tar.gz", md5=hashlib.md5(archive).hexdigest()),), mirrors=(server.url,),
        unpack=("cifar-10-python.tar.gz",), unpacked="cifar-10-batches-py"))
    folder = fetch("cifar10", tmp_path, progress=False)
    assert folder == tmp_path / "cifar10" and sorted(p.name for p in folder.iterdir()) == [
        "cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert load_dataset("cifar10", "train", root=str(tmp_path)).x.shape == (10, 3, 32, 32)
    fetch("cifar10", tmp_path, progress=False)  # all there: nothing is downloaded again
    assert len(server.log) == 1


def test_an_archive_escaping_its_folder_is_refused(server, tmp_path, monkeypatch):
    archive = _tar_gz({"cifar-10-batches-py/test_batch": b"x", "../escaped.txt": b"x"})
    server.files["cifar-10-python.tar.gz"] = archive
    monkeypatch.setitem(fetch_module.SOURCES, "cifar10", Source(
        files=(RemoteFile("cifar-10-python.tar.gz", md5=hashlib.md5(archive).hexdigest()),), mirrors=(server.url,),
        unpack=("cifar-10-python.tar.gz",), unpacked="cifar-10-batches-py"))
    with pytest.raises(DownloadError, match="could not be unpacked"):
        fetch("cifar10", tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "data" / "cifar10" / "cifar-10-batches-py").exists()


def test_fetch_mnist_then_load_it(server, tmp_path, monkeypatch):
    files = tmp_path / "served"
    write_mnist(files, gz=(True, True))
    server.files.update({p.name: p.read_bytes() for p in files.iterdir()})
    monkeypatch.setitem(fetch_module.SOURCES, "mnist", Source(
        files=tuple(RemoteFile(p.name, md5=hashlib.md5(p.read_bytes()).hexdigest()) for p in sorted(files.iterdir())),
        mirrors=("http://127.0.0.1:9/", server.url)))  # the first mirror refuses connections
    fetch("mnist", tmp_path / "data", progress=False)
    data = load_dataset("mnist", "test", root=str(tmp_path / "data"))
    assert data.x.shape == (4, 1, 28, 28)


def test_cli_data_fetch_reports_a_checksum_mismatch(server, tmp_path, capsys):
    """The real MNIST checksums against tiny stand-in files served locally: a clear error, exit status 2."""
    files = tmp_path / "served"
    write_mnist(files, gz=(True, True))
    server.files.update({p.name: p.read_bytes() for p in files.iterdir()})
    assert main(["data", "fetch", "mnist", "--root", str(tmp_path / "data"), "--mirror", server.url, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "deepgm data: error: could not fetch train-images-idx3-ubyte.gz" in err
    assert "checksum mismatch" in err and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in err and server.url in err
    assert not (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").exists()
