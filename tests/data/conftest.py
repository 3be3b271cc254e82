"""Builders of tiny dataset files in the exact upstream formats (generated in code; no data is committed)."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
              np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """An array in IDX format: 0x0000, type code, ndim, big-endian uint32 dims, big-endian data."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, _IDX_CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@dataclass
class IdxData:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def random_idx_data(seed: int = 0, n_train: int = 24, n_test: int = 8) -> IdxData:
    rng = np.random.default_rng(seed)
    return IdxData(
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    )


def write_idx_dir(directory: Path, data: IdxData, gz: bool | Sequence[bool] = True,
                  only: Sequence[str] = IDX_NAMES) -> Path:
    """The four MNIST-style files (or just ``only``) in ``directory``; ``gz`` per file or for all."""
    arrays = dict(zip(IDX_NAMES, (data.train_x, data.train_y, data.test_x, data.test_y)))
    flags = [gz] * 4 if isinstance(gz, bool) else list(gz)
    for name, flag in zip(IDX_NAMES, flags):
        if name in only:
            write_idx(directory / name, arrays[name], flag)
    return directory


DEBIAN_FASHION_DIR = Path("usr/share/datasets/fashion-mnist")
DEBIAN_GZIP_MTIME = 1591347949  # the mtime in the gzip headers of Debian's dataset-fashion-mnist 0.0~git20200523-1


def debian_gzip(data: bytes) -> bytes:
    """``data`` gzip'd with the header Debian's package files have: no flags (no stored file name), its mtime,
    no extra-flags byte, OS 3 (Unix); then the deflate stream, the CRC-32 and the length (RFC 1952)."""
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", DEBIAN_GZIP_MTIME) + b"\x00\x03"
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(data) + deflate.flush()
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def write_debian_fashion_mnist(root: Path, data: IdxData) -> Path:
    """A mirror of what ``apt-get install dataset-fashion-mnist`` leaves in ``/usr/share/datasets/fashion-mnist``,
    under ``root``: only the four ``.gz`` files, recompressed with Debian's gzip header (so their md5 is not the
    published one) around plain IDX content."""
    folder = root / DEBIAN_FASHION_DIR
    folder.mkdir(parents=True)
    for name, array in zip(IDX_NAMES, (data.train_x, data.train_y, data.test_x, data.test_y)):
        (folder / f"{name}.gz").write_bytes(debian_gzip(idx_bytes(array)))
    return folder


# ------------------------------------------------------------------ CIFAR-10: Python 2 cPickle batches
def _py2_str(b: bytes) -> bytes:
    """A Python 2 ``str`` in a protocol-2 pickle (SHORT_BINSTRING / BINSTRING): bytes under encoding='bytes'."""
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_uint8_array(arr: np.ndarray) -> bytes:
    """The opcodes numpy 1.x under Python 2 wrote for a C-contiguous uint8 array."""
    out = b"cnumpy.core.multiarray\n_reconstruct\n"
    out += b"cnumpy\nndarray\n" + b"K\x00\x85" + _py2_str(b"b") + b"\x87R"
    out += b"(K\x01(" + b"".join(b"J" + struct.pack("<i", d) for d in arr.shape) + b"t"
    out += b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89" + _py2_str(arr.tobytes()) + b"tb"
    return out


def py2_cifar_batch(data: np.ndarray, labels: Sequence[int]) -> bytes:
    """A CIFAR-10 python batch as the original files hold it: a Python 2 cPickle (protocol 2) dict with
    byte-string keys, ``data`` a uint8 [N, 3072] array, ``labels`` a list of ints."""
    assert data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    out = b"\x80\x02}(" + _py2_str(b"batch_label") + _py2_str(b"testing batch 1 of 1")
    out += _py2_str(b"labels") + b"]" + b"".join(b"K" + bytes([int(v)]) + b"a" for v in labels)
    out += _py2_str(b"data") + _py2_uint8_array(data)
    return out + b"u."


@dataclass
class CifarData:
    train: list[tuple[np.ndarray, np.ndarray]]
    test: tuple[np.ndarray, np.ndarray]


def write_cifar_folder(folder: Path, seed: int = 0, per_batch: int = 4, n_test: int = 5) -> CifarData:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train = []
    for i in range(1, 6):
        x, y = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), rng.integers(0, 10, per_batch)
        (folder / f"data_batch_{i}").write_bytes(py2_cifar_batch(x, y))
        train.append((x, y))
    x, y = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), rng.integers(0, 10, n_test)
    (folder / "test_batch").write_bytes(py2_cifar_batch(x, y))
    (folder / "batches.meta").write_bytes(b"\x80\x02}(" + _py2_str(b"num_vis") + b"M\x00\x0cu.")
    return CifarData(train, (x, y))


# ------------------------------------------------------------------ LEAF FEMNIST json
def leaf_blob(users: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    return {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x.tolist(), "y": y.tolist()} for u, (x, y) in users.items()},
    }


def write_leaf(root: Path, files: dict[str, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]]) -> None:
    """``files = {"train": {"all_data_0_niid_05_keep_0_train_9.json": {user: (x [m,784], y [m])}}, "test": ...}``."""
    for split, by_file in files.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, users in by_file.items():
            (root / split / name).write_text(json.dumps(leaf_blob(users)))


def leaf_user(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.random((m, 784)).round(3).astype(np.float32), rng.integers(0, 62, m)


# ------------------------------------------------------------------ BlogFeedback csv
def blog_table(rng: np.random.Generator, n: int) -> np.ndarray:
    table = np.round(rng.normal(5.0, 3.0, (n, 281)), 3)
    table[:, 7] = 2.0  # a constant column, as BlogFeedback has
    table[:, -1] = rng.integers(0, 50, n)
    return table


def write_blog_csv(path: Path, table: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(f"{v:g}" for v in row) for row in table) + "\n")


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """Make every download fail (recording what was attempted) without touching the network."""
    from fl_lightning.data.datasets import download as dl

    attempts: list[tuple[str, Path]] = []

    def offline(url: str, dest: str | Path, **kwargs: object) -> Path:
        attempts.append((url, Path(dest)))
        raise dl.DownloadError(f"could not download {url}: <urlopen error [Errno -3] Temporary failure>")

    monkeypatch.setattr(dl, "download_url", offline)
    return attempts


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, bytes]], list[dict[str, object]]]:
    """Serve given bytes for given file names through ``download_url``'s network layer (urlopen)."""
    import io
    import urllib.error
    import urllib.request

    def install(files: dict[str, bytes]) -> list[dict[str, object]]:
        requests: list[dict[str, object]] = []

        def urlopen(request: urllib.request.Request, timeout: float | None = None) -> io.BytesIO:
            url = request.full_url
            requests.append({"url": url, "timeout": timeout})
            name = url.rsplit("/", 1)[-1]
            if name not in files:
                raise urllib.error.URLError("404 not found")
            response = io.BytesIO(files[name])  # like http.client.HTTPResponse: a stream with headers
            response.headers = {"Content-Length": str(len(files[name]))}  # type: ignore[attr-defined]
            return response

        monkeypatch.setattr(urllib.request, "urlopen", urlopen)
        return requests

    return install


@pytest.fixture
def formats() -> SimpleNamespace:
    """The file builders above, for tests (a fixture, so no test module imports this conftest)."""
    return SimpleNamespace(
        IDX_NAMES=IDX_NAMES,
        idx_bytes=idx_bytes,
        write_idx=write_idx,
        random_idx_data=random_idx_data,
        write_idx_dir=write_idx_dir,
        debian_gzip=debian_gzip,
        write_debian_fashion_mnist=write_debian_fashion_mnist,
        py2_cifar_batch=py2_cifar_batch,
        write_cifar_folder=write_cifar_folder,
        write_leaf=write_leaf,
        leaf_user=leaf_user,
        blog_table=blog_table,
        write_blog_csv=write_blog_csv,
    )
