"""The callbacks that carry the federated algorithms (installed as ``fl_lightning.callbacks``)."""

from fl_lightning.callbacks.base import FederatedCallback
from fl_lightning.callbacks.control_variates import ControlVariates
from fl_lightning.callbacks.sampling import ClientSampling
from fl_lightning.callbacks.schedule import SkipSchedule

__all__ = ["ClientSampling", "ControlVariates", "FederatedCallback", "SkipSchedule"]
