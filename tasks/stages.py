"""One Prefect task per pipeline stage; each calls the same `run` function the CLI calls.

Tasks pass paths, never tensors or arrays. Only `download` retries: it is the only network I/O.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task, unmapped

from arcface import embed, evaluate, index, tracking, train
from arcface.config import Params
from arcface.data import align, lfw
from arcface.layout import Layout
from arcface.protocol import training_exclusions


def _network_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry when a source was unreachable, not when its checksum or contents are wrong."""
    try:
        state.result()
    except lfw.ChecksumError:
        return False
    except lfw.DownloadError:
        return True
    except Exception:
        return False
    return False


@task(name="download", retries=2, retry_delay_seconds=10, retry_condition_fn=_network_failure)
def download(params: Params, layout: Layout) -> Path:
    lfw.run(params.download, layout.raw)
    return layout.raw


@task(name="align-plan")
def plan_alignment(params: Params, layout: Layout) -> tuple[list[int], int]:
    """The chunks still to align (finished ones of an interrupted run are kept), and how many in all."""
    job = align.AlignJob.plan(params.align, layout.images, layout.aligned)
    return job.pending(), job.chunk_count


@task(name="align-chunk")
def align_chunk(params: Params, layout: Layout, index: int) -> int:
    return align.AlignJob.plan(params.align, layout.images, layout.aligned).align_chunk(index)


@task(name="align-finish")
def finish_alignment(params: Params, layout: Layout, aligned: int, seconds: float, resumed: int) -> Path:
    job = align.AlignJob.plan(params.align, layout.images, layout.aligned)
    job.finish(aligned, seconds, resumed)
    return layout.aligned


def align_faces(params: Params, layout: Layout) -> Path:
    """The align stage as tasks: one per chunk of images, mapped over the flow's task runner (threads
    here; Dask or Ray workers with their task runners), then one that assembles the store."""
    pending, job_size = plan_alignment(params, layout)
    started = time.perf_counter()
    futures = align_chunk.map(unmapped(params), unmapped(layout), pending)
    aligned = sum(future.result() for future in futures)
    return finish_alignment(params, layout, aligned, time.perf_counter() - started, job_size - len(pending))


@task(name="train")
def train_model(params: Params, layout: Layout) -> Path:
    excluded = training_exclusions(params.evaluate, layout.protocols, params.seed)
    train.run(params, layout.aligned, excluded, layout.model)
    return layout.model


@task(name="embed")
def embed_faces(params: Params, layout: Layout) -> Path:
    embed.run(params.embed, layout.aligned, layout.model, layout.embeddings)
    return layout.embeddings


@task(name="index")
def build_index(params: Params, layout: Layout) -> Path:
    index.run(params.index, layout.embeddings, layout.aligned, layout.index)
    return layout.index


@task(name="evaluate")
def evaluate_model(params: Params, layout: Layout) -> Path:
    evaluate.run(
        params.evaluate,
        layout.protocols,
        layout.aligned,
        layout.embeddings,
        layout.reports,
        layout.model,
        params.seed,
    )
    return layout.reports / evaluate.METRICS_FILE


@task(name="track")
def track_run(params: Params, layout: Layout, tags: dict[str, Any], run_name: str | None = None) -> Path:
    out = layout.reports / tracking.RUN_FILE
    inputs = tracking.run_inputs(layout.model, layout.reports, layout.aligned, layout.embeddings)
    tracking.log_pipeline_run(params, inputs, out, {k: str(v) for k, v in tags.items()}, run_name)
    return out
