"""Rebuild the bundled sample (tests/data/sample/) from a local copy of LFW.

The sample is a tiny LFW in LFW's own formats: an archive `lfw-sample.tgz` laid out like
`lfw-deepfunneled.tgz` (each photo cut to its central 160×160, where LFW puts the face) and a `pairs.txt` in View 2's format (first line `folds n`, then per fold n matched
and n mismatched lines). Its training identities and its pair identities are disjoint, and its folds are
identity-disjoint, as in View 2, so even the demo never scores a model on faces of a person it trained on.

    python tests/data/make_sample.py --lfw ../shared/data/lfw/lfw-deepfunneled.tgz
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import random
import tarfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent / "sample"
TRAIN_IDENTITIES = 180
TRAIN_IMAGES = 4
# LFW photos are 250×250 with the face in the middle; the central crop keeps the whole face and some
# background at half the bytes, so the 5 MB budget holds three times as many people.
CROP = 160
JPEG_QUALITY = 80
FOLDS = 10
PEOPLE_PER_FOLD = 5
IMAGES_PER_EVAL_PERSON = 4
PAIRS_PER_FOLD = 10  # matched, and as many mismatched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--lfw", type=Path, required=True, help="lfw-deepfunneled.tgz")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: %(default)s)")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tarfile.open(args.lfw) as archive:
        members = {m.name: m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")}
        counts: dict[str, int] = {}
        for name in members:
            person = name.split("/")[-2]
            counts[person] = counts.get(person, 0) + 1
        candidates = sorted(p for p, n in counts.items() if n >= IMAGES_PER_EVAL_PERSON)
        # Skip the few people with very many photos so the sample is not dominated by them.
        candidates = [p for p in candidates if counts[p] <= 40]
        rng.shuffle(candidates)
        eval_people = candidates[: FOLDS * PEOPLE_PER_FOLD]
        train_people = [p for p in candidates[FOLDS * PEOPLE_PER_FOLD :] if counts[p] >= TRAIN_IMAGES]
        train_people = train_people[:TRAIN_IDENTITIES]

        chosen = {p: TRAIN_IMAGES for p in train_people}
        chosen.update({p: IMAGES_PER_EVAL_PERSON for p in eval_people})
        prefix = next(iter(members)).split("/")[0]
        args.out.mkdir(exist_ok=True)
        # gzip's header holds a time stamp: fix it so a rebuild gives the same bytes and sha256.
        gz = gzip.GzipFile(args.out / "lfw-sample.tgz", "wb", mtime=0)
        with gz, tarfile.open(fileobj=gz, mode="w") as out:
            for person in sorted(chosen):
                for number in range(1, chosen[person] + 1):
                    source = members[f"{prefix}/{person}/{person}_{number:04d}.jpg"]
                    data = _central_crop(archive.extractfile(source).read())
                    info = tarfile.TarInfo(f"lfw-sample/{person}/{person}_{number:04d}.jpg")
                    info.size, info.mtime, info.mode = len(data), source.mtime, 0o644
                    out.addfile(info, io.BytesIO(data))

    lines = [f"{FOLDS}\t{PAIRS_PER_FOLD}"]
    for fold in range(FOLDS):
        people = sorted(eval_people[fold * PEOPLE_PER_FOLD : (fold + 1) * PEOPLE_PER_FOLD])
        images = range(1, IMAGES_PER_EVAL_PERSON + 1)
        matched = [(p, i, j) for p in people for i, j in itertools.combinations(images, 2)]
        mismatched = [
            (a, i, b, j) for a, b in itertools.combinations(people, 2) for i in images for j in images
        ]
        for p, i, j in sorted(rng.sample(matched, PAIRS_PER_FOLD)):
            lines.append(f"{p}\t{i}\t{j}")
        for a, i, b, j in sorted(rng.sample(mismatched, PAIRS_PER_FOLD)):
            lines.append(f"{a}\t{i}\t{b}\t{j}")
    (args.out / "pairs.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(train_people)} training people, {len(eval_people)} pair people -> {args.out}")


def _central_crop(jpeg: bytes) -> bytes:
    with Image.open(io.BytesIO(jpeg)) as image:
        left = (image.width - CROP) // 2
        top = (image.height - CROP) // 2
        cropped = image.crop((left, top, left + CROP, top + CROP))
        out = io.BytesIO()
        cropped.save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue()


if __name__ == "__main__":
    main()
