"""The typed config: defaults, YAML round trip, overrides and readable errors."""

from pathlib import Path

import pytest

from van_tfx.config import Config, ConfigError, load_config, save_config


def test_defaults_validate_and_derive_paths_from_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VAN_TFX_HOME", str(tmp_path))
    config = load_config()
    assert config.data_dir == tmp_path / "data"
    assert config.serving_base_path == tmp_path / "serving" / "van"
    assert config.metadata_path.parent == tmp_path


def test_yaml_round_trip_with_overrides(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(load_config(overrides=["train.epochs=3", "model.variant=b1"]), path)
    loaded = load_config(path, ["beam.args=[--runner=DirectRunner]"])
    assert loaded.train.epochs == 3
    assert loaded.model.variant == "b1"
    assert loaded.beam.args == ["--runner=DirectRunner"]
    assert isinstance(loaded, Config)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.epochs=0", "train.epochs"),
        ("model.variant=b9", "model.variant"),
        ("train.epocs=3", "train.epocs"),
        ("model.image_size=100", "model.image_size"),
        ("noequals", "section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(overrides=[override])


def test_stored_size_must_cover_model_input():
    with pytest.raises(ConfigError, match="max_image_side"):
        load_config(overrides=["data.max_image_side=32", "model.image_size=64"])


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_demo_profile_is_a_valid_config():
    from van_tfx.config import DEMO_OVERRIDES

    config = load_config(overrides=DEMO_OVERRIDES)
    assert config.model.variant == "tiny"
    assert not config.augment.horizontal_flip


def test_importing_van_tfx_turns_onednn_on_unless_the_user_chose():
    import os
    import subprocess
    import sys

    probe = "import os, van_tfx; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    chosen = {**env, "TF_ENABLE_ONEDNN_OPTS": "0"}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", probe], env=e, capture_output=True, text=True, check=True
        ).stdout.strip()
        for e in (env, chosen)
    ]
    assert outputs == ["1", "0"]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.epochs=yes", "train.epochs: .*expected an integer, got True"),
        ("train.epochs=3.0", "train.epochs: .*expected an integer, got 3.0"),
        ("train.epochs='3'", "train.epochs: .*expected an integer, got '3'"),
        ("train.base_learning_rate=.inf", "train.base_learning_rate: .*finite"),
        ("train.base_learning_rate=inf", "train.base_learning_rate: .*expected a number"),
        ("train.warmup_epochs=.nan", "train.warmup_epochs: .*finite"),
        ("serving.grpc_port=true", "serving.grpc_port"),
        ("augment.crop_scale=[0.5, true]", "augment.crop_scale: .*expected a number"),
    ],
)
def test_numbers_are_strict(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=[override])


def test_ints_still_fill_float_fields_and_booleans_stay_booleans():
    config = load_config(
        overrides=["train.base_learning_rate=1", "augment.crop_scale=[1, 1]", "train.seed=7"]
    )
    assert config.train.base_learning_rate == 1.0 and config.augment.crop_scale == (1.0, 1.0)
    assert load_config(overrides=["train.deterministic=yes"]).train.deterministic is True


def test_the_demo_settings_in_the_trainer_docs_are_the_ones_the_demo_applies():
    from van_tfx.config import DEMO_OVERRIDES

    text = (Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text()
    section = text.split("## Demo settings", 1)[1]
    block = section.split("```\n", 2)[1]
    assert block.splitlines() == DEMO_OVERRIDES
