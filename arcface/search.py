"""Who is in this photo: align it like the training faces, embed it, search the index."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from arcface import bayes, texture
from arcface.config import AlignParams, EmbedParams, Params, load_params
from arcface.data.align import FaceAligner
from arcface.data.images import ImageReadError, load_rgb
from arcface.device import resolve_device
from arcface.embed import BAYES_FILE, SCORED_BY_BAYES, TEXTURE_FILE, companion_checkpoints
from arcface.evaluate import model_figures
from arcface.files import read_json, sha256_file
from arcface.index import FaceIndex, IndexMismatchError, Match, load_index
from arcface.layout import Layout
from arcface.train import CHECKPOINT_FILE
from arcface.verifier import Verifier, VerifierError, recorded_companions

LAYOUT = Layout()

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    photo: Path
    status: str  # ok | no_face | error
    reason: str = ""
    matches: list[Match] = field(default_factory=list)
    threshold: float | None = None  # the evaluation's score threshold; None: no open-set decision

    @property
    def identity(self) -> str | None:
        """The best match's name, `unknown` when its score is under the threshold, None without a face."""
        if not self.matches:
            return None
        best = self.matches[0]
        return "unknown" if self.threshold is not None and best.score < self.threshold else best.identity


@dataclass(frozen=True)
class QueryFace:
    """One photo on its way to an answer: the decoded image, the chosen face and its embedding."""

    status: str  # ok | no_face | error
    reason: str = ""  # e.g. "3 faces, kept the most central"
    image: np.ndarray | None = None  # (H, W, 3) uint8
    face: np.ndarray | None = None  # (112, 112, 3) uint8, aligned
    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in the image
    vector: np.ndarray | None = None  # (D,) unit vector, or a Joint Bayesian vector


def read_and_embed(
    aligner: FaceAligner, verifier: Verifier, photo: Path | BinaryIO, max_pixels: int | None = None
) -> QueryFace:
    """One photo decoded, its face detected and aligned like the training faces, and embedded by the
    verifier; an unreadable photo or one without a face is an answer that says why, not an exception."""
    limits = aligner.params
    try:
        image = load_rgb(photo, max_pixels or limits.max_image_pixels, limits.min_image_side)
    except ImageReadError as err:  # a bad photo is an answer, not a crash of the whole batch
        return QueryFace("error", str(err))
    face, detection = aligner.align_one(image)
    if detection.status != "ok":
        return QueryFace("no_face", detection.reason, image=image)
    vector = verifier.embed(face[None])[0]
    return QueryFace("ok", detection.reason, image, face, detection.box, vector)


def threshold_from_metrics(path: Path, model: str | None = None) -> float | None:
    """The score threshold the evaluate stage chose (metrics.json), or None when there is none yet. With
    cross-training and `model` (a group folder's name), that model's: the mean of its own folds'."""
    path = Path(path)
    if not path.exists():
        logger.warning("%s not found: no `unknown` decisions (run evaluate, or pass a threshold)", path)
        return None
    metrics = read_json(path)
    own = model_figures(metrics, model) if model else None
    return float(own["threshold"] if own else metrics["threshold"])


class FaceSearcher:
    """A model and the index built with it, ready to answer photos."""

    def __init__(
        self,
        checkpoint: Path,
        index_dir: Path,
        align: AlignParams,
        embed: EmbedParams,
        threshold: float | None = None,
        index_device: str = "auto",
    ) -> None:
        self.threshold = threshold
        self.index: FaceIndex = load_index(index_dir, index_device)
        checkpoint_hash = sha256_file(checkpoint)
        if checkpoint_hash != self.index.info.get("checkpoint_sha256"):
            raise IndexMismatchError(
                f"{index_dir} was built from checkpoint sha256 {self.index.info.get('checkpoint_sha256')}"
                f" but {checkpoint} has sha256 {checkpoint_hash}: rebuild the index (embed, index)"
            )
        companions = self._companions(Path(checkpoint), index_dir)
        embedding = self.index.info.get("embedding")
        texture_file = bayes_file = None
        if "fused" in (embedding, self.index.info.get("bayes_input")):  # network + texture vectors
            texture_file = _fitted_file(index_dir, TEXTURE_FILE, "fused (network + texture) vectors")
        if embedding in SCORED_BY_BAYES:
            bayes_file = _fitted_file(index_dir, BAYES_FILE, "Joint Bayesian vectors")
        flip = bool(self.index.info.get("flip", embed.flip))
        try:
            self.verifier = Verifier.from_checkpoints(
                [Path(checkpoint), *companions], flip, texture_file, bayes_file, resolve_device(embed.device)
            )
        except VerifierError as err:
            raise IndexMismatchError(
                f"{err} (the index in {index_dir}): rebuild the index (embed, index)"
            ) from err
        if self.verifier.dimension != self.index.index.d:
            raise IndexMismatchError(
                f"{checkpoint} embeds into {self.verifier.dimension} dimensions but {index_dir} holds "
                f"{self.index.index.d}"
            )
        self.aligner = FaceAligner(align)

    def _companions(self, checkpoint: Path, index_dir: Path) -> list[Path]:
        """The further trunks beside `checkpoint` (train.companion), checked against those the index was
        built with; none when neither has them."""
        paths = companion_checkpoints(checkpoint.parent)
        expected = recorded_companions(self.index.info)
        found = [sha256_file(path) for path in paths]
        if found != expected:
            raise IndexMismatchError(
                f"{index_dir} was built {_trunks_phrase(expected, 'with', 'without companion trunks')}, but "
                f"{checkpoint.parent} has {_trunks_phrase(found, '', 'none')}: rebuild the index (embed, "
                "index) or point at the models it was built from"
            )
        return paths

    @property
    def texture(self) -> texture.TextureModel | None:
        return self.verifier.texture

    @property
    def bayes(self) -> bayes.BayesModel | None:
        return self.verifier.bayes

    def read_face(self, photo: Path | BinaryIO, max_pixels: int | None = None) -> QueryFace:
        """Decode, detect, align and embed one photo (a path or an open binary file); photos over
        `max_pixels` (default: align.max_image_pixels) are refused before decoding."""
        return read_and_embed(self.aligner, self.verifier, photo, max_pixels)

    def search(self, photo: Path, k: int) -> SearchResult:
        """The top-k identities for one photo; unreadable photos and photos without a face say why."""
        query = self.read_face(photo)
        if query.status != "ok":
            return SearchResult(photo, query.status, query.reason)
        return SearchResult(photo, "ok", query.reason, self.matches(query, k), self.threshold)

    def pair_score(self, first: np.ndarray, second: np.ndarray) -> float:
        """The verification score of two embedded faces, as the index and the evaluation score it."""
        return float(self.verifier.scores(first[None], second[None])[0])

    def matches(self, query: QueryFace, k: int) -> list[Match]:
        """The top-k identities for an embedded face."""
        return self.index.search(query.vector[None], k)[0]

    def search_many(self, photos: list[Path], k: int) -> list[SearchResult]:
        """Answers for every photo, in order; one bad photo never stops the others."""
        progress = tqdm(photos, desc="search", unit="photo", disable=None)
        return [self.search(Path(photo), k) for photo in progress]


def search_photos(
    photos: list[Path],
    k: int | None = None,
    params: Params | None = None,
    checkpoint: Path = LAYOUT.model / "group-0" / CHECKPOINT_FILE,
    index_dir: Path = LAYOUT.index,
    metrics: Path = LAYOUT.reports / "metrics.json",
) -> list[SearchResult]:
    """The Python API: who is in each photo, against the pipeline's index (paths default to the
    workspace layout; `unknown` decided with the evaluation's threshold)."""
    params = params or load_params()
    threshold = threshold_from_metrics(metrics, Path(checkpoint).parent.name)
    searcher = FaceSearcher(checkpoint, index_dir, params.align, params.embed, threshold)
    return searcher.search_many(photos, k or params.index.k)


def _trunks_phrase(sha256s: list[str], lead: str, empty: str) -> str:
    """'with companion trunks of sha256 a, b' (or `empty`), for a mismatch error."""
    if not sha256s:
        return empty
    trunks = "companion trunks" if len(sha256s) > 1 else "a companion trunk"
    return f"{lead} {trunks} of sha256 {', '.join(sha256s)}".strip()


def _fitted_file(index_dir: Path, name: str, holds: str) -> Path:
    """A model file the index stage copied beside the index (queries are embedded with it)."""
    fitted = Path(index_dir) / name
    if not fitted.exists():
        raise FileNotFoundError(
            f"{fitted}: not found, but {index_dir} holds {holds}; rebuild the index (embed, index)"
        )
    return fitted
