"""Federated data: datasets, partitioners, the datamodule.

Importing the package registers Flower Datasets' partitioners as ``partition: flwr``
(:mod:`fl_lightning.data.flwr_partitioners`, which imports Flower only when used).
"""

from fl_lightning.data import flwr_partitioners  # noqa: F401
