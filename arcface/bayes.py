"""Joint Bayesian scoring of embeddings (Chen et al., "Bayesian face revisited", ECCV 2012).

A face's vector is modelled as x = μ + ε: a person's identity μ ~ N(0, S_b) plus a within-person
variation ε ~ N(0, S_w), both Gaussian. The log-likelihood ratio of "same person" against "different
people" for a pair is then, up to a constant,

    r(x1, x2) = x1ᵀ A x1 + x2ᵀ A x2 − 2 x1ᵀ G x2,
    F = S_w⁻¹,  G = −(2 S_b + S_w)⁻¹ S_b S_w⁻¹,  A = (S_b + S_w)⁻¹ − (F + G).

Why: unlike a cosine, it weighs each direction by how much people differ in it against how much one
person varies in it, and its self terms penalize faces that sit far out. On View 1 the fused
(network + texture) vectors gain about a point with it (README, "Model quality").

The score is not a cosine, but it splits into an inner product plus one bias per face: with
−G = L Lᵀ, r = (√2 Lᵀx1)·(√2 Lᵀx2) + x1ᵀAx1 + x2ᵀAx2. So each face gets one "Bayes vector"
u = [√2 Lᵀx, xᵀAx] and a pair scores u1[:-1]·u2[:-1] + u1[-1] + u2[-1]. The vectors are rescaled so that
scores over impostor pairs of the training faces have mean 0 and standard deviation 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMPOSTOR_PAIRS = 4_000  # random different-person pairs of training faces that standardize the scores


class BayesError(ValueError):
    """The training faces can't support a Joint Bayesian model."""


@dataclass
class BayesModel:
    """PCA to the model's dimensions, then the Joint Bayesian matrices, as one map to Bayes vectors."""

    mean: np.ndarray  # (D,) of the input vectors
    basis: np.ndarray  # (D, k) PCA directions
    cross: np.ndarray  # (k, k) L·√2, where −G = L Lᵀ, scaled by 1/√spread
    quadratic: np.ndarray  # (k, k) A / spread
    offset: float = 0.0  # half the impostor pairs' mean score, subtracted from each face's bias

    def vectors(self, inputs: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, k + 1) Bayes vectors: k inner-product columns, then the bias."""
        reduced = (inputs.astype(np.float64) - self.mean) @ self.basis
        bias = np.einsum("nd,de,ne->n", reduced, self.quadratic, reduced) - self.offset
        return np.concatenate([reduced @ self.cross, bias[:, None]], axis=1).astype(np.float32)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            mean=self.mean,
            basis=self.basis,
            cross=self.cross,
            quadratic=self.quadratic,
            offset=np.array(self.offset),
        )

    @classmethod
    def load(cls, path: Path) -> BayesModel:
        with np.load(path) as data:
            return cls(data["mean"], data["basis"], data["cross"], data["quadratic"], float(data["offset"]))


def pair_scores(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Joint Bayesian log-likelihood ratios (standardized) of row-aligned (N, k + 1) Bayes vectors."""
    inner = np.einsum("nd,nd->n", first[:, :-1].astype(np.float64), second[:, :-1].astype(np.float64))
    return inner + first[:, -1] + second[:, -1]


def scores_against(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, G) scores of every query against every gallery Bayes vector."""
    inner = queries[:, :-1].astype(np.float64) @ gallery[:, :-1].astype(np.float64).T
    return inner + queries[:, -1:].astype(np.float64) + gallery[:, -1].astype(np.float64)


def matrices(between: np.ndarray, within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The A and G of the log-likelihood ratio for identity covariance `between`, variation `within`."""
    inverse_within = np.linalg.inv(within)
    cross = -np.linalg.solve(2 * between + within, between @ inverse_within)
    quadratic = np.linalg.inv(between + within) - (inverse_within + cross)
    # symmetric in exact arithmetic; symmetrize the rounding away so eigh sees a symmetric matrix
    return (quadratic + quadratic.T) / 2, (cross + cross.T) / 2


def from_covariances(between: np.ndarray, within: np.ndarray) -> BayesModel:
    """A model of known covariances in the inputs' own coordinates (no PCA, no standardizing)."""
    quadratic, cross = matrices(between, within)
    values, axes = np.linalg.eigh(-cross)  # −G is positive semi-definite
    factor = axes * np.sqrt(np.clip(values, 0.0, None))
    size = len(between)
    return BayesModel(np.zeros(size), np.eye(size), factor * np.sqrt(2.0), quadratic)


def fit(inputs: np.ndarray, labels: np.ndarray, dims: int, shrink: float, seed: int = 0) -> BayesModel:
    """Fit on `inputs` (N, D) of the people in `labels`: PCA to `dims` (capped by the faces and D), the
    within-person covariance from people with 2+ faces, shrunk by `shrink` toward its mean variance (a
    sample covariance of a few thousand faces is noisy in its small directions, which the inverse would
    blow up), the identity covariance from every person's mean; then standardized on impostor pairs.

    People with a single face help too: they say nothing about within-person variation, but each is one
    more draw of how people differ. A person's mean of n faces spreads by S_b + S_w / n, so the identity
    covariance is the means' covariance less S_w times the mean of 1/n (unbiased where most people have
    two faces, whose means carry half of S_w)."""
    names, classes = np.unique(labels, return_inverse=True)
    sizes = np.bincount(classes)
    repeated = sizes >= 2
    if repeated.sum() < 2:
        raise BayesError(
            f"the Joint Bayesian model needs at least 2 training people with 2+ faces (got "
            f"{int(repeated.sum())} of {len(names)} people)"
        )
    data = inputs.astype(np.float64)
    mean = data.mean(axis=0)
    dims = min(dims, len(data) - 1, data.shape[1])
    _, _, rows = np.linalg.svd(data - mean, full_matrices=False)
    basis = rows[:dims].T
    reduced = (data - mean) @ basis
    between, within = covariances(reduced, classes, shrink)
    model = from_covariances(between, within)
    model = BayesModel(mean, basis, model.cross, model.quadratic)
    _standardize(model, model.vectors(inputs), labels, seed)
    return model


def covariances(reduced: np.ndarray, classes: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """The identity (between) and within-person covariances of centred vectors `reduced` (N, k) of the
    people numbered `classes` (0..P-1, every number present), the within one shrunk by `shrink`."""
    sizes = np.bincount(classes)
    dims = reduced.shape[1]
    centroids = np.zeros((len(sizes), dims))
    np.add.at(centroids, classes, reduced)
    centroids /= sizes[:, None]
    within_offsets = reduced - centroids[classes]
    # degrees of freedom: a person of n faces varies in n - 1 of them (single faces in none)
    within = within_offsets.T @ within_offsets / (len(reduced) - len(sizes))
    within = (1 - shrink) * within + shrink * np.trace(within) / dims * np.eye(dims)
    identities = centroids - centroids.mean(axis=0)
    between = identities.T @ identities / len(identities) - within * np.mean(1.0 / sizes)
    return _positive_definite(between), within


def _positive_definite(covariance: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """The covariance with eigenvalues raised to `floor` times the largest: subtracting the means' own
    noise can leave a few of the smallest directions slightly negative."""
    values, axes = np.linalg.eigh(covariance)
    return (axes * np.clip(values, floor * values.max(), None)) @ axes.T


def _standardize(model: BayesModel, vectors: np.ndarray, labels: np.ndarray, seed: int) -> None:
    """Rescale so that impostor pairs of the training faces score mean 0, standard deviation 1."""
    rng = np.random.default_rng(seed)
    first, second = rng.integers(0, len(vectors), size=(2, IMPOSTOR_PAIRS))
    different = labels[first] != labels[second]
    scores = pair_scores(vectors[first[different]], vectors[second[different]])
    spread = float(max(scores.std(), 1e-12))
    model.cross /= np.sqrt(spread)
    model.quadratic /= spread
    model.offset = float(scores.mean()) / 2 / spread
