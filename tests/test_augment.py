"""Training augmentation: each transform does what it says on small known images."""

from __future__ import annotations

import numpy as np
import torch

from arcface.data.augment import (
    Augmentation,
    blur_images,
    draw_sunglasses,
    erase_boxes,
    jitter_colors,
    shift_images,
    to_gray,
    warp_images,
)
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


def test_blur_spreads_a_point_like_a_gaussian_and_zero_sigma_changes_nothing() -> None:
    images = -torch.ones(2, 3, 21, 21)
    images[:, :, 10, 10] = 1.0
    blurred = blur_images(images, torch.tensor([0.0, 1.5]))
    assert torch.allclose(blurred[0], images[0], atol=1e-6)
    light = (blurred[1, 0] + 1) / 2  # the point's light: 1 at one pixel, spread out and conserved
    assert torch.isclose(light.sum(), torch.tensor(1.0), atol=1e-4)
    rows = torch.arange(21.0)[:, None].expand(21, 21)
    variance = (light * (rows - 10) ** 2).sum()
    assert torch.isclose(variance, torch.tensor(1.5**2), rtol=0.02)  # sigma 1.5 along each axis
    assert torch.allclose(light, light.T, atol=1e-6)


def test_erase_greys_exactly_the_box_of_the_chosen_images() -> None:
    images = ramp(2, 10)
    boxes = torch.tensor([[0.2, 0.3, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]])
    erased = erase_boxes(images, boxes, torch.tensor([True, False]))
    assert torch.equal(erased[1], images[1])
    inside = torch.zeros(10, 10, dtype=torch.bool)
    inside[2:6, 3:9] = True  # pixel centres (i + 0.5) / 10 inside [0.2, 0.6) x [0.3, 0.9)
    assert (erased[0][:, inside] == 0).all()
    assert torch.equal(erased[0][:, ~inside], images[0][:, ~inside])


def test_erase_and_blur_draws_follow_their_probability_and_area() -> None:
    augmentation = Augmentation(flip=False, blur=0.25, erase=0.5)
    draws = augmentation.draw(4000, torch.Generator().manual_seed(0))
    assert abs(draws["blur"].float().mean() - 0.25) < 0.03 and abs(draws["erase"].float().mean() - 0.5) < 0.03
    assert draws["sigma"].min() >= 0.5 and draws["sigma"].max() <= 2.0
    top, left, bottom, right = draws["box"].unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (bottom <= 1 + 1e-6).all() and (right <= 1 + 1e-6).all()
    area = (bottom - top) * (right - left)
    assert area.min() >= 0.02 * 0.99 and area.max() <= 0.25 * 1.01
    images = torch.rand(4000, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    changed = (augmentation.apply(images, draws) != images).flatten(1).any(1)
    chosen = draws["blur"] | draws["erase"]
    assert not (changed & ~chosen).any()  # the rest pass through untouched
    assert changed.sum() > 0.97 * chosen.sum()  # a 2% box may cover no pixel centre of a 16x16 image


def test_augmented_batches_stay_normalized_and_repeat_per_epoch() -> None:
    faces = np.random.default_rng(0).integers(0, 256, (16, 112, 112, 3), dtype=np.uint8)
    augmentation = Augmentation(
        flip=True, shift=4, zoom=0.1, rotate=10, color=0.4, grayscale=0.5, blur=0.5, erase=0.5
    )
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


def test_sunglasses_cover_both_eyes_and_the_bridge_and_nothing_else() -> None:
    images = ramp(2, 112)
    lenses = torch.tensor([[0.15, 0.1, 0.0, -0.8], [0.15, 0.1, 0.0, -0.8]])
    painted = draw_sunglasses(images, lenses, torch.tensor([True, False]))
    assert torch.equal(painted[1], images[1])  # not chosen: untouched
    for x, y in ((38, 51), (73, 51), (56, 51)):  # both template eyes and the bridge between them
        assert torch.allclose(painted[0, :, y, x], torch.tensor(-0.8))
    for x, y in ((56, 92), (56, 72), (5, 5), (56, 30)):  # mouth, nose tip, a corner, the forehead
        assert torch.equal(painted[0, :, y, x], images[0, :, y, x])
    covered = (painted[0] != images[0]).any(0).float().mean()
    assert 0.08 < covered < 0.2  # two lenses of ~pi * 0.15 * 0.1 of the face each, and a thin bridge


def test_sunglasses_are_drawn_before_the_shift_so_they_move_with_the_face() -> None:
    augmentation = Augmentation(flip=False, shift=6, sunglasses=0.5)
    draws = augmentation.draw(400, torch.Generator().manual_seed(2))
    assert abs(draws["glasses"].float().mean() - 0.5) < 0.08
    half_width, half_height, offset, shade = draws["lens"].unbind(1)
    assert half_width.min() >= 0.13 and half_width.max() <= 0.17 and half_height.max() <= 0.12
    assert offset.abs().max() <= 0.02 and shade.min() >= -1.0 and shade.max() <= -0.5
    images = torch.rand(400, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    expected = shift_images(draw_sunglasses(images, draws["lens"], draws["glasses"]), draws["shift"])
    assert torch.equal(augmentation.apply(images, draws), expected)
    unchanged = (augmentation.apply(images, draws) == shift_images(images, draws["shift"])).flatten(1).all(1)
    assert torch.equal(unchanged, ~draws["glasses"])
