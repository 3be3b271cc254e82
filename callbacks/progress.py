"""``FederatedProgressBar``: Lightning's TQDM bar, showing the round, the global model's density and the bits
sent so far.

    Epoch 0:  40%|████      | 40/100 [00:02<00:00, round=7, density=0.100, up=1.23 Mb, loss=0.912, val/acc=0.81]

``round`` is ``module.round_index`` (communication rounds finished), ``density`` the fraction of non-zeros of
the global model after the last round (``sparsity/density``), ``up`` the cumulative uplink bits
(``comm/bits_up``, all clients together). Use it with ``Trainer(callbacks=[FederatedProgressBar()])``, on the
command line with ``--trainer.callbacks+=fl_lightning.callbacks.progress.FederatedProgressBar``, or swap it for
the default bar of a Trainer built elsewhere with :func:`use_federated_progress_bar`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from typing_extensions import override

from fl_lightning import metric_keys as keys
from fl_lightning.progress import format_bits


class FederatedProgressBar(TQDMProgressBar):
    """A :class:`~lightning.pytorch.callbacks.TQDMProgressBar` that leads with ``round``, ``density`` and ``up``
    (uplink bits) for a :class:`~fl_lightning.FederatedLightningModule`; other modules get the usual bar.

    Args: those of ``TQDMProgressBar`` (``refresh_rate``, ``process_position``, ``leave``).
    """

    @override
    def get_metrics(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        return {**federated_metrics(pl_module), **{k: v for k, v in items.items() if k != "round"}}


def federated_metrics(pl_module: Any) -> dict[str, int | str]:
    """``round``, ``density`` and ``up`` of a federated module, formatted for a progress bar (empty for other
    modules; ``density`` only once a round has happened)."""
    comm = getattr(pl_module, "comm", None)
    if comm is None or not hasattr(pl_module, "round_index"):
        return {}
    out: dict[str, int | str] = {"round": int(pl_module.round_index)}
    density = getattr(pl_module, "round_metrics", {}).get(keys.DENSITY)
    if density is not None:
        out["density"] = f"{float(density):.3f}"
    out["up"] = format_bits(float(comm.bits_up))
    return out


def use_federated_progress_bar(trainer: Trainer, replace_rich: bool = False) -> Trainer:
    """Replace Lightning's default progress bar of ``trainer`` by a :class:`FederatedProgressBar` with the same
    refresh rate; call it before ``fit``. The default is a :class:`TQDMProgressBar` (exactly that class, not a
    subclass), or a :class:`RichProgressBar` when ``rich`` is installed, which a user may also have chosen: it is
    replaced only with ``replace_rich`` (the CLI passes it when the config names no progress bar). A Trainer
    without a progress bar (``enable_progress_bar=False``) is left as it is."""
    for i, cb in enumerate(trainer.callbacks):
        if type(cb) is TQDMProgressBar:
            trainer.callbacks[i] = FederatedProgressBar(
                refresh_rate=cb.refresh_rate, process_position=cb.process_position, leave=cb._leave)
        elif type(cb) is RichProgressBar and replace_rich:
            trainer.callbacks[i] = FederatedProgressBar(refresh_rate=cb.refresh_rate)
    return trainer


def names_a_progress_bar(callbacks: object) -> bool:
    """Whether a Trainer's ``callbacks`` argument (a callback, a list, or None) holds a progress bar."""
    items = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
    return any(isinstance(cb, ProgressBar) for cb in items)
