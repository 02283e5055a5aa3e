"""Backbones created by name, and the contract every backbone meets.

Configs, checkpoints and the follow-up tools (eval, export, clean, invert) refer
to a backbone by a string such as ``"iresnet100"`` plus a small kwargs dict. This
module maps those names to factories and checks the kwargs strictly: a typo in a
config must fail loudly instead of silently building a default model.

It also holds the few pieces shared by all backbones (one copy, not one per
architecture): the ``Backbone`` base class that splits a network into a body run
under optional autocast and a neck always run in float32, the argument checks of
the common kwargs, and the features BatchNorm whose scale is frozen at 1.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

BackboneFactory = Callable[..., nn.Module]

_REGISTRY: Dict[str, BackboneFactory] = {}

# amp_dtype strings accepted by every backbone (strings so they survive a
# weights_only checkpoint and a config file unchanged).
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: make ``factory(**kwargs) -> nn.Module`` buildable as ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"backbone name must be a non-empty str, got {name!r}")

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if not callable(factory):
            raise TypeError(f"register_backbone({name!r}) needs a callable, got {factory!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(
                f"backbone name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def _ensure_builtin_backbones_registered() -> None:
    # Imported lazily so that importing the package does no work; the import
    # runs the @register_backbone decorators of the built-in architectures.
    from partialfc.models import iresnet, mobilefacenet  # noqa: F401


def list_backbones() -> List[str]:
    """Sorted names of every registered backbone."""
    _ensure_builtin_backbones_registered()
    return sorted(_REGISTRY)


def get_backbone_factory(name: str) -> BackboneFactory:
    """The factory registered as ``name``; ValueError with close names if unknown."""
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a str, got {type(name).__name__} {name!r}")
    _ensure_builtin_backbones_registered()
    factory = _REGISTRY.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}{hint} (registered: {', '.join(sorted(_REGISTRY))})"
        )
    return factory


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name`` with ``kwargs``.

    Unknown names raise ValueError (listing close names); keyword arguments the
    factory does not accept raise TypeError naming them.
    """
    factory = get_backbone_factory(name)
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not takes_any:
        accepted = [
            p.name
            for p in parameters.values()
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(
                    f"backbone {name!r} got an unexpected keyword argument {key!r}{hint} "
                    f"(accepted: {', '.join(accepted)})"
                )
    return factory(**kwargs)


# --------------------------------------------------------------------------
# Shared by every backbone.
# --------------------------------------------------------------------------


def check_embedding_size(embedding_size) -> int:
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    return embedding_size


def check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def resolve_amp_dtype(amp_dtype) -> Optional[torch.dtype]:
    """Map ``None | "fp16" | "bf16"`` to a torch dtype (None = no autocast)."""
    if amp_dtype is None:
        return None
    if not isinstance(amp_dtype, str) or amp_dtype not in AMP_DTYPES:
        raise ValueError(
            f"amp_dtype must be None or one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}"
        )
    return AMP_DTYPES[amp_dtype]


def features_batchnorm(embedding_size: int) -> nn.BatchNorm1d:
    """BatchNorm1d on the embedding with its scale fixed to 1 and not trained.

    As in insightface: the shift and running statistics stay, the scale is
    frozen so the optimizer cannot shrink the embedding norm through it.
    """
    features = nn.BatchNorm1d(embedding_size, eps=1e-5)
    nn.init.constant_(features.weight, 1.0)
    features.weight.requires_grad_(False)
    return features


def init_conv_and_bn(model: nn.Module) -> None:
    """He-normal conv weights (fan_out), BatchNorm2d scale 1 and shift 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class Backbone(nn.Module):
    """Image (B, 3, 112, 112) -> embedding (B, E), always float32.

    Subclasses implement ``forward_body`` (the convolutional trunk) and
    ``forward_neck`` (feature map -> embedding). With ``amp_dtype`` set, the
    body runs under ``torch.autocast`` on the input's device type; the neck
    always runs in float32 with autocast disabled, on the body output cast to
    float, so that the embedding fed to the margin softmax keeps full precision
    even when the caller wraps the whole step in autocast.
    """

    # Spatial size the neck is built for; checked in forward for a clear error.
    input_size = (112, 112)

    def __init__(self, embedding_size: int, amp_dtype=None):
        super().__init__()
        self.embedding_size = check_embedding_size(embedding_size)
        self.amp_dtype = resolve_amp_dtype(amp_dtype)

    def forward_body(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_neck(self, feature_map: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.input_size:
            height, width = self.input_size
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, 3, {height}, {width}), "
                f"got {tuple(images.shape)}"
            )
        device_type = images.device.type
        if self.amp_dtype is None:
            feature_map = self.forward_body(images)
        else:
            with torch.autocast(device_type=device_type, dtype=self.amp_dtype):
                feature_map = self.forward_body(images)
        with torch.autocast(device_type=device_type, enabled=False):
            return self.forward_neck(feature_map.float())
