"""The margin losses: ArcFace with m=0 is the naive loss; the margin touches the target logit only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arcface.losses import MarginSoftmaxLoss, build_loss


def random_cosines(batch: int = 8, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    cosine = torch.rand(batch, classes, generator=generator) * 2 - 1
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return cosine, labels


def test_arcface_with_zero_margin_equals_naive_softmax() -> None:
    cosine, labels = random_cosines()
    naive = build_loss("softmax", scale=32.0, margin=0.5)
    arcface_zero = build_loss("arcface", scale=32.0, margin=0.0)
    expected = F.cross_entropy(32.0 * cosine, labels)
    assert torch.allclose(naive(cosine, labels), expected)
    # Through the margin code path too (m1 = 1, m2 = 1e-12 rounds to cos θ).
    arcface_tiny = MarginSoftmaxLoss(32.0, m2=1e-12)
    assert torch.allclose(arcface_zero(cosine, labels), expected)
    assert torch.allclose(arcface_tiny(cosine, labels), expected, atol=1e-4)


def test_margin_strength_scales_every_margin_between_none_and_full() -> None:
    cosine, labels = random_cosines()
    loss = MarginSoftmaxLoss(16.0, m1=1.2, m2=0.4, m3=0.2)
    loss.strength = 0.0
    assert loss.margins == (1.0, 0.0, 0.0)
    assert torch.allclose(loss(cosine, labels), F.cross_entropy(16.0 * cosine, labels))
    loss.strength = 0.5
    assert loss.margins == pytest.approx((1.1, 0.2, 0.1))
    assert torch.allclose(
        loss(cosine, labels), MarginSoftmaxLoss(16.0, m1=1.1, m2=0.2, m3=0.1)(cosine, labels)
    )
    loss.strength = 1.0
    assert loss.margins == (1.2, 0.4, 0.2)


def test_margin_changes_only_the_target_logit() -> None:
    cosine, labels = random_cosines()
    loss = build_loss("arcface", scale=10.0, margin=0.5)
    logits = loss.logits(cosine, labels)
    target = F.one_hot(labels, cosine.shape[1]).bool()
    assert torch.allclose(logits[~target], 10.0 * cosine[~target])
    theta = torch.acos(cosine[target])
    inside = theta + 0.5 <= math.pi
    assert torch.allclose(logits[target][inside], 10.0 * torch.cos(theta[inside] + 0.5), atol=1e-5)
    assert (logits[target] < 10.0 * cosine[target]).all()  # the margin always penalizes


def test_arcface_is_larger_than_softmax_for_same_inputs() -> None:
    cosine, labels = random_cosines()
    assert build_loss("arcface", 32.0, 0.5)(cosine, labels) > build_loss("softmax", 32.0, 0.5)(cosine, labels)


def test_target_logit_keeps_decreasing_past_pi() -> None:
    """θ + m > π: the target logit must still fall as θ grows (no reward for moving away)."""
    loss = MarginSoftmaxLoss(1.0, m2=0.5)
    thetas = torch.linspace(0.0, math.pi, 2001)
    cosine = torch.cos(thetas)[:, None]
    labels = torch.zeros(len(thetas), dtype=torch.long)
    target = loss.logits(cosine, labels)[:, 0]
    assert (target[1:] <= target[:-1] + 1e-6).all()


def test_no_nan_at_cosine_plus_minus_one() -> None:
    cosine = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    value = build_loss("arcface", 64.0, 0.5)(cosine, labels)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(cosine.grad).all()


def reference_logits(cosine: np.ndarray, labels: np.ndarray, s: float, m1: float, m2: float, m3: float):
    """The margin formula in float64 numpy, written independently of the module."""
    logits = s * cosine.copy()
    for row, label in enumerate(labels):
        theta = np.arccos(np.clip(cosine[row, label], -1 + 1e-6, 1 - 1e-6))
        angle = m1 * theta + m2
        if angle <= np.pi:
            value = np.cos(angle) - m3
        else:
            value = cosine[row, label] - np.cos((np.pi - m2) / m1) - 1 - m3
        logits[row, label] = s * value
    return logits


@pytest.mark.parametrize(
    ("name", "margins"),
    [("arcface", (1.0, 0.5, 0.0)), ("cosface", (1.0, 0.0, 0.35)), ("combined", (1.0, 0.3, 0.2)),
     ("combined", (1.3, 0.2, 0.1))],
)  # fmt: skip
def test_margin_math_matches_a_float64_reference(name: str, margins: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(7)
    cosine = rng.uniform(-1, 1, (64, 6))
    cosine[:4, :] = [[1.0], [-1.0], [0.999999], [-0.95]]  # the extremes
    labels = rng.integers(0, 6, 64)
    m1, m2, m3 = margins
    loss = build_loss(name, 30.0, m2 if name == "arcface" else m3, combined=margins)
    got = loss.logits(torch.from_numpy(cosine), torch.from_numpy(labels)).numpy()
    assert np.allclose(got, reference_logits(cosine, labels, 30.0, m1, m2, m3), atol=1e-9)


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (1.5, 0.2, 0.1)])
def test_target_logit_is_continuous_and_falling_everywhere(margins: tuple[float, float, float]) -> None:
    loss = MarginSoftmaxLoss(1.0, *margins)
    thetas = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)
    values = loss.target_logit(torch.cos(thetas))
    steps = values[1:] - values[:-1]
    assert (steps <= 1e-12).all()  # never rises
    assert steps.abs().max() < 1e-3  # no jump anywhere (the grid step is 1.6e-4 rad)


@pytest.mark.parametrize("name", ["arcface", "cosface", "combined"])
def test_gradients_match_finite_differences(name: str) -> None:
    loss = build_loss(name, 8.0, 0.4)
    generator = torch.Generator().manual_seed(3)
    cosine = (torch.rand(5, 4, generator=generator, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    labels = torch.randint(0, 4, (5,), generator=generator)
    assert torch.autograd.gradcheck(lambda c: loss(c, labels), (cosine,))


@pytest.mark.parametrize("name", ["softmax", "arcface", "cosface", "combined"])
def test_every_loss_is_finite_at_the_extremes(name: str) -> None:
    cosine = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    value = build_loss(name, 64.0, 0.5)(cosine, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(cosine.grad).all()


def test_cosface_subtracts_the_margin_from_the_target_cosine() -> None:
    cosine, labels = random_cosines()
    logits = build_loss("cosface", 10.0, 0.35).logits(cosine, labels)
    target = F.one_hot(labels, cosine.shape[1]).bool()
    assert torch.allclose(logits[target], 10.0 * (cosine[target] - 0.35))
    assert torch.allclose(logits[~target], 10.0 * cosine[~target])


def test_label_smoothing_spreads_the_target_over_every_class() -> None:
    cosine = torch.tensor([[0.9, 0.1, -0.2, 0.3], [0.0, 0.5, 0.2, -0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    plain, smoothed = build_loss("arcface", 16.0, 0.3), build_loss("arcface", 16.0, 0.3, label_smoothing=0.2)
    log_p = torch.log_softmax(plain.logits(cosine, labels), dim=1)
    target = torch.full_like(log_p, 0.2 / 4)
    target[torch.arange(2), labels] += 0.8
    assert torch.isclose(smoothed(cosine, labels), -(target * log_p).sum(1).mean())
    assert smoothed(cosine, labels) > plain(cosine, labels)  # the true class is already the likeliest
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss("softmax", 16.0, 0.0, label_smoothing=1.0)
