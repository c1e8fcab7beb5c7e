"""MLflow bookkeeping on a real SQLite store: the champion alias and the DVC data tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from arcface.tracking import CHAMPION_ALIAS, dvc_data_tags, promote_if_better


@pytest.fixture
def registry(tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("faces")
    return client


def new_version(client, tmp_path: Path) -> str:
    return client.create_model_version("faces", source=str(tmp_path)).version


def champion(client) -> str:
    return client.get_model_version_by_alias("faces", CHAMPION_ALIAS).version


def test_champion_moves_only_to_a_better_model_of_the_same_protocol(registry, tmp_path: Path) -> None:
    first = new_version(registry, tmp_path)
    assert promote_if_better("faces", first, {"accuracy_mean": 0.80, "protocol": "view2"}, registry)
    assert champion(registry) == first

    worse = new_version(registry, tmp_path)
    assert not promote_if_better("faces", worse, {"accuracy_mean": 0.79, "protocol": "view2"}, registry)
    tie = new_version(registry, tmp_path)
    assert not promote_if_better("faces", tie, {"accuracy_mean": 0.80, "protocol": "view2"}, registry)
    other = new_version(registry, tmp_path)  # a View 1 number can't unseat a View 2 champion
    assert not promote_if_better("faces", other, {"accuracy_mean": 0.99, "protocol": "view1"}, registry)
    assert champion(registry) == first

    better = new_version(registry, tmp_path)
    assert promote_if_better("faces", better, {"accuracy_mean": 0.85, "protocol": "view2"}, registry)
    assert champion(registry) == better
    assert registry.get_model_version("faces", worse).tags["lfw_accuracy"] == "0.790000"


def test_dvc_data_tags_come_from_the_lock_file(tmp_path: Path) -> None:
    assert dvc_data_tags(tmp_path / "dvc.lock") == {}
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  download:\n    outs:\n    - path: data/raw\n      md5: abc.dir\n"
        "  align:\n    outs:\n    - path: data/aligned\n      md5: def.dir\n"
    )
    assert dvc_data_tags(tmp_path / "dvc.lock") == {"dvc.raw_md5": "abc.dir", "dvc.aligned_md5": "def.dir"}
