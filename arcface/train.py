"""Training: `train_one_epoch`, `fit`, checkpoints and resume, and the train stage's `run`.

The model is a backbone (embeddings) plus a normalized classifier head used only for the loss. After each
epoch a checkpoint holds everything needed to continue exactly (model, head, optimizer, scheduler, loss
scaler, RNG state, epoch, params, class names, history); an interrupted run of the same data and params
resumes from it. Launched by `torchrun --nproc_per_node=N`, training runs DistributedDataParallel (NCCL on
GPUs, gloo on CPUs); only rank 0 writes files and logs progress.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from arcface.config import Params, TrainParams
from arcface.data import store
from arcface.data.augment import Augmentation
from arcface.data.blend import blended_identities
from arcface.data.datasets import DeviceBatches, TrainingSplit, training_split
from arcface.device import autocast, autocast_dtype, resolve_device
from arcface.files import atomic_path, remove, write_json
from arcface.losses import MarginSoftmaxLoss, build_loss
from arcface.models.backbones import build_backbone
from arcface.models.heads import NormalizedLinear

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.csv"
SPLIT_FILE = "split.json"
ANGLES_FILE = "angles.npy"
GROUPS_FILE = "groups.json"
COMPANION_DIR = "companion"  # group-<g>/companion/: the second trunk of train.companion (checkpoint, history)


def companion_dir(position: int) -> str:
    """The folder of train.companion's trunk at `position` (0: `companion`, then `companion-2`, ...)."""
    return COMPANION_DIR if position == 0 else f"{COMPANION_DIR}-{position + 1}"


def companion_folders(model: Path) -> list[Path]:
    """A model folder's companion trunk folders that hold a checkpoint, in training order."""
    found: list[Path] = []
    while (Path(model) / companion_dir(len(found)) / CHECKPOINT_FILE).exists():
        found.append(Path(model) / companion_dir(len(found)))
    return found


CHECKPOINT_FORMAT = 1


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good state."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    loss: float
    accuracy: float  # share of training faces whose nearest class centre is their own
    lr: float  # at the end of the epoch
    images_per_second: float  # all processes together
    seconds: float


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment(device_type: str) -> Distributed:
        """Join the process group torchrun describes in WORLD_SIZE/RANK/LOCAL_RANK, if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return Distributed()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        return Distributed(dist.get_rank(), world, local_rank)

    def sum(self, *values: float) -> list[float]:
        """Sum numbers over all processes."""
        if self.world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        return total.cpu().tolist()


class FaceClassifier(nn.Module):
    """Backbone + normalized head: images -> cosines to every class centre. One module so that
    DistributedDataParallel synchronizes the gradients of both."""

    def __init__(self, backbone: nn.Module, head: NormalizedLinear, amp: torch.dtype | None) -> None:
        super().__init__()
        self.backbone, self.head, self.amp = backbone, head, amp

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(images.device, self.amp):
            embeddings = self.backbone(images)  # (B, D)
        return self.head(embeddings)  # (B, C) in float32: the margins need the precision


@dataclass
class TrainingState:
    """What `fit` updates and a checkpoint restores."""

    backbone: nn.Module
    head: NormalizedLinear
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    history: list[EpochStats]
    average: nn.Module | None = None  # the moving average of the backbone's weights (train.ema_decay)

    @property
    def epoch(self) -> int:
        return len(self.history)

    @property
    def schedule(self) -> LearningRateSchedule:
        """The lr schedule, which knows how many epochs the run will train."""
        return self.scheduler.lr_lambdas[0]

    @property
    def embedder(self) -> nn.Module:
        """The backbone that embeds: the weight average when there is one."""
        return self.average if self.average is not None else self.backbone


def build_state(params: TrainParams, num_classes: int, steps_per_epoch: int, seed: int) -> TrainingState:
    """Fresh backbone and head, the optimizer (no weight decay on BN and biases) and the schedule."""
    torch.manual_seed(seed)
    backbone = build_backbone(params.backbone, params.embedding_size, params.dropout, params.crop)
    if params.init_checkpoint:
        load_backbone_weights(backbone, Path(params.init_checkpoint))
    head = NormalizedLinear(params.embedding_size, num_classes)
    decay, no_decay = [], []
    for module in (backbone, head):
        for parameter in module.parameters():
            # BN weights/biases and biases (1-d) are not regularized: decaying them only hurts.
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": params.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if params.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=params.lr, betas=(params.momentum, 0.999)
        )
    else:
        optimizer = torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LearningRateSchedule(params, steps_per_epoch))
    # Loss scaling keeps small fp16 gradients from flushing to zero; bf16 has float32's range.
    scaler = torch.amp.GradScaler(resolve_device(params.device).type, enabled=params.amp == "fp16")
    average = copy.deepcopy(backbone).requires_grad_(False) if params.ema_decay > 0 else None
    return TrainingState(backbone, head, optimizer, scheduler, scaler, history=[], average=average)


class LearningRateSchedule:
    """Per-step multiplier of the base lr: linear warm-up, then cosine or polynomial decay to 0 at the end
    of epoch `epochs`. `epochs` may shrink during a run (train.time_budget_minutes); it holds only plain
    numbers so that the scheduler's state_dict carries it into checkpoints and back on resume."""

    def __init__(self, params: TrainParams, steps_per_epoch: int) -> None:
        self.epochs = params.epochs
        self.steps_per_epoch = steps_per_epoch
        self.warmup_epochs = params.warmup_epochs
        self.schedule = params.schedule
        self.poly_power = params.poly_power

    def __call__(self, step: int) -> float:
        total = self.epochs * self.steps_per_epoch
        warmup = min(int(self.warmup_epochs * self.steps_per_epoch), total - 1)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(1, total - warmup), 1.0)
        if self.schedule == "poly":
            return (1.0 - progress) ** self.poly_power
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def margin_strength(params: TrainParams, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step fraction of the margin applied: a linear ramp from 0 to 1 over `margin_warmup_epochs`."""
    ramp = params.margin_warmup_epochs * steps_per_epoch

    def strength(step: int) -> float:
        return 1.0 if step >= ramp else step / ramp

    return strength


def update_average(average: nn.Module, backbone: nn.Module, decay: float, step: int) -> None:
    """Move `average`'s weights and BatchNorm statistics towards `backbone`'s after optimizer step `step`
    (0-based). The decay ramps up as (1 + step) / (10 + step) so that the random initial weights don't
    linger in the average for the first ~1 / (1 - decay) steps."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        live = backbone.state_dict()
        for name, value in average.state_dict().items():
            if value.is_floating_point():
                value.lerp_(live[name].to(value.dtype), 1.0 - decay)
            else:
                value.copy_(live[name])  # BatchNorm's step counters


def _accumulate_gradients(
    model: nn.Module,
    loss_fn: MarginSoftmaxLoss,
    scaler: torch.amp.GradScaler,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    epoch: int,
    step: int,
) -> tuple[float, int]:
    """Forward and backward over one step's micro-batches; returns the summed loss and correct count."""
    loss_sum, correct = 0.0, 0
    for index, (images, labels) in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        # Gradients are averaged across processes once per step, on the last micro-batch.
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()
        with sync:
            cosine = model(images)  # (b, C)
            loss = loss_fn(cosine, labels)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at epoch {epoch}, step {step}; "
                    "lower train.lr, raise train.warmup_epochs or set train.clip_grad_norm"
                )
            scaler.scale(loss / len(micro_batches)).backward()
        loss_sum += loss.item() * len(labels)
        correct += int((cosine.argmax(1) == labels).sum())
    return loss_sum, correct


def move_to_sharpest(parameters: list[nn.Parameter], rho: float) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Move every parameter along its gradient so that the whole move has length `rho` (SAM's ascent
    step); returns the moves so that they can be undone. No move when the gradient is not finite (an fp16
    overflow: the loss scaler then skips the step)."""
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return []
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad]))
    if not torch.isfinite(norm) or norm == 0:
        return []
    moves = []
    with torch.no_grad():
        for parameter in with_grad:
            move = parameter.grad * (rho / norm)  # the loss scale cancels out in the ratio
            parameter.add_(move)
            moves.append((parameter, move))
    return moves


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers still normalize with batch statistics but leave their running averages as they are."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum


def train_one_epoch(
    state: TrainingState,
    model: nn.Module,
    loss_fn: MarginSoftmaxLoss,
    batches: DeviceBatches,
    epoch: int,
    params: TrainParams,
    distributed: Distributed,
) -> EpochStats:
    """One pass over `batches`; raises TrainingDivergedError on a non-finite loss."""
    model.train()
    started = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    steps = tqdm(
        batches.epoch(epoch),
        total=len(batches),
        desc=f"epoch {epoch}",
        disable=None if distributed.main else True,
    )
    parameters = [p for group in state.optimizer.param_groups for p in group["params"]]
    strength = margin_strength(params, len(batches))
    for step, micro_batches in enumerate(steps):
        state.optimizer.zero_grad(set_to_none=True)
        loss_fn.strength = strength(state.scheduler.last_epoch)  # the scheduler counts steps, resumes too
        loss_sum, step_correct = _accumulate_gradients(
            model, loss_fn, state.scaler, micro_batches, epoch, step
        )
        total_loss += loss_sum
        correct += step_correct
        seen += sum(len(labels) for _, labels in micro_batches)
        if params.sam_rho > 0:
            # Sharpness-aware minimization: step with the gradient taken at the worst point (to first
            # order) within sam_rho of the weights, which favours flat minima. The second pass leaves the
            # BatchNorm statistics alone: they were already updated on these images.
            moves = move_to_sharpest(parameters, params.sam_rho)
            state.optimizer.zero_grad(set_to_none=True)
            with frozen_batchnorm_statistics(model):
                _accumulate_gradients(model, loss_fn, state.scaler, micro_batches, epoch, step)
            with torch.no_grad():
                for parameter, move in moves:
                    parameter.sub_(move)
        if params.clip_grad_norm > 0:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, params.clip_grad_norm)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        if state.average is not None:
            update_average(state.average, state.backbone, params.ema_decay, state.scheduler.last_epoch - 1)
        steps.set_postfix(loss=f"{total_loss / seen:.3f}")
    seconds = time.perf_counter() - started
    total_loss, correct, seen = distributed.sum(total_loss, correct, seen)
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
    distributed: Distributed | None = None,
) -> TrainingState:
    """Train on (N, 112, 112, 3) uint8 faces with labels in [0, num_classes) for `params.epochs` epochs
    (fewer when `params.time_budget_minutes` can't hold them).

    With `checkpoint`, the state is saved there after every epoch, and if it already holds an earlier
    epoch of this run (and `params.resume`), training continues from it.
    """
    distributed = distributed or Distributed()
    if params.blend_identities:
        blends, blend_labels = blended_identities(
            faces, labels, num_classes, params.blend_identities, params.blend_faces, seed
        )
        faces, labels = np.concatenate([faces, blends]), np.concatenate([labels, blend_labels])
        num_classes += params.blend_identities
    device = resolve_device(params.device)
    if device.type == "cuda" and distributed.world > 1:
        device = torch.device("cuda", distributed.local_rank)
    batches = DeviceBatches(
        faces,
        labels,
        params.batch_size,
        device,
        seed,
        augmentation=Augmentation(
            params.flip,
            params.shift,
            params.zoom,
            params.rotate,
            params.color,
            params.grayscale,
            params.blur,
            params.erase,
            params.sunglasses,
        ),
        world=distributed.world,
        rank=distributed.rank,
        accumulate=params.accumulate,
        identity_cap=params.identity_cap,
        class_balance=params.class_balance,
    )
    state = build_state(params, num_classes, len(batches), seed)
    if checkpoint is not None and params.resume and checkpoint.exists():
        payload = load_checkpoint(checkpoint)
        if _run_settings(payload["train_params"]) == _run_settings(params.model_dump(mode="json")):
            restore(state, payload)
            logger.info("resuming from %s after epoch %d", checkpoint, state.epoch)
        else:
            logger.warning("%s was written with other train params; starting afresh", checkpoint)
    for backbone_copy in (state.backbone, state.average):
        if backbone_copy is not None:
            backbone_copy.to(device, memory_format=torch.channels_last)
    state.head.to(device)
    _move_optimizer_state(state.optimizer, device)
    amp = autocast_dtype(params.amp, device)
    backbone = torch.compile(state.backbone) if params.compile else state.backbone
    model: nn.Module = FaceClassifier(backbone, state.head, amp)
    if distributed.world > 1:
        ids = [distributed.local_rank] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    loss_fn = build_loss(
        params.loss, params.scale, params.margin, params.combined_margins, params.label_smoothing
    )
    if distributed.main:
        logger.info(
            "training %s%s on %d faces of %d classes: %s loss, %d epochs, batch %d, on %s × %d "
            "(autocast: %s)",
            params.backbone,
            "" if params.recipe == "none" else f" (train.recipe {params.recipe})",
            len(faces),
            num_classes,
            params.loss,
            state.schedule.epochs,
            params.batch_size,
            device,
            distributed.world,
            amp or "off",
        )
    if distributed.main and params.class_balance:
        logger.info(
            "epochs of %d faces drawn with replacement, a person with n faces at weight n^-%g "
            "(train.class_balance)",
            batches.epoch_size,
            params.class_balance,
        )
    if distributed.main and device.type == "cpu" and amp is None and params.amp == "auto":
        logger.info(
            "this CPU has no fast bf16 (AMX or AVX512-BF16): training in float32, several times slower "
            "than on CPUs that have it (README, 'Model quality')"
        )
    while state.epoch < state.schedule.epochs:
        epoch = state.epoch + 1
        stats = train_one_epoch(state, model, loss_fn, batches, epoch, params, distributed)
        state.history.append(stats)
        if params.time_budget_minutes > 0:
            _fit_epochs_to_budget(state, params, distributed)
        if distributed.main:
            logger.info(
                "epoch %d/%d: loss %.4f, train accuracy %.3f, lr %.4g, %.1f img/s, about %s left",
                epoch,
                state.schedule.epochs,
                stats.loss,
                stats.accuracy,
                stats.lr,
                stats.images_per_second,
                format_duration(time_left(state.history, state.schedule.epochs)),
            )
            if checkpoint is not None:
                save_checkpoint(checkpoint, state, params, extra or {})
            if on_epoch is not None:
                on_epoch(stats)
    return state


def epochs_within_budget(history: list[EpochStats], planned: int, budget_seconds: float) -> int:
    """The most epochs, at most `planned` and at least those already run, whose total time should stay
    within `budget_seconds` at the latest pace (the mean of the last three epochs)."""
    spent = sum(s.seconds for s in history)
    pace = epoch_pace(history)
    affordable = len(history) + math.floor((budget_seconds - spent) / pace) if pace > 0 else planned
    return max(len(history), min(planned, affordable))


def _fit_epochs_to_budget(state: TrainingState, params: TrainParams, distributed: Distributed) -> None:
    """Shrink the planned epochs when train.time_budget_minutes can't hold them; the cosine (or poly)
    decay then ends with the new last epoch, so the run still ends at lr 0 (unless not even one more epoch
    fits: then it stops where it is). Planned after every epoch: a machine that slows down mid-run shrinks
    the plan further; it never grows."""
    planned = state.schedule.epochs
    fitted = epochs_within_budget(state.history, planned, params.time_budget_minutes * 60)
    if distributed.world > 1:  # every process must stop at the same epoch: rank 0 decides
        fitted = int(distributed.sum(fitted if distributed.main else 0)[0])
    if fitted == planned:
        return
    state.schedule.epochs = fitted
    if distributed.main:
        logger.warning(
            "train.time_budget_minutes=%g: at %.0f s per epoch, %d of train.epochs=%d fit; training %d "
            "epochs, the lr decay ending with them",
            params.time_budget_minutes,
            epoch_pace(state.history),
            fitted,
            params.epochs,
            fitted,
        )


def epoch_pace(history: list[EpochStats]) -> float:
    """Seconds per epoch at the latest pace: the mean of the last three (a resumed run's earlier epochs may
    have run on another machine)."""
    recent = history[-3:]
    return sum(s.seconds for s in recent) / max(1, len(recent))


def time_left(history: list[EpochStats], epochs: int) -> float:
    """Seconds the remaining epochs should take at the latest pace."""
    return (epochs - len(history)) * epoch_pace(history)


def format_duration(seconds: float) -> str:
    """1h 05m, 12m 30s, 45s: what a progress log should say."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _run_settings(train_params: dict[str, Any]) -> dict[str, Any]:
    """The params that decide a run's result (not where it runs, whether it may resume, or the recipe's
    name: its values are there). Keys newer than a checkpoint take their defaults, which keep the old
    behaviour (augmentations off)."""
    settings = {**TrainParams().model_dump(mode="json"), **train_params}
    return {k: v for k, v in settings.items() if k not in ("device", "resume", "compile", "recipe")}


def save_checkpoint(path: Path, state: TrainingState, params: TrainParams, extra: dict[str, Any]) -> None:
    """Everything needed to resume or to embed, written atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "epoch": state.epoch,
        "train_params": params.model_dump(mode="json"),
        "model": state.backbone.state_dict(),
        **({"average": state.average.state_dict()} if state.average is not None else {}),
        "head": state.head.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": torch.get_rng_state(),
        "history": [asdict(s) for s in state.history],
        **extra,
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)


def restore(state: TrainingState, payload: dict[str, Any]) -> None:
    """Put a checkpoint's model, head, optimizer, scheduler, scaler, RNG and history into `state`."""
    state.backbone.load_state_dict(payload["model"])
    if state.average is not None:
        state.average.load_state_dict(payload["average"])
    state.head.load_state_dict(payload["head"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng"].cpu())
    state.history = [EpochStats(**row) for row in payload["history"]]


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for values in optimizer.state.values():
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and key != "step":
                values[key] = value.to(device)


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
    settings = payload["train_params"]
    crop = settings.get("crop")  # absent from checkpoints written before train.crop
    model = build_backbone(settings["backbone"], settings["embedding_size"], settings["dropout"], crop)
    model.load_state_dict(embedding_weights(payload))
    return model.to(device).eval(), payload


def embedding_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's backbone weights that embed: the weight average (train.ema_decay) when it has one."""
    return payload.get("average", payload["model"])


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Initialize `backbone` from a checkpoint of this pipeline or a plain state_dict file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: train.init_checkpoint not found") from err
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(payload, dict):
        weights = embedding_weights(payload) if "model" in payload else payload
    else:
        weights = None
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: expected a state_dict or a checkpoint with a 'model' entry")
    try:
        result = backbone.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # tensors of other shapes: another trunk or embedding size
        detail = str(err).splitlines()[-1].strip()
        raise ValueError(f"{path}: weights don't fit this backbone: {detail}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights don't fit this backbone: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    logger.info("initialized the backbone from %s", path)


def group_dirs(models_dir: Path) -> list[Path]:
    """`models/group-0`, `group-1`, ...: one trained model per cross-training group."""
    folders = sorted(Path(models_dir).glob("group-*"), key=lambda p: int(p.name.split("-")[1]))
    if not folders:
        raise FileNotFoundError(f"{models_dir}: no trained models (group-*/); run the train stage first")
    return folders


def training_angles(
    backbone: nn.Module, head: NormalizedLinear, faces: np.ndarray, labels: np.ndarray, batch_size: int = 128
) -> np.ndarray:
    """(N,) degrees between each training face's embedding and its class centre (the course report's
    figure: a margin loss pulls these angles down)."""
    from arcface.embed import embed_faces

    device = next(backbone.parameters()).device
    embeddings = embed_faces(backbone, faces, batch_size, flip=False, amp=autocast_dtype("auto", device))
    centres = torch.nn.functional.normalize(head.weight.detach().float().cpu(), dim=1).numpy()
    cosine = np.einsum("nd,nd->n", embeddings, centres[labels])
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))).astype(np.float32)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    history: list[EpochStats]
    split: TrainingSplit
    companion_histories: tuple[list[EpochStats], ...] = ()  # the further trunks' (train.companion), in order

    @property
    def companion_checkpoints(self) -> list[Path]:
        folder = self.checkpoint.parent
        return [folder / companion_dir(i) / CHECKPOINT_FILE for i in range(len(self.companion_histories))]


def run(
    params: Params,
    aligned_dir: Path,
    excluded_by_group: list[set[str]],
    out_dir: Path,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
) -> list[TrainResult]:
    """Train one model per group, each on every usable face of every identity not excluded for it;
    write `out_dir/group-<g>/` (checkpoint, history, split, training angles) and `groups.json`. With
    train.companion, more trunks per group on the same faces, in `group-<g>/companion/`, `companion-2/`...

    Per-epoch checkpoints live beside `out_dir` (`.<name>.progress/<run>/`) until every model is done, so
    an interrupted run, even one whose outputs DVC removed, resumes from its last finished epoch.
    """
    aligned_dir, out_dir = Path(aligned_dir), Path(out_dir)
    if not excluded_by_group:
        raise ValueError("no model to train: excluded_by_group needs one set of identities per model")
    manifest = store.read_manifest(aligned_dir)
    minimum = params.train.min_images_per_identity
    splits = [training_split(manifest, excluded, minimum) for excluded in excluded_by_group]
    for group, split in enumerate(splits):
        if split.num_classes < 2:
            raise ValueError(
                f"{aligned_dir}: only {split.num_classes} identities can train model {group} "
                f"({split.excluded_identities} are scored by it, {split.too_small_identities} have fewer "
                f"than train.min_images_per_identity={minimum} images)"
            )
    distributed = Distributed.from_environment(resolve_device(params.train.device).type)
    all_faces = store.open_faces(aligned_dir)
    root = out_dir.parent / f".{out_dir.name}.progress"
    first, companions = params.train.without_companion(), params.train.companion_trunks()
    keys = [_run_key(first, params.seed, aligned_dir, split) for split in splits]
    if distributed.main and root.exists():
        for stale in root.iterdir():
            if stale.name not in keys:
                remove(stale)  # progress of other data or params can never be resumed
    results = []
    for group, (split, key) in enumerate(zip(splits, keys, strict=True)):
        progress = root / key
        faces = np.asarray(all_faces[split.rows])
        if distributed.main and len(splits) > 1:
            logger.info(
                "model %d of %d: %d identities left out", group + 1, len(splits), split.excluded_identities
            )
        state = fit(
            first,
            faces,
            split.labels,
            split.num_classes,
            params.seed + group,
            checkpoint=progress / CHECKPOINT_FILE,
            extra={"classes": split.classes, "group": group},
            on_epoch=(lambda stats, group=group: on_epoch(group, stats)) if on_epoch else None,
            distributed=distributed,
        )
        if distributed.main and not (progress / ANGLES_FILE).exists():
            angles = training_angles(state.embedder, state.head, faces, split.labels)
            with atomic_path(progress / ANGLES_FILE) as temp, open(temp, "wb") as handle:
                np.save(handle, angles)
        histories = [state.history]
        for position, companion in enumerate(companions):
            where = (faces, split, params.seed + group, progress, group, distributed)
            histories.append(_fit_companion(companion, position, histories, *where))
        checkpoint = out_dir / f"group-{group}" / CHECKPOINT_FILE
        results.append(TrainResult(checkpoint, state.history, split, tuple(histories[1:])))
    if distributed.main:
        with atomic_path(out_dir, directory=True) as temp:
            for group, (result, key) in enumerate(zip(results, keys, strict=True)):
                _write_model_folder(temp / f"group-{group}", root / key, result)
            write_json(temp / GROUPS_FILE, {"groups": len(results), "seed": params.seed})
        remove(root)
    if distributed.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results


def _fit_companion(
    companion: TrainParams,
    position: int,
    earlier: list[list[EpochStats]],
    faces: np.ndarray,
    split: TrainingSplit,
    seed: int,
    progress: Path,
    group: int,
    distributed: Distributed,
) -> list[EpochStats]:
    """Train model `group`'s further trunk at `position` of train.companion on the first's faces and
    classes, after the trunks of histories `earlier`, resumable from `progress/<companion_dir>/`; its
    history."""
    params = _companion_budget(companion, earlier)
    if distributed.main:
        budget = params.time_budget_minutes
        logger.info(
            "companion trunk %d of model %d: %s%s%s",
            position + 1,
            group + 1,
            params.backbone,
            f" on the box {list(params.crop)}" if params.crop else "",
            f", {budget:.1f} min of the budget left" if budget else "",
        )
    return fit(
        params,
        faces,
        split.labels,
        split.num_classes,
        seed,
        checkpoint=progress / companion_dir(position) / CHECKPOINT_FILE,
        extra={"classes": split.classes, "group": group, "companion": position + 1},
        distributed=distributed,
    ).history


def _companion_budget(companion: TrainParams, earlier: list[list[EpochStats]]) -> TrainParams:
    """A further trunk's settings with its time budget, which counts it and the trunks before it, less
    their time (`earlier`: their histories)."""
    if companion.time_budget_minutes <= 0:
        return companion
    spent = sum(s.seconds for history in earlier for s in history) / 60
    left = companion.time_budget_minutes - spent
    if left <= 0:
        logger.warning(
            "train.companion's time_budget_minutes=%g counts the trunks before it too, and they took %.1f "
            "min: the companion trains one epoch",
            companion.time_budget_minutes,
            spent,
        )
    # A budget under one epoch still trains one (a budget of 0 would mean none at all).
    return companion.model_copy(update={"time_budget_minutes": max(left, 1e-3)})


def _write_model_folder(folder: Path, progress: Path, result: TrainResult) -> None:
    folder.mkdir()
    os.replace(progress / CHECKPOINT_FILE, folder / CHECKPOINT_FILE)
    os.replace(progress / ANGLES_FILE, folder / ANGLES_FILE)
    pd.DataFrame([asdict(s) for s in result.history]).to_csv(folder / HISTORY_FILE, index=False)
    for position, history in enumerate(result.companion_histories):
        name = companion_dir(position)
        (folder / name).mkdir()
        os.replace(progress / name / CHECKPOINT_FILE, folder / name / CHECKPOINT_FILE)
        pd.DataFrame([asdict(s) for s in history]).to_csv(folder / name / HISTORY_FILE, index=False)
    split = result.split
    write_json(
        folder / SPLIT_FILE,
        {
            "faces": len(split.rows),
            "classes": split.num_classes,
            "identities": split.classes,
            "excluded_identities": split.excluded_identities,
            "too_small_identities": split.too_small_identities,
            # people neither trained on nor scored: the Joint Bayesian model's estimate of how people
            # differ uses them too (embed.bayes)
            "too_small": split.too_small,
        },
    )


def _run_key(params: TrainParams, seed: int, aligned_dir: Path, split: TrainingSplit) -> str:
    """Names one training run: its params, seed, classes and the aligned store's contents."""
    digest = hashlib.sha256()
    digest.update(params.model_dump_json(exclude={"device", "resume"}).encode())
    digest.update(f"{seed}".encode())
    digest.update("\n".join(split.classes).encode())
    digest.update(split.rows.tobytes())
    for name in (store.MANIFEST_FILE, store.FACES_FILE):
        stat = (aligned_dir / name).stat()
        digest.update(f"{name}:{stat.st_size}".encode())
    digest.update((aligned_dir / store.MANIFEST_FILE).read_bytes())
    return digest.hexdigest()[:16]
