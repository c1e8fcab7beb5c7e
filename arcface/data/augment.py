"""Training-time augmentation of normalized face batches, on the training device.

LFW gives ~7,000 training faces: a ResNet memorizes them in a few epochs (train accuracy 0.99 while pair
accuracy stalls), so the CPU recipe leans on augmentation. Every random value is drawn once per epoch for
every face from the epoch's generator (CPU), so a resumed run sees the same augmented batches; the
pixels are transformed batch-wise on the device, with no worker processes.

- flip: horizontal mirror with probability 1/2;
- geometry: one affine warp per face with a zoom factor in [1 − zoom, 1 + zoom], a rotation in
  [−rotate, +rotate] degrees and a whole-pixel shift in [−shift, +shift] (the aligner's jitter); a pure
  shift uses nearest sampling and moves pixels exactly;
- colour: brightness, contrast and saturation factors in [1 − color, 1 + color], and grey with
  probability `grayscale` (LFW mixes colour casts and a few monochrome photos);
- blur: with probability `blur`, a Gaussian blur of σ in [0.5, 2] pixels (LFW's small, soft JPEGs);
- erase: with probability `erase`, one rectangle of 2–25% of the face with an aspect ratio in [1/3, 3]
  set to mid-grey (random erasing: occlusion by hands, hair, glasses, a microphone);
- sunglasses: with probability `sunglasses`, two dark lenses and a bridge over the aligned eyes, drawn
  before the warp so they move with the face (8 of the 17 same-person View 1 pairs every two-trunk run
  gets wrong have dark glasses in one photo; at 0.2 it did not rescue them: README, "Model quality").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from arcface.data.align import ARCFACE_TEMPLATE, FACE_SIZE

# ITU-R BT.601 luma weights: the grey a television (and PIL's "L" mode) makes of RGB.
LUMA = (0.299, 0.587, 0.114)
BLUR_SIGMA = (0.5, 2.0)  # pixels of a 112x112 face: from a soft focus to a small upscaled photo
ERASE_AREA = (0.02, 0.25)  # share of the face one erased rectangle covers
ERASE_ASPECT = (1 / 3, 3.0)  # its height / width
# Eye centres of the ArcFace template as fractions of the side, (x, y) of the left and right eye; the
# lenses are ellipses about them, sized as fractions of the side too (29-38 px wide on a 112 px face).
EYES = tuple((float(x) / FACE_SIZE, float(y) / FACE_SIZE) for x, y in ARCFACE_TEMPLATE[:2])
LENS_HALF_WIDTH = (0.13, 0.17)
LENS_HALF_HEIGHT = (0.08, 0.12)
LENS_JITTER = 0.02  # the lenses' centre moves up or down by up to this share of the side
LENS_SHADE = (-1.0, -0.5)  # normalized grey of the lenses: black to dark grey
BRIDGE_HALF_HEIGHT = 0.012


@dataclass(frozen=True)
class Augmentation:
    """What to randomize; all off except flips by default."""

    flip: bool = True
    shift: int = 0  # pixels
    zoom: float = 0.0  # relative
    rotate: float = 0.0  # degrees
    color: float = 0.0  # relative
    grayscale: float = 0.0  # probability
    blur: float = 0.0  # probability
    erase: float = 0.0  # probability
    sunglasses: float = 0.0  # probability

    @property
    def warps(self) -> bool:
        return bool(self.shift or self.zoom or self.rotate)

    def draw(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random values for `count` faces (CPU tensors of length `count`, fixed by the generator)."""

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(count, *shape, generator=generator)

        draws = {"flip": torch.rand(count, generator=generator) < 0.5}
        draws["shift"] = torch.randint(-self.shift, self.shift + 1, (count, 2), generator=generator)
        if self.zoom or self.rotate:
            draws["zoom"] = uniform(1 - self.zoom, 1 + self.zoom)
            draws["angle"] = uniform(-math.radians(self.rotate), math.radians(self.rotate))
        if self.color:
            draws["color"] = uniform(1 - self.color, 1 + self.color, 3)  # brightness, contrast, saturation
        if self.grayscale:
            draws["gray"] = torch.rand(count, generator=generator) < self.grayscale
        if self.blur:
            draws["blur"] = torch.rand(count, generator=generator) < self.blur
            draws["sigma"] = uniform(*BLUR_SIGMA)
        if self.erase:
            draws["erase"] = torch.rand(count, generator=generator) < self.erase
            area = uniform(*ERASE_AREA)
            aspect = torch.exp(uniform(math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])))
            height, width = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
            top, left = uniform(0, 1) * (1 - height), uniform(0, 1) * (1 - width)
            draws["box"] = torch.stack([top, left, top + height, left + width], dim=1)  # image fractions
        if self.sunglasses:
            draws["glasses"] = torch.rand(count, generator=generator) < self.sunglasses
            draws["lens"] = torch.stack(
                [
                    uniform(*LENS_HALF_WIDTH),
                    uniform(*LENS_HALF_HEIGHT),
                    uniform(-LENS_JITTER, LENS_JITTER),
                    uniform(*LENS_SHADE),
                ],
                dim=1,
            )
        return draws

    def apply(self, images: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment (B, 3, H, W) images normalized to [-1, 1) with their faces' draws (on the device)."""
        if self.flip:
            images = torch.where(draws["flip"][:, None, None, None], images.flip(3), images)
        if "glasses" in draws:
            images = draw_sunglasses(images, draws["lens"], draws["glasses"])
        if "zoom" in draws:
            images = warp_images(images, draws["shift"], draws["zoom"], draws["angle"])
        elif self.shift:
            images = shift_images(images, draws["shift"])
        if "color" in draws:
            images = jitter_colors(images, draws["color"])
        if "gray" in draws:
            images = torch.where(draws["gray"][:, None, None, None], to_gray(images), images)
        if "blur" in draws:
            # Only the chosen faces: the convolutions cost as much as the rest of the augmentation.
            chosen = draws["blur"].nonzero().squeeze(1).to(images.device)
            if len(chosen):
                blurred = blur_images(images.index_select(0, chosen), draws["sigma"][chosen.cpu()])
                images = images.index_copy(0, chosen, blurred)
        if "erase" in draws:
            images = erase_boxes(images, draws["box"], draws["erase"])
        return images.contiguous(memory_format=torch.channels_last)


def _sample(images: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    # affine_grid maps output coordinates in [-1, 1] to input coordinates; outside is zero (mid-grey).
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each (3, H, W) image by its own whole-pixel (dx, dy), filling with zeros (mid-grey after
    normalization): a cheap stand-in for the detector's jitter. (B, 3, H, W), (B, 2) -> (B, 3, H, W)."""
    batch, _, height, width = images.shape
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # One pixel is 2 / size in grid coordinates; sampling at +d moves the content by -d.
    theta[:, 0, 2] = -2.0 * shifts[:, 0].to(images.dtype) / width
    theta[:, 1, 2] = -2.0 * shifts[:, 1].to(images.dtype) / height
    return _sample(images, theta, "nearest").contiguous(memory_format=torch.channels_last)


def warp_images(
    images: torch.Tensor, shifts: torch.Tensor, zooms: torch.Tensor, angles: torch.Tensor
) -> torch.Tensor:
    """Zoom each image by its factor (> 1 enlarges) and rotate it by its angle (radians; positive turns
    clockwise on screen) about the centre, then shift it by whole pixels; bilinear sampling.
    (B, 3, H, W), (B, 2), (B,), (B,) -> (B, 3, H, W)."""
    batch, _, height, width = images.shape
    zooms, angles = zooms.to(images.dtype), angles.to(images.dtype)
    cos, sin = torch.cos(angles) / zooms, torch.sin(angles) / zooms
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    # theta is the inverse map (output pixel -> where to read it) of "rotate, then scale by zoom".
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin
    theta[:, 1, 0], theta[:, 1, 1] = -sin, cos
    theta[:, 0, 2] = -2.0 * shifts[:, 0].to(images.dtype) / width
    theta[:, 1, 2] = -2.0 * shifts[:, 1].to(images.dtype) / height
    return _sample(images, theta, "bilinear")


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H, W) with every channel the luma of the pixel."""
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)[None, :, None, None]
    return (images * weights).sum(1, keepdim=True).expand_as(images)


def jitter_colors(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale brightness, contrast and saturation of each image by its (3,) factors, in [-1, 1) pixels.

    Brightness scales the light ((x + 1) / 2 in [0, 1]); contrast blends with the image's mean grey;
    saturation blends with each pixel's grey. Results are clipped to the normalized range.
    """
    factors = factors.to(images.dtype)[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    brightness, contrast, saturation = factors[:, 0], factors[:, 1], factors[:, 2]
    light = (images + 1) * 0.5 * brightness
    mean_grey = to_gray(light).mean(dim=(1, 2, 3), keepdim=True)
    light = mean_grey + (light - mean_grey) * contrast
    grey = to_gray(light)
    light = grey + (light - grey) * saturation
    return light.clamp(0.0, 255.0 / 256.0) * 2 - 1


def blur_images(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each image with a Gaussian of its own σ in pixels (0: unchanged), edges replicated.
    (B, 3, H, W), (B,) -> (B, 3, H, W)."""
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    sigmas = sigmas.to(images.device, torch.float32)[:, None]
    # σ = 0 would divide by zero: a tiny σ puts all the weight on the centre tap (the identity).
    kernels = torch.exp(-0.5 * (offsets / sigmas.clamp(min=1e-3)) ** 2)
    kernels = (kernels / kernels.sum(1, keepdim=True)).to(images.dtype)
    # One separable pass per axis; each image's channels share its kernel (a grouped convolution).
    weights = kernels.repeat_interleave(channels, dim=0)  # (B*3, 2r+1)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, weights[:, None, :, None], groups=batch * channels)  # along the height
    flat = F.conv2d(flat, weights[:, None, None, :], groups=batch * channels)  # along the width
    return flat.reshape(batch, channels, height, width)


def erase_boxes(images: torch.Tensor, boxes: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Set each chosen image's box (top, left, bottom, right as fractions of its height and width) to
    zero, the mid-grey of normalized pixels. (B, 3, H, W), (B, 4), (B,) -> (B, 3, H, W)."""
    _, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32)
    # A pixel is inside when its centre is.
    rows = (torch.arange(height, device=images.device, dtype=torch.float32) + 0.5) / height
    cols = (torch.arange(width, device=images.device, dtype=torch.float32) + 0.5) / width
    inside_rows = (rows[None] >= boxes[:, 0:1]) & (rows[None] < boxes[:, 2:3])  # (B, H)
    inside_cols = (cols[None] >= boxes[:, 1:2]) & (cols[None] < boxes[:, 3:4])  # (B, W)
    inside = inside_rows[:, :, None] & inside_cols[:, None, :] & chosen.to(images.device)[:, None, None]
    return images.masked_fill(inside[:, None], 0.0)


def draw_sunglasses(images: torch.Tensor, lenses: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Paint dark glasses on each chosen aligned face: two elliptical lenses about the template's eyes and
    a bridge between them, in one flat shade. `lenses` rows: half-width, half-height, vertical offset (as
    fractions of the side) and shade (normalized grey). (B, 3, H, W), (B, 4), (B,) -> (B, 3, H, W)."""
    _, _, height, width = images.shape
    lenses = lenses.to(images.device, torch.float32)
    half_width, half_height, offset, shade = (lenses[:, i, None, None] for i in range(4))
    rows = ((torch.arange(height, device=images.device, dtype=torch.float32) + 0.5) / height)[None, :, None]
    cols = ((torch.arange(width, device=images.device, dtype=torch.float32) + 0.5) / width)[None, None, :]
    covered = torch.zeros(len(images), height, width, dtype=torch.bool, device=images.device)
    for eye_x, eye_y in EYES:
        covered |= ((cols - eye_x) / half_width) ** 2 + ((rows - eye_y - offset) / half_height) ** 2 <= 1
    bridge_y = sum(y for _, y in EYES) / 2 + offset
    between = (cols > EYES[0][0]) & (cols < EYES[1][0])
    covered |= between & ((rows - bridge_y).abs() <= BRIDGE_HALF_HEIGHT)
    covered &= chosen.to(images.device)[:, None, None]
    return torch.where(covered[:, None], shade[:, None].to(images.dtype), images)  # (B, 1, 1, 1) shade
