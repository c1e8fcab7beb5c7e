"""Where each stage's files live inside a workspace (the same paths dvc.yaml names)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# LFW protocol files by their params key (download.<dataset>.<key>) -> file name on disk.
PROTOCOL_FILES = {
    "pairs": "pairs.txt",
    "pairs_dev_train": "pairsDevTrain.txt",
    "pairs_dev_test": "pairsDevTest.txt",
}


@dataclass(frozen=True)
class Layout:
    """Default stage inputs and outputs under `root`; every CLI path option defaults to these."""

    root: Path = Path(".")

    @property
    def raw(self) -> Path:
        """download: `images/<Person>/<Person>_NNNN.jpg` and `protocols/*.txt`."""
        return self.root / "data" / "raw"

    @property
    def images(self) -> Path:
        return self.raw / "images"

    @property
    def protocols(self) -> Path:
        return self.raw / "protocols"

    @property
    def aligned(self) -> Path:
        """align: `faces.npy`, `manifest.parquet`, `contact_sheet.png`."""
        return self.root / "data" / "aligned"

    @property
    def model(self) -> Path:
        """train: `group-<g>/` (checkpoint.pt, history.csv, split.json, angles.npy) per model, groups.json;
        with train.companion also `group-<g>/companion/`, `companion-2/`... (checkpoint.pt, history.csv):
        the further trunks."""
        return self.root / "models"

    @property
    def embeddings(self) -> Path:
        """embed: `group-<g>/` with `flip.npy`, `plain.npy` (N×D float32), `rows.npy`, `embed.json`; with
        embed.texture also `texture.npy`, `fused.npy` and the fitted `texture.npz`; with embed.bayes
        `bayes.npy` and `bayes.npz`; with companion trunks `companion.npy`, `companion-2.npy`... and
        `ensemble.npy`."""
        return self.root / "data" / "embeddings"

    @property
    def index(self) -> Path:
        """index: `faces.faiss`, `labels.parquet`, `index.json`."""
        return self.root / "data" / "index"

    @property
    def reports(self) -> Path:
        """evaluate: `metrics.json`, `roc.csv`, `folds.csv`, `scores.csv`, PNG plots; track: its run id."""
        return self.root / "reports"
