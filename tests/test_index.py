"""The FAISS index: exact cosine search by identity, and refusals that name the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arcface.index import FaceIndex, IndexMismatchError, build_index, load_index


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
