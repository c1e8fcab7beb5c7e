"""Identification metrics: a hand-worked case, and a brute-force reference on random clustered faces."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from arcface import bayes
from arcface.identification import combine, format_summary, identify, split_gallery


def unit(rows: list[list[float]]) -> np.ndarray:
    vectors = np.asarray(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_gallery_is_the_first_face_of_identities_with_two_or_more() -> None:
    names = np.array(["a", "b", "a", "c", "b", "b"])
    gallery, mated, nonmated = split_gallery(names)
    assert gallery.tolist() == [0, 1] and mated.tolist() == [2, 4, 5] and nonmated.tolist() == [3]


def test_hand_worked_ranks_and_open_set_detection() -> None:
    # Gallery a=(1,0,0), b=(0,1,0), c=(0,0,1). Mated probes: a's and c's second faces are nearest their
    # own identity (rank 1); b's second face is nearer c than b (rank 2). Singletons x, y: impostors.
    gallery = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    probes = [[0.9, 0.1, 0], [0, 0.5, 0.6], [0.1, 0, 1], [0.3, 0.3, 0.2], [0, 0, -1]]
    vectors = unit([*gallery, *probes])
    names = np.array(["a", "b", "c", "a", "b", "c", "x", "y"])
    result = identify(vectors, names, far_targets=(0.0, 0.5))
    assert (result.gallery, result.mated_probes, result.nonmated_probes) == (3, 3, 2)
    assert result.hits_at_rank == {1: 2, 5: 3}
    # x's best gallery cosine is 0.3/|x| ≈ 0.640, y's is 0. FAR 0: the threshold is x's 0.640, which
    # a's (0.994) and c's (0.995) probes pass; FAR 0.5 allows one false alarm: threshold 0 (y's).
    assert result.thresholds[0.0] == pytest.approx(0.3 / np.sqrt(0.22), abs=1e-6)
    assert result.thresholds[0.5] == pytest.approx(0.0, abs=1e-6)
    assert result.detected_at_far == {0.0: 2, 0.5: 2}
    summary = result.summary()
    assert summary["rank1"] == pytest.approx(2 / 3) and summary["rank5"] == 1.0
    assert summary["dir_at_far_0"] == pytest.approx(2 / 3)
    assert "rank-1 66.67%, rank-5 100.00%" in format_summary(summary)


def cosine(first: np.ndarray, second: np.ndarray) -> float:
    return float(first.astype(np.float64) @ second.astype(np.float64))


def joint_bayesian(first: np.ndarray, second: np.ndarray) -> float:
    """The Bayes vectors' score written out: inner parts, plus both biases."""
    return cosine(first[:-1], second[:-1]) + float(first[-1]) + float(second[-1])


def brute_force(
    vectors: np.ndarray, names: np.ndarray, far: float, score: Callable = cosine
) -> tuple[float, float, float]:
    """The same experiment, one probe at a time, with the definitions written out plainly."""
    gallery_names, gallery_vectors = [], []
    for i, name in enumerate(names):
        if name not in gallery_names and (names == name).sum() > 1:
            gallery_names.append(name)
            gallery_vectors.append(vectors[i])
    enrolled = set(gallery_names)
    seen: set[str] = set()
    ranks, mated_best, impostor_best = [], [], []
    for i, name in enumerate(names):
        scores = {g: score(vectors[i], v) for g, v in zip(gallery_names, gallery_vectors, strict=True)}
        if name not in enrolled:
            impostor_best.append(max(scores.values()))
        elif name in seen:
            ordered = sorted(scores, key=lambda g: -scores[g])
            ranks.append(ordered.index(name) + 1)
            mated_best.append((ordered[0] == name, scores[name]))
        seen.add(name)
    impostor_best.sort(reverse=True)
    threshold = impostor_best[int(np.floor(far * len(impostor_best)))]
    detected = sum(first and score > threshold for first, score in mated_best)
    return np.mean(np.array(ranks) <= 1), np.mean(np.array(ranks) <= 5), detected / len(ranks)


@pytest.mark.parametrize("scoring", ["cosine", "joint_bayesian"])
def test_matches_a_brute_force_reference_on_clustered_faces(scoring: str) -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 5, size=120)  # about a quarter of the identities have one face
    names = np.repeat([f"id{i:03d}" for i in range(120)], counts)
    centres = rng.normal(size=(120, 32))
    vectors = np.repeat(centres, counts, axis=0) + rng.normal(0, 1.2, (len(names), 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    order = rng.permutation(len(names))
    vectors, names = vectors[order], names[order]
    score = cosine
    if scoring == "joint_bayesian":  # Bayes vectors of a model fit on the same faces
        vectors = bayes.fit(vectors, names, dims=16, shrink=0.1).vectors(vectors)
        score = joint_bayesian
    result = identify(vectors, names, far_targets=(0.1,), joint_bayesian=scoring == "joint_bayesian")
    rank1, rank5, dir_at = brute_force(vectors, names, 0.1, score)
    summary = result.summary()
    assert 0.2 < rank1 < rank5 < 1.0  # a non-trivial case
    assert summary["rank1"] == pytest.approx(rank1, abs=1e-12)
    assert summary["rank5"] == pytest.approx(rank5, abs=1e-12)
    assert summary["dir_at_far_0.1"] == pytest.approx(dir_at, abs=1e-12)


def test_totals_over_models_add_probes_and_hits() -> None:
    vectors = unit([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9], [1, 1]])
    one = identify(vectors, np.array(["a", "b", "a", "b", "x"]))
    two = identify(vectors[:4], np.array(["a", "b", "b", "a"]))  # both probes nearer the other identity
    total = combine([one, two]).summary()
    assert (total["mated_probes"], total["nonmated_probes"]) == (4, 1)
    assert total["rank1"] == 0.5


def test_total_dir_counts_only_probes_of_models_that_could_set_a_threshold() -> None:
    """A model without non-mated probes has no DIR threshold: its mated probes must not dilute the total."""
    vectors = unit([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9], [-1, 0.2]])
    with_impostor = identify(vectors, np.array(["a", "b", "a", "b", "x"]), far_targets=(0.5,))
    without = identify(vectors[:4], np.array(["a", "b", "a", "b"]), far_targets=(0.5,))
    assert with_impostor.summary()["dir_at_far_0.5"] == 1.0 and "dir_at_far_0.5" not in without.summary()
    total = combine([with_impostor, without]).summary()
    assert total["mated_probes"] == 4 and total["rank1"] == 1.0
    assert total["dir_at_far_0.5"] == 1.0  # 2 of 2 countable probes, not 2 of 4


def test_no_identity_with_two_faces_gives_no_rates_instead_of_dividing_by_zero() -> None:
    result = identify(unit([[1, 0], [0, 1]]), np.array(["a", "b"]))
    assert result.summary()["rank1"] is None and result.nonmated_probes == 2
