"""Training augmentation: each transform does what it says on small known images."""

from __future__ import annotations

import numpy as np
import torch

from arcface.data.augment import Augmentation, jitter_colors, shift_images, to_gray, warp_images
from arcface.data.datasets import DeviceBatches


def ramp(batch: int = 2, size: int = 8) -> torch.Tensor:
    values = torch.linspace(-0.9, 0.9, batch * 3 * size * size)
    return values.reshape(batch, 3, size, size)


def test_warp_without_zoom_or_rotation_is_the_exact_shift() -> None:
    images = ramp()
    shifts = torch.tensor([[2, -1], [0, 3]])
    ones, zeros = torch.ones(2), torch.zeros(2)
    assert torch.allclose(warp_images(images, shifts, ones, zeros), shift_images(images, shifts), atol=1e-6)


def test_quarter_turn_moves_pixels_like_rot90() -> None:
    images = ramp()
    turned = warp_images(images, torch.zeros(2, 2), torch.ones(2), torch.full((2,), torch.pi / 2))
    assert torch.allclose(turned, torch.rot90(images, k=-1, dims=(2, 3)), atol=1e-5)  # clockwise


def test_zoom_enlarges_about_the_centre() -> None:
    images = -torch.ones(1, 3, 16, 16)
    images[..., 6:10, 6:10] = 1.0  # a 4x4 bright square in the middle
    zoomed = warp_images(images, torch.zeros(1, 2), torch.tensor([2.0]), torch.zeros(1))
    bright = zoomed[0, 0] > 0
    assert bright.sum() == 64  # 8x8
    assert bright[4:12, 4:12].all()


def test_neutral_colour_factors_change_nothing_and_grey_keeps_luma() -> None:
    images = ramp()
    assert torch.allclose(jitter_colors(images, torch.ones(2, 3)), images, atol=1e-5)
    grey = to_gray(images)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    expected = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(grey[:, 0], expected, atol=1e-6)


def test_brightness_and_desaturation_act_on_light() -> None:
    images = ramp(1)
    darker = jitter_colors(images, torch.tensor([[0.5, 1.0, 1.0]]))
    assert torch.allclose((darker + 1) / 2, (images + 1) / 4, atol=1e-5)
    flat = jitter_colors(images, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(flat, to_gray(images), atol=1e-5)


def test_augmented_batches_stay_normalized_and_repeat_per_epoch() -> None:
    faces = np.random.default_rng(0).integers(0, 256, (16, 112, 112, 3), dtype=np.uint8)
    augmentation = Augmentation(flip=True, shift=4, zoom=0.1, rotate=10, color=0.4, grayscale=0.5)
    batches = DeviceBatches(faces, np.arange(16) % 4, 8, torch.device("cpu"), 1, augmentation)
    first = [step[0][0] for step in batches.epoch(1)]
    again = [step[0][0] for step in batches.epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    plain = DeviceBatches(faces, np.arange(16) % 4, 8, torch.device("cpu"), 1, Augmentation(flip=False))
    assert not torch.equal(first[0], next(iter(plain.epoch(1)))[0][0])
    stacked = torch.cat(first)
    assert stacked.min() >= -1.0 and stacked.max() < 1.0
    grey_rows = (stacked[:, 0] == stacked[:, 1]).flatten(1).all(1) & (stacked[:, 1] == stacked[:, 2]).flatten(
        1
    ).all(1)
    assert 0 < grey_rows.sum() < len(stacked)  # about half were made grey
