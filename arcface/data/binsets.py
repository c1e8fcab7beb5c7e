"""insightface's verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...), read safely.

Each file is a pickle of `(images, is_same)`: a list of 2·P encoded 112×112 aligned faces (JPEG/PNG bytes,
pairs are consecutive) and P booleans. Unpickling can run arbitrary code, so `load_bin` uses an unpickler
that resolves no global at all: lists, tuples, bytes, bools and numbers are all such a file needs, and
anything else (a class, a function, `os.system`) is refused before it can run.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FACE = (112, 112, 3)


class BinSetError(ValueError):
    """A .bin file that isn't a verification set of aligned faces; the message names the file."""


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds containers and scalars only: every request for a global (class, function) is refused, but
    for `_codecs.encode`, which protocol-2 pickles written by Python 3 use to rebuild `bytes` (it only
    turns a str into bytes)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


@dataclass(frozen=True)
class VerificationSet:
    name: str
    faces: np.ndarray  # (2P, 112, 112, 3) uint8; pair i is faces[2i], faces[2i + 1]
    same: np.ndarray  # (P,) bool


def load_bin(path: Path) -> VerificationSet:
    """Read and decode a verification set; raises BinSetError naming the file and what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            # Python 2 pickles (insightface's) hold str as bytes: encoding="bytes" keeps them raw.
            content = _DataOnlyUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        raise BinSetError(f"{path}: refused ({err})") from err
    except Exception as err:
        raise BinSetError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from err
    if not (isinstance(content, tuple | list) and len(content) == 2):
        raise BinSetError(f"{path}: expected a pair (images, is_same), found {type(content).__name__}")
    images, same = content
    if not isinstance(images, list | tuple) or not all(isinstance(i, bytes | bytearray) for i in images):
        raise BinSetError(f"{path}: the images must be a list of encoded images (bytes)")
    same = np.asarray(same, dtype=bool).reshape(-1)
    if len(images) != 2 * len(same):
        raise BinSetError(f"{path}: {len(images)} images for {len(same)} pairs (expected {2 * len(same)})")
    faces = np.empty((len(images), *FACE), dtype=np.uint8)
    for index, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as image:
                face = np.asarray(image.convert("RGB"))
        except Exception as err:
            raise BinSetError(f"{path}: image {index} can't be decoded ({err})") from err
        if face.shape != FACE:
            raise BinSetError(f"{path}: image {index} is {face.shape[1]}×{face.shape[0]}, expected 112×112")
        faces[index] = face
    return VerificationSet(path.stem, faces, same)


def write_bin(path: Path, faces: np.ndarray, same: np.ndarray) -> None:
    """Write a verification set in insightface's format (JPEG-encoded faces), e.g. to test a model."""
    encoded = []
    for face in faces:
        buffer = io.BytesIO()
        Image.fromarray(face).save(buffer, "JPEG", quality=95)
        encoded.append(buffer.getvalue())
    with open(path, "wb") as handle:
        pickle.dump((encoded, [bool(s) for s in same]), handle, protocol=4)
