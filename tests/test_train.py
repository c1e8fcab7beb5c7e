"""Training: honest splits, deterministic batches, learning on real faces, checkpoints, NaN stops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from arcface.config import TrainParams
from arcface.data import store
from arcface.data.datasets import DeviceBatches, training_split
from arcface.embed import embed_faces
from arcface.losses import MarginSoftmaxLoss
from arcface.train import TrainingDivergedError, fit, load_backbone, load_checkpoint

SMALL = dict(batch_size=16, warmup_epochs=0.0, device="cpu", embedding_size=64)


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
    assert split.too_small_identities == 1  # c has one image


def test_batches_depend_only_on_seed_and_epoch() -> None:
    faces = np.random.default_rng(0).integers(0, 255, (40, 112, 112, 3), dtype=np.uint8)
    labels = np.arange(40) % 4
    first = DeviceBatches(faces, labels, 8, torch.device("cpu"), seed=3)
    second = DeviceBatches(faces, labels, 8, torch.device("cpu"), seed=3)
    a = [(x.clone(), y.clone()) for x, y in first.epoch(2)]
    b = list(second.epoch(2))
    assert len(a) == len(first) == 5
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    c = [y for _, y in first.epoch(3)]
    assert not all(torch.equal(y1, y3) for (_, y1), y3 in zip(a, c, strict=True))
    x, _ = a[0]
    assert x.shape == (8, 3, 112, 112) and x.is_contiguous(memory_format=torch.channels_last)
    assert x.min() >= -1.0 and x.max() < 1.0


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
    trained = embed_faces(state.model, faces[:4], flip=False)
    reloaded = embed_faces(model, faces[:4], flip=False)
    assert np.allclose(trained, reloaded, atol=1e-5)
    assert np.allclose(np.linalg.norm(reloaded, axis=1), 1.0, atol=1e-5)


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
