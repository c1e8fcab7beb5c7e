"""Keep the Prefect flow and `dvc repro` in one state: DVC's lock file is the record of what is done.

Before a stage runs, DVC is asked whether it is up to date (same deps, params and outs as in dvc.lock);
if so the flow skips it. After it runs in-process, `dvc commit` records its outputs exactly as `dvc repro`
would. So after either door, `dvc status` is clean and the other door recomputes nothing.

A run whose params differ from params.yaml (overrides, or another params file) is an experiment: DVC's
record describes params.yaml, so nothing is committed, and a stage is reused only when DVC has it up to
date and none of the params it declares in dvc.yaml differs (`--set train.lr=0.02` retrains on the
aligned faces already there instead of aligning them again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from arcface.config import Params, ParamsError, flatten, load_params

logger = logging.getLogger(__name__)


class DvcSync:
    """Stage bookkeeping against the DVC project at `root` (a folder holding dvc.yaml and .dvc/), which
    must be the current folder when DVC is asked (DVC finds stage names in the current folder's dvc.yaml).

    `changed` holds the dotted params keys whose values differ from the project's params.yaml; with any,
    the run only reads DVC's record (`records` is False)."""

    def __init__(self, root: Path = Path("."), changed: Collection[str] = ()) -> None:
        self.root = Path(root)
        self.changed = frozenset(changed)

    @staticmethod
    def available(root: Path = Path(".")) -> bool:
        """True when `root` is a DVC project with a pipeline."""
        return (Path(root) / ".dvc").is_dir() and (Path(root) / "dvc.yaml").is_file()

    @classmethod
    def for_params(cls, params: Params, root: Path = Path("."), log: Any = logger) -> DvcSync | None:
        """The bookkeeping for a run on `params`: None without a DVC project (or without a params.yaml
        that loads, since DVC's record describes that file), else one that knows what differs from it."""
        root = Path(root)
        if not cls.available(root):
            log.info("DVC bookkeeping off (no DVC project)")
            return None
        try:
            project = load_params(root / "params.yaml")
        except ParamsError as err:
            log.warning("DVC bookkeeping off: %s", str(err).splitlines()[0])
            return None
        sync = cls(root, changed_keys(flatten(params), flatten(project)))
        if not sync.records:
            shown = sorted(sync.changed)
            more = f" and {len(shown) - 6} more" if len(shown) > 6 else ""
            log.info(
                "params differ from params.yaml in %s%s: an experiment, so dvc.lock is left as it is; "
                "stages those params don't touch are reused where DVC has them up to date",
                ", ".join(shown[:6]),
                more,
            )
        return sync

    @property
    def records(self) -> bool:
        """True when the run's params are params.yaml's, so the stages it runs are committed to dvc.lock."""
        return not self.changed

    @cached_property
    def _stages(self) -> dict[str, Any]:
        """dvc.yaml's stages, read once per run."""
        return (yaml.safe_load((self.root / "dvc.yaml").read_text()) or {}).get("stages", {})

    def declared_params(self, stage: str) -> list[str] | None:
        """The params entries `stage` lists in dvc.yaml (None when one names another params file)."""
        entries = (self._stages.get(stage) or {}).get("params", [])
        return None if any(not isinstance(entry, str) for entry in entries) else list(entries)

    def reusable(self, stage: str) -> bool:
        """True when the stage's outputs on disk are what this run would make: DVC has it up to date and
        none of the params it declares differs from params.yaml."""
        if not self.records:
            declared = self.declared_params(stage)
            if declared is None or any(_covers(entry, key) for entry in declared for key in self.changed):
                return False
        return self.up_to_date(stage)

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


def changed_keys(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> set[str]:
    """The dotted keys whose values differ between two flattened params (or that only one has)."""
    missing = object()
    return {key for key in ours.keys() | theirs.keys() if ours.get(key, missing) != theirs.get(key, missing)}


def _covers(entry: str, key: str) -> bool:
    """True when a dvc.yaml params entry (`train`, `evaluate.protocol`) and a dotted key overlap."""
    return key == entry or key.startswith(entry + ".") or entry.startswith(key + ".")


def run_stages(
    stages: Sequence[tuple[str, Callable[..., Any]]],
    params: Any,
    layout: Any,
    sync: DvcSync | None,
    log: Any = logger,
) -> None:
    """Run each (name, task) on (params, layout), skipping the ones whose outputs are already this run's
    (DvcSync.reusable) and committing the ones that ran when the params are params.yaml's, so DVC's
    record stays in step (no `sync`: just run them)."""
    for name, stage_task in stages:
        if sync is not None and sync.reusable(name):
            log.info("stage %s: up to date, skipped", name)
            continue
        stage_task(params, layout)
        if sync is not None and sync.records:
            sync.commit(name)
