"""Other training sets into an aligned store: insightface RecordIO (`train.rec` + `train.idx`, e.g.
CASIA-WebFace, MS1M) or a folder `<identity>/<image>` of faces already aligned to the ArcFace template.

Images are decoded once, here; training then reads the uint8 store like LFW's. The store's manifest
names each face `rec:<key>` or by its relative path, with the identity as a string.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from arcface.data import store
from arcface.data.align import FACE_SIZE, Detection
from arcface.data.images import ImageReadError, list_images, load_rgb
from arcface.data.recordio import RecordReader
from arcface.files import atomic_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    faces: int
    identities: int
    resized: int  # faces that were not 112×112 and were resized
    errors: int


def import_faces(source: Path, out_dir: Path, limit: int | None = None) -> ImportResult:
    """Convert `source` (a `.rec` file or a folder of identity folders) into a store at `out_dir`."""
    source = Path(source)
    if source.suffix == ".rec":
        reader = RecordReader(source)
        keys = reader.face_keys()[:limit]
        items = _record_items(reader, keys)
        total = len(keys)
    elif source.is_dir():
        listing = list_images(source).head(limit)
        items = _folder_items(source, listing)
        total = len(listing)
    else:
        raise FileNotFoundError(f"{source}: expected a .rec file (with its .idx) or a folder <identity>/<image>")
    if total == 0:
        raise ValueError(f"{source}: no faces found")
    started = time.perf_counter()
    paths, identities, detections, resized = [], [], [], 0
    with atomic_path(out_dir, directory=True) as temp:
        faces = np.lib.format.open_memmap(
            temp / store.FACES_FILE, mode="w+", dtype=np.uint8, shape=(total, *store.FACE_SHAPE)
        )
        for row, (path, identity, decode) in enumerate(tqdm(items, total=total, desc="import", disable=None)):
            paths.append(path)
            identities.append(identity)
            try:
                image = decode()
            except ImageReadError as err:
                detections.append(Detection(status="error", reason=str(err)))
                continue
            if image.shape[:2] != (FACE_SIZE, FACE_SIZE):
                image = np.asarray(Image.fromarray(image).resize((FACE_SIZE, FACE_SIZE), Image.BILINEAR))
                resized += 1
            faces[row] = image
            detections.append(Detection(status="ok", reason="imported"))
        faces.flush()
        del faces
        manifest = store.build_manifest(pd.DataFrame({"path": paths, "identity": identities}), detections)
        store.write_manifest(temp, manifest)
        store.write_contact_sheet(temp, manifest)
        summary = store.summarize(manifest)
        store.write_summary(temp, {**summary, "source": str(source), "resized": resized})
    store.write_run_facts(Path(out_dir), total, time.perf_counter() - started)
    result = ImportResult(
        Path(out_dir), total, manifest["identity"].nunique(), resized, summary["counts"]["error"]
    )
    logger.info(
        "imported %d faces of %d identities from %s (%d resized to 112×112, %d unreadable)",
        result.faces,
        result.identities,
        source,
        resized,
        result.errors,
    )
    return result


def _record_items(reader: RecordReader, keys: list[int]) -> Iterator[tuple[str, str, object]]:
    with reader:
        for key in keys:
            record = reader.face(key)
            yield f"rec:{key}", str(record.identity), lambda data=record.image: _decode_bytes(data)


def _folder_items(source: Path, listing: pd.DataFrame) -> Iterator[tuple[str, str, object]]:
    for path, identity in zip(listing["path"], listing["identity"], strict=True):
        yield path, identity, lambda file=source / path: load_rgb(file)


def _decode_bytes(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as err:
        raise ImageReadError(f"unreadable image: {type(err).__name__}: {err}") from err
