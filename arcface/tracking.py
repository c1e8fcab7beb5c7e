"""The one place that talks to MLflow: one run per pipeline run, built from the stages' output files.

Tracking reads what the stages wrote (history.csv, metrics.json, plots, the checkpoints, the fitted
embedding models) instead of being threaded through them, so `dvc repro` (one process per stage) and the
Prefect flow record the same run. The registered model is the whole verifier the accuracy belongs to (every
trunk, the texture view, the Joint Bayesian model: `arcface.verifier`), not the first trunk alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from arcface.config import Params, flatten
from arcface.files import read_json, write_json

if TYPE_CHECKING:
    from arcface.verifier import Verifier

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_FILE = "mlflow_run.json"
# What the logged verifier needs to be loaded elsewhere (it carries the `arcface` package as code: these
# are what that imports); explicit, because inferring them is ~50× slower.
MODEL_REQUIREMENTS = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
    "pyyaml",
    "tqdm",
    "pillow",
)
MODEL_NAME = "verifier"  # the logged model's name within its run
CHAMPION_ALIAS = "champion"
ACCURACY_TAG = "lfw_accuracy"
PROTOCOL_TAG = "lfw_protocol"


@dataclass(frozen=True)
class RunInputs:
    """Files of one pipeline run, as written by the stages."""

    models: Path  # train: group-<g>/ with history.csv, split.json, checkpoint.pt
    embeddings: Path  # embed: group-<g>/ with embed.json and the fitted texture and Joint Bayesian models
    metrics: Path  # evaluate: metrics.json
    align_summary: Path  # align: counts by status, landmark residual
    align_run: Path  # align: throughput of the run that wrote the store
    artifacts: tuple[Path, ...]  # plots and tables to attach


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    experiment_id: str
    tracking_uri: str


def run_inputs(model_dir: Path, reports_dir: Path, aligned_dir: Path, embeddings_dir: Path) -> RunInputs:
    """The stage outputs a tracked run records (shared with the Prefect flow)."""
    from arcface import evaluate
    from arcface.data import store

    reports = Path(reports_dir)
    return RunInputs(
        models=Path(model_dir),
        embeddings=Path(embeddings_dir),
        metrics=reports / evaluate.METRICS_FILE,
        align_summary=Path(aligned_dir) / store.SUMMARY_FILE,
        align_run=store.run_facts_path(Path(aligned_dir)),
        artifacts=(
            *(reports / name for name in (evaluate.ROC_PLOT, evaluate.HISTOGRAM_PLOT, evaluate.FOLDS_PLOT)),
            *(reports / name for name in (evaluate.ANGLES_PLOT, evaluate.ROC_FILE, evaluate.FOLDS_FILE)),
            Path(aligned_dir) / store.CONTACT_SHEET_FILE,
        ),
    )


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def log_pipeline_run(
    params: Params,
    inputs: RunInputs,
    out_file: Path,
    tags: dict[str, str] | None = None,
    run_name: str | None = None,
) -> TrackedRun:
    """Record one pipeline run: params, final metrics, plots and the model on the parent run; with
    cross-training, one nested run per model with its training curves (else they go on the parent)."""
    import mlflow

    from arcface.train import SPLIT_FILE, group_dirs

    # The verifier is assembled before the run starts: embeddings of other trunks stop here, not with a
    # half-logged run.
    verifier, first = None, group_dirs(inputs.models)[0]
    if params.tracking.log_model:
        from arcface.verifier import Verifier

        verifier = Verifier.of_run(first, Path(inputs.embeddings) / first.name)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(params.tracking.experiment)
    models = group_dirs(inputs.models)
    tags = (tags or {}) | dvc_data_tags()
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params(flatten(params))
        metrics = read_json(inputs.metrics)
        mlflow.log_metrics(_numbers(metrics) | _fold_metrics(metrics))
        if inputs.align_summary.exists():
            summary = read_json(inputs.align_summary)
            mlflow.log_metrics(
                {f"align_{status}": count for status, count in summary["counts"].items()}
                | {"align_mean_residual": summary["mean_residual"]}
            )
        if inputs.align_run.exists():
            mlflow.log_metric("align_images_per_second", read_json(inputs.align_run)["images_per_second"])
        for artifact in (inputs.metrics, inputs.align_summary, *inputs.artifacts):
            if artifact.exists():
                mlflow.log_artifact(str(artifact))
        for folder in models:
            if len(models) == 1:
                _log_trunks(folder)
                mlflow.log_artifact(str(folder / SPLIT_FILE))
                continue
            with mlflow.start_run(run_name=folder.name, nested=True, tags={"group": folder.name}):
                _log_trunks(folder)
                mlflow.log_artifact(str(folder / SPLIT_FILE))
                mlflow.log_metrics(_fold_metrics(metrics, folder.name))
        if verifier is not None:
            _log_model(verifier, params.tracking.registered_model_name, metrics, first.name)
    tracked = TrackedRun(run.info.run_id, experiment.experiment_id, uri)
    write_json(out_file, {"run_id": tracked.run_id, "experiment_id": tracked.experiment_id})
    logger.info("MLflow run %s in experiment %r (%s)", tracked.run_id, params.tracking.experiment, uri)
    return tracked


def _log_trunks(folder: Path) -> None:
    """The training curves of one group's model: its trunk's, and its companions' (train.companion)."""
    from arcface.train import HISTORY_FILE, companion_folders

    _log_history(pd.read_csv(folder / HISTORY_FILE))
    for trunk in companion_folders(folder):
        _log_history(pd.read_csv(trunk / HISTORY_FILE), trunk.name.replace("-", "") + "_")


def _log_history(history: pd.DataFrame, prefix: str = "") -> None:
    """Per-epoch curves of one trunk, its metric names prefixed (`companion_`, `companion2_`... for the
    further trunks)."""
    import mlflow

    for epoch in history.itertuples(index=False):
        mlflow.log_metrics(
            {
                f"{prefix}train_loss": epoch.loss,
                f"{prefix}train_accuracy": epoch.accuracy,
                f"{prefix}lr": epoch.lr,
                f"{prefix}images_per_second": epoch.images_per_second,
            },
            step=int(epoch.epoch),
        )
    # The epochs actually trained: fewer than train.epochs when train.time_budget_minutes cut the run.
    minutes = float(history["seconds"].sum()) / 60
    mlflow.log_metrics({f"{prefix}train_epochs": len(history), f"{prefix}train_minutes": minutes})


def _numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of metrics.json, nested keys joined with '.' (MLflow keys allow '.')."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _fold_metrics(metrics: dict[str, Any], model: str | None = None) -> dict[str, float]:
    """Per-fold accuracy and threshold (of one model's folds, or all)."""
    flat = {}
    for fold in metrics.get("folds", []):
        if model is None or fold["model"] == model:
            flat[f"fold_{fold['fold']}_accuracy"] = fold["accuracy"]
            flat[f"fold_{fold['fold']}_threshold"] = fold["threshold"]
    return flat


def _log_model(
    verifier: Verifier, registered_name: str | None, metrics: dict[str, Any], verifier_model: str = "group-0"
) -> None:
    """Log (and register) the verifier of one model (`verifier_model`, a group folder's name) as an MLflow
    pyfunc model: aligned faces in, the primary embedding out, with the accuracy, protocol and threshold
    it was scored at in `verifier.json` (with cross-training, the accuracy of the folds it scored)."""
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import infer_signature

    import arcface
    from arcface.evaluate import model_figures

    notes = {key: metrics.get(key) for key in ("protocol", "accuracy_mean", "auc", "threshold")}
    own = model_figures(metrics, verifier_model)
    if own is not None:
        # Cross-training: this model scored only its own folds; the run's figures pool every model's.
        notes |= own | {"run_accuracy_mean": metrics["accuracy_mean"], "model": verifier_model}
    # Two faces, not one, so the signature keeps the batch dimension open.
    example = np.zeros((2, 112, 112, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="verifier-") as temp:
        folder = verifier.save(Path(temp) / MODEL_NAME, notes)
        logged = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            loader_module="arcface.verifier",
            data_path=str(folder),
            code_paths=[str(Path(arcface.__file__).parent)],
            input_example=example,
            # Given, not inferred: MLflow infers none for a loader-module model. Batch size left open.
            signature=infer_signature(example, verifier.embed(example)),
            pip_requirements=[_pinned(package) for package in MODEL_REQUIREMENTS],
            registered_model_name=registered_name,
        )
    if registered_name and logged.registered_model_version is not None:
        version = str(logged.registered_model_version)
        # What the UI's model page shows: what this version is, and what it scored.
        protocol = metrics.get("protocol")
        if own is None:
            scored = f"{protocol} accuracy {metrics['accuracy_mean']:.4f}"
        else:
            scored = (
                f"{verifier_model} of {metrics['groups']} cross-trained models: {protocol} accuracy "
                f"{own['accuracy_mean']:.4f} on the folds it scored ({metrics['accuracy_mean']:.4f} over "
                "every model's folds)"
            )
        summary = f"{verifier.describe()}; {scored}"
        mlflow.MlflowClient().update_model_version(registered_name, version, description=summary)
        promote_if_better(registered_name, version, metrics | {"accuracy_mean": notes["accuracy_mean"]})


def promote_if_better(name: str, version: str, metrics: dict[str, Any], client: Any = None) -> bool:
    """Tag the new version with its LFW accuracy and move the `champion` alias to it only when it beats
    the current champion's accuracy under the same protocol (the first version becomes champion)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    accuracy, protocol = float(metrics["accuracy_mean"]), str(metrics["protocol"])
    client.set_model_version_tag(name, version, ACCURACY_TAG, f"{accuracy:.6f}")
    client.set_model_version_tag(name, version, PROTOCOL_TAG, protocol)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:  # no champion yet
        champion = None
    if champion is not None:
        best = float(champion.tags.get(ACCURACY_TAG, "-1"))
        same_protocol = champion.tags.get(PROTOCOL_TAG) == protocol
        if same_protocol and accuracy <= best:
            logger.info("%s v%s: accuracy %.4f does not beat champion v%s (%.4f)", name, version,
                        accuracy, champion.version, best)  # fmt: skip
            return False
        if not same_protocol:
            logger.info("%s: champion v%s was scored under %s, not %s; keeping it", name,
                        champion.version, champion.tags.get(PROTOCOL_TAG), protocol)  # fmt: skip
            return False
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    logger.info("%s v%s (accuracy %.4f) is now @%s", name, version, accuracy, CHAMPION_ALIAS)
    return True


def git_commit() -> str | None:
    """The short hash of the checked-out commit, or None outside a git checkout."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def dvc_data_tags(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """The DVC hashes of the raw and aligned data this run used (from dvc.lock, when there is one)."""
    import yaml

    if not Path(lock_file).exists():
        return {}
    stages = (yaml.safe_load(Path(lock_file).read_text()) or {}).get("stages", {})
    tags = {}
    for stage, key in (("download", "dvc.raw_md5"), ("align", "dvc.aligned_md5")):
        outs = stages.get(stage, {}).get("outs", [])
        if outs and "md5" in outs[0]:
            tags[key] = str(outs[0]["md5"])
    return tags


def _pinned(package: str) -> str:
    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return package
