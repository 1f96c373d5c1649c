"""Typed configs: YAML into dataclasses, dotted overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from perceiver_music.config import Config, ConfigError, DataConfig, load_config


def test_defaults_and_shipped_config():
    cfg = load_config()
    assert cfg == Config()
    debug = load_config("debug")
    assert isinstance(debug.data, DataConfig)
    assert debug.model.max_len < Config().model.max_len
    assert debug.model.scales == ["full", 64] and debug.model.window_sizes() == [None, 64]


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  max_len: 512\n  num_latents: 64\ntokenizer:\n  max_note_seconds: 8\n")
    cfg = load_config(
        path,
        [
            "model.num_latents=128",
            "data.segmentation=baseline",
            "prepare.workers=3",
            "model.scales=[full, 32]",
        ],
    )
    assert cfg.model.max_len == 512 and cfg.model.num_latents == 128 and cfg.model.scales == ["full", 32]
    assert cfg.data.segmentation == "baseline" and cfg.prepare.workers == 3
    assert cfg.tokenizer.max_note_seconds == 8.0 and isinstance(cfg.tokenizer.max_note_seconds, float)
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4  # YAML 1.1 reads this as a string


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.max_lenn=3"], "unknown config key 'model.max_lenn'"),
        (["optimizer.lr=3"], "unknown config key 'optimizer'"),
        (["model.max_len=big"], "model.max_len: expected an integer"),
        (["model.max_len=1.5"], "model.max_len: expected an integer"),
        (["data.segmentation=random"], "data.segmentation: 'random' is not one of"),
        (["model.num_latents=5000"], "num_latents must be in"),
        (["model.scales=[full, -3]"], "neither 'full' nor a positive window"),
        (["model.width=100", "model.heads=8"], "multiple of model.heads"),
        (["train.lr=0"], "train.lr must be positive"),
        (["tokenizer.steps_per_second=3"], "must divide 1000"),
        (["model.max_len"], "not of the form"),
        (["data=3"], "expected a mapping"),
        (["data.end_windows=1"], "data.end_windows must be in"),
        (["data.end_windows=0.1", "data.segmentation=baseline"], "needs data.segmentation=effective"),
        (["model.timing_remaining=true"], "timing_remaining is part of timing"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config named 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


@pytest.mark.parametrize(
    "name", ["debug", "asap_cpu", "perceiver_ar_maestro", "perceivers_maestro", "transformer_maestro"]
)
def test_shipped_configs_load_and_build(name):
    import torch

    from perceiver_music.model import build_model

    cfg = load_config(name)
    with torch.device("meta"):  # shapes only: the paper-sized models would take gigabytes
        model = build_model(cfg.model)
    assert model.num_params() > 0
    if name.startswith("perceivers"):
        assert cfg.model.scales == ["full", 1024] and cfg.data.segmentation == "effective"
    if name.startswith("perceiver_ar_"):
        assert cfg.model.scales == ["full"] and cfg.data.segmentation == "baseline"
        assert (cfg.model.max_len, cfg.model.num_latents) == (32768, 1024)
