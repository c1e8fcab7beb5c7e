"""Who is in this photo: align it like the training faces, embed it, search the index."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from arcface.config import AlignParams, EmbedParams
from arcface.data.align import FaceAligner
from arcface.data.images import ImageReadError, load_rgb
from arcface.device import autocast_dtype, resolve_device
from arcface.embed import embed_faces
from arcface.files import sha256_file
from arcface.index import FaceIndex, IndexMismatchError, Match, load_index
from arcface.train import load_backbone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    photo: Path
    status: str  # ok | no_face | error
    reason: str = ""
    matches: list[Match] = field(default_factory=list)


class FaceSearcher:
    """A model and the index built with it, ready to answer photos."""

    def __init__(self, checkpoint: Path, index_dir: Path, align: AlignParams, embed: EmbedParams) -> None:
        self.index: FaceIndex = load_index(index_dir)
        checkpoint_hash = sha256_file(checkpoint)
        if checkpoint_hash != self.index.info.get("checkpoint_sha256"):
            raise IndexMismatchError(
                f"{index_dir} was built from checkpoint sha256 {self.index.info.get('checkpoint_sha256')}"
                f" but {checkpoint} has sha256 {checkpoint_hash}: rebuild the index (embed, index)"
            )
        device = resolve_device(embed.device)
        self.model, payload = load_backbone(checkpoint, device)
        self.model.to(memory_format=torch.channels_last)
        self.amp = autocast_dtype(payload["train_params"]["amp"], device)
        self.flip = bool(self.index.info.get("flip", embed.flip))
        self.aligner = FaceAligner(align)

    def search(self, photo: Path, k: int) -> SearchResult:
        """The top-k identities for one photo; unreadable photos and photos without a face say why."""
        limits = self.aligner.params
        try:
            image = load_rgb(photo, limits.max_image_pixels, limits.min_image_side)
        except ImageReadError as err:  # a bad photo is an answer, not a crash of the whole batch
            return SearchResult(photo, "error", str(err))
        face, detection = self.aligner.align_one(image)
        if detection.status != "ok":
            return SearchResult(photo, "no_face", detection.reason)
        vector = embed_faces(self.model, face[None], flip=self.flip, amp=self.amp)
        return SearchResult(photo, "ok", detection.reason, self.index.search(vector, k)[0])
