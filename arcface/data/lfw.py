"""The download stage (LFW images and protocol files) and the LFW protocol-file reader.

`run` fetches the image archive and the protocol files named in params (https/http/file URLs or
local paths), verifies every sha256, extracts the archive with explicit safety checks and publishes
`images/`, `protocols/` and `download.json` in one atomic rename. `read_pairs` turns an LFW pairs
file (View 1 or View 2) into a pandas DataFrame.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from tqdm import tqdm

from arcface.config import DownloadParams, Source
from arcface.files import atomic_path, read_json, sha256_file, write_json
from arcface.layout import PROTOCOL_FILES

logger = logging.getLogger(__name__)

RECORD_NAME = "download.json"
CACHE_NAME = ".download-cache"  # sibling of the stage's out_dir, e.g. data/.download-cache
RETRY_BACKOFF_S = 1.0  # wait before the 2nd try; doubles for each further try
USER_AGENT = "arcface-pipeline/0.1 (+python-urllib)"
PAIR_COLUMNS = ("fold", "path1", "path2", "name1", "name2", "same", "line")
_CHUNK = 1 << 16
_RECORD_FORMAT = 1


class DownloadError(RuntimeError):
    """A source could not be fetched, verified or extracted; the message names it and the reason."""


class ChecksumError(DownloadError):
    """A file's sha256 is not the expected one; the message shows both hashes."""


class ProtocolError(ValueError):
    """A malformed LFW protocol file, or one that names images that do not exist."""


@dataclass(frozen=True)
class DownloadResult:
    """What the download stage left in `out_dir`."""

    out_dir: Path
    images: int
    people: int
    downloaded: bool  # False when out_dir was already up to date and nothing was fetched


# --------------------------------------------------------------------------------------------------
# The stage


def run(params: DownloadParams, out_dir: Path) -> DownloadResult:
    """Fetch, verify and extract the chosen dataset into `out_dir`; no-op when it is up to date."""
    out_dir = Path(out_dir)
    wanted = wanted_sources(params)
    counts = _up_to_date_counts(out_dir, wanted)
    if counts is not None:
        result = DownloadResult(out_dir, *counts, downloaded=False)
        _log_summary(result, len(wanted) - 1)
        return result

    # Everything is fetched and verified before the output folder is touched.
    cache_dir = out_dir.parent / CACHE_NAME
    local = {
        key: fetch(source, cache_dir, timeout_s=params.timeout_s, attempts=params.attempts)
        for key, source in wanted.items()
    }
    with atomic_path(out_dir, directory=True) as temp:
        images_dir = temp / "images"
        images, people = extract_images(local["images"], images_dir)
        (temp / "protocols").mkdir()
        record = {"format": _RECORD_FORMAT, "images": images, "people": people, "sources": {}}
        for key, source in wanted.items():
            relative = "images" if key == "images" else f"protocols/{PROTOCOL_FILES[key]}"
            record["sources"][key] = {"url": source.url, "sha256": source.sha256, "path": relative}
            if key != "images":
                shutil.copyfile(local[key], temp / relative)
                # Checked here so that a bad protocol file never replaces a good download.
                _check_protocol(temp / relative, images_dir, wanted, key)
        write_json(temp / RECORD_NAME, record)
    result = DownloadResult(out_dir, images, people, downloaded=True)
    _log_summary(result, len(wanted) - 1)
    return result


def wanted_sources(params: DownloadParams) -> dict[str, Source]:
    """The chosen dataset's sources by key: `images` first, then the protocol files it lists."""
    sources = params.sources
    wanted = {"images": sources.images}
    for key in PROTOCOL_FILES:
        source = getattr(sources, key)
        if source is not None:
            wanted[key] = source
    return wanted


def count_images(images_dir: Path) -> tuple[int, int]:
    """(images, people) under `images/<Person>/<file>.jpg`; empty person folders don't count."""
    images = people = 0
    if not images_dir.is_dir():
        return 0, 0
    with os.scandir(images_dir) as persons:
        for person in persons:
            if not person.is_dir(follow_symlinks=False):
                continue
            with os.scandir(person.path) as files:
                found = sum(1 for f in files if _is_image(f.name) and f.is_file())
            images += found
            people += found > 0
    return images, people


def _up_to_date_counts(out_dir: Path, wanted: dict[str, Source]) -> tuple[int, int] | None:
    """(images, people) if download.json records exactly `wanted` and the folder matches it."""
    record_path = out_dir / RECORD_NAME
    if not record_path.is_file():
        return None
    try:
        record = read_json(record_path)
        recorded = {
            key: (entry["url"], entry["sha256"]) for key, entry in record["sources"].items()
        }
        counts = (int(record["images"]), int(record["people"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        logger.warning("%s is unreadable (%s); downloading again", record_path, err)
        return None
    if recorded != {key: (source.url, source.sha256) for key, source in wanted.items()}:
        logger.info("%s: the sources changed; downloading again", out_dir)
        return None
    # Counting files is cheap (no image is re-hashed) and catches a partly deleted folder.
    found = count_images(out_dir / "images")
    if found != counts:
        logger.warning(
            "%s: %d images of %d people on disk, %d of %d recorded; extracting again",
            out_dir,
            *found,
            *counts,
        )
        return None
    for key, source in wanted.items():
        if key == "images":
            continue
        # Protocol files are small, so hashing them costs nothing.
        path = out_dir / "protocols" / PROTOCOL_FILES[key]
        if not path.is_file() or sha256_file(path) != source.sha256:
            logger.warning("%s is missing or changed; downloading again", path)
            return None
    return counts


def _check_protocol(path: Path, images_dir: Path, wanted: dict[str, Source], key: str) -> None:
    label = f"{PROTOCOL_FILES[key]} ({wanted[key].url})"
    frame = _parse_pairs(_read_text(path, label), label)
    missing = _missing_images(frame, images_dir)
    if missing:
        where = f"the images archive {wanted['images'].url}"
        raise ProtocolError(_missing_message(label, where, missing))


def _log_summary(result: DownloadResult, protocols: int) -> None:
    state = "downloaded" if result.downloaded else "already up to date"
    logger.info(
        "download: %d images of %d people and %d protocol file(s) in %s (%s)",
        result.images,
        result.people,
        protocols,
        result.out_dir,
        state,
    )


# --------------------------------------------------------------------------------------------------
# Fetching and verifying


def fetch(source: Source, cache_dir: Path, timeout_s: float = 60.0, attempts: int = 3) -> Path:
    """A local file with `source`'s verified content: the local file itself or a cached download."""
    scheme = urllib.parse.urlsplit(source.url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(source, Path(cache_dir), timeout_s, attempts)
    if scheme == "file":
        path = _file_url_path(source.url)
    elif scheme == "":
        path = Path(source.url)  # relative to the current working directory
    else:
        raise DownloadError(
            f"{source.url}: unsupported URL scheme {scheme!r} (use https, http, file or a path)"
        )
    if not path.is_file():
        reason = "is a folder, not a file" if path.is_dir() else "no such file"
        raise DownloadError(f"could not read {source.url}: {reason} ({path.absolute()})")
    actual = sha256_file(path)
    if actual != source.sha256:
        raise ChecksumError(_checksum_message(source.url, source.sha256, actual))
    return path


def _file_url_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError(f"{url}: file URLs on another host ({parts.netloc}) are not supported")
    return Path(urllib.request.url2pathname(parts.path))


def _fetch_http(source: Source, cache_dir: Path, timeout_s: float, attempts: int) -> Path:
    url = source.url
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / source.sha256
    if final.is_file():
        if sha256_file(final) == source.sha256:
            logger.info("%s: using the cached copy %s", url, final)
            return final
        logger.warning("%s: cached copy is corrupt; downloading again", final)
        final.unlink()
    part = cache_dir / f"{source.sha256}.part"
    reason, cause = "", None
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            delay = RETRY_BACKOFF_S * 2 ** (attempt - 2)
            logger.warning(
                "%s: %s; retrying in %.1f s (try %d of %d)", url, reason, delay, attempt, attempts
            )
            time.sleep(delay)
        try:
            resumed = _download(url, part, timeout_s)
        except urllib.error.HTTPError as err:
            reason, cause = f"HTTP {err.code} {err.reason}", err
            if not _retryable_status(err.code):
                raise DownloadError(f"could not download {url}: {reason}") from err
            continue
        except (OSError, http.client.HTTPException) as err:
            # OSError covers URLError: refused connections, DNS failures, timeouts, resets.
            reason, cause = _network_reason(err), err
            continue
        actual = sha256_file(part)
        if actual == source.sha256:
            part.replace(final)
            return final
        part.unlink()  # never keep bad bytes where they could pass for a good download
        mismatch = _checksum_message(url, source.sha256, actual)
        if not resumed or attempt == attempts:
            raise ChecksumError(f"{mismatch}; the downloaded file was deleted")
        # The kept partial file may have come from another version of the file: start over once.
        reason, cause = f"{mismatch} after resuming a partial download; starting over", None
    message = f"could not download {url} after {attempts} attempt(s): {reason}"
    raise DownloadError(message) from cause


class _ShortRead(ConnectionError):
    """The server closed the connection before sending the promised number of bytes."""


def _download(url: str, part: Path, timeout_s: float) -> bool:
    """Fetch `url` into `part`, continuing a partial file if the server allows; True if resumed."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if offset and err.code == 416:
            # Nothing left after `offset`: the partial file is probably whole; its hash decides.
            err.close()
            return True
        raise
    with response:
        content_range = response.headers.get("Content-Range", "")
        resumed = offset > 0 and response.status == 206
        if resumed and not content_range.startswith(f"bytes {offset}-"):
            part.unlink()
            raise _ShortRead(f"asked for bytes {offset}- but got {content_range!r}; starting over")
        if offset and not resumed:
            logger.info("%s: no resume (HTTP %d); starting over", url, response.status)
        start = offset if resumed else 0
        length = response.headers.get("Content-Length", "")
        expected = int(length) if length.isdigit() else None
        total = start + expected if expected is not None else None
        received = 0
        name = PurePosixPath(urllib.parse.urlsplit(url).path).name or url
        with (
            open(part, "ab" if resumed else "wb") as handle,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                disable=None,
            ) as bar,
        ):
            while chunk := response.read(_CHUNK):
                handle.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client returns a short body without complaint when the connection drops; check it here.
    if expected is not None and received < expected:
        raise _ShortRead(f"connection closed after {start + received} of {total} bytes")
    return resumed


def _retryable_status(code: int) -> bool:
    # Client errors such as 404 or 403 will not change by asking again.
    return code >= 500 or code in (408, 429)


def _network_reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _checksum_message(where: str, expected: str, actual: str) -> str:
    return f"checksum mismatch for {where}: expected sha256 {expected}, got {actual}"


# --------------------------------------------------------------------------------------------------
# Safe extraction


def extract_images(archive: Path, target: Path) -> tuple[int, int]:
    """Extract the `<Person>/<file>.jpg` members of a tar archive into `target`; (images, people).

    Every member is checked before anything is written; links, devices, absolute paths and `..`
    are refused. A single top-level folder (`lfw/`, `lfw-deepfunneled/`) is stripped.
    """
    archive, target = Path(archive), Path(target)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            plan = _plan_extraction(archive, members, target)
            target.mkdir(parents=True, exist_ok=True)
            for member, relative in tqdm(plan, desc=f"extract {archive.name}", disable=None):
                destination = target.joinpath(*relative)
                destination.parent.mkdir(exist_ok=True)
                source = tar.extractfile(member)
                if source is None:  # unreachable for regular files; keeps the type checker honest
                    raise DownloadError(f"{archive}: member {member.name!r} has no data")
                with source, open(destination, "wb") as handle:
                    shutil.copyfileobj(source, handle, _CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        message = f"{archive}: not a readable tar archive, or a truncated one ({err})"
        raise DownloadError(message) from err
    return count_images(target)


def _plan_extraction(
    archive: Path, members: list[tarfile.TarInfo], target: Path
) -> list[tuple[tarfile.TarInfo, tuple[str, ...]]]:
    """Check every member; return the image members with their path relative to `target`."""
    checked = [(member, _checked_parts(archive, member, target)) for member in members]
    checked = [(member, parts) for member, parts in checked if parts]
    tops = {parts[0] for _, parts in checked}
    files = [(member, parts) for member, parts in checked if member.isreg()]
    # One top-level folder holding person folders is stripped; person folders at the top are kept.
    strip = len(tops) == 1 and any(len(parts) >= 3 for _, parts in files)
    plan, skipped = [], []
    for member, parts in files:
        relative = parts[1:] if strip else parts
        if len(relative) == 2 and _is_image(relative[1]):
            plan.append((member, relative))
        else:
            skipped.append(member.name)
    if skipped:
        logger.warning(
            "%s: skipped %d member(s) that are not <Person>/<image>.jpg, e.g. %r",
            archive,
            len(skipped),
            skipped[0],
        )
    if not plan:
        raise DownloadError(
            f"{archive}: no <Person>/<Person>_NNNN.jpg images found (expected person folders, "
            "at the top or inside one top-level folder)"
        )
    return plan


def _checked_parts(archive: Path, member: tarfile.TarInfo, target: Path) -> tuple[str, ...]:
    """The member's path components, or a DownloadError naming the archive, member and reason."""

    def refuse(reason: str) -> DownloadError:
        return DownloadError(f"{archive}: refusing to extract member {member.name!r}: {reason}")

    if member.issym():
        raise refuse(f"it is a symbolic link (to {member.linkname!r})")
    if member.islnk():
        raise refuse(f"it is a hard link (to {member.linkname!r})")
    if member.ischr() or member.isblk():
        raise refuse("it is a device file")
    if member.isfifo():
        raise refuse("it is a FIFO")
    if not (member.isreg() or member.isdir()):
        raise refuse("only regular files and folders are allowed")
    name = member.name
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or _has_drive(name):
        raise refuse("absolute path")
    parts = tuple(part for part in PurePosixPath(name).parts if part not in ("", "."))
    if ".." in parts or any(".." in part.split("\\") for part in parts):
        raise refuse("the path contains '..'")
    root = os.path.abspath(target)
    destination = os.path.abspath(os.path.join(root, *parts))
    if os.path.commonpath([root, destination]) != root:
        raise refuse(f"it would land outside {target}")
    # Second line of defence: the stdlib's own policy for untrusted archives (Python >= 3.11.4).
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is not None:
        try:
            data_filter(member, root)
        except tarfile.FilterError as err:
            raise refuse(str(err)) from err
    return parts


def _has_drive(name: str) -> bool:
    # `C:foo` or `C:\foo` would be absolute on Windows; no LFW member looks like that.
    return len(name) >= 2 and name[1] == ":" and name[0].isalpha()


def _is_image(name: str) -> bool:
    return name.lower().endswith(".jpg")


# --------------------------------------------------------------------------------------------------
# Protocol files


def image_path(name: str, number: int) -> str:
    """LFW's relative image path: `<name>/<name>_<NNNN>.jpg` (1-based, 4 digits)."""
    return f"{name}/{name}_{number:04d}.jpg"


def read_pairs(path: str | Path) -> pd.DataFrame:
    """An LFW pairs file (View 1 or View 2) as one row per pair: fold, path1, path2, name1, name2,
    same, line (1-based line number in the file)."""
    path = Path(path)
    return _parse_pairs(_read_text(path, str(path)), str(path))


def protocol_identities(pairs: pd.DataFrame) -> set[str]:
    """Every person named in a pairs table."""
    return set(pairs["name1"]).union(pairs["name2"])


def check_pairs_exist(pairs: pd.DataFrame, images_dir: Path, protocol_path: str | Path) -> None:
    """Raise ProtocolError listing (up to 5) pair images that are not files under `images_dir`."""
    missing = _missing_images(pairs, Path(images_dir))
    if missing:
        raise ProtocolError(_missing_message(str(protocol_path), str(images_dir), missing))


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolError(f"{label}: not a UTF-8 text file ({err})") from err


def _parse_pairs(text: str, label: str) -> pd.DataFrame:
    # Blank lines (a trailing newline, CRLF leftovers) carry nothing; line numbers stay the file's.
    lines = [(number, line.split()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, fields) for number, fields in lines if fields]
    if not lines:
        raise ProtocolError(f"{label}: line 1: empty file (expected a header line, then pairs)")
    (header_line, header), body = lines[0], lines[1:]
    folds, per_block = _parse_header(label, header_line, header)
    total = folds * 2 * per_block
    columns: dict[str, list[Any]] = {column: [] for column in PAIR_COLUMNS}
    rows = iter(body)
    for fold in range(folds):
        # Each fold lists `per_block` matched pairs, then `per_block` mismatched pairs.
        for same in (True, False):
            for _ in range(per_block):
                number, fields = next(rows, (None, None))
                if number is None:
                    last = body[-1][0] if body else header_line
                    raise ProtocolError(
                        f"{label}: line {last}: the file ends after {len(body)} pair line(s), but "
                        f"the header (line {header_line}) promises {total} "
                        f"({folds} fold(s) × {per_block} matched + {per_block} mismatched)"
                    )
                name1, first, name2, second = _parse_pair(label, number, fields, same, fold)
                columns["fold"].append(fold)
                columns["path1"].append(image_path(name1, first))
                columns["path2"].append(image_path(name2, second))
                columns["name1"].append(name1)
                columns["name2"].append(name2)
                columns["same"].append(same)
                columns["line"].append(number)
    extra = next(rows, None)
    if extra is not None:
        raise ProtocolError(
            f"{label}: line {extra[0]}: unexpected extra line; the header (line {header_line}) "
            f"promises {total} pair lines and the file has {len(body)}"
        )
    frame = pd.DataFrame(columns)
    return frame.astype({"fold": "int64", "same": "bool", "line": "int64"})


def _parse_header(label: str, number: int, fields: list[str]) -> tuple[int, int]:
    """(folds, pairs of each kind per fold) from `N` (View 1) or `FOLDS N` (View 2)."""
    if len(fields) in (1, 2) and all(_is_count(field) for field in fields):
        values = [int(field) for field in fields]
        if all(value > 0 for value in values):
            return (1, values[0]) if len(values) == 1 else (values[0], values[1])
    raise ProtocolError(
        f"{label}: line {number}: the header must be 'N' (View 1) or 'FOLDS<TAB>N' (View 2) with "
        f"positive whole numbers, got {' '.join(fields)!r}"
    )


def _parse_pair(
    label: str, number: int, fields: list[str], same: bool, fold: int
) -> tuple[str, int, str, int]:
    wanted = 3 if same else 4
    if len(fields) != wanted:
        kind = "matched pair 'name i j'" if same else "mismatched pair 'name1 i name2 j'"
        looks_like = {3: "a matched pair", 4: "a mismatched pair"}.get(len(fields))
        hint = f" ({looks_like}: the header's count disagrees with the lines)" if looks_like else ""
        raise ProtocolError(
            f"{label}: line {number}: expected a {kind} ({wanted} fields) in fold {fold + 1}, "
            f"got {len(fields)} field(s){hint}"
        )
    if same:
        name1, first, second = fields
        name2 = name1
    else:
        name1, first, name2, second = fields
    for name in (name1, name2):
        # Names become folder names, so they must not be able to point elsewhere.
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ProtocolError(f"{label}: line {number}: {name!r} is not a valid person name")
    return (
        name1,
        _image_number(label, number, first),
        name2,
        _image_number(label, number, second),
    )


def _image_number(label: str, number: int, field: str) -> int:
    if not _is_count(field):
        raise ProtocolError(f"{label}: line {number}: image number {field!r} is not a whole number")
    value = int(field)
    if value < 1:
        raise ProtocolError(f"{label}: line {number}: image numbers start at 1, got {value}")
    return value


def _is_count(field: str) -> bool:
    return field.isascii() and field.isdigit()


def _missing_images(pairs: pd.DataFrame, images_dir: Path) -> list[tuple[int, str]]:
    """(line, relative path) of every pair image that is not a file, in file order."""
    exists: dict[str, bool] = {}
    missing = []
    for line, path1, path2 in zip(pairs["line"], pairs["path1"], pairs["path2"], strict=True):
        for relative in (path1, path2):
            if relative not in exists:
                exists[relative] = (images_dir / relative).is_file()
            if not exists[relative]:
                missing.append((int(line), relative))
    return missing


def _missing_message(label: str, where: str, missing: list[tuple[int, str]]) -> str:
    shown = "; ".join(f"line {line}: {relative}" for line, relative in missing[:5])
    more = f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"{label}: {len(missing)} pair image(s) not found in {where}: {shown}{more}"
