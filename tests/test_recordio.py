"""insightface RecordIO sets and identity folders: written here, read back, imported into a store."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arcface.data import store
from arcface.data.external import import_faces
from arcface.data.recordio import MAGIC, RecordIOError, RecordReader, RecordWriter, pack_face, unpack_face
from arcface.files import read_json


def jpeg(face: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def real_faces(aligned_tiny: Path) -> tuple[np.ndarray, list[str]]:
    manifest = store.read_manifest(aligned_tiny)
    return np.asarray(store.open_faces(aligned_tiny)[:12]), manifest["identity"].tolist()[:12]


def write_insightface_set(path: Path, faces: np.ndarray, labels: list[int]) -> None:
    """Like insightface's train.rec: record 0 indexes the identity records that follow the faces."""
    with RecordWriter(path) as writer:
        first_identity = len(faces) + 1
        writer.write(0, pack_face((float(first_identity), float(first_identity + max(labels) + 1)), b""))
        for key, (face, label) in enumerate(zip(faces, labels, strict=True), 1):
            writer.write(key, pack_face((float(label),), jpeg(face)))
        for identity in range(max(labels) + 1):  # identity records: (first key, end key) of its faces
            writer.write(first_identity + identity, pack_face((1.0, 2.0), b""))


def test_records_round_trip_even_when_data_holds_the_magic_number(tmp_path: Path) -> None:
    magic = struct.pack("<I", MAGIC)
    payloads = {1: b"plain", 2: b"abcd" + magic + b"efgh" + magic + b"xy", 3: magic, 7: b"z" * 1001}
    with RecordWriter(tmp_path / "t.rec") as writer:
        for key, data in payloads.items():
            writer.write(key, data)
    raw = (tmp_path / "t.rec").read_bytes()
    assert raw.count(magic) > len(payloads)  # the magic-bearing records were split into parts
    with RecordReader(tmp_path / "t.rec") as reader:
        assert {key: reader.read(key) for key in payloads} == payloads


def test_face_records_keep_labels_and_image() -> None:
    assert unpack_face(pack_face((42.0,), b"jpeg")).labels == (42.0,)
    record = unpack_face(pack_face((3.0, 5.0), b"jpeg-bytes"))
    assert record.labels == (3.0, 5.0) and record.image == b"jpeg-bytes"


def test_insightface_layout_and_import_into_a_store(tmp_path: Path, real_faces) -> None:
    faces, names = real_faces
    labels = [sorted(set(names)).index(n) for n in names]
    write_insightface_set(tmp_path / "train.rec", faces, labels)
    with RecordReader(tmp_path / "train.rec") as reader:
        assert reader.face_keys() == list(range(1, 13))
        first = reader.face(1)
        assert first.identity == labels[0]
        decoded = np.asarray(Image.open(io.BytesIO(first.image)))
        assert np.abs(decoded.astype(int) - faces[0]).mean() < 3  # the same face, JPEG-compressed

    result = import_faces(tmp_path / "train.rec", tmp_path / "store")
    assert (result.faces, result.identities, result.resized, result.errors) == (12, len(set(labels)), 0, 0)
    manifest = store.read_manifest(tmp_path / "store")
    assert manifest["path"].tolist()[:2] == ["rec:1", "rec:2"]
    assert manifest["identity"].tolist() == [str(label) for label in labels]
    imported = store.open_faces(tmp_path / "store")
    assert np.abs(imported.astype(int) - faces).mean() < 3


def test_identity_folder_import_resizes_and_records_bad_files(tmp_path: Path, real_faces) -> None:
    faces, names = real_faces
    folder = tmp_path / "folder"
    for index, (face, name) in enumerate(zip(faces[:6], names[:6], strict=True)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(face)
        (image.resize((224, 224)) if index == 0 else image).save(folder / name / f"{index}.png")
    (folder / names[0] / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    result = import_faces(folder, tmp_path / "store")
    assert (result.faces, result.resized, result.errors) == (7, 1, 1)
    manifest = store.read_manifest(tmp_path / "store").set_index("path")
    assert manifest.loc[f"{names[0]}/broken.jpg", "status"] == "error"
    assert store.open_faces(tmp_path / "store").shape == (7, 112, 112, 3)
    # The import's speed goes beside the store, so importing again leaves the store's bytes (DVC hash) alone.
    assert "images_per_second" not in store.read_summary(tmp_path / "store")
    assert read_json(store.run_facts_path(tmp_path / "store"))["images_per_second"] > 0


def test_damaged_files_are_named(tmp_path: Path, real_faces) -> None:
    faces, _ = real_faces
    with RecordWriter(tmp_path / "t.rec") as writer:
        writer.write(0, pack_face((0.0,), jpeg(faces[0])))
    data = (tmp_path / "t.rec").read_bytes()
    (tmp_path / "t.rec").write_bytes(data[: len(data) // 2])
    with RecordReader(tmp_path / "t.rec") as reader, pytest.raises(RecordIOError, match=r"t\.rec: truncated"):
        reader.read(0)
    (tmp_path / "t.idx").write_text("0\t0\nnot a line\n")
    with pytest.raises(RecordIOError, match=r"t\.idx:2: expected key<TAB>offset"):
        RecordReader(tmp_path / "t.rec")
    with pytest.raises(FileNotFoundError, match=r"expected a \.rec file"):
        import_faces(tmp_path / "nothing.bin", tmp_path / "store")
