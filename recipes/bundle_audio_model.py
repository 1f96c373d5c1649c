"""Copy the trained audio model (codec, top prior, upsamplers) into the package and write its card.

    python recipes/bundle_audio_model.py [--runs runs/audio] [--data data/asap_audio]

Reads what recipes/audio_model.sh produced under RUNS: priors/priors.json and the runs it names
(the best checkpoint of each), eval/levels.json (NLL per level on the test codes),
eval_codec/codec_eval.json (the codec on the test audio), generated/ and continued/ (their
generate.json and spectrograms) and eval_transcribed/ (the metric suite of the transcribed
audio). Writes src/perceiver_music/bundled/audio/: a PRIORS_DIR (priors.json, one checkpoint
folder per model) that `perceiver-music generate --audio` uses, and MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED_AUDIO = REPO / "src" / "perceiver_music" / "bundled" / "audio"
MAX_BYTES = 40 * 1000 * 1000  # codec and priors together
CHECKPOINT_FILES = ("model.safetensors", "config.json", "info.json")


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _best(run: Path) -> Path:
    """A run's best checkpoint (or the run itself when it is a checkpoint folder)."""
    for folder in (run / "best", run):
        if all((folder / name).is_file() for name in CHECKPOINT_FILES[:2]):
            return folder
    raise FileNotFoundError(f"{run}: no best checkpoint (model.safetensors + config.json)")


def _models(priors: Path) -> dict[str, tuple[Path, str]]:
    """name in the bundle -> (the run's best checkpoint, what it is), from priors.json."""
    spec = json.loads((priors / "priors.json").read_text())
    models = {
        "codec": (_best(priors / spec["codec"]), "codec"),
        "top": (_best(priors / spec["top"]), "top prior"),
    }
    for level, run in sorted(spec.get("upsamplers", {}).items(), reverse=True):
        models[f"up{level}"] = (_best(priors / run), f"upsampler to level {level}")
    return models


def _training(ckpt: Path) -> dict:
    """Steps, target tokens and hours of the run a best checkpoint belongs to."""
    run = ckpt.parent
    cfg = json.loads((ckpt / "config.json").read_text())
    rows = []
    if (run / "log.jsonl").is_file():
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    seconds, previous = 0.0, 0.0  # elapsed_s restarts at each resume: sum the stretches
    for r in train_rows:
        if r["elapsed_s"] < previous:
            seconds += previous
        previous = r["elapsed_s"]
    seconds += previous
    info = _json(ckpt / "info.json") or {}
    return {
        "steps": train_rows[-1]["step"] if train_rows else info.get("step", 0),
        "hours": seconds / 3600,
        "best_step": info.get("step"),
        "config": cfg,
    }


def _schedule(run: Path, last_step: int) -> str:
    """`top` steps 0-2,300 (cosine), `top_long` 2,300-3,750 (held at 0.0005), ...: how the rate went."""
    from perceiver_music.train import branch_chain

    chain, parts = branch_chain(run), []
    for k, (stage, record) in enumerate(chain):
        start = record["step"] if record else 0
        end = chain[k + 1][1]["step"] if k + 1 < len(chain) else last_step
        t = (_json(stage / "config.json") or {}).get("train", {})
        if not t:
            how = "its settings gone with its folder"
        elif t.get("schedule") == "wsd" and t.get("decay_steps") and end > t["steps"] - t["decay_steps"]:
            how = f"decayed to {t['min_lr']:g} from step {max(start, t['steps'] - t['decay_steps']):,}"
        elif t.get("schedule") == "wsd":
            how = f"held at {t['lr']:g}"
        else:
            how = f"{t.get('schedule', '?')}, {t.get('lr', 0):g} to {t.get('min_lr', 0):g}"
        parts.append(f"`{stage.name}` steps {start:,}-{end:,} ({how})")
    return ", then ".join(parts)


def _describe(name: str, what: str, ckpt: Path) -> str:
    t = _training(ckpt)
    m, tr = t["config"]["model"], t["config"]["train"]
    size = (ckpt / "model.safetensors").stat().st_size / 1e6
    if m["arch"] == "vqvae":
        c = t["config"]["codec"]
        shape = (
            f"VQ-VAE, {c['levels']} levels (hops {', '.join(str(h) for h in _hops(c))}), "
            f"{c['codebooks']} codebook(s) of {c['l_bins']} codes, {c['sample_rate']} Hz"
        )
    else:
        codes = t["config"].get("codes", {})
        context = m["max_len"] / (codes.get("frame_rate", 1) * codes.get("codebooks", 1))
        shape = (
            f"{m['arch']}, {m['layers']} layers, width {m['width']}, context {m['max_len']:,} codes "
            f"({context:.2f} s of audio)"
        )
        if m.get("condition"):
            shape += f", conditioned on {' and '.join(m['condition'])}"
    return (
        f"| {what} | `{name}/` | {shape} | {t['steps']:,} steps of {tr['batch_size']} "
        f"(best at {t['best_step']:,}), {t['hours']:.1f} h | {size:.1f} MB |"
    )


def _notes_heard(runs: Path) -> list[str]:
    """How many notes the transcriber hears in what was generated (after any prompt) and in the
    test audio: whether the audio plays notes at all, before any finer measure of them."""
    import symusic

    rows = []
    for name in ("generated", "continued", "test-audio"):
        g = _json(runs / name / "generate.json")  # none for the test audio: it is all music
        after = g["prompt_seconds"] if g else 0.0
        notes = seconds = 0.0
        for mid in sorted((runs / "transcribed" / name).glob("*.mid")):
            score = symusic.Score(str(mid), ttype="second")
            notes += sum(int((t.notes.numpy()["time"] >= after).sum()) for t in score.tracks)
            seconds += g["seconds"] if g else score.end()
        if seconds:
            what = f"{name} (after its {after:g} s prompt)" if after else name
            rows.append(f"| {what} | {int(notes):,} | {seconds:.0f} | {notes / seconds:.2f} |")
    if not rows:
        return []
    return ["| set | notes heard | seconds | notes per second |", "| --- | ---: | ---: | ---: |", *rows, ""]


def _hops(codec: dict) -> list[int]:
    """Samples per code at each level (the product of the strides up to it)."""
    hops, hop = [], 1
    for down, stride in zip(codec["downs_t"], codec["strides_t"]):
        hop *= stride**down
        hops.append(hop)
    return hops


def card(runs: Path, data: Path, models: dict[str, tuple[Path, str]], hardware: str) -> str:
    meta = _json(data / "data" / "meta.json") or {}
    counts = meta.get("counts", {})
    lines = [
        "# perceiver-music bundled audio model: a Jukebox-style codec and priors on rendered ASAP",
        "",
        "The audio model `perceiver-music generate --audio` uses: a VQ-VAE codec, a PerceiverS prior",
        "over its top level and an upsampler per lower level, all small enough to sample on a CPU.",
        "It is a demonstration of the audio path at CPU size, not a high-fidelity piano model:",
        'read "notes heard" below for whether it plays notes at all.',
        "",
        "## Licence",
        "",
        "Trained on ASAP performances rendered to audio with FluidSynth; the weights inherit ASAP's",
        "licence: **CC BY-NC-SA 4.0** (attribution, non-commercial, share-alike), and so does what",
        "they generate. The code of perceiver-music is licensed separately.",
        "",
        "## Data",
        "",
        "ASAP performance MIDI rendered by `recipes/render_asap_audio.sh` (FluidSynth, a piano",
        f"soundfont, {meta.get('sample_rate', '?')} Hz mono), split by piece as the MIDI model's data:",
        "",
        "| split | files | hours |",
        "| --- | ---: | ---: |",
        *[f"| {s} | {c['files']} | {c['seconds'] / 3600:.2f} |" for s, c in counts.items()],
        "",
        "## Models",
        "",
        "| model | folder | architecture | training | size |",
        "| --- | --- | --- | --- | ---: |",
        *[_describe(name, what, ckpt) for name, (ckpt, what) in models.items()],
        "",
        f"Trained on {hardware}.",
        "",
        *[
            f"- The {what}'s learning rate: {_schedule(ckpt.parent, _training(ckpt)['steps'])}."
            for name, (ckpt, what) in models.items()
            if (ckpt.parent / "branch.json").is_file()
        ],
        "",
        "## Use",
        "",
        "```bash",
        "perceiver-music generate --audio --seconds 20 --out out/audio                  # from nothing",
        "perceiver-music generate --audio --prompt recording.wav --seconds 10 --out out/continued",
        "perceiver-music generate --audio --seconds 20 --no-upsample --out out/top      # the top level decoded directly",
        "```",
        "",
        "A prompt is a recording at the codec's sample rate; the output keeps it sample for sample.",
        "`--no-upsample` skips the upsamplers and decodes the top level's codes directly: the upsampler",
        "is most of the sampling time, and where it plays true top codes with fewer notes than decoding",
        "them directly does (`bench/audio_upsampler.py`), the top level alone is heard better.",
    ]
    codec_eval = _json(runs / "eval_codec" / "codec_eval.json")
    if codec_eval is not None:
        lines += [
            "",
            "## The codec on the test audio",
            "",
            f"`perceiver-music evaluate --codec`: {codec_eval['clips']} clips of {codec_eval['clip_seconds']:g} s.",
            "",
            "| level | bitrate | spectral convergence dB | mel distance | SI-SDR dB | codebook perplexity |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            *[
                f"| {lv['level']} | {lv['bitrate_bps'] / 1000:.1f} kbps | {lv['spectral_convergence_db']:.2f} "
                f"| {lv['mel_distance']:.2f} | {lv['si_sdr_db']:.1f} | {lv['perplexity']:.0f} |"
                for lv in codec_eval["levels"]
            ],
        ]
    levels = _json(runs / "eval" / "levels.json")
    if levels is not None:
        lines += [
            "",
            f"## Likelihood per level on the {levels['split']} codes",
            "",
            f"`perceiver-music evaluate --ckpt PRIORS_DIR --data CODES_DIR --split {levels['split']}` (every code scored",
            "with full context; an upsampler given the whole upper level):",
            "",
            "| level | codes | nats/code | bits/code | bits/s of audio |",
            "| ---: | ---: | ---: | ---: | ---: |",
            *[
                f"| {r['level']} | {r['codes']:,} | {r['nats_per_code']:.4f} | {r['bits_per_code']:.4f} "
                f"| {r['bits_per_second']:,.0f} |"
                for r in levels["levels"]
            ],
        ]
    for name, title in (("generated", "Generated"), ("continued", "A held-out recording continued")):
        g = _json(runs / name / "generate.json")
        if g is None:
            continue
        prompt = f", after a prompt of {g['prompt_seconds']:g} s" if g.get("prompt") else ""
        lines += [
            "",
            f"## {title}",
            "",
            f"{g['seconds']:g} s of audio{prompt} in {g['wall_seconds']:.0f} s on {g['device']} "
            f"({g['audio_seconds_per_second']:.3f} s of audio per second; per level: "
            + ", ".join(f"level {k} {v:.1f} s" for k, v in g["level_wall_seconds"].items())
            + ").",
        ]
        if (runs / name / "sample_00.png").is_file():
            lines += ["", f"![{name}]({name}.png)"]
    follows = _json(runs / "continuation.json")
    if follows is not None:
        m, st = follows["mean"], follows["settings"]
        lines += [
            "",
            "## Does a continuation follow its prompt?",
            "",
            f"`bench/audio_continuation.py`: {follows['recordings']} held-out recordings, {st['prompt_seconds']:g} s of",
            f"each as the prompt, continued for {st['seconds']:g} s; the same length generated without a prompt",
            "is the baseline. Each against what the recording really plays next:",
            "",
            "| | pitch-class profile, cosine (higher: nearer) | mean log-mel, dB apart (lower: nearer) |",
            "| --- | ---: | ---: |",
            *[
                f"| {label} | {m[key]['chroma_cosine']:.3f} | {m[key]['mel_db_distance']:.2f} |"
                for key, label in (
                    ("continued", "continued from the prompt"),
                    ("unprompted", "generated without a prompt"),
                    ("prompt_itself", "the prompt's own last seconds (ceiling)"),
                )
            ],
        ]
    table = runs / "eval_transcribed" / "table.md"
    if table.is_file():
        lines += [
            "",
            "## The generated audio as music: transcribed, then the metric suite",
            "",
            "Each recording transcribed back to notes (`perceiver-music transcribe`, basic-pitch) and",
            "compared with every ASAP test performance by `perceiver-music evaluate --generated`;",
            "`test-audio` is the test audio itself through the same transcriber, the ceiling.",
            "",
            *_notes_heard(runs),
            *table.read_text().strip().splitlines(),
        ]
    lines += [
        "",
        "## Retrain",
        "",
        "```bash",
        "bash recipes/audio_model.sh                   # render ASAP, train the codec and priors, evaluate",
        "python recipes/bundle_audio_model.py          # copy them here, rewrite this card",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "audio")
    p.add_argument("--data", type=Path, default=REPO / "data" / "asap_audio")
    p.add_argument("--hardware", default="a 2-core CPU", help="where the models were trained, for the card")
    args = p.parse_args(argv)
    priors = args.runs / "priors"
    if not (priors / "priors.json").is_file():
        print(f"{priors / 'priors.json'}: not found; run recipes/audio_model.sh first", file=sys.stderr)
        return 1
    try:
        models = _models(priors)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"{priors / 'priors.json'}: {e}", file=sys.stderr)
        return 1
    size = sum((ckpt / "model.safetensors").stat().st_size for ckpt, _ in models.values())
    if size > MAX_BYTES:
        print(
            f"{priors}: {size / 1e6:.1f} MB of weights, over the {MAX_BYTES / 1e6:.0f} MB limit",
            file=sys.stderr,
        )
        return 1
    text = card(args.runs, args.data, models, args.hardware)
    if BUNDLED_AUDIO.exists():
        shutil.rmtree(BUNDLED_AUDIO)
    BUNDLED_AUDIO.mkdir(parents=True)
    for name, (ckpt, _) in models.items():
        (BUNDLED_AUDIO / name).mkdir()
        for file in CHECKPOINT_FILES:
            if (ckpt / file).is_file():
                shutil.copyfile(ckpt / file, BUNDLED_AUDIO / name / file)
    ups = {name[2:]: name for name in models if name.startswith("up")}
    spec = {"codec": "codec", "top": "top", "upsamplers": ups}
    (BUNDLED_AUDIO / "priors.json").write_text(json.dumps(spec, indent=1) + "\n")
    for name in ("generated", "continued"):
        if (args.runs / name / "sample_00.png").is_file():
            shutil.copyfile(args.runs / name / "sample_00.png", BUNDLED_AUDIO / f"{name}.png")
    (BUNDLED_AUDIO / "MODEL_CARD.md").write_text(text)
    print(f"bundled {len(models)} models ({size / 1e6:.1f} MB) into {BUNDLED_AUDIO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
