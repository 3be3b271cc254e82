"""``RunSummary``: one line at the end of a fit that says what the run did and what it reached.

    fl-lightning: 600 local steps, 115 rounds, 10 clients in 1.6 s (2.7 ms/step) | val/acc 0.944,
    val/loss 0.215 | clients' acc 0.959 ± 0.033 (p10 0.911, min 0.907) | uplink 177 Mb, downlink 177 Mb |
    global density 1.000

With client test splits the line shows the spread of the clients' accuracy (``val/client_acc_*``, and the
personalized models' with ``personalize_steps``).

The figures are the module's ``final_metrics`` (the held-out metrics of the global model and the
communication counters written when training ends) and the wall-clock time of the training loop
(``on_train_start`` to ``on_train_end``: start-up, data preparation and the final evaluation excluded).
"""

from __future__ import annotations

import time

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from fl_lightning import metric_keys as keys
from fl_lightning.progress import format_bits

_SHOWN = (keys.VAL_ACC, keys.VAL_LOSS, keys.EPSILON)


class RunSummary(Callback):
    """Print (``rank_zero_info``, Lightning's logger) a one-line summary of a finished fit.

    It keeps no state across a restart (a resumed fit summarises the steps it ran itself), so it has no
    ``state_dict``.

    Args:
        prefix: the line's first word.
    """

    def __init__(self, prefix: str = "fl-lightning") -> None:
        self.prefix = prefix
        self._start: float | None = None
        self._start_step = 0
        self.seconds: float | None = None
        self.line: str | None = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()
        self._start_step = trainer.global_step

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics: dict[str, float] = getattr(pl_module, "final_metrics", {})
        if self.seconds is None or not metrics:
            return
        self.line = self.format(trainer.global_step - self._start_step, metrics, self.seconds,
                                getattr(pl_module, "num_clients", None))
        rank_zero_info(self.line)

    def format(self, steps: int, metrics: dict[str, float], seconds: float, clients: int | None) -> str:
        """The summary line of a fit of ``steps`` local steps that took ``seconds``."""
        per_step = f" ({1e3 * seconds / steps:.1f} ms/step)" if steps else ""
        who = f", {clients} clients" if clients is not None else ""
        parts = [f"{self.prefix}: {steps} local steps, {int(metrics.get('comm/rounds', 0))} rounds{who} "
                 f"in {_seconds(seconds)} s{per_step}"]
        shown = [f"{k} {metrics[k]:.3f}" for k in _SHOWN if k in metrics]
        if shown:
            parts.append(", ".join(shown))
        spread = [_spread(metrics, kind) for kind in ("client", "personal")]
        parts.extend(text for text in spread if text)
        parts.append(f"uplink {format_bits(metrics.get('comm/bits_up', 0.0))}, "
                     f"downlink {format_bits(metrics.get('comm/bits_down', 0.0))}")
        if keys.DENSITY in metrics:
            parts.append(f"global density {metrics['sparsity/density']:.3f}")
        return " | ".join(parts)


def _spread(metrics: dict[str, float], kind: str) -> str | None:
    """``clients' acc 0.801 ± 0.160 (p10 0.561, min 0.464)``: the spread of the per-client evaluation."""
    who = "clients'" if kind == "client" else "personalized"
    mean, std = metrics.get(f"val/{kind}_acc_mean"), metrics.get(f"val/{kind}_acc_std")
    if mean is not None and std is not None:
        return (f"{who} acc {mean:.3f} ± {std:.3f} (p10 {metrics[f'val/{kind}_acc_p10']:.3f}, "
                f"min {metrics[f'val/{kind}_acc_min']:.3f})")
    loss = metrics.get(f"val/{kind}_loss_mean")
    if loss is not None and f"val/{kind}_loss_p90" in metrics:
        return f"{who} loss {loss:.3g} (p90 {metrics[f'val/{kind}_loss_p90']:.3g})"
    return None


def _seconds(seconds: float) -> str:
    """Wall-clock seconds with two to three significant digits: ``0.84``, ``5.82``, ``41.3``, ``1520``."""
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}" if seconds < 100 else f"{seconds:.0f}"
