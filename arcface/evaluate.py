"""LFW verification: cosine scores of pairs, thresholds chosen on held-out folds, ROC metrics, plots.

Protocols (DESIGN.md, "Honest evaluation"):
- `view2`: `pairs.txt`, folds as in the file; each fold is scored at the threshold that maximizes
  accuracy on the other folds; accuracy is reported as mean ± std over folds.
- `view1`: the threshold that maximizes accuracy on `pairsDevTrain.txt`, accuracy on `pairsDevTest.txt`.
A model never trains on the identities it is scored on: `scored_identities` tells the train stage which.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: files only, no GUI backend, no global state

from arcface.config import EvaluateParams
from arcface.data import store
from arcface.data.lfw import protocol_identities, read_pairs
from arcface.embed import load_embeddings
from arcface.files import atomic_path, write_json

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ROC_FILE = "roc.csv"
SCORES_FILE = "scores.csv"
ROC_PLOT = "roc.png"
HISTOGRAM_PLOT = "scores.png"
# protocol -> (file whose pairs choose the threshold or None for k-fold, file whose pairs are scored)
PROTOCOL_FILES: dict[str, tuple[str | None, str]] = {
    "view2": (None, "pairs.txt"),
    "view1": ("pairsDevTrain.txt", "pairsDevTest.txt"),
}


class EvaluationError(ValueError):
    """A pair that can't be scored: the message names the protocol file, the line and the image."""


@dataclass(frozen=True)
class VerificationReport:
    """What the evaluate stage reports; every number is about the scored pairs only."""

    protocol: str
    pairs: int
    accuracy_mean: float
    accuracy_std: float
    threshold: float  # mean of the per-fold thresholds (cosine)
    auc: float
    eer: float
    tar_at_far: float
    far_target: float
    fold_accuracies: list[float] = field(default_factory=list)
    fold_thresholds: list[float] = field(default_factory=list)

    def summary(self) -> str:
        """Two lines for people: accuracy over folds, then the ROC numbers."""
        return (
            f"{self.protocol}: accuracy {self.accuracy_mean:.4f} ± {self.accuracy_std:.4f} "
            f"over {len(self.fold_accuracies)} fold(s), {self.pairs} pairs\n"
            f"  ROC AUC {self.auc:.4f}, EER {self.eer:.4f}, "
            f"TAR@FAR={self.far_target:g} {self.tar_at_far:.4f}, threshold {self.threshold:.4f}"
        )


def scored_identities(protocols_dir: Path, protocol: str) -> set[str]:
    """Every identity in the pairs a model will be scored on: the train stage must leave them out."""
    _, scored = PROTOCOL_FILES[protocol]
    return protocol_identities(read_pairs(_protocol_path(protocols_dir, scored)))


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The exact accuracy-maximizing threshold (predict `same` when score ≥ t) and its accuracy.

    Every distinct score is a candidate; the returned threshold sits halfway between the best candidate
    and the score just below it, so it does not hug one training sample.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_same = scores[order], same[order].astype(bool)
    # Candidate i: everything from index i on is predicted `same`. Ties must share one side, so only
    # the first index of each distinct score is a candidate (plus "nothing is same" at the end).
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    candidates = np.r_[starts, len(scores)]
    different_below = np.r_[0, np.cumsum(~sorted_same)][candidates]
    same_above = sorted_same.sum() - np.r_[0, np.cumsum(sorted_same)][candidates]
    correct = different_below + same_above
    best = int(np.argmax(correct))
    index = candidates[best]
    upper = sorted_scores[index] if index < len(scores) else sorted_scores[-1] + 1e-6
    lower = sorted_scores[index - 1] if index > 0 else upper - 1e-6
    return float((lower + upper) / 2), float(correct[best] / len(scores))


def accuracy_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores >= threshold) == same.astype(bool)))


def roc_curve(scores: np.ndarray, same: np.ndarray) -> pd.DataFrame:
    """False/true accept rates at every distinct threshold, from strictest to loosest."""
    same = same.astype(bool)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], same[order]
    last_of_each = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    true_accepts = np.cumsum(sorted_same)[last_of_each]
    false_accepts = np.cumsum(~sorted_same)[last_of_each]
    positives, negatives = max(int(same.sum()), 1), max(int((~same).sum()), 1)
    return pd.DataFrame(
        {
            "threshold": np.r_[np.inf, sorted_scores[last_of_each]],
            "fpr": np.r_[0.0, false_accepts / negatives],
            "tpr": np.r_[0.0, true_accepts / positives],
        }
    )


def roc_summary(roc: pd.DataFrame, far_target: float) -> tuple[float, float, float]:
    """(AUC, equal error rate, TAR at FAR ≤ far_target) from a ROC table."""
    fpr, tpr = roc["fpr"].to_numpy(), roc["tpr"].to_numpy()
    auc = float(np.trapezoid(tpr, fpr))
    # EER: where the false reject rate (1 − TPR) crosses the false accept rate; interpolate between
    # the two ROC points around the crossing.
    gap = (1 - tpr) - fpr
    i = int(np.argmax(gap <= 0)) if (gap <= 0).any() else len(gap) - 1
    if i > 0 and gap[i] != gap[i - 1]:
        w = gap[i - 1] / (gap[i - 1] - gap[i])
        eer = float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))
    else:
        eer = float(fpr[i])
    tar = float(tpr[fpr <= far_target].max())
    return auc, eer, tar


def verify(
    scores: np.ndarray,
    same: np.ndarray,
    folds: np.ndarray,
    far_target: float,
    protocol: str,
    threshold_scores: np.ndarray | None = None,
    threshold_same: np.ndarray | None = None,
) -> VerificationReport:
    """Accuracy with held-out thresholds: per fold from the other folds, or from a separate pair set."""
    if threshold_scores is not None:
        threshold, _ = best_threshold(threshold_scores, threshold_same)
        fold_thresholds = [threshold]
        fold_accuracies = [accuracy_at(scores, same, threshold)]
    else:
        fold_thresholds, fold_accuracies = [], []
        for fold in np.unique(folds):
            held = folds == fold
            threshold, _ = best_threshold(scores[~held], same[~held])
            fold_thresholds.append(threshold)
            fold_accuracies.append(accuracy_at(scores[held], same[held], threshold))
    auc, eer, tar = roc_summary(roc_curve(scores, same), far_target)
    return VerificationReport(
        protocol=protocol,
        pairs=len(scores),
        accuracy_mean=float(np.mean(fold_accuracies)),
        accuracy_std=float(np.std(fold_accuracies)),
        threshold=float(np.mean(fold_thresholds)),
        auc=auc,
        eer=eer,
        tar_at_far=tar,
        far_target=far_target,
        fold_accuracies=fold_accuracies,
        fold_thresholds=fold_thresholds,
    )


def pair_scores(
    pairs: pd.DataFrame,
    manifest: pd.DataFrame,
    embeddings: np.ndarray,
    rows: np.ndarray,
    source: Path,
) -> np.ndarray:
    """Cosine of each pair's two embeddings; EvaluationError names the first pair that can't be scored."""
    row_of_path = pd.Series(np.arange(len(manifest)), index=manifest["path"].to_numpy())
    vector_of_row = np.full(len(manifest), -1)
    vector_of_row[rows] = np.arange(len(rows))
    indices = []
    for column in ("path1", "path2"):
        found = row_of_path.reindex(pairs[column].to_numpy())
        missing = found.isna().to_numpy()
        if missing.any():
            first = int(np.argmax(missing))
            raise EvaluationError(
                f"{source}:{pairs['line'].iat[first]}: image {pairs[column].iat[first]} is not in the "
                f"aligned store ({int(missing.sum())} pair images missing in all)"
            )
        vectors = vector_of_row[found.to_numpy(dtype=np.int64)]
        if (vectors < 0).any():
            first = int(np.argmax(vectors < 0))
            row = int(found.iat[first])
            raise EvaluationError(
                f"{source}:{pairs['line'].iat[first]}: image {pairs[column].iat[first]} has no "
                f"embedding ({manifest['status'].iat[row]}: {manifest['reason'].iat[row]})"
            )
        indices.append(vectors)
    return np.einsum("nd,nd->n", embeddings[indices[0]], embeddings[indices[1]])


def run(
    params: EvaluateParams,
    protocols_dir: Path,
    aligned_dir: Path,
    embeddings_dir: Path,
    out_dir: Path,
) -> VerificationReport:
    """Score the protocol's pairs and write metrics.json, roc.csv, scores.csv and the plots."""
    manifest = store.read_manifest(aligned_dir)
    embeddings, rows, _ = load_embeddings(embeddings_dir)
    threshold_file, scored_file = PROTOCOL_FILES[params.protocol]

    def scored(name: str) -> tuple[pd.DataFrame, np.ndarray]:
        path = _protocol_path(protocols_dir, name)
        pairs = read_pairs(path)
        return pairs, pair_scores(pairs, manifest, embeddings, rows, path)

    pairs, scores = scored(scored_file)
    same = pairs["same"].to_numpy(dtype=bool)
    threshold_scores = threshold_same = None
    if threshold_file is not None:
        threshold_pairs, threshold_scores = scored(threshold_file)
        threshold_same = threshold_pairs["same"].to_numpy(dtype=bool)
    report = verify(
        scores,
        same,
        pairs["fold"].to_numpy(),
        params.far_target,
        params.protocol,
        threshold_scores,
        threshold_same,
    )
    out_dir = Path(out_dir)
    roc = roc_curve(scores, same)
    # Each file appears whole under its name; metrics.json comes last, so it never describes
    # plots and tables that aren't there.
    with atomic_path(out_dir / ROC_FILE) as temp:
        roc.replace([np.inf], 1.0).to_csv(temp, index=False)
    with atomic_path(out_dir / SCORES_FILE) as temp:
        table = pairs.assign(score=scores)[["fold", "path1", "path2", "same", "score"]]
        table.to_csv(temp, index=False)
    with atomic_path(out_dir / ROC_PLOT) as temp:
        plot_roc(roc, report, temp)
    with atomic_path(out_dir / HISTOGRAM_PLOT) as temp:
        plot_score_histogram(scores, same, report.threshold, temp)
    write_json(out_dir / METRICS_FILE, asdict(report))
    logger.info(
        "%s: accuracy %.4f ± %.4f, AUC %.4f, EER %.4f over %d pairs",
        params.protocol,
        report.accuracy_mean,
        report.accuracy_std,
        report.auc,
        report.eer,
        report.pairs,
    )
    return report


def plot_roc(roc: pd.DataFrame, report: VerificationReport, path: Path) -> None:
    """ROC with a log-scale false accept axis, where verification systems are compared."""
    figure = Figure(figsize=(5, 4), dpi=120)
    axis = figure.subplots()
    floor = 1.0 / max(2 * report.pairs, 1)  # log axis: show FAR = 0 at a small positive value
    axis.plot(np.maximum(roc["fpr"], floor), roc["tpr"], lw=2)
    axis.set_xscale("log")
    axis.set_xlim(floor, 1.0)
    axis.set_ylim(0, 1.01)
    axis.set_xlabel("false accept rate")
    axis.set_ylabel("true accept rate")
    axis.set_title(f"{report.protocol}: AUC {report.auc:.4f}, acc {report.accuracy_mean:.4f}")
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")


def plot_score_histogram(scores: np.ndarray, same: np.ndarray, threshold: float, path: Path) -> None:
    """Cosine of matched vs mismatched pairs, with the chosen threshold."""
    figure = Figure(figsize=(5, 4), dpi=120)
    axis = figure.subplots()
    bins = np.linspace(-1, 1, 61)
    axis.hist(scores[same], bins=bins, alpha=0.6, label="same person")
    axis.hist(scores[~same], bins=bins, alpha=0.6, label="different people")
    axis.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3f}")
    axis.set_xlabel("cosine similarity")
    axis.set_ylabel("pairs")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def _protocol_path(protocols_dir: Path, name: str) -> Path:
    path = Path(protocols_dir) / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: protocol file not found; the download source set has no {name} "
            "(choose another evaluate.protocol or add the file to download.<dataset>)"
        )
    return path
