"""Typed params: the file loads, overrides apply, and every mistake names its key."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
import yaml

from arcface.config import (
    BackboneName,
    Params,
    ParamsError,
    flatten,
    load_params,
    parse_override,
)
from arcface.device import cpu_has_fast_bf16
from arcface.models.backbones import BACKBONES

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load_with_their_values() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.download.dataset == "sample"
    assert params.download.sources.images.url == "tests/data/sample/lfw-sample.tgz"
    assert params.align.thresholds == (0.6, 0.7, 0.7)
    # auto keeps the sample's train section, but for the half-width trunk on a CPU training in float32
    float32_cpu = not torch.cuda.is_available() and not cpu_has_fast_bf16()
    expected = ("sample-fp32", "resnet34-half") if float32_cpu else ("none", "resnet34")
    assert (params.train.recipe, params.train.backbone) == expected
    assert load_params(ROOT / "params.yaml", ["train.recipe=none"]).train.backbone == "resnet34"
    assert params.evaluate.protocol == "view2"
    assert set(params.recipes) == {"cpu", "cpu-fp32", "gpu", "sample-fp32"}


def test_overrides_set_values_with_yaml_types() -> None:
    params = load_params(
        ROOT / "params.yaml",
        [
            "train.epochs=2",
            "train.loss=softmax",
            "embed.flip=false",
            "align.thresholds=[0.5, 0.6, 0.7]",
        ],
    )
    assert params.train.epochs == 2
    assert params.train.loss == "softmax"
    assert params.embed.flip is False
    assert params.align.thresholds == (0.5, 0.6, 0.7)


def test_overrides_as_mapping_like_prefect_parameters() -> None:
    params = load_params(ROOT / "params.yaml", {"train.epochs": 3, "download.dataset": "lfw"})
    assert params.train.epochs == 3
    assert params.download.sources.images.url.startswith("https://")


def test_params_are_frozen() -> None:
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(Exception, match="frozen"):
        params.train.epochs = 5  # type: ignore[misc]


def test_unknown_key_names_key_and_allowed_keys(tmp_path: Path) -> None:
    raw = project_params()
    raw["train"]["epoch"] = 3
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, raw))
    message = str(error.value)
    assert "train.epoch: unknown key" in message
    assert "epochs" in message and "batch_size" in message  # the allowed keys are listed
    assert str(tmp_path / "params.yaml") in message


def test_unknown_override_key_is_an_error() -> None:
    with pytest.raises(ParamsError, match=r"train\.nope: unknown key"):
        load_params(ROOT / "params.yaml", ["train.nope=1"])


def test_wrong_type_and_range_name_key(tmp_path: Path) -> None:
    raw = project_params()
    raw["train"]["epochs"] = "ten"
    raw["train"]["lr"] = -1.0
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, raw))
    message = str(error.value)
    assert "train.epochs: Input should be a valid integer (got 'ten')" in message
    assert "train.lr: Input should be greater than 0 (got -1.0)" in message


def test_choice_error_lists_allowed_values() -> None:
    with pytest.raises(
        ParamsError, match=r"train\.loss: Input should be 'softmax', 'arcface', 'cosface' or 'combined'"
    ):
        load_params(ROOT / "params.yaml", ["train.loss=triplet"])


def test_a_probability_above_one_is_refused_by_name() -> None:
    with pytest.raises(
        ParamsError, match=r"train\.sunglasses: Input should be less than or equal to 1 \(got 1\.5\)"
    ):
        load_params(ROOT / "params.yaml", ["train.sunglasses=1.5"])


def test_a_bare_off_means_off_though_yaml_reads_it_as_false(tmp_path: Path) -> None:
    # `--set train.amp=off` and `amp: off` in a file both reach us as the boolean False.
    params = load_params(ROOT / "params.yaml", ["train.amp=off", "align.amp=off"])
    assert (params.train.amp, params.align.amp) == ("off", "off")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["amp"] = False
    assert load_params(write(tmp_path, raw)).train.amp == "off"
    # `on` (true) is no setting of amp: still an error that lists the choices
    with pytest.raises(ParamsError, match=r"train\.amp: Input should be 'auto', 'bf16', 'fp16' or 'off'"):
        load_params(ROOT / "params.yaml", ["train.amp=on"])


def test_bad_checksum_format_is_rejected() -> None:
    with pytest.raises(ParamsError, match=r"download\.sample\.images\.sha256"):
        load_params(ROOT / "params.yaml", ["download.sample.images.sha256=abc"])


@pytest.mark.parametrize("text", ["train.epochs", "=3", "train.epochs=[1,"])
def test_malformed_overrides(text: str) -> None:
    with pytest.raises(ParamsError, match="override"):
        parse_override(text)


def test_missing_file_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(tmp_path / "list.yaml")


def test_flatten_gives_dotted_scalars() -> None:
    flat = flatten(load_params(ROOT / "params.yaml"))
    assert flat["train.epochs"] == load_params(ROOT / "params.yaml").train.epochs
    assert flat["align.thresholds"] == "0.6,0.7,0.7"
    assert all(not isinstance(v, dict | list | tuple) for v in flat.values())
    assert flat["train.recipe"] == load_params(ROOT / "params.yaml").train.recipe != "auto"
    assert not any(key.startswith("recipes") for key in flat)


def test_backbone_choices_match_registry() -> None:
    assert set(typing.get_args(BackboneName)) == set(BACKBONES)


def with_recipes(tmp_path: Path, **train: object) -> Path:
    raw = project_params()
    raw["train"].update(train)
    raw["recipes"] = {"cpu": {"backbone": "resnet18", "epochs": 40}, "gpu": {"backbone": "iresnet50"}}
    return write(tmp_path, raw)


def test_a_recipe_replaces_train_values_and_overrides_win_over_it(tmp_path: Path) -> None:
    path = with_recipes(tmp_path, recipe="cpu")
    params = load_params(path)
    assert (params.train.recipe, params.train.backbone, params.train.epochs) == ("cpu", "resnet18", 40)
    assert params.train.lr == project_params()["train"]["lr"]  # not in the recipe: the file's value
    overridden = load_params(path, ["train.epochs=3", "recipes.cpu.backbone=resnet50"])
    assert (overridden.train.backbone, overridden.train.epochs) == ("resnet50", 3)
    plain = load_params(path, ["train.recipe=none"])
    assert (plain.train.recipe, plain.train.backbone) == ("none", project_params()["train"]["backbone"])


def test_auto_recipe_keeps_the_sample_as_written_and_picks_cpu_on_a_cpu(tmp_path: Path) -> None:
    path = with_recipes(tmp_path, recipe="auto", device="cpu")
    assert load_params(path).train.recipe == "none"  # the bundled sample
    on_lfw = load_params(path, ["download.dataset=lfw"])
    assert (on_lfw.train.recipe, on_lfw.train.epochs) == ("cpu", 40)


def test_auto_recipe_on_a_cpu_without_fast_bf16_is_the_cpu_recipe_at_half_width_with_blur() -> None:
    """cpu-fp32 is the cpu recipe's first trunk with the half-width trunk, SGD and blur augmentation, alone
    (measured so), chosen where a CPU trains in float32; a params file without it (the test above) keeps
    `cpu`."""
    recipes = project_params()["recipes"]
    assert {k: v for k, v in recipes["cpu-fp32"].items() if recipes["cpu"][k] != v} == {
        "backbone": "resnet18-fast-half",
        "blur": 0.2,
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 0.0005,
        "companion": {},
    }
    assert recipes["cpu-fp32"].keys() == recipes["cpu"].keys()
    on_lfw = load_params(ROOT / "params.yaml", ["download.dataset=lfw", "train.device=cpu"])
    expected = ("cpu", "resnet18-fast") if cpu_has_fast_bf16() else ("cpu-fp32", "resnet18-fast-half")
    assert (on_lfw.train.recipe, on_lfw.train.backbone) == expected


def test_the_sample_recipe_changes_only_the_demos_trunk() -> None:
    """sample-fp32 swaps the demo's resnet34 for its half width (~4x the float32 speed) and nothing else;
    it is never picked for LFW."""
    assert project_params()["recipes"]["sample-fp32"] == {"backbone": "resnet34-half"}
    on_lfw = load_params(ROOT / "params.yaml", ["download.dataset=lfw", "train.device=cpu"])
    assert on_lfw.train.recipe in ("cpu", "cpu-fp32")


def test_identity_cap_with_class_balance_names_both_keys(tmp_path: Path) -> None:
    path = write(tmp_path, project_params())
    before = path.read_text()
    with pytest.raises(ParamsError, match=r"train: identity_cap and class_balance both reshape the epochs"):
        load_params(path, ["train.identity_cap=20", "train.class_balance=0.5"])
    assert path.read_text() == before
    assert load_params(path, ["train.class_balance=0.5"]).train.class_balance == 0.5


def test_recipe_mistakes_name_the_key(tmp_path: Path) -> None:
    path = with_recipes(tmp_path)
    with pytest.raises(ParamsError, match=r"recipes\.cpu\.epoch: unknown train key"):
        load_params(path, ["train.recipe=cpu", "recipes.cpu.epoch=3"])
    raw = project_params()
    raw["train"]["recipe"] = "gpu"
    del raw["recipes"]["gpu"]
    with pytest.raises(ParamsError, match=r"train\.recipe 'gpu' has no recipes\.gpu section"):
        load_params(write(tmp_path, raw))
    with pytest.raises(ParamsError, match=r"train\.epochs"):
        load_params(path, ["train.recipe=cpu", "recipes.cpu.epochs=0"])


def test_a_companion_trunk_takes_its_values_over_the_train_sections(tmp_path: Path) -> None:
    path = with_recipes(tmp_path, recipe="cpu")
    companion = "train.companion={backbone: resnet50, lr: 0.02, time_budget_minutes: 60}"
    params = load_params(path, [companion, "train.companion.epochs=7"])
    (second,) = params.train.companion_trunks()
    assert (second.backbone, second.lr, second.epochs, second.time_budget_minutes) == (
        "resnet50",
        0.02,
        7,
        60.0,
    )
    assert second.weight_decay == params.train.weight_decay and second.companion == {}
    assert params.train.without_companion().companion == {} and params.train.backbone == "resnet18"
    assert flatten(params)["train.companion.backbone"] == "resnet50"  # MLflow sees each companion value
    assert load_params(path).train.companion_trunks() == []


def test_a_list_of_companions_trains_several_trunks_each_over_the_train_section(tmp_path: Path) -> None:
    path = with_recipes(tmp_path, recipe="cpu")
    boxes = "train.companion=[{crop: [8, 88, 16, 96]}, {crop: [48, 112, 8, 104], epochs: 3}]"
    params = load_params(path, [boxes, "train.companion.1.lr=0.5"])
    second, third = params.train.companion_trunks()
    assert (second.crop, second.epochs, second.lr) == ((8, 88, 16, 96), params.train.epochs, params.train.lr)
    assert (third.crop, third.epochs, third.lr) == ((48, 112, 8, 104), 3, 0.5)
    assert (second.companion, third.companion) == ({}, {})
    flat = flatten(params)
    assert (flat["train.companion.0.crop"], flat["train.companion.1.lr"]) == ("8,88,16,96", 0.5)
    assert load_params(path, ["train.companion=[]"]).train.companion_trunks() == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.companion.1.crop=[0, 200, 0, 50]", r"train: companion\.1\.crop: .*must lie in the 112x112"),
        ("train.companion.1.epoch=3", r"train: companion\.1\.epoch: unknown train key"),
        ("train.companion.2.lr=0.1", r"override train\.companion\.2\.lr: '2' is not an item of a list of 2"),
        ("train.companion.one.lr=0.1", r"override train\.companion\.one\.lr: 'one' is not an item of a list"),
    ],
)
def test_a_mistake_in_a_list_of_companions_names_its_position(
    tmp_path: Path, override: str, message: str
) -> None:
    path = write(tmp_path, project_params())
    boxes = "train.companion=[{crop: [8, 88, 16, 96]}, {crop: [48, 112, 8, 104]}]"
    with pytest.raises(ParamsError, match=message):
        load_params(path, [boxes, override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.companion.lr=-1", r"train: companion\.lr: Input should be greater than 0 \(got -1\)"),
        ("train.companion.epoch=3", r"train: companion\.epoch: unknown train key \(allowed: accumulate, "),
        ("train.companion.recipe=gpu", r"companion\.recipe: unknown train key"),
        # both trunks train on one split: the companion cannot change it
        ("train.companion.min_images_per_identity=1", r"companion\.min_images_per_identity: unknown"),
    ],
)
def test_companion_mistakes_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    path = write(tmp_path, project_params())
    with pytest.raises(ParamsError, match=message):
        load_params(path, [override])


OUTSIDE = r"Value error, \[top, bottom, left, right\] must lie in the 112x112 face"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.crop=[8, 88, 96, 16]", rf"train\.crop: {OUTSIDE}"),
        ("train.crop=[0, 200, 0, 50]", rf"train\.crop: {OUTSIDE}"),
        (
            "train.crop=[0, 10, 0, 10]",
            r"train\.crop: Value error, the box must be at least 16 pixels on each",
        ),
        ("train.companion.crop=[-4, 60, 0, 60]", rf"train: companion\.crop: {OUTSIDE}"),
    ],
)
def test_a_crop_outside_the_face_or_too_small_names_the_key(
    tmp_path: Path, override: str, message: str
) -> None:
    path = write(tmp_path, project_params())
    with pytest.raises(ParamsError, match=message):
        load_params(path, [override])
    assert load_params(path, ["train.crop=[8, 88, 16, 96]"]).train.crop == (8, 88, 16, 96)
