"""Verification metrics: exact thresholds, held-out folds, ROC numbers, and pairs that can't be scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from arcface.evaluate import (
    EvaluationError,
    accuracy_at,
    best_threshold,
    pair_scores,
    roc_curve,
    roc_summary,
    verify,
)


def brute_force_best(scores: np.ndarray, same: np.ndarray) -> float:
    candidates = np.r_[np.unique(scores), np.inf]
    return max(accuracy_at(scores, same, t) for t in candidates)


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_is_the_exact_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    same = rng.random(200) < 0.5
    scores = np.round(rng.normal(same * 0.4, 0.3), 2)  # rounding makes ties
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == pytest.approx(brute_force_best(scores, same))
    assert accuracy_at(scores, same, threshold) == pytest.approx(accuracy)


def test_separable_scores_give_perfect_accuracy_with_threshold_between() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([False, False, False, True, True, True])
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == 1.0
    assert threshold == pytest.approx(0.5)


def test_folds_use_thresholds_from_the_other_folds() -> None:
    # Fold 1's own optimum would be 0.5, but folds 0 and 2 put its threshold at 0.35 (halfway
    # between 0.2 and 0.5), so fold 1 loses its 0.4 pair. Folds 0 and 2 get 0.45 from the rest.
    scores = np.array([0.2, 0.5, 0.3, 0.6, 0.4, 0.7, 0.2, 0.5])
    same = np.array([False, True, False, True, False, True, False, True])
    folds = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    report = verify(scores, same, folds, 1e-3, "view2")
    assert report.fold_thresholds == pytest.approx([0.45, 0.35, 0.45])
    assert report.fold_accuracies == pytest.approx([1.0, 0.75, 1.0])
    assert report.accuracy_mean == pytest.approx(np.mean([1.0, 0.75, 1.0]))
    assert report.accuracy_std == pytest.approx(np.std([1.0, 0.75, 1.0]))


def test_view1_threshold_comes_from_the_training_pairs() -> None:
    train_scores, train_same = np.array([0.1, 0.3, 0.5, 0.7]), np.array([False, False, True, True])
    scores, same = np.array([0.35, 0.45, 0.6]), np.array([False, True, True])
    report = verify(scores, same, np.zeros(3), 1e-3, "view1", train_scores, train_same)
    assert report.fold_thresholds == pytest.approx([0.4])
    assert report.accuracy_mean == pytest.approx(1.0)


def test_roc_auc_matches_sklearn_and_eer_is_where_error_rates_cross() -> None:
    rng = np.random.default_rng(3)
    same = rng.random(500) < 0.5
    scores = rng.normal(same * 1.0, 1.0)
    roc = roc_curve(scores, same)
    auc, eer, tar = roc_summary(roc, far_target=0.01)
    assert auc == pytest.approx(roc_auc_score(same, scores), abs=1e-9)
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
    # At the EER the false accept rate equals the false reject rate (on the interpolated curve).
    frr_at_eer = 1 - np.interp(eer, roc["fpr"], roc["tpr"])
    assert frr_at_eer == pytest.approx(eer, abs=0.01)
    assert 0.25 < eer < 0.4  # two unit Gaussians one sigma apart: EER = Φ(-0.5) ≈ 0.31
    assert tar == roc.loc[roc["fpr"] <= 0.01, "tpr"].max()


def test_perfect_scores() -> None:
    scores = np.array([0.9, 0.8, 0.1, 0.2])
    same = np.array([True, True, False, False])
    auc, eer, tar = roc_summary(roc_curve(scores, same), 1e-3)
    assert (auc, eer, tar) == (1.0, 0.0, 1.0)


def manifest_and_embeddings() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    manifest = pd.DataFrame(
        {
            "path": ["A/A_0001.jpg", "A/A_0002.jpg", "B/B_0001.jpg", "C/C_0001.jpg"],
            "identity": ["A", "A", "B", "C"],
            "status": ["ok", "ok", "ok", "error"],
            "reason": ["", "", "", "unreadable image: truncated"],
        }
    )
    embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    return manifest, embeddings, np.array([0, 1, 2])


def pairs(rows: list[tuple[str, str, bool]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "fold": 0,
            "path1": [r[0] for r in rows],
            "path2": [r[1] for r in rows],
            "same": [r[2] for r in rows],
            "line": range(2, 2 + len(rows)),
        }
    )


def test_pair_scores_are_cosines() -> None:
    manifest, embeddings, rows = manifest_and_embeddings()
    table = pairs([("A/A_0001.jpg", "A/A_0002.jpg", True), ("A/A_0002.jpg", "B/B_0001.jpg", False)])
    assert pair_scores(table, manifest, embeddings, rows, Path("p.txt")) == pytest.approx([0.6, 0.8])


def test_pair_naming_a_missing_image_is_an_error_with_file_and_line() -> None:
    manifest, embeddings, rows = manifest_and_embeddings()
    table = pairs([("A/A_0001.jpg", "A/A_0002.jpg", True), ("A/A_0001.jpg", "Z/Z_0003.jpg", False)])
    with pytest.raises(EvaluationError, match=r"pairs\.txt:3: image Z/Z_0003\.jpg is not in"):
        pair_scores(table, manifest, embeddings, rows, Path("pairs.txt"))


def test_pair_naming_an_unreadable_image_says_why() -> None:
    manifest, embeddings, rows = manifest_and_embeddings()
    table = pairs([("C/C_0001.jpg", "A/A_0002.jpg", False)])
    with pytest.raises(EvaluationError, match=r"C/C_0001\.jpg has no embedding \(error: unreadable"):
        pair_scores(table, manifest, embeddings, rows, Path("pairs.txt"))
