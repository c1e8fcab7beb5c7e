"""Training: `train_one_epoch`, `fit`, checkpoints, and the train stage's `run`.

The model is a backbone (embeddings) plus a normalized classifier head used only for the loss. Each epoch
writes a checkpoint holding everything needed to continue (model, head, optimizer, scheduler, epoch,
params, class names, history).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from arcface.config import Params, TrainParams
from arcface.data import store
from arcface.data.datasets import DeviceBatches, TrainingSplit, training_split
from arcface.device import autocast, autocast_dtype, resolve_device
from arcface.files import atomic_path, write_json
from arcface.losses import MarginSoftmaxLoss, build_loss
from arcface.models.backbones import build_backbone
from arcface.models.heads import NormalizedLinear

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.csv"
SPLIT_FILE = "split.json"
CHECKPOINT_FORMAT = 1


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good state."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    loss: float
    accuracy: float  # share of training faces whose nearest class centre is their own
    lr: float  # at the end of the epoch
    images_per_second: float
    seconds: float


@dataclass
class TrainingState:
    """What `fit` updates and a checkpoint restores."""

    model: nn.Module
    head: NormalizedLinear
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    history: list[EpochStats]


def build_state(params: TrainParams, num_classes: int, steps_per_epoch: int, seed: int) -> TrainingState:
    """Fresh model, head, SGD (no weight decay on BN and biases) and warm-up + cosine schedule."""
    torch.manual_seed(seed)
    model = build_backbone(params.backbone, params.embedding_size, params.dropout)
    head = NormalizedLinear(params.embedding_size, num_classes)
    decay, no_decay = [], []
    for module in (model, head):
        for parameter in module.parameters():
            # BN weights/biases and biases (1-d) are not regularized: decaying them only hurts.
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": params.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=params.lr,
        momentum=params.momentum,
    )
    total = params.epochs * steps_per_epoch
    warmup = min(int(params.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return TrainingState(model, head, optimizer, scheduler, history=[])


def train_one_epoch(
    state: TrainingState,
    loss_fn: MarginSoftmaxLoss,
    batches: DeviceBatches,
    epoch: int,
    amp: torch.dtype | None,
) -> EpochStats:
    """One pass over `batches`; raises TrainingDivergedError on a non-finite loss."""
    state.model.train()
    started = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    progress = tqdm(batches.epoch(epoch), total=len(batches), desc=f"epoch {epoch}", disable=None)
    for images, labels in progress:
        with autocast(batches.device, amp):
            embeddings = state.model(images)  # (B, D)
        cosine = state.head(embeddings)  # (B, C), float32
        loss = loss_fn(cosine, labels)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {loss.item()} at epoch {epoch}, step {seen // batches.batch_size}; "
                "lower train.lr or raise train.warmup_epochs"
            )
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += int((cosine.argmax(1) == labels).sum())
        seen += len(labels)
        progress.set_postfix(loss=f"{total_loss / seen:.3f}")
    seconds = time.perf_counter() - started
    return EpochStats(
        epoch=epoch,
        loss=total_loss / seen,
        accuracy=correct / seen,
        lr=state.optimizer.param_groups[0]["lr"],
        images_per_second=seen / seconds,
        seconds=seconds,
    )


def fit(
    params: TrainParams,
    faces: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    seed: int,
    checkpoint: Path | None = None,
    extra: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainingState:
    """Train for `params.epochs` epochs on (N, 112, 112, 3) uint8 faces with labels in [0, num_classes)."""
    device = resolve_device(params.device)
    amp = autocast_dtype(params.amp, device)
    batches = DeviceBatches(faces, labels, params.batch_size, device, seed)
    state = build_state(params, num_classes, len(batches), seed)
    state.model.to(device, memory_format=torch.channels_last)
    state.head.to(device)
    loss_fn = build_loss(params.loss, params.scale, params.margin)
    logger.info(
        "training %s on %d faces of %d classes, %s loss, %d epochs on %s (autocast: %s)",
        params.backbone,
        len(faces),
        num_classes,
        params.loss,
        params.epochs,
        device,
        amp or "off",
    )
    for epoch in range(1, params.epochs + 1):
        stats = train_one_epoch(state, loss_fn, batches, epoch, amp)
        state.history.append(stats)
        logger.info(
            "epoch %d/%d: loss %.4f, train accuracy %.3f, lr %.4g, %.1f img/s",
            epoch,
            params.epochs,
            stats.loss,
            stats.accuracy,
            stats.lr,
            stats.images_per_second,
        )
        if checkpoint is not None:
            save_checkpoint(checkpoint, state, params, epoch, extra or {})
        if on_epoch is not None:
            on_epoch(stats)
    return state


def save_checkpoint(
    path: Path, state: TrainingState, params: TrainParams, epoch: int, extra: dict[str, Any]
) -> None:
    """Everything needed to resume or to embed, written atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "train_params": params.model_dump(mode="json"),
        "model": state.model.state_dict(),
        "head": state.head.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "history": [asdict(s) for s in state.history],
        **extra,
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`: tensors and plain containers, never arbitrary code."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found (run the train stage first)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of this pipeline (format {CHECKPOINT_FORMAT})")
    return payload


def load_backbone(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained backbone in eval mode, and the checkpoint it came from."""
    payload = load_checkpoint(path, device)
    train_params = TrainParams.model_validate(payload["train_params"])
    model = build_backbone(train_params.backbone, train_params.embedding_size, train_params.dropout)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), payload


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    history: list[EpochStats]
    split: TrainingSplit


def run(
    params: Params,
    aligned_dir: Path,
    excluded_identities: set[str],
    out_dir: Path,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train on every usable face of every identity not in `excluded_identities`; write `out_dir`."""
    manifest = store.read_manifest(aligned_dir)
    split = training_split(manifest, excluded_identities, params.train.min_images_per_identity)
    if split.num_classes < 2:
        raise ValueError(
            f"{aligned_dir}: only {split.num_classes} identities can train "
            f"({split.excluded_identities} are scored by the evaluation, {split.too_small_identities} "
            f"have fewer than train.min_images_per_identity={params.train.min_images_per_identity} images)"
        )
    faces = np.asarray(store.open_faces(aligned_dir)[split.rows])
    with atomic_path(out_dir, directory=True) as temp:
        extra = {"classes": split.classes}
        state = fit(
            params.train,
            faces,
            split.labels,
            split.num_classes,
            params.seed,
            checkpoint=temp / CHECKPOINT_FILE,
            extra=extra,
            on_epoch=on_epoch,
        )
        pd.DataFrame([asdict(s) for s in state.history]).to_csv(temp / HISTORY_FILE, index=False)
        write_json(
            temp / SPLIT_FILE,
            {
                "faces": len(split.rows),
                "classes": split.num_classes,
                "identities": split.classes,
                "excluded_identities": split.excluded_identities,
                "too_small_identities": split.too_small_identities,
            },
        )
    return TrainResult(Path(out_dir) / CHECKPOINT_FILE, state.history, split)
