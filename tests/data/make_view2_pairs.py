"""Write a View-2-shaped `pairs.txt` over a folder of LFW images, for development on machines without the
real one (LFW's `pairs.txt` is the reporting set; never tune on it, and don't report numbers from this).

Like View 2: the first line is `folds<TAB>n`, then per fold n matched lines `name<TAB>i<TAB>j` and n
mismatched lines `name1<TAB>i<TAB>name2<TAB>j`; every person belongs to one fold only, so the folds are
identity-disjoint.

    python tests/data/make_view2_pairs.py --images data/raw/images --out pairs-dev-view2.txt
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="<Person>/<Person>_NNNN.jpg folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=300, help="matched (and mismatched) pairs per fold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    counts = {p.name: len(list(p.glob("*.jpg"))) for p in sorted(args.images.iterdir()) if p.is_dir()}
    people = sorted(counts)
    rng.shuffle(people)
    lines = [f"{args.folds}\t{args.pairs}"]
    for fold in range(args.folds):
        members = people[fold :: args.folds]
        repeated = [p for p in members if counts[p] >= 2]
        matched: set[tuple[str, int, int]] = set()
        while len(matched) < args.pairs:
            person = rng.choice(repeated)
            first, second = sorted(rng.sample(range(1, counts[person] + 1), 2))
            matched.add((person, first, second))
        mismatched: set[tuple[str, int, str, int]] = set()
        while len(mismatched) < args.pairs:
            one, other = sorted(rng.sample(members, 2))
            mismatched.add((one, rng.randint(1, counts[one]), other, rng.randint(1, counts[other])))
        lines += [f"{p}\t{i}\t{j}" for p, i, j in sorted(matched)]
        lines += [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in sorted(mismatched)]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{args.folds} folds × {args.pairs} + {args.pairs} pairs over {len(people)} people -> {args.out}")


if __name__ == "__main__":
    main()
