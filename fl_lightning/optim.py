"""The clients' local optimizer, over the stacked client parameters x ∈ R^{n×...} (DESIGN §1.2).

Every client takes its own local steps, so only optimizers that act **elementwise** are allowed: their
update of a coordinate depends on that coordinate's gradient and state alone (SGD with momentum, Adam,
AdamW, RMSprop, ...). Over the stacked tensors such an optimizer is exactly n independent per-client
optimizers with per-client state. Optimizers that couple coordinates (L-BFGS's line search over the whole
vector, Adafactor's relative step over the whole tensor, LAMB-like trust ratios) would mix clients and
are refused.

How they meet the control variates. :class:`~fl_lightning.callbacks.ControlVariates` shifts the gradient
before the optimizer sees it, g_i = ∇f_i(x_i) − h_i, so SGD gives the ProxSkip step
x̂_i = x_i − γ (∇f_i(x_i) − h_i) exactly, and any other optimizer applies its own rule to the shifted
gradient (e.g. Adam: x̂_i = x_i − γ m̂_i / (√v̂_i + ε) with m, v the moments of g_i). A fixed point of
ProxSkip (g_i = 0 at the consensus) stays a fixed point, but the convergence theory is for SGD only, and
the step size γ in h_i ← h_i + (p/γ)(x̄ − x̂_i) is the optimizer's ``lr`` — the module's ``lr``, which is
why an optimizer's own ``lr`` must not differ from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

#: Optimizers of ``torch.optim`` whose update is elementwise (per coordinate), so per client when stacked.
ELEMENTWISE: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.Rprop,
    torch.optim.ASGD,
)
#: Optimizer state that is a first moment (momentum): TopK zeroes it with the weight it prunes (DESIGN §1.4).
FIRST_MOMENTS: tuple[str, ...] = ("momentum_buffer", "exp_avg")
OptimizerSpec = str | Mapping[str, Any]


def _supported() -> str:
    return ", ".join(cls.__name__ for cls in ELEMENTWISE)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """``"Adam"``, ``"adam"`` or ``"torch.optim.Adam"`` → the class, if it is elementwise."""
    module, _, short = name.rpartition(".")
    for cls in ELEMENTWISE:
        if short.lower() == cls.__name__.lower() and (not module or module.startswith("torch.optim")):
            return cls
    raise ValueError(
        f"local optimizer {name!r} is not supported: clients need an optimizer that is elementwise over the "
        f"stacked client parameters ({_supported()})"
    )


def split_spec(spec: OptimizerSpec) -> tuple[str, dict[str, Any]]:
    """A class name, or ``{"class_path", "init_args"}``, as (name, a copy of its init args)."""
    if isinstance(spec, str):
        return spec, {}
    return str(spec["class_path"]), dict(spec.get("init_args") or {})


def _default_lr(cls: type[torch.optim.Optimizer]) -> Any:
    return inspect.signature(cls).parameters["lr"].default


def build_local_optimizer(spec: OptimizerSpec | None, params: Iterable[nn.Parameter], *, lr: float,
                          momentum: float = 0.0, weight_decay: float = 0.0,
                          chosen_by_client: bool = False) -> torch.optim.Optimizer:
    """The local optimizer over the stacked client parameters with step size γ = ``lr``.

    Args:
        spec: None or ``"sgd"`` (SGD with ``momentum`` and ``weight_decay``); a class name (``"Adam"``); or
            ``{"class_path": "torch.optim.Adam", "init_args": {...}}`` as LightningCLI writes ``--optimizer``.
            Its ``lr``, if given, must be γ or the class default (which γ then replaces).
        chosen_by_client: ``spec`` comes from the client model's ``configure_optimizers``: its ``lr`` is
            replaced by γ with a warning that says so.

    Raises:
        ValueError: for an optimizer that is not elementwise, an ``lr`` that differs from γ, or ``momentum``
            / ``weight_decay`` given to the module together with a non-SGD optimizer.
    """
    if spec is None or (isinstance(spec, str) and spec.lower() == "sgd" and "." not in spec):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    name, init_args = split_spec(spec)
    cls = optimizer_class(name)
    given_lr = init_args.pop("lr", None)
    if chosen_by_client and given_lr is not None and given_lr != lr:
        rank_zero_warn(f"the client model's configure_optimizers uses {cls.__name__} with lr={given_lr}; clients "
                       f"train with {cls.__name__} and the federated step size γ = model.lr = {lr} (--model.lr)")
    elif given_lr is not None and given_lr != lr and given_lr != _default_lr(cls):
        raise ValueError(
            f"the local optimizer's lr ({given_lr}) differs from the model's lr ({lr}): the step size γ is also "
            "the control variates' (h ← h + (p/γ)(x̄ − x̂)), so set it once, as model.lr (--model.lr)"
        )
    if cls is not torch.optim.SGD and (momentum or weight_decay):
        raise ValueError(
            f"model.momentum / model.weight_decay configure the default SGD; give {cls.__name__}'s own options "
            f"instead (e.g. --optimizer.weight_decay), and leave model.momentum and model.weight_decay at 0"
        )
    if cls is torch.optim.SGD:
        init_args.setdefault("momentum", momentum)
        init_args.setdefault("weight_decay", weight_decay)
    return cls(params, lr=lr, **init_args)


def client_optimizer_spec(client_model: nn.Module) -> dict[str, Any] | None:
    """The optimizer a client LightningModule's own ``configure_optimizers`` asks for, as a spec for
    :func:`build_local_optimizer` (its class and hyper-parameters), or None when it defines none.

    Raises:
        ValueError: when it returns several optimizers, several parameter groups or LR schedulers, which have
            no per-client meaning here (say what to do instead).
    """
    if not isinstance(client_model, LightningModule) or not is_overridden("configure_optimizers", client_model,
                                                                            LightningModule):
        return None
    name = type(client_model).__name__
    out = client_model.configure_optimizers()
    if isinstance(out, Mapping):
        if out.get("lr_scheduler") is not None:
            raise ValueError(f"{name}.configure_optimizers returns an LR scheduler: give it to the federated module "
                             "instead (LightningCLI: --lr_scheduler)")
        out = out.get("optimizer")
    if isinstance(out, (list, tuple)):
        if len(out) == 2 and isinstance(out[0], (list, tuple)):  # ([optimizers], [schedulers])
            if out[1]:
                raise ValueError(f"{name}.configure_optimizers returns LR schedulers: give one to the federated "
                                 "module instead (LightningCLI: --lr_scheduler)")
            out = out[0]
        if len(out) != 1:
            raise ValueError(f"{name}.configure_optimizers returns {len(out)} optimizers; clients train with one")
        out = out[0]
    if not isinstance(out, torch.optim.Optimizer):
        raise ValueError(f"{name}.configure_optimizers must return one torch optimizer, got {type(out).__name__}")
    if len(out.param_groups) != 1:
        raise ValueError(f"{name}.configure_optimizers uses {len(out.param_groups)} parameter groups; the local "
                         "optimizer of the stacked clients has one")
    cls = type(out)
    optimizer_class(cls.__name__)  # refuse a non-elementwise one with the usual message
    group = {k: v for k, v in out.param_groups[0].items() if k != "params"}
    return {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": group}


def build_lr_scheduler(spec: OptimizerSpec | None, optimizer: torch.optim.Optimizer
                       ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A ``torch.optim.lr_scheduler`` class (name or ``{"class_path", "init_args"}``, as LightningCLI's
    ``--lr_scheduler`` writes it) over the local optimizer, stepped after every local step, so γ_t follows
    it in the local steps and in the control variates' p/γ_t alike.

    Raises:
        ValueError: for a scheduler outside ``torch.optim.lr_scheduler`` or one that needs a monitored metric
            (``ReduceLROnPlateau``).
    """
    if spec is None:
        return None
    name, init_args = split_spec(spec)
    module, _, short = name.rpartition(".")
    cls = getattr(torch.optim.lr_scheduler, short, None)
    if (module and not module.startswith("torch.optim")) or not (
            isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler)):
        raise ValueError(f"unknown LR scheduler {name!r}: give a class of torch.optim.lr_scheduler (e.g. StepLR)")
    if cls is torch.optim.lr_scheduler.ReduceLROnPlateau:
        raise ValueError("ReduceLROnPlateau needs a monitored metric at every step; use a step-based scheduler "
                         "(StepLR, CosineAnnealingLR, ...), which is stepped after every local step")
    return cls(optimizer, **init_args)


def configure_local_optimizer(params: Iterable[nn.Parameter], spec: OptimizerSpec | None,
                              client_spec: OptimizerSpec | None, scheduler_spec: OptimizerSpec | None, *, lr: float,
                              momentum: float = 0.0, weight_decay: float = 0.0) -> Any:
    """What ``FederatedLightningModule.configure_optimizers`` returns: the local optimizer ``spec`` if given, else
    the client model's own (``client_spec``, :func:`client_optimizer_spec`), else SGD; with ``scheduler_spec``,
    Lightning's ``{"optimizer", "lr_scheduler"}`` dict (stepped every local step)."""
    chosen, from_client = spec, False
    if chosen is None and client_spec is not None:
        chosen, from_client = client_spec, True
    elif chosen is not None and client_spec is not None:
        rank_zero_info(f"the client model's configure_optimizers is replaced by the optimizer {chosen!r}")
    optimizer = build_local_optimizer(chosen, params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      chosen_by_client=from_client)
    scheduler = build_lr_scheduler(scheduler_spec, optimizer)
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
