"""`arcface <stage>`: the commands dvc.yaml runs, plus `search`.

Every stage reads params.yaml (or --params) with any number of `--set key=value` overrides, and takes its
input and output paths as options whose defaults are the workspace layout that dvc.yaml uses.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from arcface.config import ParamsError, load_params
from arcface.layout import Layout
from arcface.workspace_lock import workspace_lock

logger = logging.getLogger("arcface")
LAYOUT = Layout()
WRITING_COMMANDS = {"download", "align", "import", "train", "embed", "index", "evaluate", "track"}


def _download(args: argparse.Namespace) -> int:
    from arcface.data import lfw

    params = _params(args)
    result = lfw.run(params.download, args.out)
    print(f"{result.images} images of {result.people} people in {result.out_dir}")
    return 0


def _align(args: argparse.Namespace) -> int:
    from arcface.data import align

    result = align.run(_params(args).align, args.images, args.out)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.counts.items()))
    print(f"aligned {result.images} images ({counts}) into {result.out_dir}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from arcface.data.external import import_faces

    result = import_faces(args.source, args.out, args.limit)
    print(
        f"{result.faces} faces of {result.identities} identities in {result.out_dir} "
        f"({result.resized} resized, {result.errors} unreadable); train on them with "
        f"`arcface train --aligned {result.out_dir}`"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from arcface import train
    from arcface.protocol import training_exclusions

    params = _params(args)
    excluded = training_exclusions(params.evaluate, args.protocols, params.seed)
    for result in train.run(params, args.aligned, excluded, args.out):
        last = result.history[-1]
        print(
            f"trained {params.train.backbone} on {len(result.split.rows)} faces of "
            f"{result.split.num_classes} identities: loss {last.loss:.4f}, train accuracy "
            f"{last.accuracy:.3f} -> {result.checkpoint}"
        )
        trunks = params.train.companion_trunks()
        for trunk, history, path in zip(
            trunks, result.companion_histories, result.companion_checkpoints, strict=True
        ):
            last = history[-1]
            box = f" on the box {list(trunk.crop)}" if trunk.crop else ""
            print(
                f"  and a companion, {trunk.backbone}{box}: loss {last.loss:.4f}, "
                f"train accuracy {last.accuracy:.3f} -> {path}"
            )
    return 0


def _embed(args: argparse.Namespace) -> int:
    from arcface import embed

    result = embed.run(_params(args).embed, args.aligned, args.models, args.out)
    print(
        f"{result.count} embeddings of dimension {result.dimension} by {result.groups} model(s)"
        f"{f' ({result.companions} with companion trunks)' if result.companions else ''} in {result.out_dir}"
    )
    return 0


def _index(args: argparse.Namespace) -> int:
    from arcface import index

    built = index.run(_params(args).index, args.embeddings, args.aligned, args.out)
    print(f"index of {built.index.ntotal} faces in {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from arcface import evaluate
    from arcface.files import read_json

    params = _params(args)
    evaluate.run(
        params.evaluate, args.protocols, args.aligned, args.embeddings, args.out, args.models, params.seed
    )
    print(evaluate.format_metrics(read_json(args.out / evaluate.METRICS_FILE)))
    return 0


def _verify_bin(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from arcface import evaluate
    from arcface.files import write_json

    far_targets = _params(args).evaluate.far_targets
    # The whole verifier too, where the model's embed stage has run (its fitted texture and Bayes models).
    embeddings = args.embeddings if (args.embeddings / "embed.json").exists() else None
    if embeddings is None:
        print(
            f"({args.embeddings / 'embed.json'} not found: the trunk alone, without the texture view and "
            "the Joint Bayesian model)"
        )
    results = {}
    for path in args.sets:
        reports = evaluate.verify_bin_set(args.checkpoint, path, far_targets, embeddings=embeddings)
        for report in reports.values():
            print(report.summary())
        results[path.stem] = {variant: asdict(report) for variant, report in reports.items()}
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


def _compare_reports(args: argparse.Namespace) -> int:
    from arcface import paired

    for other in args.others:
        print(paired.compare(args.first, other).summary(str(args.first), str(other)))
    return 0


def _plot_angles(args: argparse.Namespace) -> int:
    import numpy as np

    from arcface import plots
    from arcface.train import ANGLES_FILE

    labels = args.labels or [folder.name for folder in args.models]
    if len(labels) != len(args.models):
        raise ValueError(f"{len(labels)} labels for {len(args.models)} model folders")
    angles = {}
    for label, folder in zip(labels, args.models, strict=True):
        path = folder / "group-0" / ANGLES_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no training angles (train with this version first)")
        angles[label] = np.load(path)
    plots.angle_distributions(angles, args.out)
    print(f"wrote {args.out}")
    return 0


def _track(args: argparse.Namespace) -> int:
    from arcface import tracking

    params = _params(args)
    tracked = tracking.log_pipeline_run(
        params, tracking.run_inputs(args.model, args.reports, args.aligned, args.embeddings), args.out
    )
    print(f"MLflow run {tracked.run_id} ({tracked.tracking_uri})")
    return 0


def _search(args: argparse.Namespace) -> int:
    from arcface.search import FaceSearcher, threshold_from_metrics

    params = _params(args)
    photos = expand_photos(args.photos)
    if not photos:
        raise FileNotFoundError(f"no photos in {', '.join(map(str, args.photos))}")
    threshold = args.threshold
    if threshold is None:
        threshold = threshold_from_metrics(args.metrics, Path(args.checkpoint).parent.name)
    searcher = FaceSearcher(args.checkpoint, args.index, params.align, params.embed, threshold)
    results = searcher.search_many(photos, args.k or params.index.k)
    if args.csv:
        write_search_csv(args.csv, results)
        print(f"wrote {len(results)} answers to {args.csv}")
    else:
        if threshold is not None:
            name = searcher.verifier.score_label
            print(f"(unknown below {name} {threshold:.4f}, the evaluation's threshold)")
        for result in results:
            if result.status != "ok":
                print(f"{result.photo}: {result.status}: {result.reason}")
                continue
            print(f"{result.photo}: {result.identity}")
            for rank, match in enumerate(result.matches, 1):
                print(f"  {rank}. {match.identity:<32} {match.score:.3f}  ({match.path})")
    failed = sum(r.status != "ok" for r in results)
    if failed:
        print(f"{failed} of {len(results)} photos could not be answered", file=sys.stderr)
    return 1 if failed else 0


def _verify(args: argparse.Namespace) -> int:
    from arcface.device import resolve_device
    from arcface.photo_pairs import PhotoPairVerifier, read_pairs_csv, write_answers_csv
    from arcface.search import threshold_from_metrics
    from arcface.verifier import Verifier

    params = _params(args)
    if args.pairs is not None and args.photos:
        raise ValueError("give two photos or --pairs, not both")
    if args.pairs is not None:
        pairs = read_pairs_csv(args.pairs)
    elif len(args.photos) == 2:
        pairs = [(args.photos[0], args.photos[1])]
    else:
        raise ValueError(f"verify compares two photos (got {len(args.photos)}); for many pairs use --pairs")
    threshold = args.threshold
    if threshold is None:
        threshold = threshold_from_metrics(args.metrics, Path(args.model).name)
    verifier = Verifier.of_run(args.model, args.embeddings, resolve_device(params.embed.device))
    pair_verifier = PhotoPairVerifier(verifier, params.align, threshold)
    answers = pair_verifier.compare_many(pairs)
    if args.csv:
        write_answers_csv(args.csv, answers)
        print(f"wrote {len(answers)} answers to {args.csv}")
    else:
        name = verifier.score_label
        for answer in answers:
            if answer.status != "ok":
                print(f"{answer.first} | {answer.second}: error: {answer.reason}")
            elif answer.threshold is None:
                print(f"{answer.first} | {answer.second}: {name} {answer.score:.4f} (no threshold: pass one)")
            else:
                sign = "≥" if answer.same else "<"
                print(
                    f"{answer.first} | {answer.second}: {answer.verdict} ({name} {answer.score:.4f} {sign} "
                    f"threshold {answer.threshold:.4f})"
                )
            if answer.status == "ok" and answer.reason:
                print(f"  note: {answer.reason}")
    failed = sum(answer.status != "ok" for answer in answers)
    if failed:
        print(f"{failed} of {len(answers)} pairs could not be answered", file=sys.stderr)
    return 1 if failed else 0


def _search_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from arcface.search_app import UploadLimits, create_app, load_service

    limits = UploadLimits(max_bytes=args.max_upload_mb * 1024 * 1024)
    service = load_service(_params(args), args.checkpoint, args.index, args.aligned, args.reports, limits)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who can reach it can upload photos", file=sys.stderr)
    print(f"search page: http://{args.host}:{args.port}/  (Ctrl-C stops it)")
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


def expand_photos(items: Sequence[Path]) -> list[Path]:
    """Files as given; folders become their images (recursively, sorted)."""
    from arcface.data.images import IMAGE_SUFFIXES

    photos: list[Path] = []
    for item in items:
        if item.is_dir():
            photos += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            photos.append(item)
    return photos


def write_search_csv(path: Path, results) -> None:
    """One row per (photo, rank); photos without an answer get one row saying why."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["photo", "status", "reason", "verdict", "rank", "identity", "score", "gallery_path"])
        for result in results:
            head = [result.photo, result.status, result.reason, result.identity or ""]
            if not result.matches:
                writer.writerow([*head, "", "", "", ""])
            for rank, match in enumerate(result.matches, 1):
                writer.writerow([*head, rank, match.identity, f"{match.score:.6f}", match.path])


def _params(args: argparse.Namespace):
    return load_params(args.params, args.overrides)


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    """`--params FILE` and repeatable `--set KEY=VALUE` (also used by the flow's command line)."""
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set train.epochs=2 (repeatable; VALUE is YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_params_arguments(common)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    parser = argparse.ArgumentParser(
        prog="arcface",
        description="Face verification pipeline stages (the commands dvc.yaml runs) and face search.",
        epilog="Run `arcface <command> --help` for a command's options. Defaults follow dvc.yaml.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    def command(name: str, handler: Callable[[argparse.Namespace], int], text: str):
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    def path(sub: argparse.ArgumentParser, flag: str, default: Path, text: str) -> None:
        sub.add_argument(flag, type=Path, default=default, help=f"{text} (default: %(default)s)")

    def threshold_options(sub: argparse.ArgumentParser, meaning: str) -> None:
        """--threshold, else the evaluation's from --metrics."""
        text = f"{meaning} (default: the one in --metrics)"
        sub.add_argument("--threshold", type=float, default=None, help=text)
        path(sub, "--metrics", LAYOUT.reports / "metrics.json", "evaluation metrics holding the threshold")

    sub = command("download", _download, "fetch the images archive and protocol files, verify, extract")
    path(sub, "--out", LAYOUT.raw, "output folder")

    sub = command("align", _align, "detect 5 landmarks with MTCNN and warp faces to 112×112")
    path(sub, "--images", LAYOUT.images, "folder of <Person>/<image> photos")
    path(sub, "--out", LAYOUT.aligned, "aligned store folder")

    sub = command(
        "import", _import, "convert a RecordIO set (train.rec) or a folder of aligned faces into a store"
    )
    sub.add_argument(
        "source", type=Path, help="train.rec (with train.idx beside it) or <identity>/<image> folder"
    )
    sub.add_argument("--limit", type=int, default=None, help="import only the first N faces")
    path(sub, "--out", Path("data/external"), "aligned store folder")

    sub = command("train", _train, "train the backbone on identities the evaluation doesn't score")
    path(sub, "--aligned", LAYOUT.aligned, "aligned store")
    path(sub, "--protocols", LAYOUT.protocols, "folder of LFW protocol files")
    path(sub, "--out", LAYOUT.model, "model folder")

    sub = command(
        "embed",
        _embed,
        "embed every aligned face (L2-normalized); with embed.texture also fuse LBP texture vectors",
    )
    path(sub, "--aligned", LAYOUT.aligned, "aligned store")
    path(sub, "--models", LAYOUT.model, "trained models folder (group-*/checkpoint.pt)")
    path(sub, "--out", LAYOUT.embeddings, "embeddings folder")

    sub = command("index", _index, "build the FAISS index and its labels table")
    path(sub, "--embeddings", LAYOUT.embeddings, "embeddings folder")
    path(sub, "--aligned", LAYOUT.aligned, "aligned store (for identities and paths)")
    path(sub, "--out", LAYOUT.index, "index folder")

    sub = command("evaluate", _evaluate, "LFW verification protocol: accuracy, ROC AUC, EER, TAR@FAR")
    path(sub, "--protocols", LAYOUT.protocols, "folder of LFW protocol files")
    path(sub, "--aligned", LAYOUT.aligned, "aligned store")
    path(sub, "--embeddings", LAYOUT.embeddings, "embeddings folder")
    path(sub, "--models", LAYOUT.model, "trained models folder (training angles for the plots)")
    path(sub, "--out", LAYOUT.reports, "reports folder")

    sub = command(
        "verify-bin", _verify_bin, "score insightface verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin)"
    )
    sub.add_argument("sets", type=Path, nargs="+", help=".bin files: pickled (images, is_same)")
    path(sub, "--checkpoint", LAYOUT.model / "group-0" / "checkpoint.pt", "trained checkpoint")
    path(
        sub,
        "--embeddings",
        LAYOUT.embeddings / "group-0",
        "the model's embed-stage folder: also score with the whole verifier (`verifier`) when it exists",
    )
    sub.add_argument("--out", type=Path, default=None, help="also write the reports as JSON here")

    sub = command(
        "plot-angles",
        _plot_angles,
        "side by side: angles of training faces to their class centres (e.g. softmax vs arcface models)",
    )
    sub.add_argument("models", type=Path, nargs="+", help="model folders (each with group-0/angles.npy)")
    sub.add_argument("--labels", nargs="+", default=None, help="a title per folder (default: folder names)")
    sub.add_argument("--out", type=Path, default=Path("angles-compared.png"), help="PNG to write")

    sub = command(
        "compare-reports",
        _compare_reports,
        "pair by pair: the runs after the first against the first, on the same pairs (the pairs one gets "
        "right and the other wrong, and McNemar's exact test of that split)",
    )
    sub.add_argument("first", type=Path, help="reports folder (scores.csv, metrics.json) of the baseline run")
    sub.add_argument("others", type=Path, nargs="+", help="reports folders of the runs to compare with it")

    sub = command(
        "track",
        _track,
        "record the run in MLflow: params, curves, metrics, plots, and the verifier (every trunk, the "
        "texture view, the Joint Bayesian model), registered as tracking.registered_model_name",
    )
    path(sub, "--model", LAYOUT.model, "model folder")
    path(
        sub,
        "--embeddings",
        LAYOUT.embeddings,
        "embeddings folder (the fitted texture and Joint Bayesian models)",
    )
    path(sub, "--reports", LAYOUT.reports, "reports folder")
    path(sub, "--aligned", LAYOUT.aligned, "aligned store (contact sheet)")
    path(sub, "--out", LAYOUT.reports / "mlflow_run.json", "where to write the run id")

    sub = command(
        "search",
        _search,
        "who is in these photos: each raw photo is aligned and embedded like the training faces, and the "
        "top-k identities are printed with their scores (cosine, or Joint Bayesian with embed.bayes); "
        "`unknown` when the best is under the threshold",
    )
    sub.add_argument("photos", type=Path, nargs="+", help="photos or folders of photos")
    sub.add_argument("--k", type=int, default=None, help="identities per photo (default: index.k)")
    sub.add_argument("--csv", type=Path, default=None, help="write answers to this CSV instead")
    threshold_options(sub, "score under which a face is unknown")
    path(sub, "--checkpoint", LAYOUT.model / "group-0" / "checkpoint.pt", "trained checkpoint")
    path(sub, "--index", LAYOUT.index, "index folder")

    sub = command(
        "verify",
        _verify,
        "are two photos the same person: both aligned like the training faces, embedded by the whole "
        "verifier (every trunk, the texture view, the Joint Bayesian model), scored as the evaluation scores "
        "pairs and decided at its threshold; no index needed",
    )
    sub.add_argument("photos", type=Path, nargs="*", help="the two photos (or --pairs)")
    sub.add_argument(
        "--pairs",
        type=Path,
        default=None,
        help="a CSV of many pairs: columns first, second (paths from its folder)",
    )
    sub.add_argument("--csv", type=Path, default=None, help="write the answers to this CSV instead")
    threshold_options(sub, "score from which a pair is the same person")
    path(sub, "--model", LAYOUT.model / "group-0", "model folder (checkpoint.pt and its companion trunks)")
    path(
        sub,
        "--embeddings",
        LAYOUT.embeddings / "group-0",
        "that model's embed-stage folder (embed.json, the fitted texture and Joint Bayesian models)",
    )

    sub = command(
        "search-ui",
        _search_ui,
        "serve the search page: upload photos, see the aligned face, the top identities with their gallery "
        "faces and the match/unknown verdict; or compare two photos",
    )
    sub.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)"
    )
    sub.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    sub.add_argument(
        "--max-upload-mb", type=int, default=10, help="largest photo accepted (default: %(default)s MB)"
    )
    path(sub, "--checkpoint", LAYOUT.model / "group-0" / "checkpoint.pt", "trained checkpoint")
    path(sub, "--index", LAYOUT.index, "index folder")
    path(sub, "--aligned", LAYOUT.aligned, "aligned store (gallery thumbnails)")
    path(sub, "--reports", LAYOUT.reports, "reports folder (threshold, MLflow run id)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)  # it announces each CPU variant it tries
    try:
        # Stages write the workspace: one run at a time. Under torchrun, rank 0 holds it for all ranks.
        if args.command in WRITING_COMMANDS and os.environ.get("RANK", "0") == "0":
            with workspace_lock(what=f"arcface {args.command}"):
                return args.handler(args)
        return args.handler(args)
    except (ParamsError, FileNotFoundError, ValueError, RuntimeError) as err:
        if args.verbose:
            raise
        # Expected failures (bad params, bad input files, unreachable sources) get one clear line.
        print(f"arcface {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
