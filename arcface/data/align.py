"""Align faces to the ArcFace 112×112 template: MTCNN five landmarks -> similarity warp.

facenet-pytorch's MTCNN only finds boxes and landmarks; the alignment is ours. For each image the
least-squares similarity transform (rotation, uniform scale, translation) maps its five landmarks onto
the standard ArcFace template, and one batched `grid_sample` warps the whole batch. Training, evaluation
and search queries all go through `FaceAligner`, so every face the model sees is aligned the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from arcface.config import AlignParams
from arcface.data import store
from arcface.data.images import decoded_batches, list_images
from arcface.device import autocast_dtype, resolve_device
from arcface.files import atomic_path, remove

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
# How far from the centre (in units of the image's shorter side) a face may sit before the `central`
# rule discounts it by e^-1.
CENTRAL_SPREAD = 0.25


@dataclass(frozen=True)
class Detection:
    """The face chosen in one image: status `ok`, `fallback` (no face found) or `error` (unusable)."""

    status: str
    reason: str = ""
    score: float = float("nan")
    box: tuple[float, float, float, float] = (float("nan"),) * 4
    landmarks: np.ndarray | None = None  # (5, 2) pixels in the source image
    residual: float = float("nan")  # mean distance (template pixels) of warped landmarks to the template


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


class FaceAligner:
    """MTCNN detection + face choice + similarity warp, for batches of same-size images."""

    def __init__(self, params: AlignParams) -> None:
        from facenet_pytorch import MTCNN  # heavy import, only when aligning

        self.params = params
        self.device = resolve_device(params.device)
        self.detector = MTCNN(
            keep_all=True,
            min_face_size=params.min_face_size,
            thresholds=list(params.thresholds),
            factor=params.factor,
            device=self.device,
        )
        dtype = autocast_dtype(params.amp, self.device)
        if dtype is not None:
            self.detector.onet = MixedPrecisionONet(self.detector.onet, dtype)

    def min_face_size(self, height: int, width: int) -> int:
        """Faces smaller than this are not searched for: a fraction of the shorter side, with a floor.

        The image pyramid starts at the scale where this size becomes MTCNN's 12-pixel window, so a
        larger minimum skips the largest (slowest) pyramid levels; dataset photos frame one big face.
        """
        return max(self.params.min_face_size, round(self.params.min_face_fraction * min(height, width)))

    def detect(self, images: np.ndarray) -> list[Detection]:
        """(B, H, W, 3) uint8 images of one size -> the chosen face of each (or a fallback)."""
        height, width = images.shape[1:3]
        self.detector.min_face_size = self.min_face_size(height, width)
        with torch.inference_mode():
            boxes, scores, landmarks = self.detector.detect(images, landmarks=True)
        return [
            choose_face(b, s, lm, width, height, self.params.choose, self.params.no_face)
            for b, s, lm in zip(boxes, scores, landmarks, strict=True)
        ]

    def align(self, images: np.ndarray) -> tuple[np.ndarray, list[Detection]]:
        """(B, H, W, 3) uint8 -> (B, 112, 112, 3) aligned faces and their detections (with residuals)."""
        detections = self.detect(images)
        height, width = images.shape[1:3]
        points = np.stack([landmarks_or_fallback(d, width, height) for d in detections])
        transforms = similarity_transforms(points)
        residuals = landmark_residuals(transforms, points)
        detections = [
            dataclasses.replace(d, residual=float(r)) if d.landmarks is not None else d
            for d, r in zip(detections, residuals, strict=True)
        ]
        batch = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
        faces = warp_faces(batch, transforms).cpu().numpy()
        for row, detection in enumerate(detections):
            if detection.status == "error":
                faces[row] = 0  # a dropped image keeps its row, black, like an unreadable one
        return faces, detections

    def align_one(self, image: np.ndarray) -> tuple[np.ndarray, Detection]:
        """One photo of any size (a search query) -> its aligned face and detection."""
        faces, detections = self.align(image[None])
        return faces[0], detections[0]


class MixedPrecisionONet(nn.Module):
    """MTCNN's last stage with its convolutions in bf16 and its output layers in float32.

    The O-net's convolutions and pools are over half of the detection time on a CPU, and bf16 halves
    them (measured: 143 -> 243 img/s on LFW); keeping the dense layers in float32 keeps the landmarks
    within 0.1 px of the float32 network's (autocasting them too moves them by 1-5 px).
    """

    def __init__(self, onet: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.onet = onet.to(memory_format=torch.channels_last)
        self.dtype = dtype

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o = self.onet
        x = crops.contiguous(memory_format=torch.channels_last)  # (N, 3, 48, 48)
        with torch.autocast(device_type=crops.device.type, dtype=self.dtype):
            x = o.pool1(o.prelu1(o.conv1(x)))
            x = o.pool2(o.prelu2(o.conv2(x)))
            x = o.pool3(o.prelu3(o.conv3(x)))
            x = o.prelu4(o.conv4(x))  # (N, 128, 3, 3)
        # The same (N, C, W, H) flattening order as facenet-pytorch's ONet.forward.
        x = x.float().permute(0, 3, 2, 1).contiguous().flatten(1)
        x = o.prelu5(o.dense5(x))
        return o.dense6_2(x), o.dense6_3(x), o.softmax6_1(o.dense6_1(x))  # boxes, landmarks, scores


def landmark_residuals(transforms: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(N,) mean distance, in 112×112 template pixels, between warped landmarks and the template."""
    warped = apply_transforms(transforms, landmarks)
    return np.linalg.norm(warped - ARCFACE_TEMPLATE, axis=2).mean(axis=1)


def choose_face(
    boxes: np.ndarray | None,
    scores: np.ndarray | None,
    landmarks: np.ndarray | None,
    width: int,
    height: int,
    rule: str = "central",
    no_face: str = "fallback",
) -> Detection:
    """The face the photo is about, of those MTCNN found.

    `central` (for datasets like LFW, which centre the named person): the detector score × the face's
    size × a Gaussian fall-off with the distance from the image centre; `largest`; `confident`.
    """
    if boxes is None or len(boxes) == 0:
        if no_face == "drop":
            return Detection(status="error", reason="no face found (dropped: align.no_face = drop)")
        return Detection(status="fallback", reason="no face found")
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    side = min(width, height)
    size = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / side
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    offset = np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2) / side
    weights = {
        "central": scores * size * np.exp(-((offset / CENTRAL_SPREAD) ** 2)),
        "largest": size,
        "confident": scores,
    }[rule]
    best = int(np.argmax(weights))
    reason = f"{len(boxes)} faces, kept the {_RULE_WORDS[rule]}" if len(boxes) > 1 else ""
    return Detection(
        status="ok",
        reason=reason,
        score=float(scores[best]),
        box=tuple(float(v) for v in boxes[best]),
        landmarks=np.asarray(landmarks[best], dtype=np.float64),
    )


_RULE_WORDS = {"central": "most central", "largest": "largest", "confident": "most confident"}


def landmarks_or_fallback(detection: Detection, width: int, height: int) -> np.ndarray:
    """The detection's landmarks, or LFW's median landmark positions scaled to this image."""
    if detection.landmarks is not None:
        return detection.landmarks
    return FALLBACK_LANDMARKS * np.array([width, height])


class AlignError(RuntimeError):
    """With `align.strict`, images that could not be aligned; the message lists them."""


@dataclass(frozen=True)
class AlignResult:
    out_dir: Path
    images: int
    counts: dict[str, int]  # status -> rows
    images_per_second: float  # of the images aligned by this run (resumed chunks excluded)
    mean_residual: float
    resumed_chunks: int


@dataclass
class AlignJob:
    """One align run cut into chunks of `params.chunk_size` images: plan it, align its chunks (in any
    order, in any process or thread: each is saved beside `out_dir` as it finishes), then finish it into
    the store. An interrupted job resumes from the chunks already saved (same images, same params)."""

    params: AlignParams
    images_dir: Path
    out_dir: Path
    listing: pd.DataFrame
    chunks: store.ChunkCache

    @classmethod
    def plan(cls, params: AlignParams, images_dir: Path, out_dir: Path) -> AlignJob:
        images_dir, out_dir = Path(images_dir), Path(out_dir)
        listing = list_images(images_dir)
        if listing.empty:
            raise FileNotFoundError(f"{images_dir}: no images in person folders (<Person>/<image>)")
        chunks = store.ChunkCache(out_dir, _work_key(params, images_dir, listing))
        return cls(params, images_dir, out_dir, listing, chunks)

    @property
    def chunk_count(self) -> int:
        return -(-len(self.listing) // self.params.chunk_size)

    def part(self, index: int) -> pd.DataFrame:
        start = index * self.params.chunk_size
        return self.listing.iloc[start : start + self.params.chunk_size]

    def pending(self) -> list[int]:
        """Chunks not saved yet."""
        return [index for index in range(self.chunk_count) if not self.chunks.done(index)]

    def align_chunk(self, index: int, aligner: FaceAligner | None = None, progress: tqdm | None = None) -> int:
        """Align and save chunk `index`; returns how many images it held."""
        part = self.part(index)
        aligner = aligner or FaceAligner(self.params)
        progress = progress or tqdm(total=len(part), desc=f"align chunk {index}", unit="img", disable=True)
        faces, detections = _align_chunk(aligner, self.params, self.images_dir, part, progress)
        self.chunks.save(index, faces, store.build_manifest(part, detections))
        return len(part)

    def finish(self, aligned_now: int, seconds: float, resumed: int) -> AlignResult:
        """Assemble the saved chunks into the store (published in one rename) and summarize it."""
        manifest = self.chunks.manifest()
        _check_strict(self.params, self.images_dir, manifest)
        summary = store.summarize(manifest)
        with atomic_path(self.out_dir, directory=True) as temp:
            self.chunks.assemble(temp)
            store.write_manifest(temp, manifest)
            store.write_contact_sheet(temp, manifest)
            store.write_summary(temp, {**summary, "params": self.params.model_dump()})
        facts = store.write_run_facts(self.out_dir, aligned_now, seconds, resumed_chunks=resumed)
        self.chunks.clear()
        speed = facts["images_per_second"]
        result = AlignResult(
            self.out_dir, len(self.listing), summary["counts"], speed, summary["mean_residual"], resumed
        )
        _log_result(result, self.images_dir, manifest)
        return result


def run(params: AlignParams, images_dir: Path, out_dir: Path) -> AlignResult:
    """Align every image under `images_dir` into an aligned store at `out_dir`, chunk by chunk
    (see `AlignJob`: an interrupted run resumes from its finished chunks)."""
    job = AlignJob.plan(params, images_dir, out_dir)
    pending = job.pending()
    started, aligned_now = time.perf_counter(), 0
    progress = tqdm(total=len(job.listing), desc="align", unit="img", disable=None)
    progress.update(len(job.listing) - sum(len(job.part(index)) for index in pending))
    aligner = FaceAligner(params) if pending else None
    for index in pending:
        aligned_now += job.align_chunk(index, aligner, progress)
    progress.close()
    return job.finish(aligned_now, time.perf_counter() - started, job.chunk_count - len(pending))


def _align_chunk(
    aligner: FaceAligner, params: AlignParams, images_dir: Path, part: pd.DataFrame, progress: tqdm
) -> tuple[np.ndarray, list[Detection]]:
    """Align one chunk of the listing; rows are positions within the chunk."""
    faces = np.zeros((len(part), *store.FACE_SHAPE), dtype=np.uint8)
    detections = [Detection(status="error")] * len(part)
    batches = decoded_batches(
        images_dir,
        part["path"].tolist(),
        range(len(part)),
        params.batch_size,
        params.max_image_pixels,
        params.min_image_side,
    )
    for batch in batches:
        for row, error in batch.errors.items():
            detections[row] = Detection(status="error", reason=error)
        if batch.rows:
            aligned, found = aligner.align(np.stack(batch.images))
            faces[batch.rows] = aligned
            for row, detection in zip(batch.rows, found, strict=True):
                detections[row] = detection
        progress.update(batch.seen)
    return faces, detections


def _work_key(params: AlignParams, images_dir: Path, listing: pd.DataFrame) -> str:
    """Finished chunks are reused only for the same images (path, size, mtime) and the same params."""
    digest = hashlib.sha256()
    relevant = params.model_dump(exclude={"strict", "batch_size", "device"})
    digest.update(json.dumps(relevant, sort_keys=True).encode())
    for relative in listing["path"]:
        stat = (images_dir / relative).stat()
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _check_strict(params: AlignParams, images_dir: Path, manifest: pd.DataFrame) -> None:
    if not params.strict:
        return
    failed = manifest[manifest["status"] != "ok"]
    if len(failed):
        lines = [f"{images_dir / r.path}: {r.status}: {r.reason}" for r in failed.head(50).itertuples()]
        more = f"\n  ... and {len(failed) - 50} more" if len(failed) > 50 else ""
        raise AlignError(
            f"align.strict: {len(failed)} of {len(manifest)} images were not aligned cleanly "
            f"(finished chunks are kept, so a rerun resumes):\n  " + "\n  ".join(lines) + more
        )


def _log_result(result: AlignResult, images_dir: Path, manifest: pd.DataFrame) -> None:
    logger.info(
        "aligned %d images (%s), %.1f img/s, mean landmark residual %.2f px%s",
        result.images,
        ", ".join(f"{k} {v}" for k, v in result.counts.items()),
        result.images_per_second,
        result.mean_residual,
        f", {result.resumed_chunks} chunk(s) resumed" if result.resumed_chunks else "",
    )
    problems = manifest[manifest["status"] != "ok"]
    for row in problems.head(20).itertuples():
        logger.warning("%s: %s: %s", images_dir / row.path, row.status, row.reason)
    if len(problems) > 20:
        logger.warning("... %d more; the manifest and contact sheet list them all", len(problems) - 20)
