"""Training: honest splits, deterministic batches, learning on real faces, checkpoints, NaN stops."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from arcface.config import TrainParams
from arcface.data import store
from arcface.data.augment import Augmentation
from arcface.data.datasets import DeviceBatches, training_split
from arcface.embed import embed_faces
from arcface.losses import MarginSoftmaxLoss
from arcface.train import (
    EpochStats,
    TrainingDivergedError,
    epochs_within_budget,
    fit,
    format_duration,
    frozen_batchnorm_statistics,
    load_backbone,
    load_checkpoint,
    move_to_sharpest,
    time_left,
    update_average,
)

# resnet18-fast: the loop, not the trunk, is under test here, and on a CPU without fast bf16 it trains
# several times faster than the full-resolution trunks (tests/test_models.py covers every trunk).
SMALL = dict(backbone="resnet18-fast", batch_size=16, warmup_epochs=0.0, device="cpu", embedding_size=64)


def test_split_leaves_out_scored_and_small_identities() -> None:
    manifest = pd.DataFrame(
        {
            "identity": ["a", "a", "a", "b", "b", "c", "d", "d", "d"],
            "status": ["ok", "ok", "error", "ok", "fallback", "ok", "ok", "ok", "ok"],
        }
    )
    split = training_split(manifest, excluded={"d"}, min_images_per_identity=2)
    assert split.classes == ["a", "b"]
    assert split.rows.tolist() == [0, 1, 3, 4]  # the unreadable a-row and all of d are out
    assert split.labels.tolist() == [0, 0, 1, 1]
    assert split.excluded_identities == 1
    assert split.too_small == ["c"] and split.too_small_identities == 1  # c has one image


def test_batches_depend_only_on_seed_and_epoch() -> None:
    faces = np.random.default_rng(0).integers(0, 255, (40, 112, 112, 3), dtype=np.uint8)
    labels = np.arange(40) % 4
    first = DeviceBatches(faces, labels, 8, torch.device("cpu"), seed=3)
    second = DeviceBatches(faces, labels, 8, torch.device("cpu"), seed=3)
    a = [step[0] for step in first.epoch(2)]
    b = [step[0] for step in second.epoch(2)]
    assert len(a) == len(first) == 5
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    c = [step[0][1] for step in first.epoch(3)]
    assert not all(torch.equal(y1, y3) for (_, y1), y3 in zip(a, c, strict=True))
    x, _ = a[0]
    assert x.shape == (8, 3, 112, 112) and x.is_contiguous(memory_format=torch.channels_last)
    assert x.min() >= -1.0 and x.max() < 1.0


def test_identity_cap_takes_a_fresh_subset_of_big_identities_each_epoch() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2])
    faces = np.zeros((len(labels), 112, 112, 3), np.uint8)
    faces[:, 0, 0, 0] = np.arange(len(labels))  # each face marks its own row
    unflipped = Augmentation(flip=False)
    batches = DeviceBatches(faces, labels, 5, torch.device("cpu"), 0, unflipped, identity_cap=2)
    assert batches.epoch_size == 5 and len(batches) == 1  # 2 + 2 + 1

    def rows_of(epoch: int) -> list[int]:
        ((images, epoch_labels),) = next(iter(batches.epoch(epoch)))
        assert sorted(np.bincount(epoch_labels.numpy(), minlength=3).tolist()) == [1, 2, 2]
        return sorted(torch.round(images[:, 0, 0, 0] * 128 + 127.5).int().tolist())

    seen = set().union(*(rows_of(epoch) for epoch in range(1, 9)))
    assert len([row for row in seen if row < 10]) > 4  # the big identity's faces take turns
    assert {10, 11, 12, 13} <= seen
    with pytest.raises(ValueError, match=r"only 5 training faces \(at most 2 per identity"):
        DeviceBatches(faces, labels, 8, torch.device("cpu"), 0, identity_cap=2)


def test_class_balance_draws_people_as_often_as_their_weight_says() -> None:
    labels = np.array([0] * 48 + [1] * 12 + [2] * 3)
    faces = np.zeros((len(labels), 112, 112, 3), np.uint8)
    unflipped = Augmentation(flip=False)

    def shares(balance: float) -> np.ndarray:
        batches = DeviceBatches(faces, labels, 9, torch.device("cpu"), 0, unflipped, class_balance=balance)
        drawn = [y for epoch in range(1, 41) for ((_, y),) in batches.epoch(epoch)]
        return np.bincount(torch.cat(drawn).numpy(), minlength=3) / sum(len(y) for y in drawn)

    assert np.allclose(shares(1.0), 1 / 3, atol=0.04)  # people equally often, not 48 : 12 : 3
    assert np.allclose(shares(0.5), np.sqrt([48, 12, 3]) / np.sqrt([48, 12, 3]).sum(), atol=0.04)  # 4 : 2 : 1
    balanced = DeviceBatches(faces, labels, 9, torch.device("cpu"), 0, unflipped, class_balance=1.0)
    assert balanced.epoch_size == len(labels) and len(balanced) == 7  # an epoch keeps its number of faces
    first = [y for ((_, y),) in balanced.epoch(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, [y for ((_, y),) in balanced.epoch(5)], strict=True))


def test_a_face_drawn_twice_in_an_epoch_gets_its_own_augmentation_each_time() -> None:
    labels = np.array([0] + [1] * 31)  # person 0's one face is half of every balanced epoch
    faces = np.full((len(labels), 112, 112, 3), 128, np.uint8)
    brighter = Augmentation(flip=False, color=0.3)
    batches = DeviceBatches(faces, labels, 32, torch.device("cpu"), 0, brighter, class_balance=1.0)
    ((images, drawn),) = next(iter(batches.epoch(1)))
    copies = images[drawn == 0]
    assert len(copies) > 8  # ~16 draws of one face
    assert len(torch.unique(copies.mean(dim=(1, 2, 3)))) == len(copies)  # each with its own colour


def test_identity_cap_and_class_balance_together_are_a_clear_error() -> None:
    faces = np.zeros((8, 112, 112, 3), np.uint8)
    with pytest.raises(ValueError, match=r"identity_cap and train\.class_balance both reshape epochs"):
        DeviceBatches(faces, np.zeros(8, int), 4, torch.device("cpu"), 0, identity_cap=2, class_balance=0.5)


def test_too_few_faces_for_a_batch_is_a_clear_error() -> None:
    faces = np.zeros((3, 112, 112, 3), np.uint8)
    with pytest.raises(ValueError, match="only 3 training faces for batch_size 8"):
        DeviceBatches(faces, np.zeros(3, int), 8, torch.device("cpu"), 0)


@pytest.fixture(scope="module")
def tiny_training_set(aligned_tiny: Path) -> tuple[np.ndarray, np.ndarray, int]:
    manifest = store.read_manifest(aligned_tiny)
    split = training_split(manifest, excluded=set(), min_images_per_identity=2)
    faces = np.asarray(store.open_faces(aligned_tiny)[split.rows])
    return faces, split.labels, split.num_classes


def test_fit_learns_real_faces_and_checkpoint_reloads(
    tiny_training_set: tuple[np.ndarray, np.ndarray, int], tmp_path: Path
) -> None:
    faces, labels, classes = tiny_training_set
    params = TrainParams(epochs=4, lr=0.05, loss="softmax", scale=16.0, **SMALL)
    checkpoint = tmp_path / "checkpoint.pt"
    state = fit(params, faces, labels, classes, seed=0, checkpoint=checkpoint, extra={"classes": []})
    losses = [s.loss for s in state.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    payload = load_checkpoint(checkpoint)
    assert payload["epoch"] == 4 and len(payload["history"]) == 4
    assert set(payload) >= {"model", "head", "optimizer", "scheduler", "train_params"}
    model, _ = load_backbone(checkpoint)
    trained = embed_faces(state.backbone, faces[:4], flip=False)
    reloaded = embed_faces(model, faces[:4], flip=False)
    assert np.allclose(trained, reloaded, atol=1e-5)
    assert np.allclose(np.linalg.norm(reloaded, axis=1), 1.0, atol=1e-5)


def test_blended_identities_train_as_extra_classes_after_the_real_ones(
    tiny_training_set: tuple[np.ndarray, np.ndarray, int],
) -> None:
    faces, labels, classes = tiny_training_set
    params = TrainParams(epochs=2, lr=0.05, blend_identities=5, blend_faces=3, **SMALL)
    state = fit(params, faces, labels, classes, seed=0)
    assert state.head.weight.shape[0] == classes + 5
    # the epoch holds the real faces and the blends: 2 or 3 faces per blended person here
    steps = state.schedule.steps_per_epoch
    assert (len(faces) + 10) // 16 <= steps <= (len(faces) + 15) // 16
    plain = fit(params.model_copy(update={"blend_identities": 0}), faces, labels, classes, seed=0)
    assert plain.head.weight.shape[0] == classes


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    tiny_training_set: tuple[np.ndarray, np.ndarray, int], tmp_path: Path, monkeypatch
) -> None:
    faces, labels, classes = tiny_training_set
    steps_per_epoch = len(faces) // SMALL["batch_size"]
    original = MarginSoftmaxLoss.forward
    calls = {"n": 0}

    def failing_in_epoch_two(self, cosine, targets):
        calls["n"] += 1
        loss = original(self, cosine, targets)
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    monkeypatch.setattr(MarginSoftmaxLoss, "forward", failing_in_epoch_two)
    checkpoint = tmp_path / "checkpoint.pt"
    params = TrainParams(epochs=3, **SMALL)
    with pytest.raises(TrainingDivergedError, match="loss became nan at epoch 2"):
        fit(params, faces, labels, classes, seed=0, checkpoint=checkpoint)
    assert load_checkpoint(checkpoint)["epoch"] == 1


def test_damaged_checkpoint_is_refused_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        load_checkpoint(tmp_path / "absent.pt")


def separable_faces(classes: int = 4, per_class: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 112×112 'faces': each class a different colour and stripe pattern, plus noise."""
    rng = np.random.default_rng(seed)
    faces, labels = [], []
    for label in range(classes):
        base = np.zeros((112, 112, 3), np.float64)
        base[..., label % 3] = 180
        base[28 * (label % 4) : 28 * (label % 4) + 28] += 60  # a bright band, coarse enough for any stem
        for _ in range(per_class):
            faces.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(faces), np.array(labels)


@pytest.mark.parametrize("sam_rho", [0.0, 0.01])
def test_separable_synthetic_data_reaches_high_train_accuracy(sam_rho: float) -> None:
    faces, labels = separable_faces()
    params = TrainParams(epochs=6, lr=0.05, loss="arcface", scale=16.0, margin=0.2, sam_rho=sam_rho, **SMALL)
    state = fit(params, faces, labels, 4, seed=0)
    assert state.history[-1].accuracy >= 0.9
    assert state.history[-1].loss < state.history[0].loss


def interrupt_at(epoch: int, monkeypatch) -> None:
    from arcface import train

    real = train.train_one_epoch

    def interrupted(state, model, loss_fn, batches, number, *args):
        if number == epoch:
            raise KeyboardInterrupt
        return real(state, model, loss_fn, batches, number, *args)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)


def test_resume_after_an_interrupt_gives_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    faces, labels = separable_faces()
    params = TrainParams(epochs=3, dropout=0.2, ema_decay=0.9, **SMALL)
    straight = fit(params, faces, labels, 4, seed=1, checkpoint=tmp_path / "a.pt")

    interrupt_at(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fit(params, faces, labels, 4, seed=1, checkpoint=tmp_path / "b.pt")
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 2
    monkeypatch.undo()
    resumed = fit(params, faces, labels, 4, seed=1, checkpoint=tmp_path / "b.pt")

    assert [s.loss for s in resumed.history] == [s.loss for s in straight.history]
    for name, value in straight.backbone.state_dict().items():
        assert torch.equal(value, resumed.backbone.state_dict()[name]), name
    for name, value in straight.embedder.state_dict().items():
        assert torch.equal(value, resumed.embedder.state_dict()[name]), name  # the weight average too
    assert torch.equal(straight.head.weight, resumed.head.weight)


def test_weight_average_follows_the_live_weights_with_a_warming_decay() -> None:
    live = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    average = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    for module in (live, average):
        torch.nn.init.constant_(module[0].weight, 1.0 if module is live else 0.0)
    live[1].num_batches_tracked.fill_(7)
    update_average(average, live, decay=0.9, step=0)  # decay min(0.9, 1/10): mostly the live weights
    assert torch.allclose(average[0].weight, torch.full((2, 2), 0.9))
    assert int(average[1].num_batches_tracked) == 7
    update_average(average, live, decay=0.9, step=10_000)  # full decay: a tenth of the way
    assert torch.allclose(average[0].weight, torch.full((2, 2), 0.91))


def test_checkpoint_with_a_weight_average_embeds_with_it(tmp_path: Path) -> None:
    faces, labels = separable_faces()
    params = TrainParams(epochs=2, lr=0.05, ema_decay=0.5, **SMALL)
    state = fit(params, faces, labels, 4, seed=0, checkpoint=tmp_path / "ema.pt")
    payload = load_checkpoint(tmp_path / "ema.pt")
    differing = [k for k, v in payload["model"].items() if not torch.equal(v, payload["average"][k])]
    assert differing  # the average is not the last step's weights
    model, _ = load_backbone(tmp_path / "ema.pt")
    assert all(torch.equal(v, payload["average"][k]) for k, v in model.state_dict().items())
    embedded = embed_faces(model, faces[:4], flip=False)
    assert np.allclose(embedded, embed_faces(state.embedder, faces[:4], flip=False), atol=1e-5)
    assert not np.allclose(embedded, embed_faces(state.backbone, faces[:4], flip=False), atol=1e-3)


def test_resume_can_be_turned_off(tmp_path: Path) -> None:
    faces, labels = separable_faces()
    params = TrainParams(epochs=1, **SMALL)
    fit(params, faces, labels, 4, seed=1, checkpoint=tmp_path / "c.pt")
    again = fit(
        params.model_copy(update={"resume": False}), faces, labels, 4, seed=1, checkpoint=tmp_path / "c.pt"
    )
    assert len(again.history) == 1  # trained afresh rather than "already done"


DDP_SCRIPT = """
import sys
import numpy as np
from pathlib import Path
from arcface.config import TrainParams
from arcface.train import Distributed, fit

data = np.load(sys.argv[1])
params = TrainParams.model_validate_json(Path(sys.argv[2]).read_text())
distributed = Distributed.from_environment("cpu")
fit(params, data["faces"], data["labels"], 4, seed=3, checkpoint=Path(sys.argv[3]), distributed=distributed)
"""


def test_two_process_ddp_matches_one_process_with_the_same_batch(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes, each taking half of every batch, ends with the same weights as
    one process that accumulates the same two halves (BatchNorm sees the same micro-batches)."""
    import subprocess
    import sys

    faces, labels = separable_faces(per_class=8)
    np.savez(tmp_path / "data.npz", faces=faces, labels=labels)
    params = TrainParams(epochs=2, amp="off", **{**SMALL, "batch_size": 8})
    (tmp_path / "params.json").write_text(params.model_dump_json())
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(tmp_path / "ddp.py"), str(tmp_path / "data.npz"), str(tmp_path / "params.json"),
               str(tmp_path / "ddp.pt")]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    # torchrun runs each process with one thread; oneDNN's results depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = fit(params.model_copy(update={"accumulate": 2}), faces, labels, 4, seed=3)
    finally:
        torch.set_num_threads(threads)
    distributed = load_checkpoint(tmp_path / "ddp.pt")
    assert distributed["epoch"] == 2
    for name, parameter in single.backbone.named_parameters():
        assert torch.allclose(parameter, distributed["model"][name], atol=1e-5), name
    assert torch.allclose(single.head.weight, distributed["head"]["weight"], atol=1e-5)
    losses = [row["loss"] for row in distributed["history"]]
    assert losses == pytest.approx([s.loss for s in single.history], rel=1e-4)


def test_batch_that_does_not_split_is_refused() -> None:
    faces, labels = separable_faces()
    params = TrainParams(epochs=1, accumulate=3, **SMALL)
    with pytest.raises(ValueError, match="batch_size 16 does not split into 1 process"):
        fit(params, faces, labels, 4, seed=0)


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_schedule_warms_up_then_decays_to_zero(schedule: str) -> None:
    from arcface.train import LearningRateSchedule

    factor = LearningRateSchedule(
        TrainParams(epochs=4, warmup_epochs=1, schedule=schedule), steps_per_epoch=10
    )
    values = [factor(step) for step in range(40)]
    assert values[0] < values[5] < values[9] <= 1.0  # linear warm-up over the first epoch
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    assert factor(40) == pytest.approx(0.0, abs=1e-9)
    factor.epochs = 3  # a time budget cut the run short: the decay ends with the new last epoch
    assert factor(20) == pytest.approx(0.5 if schedule == "cosine" else 0.25)
    assert factor(30) == pytest.approx(0.0, abs=1e-9)


def test_margin_ramps_in_linearly_over_its_warm_up_and_stays_full() -> None:
    from arcface.train import margin_strength

    strength = margin_strength(TrainParams(epochs=4, margin_warmup_epochs=1.5), steps_per_epoch=10)
    assert [strength(step) for step in (0, 3, 15, 39)] == pytest.approx([0.0, 0.2, 1.0, 1.0])
    assert margin_strength(TrainParams(epochs=4), steps_per_epoch=10)(0) == 1.0  # off: full from the start


def test_margin_warm_up_is_applied_step_by_step_during_training(monkeypatch) -> None:
    """32 faces in batches of 16: 2 steps per epoch; a 2-epoch ramp gives 0, 1/4, 1/2, 3/4, then full."""
    from arcface import train

    class RecordingLoss(MarginSoftmaxLoss):
        def __init__(self, scale: float, m2: float) -> None:
            super().__init__(scale, m2=m2)
            self.strengths: list[float] = []

        def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            self.strengths.append(self.strength)
            return super().forward(cosine, labels)

    recorder = RecordingLoss(16.0, m2=0.3)
    monkeypatch.setattr(train, "build_loss", lambda *args: recorder)
    faces, labels = separable_faces()
    fit(
        TrainParams(**SMALL, epochs=3, margin_warmup_epochs=2.0),
        faces,
        labels,
        4,
        0,
    )
    assert recorder.strengths == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_adamw_trains_and_clipping_limits_the_update() -> None:
    faces, labels = separable_faces()
    base = TrainParams(epochs=2, optimizer="adamw", lr=1e-3, **SMALL)
    free = fit(base, faces, labels, 4, seed=0)
    clipped = fit(
        base.model_copy(update={"clip_grad_norm": 1e-8, "optimizer": "sgd"}), faces, labels, 4, seed=0
    )
    start = fit(
        base.model_copy(update={"epochs": 1, "lr": 1e-12, "optimizer": "sgd"}), faces, labels, 4, seed=0
    )
    assert free.history[-1].loss < free.history[0].loss
    # With gradients clipped to a norm of 1e-8, SGD barely moves from the initial weights.
    moved = (clipped.head.weight - start.head.weight).abs().max()
    assert moved < 1e-6


def test_sharpness_move_follows_the_gradient_with_length_rho_and_skips_overflow() -> None:
    weights = [
        torch.nn.Parameter(torch.zeros(2)),
        torch.nn.Parameter(torch.ones(1)),
        torch.nn.Parameter(torch.ones(3)),
    ]
    weights[0].grad = torch.tensor([3.0, 0.0])
    weights[1].grad = torch.tensor([4.0])  # the third has no gradient: it stays put
    moves = move_to_sharpest(weights, rho=0.5)
    assert torch.allclose(weights[0], torch.tensor([0.3, 0.0])) and torch.allclose(
        weights[1], torch.tensor([1.4])
    )
    assert torch.equal(weights[2], torch.ones(3)) and len(moves) == 2
    weights[1].grad = torch.tensor([float("inf")])
    assert move_to_sharpest(weights, rho=0.5) == []
    assert torch.allclose(weights[0], torch.tensor([0.3, 0.0]))  # an overflowed gradient moves nothing


def test_frozen_batchnorm_statistics_keep_the_running_averages() -> None:
    layer = torch.nn.BatchNorm1d(3).train()
    batch = torch.randn(8, 3) + 5
    with frozen_batchnorm_statistics(layer):
        normalized = layer(batch)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and layer.momentum == 0.1
    assert normalized.mean(0).abs().max() < 1e-5  # still normalized with the batch's own statistics
    layer(batch)
    assert layer.running_mean.min() > 0.4  # outside the block the averages move again


def test_sam_steps_differ_from_plain_steps() -> None:
    faces, labels = separable_faces()
    params = TrainParams(epochs=1, lr=0.05, **SMALL)
    plain = fit(params, faces, labels, 4, seed=0)
    sharp = fit(params.model_copy(update={"sam_rho": 0.05}), faces, labels, 4, seed=0)
    assert not torch.allclose(sharp.head.weight, plain.head.weight)


def test_init_checkpoint_loads_backbone_weights(tmp_path: Path) -> None:
    faces, labels = separable_faces()
    params = TrainParams(epochs=1, **SMALL)
    fit(params, faces, labels, 4, seed=0, checkpoint=tmp_path / "first.pt")
    from arcface.train import build_state

    warm = build_state(
        params.model_copy(update={"init_checkpoint": str(tmp_path / "first.pt")}), 4, 2, seed=9
    )
    first = load_checkpoint(tmp_path / "first.pt")["model"]
    assert all(torch.equal(v, first[k]) for k, v in warm.backbone.state_dict().items())
    wrong = params.model_copy(update={"backbone": "resnet34", "init_checkpoint": str(tmp_path / "first.pt")})
    with pytest.raises(ValueError, match="weights don't fit this backbone"):
        build_state(wrong, 4, 2, seed=0)


def test_train_stage_resumes_an_interrupted_run(aligned_tiny: Path, tmp_path: Path, monkeypatch) -> None:
    from arcface import train
    from arcface.config import load_params

    params = load_params(
        Path(__file__).parent.parent / "params.yaml",
        {
            "train.backbone": "resnet18-fast",
            "train.epochs": 2,
            "train.batch_size": 16,
            "train.embedding_size": 64,
        },
    )
    out = tmp_path / "models"
    interrupt_at(2, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.run(params, aligned_tiny, [set()], out)
    assert not out.exists()  # nothing that looks finished
    progress = list((tmp_path / ".models.progress").glob("*/checkpoint.pt"))
    assert len(progress) == 1 and load_checkpoint(progress[0])["epoch"] == 1
    monkeypatch.undo()

    epochs_run = []
    (result,) = train.run(
        params, aligned_tiny, [set()], out, on_epoch=lambda group, stats: epochs_run.append(stats.epoch)
    )
    assert epochs_run == [2]  # epoch 1 came from the interrupted run
    assert [s.epoch for s in result.history] == [1, 2]
    assert load_checkpoint(out / "group-0" / "checkpoint.pt")["epoch"] == 2
    angles = np.load(out / "group-0" / "angles.npy")
    assert len(angles) == len(result.split.rows) and 0 < angles.mean() < 120
    assert not (tmp_path / ".models.progress").exists()


def test_shift_moves_each_image_by_its_own_whole_pixels() -> None:
    from arcface.data.augment import shift_images

    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    moved = shift_images(images, torch.tensor([[1, 0], [0, -2]]))  # right by 1; up by 2
    assert torch.equal(moved[0, :, :, 1:], images[0, :, :, :4]) and (moved[0, :, :, 0] == 0).all()
    assert torch.equal(moved[1, :, :3], images[1, :, 2:]) and (moved[1, :, 3:] == 0).all()


def test_checkpoints_from_before_new_train_keys_still_resume() -> None:
    from arcface.train import _run_settings

    current = TrainParams(epochs=3).model_dump(mode="json")
    newer_keys = (
        "zoom",
        "rotate",
        "identity_cap",
        "recipe",
        "blur",
        "erase",
        "time_budget_minutes",
        "class_balance",
        "sunglasses",
        "blend_identities",
        "blend_faces",
    )
    older = {k: v for k, v in current.items() if k not in newer_keys}
    assert _run_settings(older) == _run_settings(current)  # absent keys had their default's behaviour
    assert _run_settings({**current, "recipe": "cpu"}) == _run_settings(current)
    assert _run_settings({**current, "zoom": 0.1}) != _run_settings(current)
    assert _run_settings({**current, "erase": 0.5}) != _run_settings(current)
    assert _run_settings({**current, "class_balance": 0.5}) != _run_settings(current)
    assert _run_settings({**current, "sunglasses": 0.2}) != _run_settings(current)
    assert _run_settings({**current, "blend_identities": 100}) != _run_settings(current)


def test_time_budget_keeps_the_epochs_that_fit_at_the_latest_pace() -> None:
    history = [EpochStats(e, 1.0, 0.5, 0.1, 100.0, seconds) for e, seconds in enumerate([130, 100, 100], 1)]
    assert epochs_within_budget(history, planned=24, budget_seconds=1800) == 3 + 13  # 1470 s left at 110 s
    assert epochs_within_budget(history, planned=10, budget_seconds=3600) == 10  # the plan fits: kept
    assert epochs_within_budget(history, planned=24, budget_seconds=400) == 3  # no room for one more
    assert epochs_within_budget(history, planned=24, budget_seconds=60) == 3  # over already: stop here


def test_time_budget_cuts_a_real_run_short_and_the_cut_survives_resume(tmp_path: Path, caplog) -> None:
    """A budget far below one epoch: the first epoch runs, then training stops; resuming the finished run
    trains nothing more (the shrunk plan is in the checkpoint's scheduler state)."""
    faces, labels = separable_faces()
    params = TrainParams(epochs=4, time_budget_minutes=1e-6, **SMALL)
    with caplog.at_level("WARNING", logger="arcface.train"):
        state = fit(params, faces, labels, 4, seed=0, checkpoint=tmp_path / "budget.pt")
    assert len(state.history) == 1 and state.schedule.epochs == 1
    assert "1 of train.epochs=4 fit; training 1 epochs" in caplog.text
    assert load_checkpoint(tmp_path / "budget.pt")["epoch"] == 1
    resumed = fit(params, faces, labels, 4, seed=0, checkpoint=tmp_path / "budget.pt")
    assert [s.loss for s in resumed.history] == [s.loss for s in state.history]
    roomy = fit(
        params.model_copy(update={"epochs": 2, "time_budget_minutes": 600.0}), faces, labels, 4, seed=0
    )
    assert len(roomy.history) == 2


def test_time_left_follows_the_latest_epochs_pace() -> None:
    history = [EpochStats(e, 1.0, 0.5, 0.1, 100.0, seconds) for e, seconds in enumerate([900, 60, 60, 90], 1)]
    assert time_left(history, epochs=10) == 6 * 70  # the first, slow epoch no longer counts
    assert time_left(history, epochs=4) == 0
    assert [format_duration(s) for s in (45, 750, 3900, 59.6)] == ["45s", "12m 30s", "1h 05m", "1m 00s"]


def test_train_stage_trains_companion_trunks_on_the_same_faces(aligned_tiny: Path, tmp_path: Path) -> None:
    from arcface import train
    from arcface.config import load_params

    params = load_params(
        Path(__file__).parent.parent / "params.yaml",
        {
            "train.recipe": "none",
            "train.backbone": "resnet18-fast",
            "train.epochs": 1,
            "train.batch_size": 16,
            "train.embedding_size": 64,
            "train.companion": [
                {"backbone": "resnet18-fast-half", "embedding_size": 32, "epochs": 2},
                {"crop": [8, 88, 16, 96]},  # the first trunk's settings on the eyes-and-nose box
            ],
        },
    )
    out = tmp_path / "models"
    (result,) = train.run(params, aligned_tiny, [set()], out)
    first = load_checkpoint(out / "group-0" / "checkpoint.pt")
    second = load_checkpoint(out / "group-0" / "companion" / "checkpoint.pt")
    third = load_checkpoint(out / "group-0" / "companion-2" / "checkpoint.pt")
    assert result.companion_checkpoints == [
        out / "group-0" / "companion" / "checkpoint.pt",
        out / "group-0" / "companion-2" / "checkpoint.pt",
    ]
    assert (first["train_params"]["backbone"], first["train_params"]["companion"]) == ("resnet18-fast", {})
    assert (second["train_params"]["backbone"], second["train_params"]["embedding_size"]) == (
        "resnet18-fast-half",
        32,
    )
    assert (third["train_params"]["backbone"], third["train_params"]["crop"]) == (
        "resnet18-fast",
        [8, 88, 16, 96],
    )
    assert (first["epoch"], second["epoch"], third["epoch"]) == (1, 2, 1)
    assert second["classes"] == third["classes"] == first["classes"] == result.split.classes  # one split
    history = pd.read_csv(out / "group-0" / "companion" / "history.csv")
    assert history["epoch"].tolist() == [1, 2] == [s.epoch for s in result.companion_histories[0]]
    assert len(pd.read_csv(out / "group-0" / "companion-2" / "history.csv")) == 1
    assert sorted(p.name for p in (out / "group-0").iterdir()) == [
        "angles.npy",
        "checkpoint.pt",
        "companion",
        "companion-2",
        "history.csv",
        "split.json",
    ]
    assert not (tmp_path / ".models.progress").exists()


def test_companion_time_budget_counts_the_trunks_before_it(caplog) -> None:
    from arcface.train import _companion_budget

    first = [[EpochStats(e, 1.0, 0.5, 0.1, 100.0, 300.0) for e in (1, 2)]]  # 10 minutes
    companion = TrainParams(time_budget_minutes=25, **SMALL)
    assert _companion_budget(companion, first).time_budget_minutes == pytest.approx(15)
    second = [EpochStats(1, 1.0, 0.5, 0.1, 100.0, 240.0)]  # a companion's 4 minutes: a third trunk's 11 left
    assert _companion_budget(companion, [*first, second]).time_budget_minutes == pytest.approx(11)
    assert _companion_budget(companion.model_copy(update={"time_budget_minutes": 0.0}), first) == (
        companion.model_copy(update={"time_budget_minutes": 0.0})  # no budget: none for the companion
    )
    with caplog.at_level("WARNING", logger="arcface.train"):
        spent = _companion_budget(companion.model_copy(update={"time_budget_minutes": 8.0}), first)
    assert 0 < spent.time_budget_minutes < 0.01  # one epoch, not an unlimited run
    assert "the trunks before it too, and they took 10.0 min: the companion trains one epoch" in caplog.text
