"""Which pairs are scored, by which model, with thresholds chosen where: the evaluation protocol as data.

- `view2` (`pairs.txt`): each fold's threshold is chosen on the other folds. With `evaluate.groups` G > 1
  (cross-training, for models trained on LFW itself) the folds are split into G contiguous groups; model g
  trains on every identity outside group g, scores the folds of group g, and each fold's threshold is
  chosen on the other folds of the same group. G = 1: one model that trains on no scored identity at all.
- `view1`: one model scored on `pairsDevTest.txt`. `evaluate.view1_threshold: folds` deals those pairs into
  `evaluate.folds` seeded folds and chooses each fold's threshold on the others (as View 2 does; the
  published View 1 figures are measured so); `dev_train` chooses one threshold on `pairsDevTrain.txt`,
  whose people the model trains on, so its same-person scores run high and the threshold with them.
- `csv`: the user's pairs (`path1,path2,same[,fold]`, paths as in the aligned store); without a fold
  column the pairs are dealt into `evaluate.folds` folds in a seeded random order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from arcface.config import EvaluateParams
from arcface.data.lfw import ProtocolError, protocol_identities, read_pairs

VIEW2_FILE = "pairs.txt"
DEV_TRAIN_FILE = "pairsDevTrain.txt"
DEV_TEST_FILE = "pairsDevTest.txt"


@dataclass(frozen=True)
class ProtocolPlan:
    """The scored pairs (with `fold` and `group` columns) and, for view1, the threshold-choosing pairs."""

    protocol: str
    pairs: pd.DataFrame  # fold, group, path1, path2, name1, name2, same, line
    source: Path  # the file the scored pairs come from
    threshold_pairs: pd.DataFrame | None = None  # view1: pairsDevTrain.txt
    threshold_source: Path | None = None

    @property
    def groups(self) -> int:
        return int(self.pairs["group"].max()) + 1

    def folds_of(self, group: int) -> list[int]:
        return sorted(self.pairs.loc[self.pairs["group"] == group, "fold"].unique().tolist())

    def excluded_identities(self, group: int) -> set[str]:
        """Identities model `group` must not train on: everyone in the pairs it scores (and, for view1,
        everyone in the pairs that choose its threshold is allowed: they are not scored)."""
        return protocol_identities(self.pairs[self.pairs["group"] == group])


def plan(params: EvaluateParams, protocols_dir: Path, seed: int = 0) -> ProtocolPlan:
    """Read the protocol's files and assign every scored pair to a fold and a group."""
    protocols_dir = Path(protocols_dir)
    if params.protocol == "view1":
        if params.groups != 1:
            raise ValueError("evaluate.groups > 1 (cross-training) needs evaluate.protocol: view2")
        source = _existing(protocols_dir / DEV_TEST_FILE)
        pairs = read_pairs(source).assign(group=0)
        if params.view1_threshold == "folds":
            return ProtocolPlan(
                "view1", pairs.assign(fold=deal_folds(len(pairs), params.folds, seed)), source
            )
        threshold_source = _existing(protocols_dir / DEV_TRAIN_FILE)
        return ProtocolPlan("view1", pairs, source, read_pairs(threshold_source), threshold_source)
    if params.protocol == "csv":
        if params.pairs_csv is None:
            raise ValueError(
                "evaluate.protocol: csv needs evaluate.pairs_csv (a CSV path1,path2,same[,fold])"
            )
        if params.groups != 1:
            raise ValueError("evaluate.groups > 1 (cross-training) needs evaluate.protocol: view2")
        source = _existing(Path(params.pairs_csv))
        return ProtocolPlan("csv", read_pairs_csv(source, params.folds, seed).assign(group=0), source)
    source = _existing(protocols_dir / VIEW2_FILE)
    pairs = read_pairs(source)
    folds = sorted(pairs["fold"].unique())
    if params.groups > len(folds) // 2:
        raise ValueError(
            f"evaluate.groups = {params.groups}, but {source} has {len(folds)} folds: each group needs at "
            f"least 2 folds, one to score and one to choose its threshold (at most {len(folds) // 2})"
        )
    group_of_fold = {}
    for group, members in enumerate(np.array_split(np.array(folds), params.groups)):
        group_of_fold.update({int(fold): group for fold in members})
    return ProtocolPlan("view2", pairs.assign(group=pairs["fold"].map(group_of_fold)), source)


def training_exclusions(params: EvaluateParams, protocols_dir: Path, seed: int = 0) -> list[set[str]]:
    """For each model to train (one per group), the identities it must never see."""
    protocol = plan(params, protocols_dir, seed)
    return [protocol.excluded_identities(group) for group in range(protocol.groups)]


def deal_folds(count: int, folds: int, seed: int) -> np.ndarray:
    """Fold numbers for `count` pairs dealt in a seeded random order, so every fold mixes matched and
    mismatched pairs and the folds differ in size by at most one."""
    order = np.random.default_rng(seed).permutation(count)
    fold = np.empty(count, dtype=np.int64)
    fold[order] = np.arange(count) % folds
    return fold


def read_pairs_csv(path: Path, folds: int, seed: int) -> pd.DataFrame:
    """A user's pair list: columns path1, path2, same (0/1 or true/false) and optionally fold."""
    try:
        table = pd.read_csv(path)
    except Exception as err:
        raise ProtocolError(f"{path}: not a readable CSV ({err})") from err
    missing = {"path1", "path2", "same"} - set(table.columns)
    if missing:
        raise ProtocolError(
            f"{path}: missing column(s) {', '.join(sorted(missing))} (need path1, path2, same)"
        )
    same = table["same"].map(
        lambda v: {"1": True, "0": False, "true": True, "false": False}.get(str(v).strip().lower())
    )
    if same.isna().any():
        line = int(np.flatnonzero(same.isna())[0]) + 2
        raise ProtocolError(f"{path}:{line}: `same` must be 1/0 or true/false")
    if "fold" in table.columns:
        fold = table["fold"].astype(int)
    else:
        fold = pd.Series(deal_folds(len(table), folds, seed))
    return pd.DataFrame(
        {
            "fold": fold.to_numpy(),
            "path1": table["path1"].astype(str),
            "path2": table["path2"].astype(str),
            "name1": table["path1"].astype(str).str.split("/").str[0],
            "name2": table["path2"].astype(str).str.split("/").str[0],
            "same": same.astype(bool).to_numpy(),
            "line": np.arange(2, len(table) + 2),
        }
    )


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: protocol file not found; the download source set has no {path.name} "
            "(choose another evaluate.protocol or add the file to download.<dataset>)"
        )
    return path
