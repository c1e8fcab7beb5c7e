"""The download stage: http/file/path sources, checksums, resume, safe extraction, atomic output."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_server import FileServer, closed_port, serve

from arcface.config import DownloadParams
from arcface.data import lfw
from arcface.data.lfw import ChecksumError, DownloadError, DownloadResult, ProtocolError
from arcface.files import sha256_file

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
SAMPLE_TGZ = SAMPLE_DIR / "lfw-sample.tgz"
SAMPLE_PAIRS = SAMPLE_DIR / "pairs.txt"
TGZ_SHA = sha256_file(SAMPLE_TGZ)
PAIRS_SHA = sha256_file(SAMPLE_PAIRS)
WRONG_SHA = "0" * 64
SAMPLE_IMAGES, SAMPLE_PEOPLE = 920, 230
FIRST_IMAGE = "Abdullah_Gul/Abdullah_Gul_0001.jpg"


def make_params(
    images: tuple[str, str],
    pairs: tuple[str, str] | None = None,
    attempts: int = 3,
    **protocols: tuple[str, str],
) -> DownloadParams:
    """DownloadParams whose chosen ("sample") dataset has these (url, sha256) sources."""
    sources = {"images": {"url": images[0], "sha256": images[1]}}
    if pairs is not None:
        protocols["pairs"] = pairs
    for key, (url, sha) in protocols.items():
        sources[key] = {"url": url, "sha256": sha}
    return DownloadParams.model_validate(
        {"sample": sources, "lfw": sources, "timeout_s": 5.0, "attempts": attempts}
    )


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file: a rewritten or replaced file changes its mtime."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Temporary folders of atomic_path (`.raw.*.tmp`, `.raw.old`) left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".tmp", ".old")))


def sample_member(name: str) -> bytes:
    with tarfile.open(SAMPLE_TGZ) as tar:
        handle = tar.extractfile(f"lfw-sample/{name}")
        assert handle is not None
        return handle.read()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_archive(path: Path, names: list[str], extra: tarfile.TarInfo | None = None) -> str:
    """A .tgz of a few real sample faces stored under `names` (+ one extra member); its sha256."""
    face = sample_member(FIRST_IMAGE)
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            add_bytes(tar, name, face)
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size) if extra.isreg() else None)
    return sha256_file(path)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lfw, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(SAMPLE_TGZ, root)
    shutil.copy(SAMPLE_PAIRS, root)
    with serve(root) as running:
        yield running


@pytest.fixture(scope="session")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> DownloadParams:
    """Sources of a small real-face dataset (12 sample images, a View 1 file) for earlier runs."""
    folder = tmp_path_factory.mktemp("small")
    archive, pairs = folder / "small.tgz", folder / "pairsDevTrain.txt"
    with tarfile.open(SAMPLE_TGZ) as sample, tarfile.open(archive, "w:gz") as small:
        for member in sample.getmembers()[:12]:
            handle = sample.extractfile(member)
            assert handle is not None
            add_bytes(small, member.name, handle.read())
    pairs.write_text("1\nAbdullah_Gul\t1\t2\nAbdullah_Gul\t3\tAbel_Pacheco\t1\n")
    return make_params((str(archive), sha256_file(archive)), pairs_dev_train=(str(pairs), sha256_file(pairs)))


@pytest.fixture
def good_out(tmp_path: Path, small_set: DownloadParams) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A finished earlier download in tmp/data/raw, and its snapshot."""
    out_dir = tmp_path / "data" / "raw"
    result = lfw.run(small_set, out_dir)
    assert result == DownloadResult(out_dir, 12, 3, downloaded=True)
    return out_dir, snapshot(out_dir)


def assert_intact(good: tuple[Path, dict[str, tuple[int, int]]]) -> None:
    out_dir, before = good
    assert snapshot(out_dir) == before
    assert leftovers(out_dir.parent) == []


# --------------------------------------------------------------------------------------------------
# Sources


def test_http_download_then_up_to_date(server: FileServer, tmp_path: Path) -> None:
    out_dir = tmp_path / "data" / "raw"
    params = make_params((server.url("lfw-sample.tgz"), TGZ_SHA), (server.url("pairs.txt"), PAIRS_SHA))

    result = lfw.run(params, out_dir)

    assert result == DownloadResult(out_dir, SAMPLE_IMAGES, SAMPLE_PEOPLE, downloaded=True)
    assert lfw.count_images(out_dir / "images") == (SAMPLE_IMAGES, SAMPLE_PEOPLE)
    assert not (out_dir / "images" / "lfw-sample").exists()  # the top-level folder is stripped
    assert (out_dir / "images" / FIRST_IMAGE).read_bytes() == sample_member(FIRST_IMAGE)
    assert (out_dir / "protocols" / "pairs.txt").read_bytes() == SAMPLE_PAIRS.read_bytes()
    record = json.loads((out_dir / "download.json").read_text())
    assert record["images"] == SAMPLE_IMAGES and record["people"] == SAMPLE_PEOPLE
    assert record["sources"]["images"]["url"] == server.url("lfw-sample.tgz")
    assert record["sources"]["images"]["sha256"] == TGZ_SHA
    assert record["sources"]["pairs"]["sha256"] == PAIRS_SHA
    cache = tmp_path / "data" / ".download-cache"
    assert sorted(p.name for p in cache.iterdir()) == sorted([TGZ_SHA, PAIRS_SHA])
    assert [r.range for r in server.requests] == [None, None]
    assert leftovers(out_dir.parent) == []

    before = snapshot(out_dir)
    again = lfw.run(params, out_dir)
    assert again == DownloadResult(out_dir, SAMPLE_IMAGES, SAMPLE_PEOPLE, downloaded=False)
    assert len(server.requests) == 2  # no request at all
    assert snapshot(out_dir) == before

    # Output gone but the cache kept: extracted again without touching the network.
    shutil.rmtree(out_dir)
    assert lfw.run(params, out_dir).downloaded
    assert len(server.requests) == 2
    assert lfw.count_images(out_dir / "images") == (SAMPLE_IMAGES, SAMPLE_PEOPLE)


@pytest.mark.parametrize("kind", ["file_url", "absolute_path", "relative_path"])
def test_local_sources(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source_dir = tmp_path / "my sources"  # a space, to exercise file-URL quoting
    source_dir.mkdir()
    shutil.copy(SAMPLE_TGZ, source_dir)
    shutil.copy(SAMPLE_PAIRS, source_dir)
    monkeypatch.chdir(tmp_path)
    urls = {
        "file_url": lambda name: (source_dir / name).as_uri(),
        "absolute_path": lambda name: str(source_dir / name),
        "relative_path": lambda name: f"my sources/{name}",
    }[kind]
    out_dir = tmp_path / "data" / "raw"

    result = lfw.run(make_params((urls("lfw-sample.tgz"), TGZ_SHA), (urls("pairs.txt"), PAIRS_SHA)), out_dir)

    assert result == DownloadResult(out_dir, SAMPLE_IMAGES, SAMPLE_PEOPLE, downloaded=True)
    assert (out_dir / "protocols" / "pairs.txt").read_bytes() == SAMPLE_PAIRS.read_bytes()
    assert (out_dir / "images" / FIRST_IMAGE).read_bytes() == sample_member(FIRST_IMAGE)
    assert not (tmp_path / "data" / ".download-cache").exists()  # hashed in place, not copied


def test_changed_sources_or_damaged_output_run_again(
    good_out: tuple[Path, dict[str, tuple[int, int]]],
) -> None:
    out_dir, _ = good_out
    assert (out_dir / "protocols" / "pairsDevTrain.txt").is_file()
    without_pairs = make_params((str(SAMPLE_TGZ), TGZ_SHA))
    result = lfw.run(without_pairs, out_dir)
    assert result == DownloadResult(out_dir, SAMPLE_IMAGES, SAMPLE_PEOPLE, downloaded=True)
    assert list((out_dir / "protocols").iterdir()) == []
    assert not lfw.run(without_pairs, out_dir).downloaded

    (out_dir / "images" / FIRST_IMAGE).unlink()
    repaired = lfw.run(without_pairs, out_dir)
    assert repaired == DownloadResult(out_dir, SAMPLE_IMAGES, SAMPLE_PEOPLE, downloaded=True)
    assert (out_dir / "images" / FIRST_IMAGE).read_bytes() == sample_member(FIRST_IMAGE)


def test_unreadable_record_runs_again(
    good_out: tuple[Path, dict[str, tuple[int, int]]], small_set: DownloadParams
) -> None:
    out_dir, _ = good_out
    assert not lfw.run(small_set, out_dir).downloaded
    (out_dir / "download.json").write_text("{not json")
    assert lfw.run(small_set, out_dir).downloaded
    assert json.loads((out_dir / "download.json").read_text())["images"] == 12


# --------------------------------------------------------------------------------------------------
# Checksums and unreachable sources


def test_wrong_checksum_over_http(server: FileServer, good_out: tuple[Path, dict]) -> None:
    out_dir, _ = good_out
    url = server.url("lfw-sample.tgz")

    with pytest.raises(ChecksumError) as caught:
        lfw.run(make_params((url, WRONG_SHA)), out_dir)

    message = str(caught.value)
    assert url in message and f"expected sha256 {WRONG_SHA}" in message and TGZ_SHA in message
    cache = out_dir.parent / ".download-cache"
    assert list(cache.iterdir()) == []  # neither the bad file nor a .part is kept
    assert len(server.gets("lfw-sample.tgz")) == 1  # a full download that mismatches isn't retried
    assert_intact(good_out)


def test_wrong_checksum_local(tmp_path: Path, good_out: tuple[Path, dict]) -> None:
    out_dir, _ = good_out
    with pytest.raises(ChecksumError) as caught:
        lfw.run(make_params((str(SAMPLE_TGZ), TGZ_SHA), (str(SAMPLE_PAIRS), WRONG_SHA)), out_dir)
    message = str(caught.value)
    assert str(SAMPLE_PAIRS) in message and WRONG_SHA in message and PAIRS_SHA in message
    assert sha256_file(SAMPLE_PAIRS) == PAIRS_SHA  # a local source is never deleted
    assert_intact(good_out)


@pytest.mark.parametrize("case", ["closed_port", "http_404", "missing_path", "missing_file_url"])
def test_unreachable_source(
    case: str, server: FileServer, tmp_path: Path, good_out: tuple[Path, dict]
) -> None:
    out_dir, _ = good_out
    url, reason = {
        "closed_port": (f"http://127.0.0.1:{closed_port()}/lfw.tgz", "refused"),
        "http_404": (server.url("no-such.tgz"), "HTTP 404"),
        "missing_path": (str(tmp_path / "no-such.tgz"), "no such file"),
        "missing_file_url": ((tmp_path / "no-such.tgz").as_uri(), "no such file"),
    }[case]

    with pytest.raises(DownloadError) as caught:
        lfw.run(make_params((url, TGZ_SHA), attempts=2), out_dir)

    assert not isinstance(caught.value, ChecksumError)
    message = str(caught.value)
    assert url in message and reason in message
    if case == "closed_port":
        assert "after 2 attempt(s)" in message
    if case == "http_404":
        assert len(server.gets("no-such.tgz")) == 1  # a 404 won't change by asking again
    assert_intact(good_out)


def test_unsupported_scheme(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"ftp://example\.org/lfw\.tgz: unsupported URL scheme"):
        lfw.run(make_params(("ftp://example.org/lfw.tgz", TGZ_SHA)), tmp_path / "raw")


# --------------------------------------------------------------------------------------------------
# Interrupted downloads


def test_interrupted_download_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    server.cut_after = [1_000_000]
    out_dir = tmp_path / "data" / "raw"

    result = lfw.run(make_params((server.url("lfw-sample.tgz"), TGZ_SHA)), out_dir)

    assert result.images == SAMPLE_IMAGES and result.downloaded
    # The first response was cut after 1,000,000 bytes; the retry asked only for the rest.
    assert [r.range for r in server.gets("lfw-sample.tgz")] == [None, "bytes=1000000-"]
    cache = tmp_path / "data" / ".download-cache"
    assert sorted(p.name for p in cache.iterdir()) == [TGZ_SHA]
    assert sha256_file(cache / TGZ_SHA) == TGZ_SHA


def test_partial_file_from_an_earlier_run_is_resumed(server: FileServer, tmp_path: Path) -> None:
    out_dir = tmp_path / "data" / "raw"
    params = make_params((server.url("lfw-sample.tgz"), TGZ_SHA), attempts=1)
    part = tmp_path / "data" / ".download-cache" / f"{TGZ_SHA}.part"
    server.cut_after = [50_000]

    with pytest.raises(
        DownloadError, match=f"closed after 50000 of {SAMPLE_TGZ.stat().st_size} bytes"
    ) as caught:
        lfw.run(params, out_dir)
    assert server.url("lfw-sample.tgz") in str(caught.value)
    assert part.stat().st_size == 50_000  # the bytes already fetched are kept
    assert not out_dir.exists()

    assert lfw.run(params, out_dir).images == SAMPLE_IMAGES
    assert [r.range for r in server.gets("lfw-sample.tgz")] == [None, "bytes=50000-"]
    assert not part.exists()


def test_server_without_range_support_starts_over(server: FileServer, tmp_path: Path) -> None:
    server.honor_range = False
    part = tmp_path / "data" / ".download-cache" / f"{TGZ_SHA}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"junk" * 250)  # would corrupt the result if it were kept

    result = lfw.run(make_params((server.url("lfw-sample.tgz"), TGZ_SHA)), tmp_path / "data" / "raw")

    assert result.images == SAMPLE_IMAGES
    assert [r.range for r in server.gets("lfw-sample.tgz")] == ["bytes=1000-"]  # answered 200
    assert sha256_file(part.with_name(TGZ_SHA)) == TGZ_SHA


def test_bad_partial_file_is_discarded_and_fetched_again(server: FileServer, tmp_path: Path) -> None:
    part = tmp_path / "data" / ".download-cache" / f"{TGZ_SHA}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"junk" * 250)  # not the start of the real file: the resumed hash mismatches

    result = lfw.run(make_params((server.url("lfw-sample.tgz"), TGZ_SHA)), tmp_path / "data" / "raw")

    assert result.images == SAMPLE_IMAGES
    assert [r.range for r in server.gets("lfw-sample.tgz")] == ["bytes=1000-", None]
    assert sorted(p.name for p in part.parent.iterdir()) == [TGZ_SHA]


def test_interrupted_extraction_keeps_the_old_output(
    good_out: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir, _ = good_out
    params = make_params((str(SAMPLE_TGZ), TGZ_SHA))  # different sources: not up to date
    calls = 0
    copy = shutil.copyfileobj

    def interrupted_copy(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 100:
            raise KeyboardInterrupt
        copy(*args, **kwargs)

    monkeypatch.setattr(shutil, "copyfileobj", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        lfw.run(params, out_dir)
    assert calls == 100
    assert_intact(good_out)

    monkeypatch.setattr(shutil, "copyfileobj", copy)
    assert lfw.run(params, out_dir).downloaded


# --------------------------------------------------------------------------------------------------
# Safe extraction


def evil_member(kind: str, tmp_path: Path) -> tarfile.TarInfo:
    names = {
        "parent": "lfw/../../../escape.jpg",
        "absolute": str(tmp_path / "escape.jpg"),
        "symlink": "lfw/Evil/Evil_0001.jpg",
        "hardlink": "lfw/Evil/Evil_0001.jpg",
        "fifo": "lfw/Evil/Evil_0001.jpg",
        "device": "lfw/Evil/Evil_0001.jpg",
    }
    member = tarfile.TarInfo(names[kind])
    if kind in ("parent", "absolute"):
        member.size = 10
    elif kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        member.type, member.linkname = tarfile.LNKTYPE, "lfw/Abdullah_Gul/Abdullah_Gul_0001.jpg"
    elif kind == "fifo":
        member.type = tarfile.FIFOTYPE
    else:
        member.type = tarfile.CHRTYPE
    return member


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("parent", "the path contains '..'"),
        ("absolute", "absolute path"),
        ("symlink", "symbolic link (to '/etc/passwd')"),
        ("hardlink", "hard link"),
        ("fifo", "FIFO"),
        ("device", "device file"),
    ],
)
def test_unsafe_archive_members_are_refused(
    kind: str, reason: str, tmp_path: Path, good_out: tuple[Path, dict]
) -> None:
    out_dir, _ = good_out
    archive = tmp_path / "evil.tgz"
    member = evil_member(kind, tmp_path)
    # The bad member comes last: nothing may be written before the whole archive is checked.
    sha = build_archive(archive, ["lfw/Abdullah_Gul/Abdullah_Gul_0001.jpg"], extra=member)

    with pytest.raises(DownloadError) as caught:
        lfw.run(make_params((str(archive), sha)), out_dir)

    message = str(caught.value)
    assert str(archive) in message and repr(member.name) in message and reason in message
    assert list(tmp_path.rglob("escape.jpg")) == []
    assert not list(tmp_path.rglob("Evil*"))
    assert_intact(good_out)


@pytest.mark.parametrize(
    ("layout", "readme"),
    [
        ("lfw/{person}/{file}", "lfw/README.txt"),
        ("./lfw-deepfunneled/{person}/{file}", "./lfw-deepfunneled/README.txt"),
        ("{person}/{file}", "README.txt"),
    ],
)
def test_archive_layouts(layout: str, readme: str, tmp_path: Path) -> None:
    faces = [
        ("Ann_Lee", "Ann_Lee_0001.jpg"),
        ("Ann_Lee", "Ann_Lee_0002.jpg"),
        ("Bo", "Bo_0001.jpg"),
    ]
    archive = tmp_path / "small.tar.gz"
    names = [layout.format(person=person, file=file) for person, file in faces]
    sha = build_archive(archive, [*names, readme])  # the README is skipped, not an image
    out_dir = tmp_path / "data" / "raw"

    result = lfw.run(make_params((archive.as_uri(), sha)), out_dir)

    assert (result.images, result.people) == (3, 2)
    expected = sorted(f"{person}/{file}" for person, file in faces)
    found = sorted(str(p.relative_to(out_dir / "images")) for p in out_dir.rglob("*.jpg"))
    assert found == expected
    assert (out_dir / "images" / "Bo" / "Bo_0001.jpg").read_bytes() == sample_member(FIRST_IMAGE)


def test_truncated_archive_is_an_error(tmp_path: Path, good_out: tuple[Path, dict]) -> None:
    out_dir, _ = good_out
    archive = tmp_path / "truncated.tgz"
    archive.write_bytes(SAMPLE_TGZ.read_bytes()[:2_000_000])
    sha = sha256_file(archive)

    with pytest.raises(DownloadError, match="not a readable tar archive, or a truncated one") as e:
        lfw.run(make_params((str(archive), sha)), out_dir)

    assert str(archive) in str(e.value)
    assert_intact(good_out)


def test_archive_without_images_is_an_error(tmp_path: Path) -> None:
    archive = tmp_path / "empty.tar"
    with tarfile.open(archive, "w") as tar:
        add_bytes(tar, "lfw/README.txt", b"nothing here")
    with pytest.raises(DownloadError, match=r"no <Person>/<Person>_NNNN\.jpg images found"):
        lfw.run(make_params((str(archive), sha256_file(archive))), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------------------------------
# Protocol files are checked before the output is replaced


def test_protocol_naming_a_missing_image(tmp_path: Path, good_out: tuple[Path, dict]) -> None:
    out_dir, _ = good_out
    pairs = tmp_path / "pairsDevTest.txt"
    pairs.write_text(
        "1\nAbdullah_Gul\t1\t2\nAbdullah_Gul\t1\tAbel_Pacheco\t9\n"  # Abel_Pacheco has 4 images
    )
    params = make_params((str(SAMPLE_TGZ), TGZ_SHA), pairs_dev_test=(str(pairs), sha256_file(pairs)))

    with pytest.raises(ProtocolError) as caught:
        lfw.run(params, out_dir)

    message = str(caught.value)
    assert "pairsDevTest.txt" in message and str(pairs) in message
    assert "line 3: Abel_Pacheco/Abel_Pacheco_0009.jpg" in message
    assert_intact(good_out)


def test_malformed_protocol_at_download(tmp_path: Path, good_out: tuple[Path, dict]) -> None:
    out_dir, _ = good_out
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("10\t300\nAbdullah_Gul\t1\n")
    params = make_params((str(SAMPLE_TGZ), TGZ_SHA), (str(pairs), sha256_file(pairs)))

    with pytest.raises(ProtocolError, match="line 2: expected a matched pair") as caught:
        lfw.run(params, out_dir)

    assert str(pairs) in str(caught.value)
    assert_intact(good_out)
    assert os.listdir(out_dir / "protocols") == ["pairsDevTrain.txt"]
