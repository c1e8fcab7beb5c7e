"""Backbones from the registry: 112×112 in, D-dimensional embedding out, trainable."""

from __future__ import annotations

import pytest
import torch

from arcface.config import FACE_SIZE
from arcface.models.backbones import BACKBONES, INPUT_SIZE, CroppedInput, build_backbone, register_backbone
from arcface.models.heads import NormalizedLinear


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_maps_faces_to_embeddings_and_backpropagates(name: str) -> None:
    model = build_backbone(name)
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0  # the stem learns too


@pytest.mark.parametrize(
    ("name", "millions"),
    # iresnet50: 43.6M as published with insightface's arcface_torch; the resnets carry the same
    # 7×7 flatten → 512 head (12.8M parameters, 51.4M for resnet50's 2048 channels); the fast ones a
    # 4×4 one (4.2M: ImageNet resnet18's 11.2M trunk without its classifier, plus 4.2M); the half-width
    # ones a quarter of the trunk (2.8M; 5.3M for resnet34) and half the head (2.1M; 6.4M at 7×7).
    [("iresnet18", 24.0), ("iresnet34", 34.1), ("iresnet50", 43.6), ("iresnet100", 65.2),
     ("resnet34", 34.1), ("resnet50", 74.9), ("resnet18-fast", 15.4), ("resnet18-fast-half", 4.9),
     ("resnet34-half", 11.7)],
)  # fmt: skip
def test_parameter_counts(name: str, millions: float) -> None:
    count = sum(p.numel() for p in build_backbone(name).parameters())
    assert count / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize(
    ("half_name", "full_name"), [("resnet18-fast-half", "resnet18-fast"), ("resnet34-half", "resnet34")]
)
def test_half_width_trunk_halves_every_stage_and_keeps_the_module_names(
    half_name: str, full_name: str
) -> None:
    half, full = build_backbone(half_name), build_backbone(full_name)
    assert [stage[-1].conv2.out_channels for stage in half.stages] == [32, 64, 128, 256]
    assert [stage[-1].conv2.out_channels for stage in full.stages] == [64, 128, 256, 512]
    # Same names as torchvision's trunk: checkpoints and init_checkpoint's shape check read them alike.
    assert half.state_dict().keys() == full.state_dict().keys()
    # Initialized as torchvision initializes its trunk: He (fan-out) convolutions, unit BN scales.
    conv = half.stages[2][0].conv1  # 64 -> 128 channels, 3×3
    assert conv.weight.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    assert torch.equal(half.stem[1].weight, torch.ones(32))
    # The same stem as the full width: resnet34-half keeps the 112×112 stem and its 7×7 final map.
    assert half.stem[0].stride == full.stem[0].stride
    assert half.head.fc.in_features == full.head.fc.in_features // 2


def test_unknown_backbone_lists_known_ones() -> None:
    with pytest.raises(
        ValueError, match="known: iresnet100, iresnet18, iresnet34, iresnet50, resnet18, resnet18-fast, res"
    ):
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


def test_a_cropped_trunk_sees_only_its_box_scaled_to_the_full_input() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet18-fast-half", embedding_size=32, crop=(8, 88, 16, 96)).eval()
    assert isinstance(model, CroppedInput) and model.box == (8, 88, 16, 96)
    faces = torch.rand(2, 3, 112, 112)
    outside = faces.clone()
    outside[:, :, 90:, :] = 0.0  # the mouth and chin, below the box
    outside[:, :, :, :10] = 1.0  # the left edge
    with torch.no_grad():
        embedding = model(faces)
        assert torch.equal(model(outside), embedding)
        box = torch.nn.functional.interpolate(faces[:, :, 8:88, 16:96], size=(112, 112), mode="bilinear")
        assert torch.allclose(model.trunk(box), embedding, atol=1e-6)
        inside = faces.clone()
        inside[:, :, 40:50, 40:50] = 0.0  # the nose bridge, in the box
        assert not torch.allclose(model(inside), embedding, atol=1e-3)


def test_the_params_face_size_is_the_backbones_input_size() -> None:
    """config.py keeps its own copy (loading params imports no torch) to check train.crop boxes."""
    assert FACE_SIZE == INPUT_SIZE
