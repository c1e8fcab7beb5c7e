"""The search page: drop photos, see who they are; or compare two photos. A FastAPI app over the index
the pipeline built, with the JSON API the page itself uses (`POST /search`, `POST /verify`, `GET /info`).

Every answer shows its evidence: the photo with the detected box, the aligned 112×112 face, the top
identities with the gallery face that matched best and its cosine, and the verdict at the evaluation's
threshold. Uploads are capped in size and pixels, and only image files are decoded; a bad upload gets a
message and the other photos of the same request are still answered.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import HTMLResponse
from PIL import Image, ImageDraw

from arcface.config import Params
from arcface.data import store
from arcface.evaluate import model_figures
from arcface.files import read_json
from arcface.search import FaceSearcher, QueryFace, SearchResult, threshold_from_metrics
from arcface.tracking import dvc_data_tags, git_commit

# Magic numbers of the image types the page accepts; anything else is refused before decoding.
IMAGE_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}
PAGE = Path(__file__).with_name("search_page.html")
SCORE_NAMES = {"inner_product": "cosine", "joint_bayesian": "Joint Bayesian score"}  # index.json's metric


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 10 * 1024 * 1024  # per photo
    max_files: int = 20  # per request
    max_pixels: int = 25_000_000  # per photo, checked from the header before decoding


def image_type(head: bytes) -> str | None:
    """The image type named by the file's first bytes, or None when it is not one the page accepts."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in IMAGE_SIGNATURES.items() if head.startswith(magic)), None)


def data_url(image: np.ndarray, kind: str = "PNG") -> str:
    """(H, W, 3) uint8 -> a data: URL the page can show directly."""
    picture = Image.fromarray(image)
    buffer = io.BytesIO()
    picture.save(buffer, format=kind, quality=85) if kind == "JPEG" else picture.save(buffer, format=kind)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def photo_with_box(
    image: np.ndarray, box: tuple[float, float, float, float] | None, longest: int = 480
) -> str:
    """The photo, scaled down, with the chosen face's box drawn on it."""
    picture = Image.fromarray(image)
    scale = min(1.0, longest / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
    if box is not None:
        width = max(2, round(max(picture.size) / 150))
        ImageDraw.Draw(picture).rectangle([v * scale for v in box], outline=(0, 220, 90), width=width)
    return data_url(np.asarray(picture), "JPEG")


class SearchService:
    """What the app needs: the searcher, the gallery's aligned faces (thumbnails) and what it serves."""

    def __init__(
        self,
        searcher: FaceSearcher,
        gallery_faces: np.ndarray,
        about: dict[str, Any],
        limits: UploadLimits = UploadLimits(),
    ) -> None:
        self.searcher, self.gallery_faces, self.about, self.limits = searcher, gallery_faces, about, limits

    def read_upload(self, name: str, data: bytes) -> QueryFace:
        """Check an upload against the limits, then decode, align and embed it."""
        if len(data) > self.limits.max_bytes:
            return QueryFace("error", f"{name}: file too large ({len(data):,} bytes; the limit is "
                             f"{self.limits.max_bytes:,})")  # fmt: skip
        if image_type(data[:16]) is None:
            return QueryFace("error", f"{name}: not an image this page accepts (JPEG, PNG, WebP, BMP, GIF)")
        query = self.searcher.read_face(io.BytesIO(data), self.limits.max_pixels)
        if query.status == "error":
            return QueryFace("error", f"{name}: {query.reason}")
        if query.status == "no_face":
            return QueryFace("no_face", f"{name}: no face found", image=query.image)
        return query

    def describe_face(self, query: QueryFace) -> dict[str, Any]:
        """The evidence of one upload: its photo with the box, the aligned face, notes."""
        return {
            "status": query.status,
            "reason": query.reason,
            "photo": photo_with_box(query.image, query.box) if query.image is not None else None,
            "face": data_url(query.face) if query.face is not None else None,
            "box": [round(v, 1) for v in query.box] if query.box is not None else None,
        }

    def search(self, name: str, data: bytes, k: int) -> dict[str, Any]:
        query = self.read_upload(name, data)
        answer = {"name": name, **self.describe_face(query), "identity": None, "matches": []}
        if query.status != "ok":
            return answer
        matches = self.searcher.matches(query, k)
        answer["identity"] = SearchResult(
            Path(name), "ok", matches=matches, threshold=self.searcher.threshold
        ).identity
        answer["matches"] = [
            {
                "identity": match.identity,
                "score": round(match.score, 4),
                "path": match.path,
                "face": data_url(self.gallery_face(match.path)),
            }
            for match in matches
        ]
        return answer

    def gallery_face(self, path: str) -> np.ndarray:
        labels = self.searcher.index.labels
        row = int(labels.loc[labels["path"] == path, "row"].iloc[0])
        return np.asarray(self.gallery_faces[row])

    def verify(self, first: tuple[str, bytes], second: tuple[str, bytes]) -> dict[str, Any]:
        queries = [self.read_upload(name, data) for name, data in (first, second)]
        faces = [
            {"name": name, **self.describe_face(q)}
            for (name, _), q in zip((first, second), queries, strict=True)
        ]
        answer: dict[str, Any] = {
            "faces": faces,
            "score": None,
            "same": None,
            "threshold": self.searcher.threshold,
        }
        if all(q.status == "ok" for q in queries):
            score = self.searcher.pair_score(queries[0].vector, queries[1].vector)
            answer["score"] = round(score, 4)
            if self.searcher.threshold is not None:
                answer["same"] = score >= self.searcher.threshold
        return answer


def create_app(service: SearchService) -> FastAPI:
    """The page and its JSON API over one `SearchService`."""
    app = FastAPI(title="Face search", description=__doc__)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/info")
    def info() -> dict[str, Any]:
        return service.about

    @app.post("/search")
    async def search(
        files: Annotated[list[UploadFile], File()], k: Annotated[int, Form()] = 5
    ) -> dict[str, Any]:
        if len(files) > service.limits.max_files:
            raise HTTPException(
                413, f"{len(files)} photos in one request; the limit is {service.limits.max_files}"
            )
        if not 1 <= k <= 50:
            raise HTTPException(422, "k must be between 1 and 50")
        results = []
        for upload in files:
            data = await upload.read(service.limits.max_bytes + 1)  # never read more than the cap allows
            results.append(service.search(upload.filename or "photo", data, k))
        return {"threshold": service.searcher.threshold, "results": results}

    @app.post("/verify")
    async def verify(
        first: Annotated[UploadFile, File()], second: Annotated[UploadFile, File()]
    ) -> dict[str, Any]:
        limit = service.limits.max_bytes + 1
        pair = [
            (f.filename or name, await f.read(limit)) for f, name in ((first, "first"), (second, "second"))
        ]
        return service.verify(pair[0], pair[1])

    return app


def load_service(
    params: Params,
    checkpoint: Path,
    index_dir: Path,
    aligned_dir: Path,
    reports_dir: Path,
    limits: UploadLimits = UploadLimits(),
) -> SearchService:
    """A service over the pipeline's outputs: the model, its index, the aligned gallery faces, and the
    evaluation's threshold."""
    threshold = threshold_from_metrics(Path(reports_dir) / "metrics.json", Path(checkpoint).parent.name)
    searcher = FaceSearcher(checkpoint, index_dir, params.align, params.embed, threshold)
    faces = store.open_faces(aligned_dir)  # memory-mapped: thumbnails are read on demand
    return SearchService(
        searcher, faces, workspace_about(searcher.index.info, checkpoint, reports_dir), limits
    )


def workspace_about(index_info: dict[str, Any], checkpoint: Path, reports: Path) -> dict[str, Any]:
    """What the page says it serves: model, MLflow run, code and data revisions, index build."""
    run_file = reports / "mlflow_run.json"
    metrics_file = reports / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.exists() else {}
    # With cross-training the page serves one of the models: its own folds' figures, not the pooled ones.
    metrics |= model_figures(metrics, Path(checkpoint).parent.name) or {}
    return {
        "checkpoint": str(checkpoint),
        "backbone": index_info.get("backbone"),
        "companion_backbones": index_info.get("companion_backbones", []),  # further trunks (train.companion)
        "mlflow_run_id": read_json(run_file)["run_id"] if run_file.exists() else None,
        "git_commit": git_commit(),
        "dvc_aligned_md5": _aligned_md5(),
        "index_type": index_info.get("type"),
        "gallery": index_info.get("gallery"),
        "gallery_size": index_info.get("count"),
        "identities": index_info.get("identities"),
        "index_built_at": index_info.get("built_at"),
        "score_name": SCORE_NAMES.get(index_info.get("metric", "inner_product"), "score"),
        "threshold": metrics.get("threshold"),
        "accuracy": metrics.get("accuracy_mean"),
        "protocol": metrics.get("protocol"),
    }


def _aligned_md5() -> str | None:
    return dvc_data_tags().get("dvc.aligned_md5")
