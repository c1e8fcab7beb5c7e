"""Backbones for 112×112 faces, built from a registry by name.

The seed's ResNet34/ResNet50 use torchvision's residual blocks with the stem adapted to 112×112 input: a
3×3 stride-1 convolution instead of the 7×7 stride-2 one (which throws away detail a face crop can't spare),
keeping the max-pool, so the four stages run at 56, 28, 14 and 7 pixels. The 7×7 map goes through the
field's standard embedding head: BN → dropout → flatten → FC → BN (no ReLU: the embedding is a direction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
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


def build_backbone(
    name: str, embedding_size: int = 512, dropout: float = 0.0, crop: Sequence[int] | None = None
) -> nn.Module:
    """Instantiate a registered backbone with randomly initialized weights; with `crop` (top, bottom, left,
    right pixels of the 112×112 face), one that sees only that box, resized to 112×112."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r} (known: {known})") from None
    trunk = factory(embedding_size=embedding_size, dropout=dropout)
    return CroppedInput(trunk, crop) if crop is not None else trunk


class CroppedInput(nn.Module):
    """A trunk that looks at one box of the aligned face, scaled back up to the full input size.

    Why: a second trunk on a part of the face (say the eyes and nose, without the jaw line, mouth and
    background) errs on other pairs than one on the whole face, so their ensemble gains more than two
    whole-face trunks (README, "Model quality"). Being part of the model, the crop travels with the
    checkpoint: embed, the index and search feed it whole faces like any other trunk."""

    def __init__(self, trunk: nn.Module, box: Sequence[int]) -> None:
        super().__init__()
        self.trunk = trunk
        self.box = tuple(int(v) for v in box)  # top, bottom, left, right

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.box
        part = images[:, :, top:bottom, left:right]
        part = F.interpolate(part, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.trunk(part)


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
    detail (README, "Model quality"). `width` is the first stage's channels (torchvision: 64, doubling per
    stage); 32 halves every stage, a quarter of the convolutions' arithmetic again.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        embedding_size: int,
        dropout: float,
        fast_stem: bool = False,
        width: int = 64,
    ) -> None:
        super().__init__()
        if width == 64:  # torchvision's own trunk: earlier runs' initial weights stay bit for bit
            trunk = ResNet(block, layers)
            self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
            self.stages = nn.Sequential(trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
        else:
            self.stem, self.stages = _narrow_trunk(block, layers, width)
        if not fast_stem:
            self.stem[0] = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        map_size = INPUT_SIZE // 32 + 1 if fast_stem else INPUT_SIZE // 16  # 112 -> 4 (rounded up) or 7
        self.head = EmbeddingHead(8 * width * block.expansion, map_size, embedding_size, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) normalized images -> (B, D) embeddings (not yet L2-normalized)."""
        return self.head(self.stages(self.stem(images)))


def _narrow_trunk(
    block: type[BasicBlock | Bottleneck], layers: list[int], width: int
) -> tuple[nn.Sequential, nn.Sequential]:
    """torchvision's ImageNet stem and four stages with `width`, 2·width, 4·width, 8·width channels (the
    same module names as torchvision's trunk), initialized as torchvision initializes its own."""
    stem = nn.Sequential(
        nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    stages, channels = [], width
    for index, count in enumerate(layers):
        planes, stride = width * 2**index, 1 if index == 0 else 2
        blocks = []
        for position in range(count):
            downsample = None
            if position == 0 and (stride != 1 or channels != planes * block.expansion):
                downsample = nn.Sequential(
                    nn.Conv2d(channels, planes * block.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            # torchvision's BasicBlock refuses a base width other than 64; its planes are free.
            blocks.append(block(channels, planes, stride if position == 0 else 1, downsample))
            channels = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    trunk = nn.Sequential(*stages)
    for module in [*stem.modules(), *trunk.modules()]:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return stem, trunk


@register_backbone("resnet18")
def resnet18(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """ResNet18 with the same stem and head: basic blocks [2, 2, 2, 2] (for quick CPU recipes)."""
    return FaceResNet(BasicBlock, [2, 2, 2, 2], embedding_size, dropout)


@register_backbone("resnet18-fast")
def resnet18_fast(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """ResNet18 with torchvision's stride-4 stem (4×4 final map): ~2× the CPU training speed of resnet18."""
    return FaceResNet(BasicBlock, [2, 2, 2, 2], embedding_size, dropout, fast_stem=True)


@register_backbone("resnet18-fast-half")
def resnet18_fast_half(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """resnet18-fast at half the channels (32, 64, 128, 256): ~4× its CPU training speed, for CPUs
    without fast bf16, where the full width can't train the `cpu` recipe's epochs in an hour."""
    return FaceResNet(BasicBlock, [2, 2, 2, 2], embedding_size, dropout, fast_stem=True, width=32)


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


@register_backbone("resnet34-half")
def resnet34_half(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """The seed's ResNet34 at half the channels (32, 64, 128, 256): ~4× its float32 CPU training speed,
    for the bundled sample's demo on CPUs without fast bf16 (README, first lines)."""
    return FaceResNet(BasicBlock, [3, 4, 6, 3], embedding_size, dropout, width=32)


@register_backbone("resnet50")
def resnet50(embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """The seed's ResNet50: bottleneck blocks [3, 4, 6, 3]."""
    return FaceResNet(Bottleneck, [3, 4, 6, 3], embedding_size, dropout)


# The IResNet family registers itself on import; it lives in its own module.
from arcface.models import iresnet  # noqa: E402, F401
