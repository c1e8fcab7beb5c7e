"""Typed, frozen parameters read once from params.yaml.

Every tunable value of the pipeline lives in params.yaml; this module turns it into validated objects.
An unknown key, a wrong type or an out-of-range value raises `ParamsError` naming the key and what is
allowed. Overrides (`train.epochs=2`) are applied to the raw mapping before validation, so they are
checked exactly like the file.

Recipes: `recipes.<name>` holds train settings measured to work together at LFW scale (README, "Model
quality"). `train.recipe` picks one; its values replace the train section's, and overrides still win
over both. `auto` picks `gpu` when CUDA is there (and train.device isn't cpu); on a CPU, `cpu` where it
has fast bf16 (AMX or AVX512-BF16) and `cpu-fp32` where it trains in float32 (when params.yaml has that
recipe; else `cpu`), for real data sets. The bundled sample keeps the train section as written (`none`),
except on a CPU that trains in float32, where `sample-fp32` (when params.yaml has it) keeps the demo short.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_PARAMS_PATH = Path("params.yaml")

Device = Literal["auto", "cpu", "cuda"]


def _off_from_yaml(value: Any) -> Any:
    """YAML 1.1 reads a bare `off` (in params.yaml or `--set train.amp=off`) as false: that means 'off'."""
    return "off" if value is False else value


AlignAmp = Annotated[Literal["auto", "bf16", "off"], BeforeValidator(_off_from_yaml)]
TrainAmp = Annotated[Literal["auto", "bf16", "fp16", "off"], BeforeValidator(_off_from_yaml)]

FACE_SIZE = 112  # aligned faces are FACE_SIZE x FACE_SIZE (arcface.models.backbones.INPUT_SIZE)
MIN_CROP = 16  # pixels: the smallest train.crop side

# Kept in step with arcface.models.backbones.BACKBONES (a test checks they agree); listing the names
# here keeps loading params free of a torch import.
BackboneName = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet18-fast",
    "resnet18-fast-half",
    "resnet34-fast",
    "resnet34-half",
    "resnet50-fast",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
]


class ParamsError(ValueError):
    """Invalid parameters: the message names the file, each offending key and what it accepts."""


class _Section(BaseModel):
    # strict: YAML already gives typed values, so "2" for an int is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Source(_Section):
    """One file to fetch: an https/http/file URL or a local path, with its expected sha256."""

    url: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DatasetSources(_Section):
    """The images archive and the LFW protocol files that describe one dataset."""

    images: Source
    pairs: Source | None = None  # View 2: 10 folds, the reporting set
    pairs_dev_train: Source | None = None  # View 1, development
    pairs_dev_test: Source | None = None


class DownloadParams(_Section):
    dataset: Literal["sample", "lfw"] = "sample"
    sample: DatasetSources
    lfw: DatasetSources
    timeout_s: float = Field(60.0, gt=0)
    attempts: int = Field(3, ge=1, le=20)

    @property
    def sources(self) -> DatasetSources:
        """The source set chosen by `dataset`."""
        return self.sample if self.dataset == "sample" else self.lfw


class AlignParams(_Section):
    batch_size: int = Field(64, ge=1, le=4096)
    min_face_size: int = Field(20, ge=8, le=1000)
    min_face_fraction: float = Field(0.3, ge=0, le=1)
    thresholds: tuple[float, float, float] = Field((0.6, 0.7, 0.7), strict=False)
    factor: float = Field(0.6, gt=0.1, lt=1.0)
    choose: Literal["central", "largest", "confident"] = "central"
    no_face: Literal["fallback", "drop"] = "fallback"
    strict: bool = False
    min_image_side: int = Field(32, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    chunk_size: int = Field(1024, ge=1)
    amp: AlignAmp = "auto"
    device: Device = "auto"


RecipeKey = Literal["cpu", "cpu-fp32", "gpu", "sample-fp32"]  # the recipes params.yaml may hold
RecipeName = Literal["none", "auto", RecipeKey]
RECIPES: tuple[str, ...] = get_args(RecipeKey)
SAMPLE_DATASET = "sample"


class TrainParams(_Section):
    recipe: RecipeName = "none"  # after loading: the recipe that was applied (never auto)
    backbone: BackboneName = "resnet34"
    embedding_size: int = Field(512, ge=2, le=4096)
    loss: Literal["softmax", "arcface", "cosface", "combined"] = "arcface"
    scale: float = Field(64.0, gt=0, le=256)
    margin: float = Field(0.5, ge=0, lt=1.5)  # arcface: m2 (radians); cosface: m3
    combined_margins: tuple[float, float, float] = Field((1.0, 0.3, 0.2), strict=False)  # m1, m2, m3
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # share of the target spread over all classes
    epochs: int = Field(10, ge=1, le=1000)
    time_budget_minutes: float = Field(0.0, ge=0)  # fewer epochs when these can't fit (0: no budget)
    batch_size: int = Field(64, ge=2, le=65536)  # images per optimizer step, all processes together
    accumulate: int = Field(1, ge=1, le=1024)  # micro-batches per step in each process
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd momentum; adamw's beta1
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["cosine", "poly"] = "cosine"
    poly_power: float = Field(2.0, gt=0, le=10)
    warmup_epochs: float = Field(1.0, ge=0)
    margin_warmup_epochs: float = Field(0.0, ge=0)  # ramp the margin in from none over this many epochs
    clip_grad_norm: float = Field(0.0, ge=0)  # 0: off
    ema_decay: float = Field(0.0, ge=0, lt=1)  # per-step decay of the weight average that embeds (0: off)
    sam_rho: float = Field(0.0, ge=0, le=10)  # sharpness-aware minimization's neighbourhood radius (0: off)
    dropout: float = Field(0.0, ge=0, lt=1)
    # the trunk sees only this box of the 112x112 aligned face (top, bottom, left, right pixels), resized
    # to 112x112; None: the whole face
    crop: tuple[int, int, int, int] | None = Field(None, strict=False)
    flip: bool = True  # random horizontal flips
    shift: int = Field(0, ge=0, le=32)  # random translations of up to this many pixels
    zoom: float = Field(0.0, ge=0, lt=1)  # random zoom factors in [1 - zoom, 1 + zoom]
    rotate: float = Field(0.0, ge=0, le=180)  # random rotations of up to this many degrees
    color: float = Field(0.0, ge=0, lt=1)  # brightness/contrast/saturation factors in [1 - color, 1 + color]
    grayscale: float = Field(0.0, ge=0, le=1)  # probability of a grey copy
    blur: float = Field(0.0, ge=0, le=1)  # probability of a Gaussian blur (sigma 0.5-2 px)
    erase: float = Field(0.0, ge=0, le=1)  # probability of a grey rectangle over 2-25% of the face
    sunglasses: float = Field(0.0, ge=0, le=1)  # probability of dark glasses painted over the aligned eyes
    min_images_per_identity: int = Field(2, ge=1, le=1000)
    identity_cap: int = Field(0, ge=0)  # per epoch at most this many faces of one identity (0: all)
    class_balance: float = Field(0.0, ge=0, le=1)  # draw a face at weight n^-this, n its identity's faces
    blend_identities: int = Field(0, ge=0)  # extra classes, each the average of two training people's faces
    blend_faces: int = Field(6, ge=1, le=1000)  # faces per blended identity, at most
    amp: TrainAmp = "auto"
    compile: bool = False
    init_checkpoint: str | None = None  # backbone weights to start from (ours or a plain state_dict)
    resume: bool = True  # continue an interrupted run of the same data and params
    device: Device = "auto"
    # More trunks per group, trained after the first, each with its train values over this section's: a
    # mapping for one, a list of mappings for several. Embed joins the trunks' vectors (an ensemble). Each
    # one's time_budget_minutes counts it and every trunk before it.
    companion: dict[str, Any] | list[dict[str, Any]] = {}

    @field_validator("crop")
    @classmethod
    def _box_inside_the_face(cls, box: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if box is not None:
            top, bottom, left, right = box
            if not (0 <= top < bottom <= FACE_SIZE and 0 <= left < right <= FACE_SIZE):
                raise ValueError(
                    f"[top, bottom, left, right] must lie in the {FACE_SIZE}x{FACE_SIZE} face, with "
                    "top < bottom and left < right"
                )
            if min(bottom - top, right - left) < MIN_CROP:
                raise ValueError(f"the box must be at least {MIN_CROP} pixels on each side")
        return box

    @model_validator(mode="after")
    def _one_epoch_shape(self) -> TrainParams:
        if self.identity_cap and self.class_balance:
            raise ValueError("identity_cap and class_balance both reshape the epochs: set one of them to 0")
        self.companion_trunks()  # a wrong companion value is an error now, not after the first trunk
        return self

    def without_companion(self) -> TrainParams:
        """These settings for the first trunk alone."""
        return self.model_copy(update={"companion": {}})

    def companion_trunks(self) -> list[TrainParams]:
        """The further trunks' settings, in training order: each `companion` entry's values over this
        section's (none for `{}` or `[]`)."""
        if isinstance(self.companion, dict):
            return [self._companion_params(self.companion, "companion")] if self.companion else []
        return [self._companion_params(values, f"companion.{i}") for i, values in enumerate(self.companion)]

    def _companion_params(self, values: dict[str, Any], where: str) -> TrainParams:
        # Every trunk trains on one split (embed fits the texture and Bayes models on it).
        allowed = sorted(set(TrainParams.model_fields) - {"recipe", "companion", "min_images_per_identity"})
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown train key (allowed: {', '.join(allowed)})")
        settings = {**self.without_companion().model_dump(), **values}
        try:
            return TrainParams.model_validate(settings)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{where}.{key}: {first['msg']} (got {first.get('input')!r})") from None


class EmbedParams(_Section):
    batch_size: int = Field(128, ge=1, le=65536)
    flip: bool = True  # flip test-time augmentation: embed(x) + embed(mirror(x)), re-normalized
    device: Device = "auto"
    # fuse LBP texture descriptors (PCA + LDA fit on the model's training people) with the network's
    # embedding: the `fused` variant becomes the primary one (arcface/texture.py)
    texture: bool = False
    texture_pca_dims: int = Field(800, ge=1, le=16384)
    texture_lda_dims: int = Field(400, ge=1, le=16384)
    # score pairs with a Joint Bayesian model of the network's or fused vectors (fit on the model's
    # training people): the `bayes` variant becomes the primary one, for evaluate, the index and search
    # (arcface/bayes.py)
    bayes: bool = False
    bayes_dims: int = Field(384, ge=1, le=16384)
    bayes_shrink: float = Field(0.1, ge=0.0, le=1.0)


class IndexParams(_Section):
    type: Literal["flat", "ivf", "hnsw"] = "flat"
    gallery: Literal["image", "identity"] = "image"  # a vector per image | per identity (mean, renormed)
    nlist: int = Field(0, ge=0)  # ivf: inverted lists (0: sized from the gallery, ~4·sqrt(N))
    nprobe: int = Field(0, ge=0)  # ivf: lists visited per query (0: nlist/8, at least 1)
    pq_m: int = Field(0, ge=0)  # ivf: 0 = IVF-Flat; else IVF-PQ with this many 8-bit sub-quantizers
    hnsw_m: int = Field(32, ge=4, le=256)  # hnsw: links per node
    ef_construction: int = Field(80, ge=8)  # hnsw: candidates while building
    ef_search: int = Field(64, ge=1)  # hnsw: candidates while searching
    k: int = Field(5, ge=1, le=1000)
    device: Device = "auto"  # cuda: build and search on the GPU (needs faiss-gpu); hnsw is CPU-only


class EvaluateParams(_Section):
    protocol: Literal["view2", "view1", "csv"] = "view2"
    groups: int = Field(1, ge=1, le=50)  # view2 cross-training: G models, each blind to one group of folds
    pairs_csv: str | None = None  # csv protocol: path1,path2,same[,fold] over the aligned store's paths
    folds: int = Field(10, ge=2, le=1000)  # csv protocol without a fold column; view1 with folds
    view1_threshold: Literal["folds", "dev_train"] = "folds"  # view1: held-out folds | pairsDevTrain.txt
    far_targets: tuple[float, ...] = Field((1e-3, 1e-2), strict=False, min_length=1)
    unscorable: Literal["wrong", "fail"] = "wrong"  # pairs with an unusable image: count as errors | stop


class TrackingParams(_Section):
    experiment: str = Field("train-and-eval", min_length=1)
    log_model: bool = True
    registered_model_name: str | None = "arcface-verifier"


class Params(_Section):
    seed: int = Field(0, ge=0)
    download: DownloadParams
    align: AlignParams = AlignParams()
    train: TrainParams = TrainParams()
    embed: EmbedParams = EmbedParams()
    index: IndexParams = IndexParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    recipes: dict[RecipeKey, dict[str, Any]] = {}  # train settings by recipe name


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b.c=value` into the dotted key and the YAML-parsed value (`2` -> int, `[1, 2]` -> list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParamsError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ParamsError(f"override {text!r}: the value is not valid YAML ({err})") from err
    return key, value


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `raw` with each dotted key set; unknown keys are caught later by validation."""
    result = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            child = _list_item(node, part, dotted) if isinstance(node, list) else node.get(part)
            if child is None and isinstance(node, dict):
                child = node[part] = {}
            if not isinstance(child, dict | list):
                prefix = ".".join(parents[: depth + 1])
                raise ParamsError(f"override {dotted}: {prefix} is a value, not a section")
            node = child
        if isinstance(node, list):
            _list_item(node, leaf, dotted)  # a list's item is replaced, never appended
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return result


def _list_item(items: list[Any], part: str, dotted: str) -> Any:
    """`items[part]` for an override's dotted key (train.companion.1.epochs): the part must be an index."""
    if not part.isdigit() or int(part) >= len(items):
        raise ParamsError(f"override {dotted}: {part!r} is not an item of a list of {len(items)}")
    return items[int(part)]


def load_params(
    path: str | Path = DEFAULT_PARAMS_PATH,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> Params:
    """Read `path`, apply overrides (`"train.epochs=2"` strings or a dotted-key mapping), validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: file not found") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(item) for item in overrides)
    return validate_params(apply_recipe(raw, overrides, str(path)), origin=str(path))


def apply_recipe(raw: Mapping[str, Any], overrides: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """The raw params with the chosen recipe's train values over the file's, and overrides over both."""
    merged = apply_overrides(raw, overrides)
    train = merged.get("train")
    name = train.get("recipe", "none") if isinstance(train, dict) else "none"
    if not isinstance(name, str) or name not in ("auto", *RECIPES):
        return merged  # none, or a wrong value that validation reports
    if name == "auto":
        name = _automatic_recipe(merged)
        if name == "none":
            return apply_overrides(merged, {"train.recipe": "none"})
    recipes = merged.get("recipes") or {}
    if not isinstance(recipes, dict) or not isinstance(recipes.get(name), dict):
        known = ", ".join(sorted(recipes)) if isinstance(recipes, dict) else "none"
        raise ParamsError(f"{origin}: train.recipe {name!r} has no recipes.{name} section (known: {known})")
    allowed = [key for key in TrainParams.model_fields if key != "recipe"]
    unknown = sorted(set(recipes[name]) - set(allowed))
    if unknown:
        raise ParamsError(
            f"{origin}: recipes.{name}.{unknown[0]}: unknown train key (allowed: {', '.join(allowed)})"
        )
    with_recipe = apply_overrides(raw, {f"train.{key}": value for key, value in recipes[name].items()})
    return apply_overrides(with_recipe, {**overrides, "train.recipe": name})


def _automatic_recipe(merged: Mapping[str, Any]) -> str:
    """`gpu` on a CUDA machine; on a CPU `cpu`, or `cpu-fp32` where the CPU has no fast bf16 and the
    params have that recipe; for the bundled sample `none`, or `sample-fp32` on such a CPU."""
    import torch  # only here: loading params stays free of torch otherwise

    from arcface.device import cpu_has_fast_bf16

    download = merged.get("download") or {}
    sample = not isinstance(download, dict) or download.get("dataset", SAMPLE_DATASET) == SAMPLE_DATASET
    on_cuda = (merged.get("train") or {}).get("device") != "cpu" and torch.cuda.is_available()
    recipes = merged.get("recipes")
    recipes = recipes if isinstance(recipes, dict) else {}
    # A float32 CPU trains ~4-8x slower: its recipes trade width for time (README, "Model quality").
    float32_cpu = not on_cuda and not cpu_has_fast_bf16()
    if sample:
        return "sample-fp32" if float32_cpu and "sample-fp32" in recipes else "none"
    if on_cuda:
        return "gpu"
    return "cpu-fp32" if float32_cpu and "cpu-fp32" in recipes else "cpu"


def validate_params(raw: Mapping[str, Any], origin: str = "params") -> Params:
    """Validate a raw mapping; every problem is listed with its dotted key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(error) for error in err.errors()]
        raise ParamsError(f"{origin}: invalid parameters\n  " + "\n  ".join(lines)) from None


def flatten(params: Params) -> dict[str, Any]:
    """Dotted keys -> scalar values (lists/tuples joined), e.g. for MLflow params; without `recipes`."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        elif isinstance(value, list | tuple) and any(isinstance(item, dict) for item in value):
            for position, item in enumerate(value):  # train.companion.1.crop, one key per value
                walk(f"{prefix}.{position}", item)
        elif isinstance(value, list | tuple):
            flat[prefix] = ",".join(str(v) for v in value)
        else:
            flat[prefix] = value

    # The recipes section is left out: the recipe that ran is in train.* (train.recipe names it).
    walk("", params.model_dump(mode="json", exclude={"recipes"}))
    return flat


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return f"{key}: unknown key (allowed here: {', '.join(allowed)})"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    if error["type"] == "value_error" and isinstance(error.get("input"), dict):
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"  # a rule across keys: no one input
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section at `loc`, for 'unknown key' messages."""
    model: type[BaseModel] = Params
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not None]
        model = next(a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel))
    return sorted(model.model_fields)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _deep_copy(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_deep_copy(child) for child in value]
    return value
