"""Alignment: the similarity fit, the batched warp, MTCNN on real faces, and bad images at align."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arcface.config import AlignParams
from arcface.data import align, store
from arcface.data.align import ARCFACE_TEMPLATE, similarity_transforms, warp_faces


def rotation_scale(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def test_similarity_fit_recovers_an_exact_transform() -> None:
    truth = rotation_scale(0.3, 1.7, (12.0, -5.0))
    # Landmarks in a photo that `truth` maps exactly onto the template.
    inverse = np.linalg.inv(np.vstack([truth, [0, 0, 1]]))[:2]
    source = ARCFACE_TEMPLATE @ inverse[:, :2].T + inverse[:, 2]
    fitted = similarity_transforms(source[None])[0]
    assert np.allclose(fitted, truth, atol=1e-9)


def test_similarity_fit_is_least_squares_for_noisy_points() -> None:
    rng = np.random.default_rng(0)
    source = ARCFACE_TEMPLATE * 2 + rng.normal(0, 1.0, (5, 2))
    fitted = similarity_transforms(source[None])
    residual = align.apply_transforms(fitted, source[None]) - ARCFACE_TEMPLATE
    # Nudging the fit in any direction of the similarity group makes the squared error larger.
    base = (residual**2).sum()
    for delta in np.eye(4) * 1e-3:
        a, b, tx, ty = delta
        nudged = fitted + np.array([[[a, -b, tx], [b, a, ty]]])
        moved = align.apply_transforms(nudged, source[None]) - ARCFACE_TEMPLATE
        assert (moved**2).sum() >= base


def test_warp_puts_landmark_dots_on_the_template() -> None:
    """Paint bright dots at landmark positions in a 250×250 image; after the warp they sit on the
    template points (to within a pixel)."""
    rng = np.random.default_rng(1)
    images, points = [], []
    for _ in range(3):
        transform = rotation_scale(rng.uniform(-0.4, 0.4), rng.uniform(1.5, 1.9), (30.0, 0.0))
        landmarks = ARCFACE_TEMPLATE @ transform[:, :2].T + transform[:, 2]
        image = np.zeros((250, 250, 3), np.uint8)
        for x, y in np.round(landmarks).astype(int):
            image[y - 3 : y + 4, x - 3 : x + 4] = 255
        images.append(image)
        points.append(np.round(landmarks))
    warped = warp_faces(torch.from_numpy(np.stack(images)), similarity_transforms(np.stack(points)))
    assert warped.shape == (3, 112, 112, 3) and warped.dtype == torch.uint8
    for face in warped.numpy():
        for x, y in np.round(ARCFACE_TEMPLATE).astype(int):
            assert face[y, x, 0] > 200, (x, y)
        assert face[5, 5, 0] == 0  # far from any dot stays black


@pytest.fixture(scope="module")
def aligner() -> align.FaceAligner:
    return align.FaceAligner(AlignParams(device="cpu"))


def test_real_faces_land_on_the_template(aligner: align.FaceAligner, sample_images: Path) -> None:
    paths = sorted(sample_images.glob("*/*.jpg"))[:8]
    images = np.stack([align.load_rgb(p) for p in paths])
    faces, detections = aligner.align(images)
    assert faces.shape == (8, 112, 112, 3)
    assert [d.status for d in detections] == ["ok"] * 8
    landmarks = np.stack([d.landmarks for d in detections])
    aligned = align.apply_transforms(similarity_transforms(landmarks), landmarks)
    # Five real landmarks can't all fit a rigid template exactly, but a face does to a few pixels.
    assert np.abs(aligned - ARCFACE_TEMPLATE).mean() < 4.0
    assert all(d.score > 0.9 for d in detections)


def test_align_stage_records_bad_images_and_goes_on(tmp_path: Path, sample_images: Path) -> None:
    images = tmp_path / "images"
    for person in sorted(p.name for p in sample_images.iterdir())[:3]:
        shutil.copytree(sample_images / person, images / person)
    good = sorted(images.glob("*/*.jpg"))
    # A corrupt JPEG (truncated to a third), a file that isn't an image, and odd image modes.
    truncated = good[0].read_bytes()
    good[0].write_bytes(truncated[: len(truncated) // 3])
    (images / good[1].parent.name / "notes.jpg").write_text("not an image")
    Image.open(good[2]).convert("L").save(good[2])
    Image.open(good[3]).convert("CMYK").save(good[3])
    blank = images / good[4].parent.name / f"{good[4].parent.name}_0099.png"
    Image.new("RGBA", (250, 250), (40, 80, 120, 255)).save(blank)

    result = align.run(AlignParams(device="cpu", batch_size=4), images, tmp_path / "aligned")

    manifest = store.read_manifest(tmp_path / "aligned")
    faces = store.open_faces(tmp_path / "aligned")
    by_path = manifest.set_index("path")
    assert len(manifest) == len(faces) == len(good) + 2
    first = good[0].relative_to(images).as_posix()
    assert by_path.loc[first, "status"] == "error"
    assert "truncated" in by_path.loc[first, "reason"]
    notes = f"{good[1].parent.name}/notes.jpg"
    assert by_path.loc[notes, "status"] == "error"
    assert "cannot identify image file" in by_path.loc[notes, "reason"]
    for converted in good[2:4]:
        assert by_path.loc[converted.relative_to(images).as_posix(), "status"] == "ok"
    assert by_path.loc[blank.relative_to(images).as_posix(), "status"] == "fallback"
    assert by_path.loc[blank.relative_to(images).as_posix(), "reason"] == "no face found"
    assert result.counts == {"ok": len(good) - 1, "fallback": 1, "error": 2}
    error_rows = np.flatnonzero(manifest["status"] == "error")
    assert not np.asarray(faces[error_rows]).any()  # unreadable rows stay black
    ok_rows = np.flatnonzero(manifest["status"] == "ok")
    assert np.asarray(faces[ok_rows]).mean() > 40
    assert (tmp_path / "aligned" / store.CONTACT_SHEET_FILE).stat().st_size > 10_000


def test_align_stage_fails_clearly_without_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        align.run(AlignParams(device="cpu"), tmp_path / "images", tmp_path / "aligned")
    assert not (tmp_path / "aligned").exists()
