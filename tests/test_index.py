"""The FAISS index: exact cosine search by identity, and refusals that name the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arcface import bayes
from arcface.config import IndexParams
from arcface.files import write_json
from arcface.index import FaceIndex, IndexMismatchError, build_index, identity_gallery, ivf_sizes, load_index


def gallery(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 32))
    vectors = np.repeat(centres, 4, axis=0) + rng.normal(0, 0.3, (24, 32))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = np.repeat([f"person_{i}" for i in range(6)], 4)
    labels = pd.DataFrame(
        {
            "row": np.arange(24),
            "identity": names,
            "path": [f"{n}/{i}.jpg" for i, n in enumerate(names)],
        }
    )
    return vectors.astype(np.float32), labels


def test_search_returns_distinct_identities_best_first() -> None:
    vectors, labels = gallery()
    index = FaceIndex(build_index(vectors), labels, {})
    results = index.search(vectors[[0, 5]], k=3)
    assert results[0][0].identity == "person_0"
    assert results[1][0].identity == "person_1"
    for matches in results:
        assert len({m.identity for m in matches}) == len(matches) == 3
        scores = [m.score for m in matches]
        assert scores == sorted(scores, reverse=True)
    assert results[0][0].score == pytest.approx(1.0, abs=1e-5)  # the query itself is in the gallery
    assert results[0][0].path == "person_0/0.jpg"


def test_query_of_wrong_dimension_is_refused_with_both_sizes() -> None:
    vectors, labels = gallery()
    index = FaceIndex(build_index(vectors), labels, {})
    with pytest.raises(IndexMismatchError, match="dimension 16, the index 32"):
        index.search(np.zeros((1, 16), np.float32), k=1)


def test_missing_or_damaged_index_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"faces\.faiss: not found"):
        load_index(tmp_path)
    for name, text in (("faces.faiss", "garbage"), ("index.json", "{}")):
        (tmp_path / name).write_text(text)
    pd.DataFrame({"row": [0], "identity": ["a"], "path": ["a/1.jpg"]}).to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(ValueError, match="not a readable FAISS index"):
        load_index(tmp_path)


def clustered(count: int, identities: int, dimension: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dimension))
    vectors = centres[rng.integers(0, identities, count)] + rng.normal(0, 0.5, (count, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    "settings",
    [
        {"type": "ivf", "nprobe": 32},
        {"type": "ivf", "nlist": 16, "nprobe": 16, "pq_m": 32},
        {"type": "hnsw", "hnsw_m": 16, "ef_search": 128},
    ],
)
def test_approximate_indexes_agree_with_exact_search_and_survive_a_round_trip(
    settings: dict, tmp_path: Path
) -> None:
    import faiss

    vectors = clustered(4000, 200)
    queries = clustered(200, 200, seed=1)
    _, exact = build_index(vectors).search(queries, 1)
    index = build_index(vectors, IndexParams(**settings))
    _, approximate = index.search(queries, 10)
    if settings.get("pq_m"):  # compressed vectors: the true nearest is among the first ten
        assert (approximate == exact).any(axis=1).mean() >= 0.95
    else:
        assert (approximate[:, 0] == exact[:, 0]).mean() >= 0.95
    if settings["type"] == "ivf":
        assert (index.nlist, index.nprobe) == ivf_sizes(IndexParams(**settings), 4000)
    # Saved, loaded: the same answers, searched with the same settings.
    faiss.write_index(index, str(tmp_path / "faces.faiss"))
    labels = pd.DataFrame({"row": range(4000), "identity": [f"p{i}" for i in range(4000)], "path": ""})
    labels.to_parquet(tmp_path / "labels.parquet")
    write_json(tmp_path / "index.json", {"dimension": 64, "type": settings["type"], "search": {}})
    loaded = load_index(tmp_path, device="cpu")
    assert np.array_equal(loaded.index.search(queries, 10)[1], approximate)


def test_ivf_sizes_follow_the_gallery() -> None:
    assert ivf_sizes(IndexParams(type="ivf"), 1_000_000) == (4000, 500)
    assert ivf_sizes(IndexParams(type="ivf"), 100) == (2, 1)  # at least 39 training points per list
    assert ivf_sizes(IndexParams(type="ivf", nlist=64, nprobe=100), 10_000) == (64, 64)


def test_pq_size_must_divide_the_dimension() -> None:
    with pytest.raises(ValueError, match="pq_m=7 must divide the embedding size 64"):
        build_index(clustered(500, 10), IndexParams(type="ivf", pq_m=7))


def test_identity_gallery_is_the_renormalized_mean() -> None:
    vectors, labels = gallery()
    means, table = identity_gallery(vectors, labels)
    assert table["identity"].tolist() == [f"person_{i}" for i in range(6)]
    assert table["faces"].tolist() == [4] * 6 and table["path"].iloc[1] == "person_1/4.jpg"
    expected = vectors[4:8].mean(axis=0)
    assert np.allclose(means[1], expected / np.linalg.norm(expected), atol=1e-6)


def test_truncated_or_inconsistent_index_is_refused(tmp_path: Path) -> None:
    import faiss

    vectors, labels = gallery()
    faiss.write_index(build_index(vectors), str(tmp_path / "faces.faiss"))
    labels.to_parquet(tmp_path / "labels.parquet")
    write_json(tmp_path / "index.json", {"dimension": 16})
    with pytest.raises(IndexMismatchError, match=r"index\.json says dimension 16, faces\.faiss has 32"):
        load_index(tmp_path)
    data = (tmp_path / "faces.faiss").read_bytes()
    (tmp_path / "faces.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"faces\.faiss: not a readable FAISS index"):
        load_index(tmp_path)
    labels.iloc[:5].to_parquet(tmp_path / "labels.parquet")
    (tmp_path / "faces.faiss").write_bytes(data)
    with pytest.raises(ValueError, match=r"holds 24 vectors but labels\.parquet 5 rows"):
        load_index(tmp_path)


@pytest.mark.parametrize(
    "settings", [{"type": "flat"}, {"type": "ivf", "nprobe": 32}, {"type": "hnsw", "ef_search": 128}]
)
def test_joint_bayesian_vectors_are_searched_by_their_score(settings: dict) -> None:
    """With Bayes vectors the index ranks gallery faces by the pair's Joint Bayesian score (the query's
    bias set aside and added back): exact for `flat`, nearly always the same best face for IVF and HNSW."""
    rng = np.random.default_rng(5)
    people = rng.integers(0, 200, 4200)
    centres = rng.normal(size=(200, 64))
    faces = centres[people] + rng.normal(0, 0.8, (4200, 64)) * rng.uniform(0.2, 2.0, 64)  # uneven noise
    vectors = bayes.fit(faces[:4000], people[:4000], dims=48, shrink=0.1).vectors(faces)
    gallery_vectors, queries = vectors[:4000], vectors[4000:]
    labels = pd.DataFrame({"row": range(4000), "identity": [f"face{i}" for i in range(4000)], "path": ""})
    searched = FaceIndex(
        build_index(gallery_vectors, IndexParams(**settings)), labels, {"embedding": "bayes"}
    )
    found = searched.search(queries, 1)
    scores = bayes.scores_against(queries, gallery_vectors)
    best = scores.argmax(axis=1)
    top = np.array([int(matches[0].identity.removeprefix("face")) for matches in found])
    agree = top == best
    assert agree.mean() >= (1.0 if settings["type"] == "flat" else 0.9)
    got = np.array([matches[0].score for matches in found])
    assert np.allclose(got[agree], scores[agree, best[agree]], rtol=1e-4, atol=1e-3)
    # the query's own bias matters to the score, not to the ranking: a cosine index would rank otherwise
    plain = FaceIndex(searched.index, labels, {"embedding": "flip"}).search(queries, 1)
    assert np.mean([m[0].identity != f[0].identity for m, f in zip(plain, found, strict=True)]) > 0.1
