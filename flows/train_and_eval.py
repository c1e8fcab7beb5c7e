"""The `train-and-eval` flow: download → align → train → embed → index → evaluate → track.

The same stages, params and paths as dvc.yaml. Run it in-process (`python -m flows.train_and_eval`) or
as the deployment served by `flows/serve.py` (`prefect deployment run train-and-eval/local`).
On params.yaml's params the flow keeps DVC's lock in step (tasks/dvc_sync.py): stages DVC considers up to
date are skipped and finished ones are committed, so `dvc status` is clean afterwards. With overrides (or
another params file) the run is an experiment: dvc.lock is left as it is, and only the stages whose
declared params the experiment leaves alone are reused (a training override retrains on the faces already
aligned).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from arcface.cli import add_params_arguments
from arcface.config import load_params, parse_override
from arcface.evaluate import format_metrics, interval_text
from arcface.files import read_json
from arcface.layout import Layout
from arcface.tracking import git_commit
from arcface.workspace_lock import workspace_lock
from tasks import stages
from tasks.dvc_sync import DvcSync, run_stages

STAGES: list[tuple[str, Callable[..., Any]]] = [
    ("download", stages.download),
    ("align", stages.align_faces),
    ("train", stages.train_model),
    ("embed", stages.embed_faces),
    ("index", stages.build_index),
    ("evaluate", stages.evaluate_model),
]


def chunk_workers() -> int:
    """Threads for mapped chunk tasks: each already uses several cores through torch, so a quarter of
    the cores (one on a laptop) keeps them from fighting over the CPU."""
    return max(1, (os.cpu_count() or 1) // 4)


@flow(name="train-and-eval", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=chunk_workers()))
def train_and_eval(
    overrides: dict[str, Any] | None = None,
    params_file: str = "params.yaml",
    lock_wait_s: float = 0.0,
) -> dict[str, Any]:
    """Run every stage on the params in `params_file`, with dotted-key `overrides` such as
    {"train.epochs": 2}; returns the evaluation metrics. Another run writing the workspace makes this one
    wait up to `lock_wait_s` seconds, then fail naming it."""
    logging.getLogger("arcface").setLevel(logging.INFO)  # the stages' progress lines, in the run's log
    with workspace_lock(what=f"train-and-eval flow run {flow_run.get_id()}", wait_s=lock_wait_s):
        return _run_stages(overrides or {}, params_file)


def _run_stages(overrides: dict[str, Any], params_file: str) -> dict[str, Any]:
    logger = get_run_logger()
    params = load_params(params_file, overrides)
    layout = Layout()
    sync = DvcSync.for_params(params, log=logger)
    run_stages(STAGES, params, layout, sync, logger)

    metrics = read_json(layout.reports / "metrics.json")
    commit = git_commit() or "unknown"
    if sync is None or not sync.reusable("track"):
        tags = {"prefect.flow_run_id": flow_run.get_id() or "", "git_commit": commit}
        stages.track_run(params, layout, tags)
        if sync is not None and sync.records:
            sync.commit("track")
    run_id = read_json(layout.reports / "mlflow_run.json")["run_id"]
    create_markdown_artifact(
        key="train-and-eval-metrics",
        markdown=_metrics_table(metrics, run_id, commit),
        description="LFW verification metrics of this run",
    )
    return metrics


def _metrics_table(metrics: dict[str, Any], run_id: str, commit: str) -> str:
    rows = [
        ("protocol", metrics["protocol"]),
        ("accuracy", f"{metrics['accuracy_mean']:.4f} ± {metrics['accuracy_std']:.4f}"),
        ("accuracy, 95% interval over the pairs", interval_text(metrics)),
        ("ROC AUC", f"{metrics['auc']:.4f}"),
        ("EER", f"{metrics['eer']:.4f}"),
        *(
            (f"TAR @ FAR={k.removeprefix('tar_at_far_')}", f"{v:.4f}")
            for k, v in metrics.items()
            if k.startswith("tar_at_far_")
        ),
        ("threshold", f"{metrics['threshold']:.4f}"),
        ("pairs", str(metrics["pairs"])),
        ("models (cross-training groups)", str(metrics["groups"])),
        *((f"fold {f['fold']}", f"{f['accuracy']:.4f} by {f['model']}") for f in metrics["folds"]),
        *(
            (f"identification {key}", "n/a" if value is None else f"{value:.4f}")
            for key, value in metrics.get("identification", {}).items()
            if key.startswith(("rank", "dir_at_far_"))
        ),
        ("MLflow run", run_id),
        ("git commit", commit),
    ]
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the train-and-eval flow in this process (Prefect starts a temporary "
        "server unless PREFECT_API_URL points at one)."
    )
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    overrides = dict(parse_override(item) for item in args.overrides)
    try:
        metrics = train_and_eval(overrides=overrides, params_file=str(args.params))
    except Exception as err:  # Prefect has logged the failing task and its traceback above
        print(f"train-and-eval failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    layout = Layout()
    print(format_metrics(metrics))
    print(f"metrics: {layout.reports / 'metrics.json'}, plots: {layout.reports}/*.png")
    run_id = read_json(layout.reports / "mlflow_run.json")["run_id"]
    print(f"MLflow run {run_id}: `make ui`, then http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
