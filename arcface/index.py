"""FAISS index of face embeddings: build, save, load, and identity search.

Embeddings are L2-normalized, so inner product is cosine similarity and an exact `IndexFlatIP` returns
the most similar faces first. The labels table maps each index position to its identity and image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from arcface.config import IndexParams
from arcface.data import store
from arcface.embed import load_embeddings
from arcface.files import atomic_path, read_json, write_json

logger = logging.getLogger(__name__)

INDEX_FILE = "faces.faiss"
LABELS_FILE = "labels.parquet"
INFO_FILE = "index.json"


class IndexMismatchError(ValueError):
    """The index and the vectors searched with it come from different models or dimensions."""


@dataclass(frozen=True)
class Match:
    identity: str
    score: float  # cosine of the best-matching gallery face of this identity
    path: str  # that gallery face's image


@dataclass(frozen=True)
class FaceIndex:
    """A loaded index with its labels table and build description."""

    index: faiss.Index
    labels: pd.DataFrame  # position -> row, identity, path
    info: dict[str, Any]

    def search(self, queries: np.ndarray, k: int) -> list[list[Match]]:
        """The top-k identities for each (Q, D) query, best first, each with its best face."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise IndexMismatchError(
                f"query vectors have dimension {queries.shape[-1]}, the index {self.index.d}"
            )
        # An identity can hold many of the nearest faces; fetch enough neighbours to find k distinct.
        neighbours = min(self.index.ntotal, max(k * 20, 50))
        scores, positions = self.index.search(queries, neighbours)
        identities = self.labels["identity"].to_numpy()
        paths = self.labels["path"].to_numpy()
        results = []
        for query_scores, query_positions in zip(scores, positions, strict=True):
            matches: dict[str, Match] = {}
            for score, position in zip(query_scores, query_positions, strict=True):
                if position < 0 or len(matches) == k:
                    break
                name = identities[position]
                if name not in matches:
                    matches[name] = Match(str(name), float(score), str(paths[position]))
            results.append(list(matches.values()))
        return results


def build_index(vectors: np.ndarray) -> faiss.Index:
    """Exact inner-product index over (N, D) unit vectors."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def run(params: IndexParams, embeddings_dir: Path, aligned_dir: Path, out_dir: Path) -> FaceIndex:
    """Index every embedding and write the index, its labels table and index.json."""
    vectors, rows, embed_info = load_embeddings(embeddings_dir)
    manifest = store.read_manifest(aligned_dir)
    labels = pd.DataFrame(
        {
            "row": rows,
            "identity": manifest["identity"].to_numpy()[rows],
            "path": manifest["path"].to_numpy()[rows],
        }
    )
    index = build_index(vectors)
    info = {
        "type": params.type,
        "metric": "inner_product",
        "dimension": int(vectors.shape[1]),
        "count": int(index.ntotal),
        "checkpoint_sha256": embed_info["checkpoint_sha256"],
        "flip": embed_info["primary"] == "flip",
    }
    with atomic_path(out_dir, directory=True) as temp:
        faiss.write_index(index, str(temp / INDEX_FILE))
        labels.to_parquet(temp / LABELS_FILE, index=False)
        write_json(temp / INFO_FILE, info)
    logger.info("indexed %d faces of %d identities", index.ntotal, labels["identity"].nunique())
    return FaceIndex(index, labels, info)


def load_index(folder: Path) -> FaceIndex:
    """Read an index folder; a missing or damaged file is an error naming it."""
    folder = Path(folder)
    for name in (INDEX_FILE, LABELS_FILE, INFO_FILE):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name}: not found (run the index stage first)")
    try:
        index = faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError as err:
        raise ValueError(f"{folder / INDEX_FILE}: not a readable FAISS index ({err})") from err
    labels = pd.read_parquet(folder / LABELS_FILE)
    if len(labels) != index.ntotal:
        raise ValueError(
            f"{folder}: the index holds {index.ntotal} vectors but {LABELS_FILE} {len(labels)} rows"
        )
    return FaceIndex(index, labels, read_json(folder / INFO_FILE))
