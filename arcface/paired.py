"""Paired comparison of two evaluated runs on the same pairs: which pairs one gets right and the other
wrong, and McNemar's exact test of whether that split could be chance.

Two runs scored on the same pairs share those pairs' luck, so comparing their accuracy intervals (each
about ±1.5 points on 1,000 pairs) undersells a real difference; the pairs where they disagree are what
tells them apart. Each run's outcome per pair is rebuilt from its reports folder: `scores.csv` (its
primary embedding's score of every pair) at the threshold `metrics.json` gives that pair's fold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from arcface.evaluate import METRICS_FILE, SCORES_FILE, scored_right
from arcface.files import read_json

PAIR_KEY = ["path1", "path2"]


class PairedError(ValueError):
    """Two reports that cannot be compared pair by pair: the message names the files and the reason."""


@dataclass(frozen=True)
class PairedComparison:
    pairs: int
    first_accuracy: float  # share of the pairs scored right (the folds' mean when folds are equal)
    second_accuracy: float
    fixed: int  # pairs the second run gets right and the first wrong
    broken: int  # pairs the first run gets right and the second wrong
    p_value: float  # McNemar's exact two-sided test: 1.0 when the runs never disagree

    @property
    def difference(self) -> float:
        return self.second_accuracy - self.first_accuracy

    def summary(self, first: str, second: str) -> str:
        verdict = "a real difference" if self.p_value < 0.05 else "not told apart by these pairs"
        return (
            f"{second} vs {first}: accuracy {self.second_accuracy:.4f} vs {self.first_accuracy:.4f} "
            f"({100 * self.difference:+.2f} points) on {self.pairs} pairs: {self.fixed} fixed, "
            f"{self.broken} broken; McNemar exact p = {self.p_value:.3g} ({verdict} at 5%)"
        )


def mcnemar_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: the chance of a split at least this uneven among the
    `fixed + broken` disagreeing pairs if each were a fair coin."""
    disagreeing = fixed + broken
    if disagreeing == 0:
        return 1.0
    tail = sum(math.comb(disagreeing, k) for k in range(min(fixed, broken) + 1)) / 2.0**disagreeing
    return min(1.0, 2.0 * tail)


def pair_outcomes(reports_dir: Path) -> pd.Series:
    """Whether each pair was scored right (True) by a run's primary embedding at its fold's threshold,
    indexed by (path1, path2). Unscorable pairs count as wrong, as evaluate counts them."""
    scores_path, metrics_path = reports_dir / SCORES_FILE, reports_dir / METRICS_FILE
    for path in (scores_path, metrics_path):
        if not path.exists():
            raise PairedError(f"{path}: not found; run the evaluate stage for this run first")
    metrics = read_json(metrics_path)
    table = pd.read_csv(scores_path)
    column = f"score_{metrics['embedding']}"
    if column not in table.columns:
        raise PairedError(
            f"{scores_path}: no {column} column for metrics.json's embedding {metrics['embedding']!r}: "
            "the two files come from different evaluate runs; re-run the evaluate stage"
        )
    thresholds = {fold["fold"]: fold["threshold"] for fold in metrics["folds"]}
    missing = sorted(set(table["fold"]) - set(thresholds))
    if missing:
        raise PairedError(f"{metrics_path}: no threshold for fold(s) {missing} of {scores_path}")
    threshold = table["fold"].map(thresholds).to_numpy()
    right = scored_right(table[column].to_numpy(), table["same"].to_numpy(), threshold)
    right &= ~table["unscorable"].to_numpy(dtype=bool)
    # a pair listed twice is scored twice: number the repeats so that each matches its like
    keys = table[PAIR_KEY].assign(repeat=table.groupby(PAIR_KEY).cumcount())
    outcomes = pd.Series(right, index=pd.MultiIndex.from_frame(keys), name="right")
    return outcomes.sort_index()


def compare(first_dir: Path, second_dir: Path) -> PairedComparison:
    """Compare two runs' reports folders pair by pair; both must have scored the same pairs."""
    first, second = pair_outcomes(first_dir), pair_outcomes(second_dir)
    if not first.index.equals(second.index):
        only_first = len(first.index.difference(second.index))
        only_second = len(second.index.difference(first.index))
        raise PairedError(
            f"{first_dir / SCORES_FILE} and {second_dir / SCORES_FILE} score different pairs ({only_first} "
            f"only in the first, {only_second} only in the second): a paired comparison needs the same "
            "protocol and pairs (evaluate.protocol, the pair files)"
        )
    a, b = first.to_numpy(), second.to_numpy()
    fixed, broken = int((b & ~a).sum()), int((a & ~b).sum())
    return PairedComparison(len(a), float(a.mean()), float(b.mean()), fixed, broken, mcnemar_p(fixed, broken))
