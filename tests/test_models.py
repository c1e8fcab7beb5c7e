"""Backbones from the registry: 112×112 in, D-dimensional embedding out, trainable."""

from __future__ import annotations

import pytest
import torch

from arcface.models.backbones import BACKBONES, build_backbone, register_backbone
from arcface.models.heads import NormalizedLinear


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_maps_faces_to_embeddings(name: str) -> None:
    model = build_backbone(name, embedding_size=128).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 128)
    assert torch.isfinite(out).all()


def test_resnet50_is_bigger_than_resnet34() -> None:
    sizes = {n: sum(p.numel() for p in build_backbone(n).parameters()) for n in BACKBONES}
    assert sizes["resnet34"] < sizes["resnet50"]
    # trunk ~21.3M + 512·7·7 → 512 head (12.8M): the seed's resnet34 adapted to 112×112.
    assert 33e6 < sizes["resnet34"] < 36e6


def test_unknown_backbone_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="known: resnet34, resnet50"):
        build_backbone("vgg16")


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_backbone("resnet34")(lambda **_: None)


def test_normalized_head_returns_cosines() -> None:
    head = NormalizedLinear(16, 4)
    cosine = head(torch.randn(5, 16) * 100)
    assert cosine.shape == (5, 4)
    assert (cosine.abs() <= 1 + 1e-6).all()
    same = head(head.weight.detach()[:2] * 3.0)  # an embedding along a class centre has cos 1
    assert torch.allclose(same.diagonal(), torch.ones(2), atol=1e-5)
