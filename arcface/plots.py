"""The figures people look at: ROC, score histograms, per-fold accuracy, and angles to class centres.

Matplotlib's `Figure` is used directly (no pyplot): files only, no GUI backend, no global state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def roc(curves: Mapping[str, pd.DataFrame], title: str, path: Path) -> None:
    """ROC curves (true vs false accept rate) with a log-scale FAR axis, where systems are compared."""
    figure = Figure(figsize=(5.5, 4.2), dpi=120)
    axis = figure.subplots()
    smallest = min(1.0 / max(len(c), 2) for c in curves.values())
    floor = max(smallest / 10, 1e-6)  # FAR = 0 drawn at a small positive value on the log axis
    for label, curve in curves.items():
        axis.plot(np.maximum(curve["fpr"], floor), curve["tpr"], lw=2, label=label)
    axis.set_xscale("log")
    axis.set_xlim(floor, 1.0)
    axis.set_ylim(0, 1.01)
    axis.set_xlabel("false accept rate")
    axis.set_ylabel("true accept rate")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, format="png")


def score_histogram(
    scores: np.ndarray,
    same: np.ndarray,
    threshold: float,
    path: Path,
    label: str = "cosine similarity",
    bounds: tuple[float, float] | None = (-1.0, 1.0),
) -> None:
    """Scores of matched vs mismatched pairs, with the chosen threshold (bins over `bounds`, or over the
    scores' own range when None: Joint Bayesian scores are unbounded)."""
    figure = Figure(figsize=(5.5, 4.2), dpi=120)
    axis = figure.subplots()
    if bounds is None:
        finite = scores[np.isfinite(scores)]
        bounds = (float(finite.min(initial=-1.0)), float(finite.max(initial=1.0)))
    bins = np.linspace(bounds[0], bounds[1], 61)
    axis.hist(scores[same], bins=bins, alpha=0.6, label="same person")
    axis.hist(scores[~same], bins=bins, alpha=0.6, label="different people")
    axis.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3f}")
    axis.set_xlabel(label)
    axis.set_ylabel("pairs")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def fold_accuracy(
    folds: pd.DataFrame, mean: float, path: Path, interval: tuple[float, float] | None = None
) -> None:
    """Accuracy of every fold, coloured by the model (cross-training group) that scored it, with the
    accuracy's 95% interval over the pairs as a grey band when given."""
    figure = Figure(figsize=(5.5, 3.6), dpi=120)
    axis = figure.subplots()
    colours = [f"C{group}" for group in folds["group"]]
    positions = np.arange(len(folds))  # numeric positions + labels: no categorical-axis guessing
    axis.bar(positions, folds["accuracy"], color=colours)
    axis.set_xticks(positions, [str(fold) for fold in folds["fold"]])
    axis.axhline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.4f}")
    if interval is not None:
        label = f"95% interval over the pairs {interval[0]:.4f}-{interval[1]:.4f}"
        axis.axhspan(*interval, color="0.5", alpha=0.2, lw=0, label=label)
    low = max(0.0, min([float(folds["accuracy"].min()), *(interval or ())]) - 0.05)
    axis.set_ylim(low, 1.0)
    axis.set_xlabel("fold (colour: model / group)")
    axis.set_ylabel("accuracy")
    axis.legend(loc="best", framealpha=0.9)
    figure.tight_layout()
    figure.savefig(path, format="png")


def angle_distributions(angles: Mapping[str, np.ndarray], path: Path) -> None:
    """The course report's figure: angles (degrees) between training embeddings and their class centres,
    one panel per model, side by side on one scale. Margin losses pull the mass towards 0."""
    figure = Figure(figsize=(4.5 * len(angles), 3.6), dpi=120)
    axes = np.atleast_1d(figure.subplots(1, len(angles), sharex=True, sharey=True))
    bins = np.linspace(0, 120, 61)
    for axis, (label, values) in zip(axes, angles.items(), strict=True):
        axis.hist(values, bins=bins, color="C0", alpha=0.8)
        axis.axvline(float(np.median(values)), color="k", ls="--", lw=1)
        axis.set_title(f"{label}: median {np.median(values):.1f}°")
        axis.set_xlabel("angle to class centre (degrees)")
    axes[0].set_ylabel("training faces")
    figure.tight_layout()
    figure.savefig(path, format="png")
