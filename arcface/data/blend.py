"""Synthetic training identities: each the pixel average of two training people's aligned faces.

Why: on LFW alone the number of people, not the trunk or the loss, limits accuracy (README, "Where this
stands": each doubling of the training people gains ~2.4 points). Faces aligned to one 5-point template
blend into plausible faces of a third person, and pairing the k-th face of one person with the k-th of the
other keeps both people's pose, light and expression changes inside the new identity. The blends are made
once, before training, from the training faces only (never a scored person).
"""

from __future__ import annotations

import numpy as np


def blended_identities(
    faces: np.ndarray, labels: np.ndarray, num_classes: int, count: int, max_faces: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` new identities, labelled after the `num_classes` existing ones (from num_classes on).

    Each is a distinct random pair of training people; its k-th face (k < min(max(n_a, n_b), max_faces))
    is the average of person a's and person b's faces at positions k mod n_a and k mod n_b of a seeded
    shuffle of each. Returns (M, 112, 112, 3) uint8 faces and (M,) int64 labels.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if count <= 0:
        return np.zeros((0, *faces.shape[1:]), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    if num_classes < 2:
        raise ValueError("blending identities needs at least two training people")
    most_pairs = num_classes * (num_classes - 1) // 2
    if count > most_pairs:
        raise ValueError(
            f"train.blend_identities={count}: {num_classes} people make at most {most_pairs} pairs"
        )
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == label) for label in range(num_classes)]
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < count:
        first, second = sorted(rng.choice(num_classes, size=2, replace=False).tolist())
        pairs.add((first, second))
    new_faces, new_labels = [], []
    for offset, (first, second) in enumerate(sorted(pairs)):
        a, b = rng.permutation(members[first]), rng.permutation(members[second])
        n = min(max(len(a), len(b)), max_faces)
        k = np.arange(n)
        # uint16 sum then halve: the rounded mean of the two pixels without float copies
        mean = (faces[a[k % len(a)]].astype(np.uint16) + faces[b[k % len(b)]] + 1) // 2
        new_faces.append(mean.astype(np.uint8))
        new_labels.append(np.full(n, num_classes + offset, dtype=np.int64))
    return np.concatenate(new_faces), np.concatenate(new_labels)
