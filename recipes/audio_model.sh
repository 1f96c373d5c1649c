#!/usr/bin/env bash
# The audio model end to end: ASAP rendered to piano audio -> prepare-audio -> the codec
# (vqvae_tiny) -> prepare-codes -> the top prior (prior_tiny, level 1) and the upsampler
# (upsampler_tiny, level 0) -> a PRIORS_DIR -> 20 s generated, and 10 s continuing a held-out
# recording; both transcribed back to notes (basic-pitch) and scored by the metric suite
# against the MIDI of ASAP's test audio.
#
#   bash recipes/audio_model.sh                     # the bundled audio model: about 1.8 h on 2 cores
#   LIMIT=8 PRIOR_STEPS=200 UP_STEPS=50 bash recipes/audio_model.sh    # a quick pass
#   LIMIT=60 CODEC_STEPS=9000 PRIOR_STEPS=8000 UP_STEPS=2000 bash ...  # more data, longer (a GPU)
#   CODEC=runs/codec_bench/tiny bash recipes/audio_model.sh            # a codec trained already
#
# Every stage skips what is already done (a run that finished says so; --resume continues a
# killed one), so the recipe can be re-run after an interruption. Times measured for the
# bundled model on an idle 2-core CPU (AVX2, fp32; a GPU trains the priors in minutes):
#
#   1. render + prepare-audio   recipes/render_asap_audio.sh, one FluidSynth a core: LIMIT=20
#                               (plus 2 valid and 2 test pieces: 1.9 h of audio) in 3.5 min,
#                               32x real time
#   2. codec                    vqvae_tiny, CODEC_STEPS=4000 steps: 13 minutes (0.15-0.2 s a
#                               step; its level-0 spectral convergence is within 1.5 dB of 9,667
#                               steps', README "The audio codec")
#   3. prepare-codes            both levels, 1.9 h of audio in 63 s
#   4+5. the priors, side by side, one core each:
#        top prior              prior_tiny, PRIOR_STEPS=2300 steps of 8 windows x 256 targets,
#                               1.8 s a step: 70 minutes
#        upsampler              upsampler_tiny, UP_STEPS=460 steps of 8 windows x 1,024
#                               targets, 6.8 s a step: 52 minutes (its config's 4000 steps
#                               would take 7.6 h here, minutes on a GPU)
#   6. NLL per level, the codec on the test audio, 20 s generated (4.5 min) and 10 s
#      continuing a test recording (2 min) (README, "Audio priors")
#   7. transcribe + metric suite, against every ASAP test performance (97)
#   8. bench/audio_continuation.py: 4 held-out recordings continued for 5 s, and 5 s unprompted
#      (9 min)
set -euo pipefail
cd "$(dirname "$0")/.."

ASAP=${ASAP:-../shared/data/asap}
OUT=${OUT:-data/asap_audio}
RUNS=${RUNS:-runs/audio}
LIMIT=${LIMIT:-20}
CODEC_STEPS=${CODEC_STEPS:-4000}
PRIOR_STEPS=${PRIOR_STEPS:-2300}
UP_STEPS=${UP_STEPS:-460}
SECONDS_OUT=${SECONDS_OUT:-20}

if [ "${SETUP:-1}" = 1 ]; then  # SETUP=0: use the perceiver-music and python already on PATH
    bash scripts/setup.sh >/dev/null
    . .venv/bin/activate
fi

stage() { echo; echo "== $1 ($(date -u +%H:%M:%S) UTC)"; }
train_run() {  # CONFIG DATA RUN STEPS [OVERRIDE...]: train, or continue a run that exists
    local resume=()
    [ -d "$3/checkpoints" ] && resume=(--resume)
    perceiver-music train --config "$1" --data "$2" --out "$3" "${resume[@]}" train.steps="$4" "${@:5}"
}

stage "1. render ASAP and prepare the audio (LIMIT=$LIMIT)"
SETUP=0 ASAP="$ASAP" OUT="$OUT" LIMIT="$LIMIT" RATE=22050 bash recipes/render_asap_audio.sh

if [ -n "${CODEC:-}" ] && [ ! -e "$RUNS/codec" ]; then  # CODEC=RUN: a codec trained already
    mkdir -p "$RUNS" && cp -r "$CODEC" "$RUNS/codec"          # (e.g. bench/codec.py --work DIR's DIR/tiny)
fi
stage "2. the codec: vqvae_tiny, $CODEC_STEPS steps"
train_run vqvae_tiny "$OUT/data" "$RUNS/codec" "$CODEC_STEPS"

stage "3. prepare-codes: every level"
perceiver-music prepare-codes "$OUT/data" --codec "$RUNS/codec" --out "$OUT/codes"

# The top prior and the upsampler need nothing of each other (both read codes), so they train
# side by side, a core each: on a small CPU that beats two threads each in turn, since a step
# at these sizes does not keep two threads busy.
stage "4+5. the top prior (level 1, prior_tiny, $PRIOR_STEPS steps) and the upsampler (level 0, upsampler_tiny, $UP_STEPS steps), side by side"
threads=$(( $(nproc) / 2 ))
[ "$threads" -ge 1 ] || threads=1
train_run prior_tiny "$OUT/codes/level1" "$RUNS/top" "$PRIOR_STEPS" train.threads="$threads" > "$RUNS/top.log" 2>&1 &
top_pid=$!
# A short run: a short warm-up, and an evaluation (and checkpoint) every 100 steps so that the
# best checkpoint is near the end.
up_eval=$(( UP_STEPS < 1000 ? 100 : 250 ))
train_run upsampler_tiny "$OUT/codes/level0" "$RUNS/up0" "$UP_STEPS" train.threads="$threads" \
    train.warmup_steps=$(( UP_STEPS < 2000 ? 40 : 200 )) train.eval_every="$up_eval" \
    train.ckpt_every="$up_eval" train.eval_windows=32 > "$RUNS/up0.log" 2>&1 &
up_pid=$!
wait "$top_pid" || { echo "the top prior failed: $RUNS/top.log" >&2; exit 1; }
wait "$up_pid" || { echo "the upsampler failed: $RUNS/up0.log" >&2; exit 1; }

stage "6. the PRIORS_DIR, NLL per level on the test split, and generation"
mkdir -p "$RUNS/priors"
cat > "$RUNS/priors/priors.json" <<'JSON'
{"codec": "../codec", "top": "../top", "upsamplers": {"0": "../up0"}}
JSON
perceiver-music evaluate --ckpt "$RUNS/priors" --data "$OUT/codes" --split test --out "$RUNS/eval" --quiet
perceiver-music evaluate --codec "$RUNS/codec" --data "$OUT/data" --split test --out "$RUNS/eval_codec"
perceiver-music generate --ckpt "$RUNS/priors" --seconds "$SECONDS_OUT" --out "$RUNS/generated"
# A held-out recording (the first test file), its first 10 s as the prompt, continued for 10 s.
prompt=$(python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
test = [p for p in json.loads((out / "data" / "meta.json").read_text())["pieces"] if p["split"] == "test"]
print(out / "wav" / test[0]["path"])
PY
)
python - "$prompt" "$RUNS/prompt.wav" <<'PY'
import sys
import soundfile as sf
audio, sr = sf.read(sys.argv[1], dtype="int16")
sf.write(sys.argv[2], audio[: 10 * sr], sr, subtype="PCM_16")
PY
perceiver-music generate --ckpt "$RUNS/priors" --prompt "$RUNS/prompt.wav" --seconds 10 --out "$RUNS/continued"
echo "generated: $RUNS/generated/sample_00.wav, continued: $RUNS/continued/sample_00.wav (spectrograms beside them)"

stage "7. the generated audio transcribed (basic-pitch) and scored by the metric suite against ASAP test"
# The ceiling: the test audio itself, transcribed the same way (the transcriber's own error;
# bench/transcribe.py measures it note by note).
sets=$(python - "$OUT" "$ASAP" <<'PY'
import json, shutil, sys
from pathlib import Path
out, asap = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
test = [p["path"] for p in json.loads((out / "data" / "meta.json").read_text())["pieces"] if p["split"] == "test"]
# The reference: every ASAP test performance (a handful of rendered test files is too few for
# the suite's distance densities), the MIDI the test audio was rendered from among them.
ref = out / "test_midi"
shutil.rmtree(ref, ignore_errors=True)  # made anew: no link left from another selection
ref.mkdir()
pieces = json.loads((out / "asap_midi" / "meta.json").read_text())["pieces"]
for rel in (p["path"] for p in pieces if p["split"] == "test"):
    (ref / rel.replace("/", "__")).symlink_to(asap / rel)
print(ref, " ".join(str(out / "wav" / rel) for rel in test))
PY
)
read -r ref test_audio <<<"$sets"
perceiver-music transcribe "$RUNS/generated"/*.wav --out "$RUNS/transcribed/generated"
perceiver-music transcribe "$RUNS/continued"/*.wav --out "$RUNS/transcribed/continued"
# shellcheck disable=SC2086  # one path per test file
perceiver-music transcribe $test_audio --out "$RUNS/transcribed/test-audio"
perceiver-music evaluate --generated "$RUNS/transcribed/generated" "$RUNS/transcribed/continued" \
    "$RUNS/transcribed/test-audio" --names generated,continued,test-audio --reference "$ref" \
    --out "$RUNS/eval_transcribed"
echo "metric suite of the transcribed audio (test-audio: the ceiling): $RUNS/eval_transcribed/table.md"

stage "8. does a continuation follow its prompt? Held-out recordings continued, against unprompted audio"
python bench/audio_continuation.py --priors "$RUNS/priors" --data "$OUT/data" --splits test valid \
    --out "$RUNS/continuation.json"
echo "then: python recipes/bundle_audio_model.py copies the codec and priors into the package (generate --audio)"
