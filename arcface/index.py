"""FAISS index of face embeddings: build, save, load, and identity search.

Embeddings are L2-normalized, so inner product is cosine similarity and an exact `IndexFlatIP` returns
the most similar faces first. The labels table maps each index position to its identity and image.

Joint Bayesian vectors (embed.bayes) are indexed as they are: a gallery vector is [inner part, bias] and
the query's bias column is set to 1, so the inner product is the pair's score less the query's own bias,
which is the same for every gallery face and is added back to the scores returned.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from arcface import bayes
from arcface.config import IndexParams
from arcface.data import store
from arcface.embed import BAYES_FILE, SCORED_BY_BAYES, TEXTURE_FILE, load_embeddings
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
    score: float  # cosine (or Joint Bayesian score) of the best-matching gallery face of this identity
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
        if self.info.get("embedding") in SCORED_BY_BAYES:
            searched = queries.copy()
            searched[:, -1] = 1.0  # picks up each gallery face's bias
            scores, positions = self.index.search(searched, neighbours)
            scores = scores + queries[:, -1:]  # the query's own bias
        else:
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


def faiss_has_gpu() -> bool:
    """True when this faiss build has GPU support and sees a GPU (faiss-gpu on a CUDA machine)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def use_gpu(device: str, kind: str) -> bool:
    """Whether to build/search on the GPU: `auto` takes it when there, `cuda` insists (HNSW has none)."""
    if device == "cpu" or kind == "hnsw":
        if device == "cuda" and kind == "hnsw":
            logger.warning("faiss has no GPU HNSW index: building it on the CPU")
        return False
    if device == "cuda" and not faiss_has_gpu():
        raise RuntimeError("index.device is cuda but faiss sees no GPU (install faiss-gpu, not faiss-cpu)")
    return faiss_has_gpu()


def ivf_sizes(params: IndexParams, count: int) -> tuple[int, int]:
    """(nlist, nprobe): from params, or sized from the gallery (~4·sqrt(N) lists, each trained on at
    least 39 points as FAISS's k-means asks, and an eighth of them probed)."""
    nlist = params.nlist or int(4 * math.sqrt(count))
    nlist = max(1, min(nlist, count // 39 or 1))
    nprobe = params.nprobe or max(1, nlist // 8)
    return nlist, min(nprobe, nlist)


def build_index(vectors: np.ndarray, params: IndexParams | None = None) -> faiss.Index:
    """An inner-product index over (N, D) unit vectors (exact `flat`, or approximate `ivf` / `hnsw`),
    returned on the CPU so it can be saved; search parameters (nprobe, efSearch) are set on it."""
    params = params or IndexParams()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dimension = vectors.shape
    if params.type == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dimension)
    elif params.type == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    else:
        nlist, nprobe = ivf_sizes(params, count)
        quantizer = faiss.IndexFlatIP(dimension)
        if params.pq_m:
            if dimension % params.pq_m:
                raise ValueError(f"index.pq_m={params.pq_m} must divide the embedding size {dimension}")
            # 8-bit codes need 256 × 39 training points; smaller galleries get smaller codebooks.
            bits = int(max(1, min(8, math.floor(math.log2(max(count / 39, 2))))))
            index = faiss.IndexIVFPQ(
                quantizer, dimension, nlist, params.pq_m, bits, faiss.METRIC_INNER_PRODUCT
            )
        else:
            index = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = nprobe
    if use_gpu(params.device, params.type):
        resources = faiss.StandardGpuResources()
        on_gpu = faiss.index_cpu_to_gpu(resources, 0, index)
        if not on_gpu.is_trained:
            on_gpu.train(vectors)
        on_gpu.add(vectors)
        return faiss.index_gpu_to_cpu(on_gpu)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index


def identity_gallery(vectors: np.ndarray, labels: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """One vector per identity: the mean of its unit embeddings, re-normalized; its first face stands
    for it (the thumbnail a search shows)."""
    codes, names = pd.factorize(labels["identity"], sort=True)
    sums = np.zeros((len(names), vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, vectors)
    means = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
    first = labels.assign(code=codes).groupby("code", sort=True).head(1).sort_values("code")
    table = pd.DataFrame(
        {
            "row": first["row"].to_numpy(),
            "identity": np.asarray(names),
            "path": first["path"].to_numpy(),
            "faces": np.bincount(codes, minlength=len(names)),
        }
    )
    return means, table


def run(params: IndexParams, embeddings_dir: Path, aligned_dir: Path, out_dir: Path) -> FaceIndex:
    """Index every embedding (model 0's) and write the index, its labels table and index.json."""
    vectors, rows, embed_info = load_embeddings(embeddings_dir)
    manifest = store.read_manifest(aligned_dir)
    labels = pd.DataFrame(
        {
            "row": rows,
            "identity": manifest["identity"].to_numpy()[rows],
            "path": manifest["path"].to_numpy()[rows],
        }
    )
    joint_bayesian = embed_info["primary"] in SCORED_BY_BAYES
    if params.gallery == "identity":
        if joint_bayesian:  # average the vectors the model maps, then map the means
            inputs = load_embeddings(embeddings_dir, variant=embed_info["bayes_input"])[0]
            means, labels = identity_gallery(inputs, labels)
            vectors = bayes.BayesModel.load(Path(embeddings_dir) / "group-0" / BAYES_FILE).vectors(means)
        else:
            vectors, labels = identity_gallery(vectors, labels)
    started = time.perf_counter()
    index = build_index(vectors, params)
    seconds = time.perf_counter() - started
    info = {
        "type": params.type,
        "gallery": params.gallery,
        "metric": "joint_bayesian" if joint_bayesian else "inner_product",
        "dimension": int(vectors.shape[1]),
        "count": int(index.ntotal),
        "identities": int(labels["identity"].nunique()),
        "search": _search_settings(index),
        "built_on": "gpu" if use_gpu(params.device, params.type) else "cpu",
        "build_seconds": round(seconds, 3),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint_sha256": embed_info["checkpoint_sha256"],
        "companion_sha256s": embed_info.get("companion_sha256s", []),  # the further trunks', if any
        "backbone": embed_info.get("backbone"),
        "companion_backbones": embed_info.get("companion_backbones", []),
        "flip": embed_info.get("network", embed_info["primary"]) == "flip",
        "embedding": embed_info["primary"],
        "bayes_input": embed_info.get("bayes_input"),
    }
    with atomic_path(out_dir, directory=True) as temp:
        faiss.write_index(index, str(temp / INDEX_FILE))
        # queries need the same texture projection and weights, and the same Joint Bayesian model
        if "fused" in (embed_info["primary"], embed_info.get("bayes_input")):
            shutil.copyfile(Path(embeddings_dir) / "group-0" / TEXTURE_FILE, temp / TEXTURE_FILE)
        if joint_bayesian:
            shutil.copyfile(Path(embeddings_dir) / "group-0" / BAYES_FILE, temp / BAYES_FILE)
        labels.to_parquet(temp / LABELS_FILE, index=False)
        write_json(temp / INFO_FILE, info)
    logger.info(
        "%s index of %d vectors (%d identities) built in %.2f s",
        params.type,
        index.ntotal,
        info["identities"],
        seconds,
    )
    return FaceIndex(index, labels, info)


def _search_settings(index: faiss.Index) -> dict[str, int]:
    """The query-time knobs, saved so a loaded index searches exactly as it was built to."""
    if isinstance(index, faiss.IndexHNSW):
        return {"ef_search": int(index.hnsw.efSearch)}
    if isinstance(index, faiss.IndexIVF):
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    return {}


def load_index(folder: Path, device: str = "auto") -> FaceIndex:
    """Read an index folder; a missing, truncated or inconsistent file is an error naming it. On a
    machine with faiss-gpu, flat and IVF indexes are searched on the GPU (unless `device` is cpu)."""
    folder = Path(folder)
    for name in (INDEX_FILE, LABELS_FILE, INFO_FILE):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name}: not found (run the index stage first)")
    try:
        index = faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError as err:
        raise ValueError(f"{folder / INDEX_FILE}: not a readable FAISS index ({err})") from err
    try:
        labels = pd.read_parquet(folder / LABELS_FILE)
    except Exception as err:  # pyarrow's errors for a damaged file have no common base class
        raise ValueError(f"{folder / LABELS_FILE}: not a readable labels table ({err})") from err
    info = read_json(folder / INFO_FILE)
    if len(labels) != index.ntotal:
        raise ValueError(
            f"{folder}: the index holds {index.ntotal} vectors but {LABELS_FILE} {len(labels)} rows"
        )
    if info.get("dimension", index.d) != index.d:
        raise IndexMismatchError(
            f"{folder}: {INFO_FILE} says dimension {info['dimension']}, {INDEX_FILE} has {index.d}"
        )
    settings = info.get("search", {})
    if "nprobe" in settings:
        index.nprobe = settings["nprobe"]
    if "ef_search" in settings:
        index.hnsw.efSearch = settings["ef_search"]
    if use_gpu(device, info.get("type", "flat")):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return FaceIndex(index, labels, info)
