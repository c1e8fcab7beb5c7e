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

from arcface.data.augment import Augmentation
from arcface.data.store import usable_rows


@dataclass(frozen=True)
class TrainingSplit:
    """Rows of the store that train, their class ids, and the class names (index = class id)."""

    rows: np.ndarray  # (N,) int64 manifest rows
    labels: np.ndarray  # (N,) int64 in [0, C)
    classes: list[str]
    excluded_identities: int  # identities left out because the evaluation scores them
    too_small: list[str]  # identities left out for having fewer than the minimum images (not scored either)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def too_small_identities(self) -> int:
        return len(self.too_small)


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
        too_small=sorted(counts[counts < min_images_per_identity].index),
    )


def to_model_input(faces: torch.Tensor) -> torch.Tensor:
    """(B, 112, 112, 3) uint8 -> (B, 3, 112, 112) float in [-1, 1), channels_last: (x − 127.5) / 128."""
    images = faces.permute(0, 3, 1, 2).float().sub_(127.5).div_(128.0)
    return images.contiguous(memory_format=torch.channels_last)


class DeviceBatches:
    """Shuffled batches of faces held on the training device, augmented there (arcface.data.augment).

    Every step consumes `batch_size` images of one permutation that depends only on (seed, epoch), so a
    resumed run sees the same batches. The step's images are cut into `world × accumulate` equal
    micro-batches; process `rank` gets micro-batches rank·accumulate ... rank·accumulate + accumulate − 1.
    So a 2-process run and a 1-process run with `accumulate=2` compute on exactly the same micro-batches.

    `identity_cap` > 0 takes at most that many faces of each identity into an epoch, a fresh random
    subset each epoch: LFW's George W Bush has 530 faces, 8% of the training set, and a few politicians
    take most of the rest; capped epochs spend the steps on many people instead of a few.

    `class_balance` = a > 0 draws each epoch's faces with replacement, a face of an identity with n faces
    at a weight of n^-a (1: every identity equally often; 0.5: in proportion to sqrt(n)). The epoch keeps
    its number of faces, and every draw gets its own augmentation, as a small identity's faces recur.
    """

    def __init__(
        self,
        faces: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device,
        seed: int,
        augmentation: Augmentation = Augmentation(),
        world: int = 1,
        rank: int = 0,
        accumulate: int = 1,
        identity_cap: int = 0,
        class_balance: float = 0.0,
    ) -> None:
        parts = world * accumulate
        if batch_size % parts:
            raise ValueError(
                f"train.batch_size {batch_size} does not split into {world} process(es) × "
                f"train.accumulate {accumulate} equal micro-batches"
            )
        if identity_cap and class_balance:
            raise ValueError("train.identity_cap and train.class_balance both reshape epochs: set one of them")
        labels = np.array(labels, dtype=np.int64)
        counts = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
        self.epoch_size = int(np.minimum(counts, identity_cap).sum()) if identity_cap else len(faces)
        if self.epoch_size < batch_size:
            capped = f" (at most {identity_cap} per identity: train.identity_cap)" if identity_cap else ""
            raise ValueError(
                f"only {self.epoch_size} training faces{capped} for batch_size {batch_size}: "
                "lower train.batch_size"
            )
        self.identity_cap = identity_cap
        # Each face's draw weight; None: a plain shuffle, each face once per epoch.
        self.face_weights = (
            torch.from_numpy(counts[labels].astype(np.float64) ** -class_balance) if class_balance else None
        )
        self.faces = torch.from_numpy(np.ascontiguousarray(faces)).to(device)  # (N, 112, 112, 3)
        self.labels = torch.as_tensor(labels, device=device)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.augmentation = augmentation
        self.micro_size = batch_size // parts
        self.rank, self.accumulate = rank, accumulate

    def __len__(self) -> int:
        # The last incomplete batch is dropped: BatchNorm and the schedule prefer equal batches.
        return self.epoch_size // self.batch_size

    def epoch(self, epoch: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per step, this process's micro-batches: [(images (b, 3, 112, 112), labels (b,)), ...]."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.face_weights is not None:
            order = torch.multinomial(self.face_weights, self.epoch_size, replacement=True, generator=generator)
            draw_keys = torch.arange(self.epoch_size)  # augmentation per draw: a face may come twice
            draws = self.augmentation.draw(self.epoch_size, generator)
        else:
            order = torch.randperm(len(self.faces), generator=generator)
            if self.identity_cap:
                order = order[_first_per_label(self.labels.cpu()[order], self.identity_cap)]
            draw_keys = order  # augmentation per face: each comes at most once
            draws = self.augmentation.draw(len(self.faces), generator)
        order, draw_keys = order.to(self.device), draw_keys.to(self.device)
        draws = {name: values.to(self.device) for name, values in draws.items()}
        for step in range(len(self)):
            micro_batches = []
            for part in range(self.rank * self.accumulate, (self.rank + 1) * self.accumulate):
                start = step * self.batch_size + part * self.micro_size
                index = order[start : start + self.micro_size]
                keys = draw_keys[start : start + self.micro_size]
                images = to_model_input(self.faces[index])
                images = self.augmentation.apply(images, {name: v[keys] for name, v in draws.items()})
                micro_batches.append((images, self.labels[index]))
            yield micro_batches


def _first_per_label(labels: torch.Tensor, cap: int) -> torch.Tensor:
    """Mask of the positions whose label has appeared fewer than `cap` times before them."""
    by_label = torch.sort(labels, stable=True)
    sorted_labels = by_label.values
    run_start = torch.ones_like(sorted_labels, dtype=torch.bool)
    run_start[1:] = sorted_labels[1:] != sorted_labels[:-1]
    positions = torch.arange(len(labels))
    start_of_run = torch.cummax(torch.where(run_start, positions, 0), dim=0).values
    keep = torch.zeros(len(labels), dtype=torch.bool)
    keep[by_label.indices] = positions - start_of_run < cap
    return keep
