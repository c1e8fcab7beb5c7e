"""Training data from the aligned store: which identities may train, and batches augmented on the device.

LFW-sized sets fit in memory (13,233 faces are 0.5 GB as uint8), so the selected faces are copied once
into a uint8 tensor on the training device; each batch is indexed, flipped and normalized there. No JPEG
decoding and no worker processes in the loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from arcface.data.store import usable_rows


@dataclass(frozen=True)
class TrainingSplit:
    """Rows of the store that train, their class ids, and the class names (index = class id)."""

    rows: np.ndarray  # (N,) int64 manifest rows
    labels: np.ndarray  # (N,) int64 in [0, C)
    classes: list[str]
    excluded_identities: int  # identities left out because the evaluation scores them
    too_small_identities: int  # identities left out for having fewer than the minimum images

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def training_split(
    manifest: pd.DataFrame, excluded: Iterable[str], min_images_per_identity: int
) -> TrainingSplit:
    """Every usable face whose identity is not `excluded` and has enough images.

    `excluded` holds the identities the model will be scored on: honest evaluation means the model
    never trains on them (DESIGN.md, "Honest evaluation").
    """
    excluded = set(excluded)
    usable = manifest.iloc[usable_rows(manifest)]
    allowed = usable[~usable["identity"].isin(excluded)]
    counts = allowed["identity"].value_counts()
    kept_names = sorted(counts[counts >= min_images_per_identity].index)
    kept = allowed[allowed["identity"].isin(kept_names)]
    class_of = {name: label for label, name in enumerate(kept_names)}
    return TrainingSplit(
        rows=kept.index.to_numpy(dtype=np.int64),
        labels=kept["identity"].map(class_of).to_numpy(dtype=np.int64),
        classes=kept_names,
        excluded_identities=len(set(usable["identity"]) & excluded),
        too_small_identities=int((counts < min_images_per_identity).sum()),
    )


def to_model_input(faces: torch.Tensor) -> torch.Tensor:
    """(B, 112, 112, 3) uint8 -> (B, 3, 112, 112) float in [-1, 1), channels_last: (x − 127.5) / 128."""
    images = faces.permute(0, 3, 1, 2).float().sub_(127.5).div_(128.0)
    return images.contiguous(memory_format=torch.channels_last)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each (3, H, W) image by its own whole-pixel (dx, dy), filling with zeros (mid-grey after
    normalization): a cheap stand-in for the detector's jitter. (B, 3, H, W), (B, 2) -> (B, 3, H, W)."""
    batch, _, height, width = images.shape
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size; sampling at +d moves content by -d.
    theta[:, 0, 2] = -2.0 * shifts[:, 0].to(images.dtype) / width
    theta[:, 1, 2] = -2.0 * shifts[:, 1].to(images.dtype) / height
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return moved.contiguous(memory_format=torch.channels_last)


class DeviceBatches:
    """Shuffled batches of faces held on the training device, with random horizontal flips.

    Every step consumes `batch_size` images of one permutation that depends only on (seed, epoch), so a
    resumed run sees the same batches. The step's images are cut into `world × accumulate` equal
    micro-batches; process `rank` gets micro-batches rank·accumulate ... rank·accumulate + accumulate − 1.
    So a 2-process run and a 1-process run with `accumulate=2` compute on exactly the same micro-batches.
    """

    def __init__(
        self,
        faces: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device,
        seed: int,
        flip: bool = True,
        world: int = 1,
        rank: int = 0,
        accumulate: int = 1,
        shift: int = 0,
    ) -> None:
        parts = world * accumulate
        if batch_size % parts:
            raise ValueError(
                f"train.batch_size {batch_size} does not split into {world} process(es) × "
                f"train.accumulate {accumulate} equal micro-batches"
            )
        if len(faces) < batch_size:
            raise ValueError(
                f"only {len(faces)} training faces for batch_size {batch_size}: lower train.batch_size"
            )
        self.faces = torch.from_numpy(np.ascontiguousarray(faces)).to(device)  # (N, 112, 112, 3)
        self.labels = torch.as_tensor(np.array(labels, dtype=np.int64), device=device)
        self.batch_size, self.device, self.seed, self.flip = batch_size, device, seed, flip
        self.micro_size = batch_size // parts
        self.rank, self.accumulate, self.shift = rank, accumulate, shift

    def __len__(self) -> int:
        # The last incomplete batch is dropped: BatchNorm and the schedule prefer equal batches.
        return len(self.faces) // self.batch_size

    def epoch(self, epoch: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per step, this process's micro-batches: [(images (b, 3, 112, 112), labels (b,)), ...]."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.faces), generator=generator).to(self.device)
        flips = torch.rand(len(self.faces), generator=generator).to(self.device) < 0.5
        shifts = torch.randint(-self.shift, self.shift + 1, (len(self.faces), 2), generator=generator)
        shifts = shifts.to(self.device)
        for step in range(len(self)):
            micro_batches = []
            for part in range(self.rank * self.accumulate, (self.rank + 1) * self.accumulate):
                start = step * self.batch_size + part * self.micro_size
                index = order[start : start + self.micro_size]
                images = to_model_input(self.faces[index])
                if self.flip:
                    images = torch.where(flips[index][:, None, None, None], images.flip(3), images)
                if self.shift:
                    images = shift_images(images, shifts[index])
                micro_batches.append((images, self.labels[index]))
            yield micro_batches
