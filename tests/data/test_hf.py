"""dataset: hf and partition: flwr, offline: datasets written with save_to_disk / parquet in a temp dir train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import datasets  # the [hf] extra: CI installs it, so these tests never skip
import numpy as np
import pytest

from fl_lightning.cli import FederatedCLI
from fl_lightning.data.datamodule import FederatedDataModule
from fl_lightning.data.datasets import load_dataset
from fl_lightning.data.partition import partition
from fl_lightning.extras import MissingExtraError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _images(n: int = 120, seed: int = 0) -> datasets.Dataset:
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    pixels = [np.clip(rng.normal(60 + 60 * y, 20, (8, 8)), 0, 255).astype(np.uint8) for y in labels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "writer": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": labels.tolist(),
         "writer": [f"w{i % 6}" for i in range(n)]}, features=features)


def _tabular(n: int = 100, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return datasets.Dataset.from_dict({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "target": y,
                                       "name": [f"r{i}" for i in range(n)]})


def test_save_to_disk_images_load_as_chw_floats_with_classes_and_groups(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": _images(), "test": _images(30, seed=1)}).save_to_disk(tmp_path / "imgs")
    data = load_dataset("hf", tmp_path, path=str(tmp_path / "imgs"), natural_id_column="writer")
    assert data.train_x.shape == (120, 1, 8, 8) and data.test_x.shape == (30, 1, 8, 8)
    assert float(data.train_x.min()) >= 0.0 and float(data.train_x.max()) <= 1.0
    assert data.num_classes == 3 and data.train_y.dtype.is_floating_point is False
    assert data.train_groups is not None and len(np.unique(data.train_groups)) == 6


def test_tabular_parquet_and_test_fraction(tmp_path: Path) -> None:
    _tabular().to_parquet(str(tmp_path / "t.parquet"))
    data = load_dataset("hf", tmp_path, path="t.parquet", label_column="target", test_fraction=0.2)  # under data_dir
    assert data.train_x.shape == (80, 3) and data.test_x.shape == (20, 3), "string column 'name' left out"
    assert data.num_classes == 2
    reg = load_dataset("hf", tmp_path, path="t.parquet", label_column="f2", input_column=["f0", "f1"],
                       test_split=None)
    assert reg.num_classes is None and reg.train_y.is_floating_point() and len(reg.test_y) == 0


def test_missing_test_split_says_what_to_set(tmp_path: Path) -> None:
    _tabular().save_to_disk(tmp_path / "tab")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("hf", tmp_path, path=str(tmp_path / "tab"), label_column="target")


def test_uncached_hub_name_offline_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="save_to_disk") as err:
        load_dataset("hf", tmp_path, path="ylecun/mnist")
    assert "not in the local cache" in str(err.value)


def _fit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    return subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", "--data.dataset", "hf",
         "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path),
         "--data.batch_size", "8", *args],  # the fixtures' clients hold ~30 samples: below the quickstart's 32
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_image_dataset_trains_through_train_py(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": _images(), "test": _images(30, seed=1)}).save_to_disk(tmp_path / "imgs")
    done = _fit(tmp_path, "--data.dataset_args", f"{{path: {tmp_path / 'imgs'}, input_column: image}}",
                "--data.num_clients", "4", "--data.partition", "flwr",
                "--data.partition_args", "{partitioner: IidPartitioner}",
                "--model.client_model.init_args.in_features", "64", "--model.client_model.init_args.num_classes", "3")
    assert done.returncode == 0, done.stderr[-3000:]


def test_tabular_dataset_trains_through_train_py(tmp_path: Path) -> None:
    _tabular().save_to_disk(tmp_path / "tab")
    done = _fit(tmp_path, "--data.dataset_args", f"{{path: {tmp_path / 'tab'}, label_column: target, "
                "test_fraction: 0.2, normalize: true}", "--data.num_clients", "4", "--data.partition", "iid",
                "--data.partition_args", "{}", "--model.client_model.init_args.in_features", "3",
                "--model.client_model.init_args.num_classes", "2")
    assert done.returncode == 0, done.stderr[-3000:]


def test_natural_and_flwr_partitions_of_an_hf_dataset(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": _images(), "test": _images(30, seed=1)}).save_to_disk(tmp_path / "imgs")
    args = {"path": str(tmp_path / "imgs"), "natural_id_column": "writer"}
    ours = FederatedDataModule(dataset="hf", dataset_args=args, num_clients=6, partition="natural", data_dir=tmp_path,
                               batch_size=8)
    ours.setup()
    flwr = FederatedDataModule(dataset="hf", dataset_args=args, num_clients=6, partition="flwr",
                               partition_args={"partitioner": "NaturalIdPartitioner"}, data_dir=tmp_path,
                               batch_size=8)
    flwr.setup()
    assert sorted(map(len, ours.client_indices)) == sorted(map(len, flwr.client_indices)) == [20] * 6
    dirichlet = partition("flwr", np.arange(120) % 3, 4, seed=3, partitioner="DirichletPartitioner", alpha=0.5,
                          min_partition_size=5)
    joined = np.concatenate(dirichlet)
    assert len(joined) == len(set(joined.tolist())) and all(len(p) >= 5 for p in dirichlet)
    assert [p.tolist() for p in dirichlet] == [p.tolist() for p in partition(
        "flwr", np.arange(120) % 3, 4, seed=3, partitioner="DirichletPartitioner", alpha=0.5, min_partition_size=5)]


def test_flwr_rejects_unknown_names_and_mismatched_client_counts() -> None:
    with pytest.raises(ValueError, match="DirichletPartitioner"):
        partition("flwr", np.zeros(10), 2, partitioner="NoSuchPartitioner")
    with pytest.raises(ValueError, match="num_clients"):
        partition("flwr", np.zeros(12), 2, groups=np.arange(12) % 3, partitioner="NaturalIdPartitioner")


@pytest.mark.parametrize(("module", "call"), [
    ("datasets", lambda tmp: load_dataset("hf", tmp, path="ylecun/mnist")),
    ("flwr_datasets", lambda tmp: partition("flwr", np.zeros(10), 2, partitioner="IidPartitioner")),
])
def test_missing_hf_extra_says_how_to_install_it(module, call, tmp_path: Path, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ImportError
    with pytest.raises(MissingExtraError) as err:
        call(tmp_path)
    message = str(err.value)
    assert "\n" not in message and 'pip install -e ".[hf]"' in message and "[hf]" in message


def test_hf_config_parses_in_the_cli(tmp_path: Path) -> None:
    cli = FederatedCLI(args=["--config", str(ROOT / "configs" / "hf" / "mnist.yaml"), "--trainer.logger", "false",
                             "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.datamodule.dataset == "hf" and cli.datamodule.dataset_args["path"] == "ylecun/mnist"
    assert cli.datamodule.partition == "flwr"
    done = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/hf/mnist.yaml", "--print_config"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ylecun/mnist" in done.stdout, done.stderr[-2000:]


def test_the_core_imports_no_extra() -> None:
    code = ("import sys, fl_lightning, fl_lightning.cli, fl_lightning.dashboard, fl_lightning.data.datamodule, "
            "fl_lightning.data.partition, fl_lightning.data.datasets; "
            "print(sorted(m for m in ('datasets', 'flwr_datasets', 'wandb_workspaces') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
