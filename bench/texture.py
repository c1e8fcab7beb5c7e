"""What the texture view and the Joint Bayesian model cost the embed stage, against the network's own
embedding, one run.

    python bench/texture.py [--faces 7000] [--backbone resnet18-fast] [--json out.json]

Faces: the bundled sample's real photos, aligned with the pipeline's MTCNN aligner, repeated up to
`--faces`. Rows (each timed on the same faces, on this machine's CPU threads):

network      the embed stage's network pass: an untrained backbone (the speed does not depend on the
             weights) with flip TTA, bf16 autocast where the CPU has fast bf16 (as `amp: auto` does)
texture      LBP descriptors of every face and its mirror (`arcface.texture.descriptors`)
fit          PCA 800 + LDA 400 on those descriptors, the sample's people as classes
project      texture vectors of every face from the descriptors, then the fusion
bayes fit    the Joint Bayesian model of the fused vectors (PCA 384, shrinkage 0.1, as params.yaml)
bayes map    every face's Joint Bayesian vector

faces/s is per face; ratio is each row's time over the network row's (the baseline).
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arcface import bayes, texture
from arcface.config import AlignParams
from arcface.data import align, store
from arcface.device import autocast_dtype
from arcface.embed import embed_faces
from arcface.models.backbones import build_backbone

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "sample" / "lfw-sample.tgz"


def aligned_sample(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned faces of the bundled sample and their people's names, repeated up to `count`."""
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(SAMPLE) as archive:
            archive.extractall(folder, filter="data")
        align.run(AlignParams(device="cpu"), Path(folder) / "lfw-sample", Path(folder) / "aligned")
        manifest = store.read_manifest(Path(folder) / "aligned")
        faces = np.asarray(store.open_faces(Path(folder) / "aligned"))
    repeat = int(np.ceil(count / len(faces)))
    return np.tile(faces, (repeat, 1, 1, 1))[:count], np.tile(manifest["identity"].to_numpy(), repeat)[:count]


def timed(step: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = step()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--faces", type=int, default=7000, help="faces (default 7000, LFW's training set)")
    parser.add_argument("--backbone", default="resnet18-fast", help="network trunk (default resnet18-fast)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    faces, names = aligned_sample(args.faces)
    model = build_backbone(args.backbone).eval().to(memory_format=torch.channels_last)
    amp = autocast_dtype("auto", torch.device("cpu"))
    network, network_s = timed(lambda: embed_faces(model, faces, 128, flip=True, amp=amp))
    described, texture_s = timed(lambda: texture.descriptors(faces))
    fitted, fit_s = timed(lambda: texture.fit(described, names, 800, 400))
    fused, project_s = timed(lambda: fitted.fuse(network, fitted.project(described)))
    joint, bayes_fit_s = timed(lambda: bayes.fit(fused, names, 384, 0.1))
    _, bayes_map_s = timed(lambda: joint.vectors(fused))
    rows = [
        {"step": "network (baseline)", "seconds": network_s},
        {"step": "texture descriptors", "seconds": texture_s},
        {"step": "fit PCA + LDA", "seconds": fit_s},
        {"step": "project + fuse", "seconds": project_s},
        {"step": "fit Joint Bayesian", "seconds": bayes_fit_s},
        {"step": "Joint Bayesian vectors", "seconds": bayes_map_s},
    ]
    print(f"{len(faces)} faces, {torch.get_num_threads()} threads, network {args.backbone} (amp {amp})")
    print(f"{'step':<22}{'seconds':>10}{'faces/s':>10}{'ratio':>8}")
    for row in rows:
        row |= {"faces_per_second": len(faces) / row["seconds"], "ratio": row["seconds"] / network_s}
        print(f"{row['step']:<22}{row['seconds']:>10.2f}{row['faces_per_second']:>10.1f}{row['ratio']:>8.2f}")
    if args.json:
        summary = {"faces": len(faces), "backbone": args.backbone, "amp": str(amp), "rows": rows}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
