"""Small file helpers shared by the stages: atomic outputs and checksums."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target`, on error it is removed.

    The temporary lives in the same folder so the final rename is atomic: an interrupted stage never
    leaves a half-written output under the real name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(handle)
        temp = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual umask permissions.
    temp.chmod((0o777 if directory else 0o666) & ~_umask())
    try:
        yield temp
        if directory and target.exists():
            # Two renames: the old folder is moved aside first because rename can't replace a folder.
            old = target.with_name(f".{target.name}.old")
            remove(old)
            target.rename(old)
            temp.rename(target)
            remove(old)
        else:
            temp.replace(target)
    except BaseException:
        remove(temp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON atomically, pretty-printed with sorted keys so diffs stay small."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())
