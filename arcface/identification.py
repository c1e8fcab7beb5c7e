"""Identification (1:N search) metrics on identities the scoring model never trained on.

For the faces of such identities: the gallery holds the first face of every identity with at least two
faces; their other faces are mated probes (closed set: is the right identity ranked 1st, or in the top
5?). Faces of identities with one face are non-mated probes: nobody in the gallery is them. Open set, the
DIR (detection and identification rate) at a false-alarm rate F: the threshold is set so that a share F
of the non-mated probes score above it, and DIR is the share of mated probes that are ranked 1st *and*
score above it.

With cross-training, model g is scored on the identities it never saw, and the totals add the groups'
probes. Pure numpy: galleries here hold thousands of identities, so an exact matrix product is both the
reference and fast enough.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from arcface import bayes
from arcface.files import read_json

logger = logging.getLogger(__name__)

RANKS = (1, 5)


@dataclass(frozen=True)
class IdentificationResult:
    """Counts and hits of one gallery/probe experiment; rates are derived, so results add up."""

    gallery: int
    mated_probes: int
    nonmated_probes: int
    hits_at_rank: dict[int, int]  # rank -> mated probes whose identity is within that rank
    detected_at_far: dict[float, int]  # FAR -> mated probes ranked 1st and above that FAR's threshold
    thresholds: dict[float, float] = field(default_factory=dict)
    # FAR -> mated probes that DIR counts over: those of experiments with non-mated probes (no threshold
    # can be set without them), so a total over models never dilutes DIR with undetectable probes
    dir_probes: dict[float, int] = field(default_factory=dict)

    def rate(self, hits: int, probes: int | None = None) -> float | None:
        probes = self.mated_probes if probes is None else probes
        return hits / probes if probes else None

    def summary(self) -> dict[str, Any]:
        """The metrics.json form: rank-k rates, DIR at each FAR, and the counts behind them."""
        out: dict[str, Any] = {f"rank{k}": self.rate(v) for k, v in self.hits_at_rank.items()}
        out |= {
            f"dir_at_far_{far:g}": self.rate(v, self.dir_probes.get(far, 0))
            for far, v in self.detected_at_far.items()
        }
        out |= {f"threshold_at_far_{far:g}": t for far, t in self.thresholds.items()}
        out |= {k: v for k, v in asdict(self).items() if k in ("gallery", "mated_probes", "nonmated_probes")}
        return out


def split_gallery(identities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of (gallery faces, mated probes, non-mated probes) among `identities` (one per face,
    in a fixed order): the first face of each identity with ≥ 2 faces enrols it."""
    table = pd.DataFrame({"identity": identities})
    counts = table.groupby("identity")["identity"].transform("size").to_numpy()
    first = ~table.duplicated("identity").to_numpy()
    positions = np.arange(len(identities))
    return positions[first & (counts > 1)], positions[~first], positions[counts == 1]


def identify(
    vectors: np.ndarray,
    identities: np.ndarray,
    far_targets: tuple[float, ...] = (1e-2,),
    ranks: tuple[int, ...] = RANKS,
    joint_bayesian: bool = False,
) -> IdentificationResult:
    """Closed- and open-set identification over (N, D) unit vectors of faces with these identities
    (scored by their cosine, or with `joint_bayesian` Bayes vectors by bayes.scores_against)."""
    identities = np.asarray(identities)
    gallery, mated, nonmated = split_gallery(identities)
    if len(gallery) == 0:
        return IdentificationResult(0, len(mated), len(nonmated), dict.fromkeys(ranks, 0), {}, {})

    def against_gallery(probes: np.ndarray) -> np.ndarray:  # (P, G) scores
        if joint_bayesian:
            return bayes.scores_against(vectors[probes], vectors[gallery])
        return vectors[probes].astype(np.float64) @ vectors[gallery].astype(np.float64).T

    gallery_names = identities[gallery]
    mated_scores = against_gallery(mated)  # (M, G)
    column = {name: position for position, name in enumerate(gallery_names)}
    truth = np.array([column[name] for name in identities[mated]], dtype=np.int64)  # (M,) own identity
    true_scores = mated_scores[np.arange(len(mated)), truth]
    # Rank of the true identity: 1 + how many gallery identities score strictly higher.
    rank = 1 + (mated_scores > true_scores[:, None]).sum(axis=1)
    hits = {k: int((rank <= k).sum()) for k in ranks}
    detected, thresholds, dir_probes = {}, {}, {}
    if len(nonmated):
        impostor_best = against_gallery(nonmated).max(axis=1)
        descending = np.sort(impostor_best)[::-1]
        best_mated = true_scores  # a rank-1 probe's top score is its own identity's
        for far in far_targets:
            allowed = int(np.floor(far * len(descending)))  # false alarms the rate permits
            threshold = float(descending[min(allowed, len(descending) - 1)])
            thresholds[far] = threshold
            detected[far] = int(((rank == 1) & (best_mated > threshold)).sum())
            dir_probes[far] = len(mated)
    return IdentificationResult(
        len(gallery), len(mated), len(nonmated), hits, detected, thresholds, dir_probes
    )


def combine(results: list[IdentificationResult]) -> IdentificationResult:
    """Totals over several models' experiments (thresholds stay per model, so they are not combined)."""
    ranks = sorted({k for r in results for k in r.hits_at_rank})
    fars = sorted({far for r in results for far in r.detected_at_far})
    return IdentificationResult(
        gallery=sum(r.gallery for r in results),
        mated_probes=sum(r.mated_probes for r in results),
        nonmated_probes=sum(r.nonmated_probes for r in results),
        hits_at_rank={k: sum(r.hits_at_rank.get(k, 0) for r in results) for k in ranks},
        detected_at_far={far: sum(r.detected_at_far.get(far, 0) for r in results) for far in fars},
        dir_probes={far: sum(r.dir_probes.get(far, 0) for r in results) for far in fars},
    )


def evaluate_models(
    embeddings_dir: Path,
    manifest: pd.DataFrame,
    models_dir: Path,
    far_targets: tuple[float, ...],
    variant: str,
) -> dict[str, Any] | None:
    """Each model's identification experiment on the identities it never trained on (from its
    split.json), and the totals; None when the models folder doesn't say what they trained on."""
    from arcface.embed import SCORED_BY_BAYES, load_embeddings
    from arcface.train import SPLIT_FILE, group_dirs

    folders = group_dirs(models_dir)
    if not all((folder / SPLIT_FILE).exists() for folder in folders):
        logger.warning("%s: no %s; identification metrics skipped", models_dir, SPLIT_FILE)
        return None
    per_model = []
    for group, folder in enumerate(folders):
        vectors, rows, _ = load_embeddings(embeddings_dir, group=group, variant=variant)
        trained = set(read_json(folder / SPLIT_FILE)["identities"])
        names = manifest["identity"].to_numpy()[rows]
        unseen = ~np.isin(names, list(trained))
        per_model.append(
            identify(vectors[unseen], names[unseen], far_targets, joint_bayesian=variant in SCORED_BY_BAYES)
        )
    total = combine(per_model)
    logger.info(
        "identification: rank-1 %s, rank-5 %s over %d mated and %d non-mated probes",
        _percent(total.rate(total.hits_at_rank[1])),
        _percent(total.rate(total.hits_at_rank[5])),
        total.mated_probes,
        total.nonmated_probes,
    )
    return total.summary() | {
        "models": [{"model": f.name, **r.summary()} for f, r in zip(folders, per_model, strict=True)]
    }


def format_summary(found: dict[str, Any]) -> str:
    """metrics.json's identification block as one line for people."""
    dirs = ", ".join(
        f"DIR@FAR={key.removeprefix('dir_at_far_')} {_percent(value)}"
        for key, value in found.items()
        if key.startswith("dir_at_far_")
    )
    rates = ", ".join(part for part in (f"rank-1 {_percent(found['rank1'])}", f"rank-5 "
                      f"{_percent(found['rank5'])}", dirs) if part)  # fmt: skip
    return (
        f"  identification: {rates} ({found['gallery']} enrolled, {found['mated_probes']} mated and "
        f"{found['nonmated_probes']} non-mated probes)"
    )


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"
