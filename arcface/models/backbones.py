"""Backbones for 112×112 faces, built from a registry by name.

The seed's ResNet34/ResNet50 use torchvision's residual blocks with the stem adapted to 112×112 input: a
3×3 stride-1 convolution instead of the 7×7 stride-2 one (which throws away detail a face crop can't spare),
keeping the max-pool, so the four stages run at 56, 28, 14 and 7 pixels. The 7×7 map goes through the
field's standard embedding head: BN → dropout → flatten → FC → BN (no ReLU: the embedding is a direction).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

INPUT_SIZE = 112
BackboneFactory = Callable[..., nn.Module]
BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: make a factory `f(embedding_size, dropout) -> nn.Module` buildable by name."""

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = factory
        return factory

    return decorate


def build_backbone(name: str, embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """Instantiate a registered backbone with randomly initialized weights."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r} (known: {known})") from None
    return factory(embedding_size=embedding_size, dropout=dropout)


class EmbeddingHead(nn.Module):
    """(B, C, 7, 7) feature map -> (B, D) embedding: BN → dropout → FC → BN."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float) -> None:
        super().__init__()
        self.bn_map = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.bn_embedding = nn.BatchNorm1d(embedding_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn_map(features)).flatten(1)  # (B, C·7·7)
        return self.bn_embedding(self.fc(x))  # (B, D)


class FaceResNet(nn.Module):
    """torchvision ResNet trunk with a 112×112 stem and the embedding head.

    `fast_stem` keeps torchvision's ImageNet stem (7×7 stride-2 convolution + max-pool): the stages run at
    28, 14, 7 and 4 pixels, a quarter of the arithmetic, for CPU recipes where epochs matter more than
    detail (README, "Model quality").
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        embedding_size: int,
        dropout: float,
        fast_stem: bool = False,
    ) -> None:
        super().__init__()
        trunk = ResNet(block, layers)
        if not fast_stem:
            trunk.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.stages = nn.Sequential(trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
        map_size = INPUT_SIZE // 32 + 1 if fast_stem else INPUT_SIZE // 16  # 112 -> 4 (rounded up) or 7
        self.head = EmbeddingHead(512 * block.expansion, map_size, embedding_size, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) normalized images -> (B, D) embeddings (not yet L2-normalized)."""
        return self.head(self.stages(self.stem(images)))


@register_backbone("resnet18")
def resnet18(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """ResNet18 with the same stem and head: basic blocks [2, 2, 2, 2] (for quick CPU recipes)."""
    return FaceResNet(BasicBlock, [2, 2, 2, 2], embedding_size, dropout)


@register_backbone("resnet18-fast")
def resnet18_fast(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """ResNet18 with torchvision's stride-4 stem (4×4 final map): ~2× the CPU training speed of resnet18."""
    return FaceResNet(BasicBlock, [2, 2, 2, 2], embedding_size, dropout, fast_stem=True)


@register_backbone("resnet34-fast")
def resnet34_fast(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """ResNet34 with torchvision's stride-4 stem (4×4 final map)."""
    return FaceResNet(BasicBlock, [3, 4, 6, 3], embedding_size, dropout, fast_stem=True)


@register_backbone("resnet50-fast")
def resnet50_fast(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """ResNet50 with torchvision's stride-4 stem (4×4 final map)."""
    return FaceResNet(Bottleneck, [3, 4, 6, 3], embedding_size, dropout, fast_stem=True)


@register_backbone("resnet34")
def resnet34(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """The seed's ResNet34: basic blocks [3, 4, 6, 3]."""
    return FaceResNet(BasicBlock, [3, 4, 6, 3], embedding_size, dropout)


@register_backbone("resnet50")
def resnet50(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """The seed's ResNet50: bottleneck blocks [3, 4, 6, 3]."""
    return FaceResNet(Bottleneck, [3, 4, 6, 3], embedding_size, dropout)


# The IResNet family registers itself on import; it lives in its own module.
from arcface.models import iresnet  # noqa: E402, F401
