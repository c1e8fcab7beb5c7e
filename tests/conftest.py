"""Shared fixtures: quiet offline settings, the bundled sample, and a tiny dataset cut from it."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

# Before Prefect, MLflow or DVC are imported anywhere: no analytics, no telemetry, state in tmp.
_STATE = Path(os.environ.get("PYTEST_STATE_DIR", "/tmp")) / f"arcface-tests-{os.getuid()}"
os.environ.update(
    {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_HOME": str(_STATE / "prefect"),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "arcface",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        "TQDM_DISABLE": "1",
    }
)
(_STATE / "prefect").mkdir(parents=True, exist_ok=True)
# `arcface` must be on PATH for dvc.yaml's commands.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

import pytest  # noqa: E402
import yaml  # noqa: E402

from arcface.files import sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "tests" / "data" / "sample"
SAMPLE_TGZ = SAMPLE_DIR / "lfw-sample.tgz"
SAMPLE_PAIRS = SAMPLE_DIR / "pairs.txt"
TINY_FOLDS = 2  # of the sample's 10
TINY_TRAIN_PEOPLE = 10


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample extracted once: `<Person>/<Person>_NNNN.jpg`, 920 faces of 230 people."""
    target = tmp_path_factory.mktemp("sample")
    with tarfile.open(SAMPLE_TGZ) as archive:
        archive.extractall(target, filter="data")
    return target / "lfw-sample"


def cut_dataset(folder: Path, sample_images: Path, folds: int, train_people: int) -> dict[str, Path]:
    """A smaller LFW of real faces in LFW's formats: an archive and a View-2-shaped `pairs.txt` with the
    sample's first `folds` folds, plus `train_people` training people who are in no pair."""
    lines = SAMPLE_PAIRS.read_text().splitlines()
    per_fold = int(lines[0].split()[1])
    kept = lines[1 : 1 + folds * 2 * per_fold]
    pair_people = {field for line in kept for field in line.split("\t") if not field.isdigit()}
    all_pair_people = {f for line in lines[1:] for f in line.split("\t") if not f.isdigit()}
    people = sorted(p.name for p in sample_images.iterdir())
    trainers = [p for p in people if p not in all_pair_people][:train_people]
    (folder / "pairs.txt").write_text(f"{folds}\t{per_fold}\n" + "\n".join(kept) + "\n")
    with tarfile.open(folder / "lfw-cut.tgz", "w:gz") as archive:
        for person in sorted(pair_people | set(trainers)):
            archive.add(sample_images / person, arcname=f"lfw-cut/{person}")
    return {"archive": folder / "lfw-cut.tgz", "pairs": folder / "pairs.txt"}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, sample_images: Path) -> dict[str, Path]:
    """The sample's first two folds (20 people in pairs) and ten training people: 80 faces."""
    return cut_dataset(tmp_path_factory.mktemp("tiny"), sample_images, TINY_FOLDS, TINY_TRAIN_PEOPLE)


@pytest.fixture(scope="session")
def ten_fold_dataset(tmp_path_factory: pytest.TempPathFactory, sample_images: Path) -> dict[str, Path]:
    """All ten folds of the sample's pairs (50 people) and ten training people: 240 faces."""
    return cut_dataset(tmp_path_factory.mktemp("ten-fold"), sample_images, 10, TINY_TRAIN_PEOPLE)


def tiny_params(dataset: dict[str, Path], **train: object) -> dict:
    """params.yaml's contents pointed at the tiny dataset, with settings that train in seconds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["download"]["sample"] = {
        "images": {"url": str(dataset["archive"]), "sha256": sha256_file(dataset["archive"])},
        "pairs": {"url": str(dataset["pairs"]), "sha256": sha256_file(dataset["pairs"])},
    }
    # resnet18-fast: the stages, not the trunk, are under test, and it is the cheapest trunk to train on a
    # CPU without fast bf16. No recipe: on such a CPU `auto` would swap in sample-fp32's trunk.
    params["train"].update(
        {"recipe": "none", "backbone": "resnet18-fast", "epochs": 1, "batch_size": 16, "warmup_epochs": 0.0}
        | train
    )
    params["embed"]["batch_size"] = 64
    return params


def make_workspace(folder: Path, params: dict) -> Path:
    """A project checkout in `folder`: git + DVC initialised, dvc.yaml, the library sources, params."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(ROOT / "arcface", folder / "arcface", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = lambda *cmd: subprocess.run(cmd, cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "workspace")
    return folder


@pytest.fixture(scope="session")
def aligned_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: dict[str, Path]) -> Path:
    """The tiny dataset's faces aligned once: an aligned store folder."""
    from arcface.config import AlignParams
    from arcface.data import align, lfw

    folder = tmp_path_factory.mktemp("aligned-tiny")
    lfw.extract_images(tiny_dataset["archive"], folder / "images")
    align.run(AlignParams(device="cpu"), folder / "images", folder / "aligned")
    return folder / "aligned"


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole session: starting one costs ~15 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
