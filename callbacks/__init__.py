"""The callbacks that carry the federated algorithms (installed as ``fl_lightning.callbacks``)."""

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.callbacks.checkpointing import LastOnInterrupt, find_last_checkpoint
from fl_lightning.callbacks.compression import Compression
from fl_lightning.callbacks.control_variates import ControlVariates
from fl_lightning.callbacks.divergence import DivergenceError, DivergenceGuard
from fl_lightning.callbacks.fednova import NormalizedAveraging
from fl_lightning.callbacks.fedprox import ProximalTerm
from fl_lightning.callbacks.interrupt import GracefulInterrupt
from fl_lightning.callbacks.local_work import LocalWork
from fl_lightning.callbacks.metrics import LayerDensity, WandbFederatedMetrics
from fl_lightning.callbacks.privacy import DifferentialPrivacy
from fl_lightning.callbacks.progress import FederatedProgressBar
from fl_lightning.callbacks.prox import L1Prox
from fl_lightning.callbacks.pruning import TopKPruning
from fl_lightning.callbacks.sampling import ClientSampling
from fl_lightning.callbacks.scaffold import Scaffold
from fl_lightning.callbacks.schedule import SkipSchedule
from fl_lightning.callbacks.server_opt import ServerOptimizer
from fl_lightning.callbacks.summary import RunSummary

__all__ = [
    "ClientSampling",
    "Compression",
    "ControlVariates",
    "DifferentialPrivacy",
    "DivergenceError",
    "DivergenceGuard",
    "FederatedCallback",
    "FederatedProgressBar",
    "GracefulInterrupt",
    "L1Prox",
    "LastOnInterrupt",
    "LayerDensity",
    "LocalWork",
    "NormalizedAveraging",
    "ProximalTerm",
    "RunSummary",
    "Scaffold",
    "ServerOptimizer",
    "SkipSchedule",
    "TopKPruning",
    "WandbFederatedMetrics",
    "find_last_checkpoint",
]
