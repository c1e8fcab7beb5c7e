"""Blended training identities (arcface/data/blend.py)."""

from __future__ import annotations

import numpy as np
import pytest

from arcface.data.blend import blended_identities


def _people(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Faces whose every pixel holds a number unique to the face, labelled person by person."""
    labels = np.repeat(np.arange(len(counts)), counts)
    values = np.arange(len(labels), dtype=np.uint8) * 7
    faces = np.broadcast_to(values[:, None, None, None], (len(labels), 4, 4, 3)).copy()
    return faces, labels


def test_each_blend_is_the_mean_of_two_peoples_faces() -> None:
    faces, labels = _people([3, 2, 5, 4])
    blends, blend_labels = blended_identities(faces, labels, 4, count=4, max_faces=4, seed=1)
    assert sorted(set(blend_labels.tolist())) == [4, 5, 6, 7]  # after the four real people
    sources = {}
    for label in range(4, 8):
        members = blends[blend_labels == label]
        for face in members:
            value = int(face[0, 0, 0])
            assert (face == value).all()
            # the mean of one face of one person and one of another (rounded half up)
            matches = {
                (int(labels[i]), int(labels[j]))
                for i in range(len(faces))
                for j in range(len(faces))
                if labels[i] < labels[j]
                and (int(faces[i, 0, 0, 0]) + int(faces[j, 0, 0, 0]) + 1) // 2 == value
            }
            assert matches
        sources[label] = len(members)
    # as many faces as the larger of the two people has, capped at max_faces
    assert all(2 <= n <= 4 for n in sources.values())


def test_blends_are_distinct_pairs_and_seeded() -> None:
    faces, labels = _people([2, 2, 2])
    first = blended_identities(faces, labels, 3, count=3, max_faces=6, seed=0)
    again = blended_identities(faces, labels, 3, count=3, max_faces=6, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert len(first[1]) == 6  # three pairs (all there are), two faces each


def test_more_blends_than_pairs_is_refused() -> None:
    faces, labels = _people([2, 2, 2])
    with pytest.raises(ValueError, match="3 people make at most 3 pairs"):
        blended_identities(faces, labels, 3, count=4, max_faces=6, seed=0)


def test_no_blends() -> None:
    faces, labels = _people([2, 2])
    blends, blend_labels = blended_identities(faces, labels, 2, count=0, max_faces=6, seed=0)
    assert blends.shape == (0, 4, 4, 3) and blend_labels.shape == (0,)
