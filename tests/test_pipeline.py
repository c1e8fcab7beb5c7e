"""End to end on real faces: every stage through the CLI with MLflow, `dvc repro`, and the Prefect
deployment served by a real local server, leaving DVC's state clean."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, make_workspace, tiny_params

from arcface import bayes, cli
from arcface.data.lfw import read_pairs
from arcface.files import read_json


def run_cli(*args: str) -> int:
    return cli.main(list(args))


def test_cli_stages_end_to_end_with_mlflow(
    tmp_path: Path, tiny_dataset: dict[str, Path], monkeypatch, capsys
) -> None:
    params = tiny_params(tiny_dataset, backbone="iresnet18", loss="combined")
    workspace = make_workspace(tmp_path / "ws", params)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    for stage in ("download", "align", "train", "embed", "index", "evaluate", "track"):
        assert run_cli(stage) == 0, stage

    record = read_json(workspace / "data/raw/download.json")
    assert (record["images"], record["people"]) == (80, 20)
    manifest = pd.read_parquet(workspace / "data/aligned/manifest.parquet")
    assert len(manifest) == 80 and (manifest["status"] == "ok").all()

    # Honest evaluation: no identity in the scored pairs was a training class.
    split = read_json(workspace / "models/group-0/split.json")
    scored = set(read_pairs(workspace / "data/raw/protocols/pairs.txt")[["name1", "name2"]].stack())
    assert split["classes"] == 10 and not scored & set(split["identities"])

    embeddings = np.load(workspace / "data/embeddings/group-0/flip.npy")
    assert embeddings.shape == (80, 512)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)

    metrics = read_json(workspace / "reports/metrics.json")
    assert metrics["pairs"] == 40 and len(metrics["folds"]) == 2 and metrics["groups"] == 1
    assert {"accuracy_mean", "auc", "eer", "tar_at_far_0.001", "tar_at_far_0.01"} <= set(metrics)
    # two folds of 20 pairs: the pooled accuracy is the folds' mean, and the interval holds it
    assert metrics["accuracy_ci95_low"] < metrics["accuracy_mean"] <= metrics["accuracy_ci95_high"]
    # params.yaml fuses the texture view and scores by a Joint Bayesian model of the fused vectors; the
    # other variants are still reported on their own
    assert metrics["embedding"] == "bayes"
    variants = ("flip", "plain", "texture", "fused")
    assert all(0 <= metrics[f"with_{v}"]["accuracy_mean"] <= 1 for v in variants)
    fused = np.load(workspace / "data/embeddings/group-0/fused.npy")
    assert fused.shape == (80, 512 + 9)  # + LDA directions: one fewer than the 10 training people
    # PCA to at most the 40 training faces less one, plus the bias column
    assert np.load(workspace / "data/embeddings/group-0/bayes.npy").shape == (80, 39 + 1)
    assert 0.0 <= metrics["accuracy_mean"] <= 1.0 and 0.0 <= metrics["auc"] <= 1.0
    roc = pd.read_csv(workspace / "reports/roc.csv")
    assert roc["fpr"].iloc[-1] == 1.0 and roc["tpr"].iloc[-1] == 1.0

    import mlflow

    run_id = read_json(workspace / "reports/mlflow_run.json")["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["train.backbone"] == "iresnet18"
    assert run.data.params["train.loss"] == "combined"
    assert run.data.params["train.epochs"] == "1"
    assert run.data.metrics["accuracy_mean"] == pytest.approx(metrics["accuracy_mean"])
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1]
    history = pd.read_csv(workspace / "models/group-0/history.csv")
    assert run.data.metrics["train_epochs"] == 1
    assert run.data.metrics["train_minutes"] == pytest.approx(history["seconds"].sum() / 60)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    expected = {"roc.png", "scores.png", "folds.png", "angles.png", "metrics.json", "contact_sheet.png"}
    assert expected | {"summary.json", "split.json", "folds.csv", "roc.csv"} <= artifacts
    assert run.data.metrics["align_ok"] == 80 and run.data.metrics["align_mean_residual"] > 0
    assert run.data.metrics["align_images_per_second"] > 0  # from the run facts beside the store
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == run_id for m in models)
    champion = client.get_model_version_by_alias("arcface-verifier", "champion")
    assert champion.run_id == run_id and float(champion.tags["lfw_accuracy"]) == pytest.approx(
        metrics["accuracy_mean"], abs=1e-6
    )

    # The course report's figure for two runs side by side (here the same run twice).
    assert run_cli("plot-angles", "models", "models", "--labels", "a", "b", "--out", "both.png") == 0
    assert (workspace / "both.png").stat().st_size > 10_000

    # Identification on the identities the model never trained on, in metrics.json and MLflow.
    # The 10 unseen people have 4 faces each: 10 enrolled, 30 mated probes; no single-face person, so
    # no impostors and no open-set rate (tests/test_identification.py covers it).
    found = metrics["identification"]
    assert (found["gallery"], found["mated_probes"], found["nonmated_probes"]) == (10, 30, 0)
    assert 0.0 <= found["rank1"] <= found["rank5"] <= 1.0 and "dir_at_far_0.01" not in found
    assert run.data.metrics["identification.rank1"] == pytest.approx(found["rank1"])

    # Search raw photos: a gallery photo finds its own identity first; a photo without a face and a
    # corrupt file are reported, and the other photos in the same call are still answered.
    photo = workspace / "data/raw/images" / manifest["path"].iloc[0]
    blank, corrupt = tmp_path / "blank.png", tmp_path / "corrupt.jpg"
    from PIL import Image

    Image.new("RGB", (200, 200), (90, 90, 90)).save(blank)
    corrupt.write_bytes(photo.read_bytes()[:300])
    capsys.readouterr()
    assert run_cli("search", str(photo), str(blank), str(corrupt), "--k", "3") == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith(f"(unknown below Joint Bayesian score {metrics['threshold']:.4f}")
    assert lines[1] == f"{photo}: {manifest['identity'].iloc[0]}"
    best = lines[2].split()
    # the photo's own gallery face: the score of that face's Joint Bayesian vector paired with itself
    own = np.load(workspace / "data/embeddings/group-0/bayes.npy")[:1]
    assert best[1] == manifest["identity"].iloc[0]
    assert float(best[2]) == pytest.approx(bayes.pair_scores(own, own)[0], rel=1e-2)
    assert f"{blank}: no_face: no face found" in out.out
    assert f"{corrupt}: error:" in out.out and "corrupt.jpg" in out.out
    assert "2 of 3 photos could not be answered" in out.err

    # A threshold above every score makes the same photo `unknown`; a folder writes a CSV.
    folder = workspace / "data/raw/images" / manifest["identity"].iloc[0]
    assert run_cli("search", str(folder), "--threshold", "1e6", "--csv", "answers.csv") == 0
    answers = pd.read_csv(workspace / "answers.csv")
    assert set(answers["verdict"]) == {"unknown"} and (answers["rank"] == 1).sum() == len(
        list(folder.iterdir())
    )

    # The Python API answers like the CLI.
    from arcface.search import search_photos

    (result,) = search_photos([photo], k=2)
    assert result.identity == manifest["identity"].iloc[0] and len(result.matches) == 2

    # An approximate index over one vector per identity, rebuilt through the CLI, answers the same.
    assert run_cli("index", "--set", "index.type=hnsw", "--set", "index.gallery=identity") == 0
    info = read_json(workspace / "data/index/index.json")
    assert (info["type"], info["gallery"], info["count"]) == ("hnsw", "identity", 20)
    (result,) = search_photos([photo], k=2)
    assert result.matches[0].identity == manifest["identity"].iloc[0]


def test_cross_trained_run_scores_each_fold_with_the_model_blind_to_it(
    tmp_path: Path, ten_fold_dataset: dict[str, Path], monkeypatch
) -> None:
    params = tiny_params(ten_fold_dataset)
    params["evaluate"]["groups"] = 2
    workspace = make_workspace(tmp_path / "ws", params)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    for stage in ("download", "align", "train", "embed", "index", "evaluate", "track"):
        assert run_cli(stage) == 0, stage

    scored = read_pairs(workspace / "data/raw/protocols/pairs.txt")
    people = [
        set(scored[scored["fold"].isin(folds)][["name1", "name2"]].stack())
        for folds in ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    ]
    for group in (0, 1):
        trained = set(read_json(workspace / f"models/group-{group}/split.json")["identities"])
        assert not trained & people[group]  # blind to the people it scores
        assert people[1 - group] <= trained  # but trained on the other group's people
    metrics = read_json(workspace / "reports/metrics.json")
    assert metrics["groups"] == 2
    assert [(f["fold"], f["model"]) for f in metrics["folds"]] == [
        (fold, f"group-{fold // 5}") for fold in range(10)
    ]
    folds = pd.read_csv(workspace / "reports/folds.csv")
    assert folds["model"].tolist() == [f"group-{fold // 5}" for fold in range(10)]
    # Identification: each model enrols and probes only the people it never trained on.
    manifest = pd.read_parquet(workspace / "data/aligned/manifest.parquet")
    per_model = metrics["identification"]["models"]
    for group, found in enumerate(per_model):
        trained = set(read_json(workspace / f"models/group-{group}/split.json")["identities"])
        unseen = manifest[~manifest["identity"].isin(trained)]
        assert found["gallery"] == unseen["identity"].nunique()
        assert found["gallery"] + found["mated_probes"] == len(unseen)
    assert metrics["identification"]["mated_probes"] == sum(m["mated_probes"] for m in per_model)

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    parent = read_json(workspace / "reports/mlflow_run.json")["run_id"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(run.info.run_name for run in children) == ["group-0", "group-1"]
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [1]
    # The registered verifier is model 0's: its accuracy is that of the folds it scored, not the run's.
    own = sum(f["accuracy"] * f["pairs"] for f in metrics["folds"][:5]) / sum(
        f["pairs"] for f in metrics["folds"][:5]
    )
    version = client.get_model_version("arcface-verifier", "1")
    assert float(version.tags["lfw_accuracy"]) == pytest.approx(own, abs=1e-6)
    assert f"group-0 of 2 cross-trained models: view2 accuracy {own:.4f} on the folds it scored" in (
        version.description
    )
    assert f"({metrics['accuracy_mean']:.4f} over every model's folds)" in version.description


def test_torchrun_two_processes_train_a_checkpoint_that_evaluates(
    tmp_path: Path, tiny_dataset: dict[str, Path], monkeypatch
) -> None:
    workspace = make_workspace(tmp_path / "ws", tiny_params(tiny_dataset))
    monkeypatch.chdir(workspace)
    for stage in ("download", "align"):
        assert run_cli(stage) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "arcface.cli", "train", "--set", "train.epochs=2"]  # fmt: skip
    finished = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    history = pd.read_csv(workspace / "models/group-0/history.csv")
    assert history["epoch"].tolist() == [1, 2]
    for stage in ("embed", "index", "evaluate"):
        assert run_cli(stage) == 0, stage
    metrics = read_json(workspace / "reports/metrics.json")
    assert metrics["pairs"] == 40 and 0.0 <= metrics["auc"] <= 1.0


def test_cli_reports_bad_params_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    assert run_cli("train", "--set", "train.epoch=3", "--out", str(tmp_path / "m")) == 2
    err = capsys.readouterr().err
    assert "arcface train: error: params.yaml: invalid parameters" in err
    assert "train.epoch: unknown key" in err
    assert not (tmp_path / "m").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sh(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_deployment_run_and_dvc_agree(tmp_path: Path, tiny_dataset: dict[str, Path]) -> None:
    """The deployment served by a real local Prefect server runs the pipeline to COMPLETED; then DVC
    considers everything up to date, and `dvc repro` recomputes nothing."""
    from flows.local_server import LocalServer

    workspace = make_workspace(tmp_path / "ws", tiny_params(tiny_dataset))
    server = LocalServer(tmp_path / "prefect-home", port=free_port())
    env = server.environment()
    prefect = [sys.executable, "-m", "prefect"]
    try:
        server.start(workdir=workspace)
        out = sh(*prefect, "deployment", "run", "train-and-eval/local", "--watch",
                 "--watch-timeout", "600", cwd=workspace, env=env)  # fmt: skip
        assert "Flow run finished successfully in 'Completed'" in out
        runs = json.loads(
            sh(sys.executable, "-c", _LAST_RUN_STATE, cwd=workspace, env=env).strip().splitlines()[-1]
        )
        assert runs == ["COMPLETED"]
    finally:
        server.stop()
    assert (workspace / "reports/metrics.json").exists()
    assert "up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=workspace)
    second = sh(sys.executable, "-m", "dvc", "repro", cwd=workspace)
    assert "Data and pipelines are up to date" in second or "didn't change" in second
    assert "Running stage" not in second


_LAST_RUN_STATE = """
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs()
        print(json.dumps([r.state.type.value for r in runs]))
asyncio.run(main())
"""


@pytest.mark.slow
def test_dvc_repro_twice_then_flow_in_process_skips_everything(
    tmp_path: Path, tiny_dataset: dict[str, Path], monkeypatch, prefect_harness
) -> None:
    workspace = make_workspace(tmp_path / "ws", tiny_params(tiny_dataset))
    first = sh(sys.executable, "-m", "dvc", "repro", cwd=workspace)
    assert "Running stage 'train'" in first and "Running stage 'track'" in first
    second = sh(sys.executable, "-m", "dvc", "repro", cwd=workspace)
    assert "Running stage" not in second
    assert "up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=workspace)

    # The Prefect flow sees DVC's record and recomputes nothing either.
    from flows.train_and_eval import train_and_eval

    checkpoint = workspace / "models/group-0/checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    run_file = read_json(workspace / "reports/mlflow_run.json")
    monkeypatch.chdir(workspace)
    metrics = train_and_eval()
    assert metrics == read_json(workspace / "reports/metrics.json")
    assert checkpoint.stat().st_mtime_ns == before
    assert read_json(workspace / "reports/mlflow_run.json") == run_file  # no second MLflow run

    # Versioned data: the project's default remote (a folder beside the workspace) keeps the raw data,
    # the aligned store and the checkpoints; with the local cache gone, `dvc pull` brings them back.
    dvc = (sys.executable, "-m", "dvc")
    shutil.copy(ROOT / ".dvc/config", workspace / ".dvc/config")
    sh(*dvc, "push", cwd=workspace)
    assert (tmp_path / "arcface-dvc-remote").is_dir()
    for folder in ("models", "data/aligned", ".dvc/cache"):
        shutil.rmtree(workspace / folder)
    sh(*dvc, "pull", cwd=workspace)
    assert checkpoint.exists() and "up to date" in sh(*dvc, "status", cwd=workspace)

    # An experiment through DVC: only train and what follows rerun; `dvc exp show` lists it.
    run = sh(*dvc, "exp", "run", "-S", "train.loss=softmax", "-n", "softmax-exp", cwd=workspace)
    assert "Running stage 'train'" in run and "Running stage 'align'" not in run
    shown = pd.read_csv(io.StringIO(sh(*dvc, "exp", "show", "--csv", cwd=workspace)))
    (row,) = shown[shown["Experiment"] == "softmax-exp"].to_dict("records")
    assert row["train.loss"] == "softmax" and 0.0 <= float(row["accuracy_mean"]) <= 1.0  # its metrics too

    # An experiment through the flow: a training override retrains on the faces already aligned and
    # leaves dvc.lock describing params.yaml.
    aligned_times = {p: p.stat().st_mtime_ns for p in (workspace / "data/aligned").rglob("*") if p.is_file()}
    lock = (workspace / "dvc.lock").read_bytes()
    before = checkpoint.stat().st_mtime_ns
    run_id = read_json(workspace / "reports/mlflow_run.json")["run_id"]
    train_and_eval(overrides={"train.lr": 0.02})
    assert {
        p: p.stat().st_mtime_ns for p in (workspace / "data/aligned").rglob("*") if p.is_file()
    } == aligned_times
    assert checkpoint.stat().st_mtime_ns != before
    assert (workspace / "dvc.lock").read_bytes() == lock
    assert "train" in sh(*dvc, "status", cwd=workspace)  # DVC sees the experiment's model as changed
    tracked = read_json(workspace / "reports/mlflow_run.json")["run_id"]
    import mlflow

    logged = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}").get_run(tracked).data.params
    assert tracked != run_id and logged["train.lr"] == "0.02"


@pytest.mark.slow
def test_comparison_grid_makes_one_tracked_run_per_combination(
    tmp_path: Path, tiny_dataset: dict[str, Path], monkeypatch, prefect_harness
) -> None:
    """The course report's four runs, each in its own folder over the shared aligned data, each an MLflow
    run with its own params, all tagged with one grid id; the project's own outputs are untouched."""
    import mlflow

    from flows.compare import COURSE_REPORT_GRID, compare_grid

    workspace = make_workspace(tmp_path / "ws", tiny_params(tiny_dataset, batch_size=32))
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    # The course report's grid with the fast trunks (the same code path, a fraction of the arithmetic).
    grid = {**COURSE_REPORT_GRID, "train.backbone": ["resnet34-fast", "resnet50-fast"]}
    assert list(COURSE_REPORT_GRID) == ["train.loss", "train.backbone"]
    rows = compare_grid(grid, overrides={"tracking.log_model": False})
    assert [r["run"] for r in rows] == [
        "softmax-resnet34-fast",
        "softmax-resnet50-fast",
        "arcface-resnet34-fast",
        "arcface-resnet50-fast",
    ]
    assert not (workspace / "models").exists()  # the project's own outputs are not touched
    assert (workspace / "runs/arcface-resnet50-fast/data/aligned").resolve() == (workspace / "data/aligned")
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("train-and-eval").experiment_id])
    assert len(runs) == 4 and len({r.data.tags["grid"] for r in runs}) == 1
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {r["run"] for r in rows}
    run = by_name["softmax-resnet50-fast"]
    assert (run.data.params["train.loss"], run.data.params["train.backbone"]) == ("softmax", "resnet50-fast")
    assert run.data.metrics["accuracy_mean"] == pytest.approx(rows[1]["accuracy_mean"])
    # each row carries the accuracy's interval over the pairs, and MLflow has it too
    assert rows[1]["accuracy_ci95_low"] <= rows[1]["accuracy_mean"] <= rows[1]["accuracy_ci95_high"]
    assert run.data.metrics["accuracy_ci95_high"] == pytest.approx(rows[1]["accuracy_ci95_high"])
    # and, after the first, its pair-by-pair comparison with the first on the same 40 pairs
    assert "p_vs_first" not in rows[0] and all(0.0 < r["p_vs_first"] <= 1.0 for r in rows[1:])
    for row in rows[1:]:  # two equal folds: the accuracies differ by (fixed - broken) / 40
        gained = (row["fixed_vs_first"] - row["broken_vs_first"]) / 40
        assert row["accuracy_mean"] - rows[0]["accuracy_mean"] == pytest.approx(gained)
    # Different models were trained: their embeddings differ.
    first = np.load(workspace / "runs/softmax-resnet34-fast/data/embeddings/group-0/flip.npy")
    second = np.load(workspace / "runs/arcface-resnet34-fast/data/embeddings/group-0/flip.npy")
    assert first.shape == second.shape and not np.allclose(first, second)
