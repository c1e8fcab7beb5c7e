"""Joint Bayesian scoring: the exact Gaussian log-likelihood ratio, fit from faces, one score two ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from arcface import bayes
from arcface.evaluate import verify


def _log_density(x: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """log N(x; 0, covariance) of each row, by the textbook formula."""
    _, log_det = np.linalg.slogdet(covariance)
    mahalanobis = np.einsum("nd,de,ne->n", x, np.linalg.inv(covariance), x)
    return -0.5 * (mahalanobis + log_det + x.shape[1] * np.log(2 * np.pi))


def _people(
    rng: np.random.Generator, between: np.ndarray, within: np.ndarray, people: int, faces: int
) -> tuple[np.ndarray, np.ndarray]:
    """Faces drawn from the model: identity ~ N(0, between), plus N(0, within) per face."""
    size = len(between)
    identities = rng.multivariate_normal(np.zeros(size), between, size=people)
    labels = np.repeat(np.arange(people), faces)
    noise = rng.multivariate_normal(np.zeros(size), within, size=people * faces)
    return identities[labels] + noise, labels


def _covariances(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = rng.normal(size=(2, size, size))
    return a @ a.T / size + 0.5 * np.eye(size), b @ b.T / size + 0.2 * np.eye(size)


def test_the_score_is_the_gaussian_log_likelihood_ratio() -> None:
    rng = np.random.default_rng(0)
    between, within = _covariances(rng, 4)
    first, second = rng.normal(size=(2, 300, 4)) * 2
    total = between + within
    joint = np.block([[total, between], [between, total]])  # same person: identities shared
    exact = (
        _log_density(np.concatenate([first, second], axis=1), joint)
        - _log_density(first, total)
        - _log_density(second, total)
    )
    model = bayes.from_covariances(between, within)
    scores = bayes.pair_scores(model.vectors(first), model.vectors(second))
    # the paper's r drops the log-determinants and the factor 1/2: the same up to scale and shift
    slope, shift = np.polyfit(exact, scores, 1)
    assert slope == pytest.approx(2.0, rel=1e-4)
    assert np.abs(scores - (slope * exact + shift)).max() < 1e-3


def test_one_score_two_ways_and_save_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    between, within = _covariances(rng, 5)
    faces, labels = _people(rng, between, within, people=60, faces=4)
    model = bayes.fit(faces, labels, dims=5, shrink=0.0)
    vectors = model.vectors(faces)
    assert vectors.shape == (240, 6)
    grid = bayes.scores_against(vectors[:7], vectors[7:20])
    pairs = bayes.pair_scores(np.repeat(vectors[:7], 13, axis=0), np.tile(vectors[7:20], (7, 1)))
    assert np.allclose(grid.ravel(), pairs, atol=1e-9)
    model.save(tmp_path / "bayes.npz")
    assert np.array_equal(bayes.BayesModel.load(tmp_path / "bayes.npz").vectors(faces), vectors)


def test_fit_recovers_the_model_and_standardizes_impostors() -> None:
    rng = np.random.default_rng(2)
    between, within = _covariances(rng, 6)
    faces, labels = _people(rng, between, within, people=400, faces=6)
    fitted = bayes.fit(faces, labels, dims=6, shrink=0.0)
    true = bayes.from_covariances(between, within)
    probe, gallery = rng.normal(size=(2, 500, 6)) * 1.5
    got = bayes.pair_scores(fitted.vectors(probe), fitted.vectors(gallery))
    want = bayes.pair_scores(true.vectors(probe), true.vectors(gallery))
    assert np.corrcoef(got, want)[0, 1] > 0.99
    # standardized on the fit's own impostor pairs (same seed): mean 0, standard deviation 1
    draw = np.random.default_rng(0).integers(0, len(faces), size=(2, bayes.IMPOSTOR_PAIRS))
    draw = draw[:, labels[draw[0]] != labels[draw[1]]]
    vectors = fitted.vectors(faces)
    impostors = bayes.pair_scores(vectors[draw[0]], vectors[draw[1]])
    assert impostors.mean() == pytest.approx(0.0, abs=1e-5)
    assert impostors.std() == pytest.approx(1.0, rel=1e-5)


def test_it_beats_the_cosine_where_one_direction_is_mostly_noise() -> None:
    """People differ equally in every direction, but one direction also varies wildly within a person:
    the cosine is led astray by it, the Joint Bayesian model discounts it."""
    rng = np.random.default_rng(3)
    between = np.eye(8)
    within = np.diag([6.0] + [0.3] * 7)
    faces, labels = _people(rng, between, within, people=300, faces=5)
    model = bayes.fit(faces[:1000], labels[:1000], dims=8, shrink=0.0)  # the first 200 people
    test = faces[1000:]  # 100 unseen people, 5 faces each
    person = np.arange(100) * 5
    first = np.r_[person, person, person + 2]
    second = np.r_[person + 1, np.roll(person, 1) + 1, np.roll(person, 7) + 3]  # same, other, other
    same = np.r_[np.ones(100, bool), np.zeros(200, bool)]
    folds = np.arange(len(first)) % 10
    unit = test / np.linalg.norm(test, axis=1, keepdims=True)
    cosine = np.einsum("nd,nd->n", unit[first], unit[second])
    vectors = model.vectors(test)
    joint = bayes.pair_scores(vectors[first], vectors[second])
    cosine_auc = verify(cosine, same, folds, (1e-2,), "test").auc
    joint_auc = verify(joint, same, folds, (1e-2,), "test").auc
    assert joint_auc > cosine_auc + 0.05


def test_too_few_repeated_people_are_refused() -> None:
    faces = np.random.default_rng(4).normal(size=(5, 3))
    with pytest.raises(bayes.BayesError, match="at least 2 training people with 2\\+ faces \\(got 1 of 4"):
        bayes.fit(faces, np.array(["a", "a", "b", "c", "d"]), dims=3, shrink=0.1)


def test_the_identity_covariance_is_unbiased_with_two_face_and_single_face_people() -> None:
    """A mean of two faces spreads by S_b + S_w / 2: the naive covariance of the means overstates how
    people differ by half the within-person variation; the fit takes it out, and single faces (which
    spread by S_b + S_w) count as people too."""
    rng = np.random.default_rng(5)
    between, within = np.diag([1.0, 0.5, 2.0]), np.diag([1.5, 1.0, 0.5])
    pairs, pair_labels = _people(rng, between, within, people=6000, faces=2)
    singles, _ = _people(rng, between, within, people=6000, faces=1)
    faces = np.concatenate([pairs, singles])
    classes = np.concatenate([pair_labels, 6000 + np.arange(6000)])
    got_between, got_within = bayes.covariances(faces - faces.mean(axis=0), classes, shrink=0.0)
    assert np.abs(got_within - within).max() < 0.06
    assert np.abs(got_between - between).max() < 0.1
    means = pairs.reshape(6000, 2, 3).mean(axis=1)
    assert np.abs(np.cov(means.T) - between).max() > 0.6  # what the correction takes out: S_w / 2


def test_single_face_people_sharpen_a_model_of_few_repeated_people() -> None:
    rng = np.random.default_rng(6)
    between, within = _covariances(rng, 8)
    repeated, labels = _people(rng, between, within, people=20, faces=2)
    singles, _ = _people(rng, between, within, people=2000, faces=1)
    test, _ = _people(rng, between, within, people=300, faces=2)
    person = np.arange(300) * 2
    first, second = np.r_[person, person], np.r_[person + 1, np.roll(person, 1) + 1]
    same = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    folds = np.arange(600) % 10

    def auc(model: bayes.BayesModel) -> float:
        vectors = model.vectors(test)
        return verify(bayes.pair_scores(vectors[first], vectors[second]), same, folds, (1e-2,), "t").auc

    alone = bayes.fit(repeated, labels, dims=8, shrink=0.1)
    helped = bayes.fit(np.concatenate([repeated, singles]), np.r_[labels, 100 + np.arange(2000)], 8, 0.1)
    assert auc(helped) > auc(alone) + 0.01
