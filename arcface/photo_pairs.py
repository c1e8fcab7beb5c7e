"""Are two photos the same person? Each photo is aligned like the training faces, embedded by the
verifier (every trunk, the texture view, the Joint Bayesian model), the pair scored as the evaluation
scores LFW's pairs, and decided at the evaluation's threshold. No index is needed."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from arcface.config import AlignParams
from arcface.data.align import FaceAligner
from arcface.search import QueryFace, read_and_embed
from arcface.verifier import Verifier

PAIR_COLUMNS = ("first", "second")


@dataclass(frozen=True)
class PairAnswer:
    first: Path
    second: Path
    status: str  # ok | error: a photo could not be read, or has no face
    reason: str = ""  # why there is no score; with one, a note such as which of several faces was used
    score: float | None = None
    threshold: float | None = None  # the evaluation's; None: no same/different decision

    @property
    def same(self) -> bool | None:
        """Same person when the score reaches the threshold; None without a score or a threshold."""
        if self.score is None or self.threshold is None:
            return None
        return self.score >= self.threshold

    @property
    def verdict(self) -> str:
        if self.status != "ok":
            return "error"
        return {True: "same", False: "different", None: "unknown"}[self.same]


class PhotoPairVerifier:
    """The verifier with a face aligner and a threshold, answering pairs of raw photos."""

    def __init__(self, verifier: Verifier, align: AlignParams, threshold: float | None = None) -> None:
        self.verifier, self.threshold = verifier, threshold
        self.aligner = FaceAligner(align)
        self._faces: dict[Path, QueryFace] = {}  # a photo in several pairs is aligned and embedded once

    def face(self, photo: Path) -> QueryFace:
        photo = Path(photo)
        if photo not in self._faces:
            self._faces[photo] = read_and_embed(self.aligner, self.verifier, photo)
        return self._faces[photo]

    def compare(self, first: Path, second: Path) -> PairAnswer:
        """The pair's score and verdict; a photo that can't be read or has no face is named, with why."""
        faces = {photo: self.face(photo) for photo in (Path(first), Path(second))}
        problems = [
            f"{photo}: {face.status}: {face.reason}" for photo, face in faces.items() if face.status != "ok"
        ]
        if problems:
            return PairAnswer(
                Path(first), Path(second), "error", "; ".join(problems), threshold=self.threshold
            )
        one, other = (faces[Path(photo)].vector for photo in (first, second))
        score = float(self.verifier.scores(one[None], other[None])[0])
        # e.g. "3 faces, kept the most central": worth knowing when the verdict surprises
        notes = "; ".join(f"{photo}: {face.reason}" for photo, face in faces.items() if face.reason)
        return PairAnswer(Path(first), Path(second), "ok", notes, score, self.threshold)

    def compare_many(self, pairs: list[tuple[Path, Path]]) -> list[PairAnswer]:
        """Answers for every pair, in order; one bad photo never stops the other pairs."""
        progress = tqdm(pairs, desc="verify", unit="pair", disable=None if len(pairs) > 1 else True)
        return [self.compare(first, second) for first, second in progress]


def read_pairs_csv(path: Path) -> list[tuple[Path, Path]]:
    """Pairs of photo paths from a CSV with `first` and `second` columns (relative paths are taken from
    the CSV's folder); a missing column or an empty file is an error that names the file."""
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in PAIR_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: needs a header row with the columns {', '.join(PAIR_COLUMNS)}; missing "
                f"{', '.join(missing)}"
            )
        pairs = [(path.parent / row["first"], path.parent / row["second"]) for row in reader]
    if not pairs:
        raise ValueError(f"{path}: no pairs (only a header row)")
    return pairs


def write_answers_csv(path: Path, answers: Iterable[PairAnswer]) -> None:
    """One row per pair: the photos, the verdict, the score and threshold, and why a pair has none."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*PAIR_COLUMNS, "verdict", "score", "threshold", "reason"])
        for answer in answers:
            score = "" if answer.score is None else f"{answer.score:.6f}"
            threshold = "" if answer.threshold is None else f"{answer.threshold:.6f}"
            writer.writerow([answer.first, answer.second, answer.verdict, score, threshold, answer.reason])
