"""Verification metrics and the evaluate stage: cosine (or Joint Bayesian) scores, held-out thresholds,
ROC numbers, plots.

The protocol (which pairs, which model scores which fold, where thresholds come from) is arcface.protocol;
this module is the arithmetic: pure numpy/pandas in, a small dataclass out. Every threshold is chosen on
pairs other than the ones it scores, and the optimum is exact: every distinct score is a candidate.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from arcface import bayes, identification, plots
from arcface.config import EvaluateParams
from arcface.data import store
from arcface.embed import SCORED_BY_BAYES, VARIANTS, load_embeddings
from arcface.files import atomic_path, write_json
from arcface.protocol import ProtocolPlan, plan

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ROC_FILE = "roc.csv"
SCORES_FILE = "scores.csv"
FOLDS_FILE = "folds.csv"
ROC_PLOT = "roc.png"
HISTOGRAM_PLOT = "scores.png"
FOLDS_PLOT = "folds.png"
ANGLES_PLOT = "angles.png"
# Unscorable pairs get a score beyond every real one (2 for cosines in [-1, 1]; Joint Bayesian scores are
# unbounded, so past their largest magnitude), so every threshold counts them as errors.
_WORST = 2.0
IDENTIFICATION_FARS = (1e-2, 1e-1)  # open-set DIR reported at these false-alarm rates


class EvaluationError(ValueError):
    """A pair that can't be scored: the message names the protocol file, the line and the image."""


@dataclass(frozen=True)
class FoldResult:
    fold: int
    group: int  # the cross-training group, i.e. the model that scored this fold
    threshold: float
    accuracy: float
    pairs: int


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
    tar_at_far: dict[str, float]  # "0.001" -> true accept rate at that false accept rate
    # 95% Wilson interval of the accuracy over the scored pairs (thresholds held): how far another draw of
    # as many pairs could move it. None in metrics.json written before it was reported.
    accuracy_ci95: tuple[float, float] | None = None
    unscorable_pairs: int = 0
    folds: list[FoldResult] = field(default_factory=list)

    @property
    def fold_accuracies(self) -> list[float]:
        return [fold.accuracy for fold in self.folds]

    def summary(self) -> str:
        """Two lines for people: accuracy over folds, then the ROC numbers."""
        tars = ", ".join(f"TAR@FAR={far} {tar:.4f}" for far, tar in self.tar_at_far.items())
        unscorable = f", {self.unscorable_pairs} unscorable (counted wrong)" if self.unscorable_pairs else ""
        models = len({f.group for f in self.folds})
        by = f", {models} cross-trained models" if models > 1 else ""
        interval = ""
        if self.accuracy_ci95 is not None:
            low, high = self.accuracy_ci95
            interval = f" (95% interval over the pairs {low:.4f}-{high:.4f})"
        return (
            f"{self.protocol}: accuracy {self.accuracy_mean:.4f} ± {self.accuracy_std:.4f} over "
            f"{len(self.folds)} fold(s), {self.pairs} pairs{interval}{by}{unscorable}\n"
            f"  ROC AUC {self.auc:.4f}, EER {self.eer:.4f}, {tars}, threshold {self.threshold:.4f}"
        )

    def scalars(self) -> dict[str, float]:
        """The numbers, flat: for metrics.json's top level and MLflow."""
        flat = {
            "pairs": self.pairs,
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "threshold": self.threshold,
            "auc": self.auc,
            "eer": self.eer,
            "unscorable_pairs": self.unscorable_pairs,
        }
        if self.accuracy_ci95 is not None:
            flat["accuracy_ci95_low"], flat["accuracy_ci95_high"] = self.accuracy_ci95
        flat.update({f"tar_at_far_{far}": tar for far, tar in self.tar_at_far.items()})
        return flat


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


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `correct` / `total` (95% at z = 1.96).

    Unlike the plain ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and does not shrink to nothing when every
    pair is right, which on a few dozen pairs is common. It treats pairs as independent draws, which LFW's
    are not quite (a person appears in several pairs), so the true spread is a little wider."""
    if total <= 0:
        return 0.0, 1.0
    rate = correct / total
    spread = z * z / total
    centre = (rate + spread / 2) / (1 + spread)
    half = z * np.sqrt(rate * (1 - rate) / total + spread / (4 * total)) / (1 + spread)
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def scored_right(scores: np.ndarray, same: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """Which pairs a threshold (one, or one per pair) gets right: `same` exactly where score ≥ threshold."""
    return (scores >= threshold) == same.astype(bool)


def accuracy_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(np.mean(scored_right(scores, same, threshold)))


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


def roc_summary(roc: pd.DataFrame, far_targets: tuple[float, ...]) -> tuple[float, float, dict[str, float]]:
    """(AUC, equal error rate, {FAR: TAR at FAR ≤ that}) from a ROC table."""
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
    tars = {f"{far:g}": float(tpr[fpr <= far].max()) for far in far_targets}
    return auc, eer, tars


def verify(
    scores: np.ndarray,
    same: np.ndarray,
    folds: np.ndarray,
    far_targets: tuple[float, ...],
    protocol: str,
    groups: np.ndarray | None = None,
    threshold_scores: np.ndarray | None = None,
    threshold_same: np.ndarray | None = None,
    unscorable: np.ndarray | None = None,
) -> VerificationReport:
    """Accuracy with held-out thresholds: each fold's from the other folds of its group, or (view1) from
    a separate pair set. `unscorable` pairs take no part in choosing thresholds and count as errors in
    their fold; in the ROC they get the worst score, so they are errors at every threshold too."""
    same = same.astype(bool)
    groups = np.zeros(len(scores), dtype=int) if groups is None else groups
    unscorable = np.zeros(len(scores), dtype=bool) if unscorable is None else unscorable
    worst = worst_score(scores[~unscorable])
    scores = np.where(unscorable, np.where(same, -worst, worst), scores)
    results = []
    right = 0
    for fold in np.unique(folds):
        held = folds == fold
        group = int(groups[held][0])
        if threshold_scores is not None:
            threshold, _ = best_threshold(threshold_scores, threshold_same)
        else:
            choosing = ~held & (groups == group) & ~unscorable
            threshold, _ = best_threshold(scores[choosing], same[choosing])
        correct = scored_right(scores[held], same[held], threshold) & ~unscorable[held]
        right += int(correct.sum())
        results.append(FoldResult(int(fold), group, threshold, float(correct.mean()), int(held.sum())))
    auc, eer, tars = roc_summary(roc_curve(scores, same), far_targets)
    accuracies = [r.accuracy for r in results]
    return VerificationReport(
        protocol=protocol,
        pairs=len(scores),
        accuracy_mean=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        threshold=float(np.mean([r.threshold for r in results])),
        auc=auc,
        eer=eer,
        tar_at_far=tars,
        accuracy_ci95=wilson_interval(right, len(scores)),
        unscorable_pairs=int(unscorable.sum()),
        folds=results,
    )


def worst_score(scores: np.ndarray) -> float:
    """A score farther from every threshold than any of `scores`: what unscorable pairs get."""
    return max(_WORST, 1.0 + float(np.abs(scores[np.isfinite(scores)]).max(initial=0.0)))


def pair_rows(
    pairs: pd.DataFrame, manifest: pd.DataFrame, source: Path, policy: str = "wrong"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Manifest rows of each pair's two images, and which pairs can't be scored.

    An image missing from the store is always an error (the protocol and the data disagree). An image
    that is in the store but could not be read is `unscorable`: with policy `fail` an error, with `wrong`
    the pair is counted as an error by `verify` and reported, never silently dropped.
    """
    row_of_path = pd.Series(np.arange(len(manifest)), index=manifest["path"].to_numpy())
    usable = (manifest["status"] != "error").to_numpy()
    rows, unscorable = [], np.zeros(len(pairs), dtype=bool)
    for column in ("path1", "path2"):
        found = row_of_path.reindex(pairs[column].to_numpy())
        missing = found.isna().to_numpy()
        if missing.any():
            first = int(np.argmax(missing))
            raise EvaluationError(
                f"{source}:{pairs['line'].iat[first]}: image {pairs[column].iat[first]} is not in the "
                f"aligned store ({int(missing.sum())} pair images missing in all)"
            )
        column_rows = found.to_numpy(dtype=np.int64)
        bad = ~usable[column_rows]
        if bad.any() and policy == "fail":
            first = int(np.argmax(bad))
            row = column_rows[first]
            raise EvaluationError(
                f"{source}:{pairs['line'].iat[first]}: image {pairs[column].iat[first]} has no face to "
                f"score ({manifest['status'].iat[row]}: {manifest['reason'].iat[row]}); "
                "evaluate.unscorable: wrong counts such pairs as errors instead"
            )
        unscorable |= bad
        rows.append(column_rows)
    return rows[0], rows[1], unscorable


def scores_of_pairs(
    embeddings: np.ndarray,
    embedding_rows: np.ndarray,
    rows1: np.ndarray,
    rows2: np.ndarray,
    joint_bayesian: bool = False,
) -> np.ndarray:
    """Cosine of each pair from one model's (N, D) unit embeddings of manifest rows `embedding_rows`
    (with `joint_bayesian`: the Bayes vectors' log-likelihood ratio, bayes.pair_scores, instead);
    pairs touching a row without an embedding get NaN."""
    position = np.full(
        int(max(rows1.max(initial=0), rows2.max(initial=0), embedding_rows.max(initial=0))) + 1, -1
    )
    position[embedding_rows] = np.arange(len(embedding_rows))
    first, second = position[rows1], position[rows2]
    valid = (first >= 0) & (second >= 0)
    scores = np.full(len(rows1), np.nan)
    if joint_bayesian:
        scores[valid] = bayes.pair_scores(embeddings[first[valid]], embeddings[second[valid]])
    else:
        scores[valid] = np.einsum("nd,nd->n", embeddings[first[valid]], embeddings[second[valid]])
    return scores


@dataclass
class _Scored:
    """Scores of every scored pair (and view1's threshold pairs) under one embedding variant."""

    scores: np.ndarray
    threshold_scores: np.ndarray | None


def run(
    params: EvaluateParams,
    protocols_dir: Path,
    aligned_dir: Path,
    embeddings_dir: Path,
    out_dir: Path,
    models_dir: Path | None = None,
    seed: int = 0,
) -> VerificationReport:
    """Score the protocol's pairs with each group's model; write metrics.json, CSVs and plots."""
    protocol = plan(params, protocols_dir, seed)
    manifest = store.read_manifest(aligned_dir)
    rows1, rows2, unscorable = pair_rows(protocol.pairs, manifest, protocol.source, params.unscorable)
    threshold_rows = None
    if protocol.threshold_pairs is not None:
        threshold_rows = pair_rows(
            protocol.threshold_pairs, manifest, protocol.threshold_source, params.unscorable
        )
    groups = protocol.pairs["group"].to_numpy()
    same = protocol.pairs["same"].to_numpy(dtype=bool)
    info = load_embeddings(embeddings_dir, group=0)[2]
    primary = info["primary"]
    scored = {
        variant: _score(protocol, embeddings_dir, variant, rows1, rows2, threshold_rows)
        for variant in info.get("variants", VARIANTS)
    }
    reports = {}
    for variant, result in scored.items():
        _check_finite(result.scores, unscorable, embeddings_dir, variant)
        threshold_same = None
        if protocol.threshold_pairs is not None:
            threshold_same = protocol.threshold_pairs["same"].to_numpy(dtype=bool)
            threshold_unscorable = threshold_rows[2]
            worst = worst_score(result.threshold_scores[~threshold_unscorable])
            result.threshold_scores = np.where(
                threshold_unscorable, np.where(threshold_same, -worst, worst), result.threshold_scores
            )
        reports[variant] = verify(
            np.nan_to_num(result.scores),
            same,
            protocol.pairs["fold"].to_numpy(),
            params.far_targets,
            protocol.protocol,
            groups,
            result.threshold_scores,
            threshold_same,
            unscorable,
        )
    report = reports[primary]
    identified = None
    if models_dir is not None:
        identified = identification.evaluate_models(
            embeddings_dir, manifest, models_dir, IDENTIFICATION_FARS, primary
        )
    _write_outputs(Path(out_dir), protocol, scored, reports, primary, unscorable, models_dir, identified)
    logger.info("%s", report.summary())
    if report.unscorable_pairs:
        logger.warning(
            "%d pair(s) name an image that could not be read; they are counted as errors "
            "(see scores.csv, column unscorable)",
            report.unscorable_pairs,
        )
    return report


def _score(
    protocol: ProtocolPlan,
    embeddings_dir: Path,
    variant: str,
    rows1: np.ndarray,
    rows2: np.ndarray,
    threshold_rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
) -> _Scored:
    scores = np.full(len(rows1), np.nan)
    groups = protocol.pairs["group"].to_numpy()
    joint_bayesian = variant in SCORED_BY_BAYES
    for group in range(protocol.groups):
        vectors, embedding_rows, _ = load_embeddings(embeddings_dir, group=group, variant=variant)
        mine = groups == group
        scores[mine] = scores_of_pairs(vectors, embedding_rows, rows1[mine], rows2[mine], joint_bayesian)
    threshold_scores = None
    if threshold_rows is not None:  # view1: one model
        vectors, embedding_rows, _ = load_embeddings(embeddings_dir, group=0, variant=variant)
        threshold_scores = scores_of_pairs(
            vectors, embedding_rows, threshold_rows[0], threshold_rows[1], joint_bayesian
        )
    return _Scored(scores, threshold_scores)


def _check_finite(scores: np.ndarray, unscorable: np.ndarray, embeddings_dir: Path, variant: str) -> None:
    broken = ~np.isfinite(scores) & ~unscorable
    if broken.any():
        raise EvaluationError(
            f"{embeddings_dir}: {int(broken.sum())} pair score(s) are not finite with the {variant} "
            "embeddings (NaN or missing embeddings): re-run the embed stage, check the checkpoint"
        )


def _write_outputs(
    out_dir: Path,
    protocol: ProtocolPlan,
    scored: dict[str, _Scored],
    reports: dict[str, VerificationReport],
    primary: str,
    unscorable: np.ndarray,
    models_dir: Path | None,
    identified: dict[str, Any] | None = None,
) -> None:
    """Each file appears whole under its name; metrics.json comes last, so it never describes plots and
    tables that aren't there."""
    report = reports[primary]
    same = protocol.pairs["same"].to_numpy(dtype=bool)
    scores = np.nan_to_num(scored[primary].scores)
    curves = {f"{variant} ({'primary' if variant == primary else 'other'})": roc_curve(
        np.nan_to_num(scored[variant].scores), same) for variant in scored}  # fmt: skip
    roc = roc_curve(scores, same)
    folds = pd.DataFrame([asdict(f) for f in report.folds]).assign(
        model=lambda t: "group-" + t["group"].astype(str)
    )
    with atomic_path(out_dir / ROC_FILE) as temp:
        roc.replace([np.inf], 1.0).to_csv(temp, index=False)
    with atomic_path(out_dir / FOLDS_FILE) as temp:
        folds.to_csv(temp, index=False)
    with atomic_path(out_dir / SCORES_FILE) as temp:
        table = protocol.pairs[["fold", "group", "path1", "path2", "same"]].assign(
            **{f"score_{variant}": scored[variant].scores for variant in scored},
            unscorable=unscorable,
        )
        table.to_csv(temp, index=False)
    with atomic_path(out_dir / ROC_PLOT) as temp:
        title = f"{report.protocol}: AUC {report.auc:.4f}, accuracy {report.accuracy_mean:.4f}"
        plots.roc(curves, title, temp)
    with atomic_path(out_dir / HISTOGRAM_PLOT) as temp:
        if primary in SCORED_BY_BAYES:
            label = "Joint Bayesian score (log-likelihood ratio, standardized)"
            plots.score_histogram(scores[~unscorable], same[~unscorable], report.threshold, temp, label, None)
        else:
            plots.score_histogram(scores, same, report.threshold, temp)
    with atomic_path(out_dir / FOLDS_PLOT) as temp:
        plots.fold_accuracy(folds, report.accuracy_mean, temp, report.accuracy_ci95)
    angles = _training_angles(models_dir) if models_dir is not None else {}
    if angles:
        with atomic_path(out_dir / ANGLES_PLOT) as temp:
            plots.angle_distributions(angles, temp)
    metrics: dict[str, Any] = {
        "protocol": report.protocol,
        "groups": protocol.groups,
        "embedding": primary,
        **report.scalars(),
        **{f"with_{other}": reports[other].scalars() for other in reports if other != primary},
        "folds": [asdict(f) | {"model": f"group-{f.group}"} for f in report.folds],
    }
    if identified is not None:
        metrics["identification"] = identified
    write_json(out_dir / METRICS_FILE, metrics)


def _training_angles(models_dir: Path) -> dict[str, np.ndarray]:
    """Angles (degrees) of each group model's training faces to their class centres, if recorded."""
    from arcface.train import ANGLES_FILE

    found = {}
    for path in sorted(Path(models_dir).glob(f"group-*/{ANGLES_FILE}")):
        found[path.parent.name] = np.load(path)
    return found


def verify_bin_set(
    checkpoint: Path,
    path: Path,
    far_targets: tuple[float, ...] = (1e-3, 1e-2),
    batch_size: int = 128,
    embeddings: Path | None = None,
) -> dict[str, VerificationReport]:
    """Score an insightface .bin set with a trained model, flip TTA on and off, under the standard
    10-fold protocol (contiguous folds, as insightface splits them), so results compare with published
    tables; with `embeddings` (the model's embed-stage folder) also with the whole verifier (every trunk,
    the texture view, the Joint Bayesian model), as `verifier`. Only meaningful for a model that never
    trained on the set's people."""
    import torch

    from arcface.data.binsets import load_bin
    from arcface.device import autocast_dtype
    from arcface.embed import embed_variants
    from arcface.train import load_backbone
    from arcface.verifier import Verifier

    dataset = load_bin(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, payload = load_backbone(checkpoint, device)
    amp = autocast_dtype(payload["train_params"]["amp"], device)
    vectors = embed_variants(model.to(memory_format=torch.channels_last), dataset.faces, batch_size, amp)
    pairs = len(dataset.same)
    folds = np.arange(pairs) * 10 // pairs
    scores = {variant: np.einsum("nd,nd->n", v[0::2], v[1::2]) for variant, v in vectors.items()}
    if embeddings is not None:
        verifier = Verifier.of_run(Path(checkpoint).parent, embeddings, device)
        embedded = verifier.embed(dataset.faces, batch_size)
        scores["verifier"] = verifier.scores(embedded[0::2], embedded[1::2])
    return {
        variant: verify(values, dataset.same, folds, far_targets, f"{dataset.name} ({variant})")
        for variant, values in scores.items()
    }


def _interval(metrics: dict[str, Any]) -> tuple[float, float] | None:
    if metrics.get("accuracy_ci95_low") is None:
        return None
    return metrics["accuracy_ci95_low"], metrics["accuracy_ci95_high"]


def interval_text(metrics: dict[str, Any]) -> str:
    """metrics.json's (or a row's) accuracy interval as "low-high", or "-" where it was not reported."""
    interval = _interval(metrics)
    return "-" if interval is None else f"{interval[0]:.4f}-{interval[1]:.4f}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """metrics.json as the two summary lines (for the flow's command line)."""
    folds = [FoldResult(**{k: v for k, v in f.items() if k != "model"}) for f in metrics["folds"]]
    tars = {k.removeprefix("tar_at_far_"): v for k, v in metrics.items() if k.startswith("tar_at_far_")}
    report = VerificationReport(
        protocol=metrics["protocol"],
        pairs=metrics["pairs"],
        accuracy_mean=metrics["accuracy_mean"],
        accuracy_std=metrics["accuracy_std"],
        threshold=metrics["threshold"],
        auc=metrics["auc"],
        eer=metrics["eer"],
        tar_at_far=tars,
        accuracy_ci95=_interval(metrics),
        unscorable_pairs=metrics["unscorable_pairs"],
        folds=folds,
    )
    text = report.summary()
    found = metrics.get("identification")
    if found:
        text += "\n" + identification.format_summary(found)
    return text


def model_figures(metrics: dict[str, Any], model: str) -> dict[str, float] | None:
    """With cross-training (`groups` > 1), the accuracy over the pairs of the folds `model` scored and the
    mean of their thresholds; None for a run of one model, whose figures are the run's."""
    if int(metrics.get("groups", 1)) <= 1:
        return None
    folds = [fold for fold in metrics.get("folds", []) if fold.get("model") == model]
    pairs = sum(fold["pairs"] for fold in folds)
    if not pairs:
        return None
    return {
        "accuracy_mean": sum(fold["accuracy"] * fold["pairs"] for fold in folds) / pairs,
        "threshold": float(np.mean([fold["threshold"] for fold in folds])),
    }
