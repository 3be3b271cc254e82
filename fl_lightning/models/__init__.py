"""Reference client models (plain ``nn.Module``s), found by name with :func:`create_model`.

- ``linear_regression``: :class:`LinearRegression` (the seed paper's BlogFeedback experiment)
- ``logistic_regression``: :class:`LogisticRegression` (the seed paper's FEMNIST experiment)
- ``mlp``: :class:`MLP` (FedAvg's "2NN", McMahan et al. 2017)
- ``femnist_cnn``: :class:`FemnistCNN` (LEAF's FEMNIST CNN, Caldas et al. 2018)
- ``resnet18``: :class:`ResNet18` (CIFAR ResNet-18 with BatchNorm or GroupNorm)

:func:`is_vmappable` tells whether a model can train all clients at once under ``torch.func.vmap``.
"""

from fl_lightning.models.cnn import FemnistCNN
from fl_lightning.models.inspect import is_vmappable
from fl_lightning.models.linear import MLP, LinearRegression, LogisticRegression
from fl_lightning.models.registry import MODELS, create_model, register_model
from fl_lightning.models.resnet import BasicBlock, ResNet18

__all__ = [
    "MLP",
    "MODELS",
    "BasicBlock",
    "FemnistCNN",
    "LinearRegression",
    "LogisticRegression",
    "ResNet18",
    "create_model",
    "is_vmappable",
    "register_model",
]
