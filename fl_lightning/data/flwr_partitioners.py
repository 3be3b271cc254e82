"""Flower Datasets' partitioners by name: ``partition: flwr`` (needs the extra ``[hf]``).

::

    FederatedDataModule(dataset="hf", ..., partition="flwr",
                        partition_args={"partitioner": "DirichletPartitioner", "alpha": 0.3})

Any of ``flwr_datasets.partitioner``'s sample partitioners works on any of our datasets: the adapter hands it a
small ``datasets.Dataset`` with one row per training sample (columns ``index``, ``label`` and, when the dataset
has natural ids, ``group``), reads the ``index`` column of every partition and returns those index arrays.
Defaults it fills in when the partitioner takes them and ``partition_args`` does not say: ``num_partitions`` =
``num_clients``, ``partition_by`` = ``label`` (``group`` for the natural-id partitioners), ``seed`` = the data
seed. Every other option goes to the partitioner as it is (Flower's names: ``alpha``, ``partition_sizes``,
``num_classes_per_partition``, ...).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from fl_lightning.data.partition import PARTITIONERS
from fl_lightning.extras import require

INDEX, LABEL, GROUP = "index", "label", "group"
_BY_GROUP = ("NaturalIdPartitioner", "GroupedNaturalIdPartitioner")


def flwr_partitioner_class(name: str) -> type:
    """The class ``flwr_datasets.partitioner.<name>``, or a ValueError listing the sample partitioners."""
    module = require("flwr_datasets.partitioner", extra="hf", feature="partition: flwr")
    base = module.Partitioner
    usable = sorted(
        n for n in dir(module)
        if inspect.isclass(getattr(module, n)) and issubclass(getattr(module, n), base)
        and n != "Partitioner" and not n.startswith("Vertical")
    )
    if name not in usable:
        raise ValueError(f"partition: flwr: partitioner must be one of Flower Datasets' {usable}, got {name!r}")
    return getattr(module, name)


@PARTITIONERS.register("flwr")
def flwr(
    labels: np.ndarray,
    num_clients: int,
    *,
    partitioner: str | None = None,
    groups: np.ndarray | None = None,
    seed: int = 0,
    **options: Any,
) -> list[np.ndarray]:
    """Split with the Flower Datasets partitioner named ``partitioner`` (e.g. ``InnerDirichletPartitioner``),
    constructed with ``options`` and the defaults above; one sorted int64 index array per client."""
    if not partitioner:
        raise ValueError("partition: flwr needs partition_args.partitioner, e.g. DirichletPartitioner")
    cls = flwr_partitioner_class(partitioner)
    datasets = require("datasets", extra="hf", feature="partition: flwr")
    labels = np.asarray(labels)
    columns: dict[str, Any] = {INDEX: np.arange(len(labels)), LABEL: labels}
    if groups is not None:
        columns[GROUP] = np.asarray(groups)
    params = inspect.signature(cls).parameters
    kwargs = dict(options)
    if "num_partitions" in params:
        kwargs.setdefault("num_partitions", num_clients)
    if "partition_by" in params:
        kwargs.setdefault("partition_by", GROUP if partitioner in _BY_GROUP else LABEL)
        if kwargs["partition_by"] not in columns:
            raise ValueError(
                f"partition: flwr: partition_by must be {LABEL!r}" + (f" or {GROUP!r}" if groups is not None else "")
                + f" (the dataset has {'no natural ids' if groups is None else 'natural ids'}), "
                f"got {kwargs['partition_by']!r}"
            )
    if "seed" in params:
        kwargs.setdefault("seed", seed)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"partition: flwr: {partitioner} does not take {unknown}; it takes {sorted(params)}")
    instance = cls(**kwargs)
    instance.dataset = datasets.Dataset.from_dict(columns)
    made = instance.num_partitions
    if made != num_clients:
        raise ValueError(
            f"partition: flwr: {partitioner} made {made} partitions but num_clients is {num_clients}; "
            f"set data.num_clients: {made} (or change the partitioner's options)"
        )
    return [np.sort(np.asarray(instance.load_partition(i)[INDEX], dtype=np.int64)) for i in range(made)]


__all__ = ["flwr", "flwr_partitioner_class"]
