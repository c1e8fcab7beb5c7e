"""Keep the Prefect flow and `dvc repro` in one state: DVC's lock file is the record of what is done.

Before a stage runs, DVC is asked whether it is up to date (same deps, params and outs as in dvc.lock);
if so the flow skips it. After it runs in-process, `dvc commit` records its outputs exactly as `dvc repro`
would. So after either door, `dvc status` is clean and the other door recomputes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class DvcSync:
    """Stage bookkeeping against the DVC project at `root` (a folder holding dvc.yaml and .dvc/)."""

    def __init__(self, root: Path = Path(".")) -> None:
        self.root = Path(root)

    @staticmethod
    def available(root: Path = Path(".")) -> bool:
        """True when `root` is a DVC project with a pipeline."""
        return (Path(root) / ".dvc").is_dir() and (Path(root) / "dvc.yaml").is_file()

    def up_to_date(self, stage: str) -> bool:
        """True when the stage's deps, params and outs match dvc.lock."""
        from dvc.repo import Repo

        with Repo(str(self.root)) as repo:
            return not repo.status(targets=[stage])

    def commit(self, stage: str) -> None:
        """Record the stage's current deps, params and outs in dvc.lock (and outs in the cache)."""
        from dvc.repo import Repo

        # DVC announces each lock-file update on its own logger; the flow logs one line instead.
        logging.getLogger("dvc").setLevel(logging.WARNING)
        with Repo(str(self.root)) as repo:
            repo.commit(stage, force=True)
        logger.info("dvc: committed stage %s", stage)


def run_stages(
    stages: Sequence[tuple[str, Callable[..., Any]]],
    params: Any,
    layout: Any,
    sync: DvcSync | None,
    log: Any = logger,
) -> None:
    """Run each (name, task) on (params, layout), skipping the ones DVC says are up to date and
    committing the ones that ran, so DVC's record stays in step (no `sync`: just run them)."""
    for name, stage_task in stages:
        if sync is not None and sync.up_to_date(name):
            log.info("stage %s: up to date, skipped", name)
            continue
        stage_task(params, layout)
        if sync is not None:
            sync.commit(name)
