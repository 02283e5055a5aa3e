"""The combined angular margin ``s * (cos(m1*theta + m2) - m3)`` for the target class.

One formula covers the three families (DESIGN.md section 1):

* SphereFace: ``m1`` > 1, multiplicative angle. ``cos(m1*theta)`` is not monotonic on
  ``[0, pi]``, so it is extended as ``psi = (-1)^k cos(m1*theta + m2) - 2k`` on the
  interval ``m1*theta + m2 in [k*pi, (k+1)*pi]``; psi decreases monotonically and is
  continuous at every interval boundary.
* ArcFace: ``m2`` > 0 with ``m1 == 1``, additive angle. Past ``theta + m2 > pi`` the
  logit would rise again; the usual fallback ``cos(theta) - m2*sin(m2)`` is used for
  ``cos(theta) <= cos(pi - m2)`` (insightface ``easy_margin=False`` behaviour).
* CosFace: ``m3`` > 0, additive cosine.

All three may be set at once. Everything is computed with autograd-visible torch ops
(nothing under ``no_grad``), so the gradient is the true derivative of the logit.
The kernels in ``partialfc.kernels`` re-implement the same piecewise formula; the
function here is their reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = ["CombinedMargin", "MARGIN_PRESETS"]

# Clamp before acos so d(acos)/d(cos) = -1/sqrt(1 - c^2) stays finite.
ACOS_EPS = 1e-7


@dataclass(frozen=True)
class CombinedMargin:
    """Target-logit transform ``s * (psi(m1, m2, theta) - m3)``; others get ``s * cos``."""

    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    def __post_init__(self) -> None:
        for name in ("scale", "m1", "m2", "m3"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"CombinedMargin.{name} must be a finite number, got {value!r}")
        if self.scale <= 0:
            raise ValueError(f"CombinedMargin.scale must be > 0, got {self.scale}")
        if self.m1 < 1:
            raise ValueError(f"CombinedMargin.m1 must be >= 1 (1 disables SphereFace), got {self.m1}")
        if not 0 <= self.m2 < math.pi / 2:
            raise ValueError(f"CombinedMargin.m2 must be in [0, pi/2), got {self.m2}")
        if self.m3 < 0:
            raise ValueError(f"CombinedMargin.m3 must be >= 0, got {self.m3}")

    @classmethod
    def preset(cls, name: str, **overrides: float) -> "CombinedMargin":
        """Build a named margin (``arcface``, ``cosface``, ``sphereface``, ``combined``)."""
        try:
            base = MARGIN_PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown margin preset {name!r}; choose one of {sorted(MARGIN_PRESETS)}"
            ) from None
        return replace(base, **overrides)

    @property
    def uses_angle(self) -> bool:
        """False for pure CosFace: then no acos is needed at all."""
        return self.m1 != 1.0 or self.m2 != 0.0

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """Scaled, margined logit for cosines to the target class (any shape)."""
        return self.scale * (self.psi(cos_target) - self.m3)

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The margined angular term ``psi(theta)`` before ``- m3`` and scaling."""
        if not self.uses_angle:
            return cos_target
        cos_clamped = cos_target.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS)
        theta = torch.acos(cos_clamped)
        if self.m1 == 1.0:
            # ArcFace: cos(theta + m2) while theta + m2 <= pi, linear fallback beyond.
            shifted = torch.cos(theta + self.m2)
            fallback = cos_target - self.m2 * math.sin(self.m2)
            return torch.where(cos_target > math.cos(math.pi - self.m2), shifted, fallback)
        # SphereFace monotonic extension of cos(m1*theta + m2).
        angle = self.m1 * theta + self.m2
        k = torch.floor(angle / math.pi).detach()  # piecewise constant: no gradient
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return sign * torch.cos(angle) - 2.0 * k


MARGIN_PRESETS = {
    "arcface": CombinedMargin(scale=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": CombinedMargin(scale=64.0, m1=1.0, m2=0.0, m3=0.4),
    "sphereface": CombinedMargin(scale=64.0, m1=4.0, m2=0.0, m3=0.0),
    "combined": CombinedMargin(scale=64.0, m1=1.0, m2=0.3, m3=0.2),
}
