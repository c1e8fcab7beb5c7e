"""The aligned-face store: `faces.npy` (N×112×112×3 uint8, memory-mappable) + `manifest.parquet`.

Row i of the manifest describes face i. Rows whose image could not be read keep their place (status
`error`, an all-black face) so row numbers never shift; consumers select rows by status.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from arcface.data.align import Detection

FACES_FILE = "faces.npy"
MANIFEST_FILE = "manifest.parquet"
CONTACT_SHEET_FILE = "contact_sheet.png"
FACE_SHAPE = (112, 112, 3)
STATUSES = ("ok", "fallback", "error")
LANDMARK_COLUMNS = [f"lm{i}_{axis}" for i in range(5) for axis in "xy"]
BOX_COLUMNS = ["box_x1", "box_y1", "box_x2", "box_y2"]


def create_faces(folder: Path, rows: int) -> np.memmap:
    """A zero-filled, writable (rows, 112, 112, 3) uint8 array backed by `folder/faces.npy`."""
    return np.lib.format.open_memmap(
        folder / FACES_FILE, mode="w+", dtype=np.uint8, shape=(rows, *FACE_SHAPE)
    )


def open_faces(folder: Path) -> np.ndarray:
    """The store's faces, memory-mapped read-only: (N, 112, 112, 3) uint8."""
    path = Path(folder) / FACES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: aligned store not found (run the align stage first)")
    faces = np.load(path, mmap_mode="r")
    if faces.dtype != np.uint8 or faces.shape[1:] != FACE_SHAPE:
        raise ValueError(f"{path}: expected (N, 112, 112, 3) uint8, found {faces.shape} {faces.dtype}")
    return faces


def build_manifest(listing: pd.DataFrame, detections: Sequence[Detection]) -> pd.DataFrame:
    """One row per image: path, identity, status, reason, detector score, box and 5 landmarks."""
    landmarks = np.full((len(detections), 10), np.nan)
    for row, detection in enumerate(detections):
        if detection.landmarks is not None:
            landmarks[row] = detection.landmarks.reshape(-1)
    manifest = listing[["path", "identity"]].reset_index(drop=True).copy()
    manifest["status"] = pd.Categorical([d.status for d in detections], categories=STATUSES)
    manifest["reason"] = [d.reason for d in detections]
    manifest["score"] = np.array([d.score for d in detections], dtype=np.float32)
    manifest[BOX_COLUMNS] = np.array([d.box for d in detections], dtype=np.float32)
    manifest[LANDMARK_COLUMNS] = landmarks.astype(np.float32)
    return manifest


def write_manifest(folder: Path, manifest: pd.DataFrame) -> None:
    manifest.to_parquet(folder / MANIFEST_FILE, index=False)


def read_manifest(folder: Path) -> pd.DataFrame:
    """The store's manifest; its row order is the row order of `faces.npy`."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found (run the align stage first)")
    return pd.read_parquet(path)


def usable_rows(manifest: pd.DataFrame) -> np.ndarray:
    """Rows holding a face (detected or fallback), i.e. all but unreadable images."""
    return np.flatnonzero((manifest["status"] != "error").to_numpy())


def write_contact_sheet(folder: Path, manifest: pd.DataFrame, columns: int = 12) -> Path:
    """A grid of aligned faces to check alignment at a glance: a spread of `ok` faces, then every
    fallback (orange frame) and error (red frame) up to the grid's size, labelled with its file."""
    faces = np.load(folder / FACES_FILE, mmap_mode="r")
    ok = np.flatnonzero((manifest["status"] == "ok").to_numpy())
    others = np.flatnonzero((manifest["status"] != "ok").to_numpy())[: columns * 4]
    shown_ok = ok[np.linspace(0, len(ok) - 1, min(len(ok), columns * 6)).astype(int)] if len(ok) else ok
    rows = [*shown_ok.tolist(), *others.tolist()]
    cell, label = FACE_SHAPE[0] + 4, 12  # a 2-pixel frame shows the status
    grid_rows = max(1, math.ceil(len(rows) / columns))
    sheet = Image.new("RGB", (columns * cell, grid_rows * (cell + label)), "white")
    draw = ImageDraw.Draw(sheet)
    frame = {"ok": (255, 255, 255), "fallback": (255, 140, 0), "error": (220, 0, 0)}
    for slot, row in enumerate(rows):
        x, y = (slot % columns) * cell, (slot // columns) * (cell + label)
        status = str(manifest["status"].iat[row])
        draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=frame[status])
        sheet.paste(Image.fromarray(np.asarray(faces[row])), (x + 2, y + 2))
        name = Path(str(manifest["path"].iat[row])).stem
        draw.text((x + 2, y + cell), name[:20], fill=(0, 0, 0))
    path = folder / CONTACT_SHEET_FILE
    sheet.save(path)
    return path

