"""insightface's packed training sets (CASIA-WebFace, MS1M...): MXNet RecordIO read and written without mxnet.

A `.rec` file is a sequence of records, each `magic (u32) | lrecord (u32) | data | padding to 4 bytes`,
where lrecord's top 3 bits are a continuation flag and the low 29 the data length. A writer splits data at
every 4-byte-aligned copy of the magic number (dropping it; the reader puts it back between the parts).
The `.idx` file maps record keys to byte offsets, one `key<TAB>offset` per line.

A face record's data is an image header `flag (u32) | label (f32) | id (u64) | id2 (u64)`, `flag` extra
float32 labels when flag > 0, then the encoded image. In insightface's sets, record 0 is an index record
(flag > 0) whose first label is the key of the first identity record: faces are the keys before it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_RECORD_HEADER = struct.Struct("<II")
_IMAGE_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """A damaged or unexpected .rec/.idx file; the message names the file and the offset."""


@dataclass(frozen=True)
class FaceRecord:
    labels: tuple[float, ...]  # usually one: the identity
    image: bytes  # the encoded image (JPEG or PNG)

    @property
    def identity(self) -> int:
        return int(self.labels[0])


def pack_face(labels: tuple[float, ...], image: bytes) -> bytes:
    """The data of one face record (what `unpack_face` reads)."""
    if len(labels) == 1:
        return _IMAGE_HEADER.pack(0, labels[0], 0, 0) + image
    extra = struct.pack(f"<{len(labels)}f", *labels)
    return _IMAGE_HEADER.pack(len(labels), 0.0, 0, 0) + extra + image


def unpack_face(data: bytes) -> FaceRecord:
    flag, label, _, _ = _IMAGE_HEADER.unpack_from(data)
    start = _IMAGE_HEADER.size
    if flag > 0:
        labels = struct.unpack_from(f"<{flag}f", data, start)
        return FaceRecord(tuple(labels), data[start + 4 * flag :])
    return FaceRecord((label,), data[start:])


class RecordReader:
    """Random access to the records of a `.rec` file through its `.idx`."""

    def __init__(self, rec_path: Path, idx_path: Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not found")
        self.offsets: dict[int, int] = {}
        for number, line in enumerate(self.idx_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                key, offset = line.split("\t")
                self.offsets[int(key)] = int(offset)
            except ValueError as err:
                raise RecordIOError(f"{self.idx_path}:{number}: expected key<TAB>offset, got {line!r}") from err
        self._file = open(self.rec_path, "rb")  # noqa: SIM115 - closed by close()/__exit__

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, key: int) -> bytes:
        """The data of record `key`, its parts joined again."""
        if key not in self.offsets:
            raise KeyError(f"{self.rec_path}: no record {key} in {self.idx_path}")
        self._file.seek(self.offsets[key])
        parts = []
        while True:
            position = self._file.tell()
            head = self._file.read(_RECORD_HEADER.size)
            if len(head) < _RECORD_HEADER.size:
                raise RecordIOError(f"{self.rec_path}: truncated record header at byte {position}")
            magic, lrecord = _RECORD_HEADER.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(f"{self.rec_path}: bad magic {magic:#x} at byte {position}")
            flag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            data = self._file.read(length)
            if len(data) < length:
                raise RecordIOError(f"{self.rec_path}: truncated record at byte {position}")
            self._file.read((4 - length % 4) % 4)
            parts.append(data)
            if flag in (0, 3):  # a whole record, or the last part of a split one
                return _MAGIC_BYTES.join(parts)

    def face(self, key: int) -> FaceRecord:
        return unpack_face(self.read(key))

    def face_keys(self) -> list[int]:
        """Keys of face records: before insightface's identity records when record 0 indexes them."""
        keys = sorted(self.offsets)
        if keys and keys[0] == 0:
            header = self.face(0)
            if len(header.labels) >= 2:  # the index record: (first identity key, end)
                first_identity = int(header.labels[0])
                return [key for key in keys if 0 < key < first_identity]
        return keys

    def faces(self) -> Iterator[tuple[int, FaceRecord]]:
        for key in self.face_keys():
            yield key, self.face(key)


class RecordWriter:
    """Writes `.rec` + `.idx` the way MXNet does (used by the tests and to pack your own sets)."""

    def __init__(self, rec_path: Path, idx_path: Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self._rec = open(self.rec_path, "wb")  # noqa: SIM115 - closed by close()/__exit__
        self._index: list[str] = []

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def write(self, key: int, data: bytes) -> None:
        self._index.append(f"{key}\t{self._rec.tell()}")
        parts = _split_at_magic(data)
        for number, part in enumerate(parts):
            if len(parts) == 1:
                flag = 0
            else:
                flag = 1 if number == 0 else 3 if number == len(parts) - 1 else 2
            self._rec.write(_RECORD_HEADER.pack(MAGIC, (flag << 29) | len(part)))
            self._rec.write(part + b"\0" * ((4 - len(part) % 4) % 4))

    def close(self) -> None:
        if not self._rec.closed:
            self._rec.close()
            self.idx_path.write_text("\n".join(self._index) + "\n")


def _split_at_magic(data: bytes) -> list[bytes]:
    """Cut data at each 4-byte-aligned magic number, dropping it (a reader could mistake it for a start)."""
    parts, start = [], 0
    for position in range(0, len(data) - 3, 4):
        if data[position : position + 4] == _MAGIC_BYTES:
            parts.append(data[start:position])
            start = position + 4
    parts.append(data[start:])
    return parts
