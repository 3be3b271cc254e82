"""``FederatedDataModule``: in-memory tensors split into clients, sampled on the module's device (DESIGN §2.3).

Every local step draws, for every client i, a minibatch of ``batch_size`` samples uniformly with
replacement from D_i (or all of D_i when ``batch_size`` is None: deterministic gradient descent). The
draw for step t uses a generator seeded from (seed, t) only, so it is the same whatever clients run on
which device or rank, and a resumed run draws exactly what the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from fl_lightning.data.client_split import check_fraction, split_clients
from fl_lightning.data.datasets import DatasetSplits, load_dataset
from fl_lightning.objective import ClientBatch
from fl_lightning.seeding import derive_seed, step_seed

ClientWeighting = Literal["uniform", "num_samples"]

def _typed_values(options: dict[str, Any]) -> dict[str, Any]:
    """Strings in a dict option read as YAML values: ``--data.partition_args.dirichlet.alpha 0.1`` gives the
    string ``"0.1"`` (the dict's values are untyped for the parser); the partitioner needs the float."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            value = _typed_values(value)
        elif isinstance(value, str):
            with contextlib.suppress(yaml.YAMLError):  # not YAML: the string itself
                value = yaml.safe_load(value)
        out[key] = value
    return out


class _StepTokens:
    """The 'dataloader' Lightning iterates: one token per local step (the data itself is sampled by the
    module on its device, see :meth:`FederatedDataModule.sample`)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.steps))


class _TensorBatches:
    """Consecutive (x, y) slices of a held-out split."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.x), self.batch_size):
            yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]


def _check_pairs(pairs: Sequence[tuple[Tensor, Tensor]], what: str, *, allow_empty: bool) -> None:
    for i, (x, y) in enumerate(pairs):
        if len(x) == 0 and not allow_empty:
            raise ValueError(f"{what} {i} has no samples")
        if len(x) != len(y):
            raise ValueError(f"{what} {i}: {len(x)} inputs but {len(y)} targets")


def _consecutive(sizes: Sequence[int]) -> list[np.ndarray]:
    """Index ranges of consecutive blocks of ``sizes`` samples."""
    ends = np.cumsum([0, *sizes])
    return [np.arange(ends[i], ends[i + 1]) for i in range(len(sizes))]


class FederatedDataModule(LightningDataModule):
    """A dataset split into ``num_clients`` clients.

    Args:
        dataset: a registered dataset name (``digits`` is embedded; see ``fl_lightning.data.datasets``).
        num_clients: n.
        partition: a registered partitioner: ``iid``, ``dirichlet``, ``shard``, ``pathological``, ``natural``.
        partition_args: its options, e.g. ``{alpha: 0.5, min_partition_size: 10}`` for ``dirichlet``.
        batch_size: samples per client per local step; None = the whole local dataset (full gradient).
        client_weighting: w_i = 1/n (``uniform``, the theory's default) or w_i ∝ |D_i| (``num_samples``).
        steps_per_epoch: local steps per Lightning epoch (default: one pass over an average client's
            data; 100 with full batches, where one step is a pass).
        eval_batch_size: batch size of the held-out split.
        data_dir: where datasets are read from (and downloaded to).
        dataset_args: options of the dataset loader.
        augment: a registered augmentation (``crop_flip``) applied on the device to each sampled batch;
            its random draws, like the minibatch's, depend only on (seed, step, client).
        seed: seeds the partition and the sampling; default derived from torch's initial seed at setup.
        client_test_fraction: hold this fraction of every client's partition out as the client's own test split
            (stratified by label, seeded; :mod:`fl_lightning.data.client_split`), on which the global model is
            evaluated per client (``val/client_acc_*``); 0 = none. The central test split stays as it is.
    """

    def __init__(
        self,
        dataset: str = "digits",
        num_clients: int = 10,
        partition: str = "dirichlet",
        partition_args: dict[str, Any] | None = None,
        batch_size: int | None = 32,
        client_weighting: ClientWeighting = "uniform",
        steps_per_epoch: int | None = None,
        eval_batch_size: int = 1024,
        data_dir: str | Path = "data",
        dataset_args: dict[str, Any] | None = None,
        augment: str | None = None,
        seed: int | None = None,
        client_test_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or null for the full local dataset), got {batch_size}")
        if client_weighting not in ("uniform", "num_samples"):
            raise ValueError(f"client_weighting must be 'uniform' or 'num_samples', got {client_weighting!r}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.dataset = dataset
        self._num_clients = num_clients
        self.partition = partition
        self.partition_args = _typed_values(dict(partition_args or {}))
        self.batch_size = batch_size
        self.client_weighting = client_weighting
        self._steps_per_epoch = steps_per_epoch
        self.eval_batch_size = eval_batch_size
        self.data_dir = Path(data_dir)
        self.dataset_args = dict(dataset_args or {})
        self.augment = augment
        self.seed = seed
        self.client_test_fraction = check_fraction(client_test_fraction)
        self.data: DatasetSplits | None = None
        self.client_indices: list[np.ndarray] | None = None
        self.client_test_indices: list[np.ndarray] | None = None  # into the training tensors, like client_indices
        self._device_cache: dict[Any, tuple[Tensor, ...]] = {}
        if augment is not None:
            from fl_lightning.data.augment import get_augmentation

            get_augmentation(augment)  # fail now on an unknown name

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_client_tensors(
        cls,
        clients: Sequence[tuple[Tensor, Tensor]],
        test: tuple[Tensor, Tensor] | None = None,
        batch_size: int | None = 32,
        num_classes: int | None = None,
        client_test: Sequence[tuple[Tensor, Tensor]] | None = None,
        **kwargs: Any,
    ) -> FederatedDataModule:
        """Data a user has already split: ``clients=[(x_1, y_1), ...]``; ``test=(x, y)`` for validation;
        ``client_test=[(x_1, y_1), ...]`` each client's own test data (a client's may be empty).

        ``num_classes`` defaults to max label + 1 for integer targets (None for float targets).
        """
        if len(clients) == 0:
            raise ValueError("from_client_tensors needs at least one client")
        _check_pairs(clients, "client", allow_empty=False)
        if client_test is not None:
            if len(client_test) != len(clients):
                raise ValueError(f"client_test needs one (x, y) per client: {len(clients)} clients, "
                                 f"{len(client_test)} test splits")
            if kwargs.get("client_test_fraction"):
                raise ValueError("give client_test or client_test_fraction, not both")
            _check_pairs(client_test, "client_test of client", allow_empty=True)
        pairs = list(clients) + list(client_test or [])
        xs = torch.cat([torch.as_tensor(x) for x, _ in pairs])
        ys = torch.cat([torch.as_tensor(y) for _, y in pairs])
        if num_classes is None and not ys.is_floating_point():
            num_classes = int(ys.max()) + 1
        tx, ty = test if test is not None else (xs[:0], ys[:0])
        dm = cls(num_clients=len(clients), batch_size=batch_size, **kwargs)
        dm.data = DatasetSplits("custom", xs, ys, torch.as_tensor(tx), torch.as_tensor(ty), num_classes)
        ranges = _consecutive([len(x) for x, _ in pairs])
        dm.client_indices = ranges[: len(clients)]
        if client_test is not None:
            dm.client_test_indices = ranges[len(clients):]
        return dm

    def prepare_data(self) -> None:
        """Download and read the dataset (Lightning calls this once per node, before ``setup``).

        The splits are kept, so this process does not parse the files again in ``setup``; other processes
        of the node read them in their ``setup`` (the files are there by then). Loaders are deterministic,
        so every process holds the same data."""
        from fl_lightning.progress import stage as progress_stage

        if self.data is None:
            with progress_stage(f"preparing {self.dataset}"):
                self.data = load_dataset(self.dataset, self.data_dir, **self.dataset_args)

    def setup(self, stage: str | None = None) -> None:
        from fl_lightning.progress import stage as progress_stage

        if self.seed is None:
            self.seed = derive_seed("data") % (2**31)
        if self.data is None:
            with progress_stage(f"loading {self.dataset}"):
                self.data = load_dataset(self.dataset, self.data_dir, **self.dataset_args)
        labels = self.data.train_y.numpy() if self.data.num_classes is not None else None
        if labels is None:
            labels = np.zeros(len(self.data.train_y), dtype=np.int64)
        if self.client_indices is None:
            from fl_lightning.data.partition import partition

            with progress_stage(f"partitioning into {self._num_clients} clients ({self.partition})"):
                self.client_indices = partition(
                    self.partition, labels, self._num_clients, seed=self.seed,
                    groups=self.data.train_groups, **self.partition_args,
                )
        if self.client_test_indices is None and self.client_test_fraction > 0:
            self.client_indices, self.client_test_indices = split_clients(
                self.client_indices, labels, self.client_test_fraction, self.seed)
        self._validate_clients()

    def _validate_clients(self) -> None:
        assert self.client_indices is not None
        if len(self.client_indices) != self._num_clients:
            raise ValueError(f"partition produced {len(self.client_indices)} clients, expected {self._num_clients}")
        empty = [i for i, idx in enumerate(self.client_indices) if len(idx) == 0]
        if empty:
            raise ValueError(f"clients {empty[:10]} received no samples; use fewer clients or another partition")
        if self.client_test_indices is None:
            self.client_test_indices = [idx[:0] for idx in self.client_indices]
        if len(self.client_test_indices) != self._num_clients:
            raise ValueError(f"{len(self.client_test_indices)} client test splits for {self._num_clients} clients")
        self._check_batch_size([len(idx) for idx in self.client_indices])

    def _check_batch_size(self, sizes: list[int]) -> None:
        """A minibatch larger than a client's data repeats its samples (drawn with replacement): an error when
        that holds for every client (the steps cost more and sample nothing new), a warning for some."""
        if self.batch_size is None:
            return
        smaller = sum(size < self.batch_size for size in sizes)
        if smaller == len(sizes):
            raise ValueError(
                f"batch_size={self.batch_size} exceeds every client's data (the largest client holds {max(sizes)} "
                f"samples): each step would draw every sample about {self.batch_size / max(sizes):.0f} times. "
                f"Use batch_size <= {max(sizes)}, or batch_size: null for full-batch steps"
            )
        if smaller:
            rank_zero_warn(f"batch_size={self.batch_size} exceeds the data of {smaller} of {len(sizes)} clients "
                           f"(smallest: {min(sizes)} samples): their minibatches repeat samples")

    def _require(self) -> tuple[DatasetSplits, list[np.ndarray]]:
        if self.data is None or self.client_indices is None:
            self.setup()
        assert self.data is not None and self.client_indices is not None
        return self.data, self.client_indices

    # ------------------------------------------------------------------ properties
    @property
    def num_clients(self) -> int:
        return self._num_clients

    @property
    def num_classes(self) -> int | None:
        return self._require()[0].num_classes

    @property
    def client_sizes(self) -> np.ndarray:
        return np.array([len(idx) for idx in self._require()[1]])

    @property
    def client_weights(self) -> Tensor:
        """w_i, summing to 1 (DESIGN §1.1)."""
        sizes = torch.as_tensor(self.client_sizes, dtype=torch.float64)
        w = torch.ones_like(sizes) if self.client_weighting == "uniform" else sizes
        return w / w.sum()

    @property
    def client_test_sizes(self) -> np.ndarray:
        """The number of test samples of every client (0 without client test splits)."""
        self._require()
        assert self.client_test_indices is not None
        return np.array([len(idx) for idx in self.client_test_indices])

    @property
    def has_client_test_data(self) -> bool:
        """Whether any client has its own test split (``client_test_fraction`` > 0 or ``client_test``)."""
        return bool(self.client_test_sizes.sum() > 0)

    @property
    def has_eval_data(self) -> bool:
        """Whether there is a held-out split to evaluate on."""
        return len(self._require()[0].test_y) > 0

    @property
    def padded(self) -> bool:
        """Whether full-batch steps pad clients of unequal sizes."""
        return self.batch_size is None and len(set(self.client_sizes.tolist())) > 1

    @property
    def steps_per_epoch(self) -> int:
        if self._steps_per_epoch is not None:
            return self._steps_per_epoch
        if self.batch_size is None:
            return 100
        return max(1, math.ceil(float(self.client_sizes.mean()) / self.batch_size))

    # ------------------------------------------------------------------ sampling
    def _on(self, device: torch.device, split: Literal["train", "test"] = "train") -> tuple[Tensor, ...]:
        """(all training inputs, targets, the [n, max |D_i|] index table of the clients' ``split``, the sizes [n])
        on ``device``, padded rows holding index 0."""
        key = f"{split}:{device}"
        if key not in self._device_cache:
            data, indices = self._require()
            if split == "test":
                assert self.client_test_indices is not None
                indices = self.client_test_indices
            counts = torch.tensor([len(i) for i in indices], dtype=torch.long)
            table = torch.zeros(len(indices), max(int(counts.max()), 1), dtype=torch.long)
            for row, idx in enumerate(indices):
                table[row, : len(idx)] = torch.as_tensor(idx, dtype=torch.long)
            self._device_cache[key] = tuple(t.to(device) for t in (data.train_x, data.train_y, table, counts))
        return self._device_cache[key]

    def client_test_data(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every client's test split on ``device``: (inputs, targets, index table [n, T] into them, sizes [n]);
        row i of the table lists client i's test samples, padded at the end with index 0."""
        x, y, table, counts = self._on(device, "test")
        return x, y, table, counts

    def sample(self, step: int, clients: Tensor | None, device: torch.device,
               dtype: torch.dtype = torch.float32, seed: int | None = None) -> ClientBatch:
        """The batch of local step ``step`` for ``clients`` (None = all), stacked: [c, B, ...]; ``seed``: of the
        draw's stream instead of the datamodule's (the training steps use the datamodule's)."""
        x_all, y_all, table, counts = self._on(device)
        rows = table if clients is None else table[clients]
        cnt = counts if clients is None else counts[clients]
        mask = None
        if self.batch_size is None:
            idx = rows
            if self.padded:
                mask = torch.arange(rows.shape[1], device=device).unsqueeze(0) < cnt.unsqueeze(1)
        else:
            assert self.seed is not None
            gen = torch.Generator(device=device)
            gen.manual_seed(step_seed(self.seed if seed is None else seed, step))
            u = torch.rand(self._num_clients, self.batch_size, generator=gen, device=device)
            if clients is not None:
                u = u[clients]
            pos = torch.minimum((u * cnt.unsqueeze(1)).long(), (cnt - 1).unsqueeze(1))
            idx = rows.gather(1, pos)
        flat = idx.reshape(-1)  # index_select: about 2x faster than x_all[idx] on the CPU
        x = x_all.index_select(0, flat).view(*idx.shape, *x_all.shape[1:])
        y = y_all.index_select(0, flat).view(*idx.shape, *y_all.shape[1:])
        if x.is_floating_point():
            x = x.to(dtype)
        if y.is_floating_point():
            y = y.to(dtype)
        if self.augment is not None:
            from fl_lightning.data.augment import get_augmentation

            assert self.seed is not None
            gen = torch.Generator(device=device)
            gen.manual_seed(step_seed(self.seed + 1, step))
            # drawn for all n clients and restricted to ``clients``, like the minibatch indices above
            subset = {} if clients is None else {"rows": clients, "num_rows": self._num_clients}
            x = get_augmentation(self.augment)(x, generator=gen, **subset)
        return ClientBatch(x, y, mask)

    def eval_batches(self, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """The held-out split in batches, on ``device``."""
        data, _ = self._require()
        key = f"eval:{device}"
        if key not in self._device_cache:
            self._device_cache[key] = (data.test_x.to(device), data.test_y.to(device))
        x, y = self._device_cache[key]
        return iter(_TensorBatches(x, y, self.eval_batch_size))

    # ------------------------------------------------------------------ Lightning loaders
    def train_dataloader(self) -> _StepTokens:
        return _StepTokens(self.steps_per_epoch)

    def val_dataloader(self) -> _TensorBatches:
        data, _ = self._require()
        return _TensorBatches(data.test_x, data.test_y, self.eval_batch_size)

    def test_dataloader(self) -> _TensorBatches:
        return self.val_dataloader()

    def predict_dataloader(self) -> _TensorBatches:
        """The held-out split's batches; ``predict_step`` uses their inputs."""
        return self.val_dataloader()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        _, indices = self._require()
        assert self.client_test_indices is not None
        return {"seed": self.seed, "client_indices": [torch.as_tensor(i) for i in indices],
                "client_test_indices": [torch.as_tensor(i) for i in self.client_test_indices]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.client_indices = [t.numpy() for t in state_dict["client_indices"]]
        saved = state_dict.get("client_test_indices")  # absent in checkpoints written before client test splits
        if saved is None and self.client_test_fraction > 0:
            raise ValueError("this checkpoint was written without client test splits (client_test_fraction 0): "
                             "resume it with --data.client_test_fraction 0, or start the run again")
        self.client_test_indices = None if saved is None else [t.numpy() for t in saved]
        self._device_cache.clear()
        self._validate_clients()
