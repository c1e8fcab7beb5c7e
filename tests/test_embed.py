"""Embeddings: both variants, unit length, one folder per model; broken models are named, not used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from arcface.config import EmbedParams, EvaluateParams, TrainParams
from arcface.data import store
from arcface.data.datasets import training_split
from arcface.embed import load_embeddings, run
from arcface.evaluate import EvaluationError
from arcface.evaluate import run as evaluate
from arcface.train import CHECKPOINT_FILE, fit, load_checkpoint

SAMPLE_PAIRS = Path(__file__).parent / "data" / "sample" / "pairs.txt"


@pytest.fixture(scope="module")
def models(aligned_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with one briefly trained group-0 model."""
    folder = tmp_path_factory.mktemp("models")
    manifest = store.read_manifest(aligned_tiny)
    split = training_split(manifest, set(), 2)
    faces = np.asarray(store.open_faces(aligned_tiny)[split.rows])
    params = TrainParams(backbone="resnet18-fast", epochs=1, batch_size=16, embedding_size=64, device="cpu")
    (folder / "group-0").mkdir()
    fit(params, faces, split.labels, split.num_classes, 0, checkpoint=folder / "group-0" / CHECKPOINT_FILE)
    return folder


def test_both_variants_are_unit_vectors(aligned_tiny: Path, models: Path, tmp_path: Path) -> None:
    result = run(EmbedParams(device="cpu"), aligned_tiny, models, tmp_path / "emb")
    assert (result.count, result.dimension, result.groups) == (80, 64, 1)
    flip, rows, info = load_embeddings(tmp_path / "emb")
    plain, _, _ = load_embeddings(tmp_path / "emb", variant="plain")
    assert info["primary"] == "flip" and rows.tolist() == list(range(80))
    for vectors in (flip, plain):
        assert vectors.shape == (80, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert not np.allclose(flip, plain)  # the mirror image adds something
    assert (np.einsum("nd,nd->n", flip, plain) > 0.5).all()  # but it is the same face


def test_a_model_that_outputs_nan_is_refused(aligned_tiny: Path, models: Path, tmp_path: Path) -> None:
    payload = load_checkpoint(models / "group-0" / CHECKPOINT_FILE)
    payload["model"]["head.fc.weight"] = torch.full_like(payload["model"]["head.fc.weight"], float("nan"))
    broken = tmp_path / "broken"
    (broken / "group-0").mkdir(parents=True)
    torch.save(payload, broken / "group-0" / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=r"80 embedding\(s\) are NaN or infinite"):
        run(EmbedParams(device="cpu"), aligned_tiny, broken, tmp_path / "emb")
    assert not (tmp_path / "emb").exists()


def test_nan_embeddings_stop_the_evaluation(aligned_tiny: Path, models: Path, tmp_path: Path) -> None:
    run(EmbedParams(device="cpu"), aligned_tiny, models, tmp_path / "emb")
    protocols = tmp_path / "protocols"
    protocols.mkdir()
    lines = SAMPLE_PAIRS.read_text().splitlines()
    (protocols / "pairs.txt").write_text("2\t10\n" + "\n".join(lines[1:41]) + "\n")
    name, number = lines[1].split("\t")[:2]  # the first pair's first image
    manifest = store.read_manifest(aligned_tiny)
    row = manifest.index[manifest["path"] == f"{name}/{name}_{int(number):04d}.jpg"][0]
    flip = np.load(tmp_path / "emb" / "group-0" / "flip.npy")
    flip[row] = np.nan
    np.save(tmp_path / "emb" / "group-0" / "flip.npy", flip)
    with pytest.raises(EvaluationError, match="not finite with the flip embeddings"):
        evaluate(EvaluateParams(), protocols, aligned_tiny, tmp_path / "emb", tmp_path / "reports")
    assert not (tmp_path / "reports" / "metrics.json").exists()
