"""The course report's comparison as one flow: every combination of a grid of params, each a tracked run.

    python -m flows.compare                                   # softmax vs arcface × resnet34 vs resnet50
    python -m flows.compare --set train.epochs=20             # the same grid with other shared params
    python -m flows.compare --grid train.loss=softmax,arcface --grid train.scale=16,32,64

Download and align run once in the project with params.yaml's values (as in `train-and-eval`, kept in
step with DVC; overriding download.* or align.* here is refused); each
combination then trains, embeds, indexes, evaluates and tracks in its own folder `runs/<name>/` (its
`data/raw` and `data/aligned` link to the project's), so runs never overwrite each other or the project's
outputs. Each is one MLflow run named after its combination, tagged with the grid's id: select them in the
MLflow UI and press Compare.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from arcface import paired
from arcface.cli import add_params_arguments
from arcface.config import load_params, parse_override
from arcface.evaluate import interval_text
from arcface.files import read_json
from arcface.layout import Layout
from arcface.workspace_lock import workspace_lock
from flows.train_and_eval import chunk_workers
from tasks import stages
from tasks.dvc_sync import DvcSync, run_stages

COURSE_REPORT_GRID: dict[str, list[Any]] = {
    "train.loss": ["softmax", "arcface"],
    "train.backbone": ["resnet34", "resnet50"],
}
RUNS_DIR = Path("runs")


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def run_name(combination: dict[str, Any]) -> str:
    """A folder- and UI-friendly name: the values joined, e.g. `softmax-resnet34`."""
    return "-".join(str(value).replace("/", "_") for value in combination.values()) or "base"


def prepare_run_folder(project: Layout, folder: Path) -> Layout:
    """`folder` as a workspace whose inputs are the project's downloaded and aligned data."""
    run = Layout(folder)
    for shared, link in ((project.raw, run.raw), (project.aligned, run.aligned)):
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() == shared.resolve():
                continue
            raise FileExistsError(f"{link}: exists and is not a link to {shared}; remove it")
        os.symlink(os.path.relpath(shared.resolve(), link.parent.resolve()), link)
    return run


@flow(name="compare-grid", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=chunk_workers()))
def compare_grid(
    grid: dict[str, list[Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    params_file: str = "params.yaml",
    lock_wait_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Train and evaluate every combination of `grid` (default: the course report's softmax vs arcface ×
    resnet34 vs resnet50) on top of `overrides`; returns one row of metrics per combination."""
    logging.getLogger("arcface").setLevel(logging.INFO)
    with workspace_lock(what=f"compare-grid flow run {flow_run.get_id()}", wait_s=lock_wait_s):
        return _compare(grid or COURSE_REPORT_GRID, overrides or {}, params_file)


def _compare(grid: dict[str, list[Any]], overrides: dict[str, Any], params_file: str) -> list[dict[str, Any]]:
    logger = get_run_logger()
    shared = sorted(k for k in [*overrides, *grid] if k.split(".")[0] in ("download", "align"))
    if shared:
        raise ValueError(
            f"{', '.join(shared)}: the grid's runs share the project's downloaded and aligned data, so "
            "download.* and align.* come from params.yaml only"
        )
    project = Layout()
    shared_params = load_params(params_file)
    sync = DvcSync.for_params(shared_params, log=logger)
    shared_stages = [("download", stages.download), ("align", stages.align_faces)]
    run_stages(shared_stages, shared_params, project, sync, logger)
    grid_id = uuid.uuid4().hex[:8]
    rows = []
    for combination in combinations(grid):
        name = run_name(combination)
        params = load_params(params_file, overrides | combination)
        layout = prepare_run_folder(project, RUNS_DIR / name)
        (layout.root / "overrides.yaml").write_text(yaml.safe_dump(overrides | combination))
        logger.info("run %s: %s", name, combination)
        stages.train_model(params, layout)
        stages.embed_faces(params, layout)
        stages.build_index(params, layout)
        stages.evaluate_model(params, layout)
        tags = {"grid": grid_id, "prefect.flow_run_id": flow_run.get_id() or ""}
        tags |= {f"grid.{key}": str(value) for key, value in combination.items()}
        stages.track_run(params, layout, tags, run_name=name)
        metrics = read_json(layout.reports / "metrics.json")
        rows.append(
            {
                "run": name,
                **combination,
                "accuracy_mean": metrics["accuracy_mean"],
                "accuracy_std": metrics["accuracy_std"],
                "accuracy_ci95_low": metrics.get("accuracy_ci95_low"),
                "accuracy_ci95_high": metrics.get("accuracy_ci95_high"),
                "auc": metrics["auc"],
                "mlflow_run_id": read_json(layout.reports / "mlflow_run.json")["run_id"],
                **_against_first(rows, layout.reports),
            }
        )
    create_markdown_artifact(
        key="compare-grid", markdown=_table(rows, grid_id), description="the grid's runs, side by side"
    )
    return rows


def _against_first(rows: list[dict[str, Any]], reports: Path) -> dict[str, Any]:
    """The paired comparison with the grid's first run (same pairs): pairs fixed and broken, McNemar's p."""
    if not rows:
        return {"reports": str(reports)}
    found = paired.compare(Path(rows[0]["reports"]), reports)
    return {
        "reports": str(reports),
        "fixed_vs_first": found.fixed,
        "broken_vs_first": found.broken,
        "p_vs_first": found.p_value,
    }


def _against_first_text(row: dict[str, Any]) -> str:
    if "p_vs_first" not in row:
        return "baseline"
    return f"{row['fixed_vs_first']} fixed, {row['broken_vs_first']} broken, p {row['p_vs_first']:.2g}"


def _table(rows: list[dict[str, Any]], grid_id: str) -> str:
    header = (
        "| run | accuracy | 95% interval over the pairs | against the first run (McNemar) | ROC AUC "
        "| MLflow run |\n|---|---|---|---|---|---|\n"
    )
    body = "\n".join(
        f"| {r['run']} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | {interval_text(r)} | "
        f"{_against_first_text(r)} | {r['auc']:.4f} | {r['mlflow_run_id']} |"
        for r in rows
    )
    return f"grid `{grid_id}` (MLflow tag `grid`)\n\n{header}{body}"


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`--grid train.loss=softmax,arcface` items -> {"train.loss": ["softmax", "arcface"]}."""
    grid = {}
    for item in items:
        key, value = parse_override(item)
        values = value if isinstance(value, list) else [yaml.safe_load(v) for v in str(value).split(",")]
        grid[key] = values
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_params_arguments(parser)
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a param and its values (repeatable); default: the course report's loss × backbone grid",
    )
    args = parser.parse_args(argv)
    overrides = dict(parse_override(item) for item in args.overrides)
    grid = parse_grid(args.grid) if args.grid else None
    try:
        rows = compare_grid(grid=grid, overrides=overrides, params_file=str(args.params))
    except Exception as err:  # Prefect has logged the failing task and its traceback above
        print(f"compare-grid failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(
        f"{'run':<28} {'accuracy':>17} {'95% interval':>13} {'AUC':>7}  {'MLflow run':<32}  against the first"
    )
    for row in rows:
        accuracy = f"{row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f}"
        print(
            f"{row['run']:<28} {accuracy:>17} {interval_text(row):>13} {row['auc']:>7.4f}  "
            f"{row['mlflow_run_id']:<32}  {_against_first_text(row)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
