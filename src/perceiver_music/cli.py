"""`perceiver-music` command line: each subcommand is a thin call into a library function.

Commands that need no model (tokenize, prepare, render, set evaluation) import neither torch
nor the model code, so they start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from perceiver_music import __version__


def _fail(message: str, code: int = 2) -> int:
    print(f"perceiver-music: error: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace):
    from perceiver_music.config import load_config

    return load_config(getattr(args, "config", None), getattr(args, "overrides", None) or [])


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Readable events (or ids) for each MIDI file, as JSON {relative path: [events]}."""
    from perceiver_music.data.prepare import MIDI_SUFFIXES, find_midi
    from perceiver_music.tokens.performance import MidiError, PerformanceTokenizer

    cfg = _load(args)
    tok = PerformanceTokenizer(cfg.tokenizer)
    result: dict[str, list] = {}
    errors = found = 0
    for given in args.paths:
        root = Path(given)
        if root.is_dir():
            pairs = [(f, f.relative_to(root).as_posix()) for f in find_midi(root)]
            if not pairs:
                print(f"{root}: no .mid or .midi files found", file=sys.stderr)
        elif root.exists():
            if root.suffix.lower() not in MIDI_SUFFIXES:
                print(f"note: {root} has no .mid/.midi suffix; reading it as MIDI anyway", file=sys.stderr)
            pairs = [(root, root.name)]
        else:
            print(f"{root}: no such file or folder", file=sys.stderr)
            errors += 1
            continue
        found += len(pairs)
        for path, rel in pairs:
            try:
                ids = tok.encode(path)
            except MidiError as e:
                print(f"{path}: {e.reason}", file=sys.stderr)
                errors += 1
                continue
            result[rel] = ids.tolist() if args.ids else tok.vocab.names(ids)
    if found == 0:
        return _fail("no MIDI file to tokenize in: " + ", ".join(args.paths))
    # One file per line: readable, and still one JSON document.
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items())
    text = "{\n" + body + "\n}" if result else "{}"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {len(result)} files' tokens to {args.out}", file=sys.stderr)
    else:
        print(text)
    if errors and not result:
        return 1
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from perceiver_music.data.prepare import PrepareError, prepare

    cfg = _load(args)
    if args.workers is not None:
        cfg.prepare.workers = args.workers
    if args.split is not None:
        cfg.prepare.split = args.split
    try:
        result = prepare(
            args.midi_dir, args.out, cfg.prepare, cfg.tokenizer, progress=not args.quiet, labels=args.labels
        )
    except FileNotFoundError as e:
        return _fail(str(e))
    except PrepareError as e:
        return _fail(str(e), e.exit_status)
    print(result.summary())
    for warning in result.warnings:
        print(f"perceiver-music: warning: {warning}", file=sys.stderr)
    return 0


def cmd_prepare_audio(args: argparse.Namespace) -> int:
    from perceiver_music.audio.data import prepare_audio

    cfg = _load(args)
    if args.sample_rate is not None:
        cfg.audio = dataclasses.replace(cfg.audio, sample_rate=args.sample_rate)  # checked again
    try:
        result = prepare_audio(
            args.audio_dir,
            args.out,
            cfg.audio,
            cfg.prepare,
            splits_from=args.splits_from,
            progress=not args.quiet,
        )
    except FileNotFoundError as e:
        return _fail(str(e))
    print(result.summary())
    if result.usable == 0:
        return _fail(f"no usable audio file found under {args.audio_dir}", 1)
    return 0


def cmd_prepare_codes(args: argparse.Namespace) -> int:
    from perceiver_music.audio.codes import prepare_codes
    from perceiver_music.config import ConfigError

    run = _codec_run(args)
    if run is None:
        return 2
    try:
        result = prepare_codes(
            args.data_dir,
            run,
            args.out,
            levels=None if args.level is None else [args.level],
            codec_path=args.codec,
            progress=not args.quiet,
        )
    except (FileNotFoundError, ConfigError) as e:
        return _fail(str(e))
    print(result.summary())
    return 0


def _codec_run(args: argparse.Namespace):
    """The codec of --codec, or None after printing why not."""
    from perceiver_music.audio.codec import CodecRun
    from perceiver_music.codec import CodecError

    try:
        return CodecRun.load(args.codec, _device(args.device))
    except (FileNotFoundError, CodecError) as e:
        _fail(f"--codec: {e}")
        return None


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _codec_files(args: argparse.Namespace, work) -> int:
    """Run `work(run, path)` on each file of args.paths with the codec of --codec; a file that
    fails (CodecError) is reported and the others go on. Exit 2 if all failed, 1 if some did."""
    from perceiver_music.codec import CodecError

    run = _codec_run(args)
    if run is None:
        return 2
    failed = 0
    for given in args.paths:
        try:
            work(run, Path(given))
        except CodecError as e:
            print(f"perceiver-music: error: {e}", file=sys.stderr)
            failed += 1
    return (2 if failed == len(args.paths) else 1) if failed else 0


def cmd_encode(args: argparse.Namespace) -> int:
    def encode(run, path: Path) -> None:
        codes, samples = run.encode_file(path)
        target = run.save_codes(Path(args.out) / f"{path.stem}.codes.npz", codes, samples, str(path))
        frames = ", ".join(f"level {lv}: {c.shape[1]} frames x {c.shape[0]}" for lv, c in enumerate(codes))
        print(f"{target}: {samples / run.cfg.sample_rate:.1f} s ({frames})")

    return _codec_files(args, encode)


def cmd_decode(args: argparse.Namespace) -> int:
    from perceiver_music.codec import CodecError

    def decode(run, path: Path) -> None:
        codes, meta = run.load_codes(path)
        if args.level is not None and args.level not in codes:
            raise CodecError(path, f"holds no level {args.level} (levels {sorted(codes)})")
        stem = path.name.removesuffix(".npz").removesuffix(".codes")
        for level in sorted(codes) if args.level is None else [args.level]:
            target = Path(args.out) / f"{stem}.level{level}.{args.format}"
            run.decode_to_file(codes[level], level, target, meta.get("samples"))
            print(target)

    return _codec_files(args, decode)


def _evaluate_codec(args: argparse.Namespace) -> int:
    if args.data is None:
        return _fail("codec evaluation needs --data DATA_DIR (a folder made by `prepare-audio`)")
    from perceiver_music.audio.evaluate import evaluate_codec

    run = _codec_run(args)
    if run is None:
        return 2
    try:
        evaluate_codec(
            run,
            args.data,
            args.split,
            args.out,
            clips=args.clips,
            clip_seconds=args.clip_seconds,
            progress=not args.quiet,
            labels={"codec": str(args.codec), "data": str(args.data)},
        )
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    out = Path(args.out)
    print((out / "codec_eval.md").read_text(), end="")
    print(f"written: {out / 'codec_eval.json'}, {out / 'codec_eval.md'}, {out / 'plots'}/")
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from perceiver_music.audio.transcribe import TranscribeError, TranscribeSettings, transcribe_files

    try:
        settings = TranscribeSettings(args.onset_threshold, args.frame_threshold, args.min_note_ms)
        done, failed = transcribe_files(args.paths, args.out, settings)
    except (TranscribeError, ValueError) as e:
        return _fail(str(e))
    for t in done:
        print(f"{t.path}: {t.notes} notes from {t.seconds:.1f} s of audio")
    for path, reason in failed:
        print(f"{path}: {reason}", file=sys.stderr)
    if not done:
        return _fail("nothing was transcribed")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from perceiver_music.config import ConfigError, load_config

    run_dir = Path(args.out)
    saved = run_dir / "config.json"
    if args.resume and saved.is_file():
        try:
            before = load_config(saved)
        except ConfigError as e:  # name the run's file, whatever part of it is wrong
            return _fail(str(e) if str(e).startswith(str(saved)) else f"{saved}: {e}")
        # The run's own config, unless the same command is given again; the model and data
        # must not change under a run, the training schedule may (e.g. more steps).
        cfg = load_config(args.config or saved, args.overrides)
        if cfg.model.conditioned_on("label") and not cfg.model.labels:
            cfg.model.labels = list(before.model.labels)  # filled from the data when the run began
        changed = [
            s for s in ("model", "data", "tokenizer", "codec") if getattr(cfg, s) != getattr(before, s)
        ]
        if changed:
            return _fail(
                f"--resume: the {' and '.join(changed)} settings differ from {saved}; "
                "a run cannot change them (start a new run, or drop --config)"
            )
    else:
        config = args.config
        if not config and args.init:  # fine-tuning: the source's own config, then the overrides
            from perceiver_music.checkpoint import CheckpointError
            from perceiver_music.train import init_checkpoint

            try:
                config = init_checkpoint(args.init) / "config.json"
            except CheckpointError as e:
                return _fail(str(e))
        if not config:
            return _fail("train needs --config (a shipped name such as debug, or a YAML file)")
        cfg = load_config(config, args.overrides)
    if not (Path(args.data) / "meta.json").is_file():
        return _fail(
            f"{args.data}: not a prepared data folder (no meta.json); run `perceiver-music prepare` first"
        )
    from perceiver_music.checkpoint import CheckpointError
    from perceiver_music.train import train

    try:
        result = train(
            cfg,
            args.data,
            run_dir,
            resume=args.resume,
            progress=not args.quiet,
            branch=args.branch,
            init=args.init,
        )
    except (CheckpointError, FileNotFoundError) as e:
        return _fail(str(e))
    if os.environ.get("RANK", "0") != "0" or result.already_finished:
        return 0  # under torchrun rank 0 speaks for all; a finished run has said so
    best = (
        f", best {result.score_name} {result.best_val_nll:.4f}"
        + (" nats/token" if result.score_name == "validation NLL" else "")
        if result.best_val_nll is not None
        else ""
    )
    print(f"trained to step {result.step}: loss {result.last_loss:.4f}{best}; run in {run_dir}")
    return 0


def _pitch_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--pitch-range must be LOW-HIGH in MIDI pitches, e.g. 21-108, got {text!r}")
    return int(low), int(high)


def _check_conditioning(args: argparse.Namespace) -> str | None:
    """What is wrong with --composer / --style / --guidance for the checkpoint, read from its
    config and the style file alone (no torch, no weights), or None."""
    if args.composer is None and args.style is None and args.guidance == 1.0:
        return None
    from perceiver_music.checkpoint import CheckpointError, read_config, resolve
    from perceiver_music.generate_settings import check_conditioning
    from perceiver_music.tokens.performance import MidiError, PerformanceTokenizer

    try:
        cfg = read_config(resolve(args.ckpt) / "config.json")
        m = cfg.model
        check_conditioning(
            m.condition, m.labels, args.composer, args.style is not None, args.guidance, args.seconds
        )
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        return str(e)
    if args.style is not None:
        if not Path(args.style).is_file():
            return f"--style {args.style}: no such file"
        try:
            if len(PerformanceTokenizer(cfg.tokenizer).encode(args.style)) == 0:
                return f"--style {args.style}: the reference has no notes"
        except MidiError as e:
            return f"--style {e}"
    return None


def _generate_audio(args: argparse.Namespace) -> int:
    """generate --ckpt PRIORS_DIR: audio through the priors, upsamplers and codec of priors.json."""
    from perceiver_music.audio.generate import PriorsError, generate_audio
    from perceiver_music.generate_settings import check_sampling
    from perceiver_music.sample import SamplingConfig

    if args.seconds is None:
        return _fail("audio generation (--ckpt PRIORS_DIR) takes --seconds S, the length to generate")
    if args.tokens is not None or args.prompt_tokens is not None or args.prompt_seconds is not None:
        return _fail("--tokens, --prompt-tokens and --prompt-seconds are for MIDI; audio takes --seconds")
    if args.prompt is not None and not Path(args.prompt).is_file():
        return _fail(f"{args.prompt}: no such prompt file")
    if args.style is not None:
        return _fail("--style is a MIDI performance's style, for MIDI models; audio priors take --composer")
    try:
        top_p = 1.0 if args.top_p is None else args.top_p
        check_sampling(args.temperature, args.top_k, top_p, args.min_p, (0, 127))
        sampling = SamplingConfig(args.temperature, args.top_k, top_p, args.min_p, keyboard=False)
        result = generate_audio(
            args.ckpt,
            args.out,
            args.seconds,
            prompt=args.prompt,
            num=args.num,
            sampling=sampling,
            seed=args.seed,
            use_cache=not args.no_cache,
            refill=args.refill,
            device=_device(args.device),
            precision=args.precision,
            progress=not args.quiet,
            hop_fraction=args.hop_fraction,
            composer=args.composer,
            guidance=args.guidance,
            upsample=not args.no_upsample,
        )
    except (PriorsError, ValueError) as e:
        return _fail(str(e))
    for wav, codes in zip(result.audio_files, result.codes_files):
        print(
            f"{wav}: {result.prompt_seconds:.2f} s of prompt + {result.seconds:g} s generated (codes in {codes.name})"
        )
    print(
        f"{result.seconds * len(result.audio_files):g} s of audio in {result.elapsed:.1f} s "
        f"({result.speed:.3f} s of audio per second); settings in {result.out_dir / 'generate.json'}"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from perceiver_music.generate_settings import ENDING_GRACE, MIDI_TOP_P, check_generate

    if args.audio:
        if args.ckpt is not None:
            return _fail("--audio is the bundled audio model; give --ckpt PRIORS_DIR without it for another")
        from perceiver_music.checkpoint import bundled_audio

        try:
            args.ckpt = str(bundled_audio())
        except FileNotFoundError as e:
            return _fail(str(e))
    if args.ckpt is not None and (Path(args.ckpt) / "priors.json").is_file():  # audio.generate.PRIORS_FILE
        return _generate_audio(args)
    if args.top_p is None:
        args.top_p = MIDI_TOP_P
    if args.hop_fraction is not None or args.no_upsample:
        return _fail("--hop-fraction and --no-upsample are for audio priors (--ckpt PRIORS_DIR, --audio)")

    # Every setting is checked before torch and the model load.
    try:
        pitch_range = _pitch_range(args.pitch_range)
        check_generate(
            num=args.num,
            tokens=args.tokens,
            seconds=args.seconds,
            prompt_tokens_last=args.prompt_tokens,
            prompt_seconds_last=args.prompt_seconds,
            refill=args.refill,
            precision=args.precision,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            pitch_range=pitch_range,
        )
    except ValueError as e:
        return _fail(str(e))
    if args.prompt is not None and not Path(args.prompt).is_file():
        return _fail(f"{args.prompt}: no such prompt file")
    from perceiver_music.audio.data import AUDIO_SUFFIXES

    if args.prompt is not None and Path(args.prompt).suffix.lower() in AUDIO_SUFFIXES:
        return _fail(
            f"{args.prompt}: a recording, and this model writes MIDI: continue it as audio with --audio "
            f"(or --ckpt PRIORS_DIR), or as notes after `perceiver-music transcribe {args.prompt} --out DIR`"
        )
    if (args.prompt_tokens or args.prompt_seconds) and args.prompt is None:
        return _fail("--prompt-tokens / --prompt-seconds need --prompt FILE.mid")
    if problem := _check_conditioning(args):
        return _fail(problem)

    from perceiver_music.checkpoint import CheckpointError
    from perceiver_music.generate import generate_midi
    from perceiver_music.sample import SamplingConfig
    from perceiver_music.tokens.performance import MidiError

    sampling = SamplingConfig(
        args.temperature,
        args.top_k,
        args.top_p,
        args.min_p,
        keyboard=not args.no_keyboard_mask,
        pitch_range=pitch_range,
        restrike=args.restrike,
    )
    device = _device(args.device)
    try:
        result = generate_midi(
            args.ckpt,
            args.out,
            prompt=args.prompt,
            num=args.num,
            tokens=args.tokens,
            seconds=args.seconds,
            sampling=sampling,
            seed=args.seed,
            prompt_tokens_last=args.prompt_tokens,
            prompt_seconds_last=args.prompt_seconds,
            use_cache=not args.no_cache,
            refill=args.refill,
            device=device,
            precision=args.precision,
            progress=not args.quiet,
            render=not args.no_render,
            audio_format=_audio_format(args),
            soundfont=args.soundfont,
            composer=args.composer,
            style=args.style,
            guidance=args.guidance,
        )
    except (FileNotFoundError, CheckpointError) as e:
        return _fail(str(e))
    except MidiError as e:
        return _fail(f"prompt {e}")
    except ValueError as e:  # a setting that depends on the model, such as --refill
        return _fail(str(e))
    for note in result.notes:
        print(note)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    ended = {"eos": "stopped at EOS", "seconds": f"reached --seconds {args.seconds or 0:g}"}
    ended["grace"] = f"ran to {(args.seconds or 0) * ENDING_GRACE:g} s, the ending's limit, without ending"
    ended["tokens"] = "reached --tokens" if args.seconds is None else "cut at the safety cap"
    for path, n, secs, why in zip(result.midi_files, result.generated_tokens, result.seconds, result.stopped):
        print(f"{path}: {n} new tokens, {secs:.1f} s of music ({ended[why]})")
    for path in result.rendered:
        print(f"{path}")
    print(
        f"{sum(result.generated_tokens)} tokens at {result.tokens_per_s:.0f} tokens/s; "
        f"settings in {result.out_dir / 'generate.json'}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.codec is not None:
        if args.ckpt is not None or args.generated is not None or args.reference is not None:
            return _fail("evaluate --codec RUN --data DATA_DIR takes no --ckpt, --generated or --reference")
        return _evaluate_codec(args)
    likelihood = args.ckpt is not None or args.data is not None
    sets = args.generated is not None or args.reference is not None
    if likelihood == sets:
        return _fail(
            "evaluate takes either --ckpt RUN_DIR --data DATA_DIR (likelihood) "
            "or --generated DIR... --reference DIR (metric suite)"
        )
    if sets:
        return _evaluate_sets(args)
    if args.ckpt is None or args.data is None:
        return _fail("likelihood evaluation needs both --ckpt and --data")
    if (Path(args.ckpt) / "priors.json").is_file():
        return _evaluate_priors(args)
    if not (Path(args.data) / "meta.json").is_file():
        return _fail(f"{args.data}: not a prepared data folder (no meta.json; run `perceiver-music prepare`)")
    if not (Path(args.data) / f"{args.split}.npy").is_file():
        from perceiver_music.data.prepare import SPLITS

        found = [s for s in SPLITS if (Path(args.data) / f"{s}.npy").is_file()]
        return _fail(f"{args.data}: no split {args.split!r} (it has: {', '.join(found) or 'none'})")
    try:
        buckets = tuple(int(b) for b in args.buckets.split(",") if b.strip()) if args.buckets else ()
    except ValueError:
        buckets = (0,)
    if list(buckets) != sorted(set(buckets)) or any(b < 1 for b in buckets):
        return _fail(
            f"--buckets must be increasing positive token positions, e.g. 1024,4096 (got {args.buckets!r})"
        )
    for name in ("stride", "batch_size", "max_pieces"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be a positive number (got {value})")

    from perceiver_music.evaluate.likelihood import evaluate_likelihood, write_likelihood

    try:
        result = evaluate_likelihood(
            args.ckpt,
            args.data,
            args.split,
            stride=args.stride,
            batch_size=args.batch_size,
            buckets=buckets,
            max_pieces=args.max_pieces,
            device=None if args.device == "auto" else args.device,
            progress=not args.quiet,
            told=args.told,
        )
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    meta = {"checkpoint": str(args.ckpt), "data": str(args.data), "split": args.split, "told": args.told}
    meta["stride"] = args.stride or "num_latents"
    out = write_likelihood(result, args.out, meta)
    print((out / "likelihood.md").read_text(), end="")
    print(f"written: {out / 'likelihood.json'}, {out / 'likelihood.md'}, {out / 'likelihood.png'}")
    return 0


def _evaluate_priors(args: argparse.Namespace) -> int:
    """evaluate --ckpt PRIORS_DIR --data CODES_DIR: the NLL of every level."""
    from perceiver_music.audio.generate import PriorsError, priors_likelihood

    try:
        priors_likelihood(
            args.ckpt,
            args.data,
            args.split,
            args.out,
            stride=args.stride,
            batch_size=args.batch_size,
            max_pieces=args.max_pieces,
            device=None if args.device == "auto" else args.device,
            progress=not args.quiet,
        )
    except (PriorsError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    out = Path(args.out)
    print((out / "levels.md").read_text(), end="")
    print(f"written: {out / 'levels.json'}, {out / 'levels.md'}, {out}/level*/likelihood.*")
    return 0


def _evaluate_sets(args: argparse.Namespace) -> int:
    if not args.generated or args.reference is None:
        return _fail("set evaluation needs --generated DIR [DIR ...] and --reference DIR")
    from perceiver_music.evaluate.sets import SetError, evaluate_sets

    names = args.names.split(",") if args.names else None
    try:
        result = evaluate_sets(
            args.generated,
            args.reference,
            args.out,
            names=names,
            segments=args.segments,
            plots=not args.no_plots,
        )
    except SetError as e:
        return _fail(str(e))
    out = Path(args.out)
    print((out / "table.md").read_text(), end="")
    excluded = sum(len(s["excluded"]) for s in result["sets"].values())
    if excluded:
        print(f"{excluded} file(s) excluded, listed above and in metrics.json", file=sys.stderr)
    print(f"written: {out / 'metrics.json'}, {out / 'table.md'}, {out / 'plots'}/, {out / 'repetition.png'}")
    return 0


def _audio_format(args: argparse.Namespace) -> str | None:
    return None if args.format == "none" else args.format


def cmd_render(args: argparse.Namespace) -> int:
    from perceiver_music.render import RenderError, render_files

    try:
        loudness = None if args.loudness == "off" else float(args.loudness)
    except ValueError:
        return _fail(f"--loudness must be a number of LUFS (e.g. -16) or off, not {args.loudness!r}")
    try:
        report = render_files(
            args.paths,
            args.out,
            audio_format=_audio_format(args),
            png=not args.no_png,
            soundfont=args.soundfont,
            sample_rate=args.sample_rate,
            loudness=loudness,
            boundary=args.boundary,
            progress=not args.quiet,
            **({} if args.max_seconds is None else {"max_seconds": args.max_seconds}),
        )
    except (RenderError, ValueError) as e:
        return _fail(str(e))
    for path in report.written:
        print(path)
    for path, level in report.levels.items():
        if level.peak_limited:
            print(f"{path}: {level.loudness:.1f} LUFS (held below the -1 dBFS peak ceiling)", file=sys.stderr)
    for path, reason in report.failed:
        print(f"{path}: {reason}", file=sys.stderr)
    if not report.written:
        return _fail("nothing was rendered", 1)
    return 0


def cmd_studio(args: argparse.Namespace) -> int:
    import importlib.util

    # Found, not imported: the studio sets where Gradio writes before Gradio is imported.
    if importlib.util.find_spec("gradio") is None:
        return _fail("the studio needs Gradio: pip install 'perceiver-music[studio]'", 1)
    from perceiver_music.checkpoint import CheckpointError, bundled_audio
    from perceiver_music.studio import serve

    try:
        if args.audio:
            if args.ckpt is not None:
                return _fail(
                    "--audio is the bundled audio model; give --ckpt PRIORS_DIR without it for another"
                )
            args.ckpt = bundled_audio()
        app = serve(args.ckpt, args.out, host=args.host, port=args.port, device=_device(args.device))
    except (FileNotFoundError, CheckpointError, ValueError) as e:  # ValueError: PriorsError
        return _fail(str(e))
    except OSError as e:  # the port is taken, or the address is not this machine's
        return _fail(f"cannot serve on {args.host}:{args.port}: {e}", 1)
    print(f"perceiver-music studio: {app.local_url} (files under {args.out}; Ctrl+C stops)", flush=True)
    app.block_thread()
    return 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perceiver-music",
        description="Long-context music generation with Perceiver AR and PerceiverS.",
    )
    parser.add_argument("--version", action="version", version=f"perceiver-music {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_audio(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--format", default="wav", choices=["wav", "flac", "none"], help="audio format (default wav)"
        )
        p.add_argument(
            "--soundfont", metavar="SF2", help="the soundfont for audio (default: the system's GM bank)"
        )

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="a shipped config name (e.g. debug) or a YAML file")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="section.key=value",
            help="dotted config overrides, e.g. tokenizer.max_note_seconds=10",
        )

    p = sub.add_parser(
        "tokenize",
        help="show the performance events of MIDI files",
        description="Print each MIDI file's performance events as JSON "
        "{path relative to the folder given: [events]}.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="MIDI files or folders (recursed)")
    p.add_argument("--out", help="write the JSON here instead of standard output")
    p.add_argument("--ids", action="store_true", help="token ids instead of readable events")
    p.add_argument("--config", help="a shipped config name or a YAML file (tokenizer section)")
    p.set_defaults(func=cmd_tokenize, overrides=[])

    p = sub.add_parser(
        "prepare",
        help="turn a folder of MIDI into training data",
        description="Tokenize every MIDI file under MIDI_DIR into per-split token "
        "arrays, an index, meta.json and a report of skipped files.",
    )
    p.add_argument("midi_dir", metavar="MIDI_DIR")
    p.add_argument("--out", required=True, metavar="DATA_DIR")
    p.add_argument("--workers", type=int, help="processes (default: one per core)")
    p.add_argument(
        "--labels",
        metavar="FILE.csv",
        help="a label per piece (path,label; paths relative to MIDI_DIR); default: the composer from "
        "ASAP's metadata.csv or a MAESTRO CSV where the folder has one",
    )
    p.add_argument(
        "--split",
        choices=["auto", "maestro", "asap", "hash"],
        help="how to split (default auto: MAESTRO CSV, ASAP metadata, else hash)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "prepare-audio",
        help="turn a folder of audio into codec training data",
        description="Read every WAV/FLAC/OGG/MP3 under AUDIO_DIR (recursive), downmix to mono, "
        "resample (soxr) and store int16 PCM per split with meta.json and a report of skipped files.",
    )
    p.add_argument("audio_dir", metavar="AUDIO_DIR")
    p.add_argument("--out", required=True, metavar="DATA_DIR")
    p.add_argument("--sample-rate", type=int, help="target rate in Hz (default 22050)")
    p.add_argument(
        "--splits-from",
        metavar="MIDI_DATA_DIR",
        help="take each file's split from the MIDI piece it was rendered from (a folder made by `prepare`)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config(p)
    p.set_defaults(func=cmd_prepare_audio)

    p = sub.add_parser(
        "prepare-codes",
        help="encode a prepare-audio folder with a codec into token data, one folder per level",
        description="Encode every file of DATA_DIR (made by `prepare-audio`) with the codec of --codec at "
        "every level into CODES_DIR/level<L>/, in the format of `prepare` (ids 3 + code; RVQ frames "
        "flattened, codebook k in its own id range), for `train`, `evaluate --ckpt` and upsamplers.",
    )
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("--codec", required=True, metavar="RUN", help="a VQ-VAE run folder (or checkpoint)")
    p.add_argument("--out", required=True, metavar="CODES_DIR")
    p.add_argument("--level", type=int, help="encode only this level (default: every level)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare_codes)

    p = sub.add_parser(
        "encode",
        help="audio files to codes with a trained codec",
        description="Encode audio files (any rate, any channels) to FILE.codes.npz: every level's "
        "codes [K, T] and the codec's layout. Long files are read and coded in chunks.",
    )
    p.add_argument("paths", nargs="+", metavar="AUDIO")
    p.add_argument("--codec", required=True, metavar="RUN", help="a VQ-VAE run folder (or checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "decode",
        help="codes back to audio with the codec that made them",
        description="Decode FILE.codes.npz (from `encode`) to FILE.level<L>.wav, one per level.",
    )
    p.add_argument("paths", nargs="+", metavar="CODES")
    p.add_argument("--codec", required=True, metavar="RUN", help="a VQ-VAE run folder (or checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--level", type=int, help="decode only this level (default: every level in the file)")
    p.add_argument("--format", default="wav", choices=["wav", "flac"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser(
        "train",
        help="train Perceiver AR / PerceiverS / the Transformer baseline",
        description="Train from a config (a shipped name or a YAML file) with dotted "
        "overrides. Multi-GPU: torchrun --nproc_per_node N -m perceiver_music train ...",
    )
    p.add_argument("--data", required=True, metavar="DATA_DIR", help="a folder made by `prepare`")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN_DIR's last checkpoint (its config.json unless --config is given; "
        "train.* may change, model/data may not)",
    )
    p.add_argument(
        "--branch",
        metavar="CKPT",
        help="start at another run's checkpoint (a checkpoints/step_N folder, or a run: its "
        "latest) and go on with this config, which may add conditioning (model.condition) to "
        "that run's model: its step, optimizer state and log carry over",
    )
    p.add_argument(
        "--init",
        metavar="CKPT",
        help="fine-tune: start from a trained model's weights ('bundled', a run or a checkpoint "
        "folder) at step 0 with a fresh optimizer; without --config, that model's config "
        "(then the overrides, e.g. train.steps=500 train.lr=3e-4)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "generate",
        help="generate pieces (MIDI) from a trained model",
        description="Generate unconditionally (from BOS) or continue a MIDI prompt.",
    )
    p.add_argument(
        "--ckpt",
        help="a run folder (its best checkpoint) or a checkpoint folder (default: the bundled model); "
        "a PRIORS_DIR (with priors.json) generates audio",
    )
    p.add_argument(
        "--audio",
        action="store_true",
        help="generate audio with the bundled audio model (codec and priors) instead of MIDI",
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR")
    p.add_argument(
        "--prompt",
        metavar="FILE.mid",
        help="continue this MIDI file (audio: this recording, at the codec's rate)",
    )
    p.add_argument("--prompt-tokens", type=int, metavar="K", help="use only the last K tokens of the prompt")
    p.add_argument(
        "--prompt-seconds", type=float, metavar="S", help="use only the last S seconds of the prompt"
    )
    p.add_argument("--num", type=int, default=1, help="samples, generated as one batch (default 1)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--tokens", type=int, help="tokens to generate (default 1024)")
    length.add_argument(
        "--seconds",
        type=float,
        help="seconds of music to generate (each piece stops once its continuation lasts S s, at EOS, "
        "or at a safety cap of 250 tokens a second, reported)",
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="keep the likeliest tokens holding this much probability; 1: off, the default (README: Sampling)",
    )
    p.add_argument("--min-p", type=float, default=0.0, help="0: off")
    p.add_argument("--seed", type=int, default=0)
    cond = p.add_argument_group("conditioning (models trained with model.condition)")
    cond.add_argument("--composer", help="a composer (label) the model was trained with")
    cond.add_argument("--style", metavar="REF.mid", help="generate in the style of this performance")
    cond.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance: 1 conditioned (default), 0 unconditioned, >1 stronger "
        "(costs one more batch row per sample)",
    )
    p.add_argument(
        "--no-keyboard-mask",
        action="store_true",
        help="also sample events performances never contain (NOTE_OFF of a silent pitch, NOTE_ON of "
        "a sounding one, EOS while a note sounds); masked by default",
    )
    p.add_argument(
        "--restrike",
        choices=["release", "drop"],
        default="release",
        help="under the mask, the probability of striking a key that is already down goes to its "
        "release (default: a performance re-attacks a held key by releasing it first) or is dropped",
    )
    p.add_argument(
        "--pitch-range",
        default="21-108",
        metavar="LOW-HIGH",
        help="NOTE_ONs outside it are masked (default 21-108, the piano; the prompt's pitches always pass)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="the slow reference path: a full forward per token"
    )
    p.add_argument("--refill", type=int, help="latents kept at a cache refill (default num_latents / 2)")
    p.add_argument(
        "--hop-fraction",
        type=float,
        metavar="H",
        help="audio: sample upsamplers in Jukebox's windows, each adding H x context codes "
        "(default: slide exactly past the context)",
    )
    p.add_argument(
        "--no-upsample",
        action="store_true",
        help="audio: sample the top level alone and decode it directly, skipping the upsamplers "
        "(faster; for the bundled audio model, more notes heard: README, Audio priors)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 on GPU, fp32 on CPU; bf16 on CPU pays off on processors with bf16 "
        "matrix units (AVX512-BF16, AMX)",
    )
    p.add_argument("--no-render", action="store_true", help="MIDI only: no piano roll, no audio")
    add_audio(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "evaluate",
        help="likelihood of a checkpoint, the PerceiverS metric suite on sets of MIDI, or an audio codec",
        description="Three modes. Codec: --codec RUN --data DATA_DIR [--split test] measures an "
        "audio codec's reconstructions per level (spectral convergence, mel distance, SI-SDR, "
        "codebook usage, bitrate). Likelihood: --ckpt RUN_DIR --data DATA_DIR [--split test] scores "
        "every token with full context (nats and bits per token, by position). Sets: --generated "
        "DIR [DIR ...] --reference DIR computes the PerceiverS metrics, their intra/inter-set "
        "distances, KL divergence and overlap area, and repetition.",
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR")
    p.add_argument("--ckpt", help="likelihood: a run folder or checkpoint")
    p.add_argument("--data", metavar="DATA_DIR", help="likelihood: a folder made by `prepare`")
    p.add_argument("--split", default="test", help="likelihood: the split to score (default test)")
    p.add_argument(
        "--stride",
        type=int,
        help="likelihood: tokens scored per window (default num_latents; 1 = most context)",
    )
    p.add_argument(
        "--buckets",
        default="1024,4096",
        help="likelihood: positions starting new buckets (default 1024,4096)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="likelihood: windows per forward pass")
    p.add_argument("--max-pieces", type=int, help="likelihood: score only the first N pieces")
    p.add_argument(
        "--told",
        action="store_true",
        help="likelihood of a conditioned model: tell it each piece's composer and length (default: nothing)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--generated", nargs="+", metavar="DIR", help="sets: one or more folders of generated MIDI"
    )
    p.add_argument("--reference", metavar="DIR", help="sets: the folder of reference MIDI")
    p.add_argument("--names", help="sets: comma-separated names for the generated folders")
    p.add_argument(
        "--segments", type=int, default=64, help="sets: equal-time segments per piece (default 64)"
    )
    p.add_argument("--no-plots", action="store_true", help="sets: skip the PNGs")
    p.add_argument("--codec", metavar="RUN", help="codec: a VQ-VAE run folder (or checkpoint)")
    p.add_argument("--clips", type=int, default=32, help="codec: clips measured (default 32)")
    p.add_argument("--clip-seconds", type=float, default=5.0, help="codec: seconds per clip (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "transcribe",
        help="audio recordings to MIDI notes (basic-pitch; needs the transcribe extra)",
        description="Transcribe audio files (WAV, FLAC, OGG, MP3) to OUT/<name>.mid with basic-pitch's "
        "note model run by onnxruntime, e.g. to continue a recording with `generate --prompt`. "
        "Bad files are reported; the others still run.",
    )
    p.add_argument("paths", nargs="+", metavar="AUDIO")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--onset-threshold", type=float, default=0.5, help="0-1, default 0.5")
    p.add_argument("--frame-threshold", type=float, default=0.3, help="0-1, default 0.3")
    p.add_argument("--min-note-ms", type=float, default=127.7, help="drop shorter notes (default 127.7)")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser(
        "render",
        help="MIDI to audio (FluidSynth) and piano-roll PNGs",
        description="Render MIDI files (and folders, recursed) to loudness-normalised WAV or FLAC "
        "through FluidSynth, and to piano-roll PNGs (pitch over time, velocity as colour, pedal).",
    )
    p.add_argument("paths", nargs="+", metavar="MIDI", help="MIDI files or folders")
    p.add_argument("--out", required=True, metavar="DIR")
    add_audio(p)
    p.add_argument("--no-png", action="store_true", help="no piano rolls")
    p.add_argument(
        "--boundary", type=float, metavar="SECONDS", help="mark where a prompt ends on the piano rolls"
    )
    p.add_argument("--sample-rate", type=int, default=44100)
    p.add_argument("--loudness", default="-16", help="target loudness in LUFS, or off (default -16)")
    p.add_argument(
        "--max-seconds",
        type=_positive_seconds,
        metavar="S",
        help="refuse files whose music lasts longer than S seconds (default 3600: one hour)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser(
        "studio",
        help="a web page to generate from a model and listen (needs the studio extra)",
        description="Start a local web app: upload a MIDI prompt, choose length, variations and "
        "sampling, generate, and see, hear and download each variation. One generation runs at "
        "a time; the others queue. Every file it writes is under --out.",
    )
    p.add_argument(
        "--ckpt",
        help="a run folder (its best checkpoint) or a checkpoint folder (default: the bundled model); "
        "a PRIORS_DIR (with priors.json): an audio model",
    )
    p.add_argument("--audio", action="store_true", help="the bundled audio model instead of the MIDI one")
    p.add_argument("--port", type=int, default=7860, help="default 7860")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--out", default="studio", metavar="DIR", help="where every file goes (default ./studio)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_studio)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positionals at the first option, so `train ... a=1 --resume b=2`
    # leaves b=2 over: overrides may come anywhere on the line.
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from perceiver_music.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # e.g. `perceiver-music tokenize ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
