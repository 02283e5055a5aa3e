"""CombinedMargin: presets, validation, the fallback and psi, and a true gradient."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from partialfc import CombinedMargin


def numpy_psi(cos, m1, m2):
    theta = np.arccos(np.clip(cos, -1 + 1e-7, 1 - 1e-7))
    if m1 == 1.0:
        return np.where(cos > math.cos(math.pi - m2), np.cos(theta + m2), cos - m2 * math.sin(m2))
    angle = m1 * theta + m2
    k = np.floor(angle / math.pi)
    return (-1.0) ** k * np.cos(angle) - 2 * k


@pytest.mark.parametrize("name,m1,m2", [("arcface", 1.0, 0.5), ("sphereface", 4.0, 0.0), ("combined", 1.0, 0.3)])
def test_psi_matches_numpy(name, m1, m2):
    margin = CombinedMargin.preset(name)
    cos = np.linspace(-0.999, 0.999, 401)
    got = margin.psi(torch.tensor(cos)).numpy()
    np.testing.assert_allclose(got, numpy_psi(cos, m1, m2), rtol=1e-10, atol=1e-10)


def test_target_logit_formula():
    margin = CombinedMargin(scale=10.0, m1=1.0, m2=0.2, m3=0.1)
    cos = torch.tensor([0.3], dtype=torch.float64)
    expected = 10.0 * (math.cos(math.acos(0.3) + 0.2) - 0.1)
    assert margin.target_logit(cos).item() == pytest.approx(expected, rel=1e-12)
    cosface = CombinedMargin.preset("cosface")
    assert cosface.target_logit(cos).item() == pytest.approx(64 * (0.3 - 0.4))


def test_sphereface_psi_is_monotonic_and_continuous():
    margin = CombinedMargin(scale=1.0, m1=4.0, m2=0.0, m3=0.0)
    theta = torch.linspace(1e-3, math.pi - 1e-3, 20001, dtype=torch.float64)
    psi = margin.psi(torch.cos(theta))
    steps = psi[1:] - psi[:-1]
    assert bool((steps < 1e-9).all())
    assert float(steps.abs().max()) < 1e-2  # no jumps


def test_gradient_is_the_true_derivative():
    margin = CombinedMargin(scale=2.0, m1=1.5, m2=0.2, m3=0.1)
    cos = torch.tensor([-0.7, -0.2, 0.1, 0.6, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(margin.target_logit, (cos,))


def test_unknown_preset_and_bad_values():
    with pytest.raises(ValueError, match="arcfce.*arcface"):
        CombinedMargin.preset("arcfce")
    with pytest.raises(ValueError, match="m2"):
        CombinedMargin(m2=2.0)
    with pytest.raises(ValueError, match="m1"):
        CombinedMargin(m1=0.5)
    with pytest.raises(TypeError, match="scale"):
        CombinedMargin(scale="64")
