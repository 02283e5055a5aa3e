"""IResNet: the ResNet variant the face-recognition literature trains ArcFace on.

Same shape as insightface's IResNet so that results and parameter counts are
comparable with published numbers (iresnet100 with E=512 has ~65 M parameters):

- stem: conv3x3(3 -> 64, stride 1) + BN + PReLU at 112 x 112;
- four stages of ``IBasicBlock`` with widths 64/128/256/512, each stage halving
  the resolution (112 -> 56 -> 28 -> 14 -> 7) in its first block;
- neck: BN2d -> Dropout -> Flatten -> Linear(512*7*7, E) -> BatchNorm1d(E) with
  the BN scale frozen at 1.

Unlike the torchvision ResNet, the block is pre-activation style
(BN-conv-BN-PReLU-conv-BN), the stride sits in the second conv, and the first
stage downsamples too. The BN layers are what inversion (``partialfc.invert``)
matches batch statistics against, so none of them may be fused away here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from partialfc.models.registry import (
    Backbone,
    check_dropout,
    features_batchnorm,
    init_conv_and_bn,
    register_backbone,
)

# Blocks per stage for each published depth.
IRESNET_LAYERS: Dict[int, List[int]] = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 14, 3],
    100: [3, 13, 30, 3],
    200: [6, 26, 60, 6],
}
STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
BN_EPS = 1e-5


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, stride)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(Backbone):
    """IResNet with ``layers`` blocks per stage; see the module docstring."""

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        amp_dtype=None,
    ):
        super().__init__(embedding_size, amp_dtype)
        if len(layers) != len(STAGE_WIDTHS) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers
        ):
            raise ValueError(f"layers must be 4 positive ints, got {list(layers)!r}")
        self.layers_per_stage = list(layers)

        self.conv1 = _conv3x3(3, STEM_WIDTH)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH, eps=BN_EPS)
        self.prelu = nn.PReLU(STEM_WIDTH)
        in_channels = STEM_WIDTH
        stages = []
        for num_blocks, width in zip(layers, STAGE_WIDTHS):
            blocks = [IBasicBlock(in_channels, width, stride=2)]
            blocks += [IBasicBlock(width, width, stride=1) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        final_hw = self.input_size[0] // 16
        self.bn2 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=check_dropout(dropout))
        self.fc = nn.Linear(in_channels * final_hw * final_hw, self.embedding_size)
        self.features = features_batchnorm(self.embedding_size)
        init_conv_and_bn(self)

    def forward_body(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(images)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_neck(self, feature_map: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn2(feature_map))
        x = self.fc(torch.flatten(x, 1))
        return self.features(x)


def _make_factory(depth: int):
    def factory(embedding_size: int = 512, dropout: float = 0.0, amp_dtype=None) -> IResNet:
        return IResNet(IRESNET_LAYERS[depth], embedding_size, dropout, amp_dtype)

    factory.__name__ = factory.__qualname__ = f"iresnet{depth}"
    factory.__doc__ = f"IResNet-{depth}: blocks per stage {IRESNET_LAYERS[depth]}."
    return factory


iresnet18 = register_backbone("iresnet18")(_make_factory(18))
iresnet34 = register_backbone("iresnet34")(_make_factory(34))
iresnet50 = register_backbone("iresnet50")(_make_factory(50))
iresnet100 = register_backbone("iresnet100")(_make_factory(100))
iresnet200 = register_backbone("iresnet200")(_make_factory(200))
