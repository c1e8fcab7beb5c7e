"""The margin losses: ArcFace with m=0 is the naive loss; the margin touches the target logit only."""

from __future__ import annotations

import math

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
