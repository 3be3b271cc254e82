"""Algorithm presets (DESIGN §1.3): named, frozen hyper-parameters that expand into callbacks.

Use them three ways, all equivalent:

- Python, callbacks: ``Trainer(callbacks=fl_lightning.algorithms.proxskip(p=0.2))``;
- Python, on the module: ``FederatedLightningModule(model, lr, algorithm=ProxSkip(p=0.2))``;
- YAML: ``--config configs/algorithms/proxskip.yaml`` (sets ``model.algorithm``).

Every preset is also reachable by composing the callbacks of ``fl_lightning.callbacks`` by hand.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from lightning.pytorch import Callback

from fl_lightning.callbacks import ClientSampling, ControlVariates, SkipSchedule
from fl_lightning.callbacks.control_variates import Reference
from fl_lightning.callbacks.schedule import ScheduleMode
from fl_lightning.registry import Registry


class Algorithm:
    """A federated algorithm: hyper-parameters (a frozen dataclass in subclasses) → callbacks."""

    name: ClassVar[str] = "custom"

    def callbacks(self) -> list[Callback]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The preset's name and hyper-parameters (stored with the run's hyper-parameters)."""
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]

    def __post_init__(self) -> None:
        self.callbacks()  # invalid values fail at construction, with the callback's message


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")


def register_algorithm(name: str) -> Any:
    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        return ALGORITHMS.register(name)(cls)

    return decorator


def get_algorithm(name: str, **kwargs: Any) -> Algorithm:
    """The preset ``name`` with hyper-parameters ``kwargs``."""
    cls = ALGORITHMS.get(name)
    accepted = set(inspect.signature(cls).parameters)
    unknown = set(kwargs) - accepted
    if unknown:
        raise ValueError(f"{name} does not take {sorted(unknown)}; it accepts {sorted(accepted)}")
    return cls(**kwargs)


def _preset_function(cls: type[Algorithm]) -> Any:
    """``fl_lightning.algorithms.<name>(**hyper-parameters) -> list of callbacks``."""

    @functools.wraps(cls, assigned=("__doc__",), updated=())
    def preset(**kwargs: Any) -> list[Callback]:
        return get_algorithm(cls.name, **kwargs).callbacks()

    preset.__name__ = preset.__qualname__ = cls.name
    preset.__signature__ = inspect.signature(cls).replace(return_annotation="list[Callback]")  # type: ignore[attr-defined]
    return preset


@register_algorithm("fedavg")
@dataclass(frozen=True)
class FedAvg(Algorithm):
    """FedAvg (McMahan et al. 2017): k local SGD steps, then x_i ← Σ_j w_j x̂_j; no control variates.

    With ``cohort_size`` only a random cohort trains in each round (weights renormalised over it).
    """

    local_steps: int = 5
    cohort_size: int | None = None
    seed: int | None = None

    def callbacks(self) -> list[Callback]:
        cbs: list[Callback] = [SkipSchedule(k=self.local_steps, mode="fixed", seed=self.seed)]
        if self.cohort_size is not None:
            cbs.append(ClientSampling(self.cohort_size, seed=self.seed))
        return cbs


@register_algorithm("proxskip")
@dataclass(frozen=True)
class ProxSkip(Algorithm):
    """ProxSkip / Scaffnew (Mishchenko et al., ICML 2022), DESIGN §1.2 without pruning:

    x̂_i = x_i − γ (∇f_i(x_i) − h_i);  with probability p:  x̄ = Σ_i w_i (x̂_i − (γ/p) h_i),
    h_i ← h_i + (p/γ)(x̄ − x̂_i),  x_i ← x̄;  otherwise x_i ← x̂_i.

    ``mode="fixed"`` uses exactly k = round(1/p) local steps per round (and p = 1/k).
    """

    p: float = 0.2
    mode: ScheduleMode = "bernoulli"
    reference: Reference = "mean"
    seed: int | None = None

    def callbacks(self) -> list[Callback]:
        return [SkipSchedule(p=self.p, mode=self.mode, seed=self.seed), ControlVariates(reference=self.reference)]


fedavg = _preset_function(FedAvg)
proxskip = _preset_function(ProxSkip)

__all__ = ["ALGORITHMS", "Algorithm", "FedAvg", "ProxSkip", "fedavg", "get_algorithm", "proxskip",
           "register_algorithm"]
