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
from arcface.data.images import load_rgb
from arcface.files import read_json


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
    images = np.stack([load_rgb(p) for p in paths])
    faces, detections = aligner.align(images)
    assert faces.shape == (8, 112, 112, 3)
    assert [d.status for d in detections] == ["ok"] * 8
    landmarks = np.stack([d.landmarks for d in detections])
    aligned = align.apply_transforms(similarity_transforms(landmarks), landmarks)
    # Five real landmarks can't all fit a rigid template exactly, but a face does to a few pixels.
    assert np.abs(aligned - ARCFACE_TEMPLATE).mean() < 4.0
    assert all(d.score > 0.9 for d in detections)


def test_bf16_detector_gives_the_same_landmarks(sample_images: Path) -> None:
    paths = sorted(sample_images.glob("*/*.jpg"))[:16]
    images = np.stack([load_rgb(p) for p in paths])
    exact = align.FaceAligner(AlignParams(device="cpu", amp="off")).detect(images)
    mixed_aligner = align.FaceAligner(AlignParams(device="cpu", amp="bf16"))
    assert isinstance(mixed_aligner.detector.onet, align.MixedPrecisionONet)
    mixed = mixed_aligner.detect(images)
    for a, b in zip(exact, mixed, strict=True):
        assert np.abs(a.landmarks - b.landmarks).max() < 0.5  # pixels in a 160×160 photo
        assert abs(a.score - b.score) < 1e-2


def copy_people(sample_images: Path, target: Path, count: int) -> list[Path]:
    for person in sorted(p.name for p in sample_images.iterdir())[:count]:
        shutil.copytree(sample_images / person, target / person)
    return sorted(target.glob("*/*.jpg"))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, sample_images: Path) -> dict:
    """An images folder of real faces plus one file for each kind of bad input, aligned once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    images = root / "images"
    good = copy_people(sample_images, images, 4)
    person = good[0].parent
    made: dict[str, Path] = {}

    def add(kind: str, name: str) -> Path:
        made[kind] = person / name
        return made[kind]

    data = good[0].read_bytes()
    add("truncated", "truncated.jpg").write_bytes(data[: len(data) // 3])
    add("not an image", "notes.jpg").write_text("not an image")
    add("empty file", "empty.jpg").write_bytes(b"")
    face = Image.open(good[1])
    face.convert("L").save(add("greyscale", "grey.png"))
    face.convert("CMYK").save(add("cmyk", "cmyk.jpg"))
    face.convert("P", palette=Image.Palette.ADAPTIVE).save(add("palette", "palette.png"))
    rgba = face.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(add("rgba", "rgba.png"))
    sixteen = (np.asarray(face.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(add("16-bit", "sixteen.png"))
    assert Image.open(made["16-bit"]).mode.startswith("I;16")
    face.resize((20, 20)).save(add("tiny", "tiny.jpg"))
    face.resize((600, 600)).save(add("huge", "huge.jpg"))  # over the test's pixel limit below
    Image.new("RGB", (160, 160), (40, 80, 120)).save(add("no face", "blank.png"))
    # Two faces: the photo's own, and a second smaller photo pasted into the top-left corner.
    crowd = face.copy()
    crowd.paste(Image.open(good[5]).resize((64, 64)), (0, 0))
    crowd.save(add("several faces", "crowd.jpg"))

    params = AlignParams(device="cpu", batch_size=4, max_image_pixels=300_000, min_face_fraction=0.1)
    result = align.run(params, images, root / "aligned")
    manifest = store.read_manifest(root / "aligned").set_index("path")
    return {"images": images, "made": made, "good": good, "manifest": manifest, "result": result,
            "aligned": root / "aligned"}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "status", "reason"),
    [
        ("truncated", "error", "image file is truncated"),
        ("not an image", "error", "cannot identify image file"),
        ("empty file", "error", "cannot identify image file"),
        ("tiny", "error", "image too small: 20x20 (align.min_image_side = 32)"),
        ("huge", "error", "image too large: 600x600 = 360,000 pixels (align.max_image_pixels = 300,000)"),
        ("no face", "fallback", "no face found"),
        ("several faces", "ok", "2 faces, kept the most central"),
        ("greyscale", "ok", ""),
        ("cmyk", "ok", ""),
        ("palette", "ok", ""),
        ("rgba", "ok", ""),
        ("16-bit", "ok", ""),
    ],
)
def test_each_bad_input_is_a_manifest_row_with_its_reason(
    bad_inputs: dict, kind: str, status: str, reason: str
) -> None:
    row = bad_inputs["manifest"].loc[bad_inputs["made"][kind].relative_to(bad_inputs["images"]).as_posix()]
    assert row["status"] == status
    assert reason in row["reason"]
    if status == "ok":
        assert row["score"] > 0.9 and row["residual"] < 6.0


def test_bad_inputs_do_not_stop_the_stage(bad_inputs: dict) -> None:
    manifest, result = bad_inputs["manifest"], bad_inputs["result"]
    assert len(manifest) == len(bad_inputs["good"]) + len(bad_inputs["made"])
    assert result.counts == {"ok": len(bad_inputs["good"]) + 6, "fallback": 1, "error": 5}
    faces = store.open_faces(bad_inputs["aligned"])
    status = manifest["status"].to_numpy()
    assert not np.asarray(faces[np.flatnonzero(status == "error")]).any()  # unusable rows stay black
    assert np.asarray(faces[np.flatnonzero(status == "ok")]).mean() > 40
    summary = store.read_summary(bad_inputs["aligned"])
    assert summary["counts"] == result.counts
    assert 0 < summary["mean_residual"] < 4.0
    assert (bad_inputs["aligned"] / store.CONTACT_SHEET_FILE).stat().st_size > 10_000


def test_the_central_face_is_kept_among_several(bad_inputs: dict) -> None:
    row = bad_inputs["manifest"].loc[
        bad_inputs["made"]["several faces"].relative_to(bad_inputs["images"]).as_posix()
    ]
    centre_x = (row["box_x1"] + row["box_x2"]) / 2
    centre_y = (row["box_y1"] + row["box_y2"]) / 2
    assert abs(centre_x - 80) < 25 and abs(centre_y - 80) < 30  # the 160×160 photo's own face


def test_choice_rules_pick_different_faces() -> None:
    boxes = np.array([[70.0, 70.0, 130.0, 130.0], [0.0, 0.0, 90.0, 90.0]])  # central vs larger
    scores = np.array([0.95, 0.999])
    landmarks = np.zeros((2, 5, 2))
    central = align.choose_face(boxes, scores, landmarks, 200, 200, "central")
    largest = align.choose_face(boxes, scores, landmarks, 200, 200, "largest")
    assert central.box == tuple(boxes[0]) and largest.box == tuple(boxes[1])
    assert align.choose_face(boxes, scores, landmarks, 200, 200, "confident").box == tuple(boxes[1])
    dropped = align.choose_face(None, None, None, 200, 200, no_face="drop")
    assert dropped.status == "error" and "dropped" in dropped.reason


def test_min_face_size_follows_the_image() -> None:
    aligner = align.FaceAligner(AlignParams(device="cpu", min_face_size=20, min_face_fraction=0.3))
    assert aligner.min_face_size(250, 250) == 75
    assert aligner.min_face_size(40, 60) == 20


def test_strict_fails_with_the_list_and_writes_nothing(tmp_path: Path, sample_images: Path) -> None:
    images = tmp_path / "images"
    good = copy_people(sample_images, images, 2)
    broken = good[0].parent / "broken.jpg"
    broken.write_text("not an image")
    with pytest.raises(align.AlignError) as error:
        align.run(AlignParams(device="cpu", strict=True), images, tmp_path / "aligned")
    assert f"{broken}: error: unreadable image" in str(error.value)
    assert "1 of 9 images" in str(error.value)
    assert not (tmp_path / "aligned").exists()


def test_interrupted_run_resumes_from_finished_chunks(
    tmp_path: Path, sample_images: Path, monkeypatch
) -> None:
    images = tmp_path / "images"
    copy_people(sample_images, images, 5)  # 20 faces: 5 chunks of 4
    params = AlignParams(device="cpu", chunk_size=4, batch_size=4)
    calls = {"n": 0}
    real = align.FaceAligner.align

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the third chunk
        return real(self, batch)

    monkeypatch.setattr(align.FaceAligner, "align", interrupted)
    with pytest.raises(KeyboardInterrupt):
        align.run(params, images, tmp_path / "aligned")
    assert not (tmp_path / "aligned").exists()
    monkeypatch.setattr(align.FaceAligner, "align", real)

    resumed = align.run(params, images, tmp_path / "aligned")
    assert resumed.resumed_chunks == 2
    fresh = align.run(params, images, tmp_path / "fresh")
    assert fresh.resumed_chunks == 0
    assert np.array_equal(store.open_faces(tmp_path / "aligned"), store.open_faces(tmp_path / "fresh"))
    assert store.read_manifest(tmp_path / "aligned").equals(store.read_manifest(tmp_path / "fresh"))
    # Same photos, same bytes, whatever the run's speed or resumes: DVC keeps the store's hash.
    files = sorted(path.name for path in (tmp_path / "aligned").iterdir())
    assert files == sorted(path.name for path in (tmp_path / "fresh").iterdir())
    for name in files:
        assert (tmp_path / "aligned" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert read_json(store.run_facts_path(tmp_path / "aligned"))["resumed_chunks"] == 2
    assert not (tmp_path / ".aligned.chunks").exists()  # cleaned up once the store is complete


def test_align_stage_fails_clearly_without_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        align.run(AlignParams(device="cpu"), tmp_path / "images", tmp_path / "aligned")
    assert not (tmp_path / "aligned").exists()
