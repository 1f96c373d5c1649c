"""The bundled default model: shipped weights, their card, and the recipe that writes both."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from perceiver_music import checkpoint
from perceiver_music.evaluate.likelihood import evaluate_likelihood, write_likelihood

REPO = Path(__file__).resolve().parents[1]


def load_recipe():
    spec = importlib.util.spec_from_file_location("bundle_model", REPO / "recipes" / "bundle_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundled_model_loads_small_and_documented():
    weights = checkpoint.BUNDLED / "model.safetensors"
    assert weights.is_file(), "the package must ship its default model"
    assert weights.stat().st_size <= 25_000_000
    model, cfg = checkpoint.load_model(None)
    assert cfg.model.arch == "perceiver_ar" and len(cfg.model.scales) > 1  # PerceiverS
    assert cfg.data.segmentation == "effective"
    card = (checkpoint.BUNDLED / "MODEL_CARD.md").read_text()
    assert "CC BY-NC-SA 4.0" in card and "ASAP" in card and "Perceiver AR baseline" in card
    assert "not measured" not in card


def test_bundle_recipe_writes_weights_and_a_card_with_the_measured_figures(tiny_run, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for name in ("perceivers", "perceiver_ar"):
        shutil.copytree(tiny_run / "run", runs / name)
        result = evaluate_likelihood(runs / name, tiny_run / "data", "valid", progress=False)
        for split in ("valid", "test"):  # the tiny data set has no test pieces: valid stands in
            meta = {"checkpoint": name, "data": "data", "split": split, "stride": "num_latents"}
            write_likelihood(result, runs / "eval" / f"{name}-{split}", meta)
    from perceiver_music.evaluate.sets import evaluate_sets
    from perceiver_music.generate import generate_midi
    from perceiver_music.sample import SamplingConfig

    for mode in ("masked", "free"):  # the recipe's validity stage, small
        sampling = SamplingConfig(keyboard=mode == "masked")
        generate_midi(
            runs / "perceivers",
            runs / "validity" / f"new-{mode}",
            num=2,
            tokens=60,
            sampling=sampling,
            progress=False,
            render=False,
        )
    evaluate_sets(
        [runs / "validity" / "new-masked", runs / "validity" / "new-free"],
        tiny_run / "midi",
        runs / "eval" / "validity",
        plots=False,
    )
    recipe = load_recipe()
    monkeypatch.setattr(recipe, "BUNDLED", tmp_path / "bundled")
    assert recipe.main(["--runs", str(runs), "--data", str(tiny_run / "data")]) == 0
    card = (tmp_path / "bundled" / "MODEL_CARD.md").read_text()
    assert "## Does it play the keyboard? Event validity" in card
    assert "| new-masked | tokens | 0.0 % | 0.0 % |" in card and "| new-free | tokens |" in card
    assert "new-free KLD" in card  # the metric suite of the same pieces
    assert (tmp_path / "bundled" / "training_curve.png").is_file() and "(training_curve.png)" in card
    measured = json.loads((runs / "eval" / "perceivers-test" / "likelihood.json").read_text())
    assert f"{measured['nats_per_token']:.4f}" in card
    assert "CC BY-NC-SA 4.0" in card and "steps" in card
    assert (tmp_path / "bundled" / "model.safetensors").read_bytes() == (
        runs / "perceivers" / "best" / "model.safetensors"
    ).read_bytes()
    assert "| 0-1,023 | " in card  # NLL by position, valid and test
    monkeypatch.setattr(checkpoint, "BUNDLED", tmp_path / "bundled")
    model, cfg = checkpoint.load_model(None)
    assert cfg.model.width == 32
    # Without a baseline run the card says none was trained, rather than failing or inventing one.
    shutil.rmtree(runs / "perceiver_ar")
    assert recipe.main(["--runs", str(runs), "--data", str(tiny_run / "data")]) == 0
    card = (tmp_path / "bundled" / "MODEL_CARD.md").read_text()
    assert "No Perceiver AR baseline was trained" in card and "| Perceiver AR baseline |" not in card


def test_bundle_recipe_refuses_a_missing_run(tmp_path, capsys):
    assert load_recipe().main(["--runs", str(tmp_path), "--data", str(tmp_path)]) == 1
    assert "run recipes/default_model.sh first" in capsys.readouterr().err


def test_the_bundled_audio_model_is_checked_small_documented_and_plays(tmp_path):
    """The audio model `generate --audio` uses: its runs pass the PRIORS_DIR checks against its
    codec, fit the 40 MB budget, its card carries the licence and what was measured, and it
    generates audible audio of the length asked."""
    import numpy as np
    import soundfile as sf

    from perceiver_music.audio.generate import generate_audio, load_priors

    root = checkpoint.bundled_audio()
    priors = load_priors(root)
    assert [lv.level for lv in priors.levels] == [1, 0]  # the top prior, then the upsampler to level 0
    assert priors.levels[0].cfg.model.conditioned_on("timing")  # Jukebox's top prior is told the length
    assert sum(f.stat().st_size for f in root.rglob("*.safetensors")) <= 40_000_000
    card = (root / "MODEL_CARD.md").read_text()
    assert "CC BY-NC-SA 4.0" in card and "nats/code" in card and "s of audio per second" in card
    assert (root / "generated.png").is_file() and (root / "continued.png").is_file()
    result = generate_audio(root, tmp_path, 0.05, seed=1, progress=False, png=False)
    audio, sr = sf.read(result.audio_files[0])
    assert sr == priors.codec.cfg.sample_rate and len(audio) == round(0.05 * sr)
    assert np.sqrt(np.mean(audio**2)) > 1e-4  # not silence
