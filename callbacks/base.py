"""``FederatedCallback``: a Lightning callback with the hooks of a communication round (DESIGN §2.2).

The :class:`~fl_lightning.FederatedLightningModule` calls these hooks, in this order, on every callback
that derives from this class (in the order the callbacks are given):

local step (every ``training_step``)
    ``on_round_start``          the first local step of a round (e.g. pick the cohort)
    ``transform_params``        the parameters the forward/gradient uses (e.g. TopK through an STE)
    Lightning's ``on_before_optimizer_step``   (e.g. shift the gradient by −h_i)
    ``on_local_step_end``       after the SGD step, before the coin (e.g. TopK "step 7", a prox)

evaluation (validation, test, predict, ``sparsity/density``)
    ``transform_evaluated_params``   the weights the global model x is evaluated with: what clients compute with
                                when they start from x (e.g. TopK(x) through an STE); x itself by default

communication round (when the schedule's coin says so), see :class:`~fl_lightning.round.Round`
    ``on_before_uplink``        last change to the local models x̂_i (``rnd.local``, e.g. TopK them)
    ``on_uplink``               form u_i from a copy of x̂_i (e.g. x̂_i − (γ/p) h_i)
    ``on_compress_uplink``      compress u_i (what goes on the wire)
    ``on_mean``                 the sum x̄ = Σ_i w_i u_i, before anything reads it (e.g. DP noise)
    ``on_aggregate``            the server model x⁺ from x̄ (e.g. TopK at the server)
    ``on_broadcast``            compress the downlink b
    ``on_receive``              client side: update h_i; what clients keep of b (e.g. TopK "step 9")
    ``on_round_end``            after x_i and the global model were written (logging)

What each hook may read and replace, the cohort (``module.cohort``), client and server state, extra messages
(``rnd.send_up`` / ``rnd.send_down``) and a walkthrough: ``docs/extending.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch import Callback, Trainer

from fl_lightning.round import Round, Tensors

if TYPE_CHECKING:
    from fl_lightning.module import FederatedLightningModule


class FederatedCallback(Callback):
    """Base class for callbacks that take part in the federated algorithm. Every hook is a no-op."""

    def on_round_start(self, trainer: Trainer, module: FederatedLightningModule, round_index: int) -> None:
        """Called before the first local step of round ``round_index``."""

    def transform_params(self, trainer: Trainer, module: FederatedLightningModule, params: Tensors) -> Tensors:
        """Return the parameters the forward pass and the gradient use, given the stacked x_i ([c, ...])."""
        return params

    def transforms_forward(self) -> bool:
        """Whether :meth:`transform_params` may change the parameters in this configuration (default: whenever a
        subclass overrides it). The fused SGD update (:mod:`fl_lightning.fused`) needs the gradient of the
        untransformed parameters, so it runs only when no callback says yes; override to say no when a setting
        makes ``transform_params`` the identity."""
        return type(self).transform_params is not FederatedCallback.transform_params

    def transform_evaluated_params(self, trainer: Trainer | None, module: FederatedLightningModule,
                                   params: Tensors) -> Tensors:
        """Return the parameters the global model is evaluated and its density reported with, given the global
        model's x (one model, not stacked): the model clients compute with when they start from x. A callback
        whose ``transform_params`` changes what the forward pass uses should give the same change here."""
        return params

    def on_local_step_end(self, trainer: Trainer, module: FederatedLightningModule) -> None:
        """After the optimizer step of every local step, before the schedule decides on communication."""

    def on_before_uplink(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        """Replace entries of ``rnd.local`` (x̂_i) before the uplink is formed; the round, including the
        control-variate update, then uses the replaced x̂_i."""

    def on_uplink(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        """Form the uplink message ``rnd.uplink`` from ``rnd.local``."""

    def on_compress_uplink(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        """Compress ``rnd.uplink`` (and set ``rnd.uplink_bits`` if the encoding is not sparse/dense)."""

    def on_mean(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        """Replace entries of ``rnd.mean`` (x̄ = Σ_i w_i u_i, the same on every process) before the server model,
        the broadcast and the clients' state are derived from it."""

    def on_aggregate(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        """Produce the server model ``rnd.server`` from ``rnd.mean``."""

    def on_broadcast(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        """Compress the downlink ``rnd.broadcast``."""

    def on_receive(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        """Client side: update client state from the round; set what clients keep (``rnd.received``)."""

    def on_round_end(self, trainer: Trainer, module: FederatedLightningModule, rnd: Round) -> None:
        """After the clients' models and the global model were overwritten."""
