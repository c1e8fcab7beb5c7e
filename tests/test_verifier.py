"""The verifier as one object and as the registered MLflow model: a model with a companion trunk, the
texture view and a Joint Bayesian model, trained and tracked on real faces, embeds and scores exactly as
the pipeline's own stages did."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_workspace, tiny_params

from arcface import cli, tracking
from arcface.config import load_params
from arcface.data import store
from arcface.files import read_json, write_json
from arcface.verifier import SPEC_FILE, Verifier, VerifierError


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: dict[str, Path]) -> Path:
    """A workspace whose model has a second trunk, run through every stage and tracked in MLflow."""
    second = {"backbone": "resnet18-fast-half", "embedding_size": 32}
    params = tiny_params(tiny_dataset, companion=second)
    folder = make_workspace(tmp_path_factory.mktemp("verifier") / "ws", params)
    before, uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        for stage in ("download", "align", "train", "embed", "evaluate", "track"):
            assert cli.main([stage]) == 0, stage
    finally:
        os.chdir(before)
        if uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = uri
    return folder


def stored_faces(workspace: Path) -> tuple[np.ndarray, np.ndarray]:
    """The embedded faces, in the order of the embed stage's rows, and those rows."""
    rows = np.load(workspace / "data/embeddings/group-0/rows.npy")
    return np.asarray(store.open_faces(workspace / "data/aligned")[rows]), rows


def test_the_registered_verifier_embeds_and_scores_as_the_pipeline_did(tracked: Path, monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracked / 'mlflow.db'}")
    metrics = read_json(tracked / "reports/metrics.json")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("arcface-verifier", "champion")
    assert champion.run_id == read_json(tracked / "reports/mlflow_run.json")["run_id"]
    assert float(champion.tags["lfw_accuracy"]) == pytest.approx(metrics["accuracy_mean"], abs=1e-6)
    assert champion.description == (
        "2 trunks (resnet18-fast; resnet18-fast-half), flip TTA, texture view fused, Joint Bayesian scores; "
        f"view2 accuracy {metrics['accuracy_mean']:.4f}"
    )

    model = mlflow.pyfunc.load_model("models:/arcface-verifier@champion")
    signature = model.metadata.signature
    (given,), (returned,) = signature.inputs.inputs, signature.outputs.inputs
    assert (given.type, given.shape) == (np.dtype(np.uint8), (-1, 112, 112, 3))
    assert (
        returned.type == np.dtype(np.float32)
        and returned.shape[1] == read_json(tracked / "data/embeddings/group-0/embed.json")["dimension"]
    )
    faces, rows = stored_faces(tracked)
    vectors = model.predict(faces)
    # The primary embedding: both trunks joined, fused with the texture view, mapped by the Joint
    # Bayesian model; the same numbers the embed stage wrote.
    expected = np.load(tracked / "data/embeddings/group-0/bayes.npy")
    assert metrics["embedding"] == "bayes" and vectors.shape == expected.shape
    np.testing.assert_allclose(vectors, expected, atol=1e-5)

    # Scored as the evaluation scored the pairs.
    verifier = Verifier.of_run(tracked / "models/group-0", tracked / "data/embeddings/group-0")
    pairs = pd.read_csv(tracked / "reports/scores.csv")
    paths = store.read_manifest(tracked / "data/aligned")["path"].to_numpy()[rows]
    where = {path: position for position, path in enumerate(paths)}
    first = vectors[[where[path] for path in pairs["path1"]]]
    second = vectors[[where[path] for path in pairs["path2"]]]
    np.testing.assert_allclose(verifier.scores(first, second), pairs["score_bayes"], atol=1e-4)

    # What was registered: two slim trunks (weights, no optimizer state), the fitted models, the notes.
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/arcface-verifier/{champion.version}"))
    (spec_path,) = folder.rglob(SPEC_FILE)
    spec = read_json(spec_path)
    assert spec["trunks"] == ["trunk-0.pt", "trunk-1.pt"] and spec["score"] == "joint_bayesian"
    assert (spec["texture"], spec["bayes"], spec["dimension"]) == (
        "texture.npz",
        "bayes.npz",
        expected.shape[1],
    )
    assert spec["notes"]["accuracy_mean"] == metrics["accuracy_mean"]
    assert spec["notes"]["threshold"] == metrics["threshold"]
    for number, checkpoint in enumerate(["checkpoint.pt", "companion/checkpoint.pt"]):
        slim = spec_path.parent / f"trunk-{number}.pt"
        assert slim.stat().st_size < (tracked / "models/group-0" / checkpoint).stat().st_size


def test_a_saved_verifier_loads_back_and_names_a_missing_file(tracked: Path, tmp_path: Path) -> None:
    verifier = Verifier.of_run(tracked / "models/group-0", tracked / "data/embeddings/group-0")
    saved = verifier.save(tmp_path / "verifier", {"accuracy_mean": 0.5})
    faces, _ = stored_faces(tracked)
    again = Verifier.load(saved, "cpu")
    np.testing.assert_array_equal(again.embed(faces[:8]), verifier.embed(faces[:8]))
    assert read_json(saved / SPEC_FILE)["notes"] == {"accuracy_mean": 0.5}

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "trunk-1.pt").unlink()
    with pytest.raises(VerifierError, match=r"broken/trunk-1\.pt: not found, but .*verifier\.json names it"):
        Verifier.load(broken, "cpu")
    assert (broken / "trunk-0.pt").exists() and (broken / "bayes.npz").exists()
    with pytest.raises(VerifierError, match=r"empty/verifier\.json: not found"):
        Verifier.load(tmp_path / "empty", "cpu")


def test_faces_of_another_shape_or_type_are_refused_by_name(tracked: Path) -> None:
    verifier = Verifier.of_run(tracked / "models/group-0", tracked / "data/embeddings/group-0")
    faces, _ = stored_faces(tracked)
    with pytest.raises(VerifierError, match=r"shape \(N, 112, 112, 3\), got \(2, 3, 112, 112\)"):
        verifier.embed(faces[:2].transpose(0, 3, 1, 2))
    with pytest.raises(VerifierError, match=r"expected uint8 faces .* got float32"):
        verifier.embed(faces[:2].astype(np.float32))


def test_track_refuses_embeddings_of_other_trunks_before_starting_a_run(
    tracked: Path, tmp_path: Path, monkeypatch
) -> None:
    """Embeddings made with other trunks would register a verifier whose vectors were never scored: the
    track stage names both and stops before MLflow records anything."""
    import mlflow

    workspace = tmp_path / "ws"
    shutil.copytree(tracked, workspace, symlinks=True)
    info_path = workspace / "data/embeddings/group-0/embed.json"
    info = read_json(info_path)
    write_json(info_path, info | {"companion_sha256s": ["0" * 64]})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    record = (workspace / "reports/mlflow_run.json").read_text()
    inputs = tracking.run_inputs(
        workspace / "models", workspace / "reports", workspace / "data/aligned", workspace / "data/embeddings"
    )
    with pytest.raises(VerifierError, match=r"embedded with trunks of sha256 .*0{64} but .*group-0 holds"):
        tracking.log_pipeline_run(
            load_params(workspace / "params.yaml"), inputs, workspace / "reports/mlflow_run.json"
        )
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
    assert (workspace / "reports/mlflow_run.json").read_text() == record


def evaluated_pairs(workspace: Path) -> tuple[pd.Series, pd.Series]:
    """A same-person and a different-people pair the evaluation scored, as rows of scores.csv."""
    pairs = pd.read_csv(workspace / "reports/scores.csv")
    return pairs[pairs["same"]].iloc[0], pairs[~pairs["same"]].iloc[0]


def test_verify_scores_two_photos_as_the_evaluation_scored_them(tracked: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tracked)
    threshold = read_json(tracked / "reports/metrics.json")["threshold"]
    for row in evaluated_pairs(tracked):
        first, second = (f"data/raw/images/{row[column]}" for column in ("path1", "path2"))
        assert cli.main(["verify", first, second]) == 0
        line = capsys.readouterr().out.strip()
        verdict = "same" if row["score_bayes"] >= threshold else "different"
        assert line.startswith(f"{first} | {second}: {verdict} (Joint Bayesian score ")
        # The raw photos are aligned again, one at a time: the score is the evaluation's, to alignment noise.
        score = float(line.split("Joint Bayesian score ")[1].split()[0])
        assert score == pytest.approx(row["score_bayes"], abs=0.05 * max(1.0, abs(row["score_bayes"])))
        assert line.endswith(f"threshold {threshold:.4f})")


def test_verify_answers_a_csv_of_pairs_and_names_a_photo_without_a_face(
    tracked: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from PIL import Image

    same, different = evaluated_pairs(tracked)
    images = tracked / "data/raw/images"
    Image.new("RGB", (200, 200), (90, 90, 90)).save(tmp_path / "blank.png")
    two = [np.asarray(Image.open(images / row["path1"]).convert("RGB")) for row in (same, different)]
    Image.fromarray(np.concatenate(two, axis=1)).save(tmp_path / "two.png")  # two people side by side
    rows = [(images / same["path1"], images / same["path2"]), (images / different["path1"], "blank.png")]
    rows += [(images / different["path1"], images / different["path2"]), ("two.png", images / same["path2"])]
    (tmp_path / "pairs.csv").write_text("first,second\n" + "".join(f"{a},{b}\n" for a, b in rows))
    monkeypatch.chdir(tracked)
    assert (
        cli.main(["verify", "--pairs", str(tmp_path / "pairs.csv"), "--csv", str(tmp_path / "out.csv")]) == 1
    )
    assert "1 of 4 pairs could not be answered" in capsys.readouterr().err
    answers = pd.read_csv(tmp_path / "out.csv")
    assert (
        list(answers["verdict"][[1]]) == ["error"]
        and "blank.png: no_face: no face found" in answers["reason"][1]
    )
    threshold = read_json(tracked / "reports/metrics.json")["threshold"]
    for position, row in ((0, same), (2, different)):  # the pairs beside the bad one are still answered
        expected = "same" if row["score_bayes"] >= threshold else "different"
        assert answers["verdict"][position] == expected and pd.isna(answers["reason"][position])
        assert answers["score"][position] == pytest.approx(
            row["score_bayes"], abs=0.05 * max(1.0, abs(row["score_bayes"]))
        )
    # a photo of two people is answered with one of them, and the answer says which rule chose it
    assert answers["verdict"][3] in ("same", "different") and np.isfinite(answers["score"][3])
    assert answers["reason"][3].endswith("two.png: 2 faces, kept the most central")


def test_verify_refuses_a_pairs_file_without_its_columns_and_a_lone_photo(
    tracked: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tracked)
    (tmp_path / "pairs.csv").write_text("a,b\nx.jpg,y.jpg\n")
    out = tmp_path / "out.csv"
    assert cli.main(["verify", "--pairs", str(tmp_path / "pairs.csv"), "--csv", str(out)]) == 2
    error = capsys.readouterr().err
    assert "pairs.csv: needs a header row with the columns first, second; missing first, second" in error
    assert not out.exists()
    assert cli.main(["verify", "one.jpg"]) == 2
    assert "verify compares two photos (got 1); for many pairs use --pairs" in capsys.readouterr().err


def test_verify_bin_scores_an_insightface_set_with_the_whole_verifier_too(
    tracked: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The evaluated pairs written as an insightface .bin (JPEG-encoded): verify-bin scores them with the
    first trunk (`flip`, `plain`) and with the whole verifier (`verifier`); without the embed stage's
    folder, with the trunk alone, and says so."""
    from arcface.data.binsets import load_bin, write_bin
    from arcface.evaluate import verify

    pairs = pd.read_csv(tracked / "reports/scores.csv")
    manifest = store.read_manifest(tracked / "data/aligned")
    position = {path: row for row, path in enumerate(manifest["path"])}
    faces = np.asarray(store.open_faces(tracked / "data/aligned"))
    order = np.ravel(np.column_stack([pairs["path1"].map(position), pairs["path2"].map(position)]))
    write_bin(tmp_path / "lfw.bin", faces[order], pairs["same"].to_numpy())
    monkeypatch.chdir(tracked)
    assert cli.main(["verify-bin", str(tmp_path / "lfw.bin"), "--out", str(tmp_path / "bin.json")]) == 0
    results = read_json(tmp_path / "bin.json")["lfw"]
    assert set(results) == {"flip", "plain", "verifier"}
    # `verifier` is the whole verifier on the set's faces, under the set's contiguous folds
    dataset = load_bin(tmp_path / "lfw.bin")
    verifier = Verifier.of_run(tracked / "models/group-0", tracked / "data/embeddings/group-0")
    vectors = verifier.embed(dataset.faces)
    folds = np.arange(len(pairs)) * 10 // len(pairs)
    scores = verifier.scores(vectors[0::2], vectors[1::2])
    expected = verify(scores, dataset.same, folds, (1e-3, 1e-2), "lfw")
    assert results["verifier"]["auc"] == pytest.approx(expected.auc)
    assert results["verifier"]["accuracy_mean"] == pytest.approx(expected.accuracy_mean)
    assert results["verifier"]["threshold"] == pytest.approx(expected.threshold)
    assert results["verifier"]["auc"] != pytest.approx(results["flip"]["auc"])  # not the first trunk alone

    capsys.readouterr()
    assert (
        cli.main(
            [
                "verify-bin",
                str(tmp_path / "lfw.bin"),
                "--embeddings",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "trunk.json"),
            ]
        )
        == 0
    )
    assert "none/embed.json not found: the trunk alone" in capsys.readouterr().out
    assert set(read_json(tmp_path / "trunk.json")["lfw"]) == {"flip", "plain"}
