"""A second, hand-made view of each face to fuse with the network's: multi-scale uniform-LBP histograms,
projected by PCA then LDA fit on the training people, and fused with the network's embedding.

Why: on LFW-scale data the network and the texture descriptor err on different pairs. Alone the texture
view is a classic (LFW's "no outside data" results of 87-89% are descriptors of this kind); fused with
the network's cosine it lifts View 1 accuracy by 3.5 points (README, "Model quality").

The fusion is a weighted sum of the two cosines, each divided by its spread (standard deviation) over
impostor pairs of training faces, which is the same as the cosine of one concatenated vector
[e_net / sqrt(s_net), e_tex / sqrt(s_tex)], renormalized: so the fused embedding is an ordinary unit
vector that evaluate, the index and search use unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

logger = logging.getLogger(__name__)

SCALES = (112, 80, 56)  # face sizes the histograms are taken at (area-downsampled)
RADII = (1, 2, 3)  # LBP neighbour distances in pixels
GRID = 7  # cells per side at every scale
BINS = 59  # 58 uniform patterns (at most 2 bit transitions) + 1 for all others
MEMORY_FACES = 60_000  # up to this many faces (~4 GiB of descriptors) are described once and kept
MAX_FIT_FACES = 20_000  # PCA + LDA are fit on at most this many training faces (a seeded sample)
IMPOSTOR_PAIRS = 4_000  # random different-person pairs of training faces that measure each view's spread
GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class TextureError(ValueError):
    """The texture model can't be fit on these training faces."""


def _uniform_bins() -> np.ndarray:
    """The histogram bin of each of the 256 8-bit LBP codes."""
    table = np.full(256, BINS - 1, dtype=np.int64)
    label = 0
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        if sum(bits[i] != bits[(i + 1) % 8] for i in range(8)) <= 2:
            table[code] = label
            label += 1
    return table


UNIFORM = _uniform_bins()


def lbp_bins(grey: np.ndarray, radius: int) -> np.ndarray:
    """Uniform-LBP bin of every pixel at least `radius` from the border: (N, H, W) -> (N, H-2r, W-2r)."""
    r = radius
    centre = grey[:, r:-r, r:-r]
    height, width = centre.shape[1:]
    code = np.zeros(centre.shape, dtype=np.int64)
    # the 8 neighbours in circular order, so "uniform" (few 0/1 transitions) means edges, corners, spots
    neighbours = [(-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r)]
    for bit, (dy, dx) in enumerate(neighbours):
        neighbour = grey[:, r + dy : r + dy + height, r + dx : r + dx + width]
        code |= (neighbour >= centre).astype(np.int64) << bit
    return UNIFORM[code]


def cell_histograms(bins: np.ndarray, grid: int = GRID) -> np.ndarray:
    """Normalized BINS-bin histograms over a grid x grid tiling: (N, H, W) -> (N, grid² * BINS)."""
    count, height, width = bins.shape
    rows = np.minimum(np.arange(height) * grid // height, grid - 1)
    cols = np.minimum(np.arange(width) * grid // width, grid - 1)
    cell = rows[:, None] * grid + cols[None, :]
    flat = (cell[None] * BINS + bins).reshape(count, -1)
    flat = flat + (np.arange(count) * grid * grid * BINS)[:, None]
    hist = np.bincount(flat.ravel(), minlength=count * grid * grid * BINS).astype(np.float32)
    hist = hist.reshape(count, grid * grid, BINS)
    return (hist / hist.sum(axis=2, keepdims=True)).reshape(count, -1)


def _descriptors_of(grey: np.ndarray) -> np.ndarray:
    parts = []
    for size in SCALES:
        scaled = grey
        if size != grey.shape[1]:
            scaled = F.interpolate(torch.from_numpy(grey)[:, None], size=(size, size), mode="area")
            scaled = scaled[:, 0].numpy()
        parts.extend(cell_histograms(lbp_bins(scaled, radius)) for radius in RADII)
    # square root: histogram bins compared by the Hellinger distance, which suits counts better than L2
    return np.sqrt(np.concatenate(parts, axis=1))


def descriptors(faces: np.ndarray, chunk: int = 256, progress: bool = False) -> np.ndarray:
    """(N, 112, 112, 3) uint8 faces -> (N, D) float32 LBP descriptors, averaged with the mirror image's."""
    out = []
    starts = range(0, len(faces), chunk)
    for start in tqdm(starts, desc="texture", unit="chunk", disable=None if progress else True):
        grey = np.asarray(faces[start : start + chunk], dtype=np.float32) @ GREY
        mirrored = np.ascontiguousarray(grey[:, :, ::-1])
        out.append((_descriptors_of(grey) + _descriptors_of(mirrored)) / 2)
    return np.concatenate(out) if out else np.zeros((0, descriptor_size()), dtype=np.float32)


def descriptor_size() -> int:
    return len(SCALES) * len(RADII) * GRID * GRID * BINS


def fits_in_memory(faces: int) -> bool:
    """Whether every face's descriptor can be kept at once (else they are projected chunk by chunk)."""
    return faces <= MEMORY_FACES


@dataclass
class TextureModel:
    """PCA + LDA projection of LBP descriptors, and the impostor spreads that weigh the fusion."""

    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D, k): PCA basis times LDA directions
    network_spreads: tuple[float, ...] = (1.0,)  # one per network view (one per trunk)
    texture_spread: float = 1.0

    def project(self, descriptors: np.ndarray) -> np.ndarray:
        """(N, D) descriptors -> (N, k) unit vectors."""
        vectors = (descriptors - self.mean) @ self.projection
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def fuse(self, networks: list[np.ndarray], texture: np.ndarray) -> np.ndarray:
        """Unit vectors whose cosine is (sum of cos_net_i / s_net_i + cos_tex / s_tex), rescaled: each view
        weighed by its spread over impostor pairs, so none drowns the others."""
        if len(networks) != len(self.network_spreads):
            raise ValueError(
                f"the texture model weighs {len(self.network_spreads)} network view(s), got {len(networks)}"
            )
        views = [view / np.sqrt(spread) for view, spread in zip(networks, self.network_spreads, strict=True)]
        fused = np.concatenate([*views, texture / np.sqrt(self.texture_spread)], axis=1)
        return (fused / np.linalg.norm(fused, axis=1, keepdims=True)).astype(np.float32)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            mean=self.mean,
            projection=self.projection,
            spreads=np.array([*self.network_spreads, self.texture_spread]),
        )

    @classmethod
    def load(cls, path: Path) -> TextureModel:
        with np.load(path) as data:
            spreads = [float(spread) for spread in data["spreads"]]
            return cls(data["mean"], data["projection"], tuple(spreads[:-1]), spreads[-1])


def fit(descriptors: np.ndarray, labels: np.ndarray, pca_dims: int, lda_dims: int) -> TextureModel:
    """PCA to `pca_dims`, then LDA to `lda_dims` directions that best separate the people in `labels`
    (each capped by what the faces allow: PCA below the face count, LDA below the people count)."""
    names, classes = np.unique(labels, return_inverse=True)
    sizes = np.bincount(classes)
    if len(names) < 2 or (sizes >= 2).sum() == 0:
        raise TextureError(
            f"the texture model needs at least 2 training people and one with 2+ faces (got {len(names)} "
            f"people, {int((sizes >= 2).sum())} with 2+ faces)"
        )
    pca_dims = min(pca_dims, len(descriptors) - 1, descriptors.shape[1])
    lda_dims = min(lda_dims, len(names) - 1, pca_dims)
    mean = descriptors.mean(axis=0)
    centred = torch.from_numpy(descriptors - mean)
    torch.manual_seed(0)  # the randomized SVD's sketch: the same faces give the same model
    _, _, basis = torch.svd_lowrank(centred, q=pca_dims, niter=4)
    reduced = (centred @ basis).double().numpy()  # (N, pca_dims)
    centroids = np.zeros((len(names), reduced.shape[1]))
    np.add.at(centroids, classes, reduced)
    centroids /= sizes[:, None]
    within = reduced - centroids[classes]
    scatter_within = within.T @ within / len(reduced)
    # a touch of ridge: directions no person varies in would otherwise get infinite weight
    scatter_within += 1e-6 * np.trace(scatter_within) / len(scatter_within) * np.eye(len(scatter_within))
    spread = centroids - reduced.mean(axis=0)
    scatter_between = (spread * sizes[:, None]).T @ spread / len(reduced)
    # Sb v = λ Sw v, solved through Sw^(-1/2): whiten the within-person scatter, then take Sb's axes
    values, vectors = np.linalg.eigh(scatter_within)
    whiten = vectors / np.sqrt(values)
    between_values, between_vectors = np.linalg.eigh(whiten.T @ scatter_between @ whiten)
    directions = whiten @ between_vectors[:, np.argsort(between_values)[::-1][:lda_dims]]
    projection = (basis.double().numpy() @ directions).astype(np.float32)
    return TextureModel(mean.astype(np.float32), projection)


def project_faces(
    model: TextureModel, faces: np.ndarray, chunk: int = 4096, progress: bool = False
) -> np.ndarray:
    """Texture vectors of many faces, a chunk of descriptors at a time (bounded memory)."""
    starts = range(0, len(faces), chunk)
    parts = [
        model.project(descriptors(faces[start : start + chunk])).astype(np.float32)
        for start in tqdm(starts, desc="texture", unit="chunk", disable=None if progress else True)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, model.projection.shape[1]), np.float32)


def impostor_spread(vectors: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Standard deviation of the cosine over random pairs of unit vectors of different people."""
    rng = np.random.default_rng(seed)
    first, second = rng.integers(0, len(vectors), size=(2, IMPOSTOR_PAIRS))
    different = labels[first] != labels[second]
    cosines = np.einsum("nd,nd->n", vectors[first[different]], vectors[second[different]])
    return float(max(cosines.std(), 1e-6))


def fit_rows(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Positions of the faces to fit on: all of them, or a seeded sample of MAX_FIT_FACES."""
    if len(labels) <= MAX_FIT_FACES:
        return np.arange(len(labels))
    logger.info("texture model fit on a sample of %d of %d training faces", MAX_FIT_FACES, len(labels))
    return np.sort(np.random.default_rng(seed).choice(len(labels), MAX_FIT_FACES, replace=False))
