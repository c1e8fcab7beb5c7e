"""Align faces to the ArcFace 112×112 template: MTCNN five landmarks -> similarity warp.

facenet-pytorch's MTCNN only finds boxes and landmarks; the alignment is ours. For each image the
least-squares similarity transform (rotation, uniform scale, translation) maps its five landmarks onto
the standard ArcFace template, and one batched `grid_sample` warps the whole batch. Training, evaluation
and search queries all go through `FaceAligner`, so every face the model sees is aligned the same way.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from arcface.config import AlignParams
from arcface.data import store
from arcface.device import resolve_device
from arcface.files import atomic_path

logger = logging.getLogger(__name__)

FACE_SIZE = 112
# The standard ArcFace five-point template for 112×112 crops (published by insightface):
# left eye, right eye, nose tip, left mouth corner, right mouth corner, in pixels.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
# Median MTCNN landmarks on LFW photos as fractions of the image side (measured on the bundled sample):
# where a face most likely is when the detector finds none, since LFW centres every face.
FALLBACK_LANDMARKS = np.array(
    [[0.419, 0.454], [0.589, 0.449], [0.506, 0.552], [0.433, 0.635], [0.581, 0.632]]
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Detection:
    """The face chosen in one image: status `ok`, `fallback` (no face found) or `error` (unreadable)."""

    status: str
    reason: str = ""
    score: float = float("nan")
    box: tuple[float, float, float, float] = (float("nan"),) * 4
    landmarks: np.ndarray | None = None  # (5, 2) pixels in the source image


def similarity_transforms(landmarks: np.ndarray, template: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """Least-squares similarity transforms, (N, 5, 2) source points -> (N, 2, 3) matrices onto `template`.

    Closed form: with centred points p (source) and q (template), the best map is q ≈ [a −b; b a]·p with
    a = Σ(p·q)/Σ|p|², b = Σ(p×q)/Σ|p|² (no reflection), then the translation that matches the means.
    """
    src = np.asarray(landmarks, dtype=np.float64)
    if src.ndim == 2:
        src = src[None]
    src_mean = src.mean(axis=1, keepdims=True)  # (N, 1, 2)
    dst_mean = template.mean(axis=0)  # (2,)
    p = src - src_mean
    q = template - dst_mean
    norm = (p**2).sum(axis=(1, 2))  # (N,)
    norm = np.where(norm > 0, norm, 1.0)  # five identical points: degenerate, avoid 0/0
    a = (p * q).sum(axis=(1, 2)) / norm
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(axis=1) / norm
    rotation = np.stack([np.stack([a, -b], -1), np.stack([b, a], -1)], axis=1)  # (N, 2, 2)
    translation = dst_mean - np.einsum("nij,nj->ni", rotation, src_mean[:, 0])
    return np.concatenate([rotation, translation[..., None]], axis=2)


def apply_transforms(transforms: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2, 3) matrices applied to (N, K, 2) points."""
    return np.einsum("nij,nkj->nki", transforms[..., :2], points) + transforms[:, None, :, 2]


def warp_faces(images: torch.Tensor, transforms: np.ndarray, size: int = FACE_SIZE) -> torch.Tensor:
    """One bilinear warp for the whole batch: (B, H, W, 3) uint8 + (B, 2, 3) -> (B, size, size, 3) uint8.

    `transforms` map source pixels to output pixels (pixel centres at integer coordinates, as the
    landmarks are); each output pixel samples the source at the inverse map.
    """
    batch, height, width, _ = images.shape
    matrices = np.concatenate([transforms, np.tile([[[0.0, 0.0, 1.0]]], (batch, 1, 1))], axis=1)
    inverse = torch.from_numpy(np.linalg.inv(matrices)[:, :2]).float().to(images.device)  # (B, 2, 3)
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32, device=images.device),
        torch.arange(size, dtype=torch.float32, device=images.device),
        indexing="ij",
    )
    out_pixels = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)  # (S², 3)
    src = torch.einsum("bij,pj->bpi", inverse, out_pixels)  # (B, S², 2) source pixel coords
    # grid_sample (align_corners=False) wants [-1, 1] where -1 is the left edge of the first pixel.
    scale = torch.tensor([width, height], dtype=torch.float32, device=images.device)
    grid = ((2 * src + 1) / scale - 1).reshape(batch, size, size, 2)
    planar = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    warped = F.grid_sample(planar, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def load_rgb(path: Path) -> np.ndarray:
    """Decode any PIL-readable image to (H, W, 3) uint8 RGB; raises with the reason if it can't."""
    with warnings.catch_warnings():
        # PIL warns before it refuses a decompression bomb; we want the refusal as an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()  # decode now: truncated data fails here, not later
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit greyscale: scale to 8 bits rather than clip everything to white.
                values = np.asarray(image, dtype=np.float64)
                top = values.max() or 1.0
                image = Image.fromarray((values * (255.0 / top)).astype(np.uint8))
            return np.asarray(image.convert("RGB"))


class FaceAligner:
    """MTCNN detection + landmark choice + similarity warp, for batches of same-size images."""

    def __init__(self, params: AlignParams) -> None:
        from facenet_pytorch import MTCNN  # heavy import, only when aligning

        self.device = resolve_device(params.device)
        self.detector = MTCNN(
            keep_all=True,
            min_face_size=params.min_face_size,
            thresholds=list(params.thresholds),
            factor=params.factor,
            device=self.device,
        )

    def detect(self, images: np.ndarray) -> list[Detection]:
        """(B, H, W, 3) uint8 images of one size -> the chosen face of each (or a fallback)."""
        with torch.inference_mode():
            boxes, scores, landmarks = self.detector.detect(images, landmarks=True)
        height, width = images.shape[1:3]
        return [
            choose_face(b, s, lm, width, height) for b, s, lm in zip(boxes, scores, landmarks, strict=True)
        ]

    def align(self, images: np.ndarray) -> tuple[np.ndarray, list[Detection]]:
        """(B, H, W, 3) uint8 -> (B, 112, 112, 3) aligned faces and their detections."""
        detections = self.detect(images)
        height, width = images.shape[1:3]
        points = np.stack([landmarks_or_fallback(d, width, height) for d in detections])
        transforms = similarity_transforms(points)
        batch = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
        return warp_faces(batch, transforms).cpu().numpy(), detections

    def align_one(self, image: np.ndarray) -> tuple[np.ndarray, Detection]:
        """One photo of any size (a search query) -> its aligned face and detection."""
        faces, detections = self.align(image[None])
        return faces[0], detections[0]


def choose_face(
    boxes: np.ndarray | None,
    scores: np.ndarray | None,
    landmarks: np.ndarray | None,
    width: int,
    height: int,
) -> Detection:
    """Of the faces MTCNN found, the one nearest the image centre (LFW centres the named person)."""
    if boxes is None or len(boxes) == 0:
        return Detection(status="fallback", reason="no face found")
    boxes = np.asarray(boxes, dtype=np.float64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    distance = np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2)
    best = int(np.argmin(distance))
    reason = f"{len(boxes)} faces, kept the most central" if len(boxes) > 1 else ""
    return Detection(
        status="ok",
        reason=reason,
        score=float(np.asarray(scores, dtype=np.float64)[best]),
        box=tuple(float(v) for v in boxes[best]),
        landmarks=np.asarray(landmarks[best], dtype=np.float64),
    )


def landmarks_or_fallback(detection: Detection, width: int, height: int) -> np.ndarray:
    """The detection's landmarks, or LFW's median landmark positions scaled to this image."""
    if detection.landmarks is not None:
        return detection.landmarks
    return FALLBACK_LANDMARKS * np.array([width, height])


def list_images(images_dir: Path) -> pd.DataFrame:
    """`<identity>/<file>` images under `images_dir`, sorted, as columns path and identity."""
    paths = sorted(
        p.relative_to(images_dir).as_posix()
        for p in images_dir.glob("*/*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    return pd.DataFrame({"path": paths, "identity": [p.split("/")[0] for p in paths]})


@dataclass(frozen=True)
class AlignResult:
    out_dir: Path
    images: int
    counts: dict[str, int]  # status -> rows
    images_per_second: float


def run(params: AlignParams, images_dir: Path, out_dir: Path) -> AlignResult:
    """Align every image under `images_dir` into an aligned store at `out_dir`."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    listing = list_images(images_dir)
    if listing.empty:
        raise FileNotFoundError(f"{images_dir}: no images (*.jpg, *.jpeg, *.png) in person folders")
    aligner = FaceAligner(params)
    started = time.perf_counter()
    with atomic_path(out_dir, directory=True) as temp:
        faces = store.create_faces(temp, len(listing))
        detections: list[Detection] = [Detection(status="error")] * len(listing)
        progress = tqdm(total=len(listing), desc="align", unit="img", disable=None)
        for batch in _decoded_batches(images_dir, listing["path"], params.batch_size):
            for row, error in batch.errors.items():
                detections[row] = Detection(status="error", reason=error)
            if batch.rows:
                aligned, found = aligner.align(np.stack(batch.images))
                faces[batch.rows] = aligned
                for row, detection in zip(batch.rows, found, strict=True):
                    detections[row] = detection
            progress.update(batch.seen)
        progress.close()
        faces.flush()
        del faces
        manifest = store.build_manifest(listing, detections)
        store.write_manifest(temp, manifest)
        store.write_contact_sheet(temp, manifest)
    elapsed = time.perf_counter() - started
    counts = manifest["status"].value_counts().to_dict()
    result = AlignResult(out_dir, len(listing), counts, len(listing) / max(elapsed, 1e-9))
    logger.info(
        "aligned %d images in %.1fs (%.1f img/s): %s",
        len(listing),
        elapsed,
        result.images_per_second,
        ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
    )
    for row in manifest[manifest["status"] == "error"].itertuples():
        logger.warning("%s: %s", images_dir / row.path, row.reason)
    return result


@dataclass
class _Batch:
    """Consecutive rows: the decoded images (all one size) and the rows that failed to decode."""

    seen: int = 0
    rows: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)

    def fits(self, image: np.ndarray) -> bool:
        return not self.images or image.shape == self.images[0].shape


def _decoded_batches(images_dir: Path, paths: Sequence[str], batch_size: int) -> Iterator[_Batch]:
    """Decode images in order into batches of at most `batch_size` rows; a new size starts a new batch."""
    batch = _Batch()
    for row, relative in enumerate(paths):
        try:
            image = load_rgb(images_dir / relative)
        except Exception as err:  # any decoder failure becomes a manifest row, never a crash
            batch.errors[row] = f"unreadable image: {type(err).__name__}: {err}"
        else:
            if not batch.fits(image):
                yield batch
                batch = _Batch()
            batch.rows.append(row)
            batch.images.append(image)
        batch.seen += 1
        if batch.seen >= batch_size:
            yield batch
            batch = _Batch()
    if batch.seen:
        yield batch
