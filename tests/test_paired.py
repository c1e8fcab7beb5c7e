"""Paired comparison of two evaluated runs: per-pair outcomes rebuilt from scores.csv and metrics.json,
fixed / broken counts and McNemar's exact test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arcface.cli import main
from arcface.evaluate import verify
from arcface.files import read_json, write_json
from arcface.paired import PairedError, compare, mcnemar_p, pair_outcomes


def write_reports(
    folder: Path, scores: np.ndarray, same: np.ndarray, unscorable: np.ndarray | None = None
) -> float:
    """A reports folder as the evaluate stage writes it (the columns and keys paired reads), for pairs
    p0..pN-1 dealt into two folds; returns the accuracy evaluate reports for them."""
    folds = np.arange(len(scores)) // 2 % 2  # pairs 0-1 in fold 0, 2-3 in fold 1, ...
    unscorable = np.zeros(len(scores), dtype=bool) if unscorable is None else unscorable
    report = verify(scores, same, folds, (1e-3,), "csv", unscorable=unscorable)
    folder.mkdir(parents=True)
    pd.DataFrame(
        {
            "fold": folds,
            "group": 0,
            "path1": [f"a/p{i}.jpg" for i in range(len(scores))],
            "path2": [f"b/p{i}.jpg" for i in range(len(scores))],
            "same": same,
            "score_flip": scores,
            "score_plain": scores[::-1],  # another variant: must not be the one read
            "unscorable": unscorable,
        }
    ).to_csv(folder / "scores.csv", index=False)
    folds_out = [
        {"fold": f.fold, "group": f.group, "threshold": f.threshold, "accuracy": f.accuracy, "pairs": f.pairs}
        for f in report.folds
    ]
    write_json(
        folder / "metrics.json",
        {"embedding": "flip", "accuracy_mean": report.accuracy_mean, "folds": folds_out},
    )
    return report.accuracy_mean


SAME = np.array([True, False] * 10)
BASE = np.where(SAME, 0.8, 0.2)  # every pair right...
BASE[[0, 3, 4, 7]] = [0.1, 0.9, 0.1, 0.9]  # ...but these four (two per fold)


def test_mcnemar_p_is_the_exact_binomial_tail() -> None:
    assert mcnemar_p(0, 0) == 1.0  # runs that never disagree
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_p(0, 10) == mcnemar_p(10, 0)
    expected = 2 * sum(math.comb(19, k) for k in range(9)) / 2**19
    assert mcnemar_p(11, 8) == pytest.approx(expected) and 0.6 < expected < 0.7
    assert mcnemar_p(5, 5) == 1.0  # an even split: capped at 1


def test_outcomes_reproduce_the_reported_accuracy(tmp_path: Path) -> None:
    unscorable = np.zeros(len(SAME), dtype=bool)
    unscorable[10] = True  # a pair evaluate could not score: wrong, whatever its stored score
    accuracy = write_reports(tmp_path / "r", BASE, SAME, unscorable)
    outcomes = pair_outcomes(tmp_path / "r")
    assert len(outcomes) == len(SAME) and outcomes.mean() == pytest.approx(accuracy)
    assert not outcomes[("a/p10.jpg", "b/p10.jpg", 0)]
    wrong = sorted(int(path1[3:-4]) for path1, _, _ in outcomes.index[~outcomes.to_numpy()])
    assert wrong == [0, 3, 4, 7, 10]


def test_compare_counts_pairs_fixed_and_broken(tmp_path: Path) -> None:
    write_reports(tmp_path / "first", BASE, SAME)
    better = BASE.copy()
    better[[0, 3, 4]] = [0.8, 0.2, 0.8]  # three of the four errors fixed
    better[[8]] = [0.1]  # one new error
    write_reports(tmp_path / "second", better, SAME)
    found = compare(tmp_path / "first", tmp_path / "second")
    assert (found.pairs, found.fixed, found.broken) == (20, 3, 1)
    assert found.first_accuracy == pytest.approx(16 / 20) and found.second_accuracy == pytest.approx(18 / 20)
    assert found.difference == pytest.approx(0.1) and found.p_value == pytest.approx(mcnemar_p(3, 1))
    assert "+10.00 points" in found.summary("A", "B") and "not told apart" in found.summary("A", "B")


def test_compare_refuses_reports_of_different_pairs(tmp_path: Path) -> None:
    write_reports(tmp_path / "first", BASE, SAME)
    write_reports(tmp_path / "second", BASE[:18], SAME[:18])
    before = (tmp_path / "second" / "scores.csv").read_bytes()
    with pytest.raises(
        PairedError,
        match=r"first/scores.csv and .*second/scores.csv score different pairs "
        r"\(2 only in the first, 0 only in the second\)",
    ):
        compare(tmp_path / "first", tmp_path / "second")
    assert (tmp_path / "second" / "scores.csv").read_bytes() == before  # read only


def test_missing_files_and_mismatched_embedding_are_named(tmp_path: Path) -> None:
    write_reports(tmp_path / "r", BASE, SAME)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairedError, match=r"empty/scores.csv: not found; run the evaluate stage"):
        pair_outcomes(tmp_path / "empty")
    metrics = read_json(tmp_path / "r" / "metrics.json")
    write_json(tmp_path / "r" / "metrics.json", metrics | {"embedding": "bayes"})
    with pytest.raises(
        PairedError, match=r"scores.csv: no score_bayes column for metrics.json's embedding 'bayes'"
    ):
        pair_outcomes(tmp_path / "r")


def test_cli_compares_each_run_with_the_first(tmp_path: Path, capsys) -> None:
    write_reports(tmp_path / "first", BASE, SAME)
    fixed = BASE.copy()
    fixed[[0, 3, 4, 7]] = np.where(SAME[[0, 3, 4, 7]], 0.8, 0.2)
    write_reports(tmp_path / "second", fixed, SAME)
    write_reports(tmp_path / "third", BASE, SAME)
    assert (
        main(["compare-reports", str(tmp_path / "first"), str(tmp_path / "second"), str(tmp_path / "third")])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "accuracy 1.0000 vs 0.8000 (+20.00 points) on 20 pairs: 4 fixed, 0 broken" in lines[0]
    assert "0 fixed, 0 broken; McNemar exact p = 1" in lines[1]
    assert main(["compare-reports", str(tmp_path / "first"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere/scores.csv: not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a comparison needs two folders
        main(["compare-reports", str(tmp_path / "first")])
