"""The search page's API through FastAPI's test client, and the page itself in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_workspace, tiny_params
from fastapi.testclient import TestClient
from PIL import Image

from arcface import bayes, cli, index
from arcface.config import TrainParams, load_params
from arcface.data import store
from arcface.data.datasets import training_split
from arcface.files import read_json, sha256_file
from arcface.index import IndexMismatchError
from arcface.search import QueryFace
from arcface.search_app import SearchService, UploadLimits, create_app, image_type, load_service
from arcface.train import fit

LIMITS = UploadLimits(max_bytes=400_000, max_files=6, max_pixels=4_000_000)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: dict[str, Path]) -> Path:
    """A workspace with every stage up to evaluate run on the tiny dataset (no MLflow run)."""
    folder = make_workspace(tmp_path_factory.mktemp("search-app") / "ws", tiny_params(tiny_dataset))
    before = Path.cwd()
    os.chdir(folder)
    try:
        for stage in ("download", "align", "train", "embed", "index", "evaluate"):
            assert cli.main([stage]) == 0, stage
    finally:
        os.chdir(before)
    return folder


def service_of(workspace: Path, limits: UploadLimits | None = None) -> SearchService:
    """The search service over the workspace's model, index, aligned faces and reports."""
    return service_of_index(workspace, workspace / "data/index", limits)


def service_of_index(workspace: Path, index: Path, limits: UploadLimits | None = None) -> SearchService:
    """The search service over the workspace's model, aligned faces and reports, and `index`."""
    return load_service(
        load_params(workspace / "params.yaml"),
        workspace / "models/group-0/checkpoint.pt",
        index,
        workspace / "data/aligned",
        workspace / "reports",
        limits or UploadLimits(),
    )


@pytest.fixture(scope="module")
def client(workspace: Path) -> TestClient:
    return TestClient(create_app(service_of(workspace, LIMITS)))


def gallery_photo(workspace: Path) -> tuple[Path, str]:
    manifest = pd.read_parquet(workspace / "data/aligned/manifest.parquet")
    return workspace / "data/raw/images" / manifest["path"].iloc[0], manifest["identity"].iloc[0]


def self_score(workspace: Path, photo: Path) -> float:
    """The Joint Bayesian score of a photo's face paired with itself."""
    searcher = service_of(workspace).searcher
    vector = searcher.read_face(photo).vector
    return searcher.pair_score(vector, vector)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_types_are_recognized_by_their_first_bytes() -> None:
    assert image_type(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert image_type(png(np.zeros((4, 4, 3), np.uint8))[:16]) == "PNG"
    assert image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert image_type(b"%PDF-1.7") is None and image_type(b"") is None


def test_info_names_the_model_and_index(client: TestClient, workspace: Path) -> None:
    about = client.get("/info").json()
    metrics = read_json(workspace / "reports/metrics.json")
    assert about["gallery_size"] == 80 and about["identities"] == 20
    assert about["threshold"] == pytest.approx(metrics["threshold"]) and about["index_type"] == "flat"
    assert client.get("/").text.startswith("<!doctype html>")


def test_search_answers_good_photos_and_explains_bad_ones(client: TestClient, workspace: Path) -> None:
    photo, identity = gallery_photo(workspace)
    good = photo.read_bytes()
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    uploads = [
        ("files", ("face.jpg", good, "image/jpeg")),
        ("files", ("blank.png", png(np.full((200, 200, 3), 90, np.uint8)), "image/png")),
        ("files", ("broken.jpg", good[:400], "image/jpeg")),
        ("files", ("notes.txt", b"hello, not a photo", "text/plain")),
        ("files", ("huge.png", png(noise), "image/png")),  # ~1.5 MB, over the 400 kB cap
        ("files", ("wide.png", png(np.zeros((1000, 5000, 3), np.uint8)), "image/png")),  # 5 MP > 4 MP
    ]
    response = client.post("/search", files=uploads, data={"k": "3"})
    assert response.status_code == 200
    face, blank, broken, notes, huge, wide = response.json()["results"]
    assert face["status"] == "ok" and face["identity"] == identity
    # the index holds Joint Bayesian vectors (params.yaml's embed.bayes): the photo's own face scores as
    # the pair (photo, itself), far above the evaluation's threshold
    top = face["matches"][0]
    assert top["identity"] == identity and top["score"] == pytest.approx(
        self_score(workspace, photo), rel=1e-3
    )
    assert top["score"] > read_json(workspace / "reports/metrics.json")["threshold"] + 1
    assert len(face["matches"]) == 3 and face["matches"][0]["face"].startswith("data:image/png;base64,")
    assert face["photo"].startswith("data:image/jpeg;base64,") and len(face["box"]) == 4
    aligned = Image.open(io.BytesIO(base64.b64decode(face["face"].split(",", 1)[1])))
    assert aligned.size == (112, 112)
    assert (blank["status"], blank["reason"]) == ("no_face", "blank.png: no face found")
    assert broken["status"] == "error" and "broken.jpg: unreadable image" in broken["reason"]
    assert notes["status"] == "error" and "not an image this page accepts" in notes["reason"]
    assert huge["status"] == "error" and "file too large" in huge["reason"]
    assert wide["status"] == "error" and "image too large: 5000x1000" in wide["reason"]
    # The server keeps serving after all that.
    again = client.post("/search", files=[("files", ("face.jpg", good, "image/jpeg"))])
    assert again.json()["results"][0]["identity"] == identity


def test_a_photo_with_several_faces_uses_one_and_says_so(client: TestClient, workspace: Path) -> None:
    manifest = pd.read_parquet(workspace / "data/aligned/manifest.parquet")
    people = manifest.drop_duplicates("identity")["path"].iloc[:2]
    photos = [np.asarray(Image.open(workspace / "data/raw/images" / path).convert("RGB")) for path in people]
    side_by_side = png(np.concatenate(photos, axis=1))  # two people, neither in the centre
    answer = client.post("/search", files=[("files", ("two.png", side_by_side, "image/png"))]).json()
    (result,) = answer["results"]
    assert result["status"] == "ok" and result["reason"].endswith("faces, kept the most central")
    assert int(result["reason"].split()[0]) >= 2 and result["box"] is not None


def test_a_threshold_above_every_score_answers_unknown(workspace: Path) -> None:
    strict = service_of(workspace)
    strict.searcher.threshold = self_score(workspace, gallery_photo(workspace)[0]) + 0.01
    photo, identity = gallery_photo(workspace)
    answer = strict.search("face.jpg", photo.read_bytes(), 2)
    assert answer["identity"] == "unknown" and answer["matches"][0]["identity"] == identity


def test_too_many_files_or_a_bad_k_are_refused(client: TestClient, workspace: Path) -> None:
    photo, _ = gallery_photo(workspace)
    files = [("files", (f"{i}.jpg", photo.read_bytes(), "image/jpeg")) for i in range(7)]
    response = client.post("/search", files=files)
    assert response.status_code == 413 and "the limit is 6" in response.json()["detail"]
    response = client.post("/search", files=files[:1], data={"k": "0"})
    assert response.status_code == 422


def test_verify_compares_two_photos(client: TestClient, workspace: Path) -> None:
    photo, _ = gallery_photo(workspace)
    good = photo.read_bytes()
    same = client.post("/verify", files={"first": ("a.jpg", good), "second": ("b.jpg", good)}).json()
    assert same["score"] == pytest.approx(self_score(workspace, photo), rel=1e-3) and same["same"] is True
    assert all(face["face"].startswith("data:image/png") for face in same["faces"])
    blank = png(np.full((200, 200, 3), 90, np.uint8))
    half = client.post("/verify", files={"first": ("a.jpg", good), "second": ("blank.png", blank)}).json()
    assert half["score"] is None and half["faces"][1]["reason"] == "blank.png: no face found"


def test_search_with_and_without_the_texture_view_and_the_bayes_model(
    workspace: Path, tmp_path: Path
) -> None:
    """params.yaml fuses the texture view and scores by a Joint Bayesian model (embed.texture, embed.bayes):
    the index holds the fused vectors' Bayes vectors and queries are embedded the same way; without both,
    the network's vectors alone are indexed and searched by cosine."""
    plain = tmp_path / "ws"
    shutil.copytree(workspace, plain, symlinks=True)
    overrides = ["embed.texture=false", "embed.bayes=false"]
    before = Path.cwd()
    os.chdir(plain)
    try:
        for stage in ("embed", "index", "evaluate"):
            assert cli.main([stage, *(f"--set={o}" for o in overrides)]) == 0, stage
    finally:
        os.chdir(before)
    bayes_info, plain_info = (read_json(ws / "data/index/index.json") for ws in (workspace, plain))
    assert (bayes_info["embedding"], bayes_info["bayes_input"], bayes_info["metric"]) == (
        "bayes",
        "fused",
        "joint_bayesian",
    )
    assert (plain_info["embedding"], plain_info["metric"]) == ("flip", "inner_product")
    bayes_model = bayes.BayesModel.load(workspace / "data/index/bayes.npz")
    people = len(read_json(workspace / "models/group-0/split.json")["identities"])
    assert bayes_model.mean.shape[0] == plain_info["dimension"] + people - 1  # fused: + LDA directions
    assert bayes_info["dimension"] == bayes_model.cross.shape[1] + 1
    # the index ranks as the evaluation scores: the best match is the best Joint Bayesian score
    service = service_of(workspace)
    photo, identity = gallery_photo(workspace)
    query = service.searcher.read_face(photo).vector
    gallery = np.load(workspace / "data/embeddings/group-0/bayes.npy")
    scores = bayes.scores_against(query[None], gallery)[0]
    (top,) = service.searcher.matches(QueryFace("ok", vector=query), 1)
    assert top.score == pytest.approx(scores.max(), rel=1e-4)
    labels = pd.read_parquet(workspace / "data/index/labels.parquet")
    assert top.identity == labels["identity"].iloc[int(scores.argmax())] == identity
    service = load_service(
        load_params(plain / "params.yaml", overrides),
        plain / "models/group-0/checkpoint.pt",
        plain / "data/index",
        plain / "data/aligned",
        plain / "reports",
    )
    photo, identity = gallery_photo(plain)
    answer = service.search("face.jpg", photo.read_bytes(), 2)
    assert answer["identity"] == identity
    assert answer["matches"][0]["score"] == pytest.approx(1, abs=1e-3)
    assert service.searcher.texture is None and service.searcher.bayes is None
    assert service.searcher.threshold == read_json(plain / "reports/metrics.json")["threshold"]


def test_an_identity_gallery_of_bayes_vectors_maps_each_persons_mean(workspace: Path, tmp_path: Path) -> None:
    """index.gallery=identity with Joint Bayesian vectors: the fused vectors are averaged per person,
    re-normalized, then mapped by the model (not the Bayes vectors averaged)."""
    params = load_params(workspace / "params.yaml", ["index.gallery=identity"])
    built = index.run(
        params.index, workspace / "data/embeddings", workspace / "data/aligned", tmp_path / "ix"
    )
    fused = np.load(workspace / "data/embeddings/group-0/fused.npy")
    rows = np.load(workspace / "data/embeddings/group-0/rows.npy")
    manifest = pd.read_parquet(workspace / "data/aligned/manifest.parquet")
    labels = pd.DataFrame({"row": rows, "identity": manifest["identity"].to_numpy()[rows], "path": "x"})
    means, table = index.identity_gallery(fused, labels)
    model = bayes.BayesModel.load(tmp_path / "ix" / "bayes.npz")
    stored = built.index.reconstruct_n(0, built.index.ntotal)
    assert built.labels["identity"].tolist() == table["identity"].tolist()
    assert np.allclose(stored, model.vectors(means), atol=1e-5)
    assert built.info["count"] == manifest["identity"].nunique()


@pytest.mark.parametrize(
    ("missing", "holds"), [("texture.npz", "fused"), ("bayes.npz", "Joint Bayesian vectors")]
)
def test_an_index_without_its_query_models_is_refused(
    workspace: Path, tmp_path: Path, missing: str, holds: str
) -> None:
    copied = tmp_path / "index"
    shutil.copytree(workspace / "data/index", copied)
    (copied / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"index/{missing}: not found, but .* holds {holds}"):
        service_of_index(workspace, copied)
    assert (copied / "faces.faiss").exists() and (workspace / "data/index" / missing).exists()


def test_a_bayes_model_of_other_vectors_is_refused(workspace: Path, tmp_path: Path) -> None:
    copied = tmp_path / "index"
    shutil.copytree(workspace / "data/index", copied)
    original = bayes.BayesModel.load(copied / "bayes.npz")
    size = original.mean.shape[0]
    other = bayes.from_covariances(np.eye(size - 1), np.eye(size - 1))  # fits vectors one shorter
    other.save(copied / "bayes.npz")
    with pytest.raises(IndexMismatchError, match=rf"bayes.npz maps {size - 1}-d vectors but .* into {size}"):
        service_of_index(workspace, copied)
    assert bayes.BayesModel.load(workspace / "data/index/bayes.npz").mean.shape[0] == size


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_page_in_a_real_browser_shows_the_right_name_first(workspace: Path, tmp_path: Path) -> None:
    """Upload a photo through the page in headless Chromium; the right name comes first, with its gallery
    face. The screenshot goes to $SEARCH_PAGE_SCREENSHOT when set (the README's picture)."""
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    params = load_params(workspace / "params.yaml")
    service = load_service(
        params,
        workspace / "models/group-0/checkpoint.pt",
        workspace / "data/index",
        workspace / "data/aligned",
        workspace / "reports",
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        photo, identity = gallery_photo(workspace)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "index of 80 faces of 20 identities" in b.find_element(By.ID, "about").text)
        browser.find_element(By.ID, "photos").send_keys(str(photo))
        browser.find_element(By.ID, "search-button").click()
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".result")))
        first = browser.find_element(By.CSS_SELECTOR, ".result .match.best")
        assert first.find_element(By.CLASS_NAME, "identity").text == f"1. {identity}"
        thumbnail = first.find_element(By.TAG_NAME, "img")
        assert thumbnail.get_attribute("src").startswith("data:image/png") and thumbnail.size["width"] == 112
        assert browser.find_element(By.CSS_SELECTOR, ".verdict").text in (f"match: {identity}", "unknown")
        if os.environ.get("SEARCH_PAGE_SCREENSHOT"):
            browser.save_screenshot(os.environ["SEARCH_PAGE_SCREENSHOT"])
        # A bad upload gets a message on the page, and the page keeps working.
        notes = tmp_path / "notes.txt"
        notes.write_text("not a photo")
        browser.find_element(By.ID, "photos").send_keys(str(notes))
        browser.find_element(By.ID, "search-button").click()
        wait.until(lambda b: "not an image this page accepts" in b.find_element(By.ID, "results").text)
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(timeout=10)


def test_a_companion_trunk_embeds_queries_like_the_index_and_a_mismatch_is_refused(
    workspace: Path, tmp_path: Path
) -> None:
    """A model with a second trunk (train.companion): the index holds the ensemble's fused Bayes vectors,
    and a query photo is embedded by both trunks the same way; models and an index that disagree about the
    companion are refused, naming both."""
    ensemble = tmp_path / "ws"
    shutil.copytree(workspace, ensemble, symlinks=True)
    manifest = store.read_manifest(ensemble / "data/aligned")
    people = set(read_json(ensemble / "models/group-0/split.json")["identities"])
    split = training_split(manifest, set(manifest["identity"]) - people, 2)
    faces = np.asarray(store.open_faces(ensemble / "data/aligned")[split.rows])
    second = TrainParams(
        backbone="resnet18-fast-half", epochs=1, batch_size=16, embedding_size=32, device="cpu"
    )
    companion = ensemble / "models/group-0/companion/checkpoint.pt"
    fit(second, faces, split.labels, split.num_classes, 1, checkpoint=companion)
    before = Path.cwd()
    os.chdir(ensemble)
    try:
        for stage in ("embed", "index", "evaluate"):
            assert cli.main([stage]) == 0, stage
    finally:
        os.chdir(before)
    info = read_json(ensemble / "data/index/index.json")
    assert info["companion_sha256s"] == [sha256_file(companion)] and info["embedding"] == "bayes"
    service = service_of(ensemble)
    photo, identity = gallery_photo(ensemble)
    query = service.searcher.read_face(photo).vector
    gallery = np.load(ensemble / "data/embeddings/group-0/bayes.npy")
    position = int(np.flatnonzero(np.load(ensemble / "data/embeddings/group-0/rows.npy") == 0)[0])
    assert query.shape == gallery[position].shape  # first trunk + companion + texture, mapped by the model
    scores = bayes.scores_against(query[None], gallery)[0]
    assert int(scores.argmax()) == position  # the photo finds its own face first
    (top,) = service.searcher.matches(QueryFace("ok", vector=query), 1)
    assert top.identity == identity and top.score == pytest.approx(scores.max(), rel=1e-4)
    with pytest.raises(
        IndexMismatchError, match=r"built with a companion trunk of sha256 .* but .* has none"
    ):
        service_of_index(workspace, ensemble / "data/index")
    with pytest.raises(
        IndexMismatchError, match=r"built without companion trunks, but .*group-0 has a companion trunk of"
    ):
        service_of_index(ensemble, workspace / "data/index")
    assert companion.exists() and (workspace / "data/index/faces.faiss").exists()


def test_an_index_names_its_companion_trunks_also_as_written_before_there_could_be_several() -> None:
    from arcface.verifier import recorded_companions

    assert recorded_companions({"companion_sha256s": ["a", "b"]}) == ["a", "b"]
    assert recorded_companions({"companion_sha256": "a"}) == ["a"]  # one companion, an older index.json
    assert recorded_companions({"companion_sha256": None}) == recorded_companions({}) == []
