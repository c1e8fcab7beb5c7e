"""LFW protocol files (View 1 and View 2) -> pandas, and their clear errors."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from arcface.data import lfw
from arcface.data.lfw import ProtocolError, check_pairs_exist, protocol_identities, read_pairs

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
SHARED_DEV_TEST = Path("/work/shared/data/lfw/pairsDevTest.txt")
COLUMNS = ["fold", "path1", "path2", "name1", "name2", "same", "line"]


def write(tmp_path: Path, text: str, name: str = "pairs.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def test_view1_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "2\nAnn_Lee\t1\t2\nBo\t3\t12\nAnn_Lee\t1\tBo\t2\nCy\t10\tDee_Ray\t1\n")

    frame = read_pairs(path)

    assert list(frame.columns) == COLUMNS
    assert frame.to_dict("records") == [
        row("Ann_Lee", 1, "Ann_Lee", 2, same=True, line=2),
        row("Bo", 3, "Bo", 12, same=True, line=3),
        row("Ann_Lee", 1, "Bo", 2, same=False, line=4),
        row("Cy", 10, "Dee_Ray", 1, same=False, line=5),
    ]
    assert str(frame["fold"].dtype) == "int64" and str(frame["line"].dtype) == "int64"
    assert frame["same"].dtype == bool
    assert protocol_identities(frame) == {"Ann_Lee", "Bo", "Cy", "Dee_Ray"}


def row(name1: str, i: int, name2: str, j: int, same: bool, line: int, fold: int = 0) -> dict:
    return {
        "fold": fold,
        "path1": f"{name1}/{name1}_{i:04d}.jpg",
        "path2": f"{name2}/{name2}_{j:04d}.jpg",
        "name1": name1,
        "name2": name2,
        "same": same,
        "line": line,
    }


def test_view2_folds(tmp_path: Path) -> None:
    text = "2\t1\nA\t1\t2\nA\t1\tB\t1\nC\t2\t3\nC\t1\tD\t4\n"

    frame = read_pairs(write(tmp_path, text))

    assert frame.to_dict("records") == [
        row("A", 1, "A", 2, same=True, line=2, fold=0),
        row("A", 1, "B", 1, same=False, line=3, fold=0),
        row("C", 2, "C", 3, same=True, line=4, fold=1),
        row("C", 1, "D", 4, same=False, line=5, fold=1),
    ]


def test_whitespace_is_lenient(tmp_path: Path) -> None:
    # Spaces instead of tabs, CRLF endings, trailing spaces, a blank line and a trailing blank line.
    text = "1  \r\nA 1   2 \r\n\r\n  A\t1 B 2\r\n\r\n"

    frame = read_pairs(write(tmp_path, text))

    assert frame.to_dict("records") == [
        row("A", 1, "A", 2, same=True, line=2),
        row("A", 1, "B", 2, same=False, line=4),  # line numbers are the file's, blanks included
    ]


def test_sample_pairs() -> None:
    frame = read_pairs(SAMPLE_DIR / "pairs.txt")

    assert len(frame) == 200
    assert sorted(frame["fold"].unique()) == list(range(10))
    assert frame.groupby("fold").size().tolist() == [20] * 10
    assert int(frame["same"].sum()) == 100
    matched, mismatched = frame[frame["same"]], frame[~frame["same"]]
    assert (matched["name1"] == matched["name2"]).all()
    assert (mismatched["name1"] != mismatched["name2"]).all()
    assert frame["line"].tolist() == list(range(2, 202))
    assert frame.iloc[0]["path1"] == "Bruce_Springsteen/Bruce_Springsteen_0001.jpg"
    assert frame.iloc[0]["path2"] == "Bruce_Springsteen/Bruce_Springsteen_0004.jpg"


def test_sample_pairs_name_only_sample_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    assert lfw.extract_images(SAMPLE_DIR / "lfw-sample.tgz", images) == (920, 230)
    frame = read_pairs(SAMPLE_DIR / "pairs.txt")

    check_pairs_exist(frame, images, SAMPLE_DIR / "pairs.txt")  # raises if any is missing

    people = {p.name for p in images.iterdir()}
    assert protocol_identities(frame) <= people


@pytest.mark.skipif(not SHARED_DEV_TEST.is_file(), reason="no shared LFW pairsDevTest.txt")
def test_shared_lfw_dev_test() -> None:
    frame = read_pairs(SHARED_DEV_TEST)

    assert len(frame) == 1000
    assert int(frame["same"].sum()) == 500
    assert set(frame["fold"]) == {0}
    assert frame.iloc[0]["path1"] == "Abdullah_Gul/Abdullah_Gul_0013.jpg"
    assert frame.iloc[0]["path2"] == "Abdullah_Gul/Abdullah_Gul_0014.jpg"


MATCHED, MISMATCHED = "A\t1\t2\n", "A\t1\tB\t2\n"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("", 1, "empty file"),
        ("\n  \n", 1, "empty file"),
        ("abc\n" + MATCHED + MISMATCHED, 1, "the header must be 'N' (View 1) or 'FOLDS<TAB>N'"),
        ("1\t2\t3\n" + MATCHED + MISMATCHED, 1, "got '1 2 3'"),
        ("0\n", 1, "positive whole numbers, got '0'"),
        ("-1\n" + MATCHED + MISMATCHED, 1, "got '-1'"),
        # The header promises 2 matched pairs but the 2nd pair line is a mismatched one.
        ("2\n" + MATCHED + MISMATCHED + MISMATCHED, 3, "expected a matched pair 'name i j'"),
        # ... or it promises 1 and a matched pair comes where a mismatched one is due.
        ("1\n" + MATCHED + MATCHED, 3, "got 3 field(s) (a matched pair: the header's count"),
        ("1\nA\t1\n" + MISMATCHED, 2, "expected a matched pair 'name i j' (3 fields) in fold 1"),
        ("1\n" + MATCHED + "A\t1\tB\t2\t7\n", 3, "got 5 field(s)"),
        ("1\nA\tx\t2\n" + MISMATCHED, 2, "image number 'x' is not a whole number"),
        ("1\nA\t1\t2.0\n" + MISMATCHED, 2, "image number '2.0' is not a whole number"),
        ("1\n" + MATCHED + "A\t1\tB\t0\n", 3, "image numbers start at 1, got 0"),
        ("1\n" + MATCHED, 2, "the file ends after 1 pair line(s), but the header (line 1)"),
        ("2\t1\n" + MATCHED + MISMATCHED, 3, "promises 4 (2 fold(s) × 1 matched + 1 mismatched)"),
        ("1\n" + MATCHED + MISMATCHED + MATCHED, 4, "unexpected extra line"),
        ("1\n../x\t1\t2\n" + MISMATCHED, 2, "'../x' is not a valid person name"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ProtocolError) as caught:
        read_pairs(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: line {line}: ")
    assert reason in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_bytes(b"1\n\xff\xfe\t1\t2\n")
    with pytest.raises(ProtocolError, match="not a UTF-8 text file"):
        read_pairs(path)


def test_check_pairs_exist_names_missing_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    with tarfile.open(SAMPLE_DIR / "lfw-sample.tgz") as sample:
        handle = sample.extractfile("lfw-sample/Abdullah_Gul/Abdullah_Gul_0001.jpg")
        assert handle is not None
        face = handle.read()
    for relative in ["A/A_0001.jpg", "A/A_0002.jpg", "B/B_0002.jpg"]:
        (images / relative).parent.mkdir(parents=True, exist_ok=True)
        (images / relative).write_bytes(face)
    protocol = write(tmp_path, "1\nA\t1\t2\nA\t1\tB\t3\n", "pairsDevTest.txt")
    frame = read_pairs(protocol)

    with pytest.raises(ProtocolError) as caught:
        check_pairs_exist(frame, images, protocol)

    assert str(caught.value) == (f"{protocol}: 1 pair image(s) not found in {images}: line 3: B/B_0003.jpg")
    (images / "B" / "B_0003.jpg").write_bytes(face)
    check_pairs_exist(frame, images, protocol)  # all present now: no error


def test_check_pairs_exist_lists_at_most_five(tmp_path: Path) -> None:
    lines = [f"P{k}\t1\t2" for k in range(4)] + [f"P{k}\t1\tQ{k}\t1" for k in range(4)]
    protocol = write(tmp_path, "4\n" + "\n".join(lines) + "\n")
    (tmp_path / "images").mkdir()

    with pytest.raises(ProtocolError) as caught:
        check_pairs_exist(read_pairs(protocol), tmp_path / "images", protocol)

    message = str(caught.value)
    assert "16 pair image(s) not found" in message
    assert "line 2: P0/P0_0001.jpg; line 2: P0/P0_0002.jpg; line 3: P1/P1_0001.jpg" in message
    assert message.count("line ") == 5 and message.endswith("; and 11 more")
