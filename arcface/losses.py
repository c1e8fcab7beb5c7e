"""Softmax losses on cosine logits: the seed's normalized ("naive") softmax and the margin family.

With θ the angle between an embedding and its class centre, the target-class logit becomes

    s · (cos(m1·θ + m2) − m3)        ArcFace: m2 > 0;  CosFace: m3 > 0;  combined: any of the three

and every other logit stays s · cos θ_j. With m1 = 1, m2 = m3 = 0 this is exactly the naive loss
(softmax over s·cos θ with normalized features and weights), which the tests check.

Margin warm-up: `strength` in [0, 1] scales the margins towards none (m1 -> 1, m2 and m3 -> 0). The margin
loss has a degenerate minimum: every embedding and class centre pointing one way makes every cosine 1 and
the loss s·(1 − cos m) + ln(C − 1) (ArcFace; 11.06 at s=32, m=0.5, 1,262 classes), lower than a trunk still
learning to separate C people reaches under a full margin, so training from scratch on a few thousand faces
can slide into it (train accuracy falling while the loss falls). Ramping the margin in from the naive loss
lets the classes separate first.

Past π: cos(m1·θ + m2) stops decreasing once m1·θ + m2 passes π, so a badly classified sample would be
*rewarded* for moving further from its centre. From θ* = (π − m2) / m1 on we continue with
cos θ − cos θ* − 1 − m3: it equals the margin curve at θ* (no jump) and keeps falling as θ grows.
(insightface uses cos θ − m·sin m there, which also falls but jumps down at θ*.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# acos has an infinite slope at ±1; clamping just inside keeps gradients finite (no NaN at cos = ±1).
_COS_LIMIT = 1.0 - 1e-6
LOSSES = ("softmax", "arcface", "cosface", "combined")


class MarginSoftmaxLoss(nn.Module):
    """Cross-entropy over s·cos θ with margins (m1, m2, m3) on the target logit only."""

    def __init__(
        self, scale: float, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        if scale <= 0 or m1 <= 0:
            raise ValueError(f"scale and m1 must be positive, got scale={scale}, m1={m1}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.scale, self.full_margins = scale, (m1, m2, m3)
        # Target ε/C on every class and 1 − ε + ε/C on the true one: a softer pull on few faces per class.
        self.label_smoothing = label_smoothing
        self.strength = 1.0  # margin warm-up: the fraction of the margins applied (1: all of them)

    @property
    def margins(self) -> tuple[float, float, float]:
        """(m1, m2, m3) at the current strength."""
        m1, m2, m3 = self.full_margins
        return 1.0 + self.strength * (m1 - 1.0), self.strength * m2, self.strength * m3

    @property
    def has_margin(self) -> bool:
        m1, m2, m3 = self.margins
        return m1 != 1.0 or m2 != 0.0 or m3 != 0.0

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        """cos θ of target classes -> the penalized cosine (before scaling), elementwise."""
        m1, m2, m3 = self.margins
        if m1 == 1.0 and m2 == 0.0:
            return cosine - m3  # CosFace: no angle needed
        theta = torch.acos(cosine.clamp(-_COS_LIMIT, _COS_LIMIT))
        angle = m1 * theta + m2
        limit = (math.pi - m2) / m1  # θ*: where the margin angle reaches π
        beyond = cosine - math.cos(limit) - 1.0 - m3
        return torch.where(angle <= math.pi, torch.cos(angle) - m3, beyond)

    def logits(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, C) cosines, (B,) class ids -> (B, C) scaled logits with the margin on the target."""
        if not self.has_margin:
            return self.scale * cosine
        target = cosine.gather(1, labels[:, None])  # (B, 1)
        return self.scale * cosine.scatter(1, labels[:, None], self.target_logit(target))

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # At least float32 (bf16 cosines would blur the margin); float64 stays float64.
        precise = cosine.to(torch.promote_types(cosine.dtype, torch.float32))
        return F.cross_entropy(self.logits(precise, labels), labels, label_smoothing=self.label_smoothing)


def build_loss(
    name: str,
    scale: float,
    margin: float,
    combined: tuple[float, float, float] = (1.0, 0.3, 0.2),
    label_smoothing: float = 0.0,
) -> MarginSoftmaxLoss:
    """`softmax` (no margin), `arcface` (m2 = margin), `cosface` (m3 = margin), `combined` (m1, m2, m3)."""
    smoothing = {"label_smoothing": label_smoothing}
    if name == "softmax":
        return MarginSoftmaxLoss(scale, **smoothing)
    if name == "arcface":
        return MarginSoftmaxLoss(scale, m2=margin, **smoothing)
    if name == "cosface":
        return MarginSoftmaxLoss(scale, m3=margin, **smoothing)
    if name == "combined":
        m1, m2, m3 = combined
        return MarginSoftmaxLoss(scale, m1=m1, m2=m2, m3=m3, **smoothing)
    raise ValueError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
