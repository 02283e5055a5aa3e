"""MobileFaceNet: a ~1 M parameter face backbone for cheap runs and edge export.

Chen et al., "MobileFaceNets" (2018): MobileNetV2 inverted-residual bottlenecks
with PReLU, a stride-2 stem so the trunk works at 56 x 56 -> 7 x 7, and a
global depthwise convolution (GDC) neck instead of global average pooling --
a 7 x 7 depthwise conv learns a different weight for each position, which
matters for aligned faces where the eyes are always in the same place.

Layout (112 x 112 input):
  conv3x3 s2 (64) -> depthwise conv3x3 (64)
  -> bottleneck stages (expansion t, channels c, repeats n, stride s):
     (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)
  -> conv1x1 (512) -> [neck] GDC 7x7 depthwise + BN -> Linear(512, E) -> BN1d(E).

``blocks`` overrides the five repeat counts, ``width_mult`` scales the stem and
bottleneck widths (rounded to multiples of 8; the 512-wide GDC part is fixed).
``dropout`` is applied before the final Linear; it is 0 by default, as in the
paper, and is accepted so every backbone takes the same common kwargs.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from partialfc.models.registry import (
    Backbone,
    check_dropout,
    features_batchnorm,
    init_conv_and_bn,
    register_backbone,
)

# (expansion, out_channels, stride) of each stage; repeats come from `blocks`.
STAGES: Tuple[Tuple[int, int, int], ...] = (
    (2, 64, 2),
    (4, 128, 2),
    (2, 128, 1),
    (4, 128, 2),
    (2, 128, 1),
)
DEFAULT_BLOCKS = (5, 1, 6, 1, 2)
STEM_WIDTH = 64
GDC_WIDTH = 512


class ConvBlock(nn.Module):
    """Conv2d (no bias) + BatchNorm2d, followed by PReLU unless ``linear``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, linear: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.prelu = None if linear else nn.PReLU(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection (+ identity)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.layers = nn.Sequential(
            ConvBlock(in_ch, hidden, 1),
            ConvBlock(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            ConvBlock(hidden, out_ch, 1, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.use_residual else out


def _scaled_width(channels: int, width_mult: float) -> int:
    return max(8, int(channels * width_mult + 4) // 8 * 8)


class MobileFaceNet(Backbone):
    """MobileFaceNet with a GDC neck; see the module docstring."""

    def __init__(
        self,
        embedding_size: int = 512,
        dropout: float = 0.0,
        amp_dtype=None,
        width_mult: float = 1.0,
        blocks: Sequence[int] = DEFAULT_BLOCKS,
    ):
        super().__init__(embedding_size, amp_dtype)
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        blocks = tuple(blocks)
        if len(blocks) != len(STAGES) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in blocks
        ):
            raise ValueError(f"blocks must be {len(STAGES)} positive ints, got {list(blocks)!r}")

        stem = _scaled_width(STEM_WIDTH, width_mult)
        body = [
            ConvBlock(3, stem, 3, stride=2, padding=1),
            ConvBlock(stem, stem, 3, padding=1, groups=stem),
        ]
        in_ch = stem
        for (expansion, channels, stride), repeats in zip(STAGES, blocks):
            out_ch = _scaled_width(channels, width_mult)
            for index in range(repeats):
                body.append(InvertedResidual(in_ch, out_ch, stride if index == 0 else 1, expansion))
                in_ch = out_ch
        body.append(ConvBlock(in_ch, GDC_WIDTH, 1))
        self.body = nn.Sequential(*body)

        final_hw = self.input_size[0] // 16
        self.gdc = ConvBlock(GDC_WIDTH, GDC_WIDTH, final_hw, groups=GDC_WIDTH, linear=True)
        self.dropout = nn.Dropout(p=check_dropout(dropout))
        self.fc = nn.Linear(GDC_WIDTH, self.embedding_size, bias=False)
        self.features = features_batchnorm(self.embedding_size)
        init_conv_and_bn(self)

    def forward_body(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward_neck(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.gdc(feature_map), 1)
        return self.features(self.fc(self.dropout(x)))


@register_backbone("mobilefacenet")
def mobilefacenet(
    embedding_size: int = 512,
    dropout: float = 0.0,
    amp_dtype=None,
    width_mult: float = 1.0,
    blocks: Sequence[int] = DEFAULT_BLOCKS,
) -> MobileFaceNet:
    """MobileFaceNet (Chen et al. 2018) with an E-dimensional embedding."""
    return MobileFaceNet(embedding_size, dropout, amp_dtype, width_mult, blocks)


@register_backbone("mobilefacenet_tiny")
def mobilefacenet_tiny(embedding_size: int = 128, dropout: float = 0.0, amp_dtype=None) -> MobileFaceNet:
    """A quarter-width, one-block-per-stage MobileFaceNet (~0.14 M parameters).

    For CPU demos and tests, where the full network would take seconds per step.
    """
    return MobileFaceNet(embedding_size, dropout, amp_dtype, width_mult=0.25, blocks=(1, 1, 1, 1, 1))
