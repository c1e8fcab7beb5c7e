"""Align-stage speed against the plain baseline, on the same LFW photos in one run.

    python bench/align.py [--images data/raw/images] [--count 512] [--json bench-align.json]

baseline: facenet-pytorch's `MTCNN()` with its default settings, called one photo at a time, saving
          its crop (what a script written from its README does);
stage:    `arcface align` (params.yaml's align section) on the same photos: batched detection, face
          choice, similarity warp, the store, its manifest and contact sheet.
The photos are spread evenly over the sorted folder, so runs on the same data pick the same ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arcface.config import load_params
from arcface.data import align
from arcface.data.images import list_images


def pick(images_dir: Path, count: int) -> list[str]:
    listing = list_images(images_dir)
    if listing.empty:
        raise SystemExit(f"{images_dir}: no images; run `arcface download` first or pass --images")
    positions = np.linspace(0, len(listing) - 1, min(count, len(listing))).astype(int)
    return listing["path"].iloc[positions].tolist()


def baseline(images_dir: Path, paths: list[str], scratch: Path) -> float:
    from facenet_pytorch import MTCNN

    detector = MTCNN(device="cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    for index, relative in enumerate(paths):
        with Image.open(images_dir / relative) as photo:
            detector(photo.convert("RGB"), save_path=str(scratch / f"{index}.jpg"))
    return time.perf_counter() - started


def stage(images_dir: Path, paths: list[str], scratch: Path, params_file: Path) -> tuple[float, dict]:
    subset = scratch / "images"
    for relative in paths:
        (subset / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images_dir / relative, subset / relative)
    params = load_params(params_file).align
    started = time.perf_counter()
    result = align.run(params, subset, scratch / "aligned")
    return time.perf_counter() - started, result.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path("data/raw/images"))
    parser.add_argument("--count", type=int, default=512, help="photos to align (default: %(default)s)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    paths = pick(args.images, args.count)
    import facenet_pytorch  # noqa: F401 - imported once up front, so neither side pays for it

    with tempfile.TemporaryDirectory() as scratch:
        base_dir, stage_dir = Path(scratch) / "baseline", Path(scratch) / "stage"
        base_dir.mkdir()
        stage_dir.mkdir()
        stage_seconds, counts = stage(args.images, paths, stage_dir, args.params)
        base_seconds = baseline(args.images, paths, base_dir)
    rows = [
        {"method": "baseline: MTCNN() per photo", "seconds": base_seconds},
        {"method": "stage: arcface align", "seconds": stage_seconds},
    ]
    for row in rows:
        row["images_per_second"] = len(paths) / row["seconds"]
        row["speedup"] = base_seconds / row["seconds"]
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{len(paths)} photos from {args.images} on {device}; stage statuses: {counts}")
    print(f"{'method':<30} {'seconds':>8} {'img/s':>8} {'× baseline':>11}")
    for row in rows:
        print(
            f"{row['method']:<30} {row['seconds']:>8.1f} {row['images_per_second']:>8.1f} "
            f"{row['speedup']:>11.2f}"
        )
    if args.json:
        payload = {"photos": len(paths), "device": device, "counts": counts, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
