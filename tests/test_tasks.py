"""Prefect tasks: only network failures are retried."""

from __future__ import annotations

from pathlib import Path

import pytest
from http_server import closed_port
from prefect import flow

from arcface.config import load_params
from arcface.data import lfw
from arcface.files import sha256_file
from arcface.layout import Layout
from tasks import stages

ROOT = Path(__file__).resolve().parent.parent


def counting_fetch(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = lfw.fetch

    def fetch(source, *args, **kwargs):
        calls.append(source.url)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(lfw, "fetch", fetch)
    return calls


def run_download(overrides: dict, root: Path):
    params = load_params(ROOT / "params.yaml", {"download.attempts": 1, **overrides})
    task = stages.download.with_options(retry_delay_seconds=0)

    @flow
    def only_download():
        return task(params, Layout(root))

    return only_download()


def test_unreachable_source_is_retried(prefect_harness, monkeypatch, tmp_path: Path) -> None:
    calls = counting_fetch(monkeypatch)
    url = f"http://127.0.0.1:{closed_port()}/lfw.tgz"
    with pytest.raises(lfw.DownloadError, match=r"127\.0\.0\.1"):
        run_download({"download.sample.images.url": url}, tmp_path)
    assert calls == [url] * 3  # the first try and the task's two retries


def test_wrong_checksum_is_not_retried(prefect_harness, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)  # the sample's source path is relative to the project root
    calls = counting_fetch(monkeypatch)
    archive = ROOT / "tests/data/sample/lfw-sample.tgz"
    with pytest.raises(lfw.ChecksumError, match=sha256_file(archive)):
        run_download({"download.sample.images.sha256": "0" * 64}, tmp_path)
    assert calls == ["tests/data/sample/lfw-sample.tgz"]  # one try, no retries
    assert not (tmp_path / "data" / "raw").exists()


def test_align_stage_mapped_over_chunks_builds_the_same_store(
    prefect_harness, aligned_tiny: Path, tmp_path: Path
) -> None:
    """The flow's align: one task per chunk of 32 images (3 chunks for 80), mapped over the task runner;
    the assembled store equals the one-process stage's, row for row.

    Equal up to the last bit of float32: some CPUs' kernels sum in another order for another batch shape
    (measured on an AMX Xeon: landmarks 1.5e-5 px apart), which flips the rounding of a few warped pixels
    by one grey level. A misplaced row or chunk would differ everywhere."""
    import numpy as np
    import pandas as pd
    from prefect.task_runners import ThreadPoolTaskRunner

    params = load_params(ROOT / "params.yaml", {"align.chunk_size": 32, "align.device": "cpu"})
    layout = Layout(tmp_path)
    layout.raw.mkdir(parents=True)
    (layout.images).symlink_to(aligned_tiny.parent / "images")

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def align_only() -> Path:
        return stages.align_faces(params, layout)

    assert align_only() == layout.aligned
    mapped = pd.read_parquet(layout.aligned / "manifest.parquet")
    single = pd.read_parquet(aligned_tiny / "manifest.parquet")
    assert mapped["path"].tolist() == single["path"].tolist()
    assert (mapped["status"] == single["status"]).all()
    positions = [column for column in single.columns if column.startswith(("lm", "box"))]  # px
    assert np.allclose(mapped[positions], single[positions], rtol=0, atol=1e-3, equal_nan=True)
    grey_levels = np.abs(
        np.load(layout.aligned / "faces.npy").astype(np.int16) - np.load(aligned_tiny / "faces.npy")
    )
    assert grey_levels.max() <= 1 and (grey_levels > 0).mean() < 1e-3
    assert not any(layout.aligned.parent.glob(".aligned.chunks"))  # chunks are cleared once assembled


def test_comparison_grid_refuses_to_override_the_shared_data_stages(
    prefect_harness, tmp_path: Path, monkeypatch
) -> None:
    from flows.compare import compare_grid

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"align\.factor: the grid's runs share the project's downloaded"):
        compare_grid(
            grid={"train.loss": ["softmax"]},
            overrides={"align.factor": 0.7},
            params_file=str(ROOT / "params.yaml"),
        )
    assert list(tmp_path.iterdir()) == [tmp_path / ".pipeline.lock"]  # nothing else was written
