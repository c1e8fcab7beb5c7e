"""Reading photos: any image file PIL can read becomes (H, W, 3) uint8 RGB, or a clear reason why not.

Batches for the detector hold images of one size (MTCNN runs a whole batch through one image pyramid) and
are decoded on a background thread while the previous batch is being detected; PIL releases the GIL
while it decodes.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from typing import TypeVar

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

T = TypeVar("T")


class ImageReadError(ValueError):
    """A file that can't be used as a photo; the message is the reason."""


def load_rgb(path: Path | BinaryIO, max_pixels: int = 50_000_000, min_side: int = 1) -> np.ndarray:
    """Decode an image (a path or an open binary file) to (H, W, 3) uint8 RGB.

    Greyscale, palette, RGBA, CMYK and 16-bit images are converted; the size is checked from the header
    before anything is decoded, so a decompression bomb costs nothing.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        f"image too large: {width}x{height} = {width * height:,} pixels "
                        f"(align.max_image_pixels = {max_pixels:,})"
                    )
                if min(width, height) < min_side:
                    raise ImageReadError(
                        f"image too small: {width}x{height} (align.min_image_side = {min_side})"
                    )
                image.load()  # decode now: truncated data fails here, not later
                return _to_rgb(ImageOps.exif_transpose(image))
    except ImageReadError:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise ImageReadError(f"unreadable image: {type(err).__name__}: {err}") from err


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16/32-bit greyscale: scale to 8 bits by the image's own range rather than clip to white.
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels over white, not over whatever colour they happen to store.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"))


def list_images(images_dir: Path) -> pd.DataFrame:
    """`<identity>/<file>` images under `images_dir`, sorted, as columns path and identity."""
    paths = sorted(
        p.relative_to(images_dir).as_posix()
        for p in Path(images_dir).glob("*/*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    return pd.DataFrame({"path": paths, "identity": [p.split("/")[0] for p in paths]})


@dataclass
class ImageBatch:
    """Consecutive rows: the decoded images (all one size) and the rows that failed to decode."""

    seen: int = 0
    rows: list[int] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)

    def fits(self, image: np.ndarray) -> bool:
        return not self.images or image.shape == self.images[0].shape


def decoded_batches(
    images_dir: Path,
    paths: Sequence[str],
    rows: Sequence[int],
    batch_size: int,
    max_pixels: int,
    min_side: int,
) -> Iterator[ImageBatch]:
    """Decode `paths` (manifest `rows`) in order into batches of at most `batch_size` rows, on a
    background thread; an image of a new size starts a new batch."""

    def produce() -> Iterator[ImageBatch]:
        batch = ImageBatch()
        for row, relative in zip(rows, paths, strict=True):
            try:
                image = load_rgb(Path(images_dir) / relative, max_pixels, min_side)
            except ImageReadError as err:
                batch.errors[row] = str(err)
            else:
                if not batch.fits(image):
                    yield batch
                    batch = ImageBatch()
                batch.rows.append(row)
                batch.images.append(image)
            batch.seen += 1
            if batch.seen >= batch_size:
                yield batch
                batch = ImageBatch()
        if batch.seen:
            yield batch

    return prefetch(produce(), depth=2)


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `items` on a background thread, keeping up to `depth` ready; errors are re-raised here."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put(item)
        except BaseException as err:  # handed to the consumer, which raises it
            ready.put(err)
        ready.put(done)

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Unblock a producer waiting on a full queue so the thread can end.
        while thread.is_alive():
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
