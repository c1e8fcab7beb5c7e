"""Identity search at scale: exact (flat) against approximate FAISS indexes (IVF, IVF-PQ, HNSW), one run.

    python bench/search.py [--vectors 1000000] [--identities 100000] [--json out.json]

Data: synthetic unit vectors clustered like face embeddings (each identity a random direction, each of
its faces that direction plus noise, cosine ~0.75 to the centre); queries are new faces of random
identities, as a search for a new photo would be. Every index is built with `arcface.index.build_index`,
the code the pipeline runs. For each index and search setting:

build s      training (IVF's k-means, PQ codebooks) + adding every vector
q/s batch    queries per second, all queries in one call (a folder of photos)
q/s single   queries per second, one call per query (one photo at a time)
recall@1     share of queries whose first answer is exact search's first answer
bytes/vec    serialized index size per vector
speedup      q/s over flat's q/s (batch and single)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from arcface.config import IndexParams
from arcface.index import build_index


class FaceSpace:
    """Synthetic embeddings shaped like a face model's: identity centres and each face's deviation from
    its centre are Gaussian with an exponentially decaying spectrum (participation ratio ≈
    `effective_dim`), randomly rotated, then L2-normalized. Measured on this project's LFW model's
    embeddings: participation ratio 37, genuine cosine 0.43 ± 0.21, impostor 0.00 ± 0.16. With
    `effective_dim` = the full dimension the data is isotropic: ANN's worst case."""

    def __init__(self, identities: int, dimension: int, effective_dim: float, rng: np.random.Generator):
        scale = np.exp(-np.arange(dimension) / (effective_dim / 2)) if effective_dim < dimension else None
        self.axis_std = (np.ones(dimension) if scale is None else np.sqrt(scale)).astype(np.float32)
        self.rotation = np.linalg.qr(rng.standard_normal((dimension, dimension)))[0].astype(np.float32)
        self.centres = self._gaussian(identities, rng)
        self.rng = rng

    def _gaussian(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return (
            rng.standard_normal((count, len(self.axis_std)), dtype=np.float32) * self.axis_std
        ) @ self.rotation

    def faces(self, count: int, owners: np.ndarray | None = None, spread: float = 0.9) -> np.ndarray:
        """(count, dimension) unit vectors of faces of `owners` (default: random identities); `spread`
        0.9 puts two faces of one person at cosine ~0.55, as with a good face model."""
        dimension = len(self.axis_std)
        if owners is None:
            owners = self.rng.integers(0, len(self.centres), count)
        vectors = np.empty((count, dimension), dtype=np.float32)
        for start in range(0, count, 100_000):  # in slices: full-size temporaries would double memory
            stop = min(start + 100_000, count)
            block = self.centres[owners[start:stop]] + spread * self._gaussian(stop - start, self.rng)
            vectors[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return vectors

    def cosines(self, pairs: int = 2000) -> tuple[float, float, float]:
        """(genuine mean, impostor mean, impostor std) cosines: how the data compares with a real model."""
        owners = self.rng.integers(0, len(self.centres), pairs)
        genuine = np.einsum("nd,nd->n", self.faces(pairs, owners), self.faces(pairs, owners))
        impostor = np.einsum("nd,nd->n", self.faces(pairs), self.faces(pairs))
        return float(genuine.mean()), float(impostor.mean()), float(impostor.std())


def queries_per_second(index: faiss.Index, queries: np.ndarray, single: int, k: int) -> tuple[float, float]:
    started = time.perf_counter()
    index.search(queries, k)
    batch = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    for query in queries[:single]:
        index.search(query[None], k)
    return batch, single / (time.perf_counter() - started)


def measure(
    name: str,
    params: IndexParams,
    vectors: np.ndarray,
    queries: np.ndarray,
    exact: np.ndarray,
    settings: list[dict[str, int]],
    single: int,
    k: int,
) -> list[dict[str, Any]]:
    started = time.perf_counter()
    index = build_index(vectors, params)
    build = time.perf_counter() - started
    size = len(faiss.serialize_index(index)) / index.ntotal
    rows = []
    for setting in settings or [{}]:
        if "nprobe" in setting:
            index.nprobe = setting["nprobe"]
        if "ef_search" in setting:
            index.hnsw.efSearch = setting["ef_search"]
        batch, one = queries_per_second(index, queries, single, k)
        found = index.search(queries, 1)[1][:, 0]
        label = name + "".join(f" {key}={value}" for key, value in setting.items())
        rows.append(
            {
                "index": label,
                "build_seconds": build,
                "qps_batch": batch,
                "qps_single": one,
                "recall_at_1": float((found == exact).mean()),
                "bytes_per_vector": size,
            }
        )
        print_row(rows[-1], None)
    return rows


HEADER = (
    f"{'index':<34} {'build s':>8} {'q/s batch':>10} {'q/s single':>10} {'recall@1':>9} "
    f"{'bytes/vec':>9} {'speedup b/s':>12}"
)


def print_row(row: dict[str, Any], flat: dict[str, Any] | None) -> None:
    speedup = ""
    if flat is not None:
        speedup = (
            f"{row['qps_batch'] / flat['qps_batch']:.0f}× / {row['qps_single'] / flat['qps_single']:.0f}×"
        )
    print(
        f"{row['index']:<34} {row['build_seconds']:>8.1f} {row['qps_batch']:>10.0f} "
        f"{row['qps_single']:>10.0f} {row['recall_at_1']:>9.4f} {row['bytes_per_vector']:>9.0f} "
        f"{speedup:>12}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--dimension", type=int, default=512)
    parser.add_argument(
        "--effective-dim",
        type=float,
        default=64,
        help="participation ratio of the embeddings' spectrum (this project's LFW model: 37; "
        "= --dimension for isotropic data, the worst case)",
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=100, help="queries timed one call at a time")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: the pipeline's ~4·sqrt(N))")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ivf", "ivfpq", "hnsw"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    space = FaceSpace(args.identities, args.dimension, args.effective_dim, np.random.default_rng(0))
    vectors = space.faces(args.vectors)
    queries = space.faces(args.queries)  # new photos of enrolled people
    genuine, impostor, impostor_std = space.cosines()
    del space
    print(f"{args.vectors:,} vectors of {args.identities:,} identities, {args.dimension}-d, effective "
          f"dimension {args.effective_dim:g} (cosine: genuine {genuine:.2f}, impostor {impostor:.2f} ± "
          f"{impostor_std:.2f}); {args.queries} queries, k={args.k}\n")  # fmt: skip
    print(HEADER)
    # Flat is the baseline and the ground truth; its single-query rate is timed on fewer queries.
    flat_params = IndexParams(type="flat", device="cpu")
    started = time.perf_counter()
    flat_index = build_index(vectors, flat_params)
    flat_build = time.perf_counter() - started
    exact = flat_index.search(queries, 1)[1][:, 0]
    batch, one = queries_per_second(flat_index, queries, max(1, args.single // 10), args.k)
    flat = {
        "index": "flat (exact)",
        "build_seconds": flat_build,
        "qps_batch": batch,
        "qps_single": one,
        "recall_at_1": 1.0,
        "bytes_per_vector": 4.0 * args.dimension,
    }
    print_row(flat, None)
    del flat_index
    rows = [flat]
    ivf = IndexParams(type="ivf", nlist=args.nlist, device="cpu")
    if "ivf" not in args.skip:
        probes = [{"nprobe": n} for n in (8, 16, 32, 64, 128, 256)]
        rows += measure("ivf-flat", ivf, vectors, queries, exact, probes, args.single, args.k)
    if "ivfpq" not in args.skip:
        pq = ivf.model_copy(update={"pq_m": 64})
        probes = [{"nprobe": n} for n in (16, 64)]
        rows += measure("ivf-pq m=64", pq, vectors, queries, exact, probes, args.single, args.k)
    if "hnsw" not in args.skip:
        hnsw = IndexParams(type="hnsw", hnsw_m=32, ef_construction=80, device="cpu")
        searches = [{"ef_search": n} for n in (64, 128, 256, 512)]
        rows += measure("hnsw M=32", hnsw, vectors, queries, exact, searches, args.single, args.k)
    print("\nsummary (speedup: q/s over flat's, batch / single)")
    print(HEADER)
    for row in rows:
        row["speedup_batch"] = row["qps_batch"] / flat["qps_batch"]
        row["speedup_single"] = row["qps_single"] / flat["qps_single"]
        print_row(row, flat)
    good = [r for r in rows[1:] if r["recall_at_1"] >= 0.99]
    if good:
        best = max(good, key=lambda r: r["speedup_batch"])
        print(f"\nfastest with recall@1 >= 0.99: {best['index']}, {best['speedup_batch']:.0f}× flat's "
              f"batch q/s, {best['speedup_single']:.0f}× its single-query q/s")  # fmt: skip
    if args.json:
        keys = ("vectors", "identities", "dimension", "effective_dim", "queries", "k")
        meta = {k: getattr(args, k) for k in keys} | {
            "genuine_cosine": genuine,
            "impostor_cosine_std": impostor_std,
        }
        args.json.write_text(json.dumps(meta | {"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
