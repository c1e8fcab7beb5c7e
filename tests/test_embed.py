"""Embeddings: both variants, unit length, one folder per model; broken models are named, not used."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from arcface import bayes, texture
from arcface.config import EmbedParams, EvaluateParams, TrainParams
from arcface.data import store
from arcface.data.datasets import training_split
from arcface.embed import load_embeddings, run
from arcface.evaluate import EvaluationError
from arcface.evaluate import run as evaluate
from arcface.files import read_json, sha256_file, write_json
from arcface.models.backbones import CroppedInput
from arcface.train import CHECKPOINT_FILE, fit, load_backbone, load_checkpoint

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
    assert (result.count, result.dimension, result.groups, result.companions) == (80, 64, 1, 0)
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


def test_texture_and_bayes_make_variants_that_evaluate_scores(
    aligned_tiny: Path, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = store.read_manifest(aligned_tiny)
    trained = tmp_path / "models"
    shutil.copytree(models, trained)
    people = sorted(training_split(manifest, set(), 2).classes)
    write_json(trained / "group-0" / "split.json", {"identities": people})
    params = EmbedParams(device="cpu", texture=True, bayes=True, bayes_dims=16)
    result = run(params, aligned_tiny, trained, tmp_path / "emb")
    bayes_vectors, rows, info = load_embeddings(tmp_path / "emb")
    fused, _, _ = load_embeddings(tmp_path / "emb", variant="fused")
    network, _, _ = load_embeddings(tmp_path / "emb", variant="flip")
    textures, _, _ = load_embeddings(tmp_path / "emb", variant="texture")
    assert info["primary"] == "bayes" and info["bayes_input"] == "fused"
    assert info["variants"] == ["flip", "plain", "texture", "fused", "bayes"]
    assert textures.shape == (80, len(people) - 1)  # LDA: one direction fewer than the people
    assert fused.shape[1] == 64 + len(people) - 1
    model = texture.TextureModel.load(tmp_path / "emb" / "group-0" / "texture.npz")
    assert np.allclose(fused, model.fuse([network], textures), atol=1e-6)
    assert (
        0 < model.texture_spread < 1 and 0 < model.network_spreads[0] < 1 and len(model.network_spreads) == 1
    )
    # the Joint Bayesian model maps the fused vectors, in 16 PCA dimensions + a bias
    bayes_model = bayes.BayesModel.load(tmp_path / "emb" / "group-0" / "bayes.npz")
    assert result.dimension == 17 and bayes_vectors.shape == (80, 17)
    assert np.allclose(bayes_vectors, bayes_model.vectors(fused), atol=1e-5)
    # a store too large to describe at once is projected chunk by chunk, to the same vectors
    monkeypatch.setattr(texture, "MEMORY_FACES", 10)
    run(EmbedParams(device="cpu", texture=True), aligned_tiny, trained, tmp_path / "chunked")
    assert np.allclose(load_embeddings(tmp_path / "chunked", variant="fused")[0], fused, atol=1e-5)
    protocols = tmp_path / "protocols"
    protocols.mkdir()
    lines = SAMPLE_PAIRS.read_text().splitlines()
    (protocols / "pairs.txt").write_text("2\t10\n" + "\n".join(lines[1:41]) + "\n")
    report = evaluate(EvaluateParams(), protocols, aligned_tiny, tmp_path / "emb", tmp_path / "reports")
    metrics = read_json(tmp_path / "reports" / "metrics.json")
    assert metrics["embedding"] == "bayes" and metrics["accuracy_mean"] == report.accuracy_mean
    assert {"with_flip", "with_plain", "with_texture", "with_fused"} <= set(metrics)
    assert metrics["with_texture"]["accuracy_mean"] != metrics["with_flip"]["accuracy_mean"]
    # evaluate scores the bayes (primary) variant by the log-likelihood ratio, not by a cosine
    scores = pd.read_csv(tmp_path / "reports" / "scores.csv")
    position = {path: i for i, path in enumerate(manifest["path"].to_numpy()[rows])}
    first = bayes_vectors[scores["path1"].map(position).to_numpy()]
    second = bayes_vectors[scores["path2"].map(position).to_numpy()]
    expected = bayes.pair_scores(first, second)
    assert np.allclose(scores["score_bayes"], expected, atol=1e-4)
    assert not np.allclose(scores["score_bayes"], np.einsum("nd,nd->n", first, second), atol=1e-2)


def test_the_bayes_model_also_learns_from_the_spare_people(
    aligned_tiny: Path, models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """People too small to train on (split.json's `too_small`) add to the Joint Bayesian fit, not to the
    texture model's; a split.json written before they were recorded fits on the trained people alone."""
    manifest = store.read_manifest(aligned_tiny)
    trained = tmp_path / "models"
    shutil.copytree(models, trained)
    people = sorted(training_split(manifest, set(), 2).classes)
    spare = people[-3:]  # as if these three had too few faces to train on
    params = EmbedParams(device="cpu", texture=True, bayes=True, bayes_dims=16)
    write_json(trained / "group-0" / "split.json", {"identities": people[:-3]})
    run(params, aligned_tiny, trained, tmp_path / "without")
    write_json(trained / "group-0" / "split.json", {"identities": people[:-3], "too_small": spare})
    with caplog.at_level("INFO", logger="arcface.embed"):
        run(params, aligned_tiny, trained, tmp_path / "with")
    counts = manifest["identity"].value_counts()
    faces = int(counts[people].sum())
    assert f"Joint Bayesian model fit on {faces} faces of {len(people)} people" in caplog.text
    without = texture.TextureModel.load(tmp_path / "without" / "group-0" / "texture.npz")
    with_spare = texture.TextureModel.load(tmp_path / "with" / "group-0" / "texture.npz")
    assert np.array_equal(without.projection, with_spare.projection)  # texture: trained people only
    assert not np.allclose(
        load_embeddings(tmp_path / "without")[0], load_embeddings(tmp_path / "with")[0], atol=1e-3
    )


def test_companion_trunks_are_ensembled_and_fused_view_by_view(
    aligned_tiny: Path, models: Path, tmp_path: Path
) -> None:
    """group-0/companion/ and companion-2/ (train.companion) hold further trunks: their vectors join the
    first's (the `ensemble`, whose cosine is the mean of the three), and the texture view fuses with each by
    its spread."""
    manifest = store.read_manifest(aligned_tiny)
    trained = tmp_path / "models"
    shutil.copytree(models, trained)
    split = training_split(manifest, set(), 2)
    write_json(trained / "group-0" / "split.json", {"identities": split.classes})
    faces = np.asarray(store.open_faces(aligned_tiny)[split.rows])
    second = TrainParams(
        backbone="resnet18-fast-half",
        epochs=1,
        batch_size=16,
        embedding_size=32,
        device="cpu",
        crop=(8, 88, 16, 96),  # the cpu recipe's eyes-and-nose box
    )
    companion = trained / "group-0" / "companion" / CHECKPOINT_FILE
    fit(second, faces, split.labels, split.num_classes, 1, checkpoint=companion)
    mouth = second.model_copy(update={"crop": (48, 112, 8, 104), "embedding_size": 16})
    third = trained / "group-0" / "companion-2" / CHECKPOINT_FILE
    fit(mouth, faces, split.labels, split.num_classes, 2, checkpoint=third)
    run(EmbedParams(device="cpu", texture=False, bayes=False), aligned_tiny, trained, tmp_path / "plain")
    ensemble, _, info = load_embeddings(tmp_path / "plain")
    first = load_embeddings(tmp_path / "plain", variant="flip")[0]
    other = load_embeddings(tmp_path / "plain", variant="companion")[0]
    last = load_embeddings(tmp_path / "plain", variant="companion-2")[0]
    variants = ["flip", "plain", "companion", "companion-2", "ensemble"]
    assert info["primary"] == "ensemble" and info["variants"] == variants
    assert info["companion_sha256s"] == [sha256_file(companion), sha256_file(third)]
    assert info["checkpoint_sha256"] not in info["companion_sha256s"]
    assert info["companion_backbones"] == ["resnet18-fast-half", "resnet18-fast-half"]
    assert ensemble.shape == (80, 64 + 32 + 16)
    assert np.allclose(np.linalg.norm(ensemble, axis=1), 1, atol=1e-5)
    mean_cosine = (first @ first.T + other @ other.T + last @ last.T) / 3
    assert np.allclose(ensemble @ ensemble.T, mean_cosine, atol=1e-5)
    assert (first.shape, other.shape, last.shape) == ((80, 64), (80, 32), (80, 16))  # three trunks
    trunk, _ = load_backbone(companion)  # the box travels with the checkpoint
    assert isinstance(trunk, CroppedInput) and trunk.box == (8, 88, 16, 96)

    params = EmbedParams(device="cpu", texture=True, bayes=True, bayes_dims=16)
    result = run(params, aligned_tiny, trained, tmp_path / "emb")
    fused, _, _ = load_embeddings(tmp_path / "emb", variant="fused")
    textures, _, info = load_embeddings(tmp_path / "emb", variant="texture")
    model = texture.TextureModel.load(tmp_path / "emb" / "group-0" / "texture.npz")
    assert (info["primary"], info["bayes_input"], result.dimension) == ("bayes", "fused", 17)
    assert (result.groups, result.companions) == (1, 1)
    assert len(model.network_spreads) == 3 and len(set(model.network_spreads)) == 3
    assert fused.shape == (80, 64 + 32 + 16 + len(split.classes) - 1)
    assert np.allclose(fused, model.fuse([first, other, last], textures), atol=1e-5)
    protocols = tmp_path / "protocols"
    protocols.mkdir()
    lines = SAMPLE_PAIRS.read_text().splitlines()
    (protocols / "pairs.txt").write_text("2\t10\n" + "\n".join(lines[1:41]) + "\n")
    evaluate(EvaluateParams(), protocols, aligned_tiny, tmp_path / "emb", tmp_path / "reports")
    metrics = read_json(tmp_path / "reports" / "metrics.json")
    assert {"with_companion", "with_companion-2", "with_ensemble", "with_fused"} <= set(metrics)
    assert metrics["with_companion"]["auc"] != metrics["with_flip"]["auc"]


def test_texture_or_bayes_without_the_training_split_is_refused(
    aligned_tiny: Path, models: Path, tmp_path: Path
) -> None:
    for params in (EmbedParams(device="cpu", texture=True), EmbedParams(device="cpu", bayes=True)):
        with pytest.raises(FileNotFoundError, match=r"group-0/split.json: not found; embed.texture and"):
            run(params, aligned_tiny, models, tmp_path / "emb")
        assert not (tmp_path / "emb").exists()
