"""The aligned-face store: `faces.npy` (N×112×112×3 uint8, memory-mappable) + `manifest.parquet`.

Row i of the manifest describes face i. Rows whose image could not be used keep their place (status
`error`, an all-black face) so row numbers never shift; consumers select rows by status.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from arcface.files import atomic_path, read_json, remove, write_json

if TYPE_CHECKING:
    from arcface.data.align import Detection

FACES_FILE = "faces.npy"
MANIFEST_FILE = "manifest.parquet"
CONTACT_SHEET_FILE = "contact_sheet.png"
SUMMARY_FILE = "summary.json"
FACE_SHAPE = (112, 112, 3)
STATUSES = ("ok", "fallback", "error")
LANDMARK_COLUMNS = [f"lm{i}_{axis}" for i in range(5) for axis in "xy"]
BOX_COLUMNS = ["box_x1", "box_y1", "box_x2", "box_y2"]


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
    """One row per image: path, identity, status, reason, detector score, box, 5 landmarks, residual."""
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
    manifest["residual"] = np.array([d.residual for d in detections], dtype=np.float32)
    return manifest


def write_manifest(folder: Path, manifest: pd.DataFrame) -> None:
    manifest.to_parquet(Path(folder) / MANIFEST_FILE, index=False)


def read_manifest(folder: Path) -> pd.DataFrame:
    """The store's manifest; its row order is the row order of `faces.npy`."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found (run the align stage first)")
    return pd.read_parquet(path)


def usable_rows(manifest: pd.DataFrame) -> np.ndarray:
    """Rows holding a face (detected or fallback), i.e. all but unusable images."""
    return np.flatnonzero((manifest["status"] != "error").to_numpy())


def summarize(manifest: pd.DataFrame) -> dict[str, Any]:
    """Counts by status and the mean landmark residual of detected faces: facts of the store alone, so
    aligning the same photos again gives the same bytes (and DVC the same hash)."""
    counts = {status: int((manifest["status"] == status).sum()) for status in STATUSES}
    residual = manifest.loc[manifest["status"] == "ok", "residual"]
    return {
        "images": len(manifest),
        "counts": counts,
        "ok_fraction": counts["ok"] / max(len(manifest), 1),
        "mean_residual": float(residual.mean()) if len(residual) else float("nan"),
    }


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    write_json(Path(folder) / SUMMARY_FILE, summary)


def read_summary(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / SUMMARY_FILE
    return read_json(path) if path.exists() else None


def run_facts_path(folder: Path) -> Path:
    """Where the align or import run that wrote `folder` leaves its throughput: beside the store, not in
    it, since it changes from run to run while the store does not."""
    return Path(folder).parent / f".{Path(folder).name}.run.json"


def write_run_facts(folder: Path, images: int, seconds: float, **extra: Any) -> dict[str, Any]:
    """Throughput of the run that wrote `folder` (images it processed itself), at `run_facts_path`."""
    speed = images / seconds if images and seconds > 0 else float("nan")
    facts = {"images_per_second": speed, "seconds": seconds, **extra}
    write_json(run_facts_path(folder), facts)
    return facts


class ChunkCache:
    """Finished chunks of an align run, kept beside the output folder until the store is assembled.

    `<out_dir>/../.<name>.chunks/<key>/NNNNN.npy|.parquet`: the faces and manifest rows of chunk NNNNN.
    The key names the images and params, so a changed input never reuses stale chunks; the parquet
    file is written last and marks the chunk as done.
    """

    def __init__(self, out_dir: Path, key: str) -> None:
        root = Path(out_dir).parent / f".{Path(out_dir).name}.chunks"
        self.folder = root / key
        for stale in root.glob("*") if root.exists() else ():
            if stale.name != key:
                remove(stale)  # chunks of other images or params can never be used again
        self.folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.folder / f"{index:05d}.npy", self.folder / f"{index:05d}.parquet"

    def done(self, index: int) -> bool:
        return all(path.exists() for path in self._paths(index))

    def save(self, index: int, faces: np.ndarray, manifest: pd.DataFrame) -> None:
        faces_path, manifest_path = self._paths(index)
        with atomic_path(faces_path) as temp, open(temp, "wb") as handle:
            np.save(handle, faces)
        with atomic_path(manifest_path) as temp:
            manifest.to_parquet(temp, index=False)

    def _indices(self) -> list[int]:
        return sorted(int(p.stem) for p in self.folder.glob("*.parquet"))

    def manifest(self) -> pd.DataFrame:
        """All chunks' rows, in order."""
        parts = [pd.read_parquet(self._paths(i)[1]) for i in self._indices()]
        return pd.concat(parts, ignore_index=True)

    def assemble(self, folder: Path) -> None:
        """Write all chunks' faces into one memory-mappable `folder/faces.npy`."""
        indices = self._indices()
        rows = sum(np.load(self._paths(i)[0], mmap_mode="r").shape[0] for i in indices)
        faces = np.lib.format.open_memmap(
            Path(folder) / FACES_FILE, mode="w+", dtype=np.uint8, shape=(rows, *FACE_SHAPE)
        )
        start = 0
        for index in indices:
            part = np.load(self._paths(index)[0])
            faces[start : start + len(part)] = part
            start += len(part)
        faces.flush()
        del faces

    def clear(self) -> None:
        remove(self.folder.parent)


def write_contact_sheet(folder: Path, manifest: pd.DataFrame, columns: int = 12) -> Path:
    """A sheet to check alignment at a glance: a spread of aligned faces over the template's eye line,
    then every fallback (orange) and error (red) with its file and reason."""
    faces = np.load(Path(folder) / FACES_FILE, mmap_mode="r")
    status = manifest["status"].astype(str).to_numpy()
    ok = np.flatnonzero(status == "ok")
    shown = ok[np.linspace(0, len(ok) - 1, min(len(ok), columns * 6)).astype(int)] if len(ok) else ok
    problems = np.flatnonzero(status != "ok")[:200]
    cell, label, line = FACE_SHAPE[0] + 4, 12, 13
    grid_rows = max(1, math.ceil(len(shown) / columns))
    title_height = 20
    height = title_height + grid_rows * (cell + label) + (20 + len(problems) * (cell + 4) if len(problems) else 0)
    sheet = Image.new("RGB", (columns * cell, height), "white")
    draw = ImageDraw.Draw(sheet)
    counts = ", ".join(f"{s}: {(status == s).sum()}" for s in STATUSES)
    draw.text((4, 4), f"{len(manifest)} images ({counts}); green line: template eye height", fill="black")
    eye_y = 2 + round((51.6963 + 51.5014) / 2)  # the ArcFace template's eye line, plus the frame
    for slot, row in enumerate(shown):
        x, y = (slot % columns) * cell, title_height + (slot // columns) * (cell + label)
        sheet.paste(Image.fromarray(np.asarray(faces[row])), (x + 2, y + 2))
        draw.line((x + 2, y + eye_y, x + cell - 3, y + eye_y), fill=(0, 200, 0), width=1)
        draw.text((x + 2, y + cell), Path(str(manifest["path"].iat[row])).stem[:19], fill="black")
    y = title_height + grid_rows * (cell + label) + 4
    if len(problems):
        draw.text((4, y), f"not aligned cleanly: {(status != 'ok').sum()} (first {len(problems)} shown)", fill="black")
        y += 16
    colours = {"fallback": (255, 140, 0), "error": (220, 0, 0)}
    for row in problems:
        draw.rectangle((0, y, cell - 1, y + cell - 1), fill=colours[status[row]])
        sheet.paste(Image.fromarray(np.asarray(faces[row])), (2, y + 2))
        text = f"{manifest['path'].iat[row]}\n{status[row]}: {manifest['reason'].iat[row]}"
        for i, part in enumerate(_wrap(text, (columns - 1) * cell // 6)):
            draw.text((cell + 6, y + 4 + i * line), part, fill="black")
        y += cell + 4
    path = Path(folder) / CONTACT_SHEET_FILE
    sheet.save(path)
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        while len(paragraph) > width:
            lines.append(paragraph[:width])
            paragraph = paragraph[width:]
        lines.append(paragraph)
    return lines[:8]
