"""The names of the metrics fl-lightning logs, and of the run config keys W&B groups runs by (DESIGN §3).

One place for tools that read runs back (the W&B dashboard of :mod:`fl_lightning.dashboard`, the metric
declarations of :class:`~fl_lightning.callbacks.metrics.WandbFederatedMetrics`); a test holds the names here
to the columns a real run writes, so a renamed metric fails there rather than leaving an empty panel.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------- losses, accuracy
TRAIN_LOSS = "train/loss"  #: Σ_i w_i f_i on the step's minibatches (every logging step)
VAL_LOSS = "val/loss"  #: the global model on the central held-out split
VAL_ACC = "val/acc"  #: the same, classification only

# ---------------------------------------------------------------------------------------------- communication
ROUNDS = "comm/rounds"  #: communication rounds so far
BITS_UP = "comm/bits_up"  #: uplink bits so far, all clients together (DESIGN §2.4)
BITS_DOWN = "comm/bits_down"  #: downlink bits so far

# ---------------------------------------------------------------------------------------------- sparsity
DENSITY = "sparsity/density"  #: fraction of non-zeros of the global model after the round, as evaluated (TopK(x)
#: for FedComLoc-Local, whose clients compute with TopK of the dense x: ``module.evaluated_params()``)
CLIENT_DENSITY = "sparsity/client_density"  #: the same for the clients' x̂_i, averaged over the cohort
LAYER_DENSITY_PREFIX = "sparsity/layer/"  #: + parameter name: one tensor of the global model (LayerDensity)

# ---------------------------------------------------------------------------------------------- control variates
CV_SUM_NORM = "cv/sum_norm"  #: ‖Σ_i w_i h_i‖, 0 for zero-sum control variates (DESIGN §1.2)

# ---------------------------------------------------------------------------------------------- differential privacy
# Logged by :class:`~fl_lightning.callbacks.DifferentialPrivacy` after every round (docs/privacy.md).
EPSILON = "privacy/epsilon"  #: ε of the rounds so far at the configured δ (dp-accounting), inf when σ = 0
CLIP_NORM = "privacy/clip_norm"  #: the clip norm C of the round (moves with adaptive clipping)
CLIPPED_FRACTION = "privacy/clipped_fraction"  #: fraction of the cohort whose update was clipped this round
PRIVACY_METRICS: tuple[str, ...] = (EPSILON, CLIP_NORM, CLIPPED_FRACTION)

# ---------------------------------------------------------------------------------------------- per-client evaluation
# Statistics over clients (fl_lightning.client_evaluation) of the global model ("client") and of the personalized
# models ("personal") on every client's own test split, logged when the datamodule has client test splits:
# ``<stage>/<kind>_<stat>``, stage val or test.
CLASSIFICATION_STATS: tuple[str, ...] = ("acc_mean", "acc_std", "acc_p10", "acc_min", "loss_mean")
REGRESSION_STATS: tuple[str, ...] = ("loss_mean", "loss_std", "loss_p90", "loss_max")


def client_metric(stage: str, kind: str, stat: str) -> str:
    """``client_metric("val", "client", "acc_p10") == "val/client_acc_p10"`` (kind: client, personal)."""
    return f"{stage}/{kind}_{stat}"


CLIENT_ACC_MEAN = client_metric("val", "client", "acc_mean")
CLIENT_ACC_STD = client_metric("val", "client", "acc_std")
CLIENT_ACC_P10 = client_metric("val", "client", "acc_p10")  #: 10th percentile over clients: the worst decile
CLIENT_ACC_MIN = client_metric("val", "client", "acc_min")
CLIENT_LOSS_MEAN = client_metric("val", "client", "loss_mean")
PERSONAL_ACC_MEAN = client_metric("val", "personal", "acc_mean")  #: after personalize_steps local steps
CLIENT_ACC_STATS: tuple[str, ...] = (CLIENT_ACC_MEAN, CLIENT_ACC_P10, CLIENT_ACC_MIN)


def client_histogram(stage: str, kind: str, metric: str) -> str:
    """The W&B histogram of the per-client vector: ``val/client_acc_hist``."""
    return f"{stage}/{kind}_{metric}_hist"

# ---------------------------------------------------------------------------------------------- run config (W&B)
# ``WandbFederatedMetrics`` stores the preset's ``describe()`` dict as ``wandb.config["algorithm"]``.
CONFIG_PRESET = "algorithm.name"
CONFIG_DENSITY = "algorithm.density"
CONFIG_P = "algorithm.p"


def layer_density(name: str) -> str:
    """The key of one tensor's density: ``layer_density("net.0.weight") == "sparsity/layer/net.0.weight"``."""
    return LAYER_DENSITY_PREFIX + name


#: Metrics that describe the global model after a round; W&B plots them against ``comm/rounds`` by default.
ROUND_METRICS: tuple[str, ...] = (VAL_ACC, VAL_LOSS, DENSITY, CLIENT_DENSITY, CV_SUM_NORM, *CLIENT_ACC_STATS,
                                  CLIENT_LOSS_MEAN, *PRIVACY_METRICS)
#: The x-axes, logged in the same rows as every per-step metric.
AXES: tuple[str, ...] = (ROUNDS, BITS_UP, BITS_DOWN)

__all__ = [
    "AXES", "BITS_DOWN", "BITS_UP", "CLASSIFICATION_STATS", "CLIENT_ACC_MEAN", "CLIENT_ACC_MIN", "CLIENT_ACC_P10",
    "CLIENT_ACC_STATS", "CLIENT_ACC_STD", "CLIENT_DENSITY", "CLIENT_LOSS_MEAN", "CLIPPED_FRACTION", "CLIP_NORM",
    "CONFIG_DENSITY", "CONFIG_P", "CONFIG_PRESET", "CV_SUM_NORM", "DENSITY", "EPSILON", "LAYER_DENSITY_PREFIX",
    "PERSONAL_ACC_MEAN", "PRIVACY_METRICS", "REGRESSION_STATS", "ROUNDS", "ROUND_METRICS", "TRAIN_LOSS", "VAL_ACC",
    "VAL_LOSS", "client_histogram", "client_metric", "layer_density",
]
