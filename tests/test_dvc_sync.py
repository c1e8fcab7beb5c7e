"""DVC bookkeeping of the flow on a real DVC project: experiments reuse the stages they leave alone and
never touch dvc.lock; runs on params.yaml's params skip and commit as `dvc repro` would."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from arcface.config import load_params
from tasks.dvc_sync import DvcSync, changed_keys, run_stages

# Two stages that declare the params the real align and train stages declare (dvc.yaml), with commands
# that only copy a file, so the bookkeeping is what is under test.
DVC_YAML = {
    "stages": {
        "align": {
            "cmd": "cp source.txt aligned.txt",
            "deps": ["source.txt"],
            "params": ["align"],
            "outs": ["aligned.txt"],
        },
        "train": {
            "cmd": "cp aligned.txt model.txt",
            "deps": ["aligned.txt"],
            "params": ["seed", "train", "recipes", "evaluate.protocol"],
            "outs": ["model.txt"],
        },
    }
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A DVC project (no git) with params.yaml from this repo, both stages reproduced and locked; the
    current folder, as for the flow."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "source.txt").write_text("faces\n")
    dvc = (sys.executable, "-m", "dvc")
    subprocess.run((*dvc, "init", "--no-scm", "-q"), cwd=tmp_path, check=True)
    subprocess.run((*dvc, "repro", "-q"), cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tasks(ran: list[str]) -> list[tuple[str, object]]:
    """Stage tasks that write what the stage's command would, and note that they ran."""

    def stage(name: str, source: str, target: str):
        def task(params, layout) -> None:
            ran.append(name)
            (layout / target).write_text(
                (layout / source).read_text() + f"{name} with lr {params.train.lr}\n"
            )

        return name, task

    return [stage("align", "source.txt", "aligned.txt"), stage("train", "aligned.txt", "model.txt")]


def test_params_yaml_run_skips_what_dvc_has_and_commits_what_ran(project: Path) -> None:
    params = load_params(project / "params.yaml")
    sync = DvcSync.for_params(params, project)
    assert sync is not None and sync.records and sync.changed == frozenset()
    ran: list[str] = []
    run_stages(tasks(ran), params, project, sync)
    assert ran == []  # both up to date

    (project / "model.txt").write_text("edited by hand\n")
    run_stages(tasks(ran), params, project, sync)
    assert ran == ["train"]
    assert sync.up_to_date("train")  # committed: dvc.lock records the new model


def test_experiment_reuses_untouched_stages_and_leaves_dvc_lock_alone(project: Path, caplog) -> None:
    lock_before = (project / "dvc.lock").read_bytes()
    aligned_before = (project / "aligned.txt").read_text()
    params = load_params(project / "params.yaml", {"train.lr": 0.02})
    with caplog.at_level(logging.INFO):
        sync = DvcSync.for_params(params, project)
    assert sync is not None and not sync.records and sync.changed == {"train.lr"}
    assert "params differ from params.yaml in train.lr" in caplog.text
    assert sync.reusable("align") and not sync.reusable("train")

    ran: list[str] = []
    run_stages(tasks(ran), params, project, sync)
    assert ran == ["train"]  # the faces already aligned are reused
    assert (project / "aligned.txt").read_text() == aligned_before
    assert (project / "model.txt").read_text().endswith("train with lr 0.02\n")
    assert (project / "dvc.lock").read_bytes() == lock_before  # the record still describes params.yaml

    # Back on params.yaml's params, DVC sees the experiment's model and retrains.
    params = load_params(project / "params.yaml")
    ran.clear()
    run_stages(tasks(ran), params, project, DvcSync.for_params(params, project))
    assert ran == ["train"] and (project / "dvc.lock").read_bytes() != lock_before


def test_other_params_file_is_an_experiment_too(project: Path) -> None:
    """Another params file is compared with params.yaml, not trusted to be it: before, a run on one with
    no overrides was skipped entirely as 'up to date' and would have committed its outputs as
    params.yaml's."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["align"]["choose"] = "largest"
    other = project / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    lock_before = (project / "dvc.lock").read_bytes()
    params = load_params(other)
    sync = DvcSync.for_params(params, project)
    assert sync is not None and not sync.records
    assert sync.changed == {"align.choose"}

    ran: list[str] = []
    run_stages(tasks(ran), params, project, sync)
    assert ran == ["align", "train"]  # train: DVC sees the new aligned faces
    assert (project / "dvc.lock").read_bytes() == lock_before


def test_unreadable_params_yaml_turns_bookkeeping_off_naming_the_file(project: Path, caplog) -> None:
    params = load_params(project / "params.yaml")
    (project / "params.yaml").write_text("train: [unclosed\n")
    with caplog.at_level(logging.INFO):
        assert DvcSync.for_params(params, project) is None
    assert "DVC bookkeeping off" in caplog.text and "params.yaml" in caplog.text


def test_changed_keys_counts_keys_only_one_side_has() -> None:
    assert changed_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0}) == {"b", "c"}
    assert changed_keys({"a": None}, {}) == {"a"}
