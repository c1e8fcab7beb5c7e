"""Softmax losses on cosine logits: the seed's normalized ("naive") softmax and the margin family.

With θ the angle between an embedding and its class centre, the target-class logit becomes

    s · (cos(m1·θ + m2) − m3)        ArcFace: m2 > 0;  CosFace: m3 > 0;  SphereFace-like: m1 > 1

and every other logit stays s · cos θ_j. With m1 = 1, m2 = m3 = 0 this is exactly the naive loss
(softmax over s·cos θ with normalized features and weights), which the tests check.

Why the special case: cos(θ + m2) stops decreasing once θ + m2 passes π, so a badly classified sample
(θ near π) would be *rewarded* for moving further away. Beyond that point we use the CosFace-style
penalty cos θ − m2·sin(m2) (as insightface does), which keeps the target logit decreasing in θ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# acos has an infinite slope at ±1; clamping just inside keeps gradients finite (no NaN at cos = ±1).
_COS_LIMIT = 1.0 - 1e-6


class MarginSoftmaxLoss(nn.Module):
    """Cross-entropy over s·cos θ with margins (m1, m2, m3) on the target logit only."""

    def __init__(self, scale: float, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale, self.m1, self.m2, self.m3 = scale, m1, m2, m3

    @property
    def has_margin(self) -> bool:
        return self.m1 != 1.0 or self.m2 != 0.0 or self.m3 != 0.0

    def logits(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, C) cosines, (B,) class ids -> (B, C) scaled logits with the margin on the target."""
        if not self.has_margin:
            return self.scale * cosine
        target = cosine.gather(1, labels[:, None])  # (B, 1)
        theta = torch.acos(target.clamp(-_COS_LIMIT, _COS_LIMIT))
        angle = self.m1 * theta + self.m2
        penalized = torch.where(
            angle <= math.pi,
            torch.cos(angle) - self.m3,
            target - self.m3 - self.m2 * math.sin(self.m2),  # past π: keep decreasing in θ
        )
        return self.scale * cosine.scatter(1, labels[:, None], penalized)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(cosine.float(), labels), labels)


def build_loss(name: str, scale: float, margin: float) -> MarginSoftmaxLoss:
    """`softmax` (no margin) or `arcface` (additive angular margin m2 = margin)."""
    if name == "softmax":
        return MarginSoftmaxLoss(scale)
    if name == "arcface":
        return MarginSoftmaxLoss(scale, m2=margin)
    raise ValueError(f"unknown loss {name!r} (known: softmax, arcface)")
