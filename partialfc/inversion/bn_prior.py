"""The BatchNorm statistic prior of DeepInversion.

A trained network remembers the distribution of its training images in the
running mean and variance of every BatchNorm layer. An image batch that looks
like training data produces, at each BatchNorm2d input, per-channel batch
statistics close to those running statistics. Matching them is what turns the
pixel optimization from adversarial noise into face-like images.

The model stays in eval mode (BatchNorm normalizes with its running statistics
and does not update them); a forward hook on each BatchNorm2d reads the layer's
input and records its batch mean and (biased) variance over (N, H, W). The loss
of one layer is ``||mu_batch - mu_run||_2 + ||var_batch - var_run||_2``; the sum
over layers weights the first layer by ``first_layer_weight`` (DeepInversion
uses 10: the first layer sees raw pixels and anchors colour and contrast).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn


def batchnorm_layers(model: nn.Module, where: str = "model") -> List[nn.BatchNorm2d]:
    """Every BatchNorm2d of ``model`` in module order; ValueError if there is none to use."""
    layers = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    if not layers:
        raise ValueError(
            f"{where} ({type(model).__name__}) has no BatchNorm2d layers: inversion needs their "
            "running statistics as the image prior"
        )
    for index, layer in enumerate(layers):
        if not layer.track_running_stats or layer.running_mean is None or layer.running_var is None:
            raise ValueError(f"{where}: BatchNorm2d layer {index} ({layer}) keeps no running statistics")
    return layers


class BatchNormStatisticsPrior:
    """Forward hooks on every BatchNorm2d of ``model`` and the loss they imply.

    Use as a context manager (hooks are removed on exit) or call ``remove()``.
    After each forward pass ``loss()`` is the weighted sum over layers of the
    distance between batch and running statistics, and ``layer_losses()`` the
    unweighted per-layer values, in module order.
    """

    def __init__(self, model: nn.Module, first_layer_weight: float = 10.0, *, where: str = "model"):
        if isinstance(first_layer_weight, bool) or not isinstance(first_layer_weight, (int, float)) \
                or not first_layer_weight >= 0:
            raise ValueError(f"first_layer_weight must be a number >= 0, got {first_layer_weight!r}")
        self.layers = batchnorm_layers(model, where)
        self.first_layer_weight = float(first_layer_weight)
        self._losses: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self._handles = [
            layer.register_forward_hook(self._make_hook(index)) for index, layer in enumerate(self.layers)
        ]

    def _make_hook(self, index: int):
        def hook(module: nn.BatchNorm2d, inputs, output):
            # Statistics in float32 even under autocast: the differences we take are small.
            features = inputs[0].float()
            batch_mean = features.mean(dim=(0, 2, 3))
            batch_var = features.var(dim=(0, 2, 3), unbiased=False)
            running_mean = module.running_mean.float()
            running_var = module.running_var.float()
            self._losses[index] = (
                torch.linalg.vector_norm(batch_mean - running_mean)
                + torch.linalg.vector_norm(batch_var - running_var)
            )

        return hook

    def layer_losses(self) -> List[torch.Tensor]:
        missing = [index for index, value in enumerate(self._losses) if value is None]
        if missing:
            raise RuntimeError(
                f"BatchNorm2d layers {missing} saw no input: run a forward pass before reading the loss"
            )
        return list(self._losses)

    def loss(self) -> torch.Tensor:
        """Weighted sum over layers (first layer times ``first_layer_weight``)."""
        values = self.layer_losses()
        return self.first_layer_weight * values[0] + sum(values[1:], torch.zeros_like(values[0]))

    def reset(self) -> None:
        self._losses = [None] * len(self.layers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "BatchNormStatisticsPrior":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
