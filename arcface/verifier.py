"""The whole face verifier as one object: its trunks, texture view and Joint Bayesian model, embedding
aligned faces exactly as the embed stage does and scoring pairs as the evaluation does.

Search builds one from a model folder and the index beside it; the track stage saves one as a folder
(slim trunk weights, the fitted texture and Joint Bayesian models, `verifier.json`) that MLflow registers,
so the registered model is what the reported accuracy belongs to, not the first trunk alone. That folder
loads back with `Verifier.load`, and through MLflow's pyfunc interface with `_load_pyfunc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arcface import bayes, texture
from arcface.device import resolve_device
from arcface.embed import (
    BAYES_FILE,
    INFO_FILE,
    SCORED_BY_BAYES,
    TEXTURE_FILE,
    companion_checkpoints,
    embed_faces,
    join_trunks,
    load_trunk,
)
from arcface.files import atomic_path, read_json, sha256_file, write_json
from arcface.train import CHECKPOINT_FILE, CHECKPOINT_FORMAT

SPEC_FILE = "verifier.json"
SPEC_FORMAT = 1
FACE_SHAPE = (112, 112, 3)


class VerifierError(ValueError):
    """A saved verifier folder that can't be used: a missing file or parts that don't fit together."""


@dataclass(frozen=True)
class Trunk:
    """One trained backbone ready to embed, with its autocast dtype and its checkpoint's settings."""

    model: nn.Module
    amp: torch.dtype | None
    train_params: dict[str, Any]

    @property
    def dimension(self) -> int:
        return int(self.train_params["embedding_size"])


@dataclass
class Verifier:
    """Trunks (their vectors joined), optionally the texture view fused in and a Joint Bayesian map."""

    trunks: list[Trunk]
    flip: bool = True
    texture: texture.TextureModel | None = None
    bayes: bayes.BayesModel | None = None

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: list[Path],
        flip: bool,
        texture_file: Path | None = None,
        bayes_file: Path | None = None,
        device: torch.device | str = "cpu",
    ) -> Verifier:
        """The verifier of these trunks (the first one, then its companions) and fitted model files."""
        device = torch.device(device)
        trunks = []
        for path in checkpoints:
            model, amp, payload = load_trunk(Path(path), device)
            trunks.append(Trunk(model, amp, dict(payload["train_params"])))
        fitted_texture = texture.TextureModel.load(Path(texture_file)) if texture_file else None
        fitted_bayes = bayes.BayesModel.load(Path(bayes_file)) if bayes_file else None
        verifier = cls(trunks, flip, fitted_texture, fitted_bayes)
        verifier.check(str(bayes_file) if bayes_file else "the Joint Bayesian model")
        return verifier

    @classmethod
    def of_run(
        cls, model_folder: Path, embeddings_folder: Path, device: torch.device | str = "cpu"
    ) -> Verifier:
        """The verifier behind one model's primary embedding: its trunks (`models/group-<g>`) and what
        the embed stage fitted for them (`data/embeddings/group-<g>`), which must be of these trunks."""
        model_folder, embeddings_folder = Path(model_folder), Path(embeddings_folder)
        info_path = embeddings_folder / INFO_FILE
        if not info_path.exists():
            raise FileNotFoundError(f"{info_path}: not found (run the embed stage first)")
        info = read_json(info_path)
        checkpoints = [model_folder / CHECKPOINT_FILE, *companion_checkpoints(model_folder)]
        recorded = [info.get("checkpoint_sha256"), *recorded_companions(info)]
        found = [sha256_file(path) for path in checkpoints]
        if found != recorded:
            raise VerifierError(
                f"{embeddings_folder} was embedded with trunks of sha256 {', '.join(map(str, recorded))} but "
                f"{model_folder} holds {', '.join(found)}: run the embed stage again"
            )
        fused = "fused" in (info.get("primary"), info.get("bayes_input"))
        return cls.from_checkpoints(
            checkpoints,
            info.get("network", "flip") == "flip",
            embeddings_folder / TEXTURE_FILE if fused else None,
            embeddings_folder / BAYES_FILE if info.get("primary") in SCORED_BY_BAYES else None,
            device,
        )

    @property
    def network_dimension(self) -> int:
        """The length of the trunks' joined vectors."""
        return sum(trunk.dimension for trunk in self.trunks)

    @property
    def input_dimension(self) -> int:
        """The length of what the Joint Bayesian model maps: the joined vectors, plus the texture's."""
        extra = self.texture.projection.shape[1] if self.texture is not None else 0
        return self.network_dimension + extra

    @property
    def dimension(self) -> int:
        """The length of the vectors `embed` returns."""
        return self.bayes.cross.shape[1] + 1 if self.bayes is not None else self.input_dimension

    @property
    def score_name(self) -> str:
        return "joint_bayesian" if self.bayes is not None else "cosine"

    @property
    def score_label(self) -> str:
        """The score's name for people, as the CLI prints it."""
        return "Joint Bayesian score" if self.bayes is not None else "cosine"

    def describe(self) -> str:
        """One line for people (the MLflow model version's description), e.g. "2 trunks (resnet18-fast;
        resnet18-fast on the box rows 8-88, columns 16-96), flip TTA, texture view fused, Joint Bayesian"."""
        trunks = []
        for trunk in self.trunks:
            crop = trunk.train_params.get("crop")
            box = f" on the box rows {crop[0]}-{crop[1]}, columns {crop[2]}-{crop[3]}" if crop else ""
            trunks.append(f"{trunk.train_params['backbone']}{box}")
        parts = [f"{len(trunks)} trunk{'s' if len(trunks) > 1 else ''} ({'; '.join(trunks)})"]
        parts.append("flip TTA" if self.flip else "no flip TTA")
        if self.texture is not None:
            parts.append("texture view fused")
        parts.append("Joint Bayesian scores" if self.bayes is not None else "cosine scores")
        return ", ".join(parts)

    def check(self, bayes_name: str = "the Joint Bayesian model") -> None:
        """Parts that don't fit together are an error that names both sizes."""
        if not self.trunks:
            raise VerifierError("a verifier needs at least one trunk")
        if self.texture is not None and len(self.texture.network_spreads) != len(self.trunks):
            raise VerifierError(
                f"the texture model weighs {len(self.texture.network_spreads)} trunk(s) but the verifier "
                f"has {len(self.trunks)}"
            )
        if self.bayes is not None and self.bayes.mean.shape[0] != self.input_dimension:
            raise VerifierError(
                f"{bayes_name} maps {self.bayes.mean.shape[0]}-d vectors but the trunks"
                f"{' with the texture view' if self.texture is not None else ''} embed into "
                f"{self.input_dimension}"
            )

    def embed(self, faces: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """(N, 112, 112, 3) uint8 aligned faces -> (N, dimension) float32 vectors, as the embed stage's
        primary embedding: unit vectors scored by their dot product, or Joint Bayesian vectors."""
        faces = _check_faces(faces)
        views = [
            embed_faces(trunk.model, faces, batch_size, flip=self.flip, amp=trunk.amp)
            for trunk in self.trunks
        ]
        vectors = join_trunks(*views) if len(views) > 1 else views[0]
        if self.texture is not None:
            vectors = self.texture.fuse(views, texture.project_faces(self.texture, faces))
        if self.bayes is not None:
            vectors = self.bayes.vectors(vectors)
        return vectors.astype(np.float32)

    def scores(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Verification scores of row-aligned vectors from `embed` (higher: more likely the same person)."""
        if self.bayes is not None:
            return bayes.pair_scores(first, second)
        return np.einsum("nd,nd->n", first.astype(np.float64), second.astype(np.float64))

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """MLflow's pyfunc entry point: aligned faces in, vectors out (see `embed`)."""
        return self.embed(np.asarray(model_input))

    def save(self, folder: Path, notes: dict[str, Any] | None = None) -> Path:
        """Write the verifier to a new folder: each trunk's embedding weights and settings (no optimizer
        state), the fitted texture and Joint Bayesian models, and `verifier.json` naming them; `notes`
        (e.g. the accuracy and threshold it was scored at) go into `verifier.json` as they are."""
        folder = Path(folder)
        with atomic_path(folder, directory=True) as temp:
            names = []
            for number, trunk in enumerate(self.trunks):
                name = f"trunk-{number}.pt"
                weights = {key: value.detach().cpu() for key, value in trunk.model.state_dict().items()}
                payload = {"format": CHECKPOINT_FORMAT, "train_params": trunk.train_params, "model": weights}
                torch.save(payload, temp / name)
                names.append(name)
            if self.texture is not None:
                self.texture.save(temp / "texture.npz")
            if self.bayes is not None:
                self.bayes.save(temp / "bayes.npz")
            spec = {
                "format": SPEC_FORMAT,
                "trunks": names,
                "flip": self.flip,
                "texture": "texture.npz" if self.texture is not None else None,
                "bayes": "bayes.npz" if self.bayes is not None else None,
                "score": self.score_name,
                "dimension": self.dimension,
                "input": list(FACE_SHAPE),
            }
            write_json(temp / SPEC_FILE, spec | {"notes": notes or {}})
        return folder

    @classmethod
    def load(cls, folder: Path, device: torch.device | str = "auto") -> Verifier:
        """A verifier written by `save`; a missing or foreign file is named."""
        folder = Path(folder)
        spec_path = folder / SPEC_FILE
        if not spec_path.exists():
            raise VerifierError(f"{spec_path}: not found: {folder} is not a saved verifier")
        spec = read_json(spec_path)
        if spec.get("format") != SPEC_FORMAT:
            raise VerifierError(f"{spec_path}: format {spec.get('format')!r}, expected {SPEC_FORMAT}")
        for name in [*spec["trunks"], spec.get("texture"), spec.get("bayes")]:
            if name and not (folder / name).exists():
                raise VerifierError(f"{folder / name}: not found, but {spec_path} names it")
        return cls.from_checkpoints(
            [folder / name for name in spec["trunks"]],
            bool(spec["flip"]),
            folder / spec["texture"] if spec.get("texture") else None,
            folder / spec["bayes"] if spec.get("bayes") else None,
            resolve_device(str(device)),
        )


def recorded_companions(info: dict[str, Any]) -> list[str]:
    """The sha256s of the further trunks an embedding or index was made with (one written before several
    were possible names one, or none, as `companion_sha256`)."""
    if "companion_sha256s" in info:
        return list(info["companion_sha256s"])
    return [info["companion_sha256"]] if info.get("companion_sha256") else []


def _check_faces(faces: np.ndarray) -> np.ndarray:
    """Faces as the store holds them, or a clear error naming the shape or type that came instead."""
    if faces.ndim != 4 or faces.shape[1:] != FACE_SHAPE:
        raise VerifierError(
            f"expected aligned faces of shape (N, {', '.join(map(str, FACE_SHAPE))}), got {faces.shape}"
        )
    if faces.dtype != np.uint8:
        raise VerifierError(
            f"expected uint8 faces (0-255, as the aligned store holds them), got {faces.dtype}"
        )
    return faces


def _load_pyfunc(path: str) -> Verifier:
    """MLflow's loader for a verifier logged with `loader_module="arcface.verifier"`."""
    return Verifier.load(Path(path))
