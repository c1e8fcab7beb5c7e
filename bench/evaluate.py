"""The 10-fold verification protocol: this implementation against the common fixed-grid loop, one run.

    python bench/evaluate.py [--pairs 6000] [--repeats 5] [--json out.json]

common:  for each fold, try 400 fixed thresholds on the other nine folds (a Python loop over thresholds,
         each a vectorized accuracy), keep the best, score the fold: what most repositories do.
this:    `arcface.evaluate.verify`: the exact optimum over every distinct score (one sort per fold),
         plus ROC AUC, EER and TAR@FAR.
The scores are synthetic (matched ~ N(1, 1), mismatched ~ N(0, 1)); times are the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from arcface.evaluate import verify


def common_grid(scores: np.ndarray, same: np.ndarray, folds: np.ndarray, steps: int = 400) -> float:
    accuracies = []
    grid = np.linspace(scores.min(), scores.max(), steps)
    for fold in np.unique(folds):
        held = folds == fold
        best, best_accuracy = grid[0], -1.0
        for threshold in grid:
            accuracy = np.mean((scores[~held] >= threshold) == same[~held])
            if accuracy > best_accuracy:
                best, best_accuracy = threshold, accuracy
        accuracies.append(np.mean((scores[held] >= best) == same[held]))
    return float(np.mean(accuracies))


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    same = rng.random(args.pairs) < 0.5
    scores = rng.normal(same * 1.0, 1.0)
    folds = np.arange(args.pairs) * 10 // args.pairs
    common_seconds, common_accuracy = timed(lambda: common_grid(scores, same, folds), args.repeats)
    this_seconds, report = timed(lambda: verify(scores, same, folds, (1e-3, 1e-2), "view2"), args.repeats)
    rows = [
        {"method": "common: 400-threshold loop", "seconds": common_seconds, "accuracy": common_accuracy},
        {"method": "this: exact, vectorized", "seconds": this_seconds, "accuracy": report.accuracy_mean},
    ]
    print(f"10-fold protocol on {args.pairs} pairs, median of {args.repeats} runs")
    print(f"{'method':<30} {'seconds':>9} {'accuracy':>9} {'speedup':>8}")
    for row in rows:
        row["speedup"] = common_seconds / row["seconds"]
        print(f"{row['method']:<30} {row['seconds']:>9.4f} {row['accuracy']:>9.4f} {row['speedup']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"pairs": args.pairs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
