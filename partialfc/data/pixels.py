"""The backbone's input convention, in one place: ``(pixel - 127.5) / 128``.

Every path that turns uint8 pixels into backbone input (training loaders, verification,
cleaning, export) or back (inversion's PNGs) goes through these two functions, so the
convention cannot drift between training and the tools that use a trained model.
"""
from __future__ import annotations

import torch

PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (or float) pixel values in [0, 255] -> float32 backbone input."""
    return (pixels.float() - PIXEL_MEAN) / PIXEL_SCALE


def denormalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """Backbone input -> float pixel values (not rounded or clamped)."""
    return images.float() * PIXEL_SCALE + PIXEL_MEAN
