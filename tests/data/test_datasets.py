"""Dataset loaders on tiny files in the real upstream formats; downloads are faked, never made."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import pickle
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fl_lightning.data.datasets import DATASETS, load_dataset
from fl_lightning.data.datasets import download as dl
from fl_lightning.data.datasets import idx as idx_module
from fl_lightning.data.datasets.blogfeedback import (
    BLOGFEEDBACK_SHA256,
    BLOGFEEDBACK_URL,
    BLOGFEEDBACK_URLS,
    load_blogfeedback,
)
from fl_lightning.data.datasets.cifar10 import (
    CIFAR10_ARCHIVE_MD5,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    load_cifar10,
    read_batch,
)
from fl_lightning.data.datasets.femnist import load_femnist
from fl_lightning.data.datasets.idx import (
    FASHION_MNIST_MD5,
    MNIST_MD5,
    MNIST_MIRRORS,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)
from fl_lightning.data.datasets.libsvm import load_libsvm, read_libsvm
from fl_lightning.data.partition import partition


def test_every_loader_is_registered() -> None:
    assert {"mnist", "fashion_mnist", "cifar10", "femnist", "blogfeedback", "libsvm", "digits",
            "diabetes"} <= set(DATASETS.names())


def test_diabetes_is_an_offline_regression_set_standardised_on_its_training_split() -> None:
    splits = load_dataset("diabetes")
    assert splits.task == "regression" and splits.num_classes is None
    assert splits.train_x.shape == (353, 10) and splits.test_x.shape == (89, 10)
    assert splits.train_x.mean(0).abs().max() < 1e-5 and (splits.train_x.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert abs(float(splits.train_y.mean())) < 1e-5 and splits.train_y.dtype == torch.float32


# ============================================================================================ download helpers
def test_download_url_writes_the_file_only_when_the_checksum_matches(tmp_path: Path, fake_server) -> None:
    payload = b"the real bytes" * 1000
    requests = fake_server({"f.bin": payload})
    good = dl.download_url("https://example.org/f.bin", tmp_path / "f.bin", md5=hashlib.md5(payload).hexdigest(),
                           sha256=hashlib.sha256(payload).hexdigest())
    assert good.read_bytes() == payload and requests[0]["url"] == "https://example.org/f.bin"
    with pytest.raises(dl.ChecksumError, match=r"md5 .* differs from the published 0123"):
        dl.download_url("https://example.org/f.bin", tmp_path / "g.bin", md5="0123" * 8)
    assert list(tmp_path.iterdir()) == [good], "a file failing its checksum must not be left behind"


def test_download_url_turns_network_errors_into_download_errors(tmp_path: Path, fake_server) -> None:
    fake_server({})
    with pytest.raises(dl.DownloadError, match=r"could not download https://example.org/missing.bin"):
        dl.download_url("https://example.org/missing.bin", tmp_path / "missing.bin")
    assert not any(tmp_path.iterdir())


def test_download_first_falls_back_to_the_next_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def flaky(url: str, dest: Path, **kwargs: object) -> Path:
        calls.append(url)
        if "bad" in url:
            raise dl.DownloadError("503")
        Path(dest).write_bytes(b"ok")
        return Path(dest)

    monkeypatch.setattr(dl, "download_url", flaky)
    out = dl.download_first(dl.RemoteFile("x", ("https://bad/x", "https://good/x")), tmp_path)
    assert calls == ["https://bad/x", "https://good/x"] and out.read_bytes() == b"ok"


# ============================================================================================ IDX: MNIST, Fashion
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_type(tmp_path: Path, formats: SimpleNamespace, gz: bool, dtype: str) -> None:
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype) if dtype != np.uint8 else (
        np.arange(30, dtype=np.uint8).reshape(2, 3, 5) * 8)
    path = formats.write_idx(tmp_path / "a-idx3", array, gz)
    out = read_idx(path)
    assert out.shape == (2, 3, 5) and np.array_equal(out, array) and out.dtype.isnative


def test_read_idx_rejects_bad_magic_and_truncated_files(tmp_path: Path, formats: SimpleNamespace) -> None:
    (tmp_path / "text").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "text")
    good = formats.idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    (tmp_path / "short").write_bytes(good[:-10])
    with pytest.raises(ValueError, match=r"declares shape \(4, 28, 28\) .* truncated or corrupt"):
        read_idx(tmp_path / "short")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="unknown IDX type code 0x07"):
        read_idx(tmp_path / "code")


@pytest.mark.parametrize("gz", [True, False, (True, False, False, True)], ids=["gz", "raw", "mixed"])
def test_mnist_reads_gz_and_plain_idx_files(tmp_path: Path, formats: SimpleNamespace, gz, no_network) -> None:
    data = formats.random_idx_data()
    formats.write_idx_dir(tmp_path / "mnist", data, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.task == "classification"
    assert ds.train_x.shape == (24, 1, 28, 28) and ds.test_x.shape == (8, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert torch.equal(ds.train_x[:, 0], torch.from_numpy(data.train_x).float() / 255)
    assert torch.equal(ds.test_x[:, 0], torch.from_numpy(data.test_x).float() / 255)
    assert torch.equal(ds.train_y, torch.from_numpy(data.train_y).long())
    assert torch.equal(ds.test_y, torch.from_numpy(data.test_y).long())
    assert ds.train_groups is None and not no_network, "nothing may be downloaded when the files are there"


def test_mnist_reads_torchvisions_raw_folder(tmp_path: Path, formats: SimpleNamespace, no_network) -> None:
    data = formats.random_idx_data(seed=3)
    formats.write_idx_dir(tmp_path / "MNIST" / "raw", data, gz=False)
    assert torch.equal(load_mnist(tmp_path).test_y, torch.from_numpy(data.test_y).long())


def test_mnist_offline_error_names_the_files_the_folder_and_the_source(tmp_path: Path, no_network) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(tmp_path)
    message = str(err.value)
    for name in MNIST_MD5:
        assert name in message
    assert str(tmp_path / "mnist") in message and MNIST_MIRRORS[0] in message and "download failed" in message
    assert str(tmp_path / "MNIST" / "raw") in message  # where else it looked
    # it tried every mirror of the first file before giving up, and wrote nothing
    assert [url for url, _ in no_network] == [m + "train-images-idx3-ubyte.gz" for m in MNIST_MIRRORS]
    assert not list(tmp_path.rglob("*.gz"))


def test_mnist_offline_error_lists_only_the_missing_files(tmp_path: Path, formats, no_network) -> None:
    formats.write_idx_dir(tmp_path / "mnist", formats.random_idx_data(), only=formats.IDX_NAMES[:2])
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(tmp_path, download=False)
    message = str(err.value)
    assert "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in message and "download=False" in message
    assert "missing train-" not in message and "train-images" not in message
    assert no_network == [], "download=False must not try the network"


def test_mnist_downloads_the_missing_gz_files_with_their_published_md5(
    tmp_path: Path, formats: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = formats.random_idx_data(seed=5)
    source = formats.write_idx_dir(tmp_path / "upstream", data, gz=True)
    calls = []

    def fake_download(url: str, dest: Path, *, md5: str | None = None, **kwargs: object) -> Path:
        calls.append((url, md5))
        Path(dest).write_bytes((source / Path(dest).name).read_bytes())
        return Path(dest)

    monkeypatch.setattr(dl, "download_url", fake_download)
    ds = load_mnist(tmp_path / "data")
    assert sorted(calls) == sorted((MNIST_MIRRORS[0] + name, md5) for name, md5 in MNIST_MD5.items())
    assert torch.equal(ds.train_y, torch.from_numpy(data.train_y).long())
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(MNIST_MD5)


def test_mnist_download_verifies_the_md5_end_to_end(tmp_path: Path, formats: SimpleNamespace, fake_server) -> None:
    # The fake mirror serves files whose md5 is not the published one: the loader must refuse them.
    data = formats.random_idx_data()
    source = formats.write_idx_dir(tmp_path / "upstream", data, gz=True)
    fake_server({p.name: p.read_bytes() for p in source.iterdir()})
    with pytest.raises(FileNotFoundError, match=r"md5 [0-9a-f]{32} differs from the published f68b3c2d"):
        load_mnist(tmp_path / "data")
    assert not list((tmp_path / "data" / "mnist").glob("*.gz"))


def test_fashion_mnist_prefers_data_dir_then_the_debian_folder(
    tmp_path: Path, formats: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, no_network
) -> None:
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    debian, mine = formats.random_idx_data(seed=1), formats.random_idx_data(seed=2)
    formats.write_idx_dir(system, debian, gz=True)
    monkeypatch.setitem(idx_module.SYSTEM_DIRS, "fashion_mnist", (system,))
    data_dir = tmp_path / "data"
    assert torch.equal(load_fashion_mnist(data_dir).train_y, torch.from_numpy(debian.train_y).long())
    formats.write_idx_dir(data_dir / "FashionMNIST" / "raw", mine, gz=False)
    assert torch.equal(load_fashion_mnist(data_dir).train_y, torch.from_numpy(mine.train_y).long())
    assert no_network == []


def test_fashion_mnist_offline_error_mentions_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network
) -> None:
    monkeypatch.setitem(idx_module.SYSTEM_DIRS, "fashion_mnist", (tmp_path / "nowhere",))
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist(tmp_path)
    message = str(err.value)
    assert all(name in message for name in FASHION_MNIST_MD5)
    assert str(tmp_path / "fashion_mnist") in message and "apt-get install dataset-fashion-mnist" in message
    assert no_network and all(url.startswith("http") for url, _ in no_network)


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
# md5 of the decompressed upstream IDX files (as lists of the upstream raw files give them); Debian's .gz
# files differ from the published ones, their content must not
FASHION_MNIST_IDX_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


def test_fashion_mnist_reads_an_exact_mirror_of_the_debian_package(
    tmp_path: Path, formats: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, no_network
) -> None:
    # The Debian code path on any machine: the folder the package installs, holding only its four
    # recompressed .gz files, found when data_dir holds nothing, read without a download and without
    # writing anything anywhere. test_fashion_mnist_reads_the_installed_debian_package checks the real files.
    assert idx_module.SYSTEM_DIRS["fashion_mnist"] == (DEBIAN_FASHION,)
    data = formats.random_idx_data(seed=11, n_train=30, n_test=10)
    folder = formats.write_debian_fashion_mnist(tmp_path / "root", data)
    assert folder == tmp_path / "root" / DEBIAN_FASHION.relative_to("/")
    monkeypatch.setitem(idx_module.SYSTEM_DIRS, "fashion_mnist", (folder,))
    assert sorted(p.name for p in folder.iterdir()) == sorted(FASHION_MNIST_MD5)
    assert all(dl.file_digest(p) != FASHION_MNIST_MD5[p.name] for p in folder.iterdir()), "recompressed"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    data_dir = tmp_path / "data"
    ds = load_dataset("fashion_mnist", data_dir)  # download=True: the Debian folder is found first
    assert no_network == [] and not data_dir.exists()
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()} == before
    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert torch.equal(ds.train_x[:, 0], torch.from_numpy(data.train_x).float() / 255)
    assert torch.equal(ds.test_x[:, 0], torch.from_numpy(data.test_x).float() / 255)
    assert torch.equal(ds.train_y, torch.from_numpy(data.train_y).long())
    assert torch.equal(ds.test_y, torch.from_numpy(data.test_y).long())
    # a damaged package file is reported with its path, not read as data
    damaged = folder / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(formats.debian_gzip(formats.idx_bytes(data.test_y[:-1]))[:-9] + b"\0" * 9)
    with pytest.raises(ValueError, match=rf"{damaged}: damaged gzip file .*delete it and get it again"):
        load_fashion_mnist(data_dir)


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="extra check on the real files: Debian's dataset-fashion-mnist is not installed (its code path is "
    "covered by test_fashion_mnist_reads_an_exact_mirror_of_the_debian_package)",
)
def test_fashion_mnist_reads_the_installed_debian_package(
    tmp_path: Path, formats: SimpleNamespace, no_network
) -> None:
    for path in sorted(DEBIAN_FASHION.glob("*.gz")):
        raw = gzip.decompress(path.read_bytes())
        assert hashlib.md5(raw).hexdigest() == FASHION_MNIST_IDX_MD5[path.name[:-3]], path
        assert formats.debian_gzip(raw)[:10] == path.read_bytes()[:10], "the mirror's gzip header is Debian's"
    ds = load_fashion_mnist(tmp_path, download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first training labels
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test_y), torch.full((10,), 1000))
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    assert no_network == []


# ============================================================================================ CIFAR-10
def test_cifar10_reads_python2_pickled_batches(tmp_path: Path, formats: SimpleNamespace, no_network) -> None:
    data = formats.write_cifar_folder(tmp_path / "cifar-10-batches-py")
    ds = load_cifar10(tmp_path, normalize=False)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (5, 3, 32, 32) and ds.num_classes == 10
    x0 = data.train[0][0][0]  # first image: 1024 red values, then green, then blue, each row-major
    assert torch.equal(ds.train_x[0, 0], torch.from_numpy(x0[:1024].reshape(32, 32)).float() / 255)
    assert torch.equal(ds.train_x[0, 2, 5], torch.from_numpy(x0[2048 + 5 * 32 : 2048 + 6 * 32]).float() / 255)
    assert ds.train_y.tolist() == np.concatenate([y for _, y in data.train]).tolist()
    assert ds.test_y.tolist() == data.test[1].tolist()
    normalised = load_cifar10(tmp_path)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(normalised.train_x, (ds.train_x - mean) / std, atol=1e-6)
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2470, 0.2435, 0.2616)


def test_cifar10_extracts_the_archive_it_finds(tmp_path: Path, formats: SimpleNamespace, no_network) -> None:
    staging = tmp_path / "staging"
    data = formats.write_cifar_folder(staging / "cifar-10-batches-py", seed=4)
    data_dir = tmp_path / "data"
    (data_dir / "cifar10").mkdir(parents=True)
    with tarfile.open(data_dir / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_cifar10(data_dir)
    assert ds.test_y.tolist() == data.test[1].tolist()
    assert (data_dir / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_cifar10_offline_error(tmp_path: Path, no_network) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(tmp_path)
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and f"into {tmp_path}/" in message and CIFAR10_URL in message
    assert "data_batch_1..5" in message
    assert no_network == [(CIFAR10_URL, tmp_path / "cifar-10-python.tar.gz")]


def test_cifar10_download_is_checked_against_the_published_md5(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake_download(url: str, dest: Path, *, md5: str | None = None, **kwargs: object) -> Path:
        seen.update(url=url, md5=md5)
        raise dl.ChecksumError("mismatch")

    monkeypatch.setattr(dl, "download_url", fake_download)
    with pytest.raises(FileNotFoundError, match="mismatch"):
        load_cifar10(tmp_path)
    assert seen == {"url": CIFAR10_URL, "md5": CIFAR10_ARCHIVE_MD5}
    assert CIFAR10_ARCHIVE_MD5 == "c58f30108f718f92721af3b95e74349a"  # the md5 published on the CIFAR page


def test_cifar10_downloads_checks_and_extracts_the_archive(
    tmp_path: Path, formats: SimpleNamespace, fake_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # end to end through urlopen: the archive is served, its md5 checked, extracted and read
    from fl_lightning.data.datasets import cifar10 as cifar_module

    staging = tmp_path / "staging"
    data = formats.write_cifar_folder(staging / "cifar-10-batches-py", seed=6)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    requests = fake_server({"cifar-10-python.tar.gz": buffer.getvalue()})
    monkeypatch.setattr(cifar_module, "CIFAR10_ARCHIVE_MD5", hashlib.md5(buffer.getvalue()).hexdigest())
    ds = load_cifar10(tmp_path / "data")
    assert [r["url"] for r in requests] == [CIFAR10_URL]
    assert ds.test_y.tolist() == data.test[1].tolist()
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()
    assert load_cifar10(tmp_path / "data").test_y.tolist() == data.test[1].tolist() and len(requests) == 1


def test_cifar10_archive_without_the_batches_is_reported(tmp_path: Path, no_network) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("not CIFAR")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "other", arcname="other")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python.tar.gz did not contain cifar-10-batches-py/ "
                                                r"with data_batch_1..5 and test_batch; delete it"):
        load_cifar10(tmp_path)
    assert no_network == []


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_cifar10_batches_cannot_run_code(tmp_path: Path) -> None:
    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load \S*print"):
        read_batch(tmp_path / "evil")


# ============================================================================================ FEMNIST (LEAF)
def _leaf_files(rng: np.random.Generator, formats: SimpleNamespace) -> dict:
    return {
        "train": {
            "all_data_0_niid_05_keep_0_train_9.json": {"f0001_41": formats.leaf_user(rng, 3),
                                                       "f0002_17": formats.leaf_user(rng, 2)},
            "all_data_1_niid_05_keep_0_train_9.json": {"f0107_33": formats.leaf_user(rng, 4)},
        },
        "test": {"all_data_0_niid_05_keep_0_test_9.json": {"f0001_41": formats.leaf_user(rng, 1),
                                                           "f0107_33": formats.leaf_user(rng, 2)}},
    }


@pytest.mark.parametrize("layout", ["femnist", "femnist/data", "leaf/data/femnist/data"])
def test_femnist_reads_leaf_json_and_keeps_writers(tmp_path: Path, formats: SimpleNamespace, layout: str) -> None:
    files = _leaf_files(np.random.default_rng(0), formats)
    formats.write_leaf(tmp_path / layout, files)
    ds = load_dataset("femnist", tmp_path)
    assert ds.num_classes == 62 and ds.train_x.shape == (9, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert ds.train_groups.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    x, y = files["train"]["all_data_1_niid_05_keep_0_train_9.json"]["f0107_33"]
    assert torch.equal(ds.train_x[5:], torch.from_numpy(x).view(4, 1, 28, 28))
    assert ds.train_y[5:].tolist() == y.tolist()
    # the natural partition gives one client per writer
    clients = partition("natural", ds.train_y.numpy(), 3, groups=ds.train_groups)
    assert [c.tolist() for c in clients] == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]


def test_femnist_rejects_inconsistent_num_samples(tmp_path: Path, formats: SimpleNamespace) -> None:
    formats.write_leaf(tmp_path / "femnist", _leaf_files(np.random.default_rng(1), formats))
    path = tmp_path / "femnist" / "test" / "all_data_0_niid_05_keep_0_test_9.json"
    path.write_text(path.read_text().replace('"num_samples": [1, 2]', '"num_samples": [1, 3]'))
    with pytest.raises(ValueError, match="num_samples says 3 but user_data holds 2"):
        load_femnist(tmp_path)


def test_femnist_missing_explains_how_to_run_leaf(tmp_path: Path) -> None:
    (tmp_path / "femnist" / "train").mkdir(parents=True)  # an empty folder is not enough
    with pytest.raises(FileNotFoundError) as err:
        load_femnist(tmp_path)
    message = str(err.value)
    assert "./preprocess.sh -s niid --sf 0.05 -k 0 -t sample" in message and "github.com/TalwalkarLab/leaf" in message
    assert f"{tmp_path / 'femnist'}/train/*.json" in message and f"{tmp_path / 'femnist'}/test/*.json" in message


# ============================================================================================ BlogFeedback
def _write_blog(folder: Path, formats: SimpleNamespace, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = formats.blog_table(rng, 40)
    tests = [formats.blog_table(rng, 5), formats.blog_table(rng, 7)]
    formats.write_blog_csv(folder / "blogData_train.csv", train)
    formats.write_blog_csv(folder / "blogData_test-2012.02.01.00_00.csv", tests[0])
    formats.write_blog_csv(folder / "blogData_test-2012.03.31.01_00.csv", tests[1])
    return train, np.concatenate(tests)


def test_blogfeedback_standardises_with_the_training_statistics(tmp_path: Path, formats: SimpleNamespace) -> None:
    train, test = _write_blog(tmp_path / "blogfeedback", formats)
    ds = load_blogfeedback(tmp_path)
    assert ds.num_classes is None and ds.task == "regression"
    assert ds.train_x.shape == (40, 280) and ds.test_x.shape == (12, 280) and ds.train_y.dtype == torch.float32
    x = ds.train_x.double()
    varying = [c for c in range(280) if c != 7]
    assert torch.allclose(x.mean(0), torch.zeros(280, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x[:, varying].std(0, unbiased=False), torch.ones(279, dtype=torch.float64), atol=1e-5)
    assert torch.all(ds.train_x[:, 7] == 0) and torch.isfinite(ds.test_x).all()  # constant column: centred only
    mean, std = train[:, :-1].mean(0), train[:, :-1].std(0)
    std[7] = 1.0
    assert np.allclose(ds.test_x.numpy(), (test[:, :-1] - mean) / std, atol=1e-4)
    assert np.allclose(ds.train_y.numpy(), np.log1p(train[:, -1]), atol=1e-6)
    raw = load_blogfeedback(tmp_path, log_target=False, standardize=False)
    assert np.allclose(raw.test_y.numpy(), test[:, -1]) and np.allclose(raw.train_x.numpy(), train[:, :-1], atol=1e-4)


def test_blogfeedback_extracts_the_uci_zip_even_nested(tmp_path: Path, formats: SimpleNamespace) -> None:
    staging = tmp_path / "staging"
    train, _ = _write_blog(staging, formats, seed=2)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        for p in sorted(staging.iterdir()):
            z.write(p, arcname=p.name)
    (tmp_path / "data" / "blogfeedback").mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "data" / "blogfeedback" / "blogfeedback.zip", "w") as z:
        z.writestr("BlogFeedback.zip", inner.getvalue())
    ds = load_blogfeedback(tmp_path / "data", standardize=False, log_target=False)
    assert np.allclose(ds.train_y.numpy(), train[:, -1]) and len(ds.test_y) == 12


def test_blogfeedback_offline_error_and_checked_download(tmp_path: Path, monkeypatch, no_network) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_blogfeedback(tmp_path)
    message = str(err.value)
    assert "blogfeedback.zip" in message and str(tmp_path / "blogfeedback") in message and BLOGFEEDBACK_URL in message
    # both UCI addresses (the current one first) are tried before giving up
    assert no_network == [(url, tmp_path / "blogfeedback" / "blogfeedback.zip") for url in BLOGFEEDBACK_URLS]
    assert BLOGFEEDBACK_URLS[0] == BLOGFEEDBACK_URL
    seen = []

    def fake_download(url: str, dest: Path, *, sha256: str | None = None, **kwargs: object) -> Path:
        seen.append((url, sha256))
        raise dl.ChecksumError("sha256 mismatch")

    monkeypatch.setattr(dl, "download_url", fake_download)
    with pytest.raises(FileNotFoundError, match="sha256 mismatch"):
        load_blogfeedback(tmp_path)
    assert seen == [(url, BLOGFEEDBACK_SHA256) for url in BLOGFEEDBACK_URLS]
    assert BLOGFEEDBACK_SHA256 == "1ba74e5ad920f7cd037502b2968581cc695146a226a73eff52fe8ad875ed4bcf"


def test_blogfeedback_rejects_a_wrong_column_count(tmp_path: Path, formats: SimpleNamespace) -> None:
    _write_blog(tmp_path / "blogfeedback", formats)
    formats.write_blog_csv(tmp_path / "blogfeedback" / "blogData_train.csv", np.ones((3, 200)))
    with pytest.raises(ValueError, match="expected 281 columns"):
        load_blogfeedback(tmp_path)


# ============================================================================================ LibSVM
A9A_LIKE = """-1 3:1 11:1 14:1 19:1
+1 1:1 5:0.5 14:1
# a comment line

-1 2:1 6:1 qid:3 14:1 # trailing comment
+1 4:-2.5e-1 9:1
"""


def test_libsvm_parses_one_based_sparse_lines_into_dense_rows(tmp_path: Path) -> None:
    (tmp_path / "a9a").write_text(A9A_LIKE)
    (tmp_path / "a9a.t").write_text("+1 1:1 20:3\n-1 2:2\n")
    ds = load_libsvm(tmp_path, path="a9a", test_path="a9a.t")
    assert ds.train_x.shape == (4, 20) and ds.test_x.shape == (2, 20) and ds.train_x.dtype == torch.float32
    assert ds.num_classes == 2 and ds.train_y.tolist() == [0, 1, 0, 1] and ds.test_y.tolist() == [1, 0]
    expected = np.zeros((4, 20), dtype=np.float32)
    expected[0, [2, 10, 13, 18]] = 1
    expected[1, [0, 4, 13]] = [1, 0.5, 1]
    expected[2, [1, 5, 13]] = 1
    expected[3, [3, 8]] = [-0.25, 1]
    assert np.array_equal(ds.train_x.numpy(), expected)
    assert ds.test_x[0, 19] == 3.0
    assert load_libsvm(tmp_path, path="a9a", test_path="a9a.t", n_features=123).train_x.shape == (4, 123)
    with pytest.raises(ValueError, match="n_features=19 but the files use feature index 20"):
        load_libsvm(tmp_path, path="a9a", test_path="a9a.t", n_features=19)


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress], ids=["gz", "bz2"])
def test_libsvm_reads_compressed_files_by_absolute_path(tmp_path: Path, compress) -> None:
    (tmp_path / "a9a.x").write_bytes(compress(A9A_LIKE.encode()))
    labels, rows, cols, vals, n = read_libsvm(tmp_path / "a9a.x")
    assert n == 4 and labels.tolist() == [-1, 1, -1, 1] and cols.max() == 18 and len(vals) == len(rows) == 12


def test_libsvm_holds_out_a_seeded_stratified_test_fraction(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = [f"{c} 1:{rng.normal():.4f} 2:{rng.normal():.4f}" for c in [1, 2, 3] * 20]
    (tmp_path / "three.txt").write_text("\n".join(lines))
    ds = load_libsvm(tmp_path, path=tmp_path / "three.txt", test_fraction=0.25, seed=1)
    assert len(ds.train_y) == 45 and len(ds.test_y) == 15 and ds.num_classes == 3
    assert torch.bincount(ds.test_y).tolist() == [5, 5, 5]
    again = load_libsvm(tmp_path, path="three.txt", test_fraction=0.25, seed=1)
    assert torch.equal(again.test_x, ds.test_x)
    assert not torch.equal(load_libsvm(tmp_path, path="three.txt", test_fraction=0.25, seed=2).test_x, ds.test_x)


def test_libsvm_regression_keeps_real_targets(tmp_path: Path) -> None:
    (tmp_path / "reg").write_text("0.5 1:1\n-3.25 2:1\n7 1:2 2:2\n1e-2 1:0\n")
    ds = load_libsvm(tmp_path, path="reg", task="regression", test_fraction=0.5)
    assert ds.num_classes is None and ds.train_y.dtype == torch.float32
    assert sorted(ds.train_y.tolist() + ds.test_y.tolist()) == pytest.approx([-3.25, 0.01, 0.5, 7.0])
    with pytest.raises(ValueError, match="needs integer labels; use task='regression'"):
        load_libsvm(tmp_path, path="reg", test_fraction=0.5)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [("1 0:1\n", "1-based"), ("1 3\n", "expected index:value"), ("x 1:1\n", "not a number"),
     ("1,2 1:1\n", "multi-label"), ("# only a comment\n", "no samples")],
)
def test_libsvm_reports_malformed_lines_with_their_location(tmp_path: Path, content: str, pattern: str) -> None:
    (tmp_path / "bad").write_text(content)
    with pytest.raises(ValueError, match=pattern) as err:
        read_libsvm(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(err.value)


def test_libsvm_missing_file_says_where_it_looked_and_where_to_get_data(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"libsvmtools/datasets/.*binary/a9a") as err:
        load_libsvm(tmp_path, path="a9a")
    assert str(tmp_path / "a9a") in str(err.value)
    with pytest.raises(ValueError, match="libsvm needs path="):
        load_libsvm(tmp_path)


A9A_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/a9a"


def test_libsvm_downloads_a_url_once_into_data_dir(tmp_path: Path, fake_server) -> None:
    requests = fake_server({"a9a": A9A_LIKE.encode(), "a9a.t": b"+1 1:1 20:3\n-1 2:2\n"})
    ds = load_libsvm(tmp_path, path=A9A_URL, test_path=A9A_URL + ".t",
                     sha256={"a9a": hashlib.sha256(A9A_LIKE.encode()).hexdigest()})
    assert [r["url"] for r in requests] == [A9A_URL, A9A_URL + ".t"]
    assert (tmp_path / "libsvm" / "a9a").read_text() == A9A_LIKE
    assert ds.train_x.shape == (4, 20) and ds.test_y.tolist() == [1, 0]
    again = load_libsvm(tmp_path, path=A9A_URL, test_path=A9A_URL + ".t")
    assert len(requests) == 2 and torch.equal(again.train_x, ds.train_x), "a downloaded file is not fetched again"


def test_libsvm_download_refuses_a_wrong_sha256_and_explains_offline(tmp_path: Path, fake_server) -> None:
    fake_server({"a9a": A9A_LIKE.encode()})
    with pytest.raises(FileNotFoundError, match=r"sha256 [0-9a-f]{64} differs from the published 00"):
        load_libsvm(tmp_path, path=A9A_URL, sha256={"a9a": "00" * 32})
    assert not (tmp_path / "libsvm" / "a9a").exists()
    with pytest.raises(FileNotFoundError) as err:
        load_libsvm(tmp_path, path=A9A_URL, download=False)
    message = str(err.value)
    assert f"missing a9a in {tmp_path / 'libsvm'}" in message and A9A_URL in message and "download=False" in message
