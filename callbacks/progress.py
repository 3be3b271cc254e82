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
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

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
    density = getattr(pl_module, "round_metrics", {}).get("sparsity/density")
    if density is not None:
        out["density"] = f"{float(density):.3f}"
    out["up"] = format_bits(float(comm.bits_up))
    return out


def use_federated_progress_bar(trainer: Trainer) -> Trainer:
    """Replace Lightning's default :class:`TQDMProgressBar` of ``trainer`` (exactly that class, not a subclass
    or a RichProgressBar a user chose) by a :class:`FederatedProgressBar` with the same settings; call it
    before ``fit``. A Trainer without a progress bar (``enable_progress_bar=False``) is left as it is."""
    for i, cb in enumerate(trainer.callbacks):
        if type(cb) is TQDMProgressBar:
            trainer.callbacks[i] = FederatedProgressBar(
                refresh_rate=cb.refresh_rate, process_position=cb.process_position, leave=cb._leave)
    return trainer
