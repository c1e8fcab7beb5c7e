"""Embeddings: batched inference over aligned faces, L2-normalized, with and without flip test-time
augmentation (flip TTA: the embedding of a face plus that of its mirror image, then normalized).

Both variants come from one pass (the flipped batch is needed for TTA anyway), so the evaluation can
report each. With cross-training there is one model per group: `<out>/group-<g>/` holds its embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from arcface import bayes, texture
from arcface.config import EmbedParams
from arcface.data import store
from arcface.data.datasets import to_model_input
from arcface.device import autocast, autocast_dtype, resolve_device
from arcface.files import atomic_path, read_json, sha256_file, write_json
from arcface.train import CHECKPOINT_FILE, SPLIT_FILE, companion_folders, group_dirs, load_backbone

logger = logging.getLogger(__name__)

VARIANTS = ("flip", "plain")  # always written; with embed.texture also "texture" and "fused" (primary);
# embed.bayes adds "bayes" (then primary): Joint Bayesian vectors of the network's or fused vectors, scored by
# bayes.pair_scores, not by a cosine. A model with companion trunks (train.companion) adds "companion",
# "companion-2"... (their vectors, named like their folders) and "ensemble" (every trunk's, joined), which is
# then what the texture view fuses with.
SCORED_BY_BAYES = ("bayes",)
ROWS_FILE = "rows.npy"
INFO_FILE = "embed.json"
TEXTURE_FILE = "texture.npz"  # the fitted texture model, for embedding query photos the same way
BAYES_FILE = "bayes.npz"  # the fitted Joint Bayesian model


@torch.inference_mode()
def embed_variants(
    model: nn.Module,
    faces: np.ndarray,
    batch_size: int = 128,
    amp: torch.dtype | None = None,
    progress: bool = False,
    variants: tuple[str, ...] = VARIANTS,
) -> dict[str, np.ndarray]:
    """(N, 112, 112, 3) uint8 faces -> {"plain": (N, D), "flip": (N, D)} float32 unit vectors."""
    model.eval()
    device = next(model.parameters()).device
    chunks: dict[str, list[torch.Tensor]] = {variant: [] for variant in variants}
    starts = range(0, len(faces), batch_size)
    for start in tqdm(starts, desc="embed", unit="batch", disable=None if progress else True):
        batch = torch.from_numpy(np.ascontiguousarray(faces[start : start + batch_size]))
        images = to_model_input(batch.to(device))  # (B, 3, 112, 112)
        with autocast(device, amp):
            direct = model(images).float()  # (B, D)
            if "plain" in chunks:
                chunks["plain"].append(F.normalize(direct, dim=1).cpu())
            if "flip" in chunks:
                both = direct + model(images.flip(3)).float()
                chunks["flip"].append(F.normalize(both, dim=1).cpu())
    return {
        variant: torch.cat(parts).numpy() if parts else np.zeros((0, 0), dtype=np.float32)
        for variant, parts in chunks.items()
    }


def embed_faces(
    model: nn.Module,
    faces: np.ndarray,
    batch_size: int = 128,
    flip: bool = True,
    amp: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(N, 112, 112, 3) uint8 faces -> (N, D) unit vectors, with flip TTA or without."""
    variant = "flip" if flip else "plain"
    return embed_variants(model, faces, batch_size, amp, progress, (variant,))[variant]


def join_trunks(*trunks: np.ndarray) -> np.ndarray:
    """k trunks' (N, D1), ..., (N, Dk) unit vectors -> (N, D1 + ... + Dk) unit vectors whose cosine is the
    mean of the trunks' cosines (the ensemble's cosine score)."""
    return (np.concatenate(trunks, axis=1) / np.sqrt(len(trunks))).astype(np.float32)


def companion_checkpoints(folder: Path) -> list[Path]:
    """The further trunks' checkpoints of a model (train.companion): `group-<g>/companion/checkpoint.pt`,
    `companion-2/`..., in training order; none without them."""
    return [trunk / CHECKPOINT_FILE for trunk in companion_folders(folder)]


def load_trunk(
    checkpoint: Path, device: torch.device
) -> tuple[nn.Module, torch.dtype | None, dict[str, Any]]:
    """A backbone ready to embed (channels_last), its autocast dtype, and its checkpoint's payload."""
    model, payload = load_backbone(checkpoint, device)
    model.to(memory_format=torch.channels_last)
    return model, autocast_dtype(payload["train_params"]["amp"], device), payload


@dataclass(frozen=True)
class EmbedResult:
    out_dir: Path
    count: int
    dimension: int
    groups: int
    companions: int = 0  # how many of the groups' models have further trunks (train.companion)


def run(params: EmbedParams, aligned_dir: Path, models_dir: Path, out_dir: Path) -> EmbedResult:
    """Embed every usable face of the store with each group's model."""
    device = resolve_device(params.device)
    manifest = store.read_manifest(aligned_dir)
    rows = store.usable_rows(manifest)
    faces = store.open_faces(aligned_dir)
    if len(faces) != len(manifest):
        raise ValueError(f"{aligned_dir}: faces.npy has {len(faces)} rows but the manifest {len(manifest)}")
    selected = np.asarray(faces[rows])
    models = group_dirs(models_dir)
    descriptors = None  # LBP descriptors of `selected`, shared by every group's model when they fit in RAM
    companions = 0
    with atomic_path(out_dir, directory=True) as temp:
        for group, folder in enumerate(models):
            checkpoint, others = folder / CHECKPOINT_FILE, companion_checkpoints(folder)
            network = "flip" if params.flip else "plain"
            vectors, trunks = _network_vectors(
                params, network, checkpoint, others, selected, device, rows, manifest
            )
            views = [vectors[network]] + [vectors[path.parent.name] for path in others]
            primary = "ensemble" if others else network
            companions += bool(others)
            target = temp / folder.name
            target.mkdir()
            if params.texture or params.bayes:
                labels = manifest["identity"].to_numpy()[rows]
                sample = _fit_sample(folder, labels)
            if params.texture:
                if descriptors is None and texture.fits_in_memory(len(selected)):
                    descriptors = texture.descriptors(selected, progress=True)
                texture_model, vectors["texture"] = _fit_texture(
                    params, selected, descriptors, labels, sample, views
                )
                vectors["fused"] = texture_model.fuse(views, vectors["texture"])
                texture_model.save(target / TEXTURE_FILE)
                primary = "fused"
            bayes_input = None
            if params.bayes:
                bayes_input = primary
                people = np.union1d(sample, _spare_sample(folder, labels))
                bayes_model = _fit_bayes(params, vectors[bayes_input], labels, people)
                vectors["bayes"] = bayes_model.vectors(vectors[bayes_input])
                bayes_model.save(target / BAYES_FILE)
                primary = "bayes"
            for variant, values in vectors.items():
                np.save(target / f"{variant}.npy", values)
            np.save(target / ROWS_FILE, rows.astype(np.int64))
            write_json(
                target / INFO_FILE,
                {
                    "group": group,
                    "count": len(rows),
                    "dimension": int(vectors[primary].shape[1]),
                    "primary": primary,
                    "network": network,
                    "bayes_input": bayes_input,  # the variant the Joint Bayesian model maps (or None)
                    "variants": list(vectors),
                    "checkpoint_sha256": sha256_file(checkpoint),
                    "companion_sha256s": [sha256_file(path) for path in others],
                    "backbone": trunks[0],
                    "companion_backbones": trunks[1:],
                },
            )
    dimension = int(vectors[primary].shape[1])
    logger.info(
        "embedded %d faces into %d-d vectors (%s) with %d model(s)%s",
        len(rows),
        dimension,
        primary,
        len(models),
        f", {companions} of them with companion trunks" if companions else "",
    )
    return EmbedResult(Path(out_dir), len(rows), dimension, len(models), companions)


def _network_vectors(
    params: EmbedParams,
    network: str,
    checkpoint: Path,
    companions: list[Path],
    faces: np.ndarray,
    device: torch.device,
    rows: np.ndarray,
    manifest: Any,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The first trunk's "flip" and "plain" vectors of `faces`; with companion trunks also each one's
    `network` variant's vectors (named like its folder: "companion", "companion-2"...) and every trunk's
    joined ("ensemble"). And the trunks' names."""
    model, amp, payload = load_trunk(checkpoint, device)
    vectors = embed_variants(model, faces, params.batch_size, amp, progress=True)
    _check_finite(vectors, rows, manifest, checkpoint)
    names = [payload["train_params"]["backbone"]]
    for path in companions:
        other, other_amp, other_payload = load_trunk(path, device)
        own = embed_variants(other, faces, params.batch_size, other_amp, True, (network,))
        _check_finite(own, rows, manifest, path)
        vectors[path.parent.name] = own[network]
        names.append(other_payload["train_params"]["backbone"])
    if companions:
        vectors["ensemble"] = join_trunks(vectors[network], *(vectors[p.parent.name] for p in companions))
    return vectors, names


def _fit_sample(folder: Path, labels: np.ndarray) -> np.ndarray:
    """Positions (in `labels`) of the faces the texture and Bayes models fit on: those of the people
    the model trained on (its split.json), or a seeded sample of them."""
    if not (folder / SPLIT_FILE).exists():
        raise FileNotFoundError(
            f"{folder / SPLIT_FILE}: not found; embed.texture and embed.bayes fit on the people the model "
            "trained on, which `arcface train` records there (retrain, or set embed.texture and "
            "embed.bayes: false)"
        )
    trained = set(read_json(folder / SPLIT_FILE)["identities"])
    positions = np.flatnonzero(np.isin(labels, list(trained)))
    return positions[texture.fit_rows(labels[positions])]


def _spare_sample(folder: Path, labels: np.ndarray) -> np.ndarray:
    """Positions (in `labels`) of the faces of people the model neither trained on nor is scored on: those
    with too few faces to train (split.json's `too_small`; none in a split.json written before it was
    recorded). The Joint Bayesian model learns from them how people differ."""
    spare = read_json(folder / SPLIT_FILE).get("too_small", [])
    positions = np.flatnonzero(np.isin(labels, spare))
    return positions[texture.fit_rows(labels[positions])]


def _fit_texture(
    params: EmbedParams,
    faces: np.ndarray,
    descriptors: np.ndarray | None,
    labels: np.ndarray,
    sample: np.ndarray,
    networks: list[np.ndarray],
) -> tuple[texture.TextureModel, np.ndarray]:
    """Fit PCA + LDA on the faces at positions `sample` (of the people the model trained on), and weigh
    the views (each network's and the texture's) by their spread over impostor pairs of those faces.
    Returns the model and every face's texture vector (from `descriptors` when given, else computed chunk
    by chunk)."""
    fit_on = descriptors[sample] if descriptors is not None else texture.descriptors(faces[sample])
    model = texture.fit(fit_on, labels[sample], params.texture_pca_dims, params.texture_lda_dims)
    if descriptors is not None:
        vectors = model.project(descriptors).astype(np.float32)
    else:
        vectors = texture.project_faces(model, faces, progress=True)
    model.network_spreads = tuple(texture.impostor_spread(view[sample], labels[sample]) for view in networks)
    model.texture_spread = texture.impostor_spread(vectors[sample], labels[sample])
    logger.info(
        "texture: %d-d LBP -> %d-d PCA + LDA fit on %d faces of %d people; impostor spread: network "
        "%s, texture %.3f",
        fit_on.shape[1],
        vectors.shape[1],
        len(sample),
        len(np.unique(labels[sample])),
        " and ".join(f"{spread:.3f}" for spread in model.network_spreads),
        model.texture_spread,
    )
    return model, vectors


def _fit_bayes(
    params: EmbedParams, vectors: np.ndarray, labels: np.ndarray, sample: np.ndarray
) -> bayes.BayesModel:
    """The Joint Bayesian model of `vectors` fit on the faces at positions `sample` (of the people the
    model trained on and the spare ones)."""
    model = bayes.fit(vectors[sample], labels[sample], params.bayes_dims, params.bayes_shrink)
    _, faces_per_person = np.unique(labels[sample], return_counts=True)
    logger.info(
        "bayes: %d-d -> %d-d Joint Bayesian model fit on %d faces of %d people (%d with one face)",
        vectors.shape[1],
        model.basis.shape[1],
        len(sample),
        len(faces_per_person),
        int((faces_per_person == 1).sum()),
    )
    return model


def _check_finite(vectors: dict[str, np.ndarray], rows: np.ndarray, manifest: Any, checkpoint: Path) -> None:
    broken = ~np.isfinite(next(iter(vectors.values()))).all(axis=1)
    if broken.any():
        examples = ", ".join(manifest["path"].iloc[rows[broken][:3]])
        raise ValueError(
            f"{checkpoint}: {int(broken.sum())} embedding(s) are NaN or infinite (e.g. {examples}); "
            "the model is broken: retrain it, e.g. with a lower train.lr"
        )


def load_embeddings(
    folder: Path, group: int = 0, variant: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(N, D) float32 embeddings of group `group` (the primary variant unless `variant` is given), their
    manifest rows, and the description written with them."""
    folder = Path(folder) / f"group-{group}"
    if not (folder / INFO_FILE).exists():
        raise FileNotFoundError(f"{folder}: embeddings not found (run the embed stage first)")
    info = read_json(folder / INFO_FILE)
    return np.load(folder / f"{variant or info['primary']}.npy"), np.load(folder / ROWS_FILE), info
