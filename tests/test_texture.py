"""The texture view: LBP codes on known patterns, PCA + LDA on real faces, and the fusion's arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from arcface import texture
from arcface.data import store


def test_lbp_codes_of_known_patterns() -> None:
    flat = np.full((1, 5, 5), 7.0, dtype=np.float32)
    spot = flat.copy()
    spot[0, 2, 2] = 9.0  # brighter than every neighbour: code 0
    assert (texture.lbp_bins(flat, 1) == texture.UNIFORM[255]).all()
    assert texture.lbp_bins(spot, 1)[0, 1, 1] == texture.UNIFORM[0]
    # a vertical edge, dark to bright: the centre column and the bright one are set (bits 1-5, in
    # circular order from the top-left), one run of ones, so a uniform pattern
    edge = np.array([[[0.0, 0.5, 1.0]] * 3], dtype=np.float32)
    assert texture.lbp_bins(edge, 1)[0, 0, 0] == texture.UNIFORM[0b00111110] != texture.BINS - 1
    assert texture.UNIFORM[0b01010101] == texture.BINS - 1  # eight transitions: the catch-all bin
    assert len(set(texture.UNIFORM.tolist())) == texture.BINS


def test_descriptors_are_per_cell_distributions_and_mirror_symmetric(aligned_tiny: Path) -> None:
    faces = np.asarray(store.open_faces(aligned_tiny)[:6])
    found = texture.descriptors(faces)
    assert found.shape == (6, texture.descriptor_size()) and found.dtype == np.float32
    grey = faces.astype(np.float32) @ texture.GREY
    histograms = texture.cell_histograms(texture.lbp_bins(grey, 1)).reshape(6, -1, texture.BINS)
    assert histograms.shape[1] == texture.GRID**2 and np.allclose(histograms.sum(axis=2), 1, atol=1e-5)
    # the descriptor averages the square-rooted histograms h, g of a face and its mirror image: per cell
    # the squares sum to (1 + Σ√(hg)) / 2, between 1/2 (disjoint histograms) and 1 (identical)
    cells = (found**2).reshape(6, -1, texture.BINS).sum(axis=2)
    assert ((cells >= 0.5 - 1e-5) & (cells <= 1 + 1e-5)).all() and cells.mean() > 0.6
    assert np.allclose(texture.descriptors(faces[:, :, ::-1]), found, atol=1e-6)
    assert not np.allclose(found[0], found[1])


def test_lda_on_real_faces_brings_a_person_together(aligned_tiny: Path) -> None:
    manifest = store.read_manifest(aligned_tiny)
    faces = np.asarray(store.open_faces(aligned_tiny))
    labels = manifest["identity"].to_numpy()
    model = texture.fit(texture.descriptors(faces), labels, pca_dims=800, lda_dims=400)
    people = len(np.unique(labels))
    assert model.projection.shape == (texture.descriptor_size(), people - 1)  # capped by the people
    vectors = model.project(texture.descriptors(faces))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    cosines = vectors @ vectors.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    assert cosines[same & off_diagonal].mean() > cosines[~same].mean() + 0.3


def test_fused_cosine_weighs_each_view_by_its_spread(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    network, textures = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(5, 3)))
    model = texture.TextureModel(np.zeros(4, np.float32), np.eye(4, 3, dtype=np.float32), (0.2,), 0.05)
    fused = model.fuse([network], textures)
    expected = (network @ network.T / 0.2 + textures @ textures.T / 0.05) / (1 / 0.2 + 1 / 0.05)
    assert fused.shape == (5, 11) and np.allclose(fused @ fused.T, expected, atol=1e-6)
    model.save(tmp_path / "texture.npz")
    loaded = texture.TextureModel.load(tmp_path / "texture.npz")
    assert (loaded.network_spreads, loaded.texture_spread) == ((0.2,), 0.05)
    assert np.array_equal(loaded.projection, model.projection)


def test_two_network_views_are_weighed_each_by_its_own_spread(tmp_path: Path) -> None:
    """A model with a companion trunk: each trunk's view counts by its own impostor spread."""
    rng = np.random.default_rng(1)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    first, second, textures = (unit(rng.normal(size=(5, d))) for d in (8, 6, 3))
    model = texture.TextureModel(np.zeros(4, np.float32), np.eye(4, 3, dtype=np.float32), (0.2, 0.1), 0.05)
    fused = model.fuse([first, second], textures)
    weighted = first @ first.T / 0.2 + second @ second.T / 0.1 + textures @ textures.T / 0.05
    assert fused.shape == (5, 17) and np.allclose(fused @ fused.T, weighted / (5 + 10 + 20), atol=1e-6)
    with pytest.raises(ValueError, match=r"weighs 2 network view\(s\), got 1"):
        model.fuse([first], textures)
    model.save(tmp_path / "texture.npz")
    assert texture.TextureModel.load(tmp_path / "texture.npz").network_spreads == (0.2, 0.1)


def test_one_person_cannot_fit_a_texture_model() -> None:
    descriptors = np.random.default_rng(0).random((4, 20)).astype(np.float32)
    with pytest.raises(texture.TextureError, match=r"at least 2 training people .*got 1 people"):
        texture.fit(descriptors, np.array(["Ann"] * 4), 10, 5)
