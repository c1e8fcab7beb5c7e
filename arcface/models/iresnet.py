"""The field's standard backbones for 112×112 faces: IResNet-18/34/50/100 (insightface's arcface_torch).

Differences from a torchvision ResNet, all for faces: a 3×3 stride-1 stem with PReLU and no max-pool; "IR"
blocks (BN → conv → BN → PReLU → conv → BN, the stride on the second conv) without a ReLU after the
addition; every stage halves the map, 112 → 56 → 28 → 14 → 7; and the embedding head keeps the 7×7 layout
(flatten + FC) instead of average-pooling it away, since where a feature sits on an aligned face matters.
"""

from __future__ import annotations

import torch
from torch import nn

from arcface.models.backbones import INPUT_SIZE, EmbeddingHead, register_backbone

STAGE_WIDTHS = (64, 128, 256, 512)


class IRBlock(nn.Module):
    """BN → 3×3 conv → BN → PReLU → 3×3 conv (stride) → BN, plus the (projected) input."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(inputs),
            nn.Conv2d(inputs, outputs, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
            nn.PReLU(outputs),
            nn.Conv2d(outputs, outputs, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(outputs),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class IResNet(nn.Module):
    """Stem → four IR stages (each halving the map) → embedding head."""

    def __init__(self, depths: tuple[int, int, int, int], embedding_size: int, dropout: float) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(STAGE_WIDTHS[0]),
            nn.PReLU(STAGE_WIDTHS[0]),
        )
        stages, inputs = [], STAGE_WIDTHS[0]
        for width, depth in zip(STAGE_WIDTHS, depths, strict=True):
            blocks = [IRBlock(inputs, width, stride=2)]
            blocks += [IRBlock(width, width, stride=1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            inputs = width
        self.stages = nn.Sequential(*stages)
        self.head = EmbeddingHead(STAGE_WIDTHS[-1], INPUT_SIZE // 16, embedding_size, dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) normalized images -> (B, D) embeddings (not yet L2-normalized)."""
        return self.head(self.stages(self.stem(images)))


@register_backbone("iresnet18")
def iresnet18(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    return IResNet((2, 2, 2, 2), embedding_size, dropout)


@register_backbone("iresnet34")
def iresnet34(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    return IResNet((3, 4, 6, 3), embedding_size, dropout)


@register_backbone("iresnet50")
def iresnet50(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    return IResNet((3, 4, 14, 3), embedding_size, dropout)


@register_backbone("iresnet100")
def iresnet100(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    return IResNet((3, 13, 30, 3), embedding_size, dropout)
