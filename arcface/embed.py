"""Embeddings: batched inference over aligned faces, optional flip test-time augmentation, L2-normalized."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from arcface.config import EmbedParams
from arcface.data import store
from arcface.data.datasets import to_model_input
from arcface.device import autocast, autocast_dtype, resolve_device
from arcface.files import atomic_path, read_json, sha256_file, write_json
from arcface.train import load_backbone

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.npy"
ROWS_FILE = "rows.npy"
INFO_FILE = "embed.json"


@torch.inference_mode()
def embed_faces(
    model: nn.Module,
    faces: np.ndarray,
    batch_size: int = 128,
    flip: bool = True,
    amp: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(N, 112, 112, 3) uint8 faces -> (N, D) float32 unit vectors.

    With `flip`, each embedding is the sum of the face's and its mirror image's, then normalized.
    """
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    starts = range(0, len(faces), batch_size)
    for start in tqdm(starts, desc="embed", unit="batch", disable=None if progress else True):
        batch = torch.from_numpy(np.ascontiguousarray(faces[start : start + batch_size]))
        images = to_model_input(batch.to(device))  # (B, 3, 112, 112)
        with autocast(device, amp):
            vectors = model(images).float()  # (B, D)
            if flip:
                vectors = vectors + model(images.flip(3)).float()
        chunks.append(F.normalize(vectors, dim=1).cpu())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy()


@dataclass(frozen=True)
class EmbedResult:
    out_dir: Path
    count: int
    dimension: int


def run(params: EmbedParams, aligned_dir: Path, checkpoint: Path, out_dir: Path) -> EmbedResult:
    """Embed every usable face of the store; write embeddings, their manifest rows and a description."""
    device = resolve_device(params.device)
    model, payload = load_backbone(checkpoint, device)
    model.to(memory_format=torch.channels_last)
    manifest = store.read_manifest(aligned_dir)
    rows = store.usable_rows(manifest)
    faces = store.open_faces(aligned_dir)
    if len(faces) != len(manifest):
        raise ValueError(f"{aligned_dir}: faces.npy has {len(faces)} rows but the manifest {len(manifest)}")
    amp = autocast_dtype(payload["train_params"]["amp"], device)
    vectors = embed_faces(model, faces[rows], params.batch_size, params.flip, amp, progress=True)
    with atomic_path(out_dir, directory=True) as temp:
        np.save(temp / EMBEDDINGS_FILE, vectors)
        np.save(temp / ROWS_FILE, rows.astype(np.int64))
        write_json(
            temp / INFO_FILE,
            {
                "count": len(rows),
                "dimension": int(vectors.shape[1]),
                "flip": params.flip,
                "checkpoint_sha256": sha256_file(checkpoint),
                "backbone": payload["train_params"]["backbone"],
            },
        )
    logger.info("embedded %d faces into %d-d vectors", len(rows), vectors.shape[1])
    return EmbedResult(Path(out_dir), len(rows), int(vectors.shape[1]))


def load_embeddings(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(N, D) float32 embeddings, (N,) manifest rows, and the description written with them."""
    folder = Path(folder)
    path = folder / EMBEDDINGS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: embeddings not found (run the embed stage first)")
    return np.load(path), np.load(folder / ROWS_FILE), read_json(folder / INFO_FILE)
