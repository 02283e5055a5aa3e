"""Shared helpers for the evaluation tests: synthetic images and a fixed embedder.

A plain module (not conftest) so test files can import the helpers by name.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn


def encode_png(image_hwc: np.ndarray) -> bytes:
    """Lossless encoding, so a test can compare decoded pixels with the array it made."""
    buffer = io.BytesIO()
    Image.fromarray(image_hwc).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(image_hwc: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_hwc).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def random_images(rng: np.random.Generator, count: int, height: int = 112, width: int = 112) -> np.ndarray:
    return rng.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


class FixedProjection(nn.Module):
    """A fixed embedding function: average-pool to 8 x 8, flatten, random linear map.

    Not flip invariant (so the flip matters) and simple enough to recompute in numpy.
    """

    def __init__(self, embedding_size: int = 48, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(embedding_size, 3 * 8 * 8, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)
        return pooled @ self.weight.t()


def fixed_projection_numpy(model: FixedProjection, images_nchw_uint8: np.ndarray) -> np.ndarray:
    """numpy twin of ``FixedProjection`` + flip-sum + L2 normalization (112 -> 8 pooling is 14 x 14 blocks)."""
    weight = model.weight.detach().double().numpy()
    pixels = (images_nchw_uint8.astype(np.float64) - 127.5) / 128.0
    count, channels, height, width = pixels.shape

    def project(batch):
        blocks = batch.reshape(count, channels, 8, height // 8, 8, width // 8).mean(axis=(3, 5))
        return blocks.reshape(count, -1) @ weight.T

    summed = project(pixels) + project(pixels[:, :, :, ::-1])
    return summed / np.linalg.norm(summed, axis=1, keepdims=True)


TINY_BACKBONE_KWARGS = {"embedding_size": 16, "width_mult": 0.25, "blocks": [1, 1, 1, 1, 1]}


def save_tiny_backbone(path, seed: int = 0) -> nn.Module:
    """A small real registry backbone written as a backbone file; returns the module (eval)."""
    from partialfc.models import build_backbone, save_backbone

    torch.manual_seed(seed)
    model = build_backbone("mobilefacenet", **TINY_BACKBONE_KWARGS)
    # Calibrate BatchNorm statistics so eval-mode embeddings are O(1), not ~1e-6.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 112, 112))
    save_backbone(path, "mobilefacenet", TINY_BACKBONE_KWARGS, model.state_dict())
    return model.eval()
