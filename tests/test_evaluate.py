"""Verification metrics: exact thresholds, held-out folds, cross-training groups, ROC numbers against
sklearn, unscorable pairs, user CSVs and insightface .bin sets."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from arcface.config import EvaluateParams
from arcface.data.binsets import BinSetError, load_bin, write_bin
from arcface.evaluate import (
    EvaluationError,
    accuracy_at,
    best_threshold,
    format_metrics,
    interval_text,
    pair_rows,
    roc_curve,
    roc_summary,
    scores_of_pairs,
    verify,
    wilson_interval,
)
from arcface.protocol import plan, read_pairs_csv, training_exclusions

SAMPLE_PAIRS = Path(__file__).parent / "data" / "sample" / "pairs.txt"


def brute_force_best(scores: np.ndarray, same: np.ndarray) -> float:
    candidates = np.r_[np.unique(scores), np.inf]
    return max(accuracy_at(scores, same, t) for t in candidates)


def separated(seed: int, pairs: int = 600, gap: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic scores with a known separation: matched ~ N(gap, 1), mismatched ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    same = rng.random(pairs) < 0.5
    return rng.normal(same * gap, 1.0), same


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_is_the_exact_optimum(seed: int) -> None:
    scores, same = separated(seed, 200)
    scores = np.round(scores, 1)  # rounding makes ties
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == pytest.approx(brute_force_best(scores, same), abs=1e-12)
    assert accuracy_at(scores, same, threshold) == pytest.approx(accuracy, abs=1e-12)


def test_separable_scores_give_perfect_accuracy_with_threshold_between() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([False, False, False, True, True, True])
    threshold, accuracy = best_threshold(scores, same)
    assert accuracy == 1.0
    assert threshold == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(3))
def test_roc_and_auc_match_sklearn(seed: int) -> None:
    scores, same = separated(seed)
    roc = roc_curve(scores, same)
    fpr, tpr, _ = sklearn_roc_curve(same, scores, drop_intermediate=False)
    assert np.allclose(roc["fpr"], fpr, atol=1e-12) and np.allclose(roc["tpr"], tpr, atol=1e-12)
    auc, eer, tars = roc_summary(roc, (1e-3, 1e-2))
    assert auc == pytest.approx(roc_auc_score(same, scores), abs=1e-9)
    assert tars["0.01"] == pytest.approx(tpr[fpr <= 0.01].max(), abs=1e-12)
    frr_at_eer = 1 - np.interp(eer, roc["fpr"], roc["tpr"])
    assert frr_at_eer == pytest.approx(eer, abs=0.01)  # where false accepts equal false rejects


def test_folds_use_thresholds_from_the_other_folds() -> None:
    # Fold 1's own optimum would be 0.5, but folds 0 and 2 put its threshold at 0.35 (halfway
    # between 0.2 and 0.5), so fold 1 loses its 0.4 pair. Folds 0 and 2 get 0.45 from the rest.
    scores = np.array([0.2, 0.5, 0.3, 0.6, 0.4, 0.7, 0.2, 0.5])
    same = np.array([False, True, False, True, False, True, False, True])
    folds = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    report = verify(scores, same, folds, (1e-3,), "view2")
    assert [f.threshold for f in report.folds] == pytest.approx([0.45, 0.35, 0.45])
    assert report.fold_accuracies == pytest.approx([1.0, 0.75, 1.0])
    assert report.accuracy_mean == pytest.approx(np.mean([1.0, 0.75, 1.0]))
    assert report.accuracy_std == pytest.approx(np.std([1.0, 0.75, 1.0]))


def test_wilson_interval_matches_the_formula_and_stays_inside_zero_to_one() -> None:
    # 94% of 1,000 pairs (the size of pairsDevTest): about ±1.5 points either way
    assert wilson_interval(940, 1000) == pytest.approx((0.92353, 0.95310), abs=1e-5)
    # every pair right is still uncertain on few pairs: the lower end is n / (n + z²)
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + 1.96**2), 1.0))
    assert wilson_interval(0, 10) == pytest.approx((0.0, 1.96**2 / (10 + 1.96**2)))
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing scored: nothing known


def test_report_carries_the_interval_over_its_pairs() -> None:
    scores = np.array([0.2, 0.5, 0.3, 0.6, 0.4, 0.7, 0.2, 0.5])
    same = np.array([False, True, False, True, False, True, False, True])
    report = verify(scores, same, np.array([0, 0, 1, 1, 1, 1, 2, 2]), (1e-3,), "view2")
    assert report.accuracy_ci95 == pytest.approx(wilson_interval(7, 8))  # 7 of the 8 pairs right
    low, high = report.accuracy_ci95
    assert low < 7 / 8 < high
    scalars = report.scalars()
    assert (scalars["accuracy_ci95_low"], scalars["accuracy_ci95_high"]) == (low, high)
    assert f"95% interval over the pairs {low:.4f}-{high:.4f}" in report.summary()


def test_format_metrics_reads_metrics_written_before_the_interval() -> None:
    metrics = {
        "protocol": "view2",
        "pairs": 8,
        "accuracy_mean": 0.875,
        "accuracy_std": 0.1,
        "threshold": 0.4,
        "auc": 0.9,
        "eer": 0.1,
        "unscorable_pairs": 0,
        "tar_at_far_0.001": 0.5,
        "folds": [
            {"fold": 0, "group": 0, "threshold": 0.4, "accuracy": 0.875, "pairs": 8, "model": "group-0"}
        ],
    }
    assert "interval" not in format_metrics(metrics) and "accuracy 0.8750" in format_metrics(metrics)
    assert interval_text(metrics) == "-"
    metrics |= {"accuracy_ci95_low": 0.529, "accuracy_ci95_high": 0.978}
    assert "95% interval over the pairs 0.5290-0.9780" in format_metrics(metrics)
    assert interval_text(metrics) == "0.5290-0.9780"


def test_cross_trained_folds_take_thresholds_from_their_own_group_only() -> None:
    # Group 0 (folds 0, 1) separates at 0.5; group 1 (folds 2, 3) at -0.5: each group's folds must use
    # their own group's threshold, or every fold of the other group would be wrong.
    scores = np.array([0.4, 0.6, 0.3, 0.7, -0.6, -0.4, -0.7, -0.3])
    same = np.array([False, True, False, True, False, True, False, True])
    folds = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    report = verify(scores, same, folds, (1e-3,), "view2", groups)
    assert report.fold_accuracies == [1.0, 1.0, 1.0, 1.0]
    assert [f.group for f in report.folds] == [0, 0, 1, 1]
    assert report.folds[0].threshold > 0 > report.folds[2].threshold


def test_view1_threshold_comes_from_the_training_pairs() -> None:
    train_scores, train_same = np.array([0.1, 0.3, 0.5, 0.7]), np.array([False, False, True, True])
    scores, same = np.array([0.35, 0.45, 0.6]), np.array([False, True, True])
    report = verify(scores, same, np.zeros(3), (1e-3,), "view1", None, train_scores, train_same)
    assert [f.threshold for f in report.folds] == pytest.approx([0.4])
    assert report.accuracy_mean == pytest.approx(1.0)


@pytest.mark.parametrize("scale", [1.0, 40.0])  # cosines, and Joint Bayesian scores far outside [-1, 1]
def test_unscorable_pairs_count_as_errors_whatever_the_threshold(scale: float) -> None:
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.95, 0.05]) * scale
    same = np.array([1, 1, 0, 0, 1, 0], bool)
    unscorable = np.array([False, False, False, False, True, True])
    report = verify(
        scores, same, np.array([0, 0, 0, 1, 1, 1]), (1e-3,), "view2", None, None, None, unscorable
    )
    assert report.unscorable_pairs == 2
    assert report.accuracy_mean == pytest.approx((1.0 + 1 / 3) / 2)  # fold 1: both unscorable are wrong
    assert report.auc == pytest.approx(4 / 9)  # in the ROC they rank below / above every other pair


def test_perfect_scores() -> None:
    scores = np.array([0.9, 0.8, 0.1, 0.2])
    same = np.array([True, True, False, False])
    auc, eer, tars = roc_summary(roc_curve(scores, same), (1e-3,))
    assert (auc, eer, tars["0.001"]) == (1.0, 0.0, 1.0)


def test_ten_fold_protocol_on_6000_pairs_is_exact() -> None:
    scores, same = separated(11, 6000, gap=2.0)
    folds = np.repeat(np.arange(10), 600)
    report = verify(scores, same, folds, (1e-3, 1e-2), "view2")
    for result in report.folds:
        held = folds == result.fold
        best = brute_force_best(scores[~held], same[~held])
        assert accuracy_at(scores[~held], same[~held], result.threshold) == pytest.approx(best, abs=1e-12)


# -- pairs against the aligned store --------------------------------------------------------------


def manifest() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": ["A/A_0001.jpg", "A/A_0002.jpg", "B/B_0001.jpg", "C/C_0001.jpg"],
            "identity": ["A", "A", "B", "C"],
            "status": ["ok", "ok", "fallback", "error"],
            "reason": ["", "", "no face found", "unreadable image: truncated"],
        }
    )


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


def test_pair_scores_are_cosines_of_manifest_rows() -> None:
    table = pairs([("A/A_0001.jpg", "A/A_0002.jpg", True), ("A/A_0002.jpg", "B/B_0001.jpg", False)])
    rows1, rows2, unscorable = pair_rows(table, manifest(), Path("p.txt"))
    embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    scores = scores_of_pairs(embeddings, np.array([0, 1, 2]), rows1, rows2)
    assert scores == pytest.approx([0.6, 0.8])
    assert not unscorable.any()  # a fallback face is still a face


def test_pair_naming_a_missing_image_is_an_error_with_file_and_line() -> None:
    table = pairs([("A/A_0001.jpg", "A/A_0002.jpg", True), ("A/A_0001.jpg", "Z/Z_0003.jpg", False)])
    with pytest.raises(EvaluationError, match=r"pairs\.txt:3: image Z/Z_0003\.jpg is not in"):
        pair_rows(table, manifest(), Path("pairs.txt"))


def test_pair_naming_an_unreadable_image_is_counted_or_fails_by_policy() -> None:
    table = pairs([("C/C_0001.jpg", "A/A_0002.jpg", False), ("A/A_0001.jpg", "A/A_0002.jpg", True)])
    _, _, unscorable = pair_rows(table, manifest(), Path("pairs.txt"), "wrong")
    assert unscorable.tolist() == [True, False]
    with pytest.raises(EvaluationError, match=r"pairs\.txt:2: image C/C_0001\.jpg has no face to score"):
        pair_rows(table, manifest(), Path("pairs.txt"), "fail")


# -- protocols --------------------------------------------------------------------------------------


def protocols_dir(tmp_path: Path) -> Path:
    (tmp_path / "pairs.txt").write_text(SAMPLE_PAIRS.read_text())
    return tmp_path


@pytest.mark.parametrize(
    ("groups", "expected"), [(1, [list(range(10))]), (2, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])]
)
def test_cross_training_groups_split_the_folds(tmp_path: Path, groups: int, expected: list) -> None:
    protocol = plan(EvaluateParams(groups=groups), protocols_dir(tmp_path))
    assert [protocol.folds_of(g) for g in range(protocol.groups)] == expected
    excluded = training_exclusions(EvaluateParams(groups=groups), protocols_dir(tmp_path))
    assert len(excluded) == groups
    everyone = set().union(*excluded)
    for group, names in enumerate(excluded):
        scored = protocol.pairs[protocol.pairs["group"] == group]
        assert names == set(scored["name1"]) | set(scored["name2"])
        # A model is blind to its own group's people and may train on everyone else's.
        assert names != everyone or groups == 1


def test_view1_thresholds_from_held_out_folds_or_from_dev_train(tmp_path: Path) -> None:
    same = "".join(f"Ann_Lee\t{i}\t{i + 1}\n" for i in range(1, 11))
    different = "".join(f"Ann_Lee\t{i}\tBo\t{i}\n" for i in range(1, 11))
    (tmp_path / "pairsDevTest.txt").write_text(f"10\n{same}{different}")
    by_folds = plan(EvaluateParams(protocol="view1", folds=5), tmp_path, seed=1)
    assert by_folds.threshold_pairs is None  # pairsDevTrain.txt is not needed, nor read
    assert sorted(by_folds.pairs["fold"].value_counts().tolist()) == [4] * 5
    reshuffled = plan(EvaluateParams(protocol="view1", folds=5), tmp_path, seed=2)
    assert by_folds.pairs["fold"].tolist() != reshuffled.pairs["fold"].tolist()  # the seed deals
    with pytest.raises(FileNotFoundError, match=r"pairsDevTrain\.txt"):
        plan(EvaluateParams(protocol="view1", view1_threshold="dev_train"), tmp_path)
    (tmp_path / "pairsDevTrain.txt").write_text(f"10\n{same}{different}")
    by_dev_train = plan(EvaluateParams(protocol="view1", view1_threshold="dev_train"), tmp_path)
    assert len(by_dev_train.threshold_pairs) == 20 and set(by_dev_train.pairs["fold"]) == {0}


def test_too_many_groups_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="each group needs at least 2 folds"):
        plan(EvaluateParams(groups=6), protocols_dir(tmp_path))
    with pytest.raises(ValueError, match=r"needs evaluate\.protocol: view2"):
        plan(EvaluateParams(protocol="view1", groups=2), tmp_path)


def test_user_csv_pairs(tmp_path: Path) -> None:
    csv = tmp_path / "mine.csv"
    csv.write_text(
        "path1,path2,same\n" + "A/1.jpg,A/2.jpg,1\nA/1.jpg,B/1.jpg,false\nB/1.jpg,B/2.jpg,True\n" * 4
    )
    table = read_pairs_csv(csv, folds=3, seed=0)
    assert table["same"].tolist() == [True, False, True] * 4
    assert sorted(table["fold"].value_counts().tolist()) == [4, 4, 4]
    assert set(table["name1"]) == {"A", "B"}
    csv.write_text("path1,path2,same\nA/1.jpg,A/2.jpg,maybe\n")
    with pytest.raises(ValueError, match=r"mine\.csv:2: `same` must be 1/0 or true/false"):
        read_pairs_csv(csv, 3, 0)
    csv.write_text("first,second\nA/1.jpg,A/2.jpg\n")
    with pytest.raises(ValueError, match="missing column"):
        read_pairs_csv(csv, 3, 0)


# -- insightface .bin sets ---------------------------------------------------------------------------


def test_python3_protocol_2_pickles_still_load(tmp_path: Path) -> None:
    faces = np.zeros((2, 112, 112, 3), dtype=np.uint8)
    write_bin(tmp_path / "a.bin", faces, [True])
    images, same = pickle.loads((tmp_path / "a.bin").read_bytes())
    (tmp_path / "b.bin").write_bytes(pickle.dumps((images, same), protocol=2))  # bytes via _codecs.encode
    assert load_bin(tmp_path / "b.bin").same.tolist() == [True]


def test_bin_set_round_trip(tmp_path: Path) -> None:
    ramp = np.linspace(0, 120, 112)
    faces = np.stack([np.stack([np.add.outer(ramp / (k + 1), ramp)] * 3, -1) for k in range(4)])
    faces = faces.astype(np.uint8)  # smooth gradients: JPEG keeps them almost exactly
    write_bin(tmp_path / "lfw.bin", faces, [True, False])
    loaded = load_bin(tmp_path / "lfw.bin")
    assert loaded.faces.shape == (4, 112, 112, 3) and loaded.same.tolist() == [True, False]
    assert np.abs(loaded.faces.astype(int) - faces).mean() < 4  # the same images, through JPEG


class _Exploit:
    """Unpickling this would call os.system: the loader must refuse it without running it."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned-by-pickle",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.bin", "wb") as handle:
        pickle.dump(([b"x", b"y"], [_Exploit()]), handle)
    with pytest.raises(
        BinSetError, match=r"evil\.bin: refused .*posix\.system|evil\.bin: refused .*os\.system"
    ):
        load_bin(tmp_path / "evil.bin")
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_bin_set_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    faces = np.zeros((2, 96, 112, 3), dtype=np.uint8)
    write_bin(tmp_path / "odd.bin", faces, [True])
    with pytest.raises(BinSetError, match=r"odd\.bin: image 0 is 112×96, expected 112×112"):
        load_bin(tmp_path / "odd.bin")
    with open(tmp_path / "count.bin", "wb") as handle:
        pickle.dump(([b"a", b"b", b"c"], [True]), handle)
    with pytest.raises(BinSetError, match=r"3 images for 1 pairs"):
        load_bin(tmp_path / "count.bin")


def test_folds_plot_shades_the_interval_over_the_pairs(tmp_path: Path) -> None:
    from PIL import Image

    from arcface import plots

    folds = pd.DataFrame({"fold": [0, 1, 2], "group": [0, 0, 0], "accuracy": [0.95, 0.96, 0.93]})
    plain, shaded = tmp_path / "plain.png", tmp_path / "shaded.png"
    plots.fold_accuracy(folds, 0.9467, plain)
    plots.fold_accuracy(folds, 0.9467, shaded, (0.90, 0.97))
    first, second = (np.asarray(Image.open(path).convert("RGB")).astype(int) for path in (plain, shaded))
    assert first.shape == second.shape
    # the band greys part of the white plot area; the plain plot has no such grey
    assert _light_grey_pixels(second) > 10 * max(_light_grey_pixels(first), 100)


def _light_grey_pixels(image: np.ndarray) -> int:
    return int(((image > 200) & (image < 245)).all(axis=2).sum())


def test_a_cross_trained_models_figures_are_those_of_its_own_folds(tmp_path: Path) -> None:
    from arcface.evaluate import model_figures
    from arcface.search import threshold_from_metrics

    folds = [
        {"fold": 0, "model": "group-0", "accuracy": 0.9, "pairs": 100, "threshold": 0.2},
        {"fold": 1, "model": "group-0", "accuracy": 0.8, "pairs": 300, "threshold": 0.4},
        {"fold": 2, "model": "group-1", "accuracy": 1.0, "pairs": 100, "threshold": 0.9},
    ]
    metrics = {"groups": 2, "folds": folds, "accuracy_mean": 0.88, "threshold": 0.5}
    assert model_figures(metrics, "group-0") == pytest.approx({"accuracy_mean": 0.825, "threshold": 0.3})
    assert model_figures(metrics, "group-1") == pytest.approx({"accuracy_mean": 1.0, "threshold": 0.9})
    assert model_figures(metrics, "group-7") is None  # scored no fold
    assert model_figures({**metrics, "groups": 1}, "group-0") is None  # one model: the run's figures
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    assert threshold_from_metrics(path, "group-1") == pytest.approx(0.9)
    assert threshold_from_metrics(path) == pytest.approx(0.5)
