#!/usr/bin/env bash
# Renders the ASAP performances to piano audio through FluidSynth and prepares them for the
# audio codec, with ASAP's own split (by piece folder), so its test pieces stay test:
#
#   bash recipes/render_asap_audio.sh              # every performance: 1067 files, 93.6 h of music
#   LIMIT=60 bash recipes/render_asap_audio.sh     # every n-th performance, 60 of them (~5 h)
#
# The piano is MuseScore_General's (Debian's musescore-general-soundfont: public-domain Steinway D
# samples); without it the General MIDI bank (FluidR3_GM) plays. Audio is rendered at 22.05 kHz
# (the tiny codec's rate; set RATE=44100 for vqvae_jukebox) to FLAC, loudness-normalised to
# -20 LUFS. Re-running renders only what is missing and prepare-audio reuses unchanged files.
#
# How much and how long, measured with LIMIT=8 on 2 CPU cores shared with a training run:
# 39 minutes of music rendered in 508 s (4.6x real time, one file at a time), prepared in 13 s,
# 69 MB of FLAC and 101 MB of prepared PCM. So LIMIT=60 (a few hours, enough for vqvae_tiny)
# takes about an hour, and all of ASAP about 20 hours (faster on an idle machine).
set -euo pipefail
cd "$(dirname "$0")/.."

ASAP=${ASAP:-../shared/data/asap}
OUT=${OUT:-data/asap_audio}
RATE=${RATE:-22050}
LIMIT=${LIMIT:-0}

if [ "${SETUP:-1}" = 1 ]; then  # SETUP=0: use the perceiver-music and python already on PATH
    bash scripts/setup.sh >/dev/null
    . .venv/bin/activate
fi

font=/usr/share/sounds/sf3/MuseScore_General.sf3
[ -e "$font" ] || font=/usr/share/sounds/sf2/FluidR3_GM.sf2
echo "soundfont: $font"

# A tree of links to the performances to render (all, or every n-th of metadata.csv), so the
# rendered files keep ASAP's folders and match the MIDI pieces they come from.
links="$OUT/midi"
mkdir -p "$links"
python - "$ASAP" "$links" "$LIMIT" <<'PY'
import csv, os, sys
from pathlib import Path
asap, links, limit = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3])
with open(asap / "metadata.csv", newline="") as f:
    perf = sorted({row["midi_performance"] for row in csv.DictReader(f)})
if limit:
    perf = perf[:: max(1, len(perf) // limit)][:limit]
for rel in perf:
    link = links / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        os.symlink(asap / rel, link)
print(f"{len(perf)} performances to render")
PY

todo="$OUT/todo"
rm -rf "$todo"
mkdir -p "$todo"
(cd "$links" && find . -name '*.mid' | while read -r f; do
    [ -e "../wav/${f%.mid}.flac" ] || { mkdir -p "../todo/$(dirname "$f")"; ln -s "$(readlink -f "$f")" "../todo/$f"; }
done)
start=$(date +%s)
if [ -n "$(find "$todo" -name '*.mid' -print -quit)" ]; then
    perceiver-music render "$todo" --out "$OUT/wav" --format flac --no-png --soundfont "$font" \
        --sample-rate "$RATE" --loudness -20
fi
rm -rf "$todo"
took=$(( $(date +%s) - start ))

perceiver-music prepare "$ASAP" --out "$OUT/asap_midi" --quiet > /dev/null
perceiver-music prepare-audio "$OUT/wav" --out "$OUT/data" --sample-rate "$RATE" --splits-from "$OUT/asap_midi"
seconds=$(python -c "import json,sys; m=json.load(open(sys.argv[1])); print(round(sum(c['seconds'] for c in m['counts'].values())))" "$OUT/data/meta.json")
echo "rendered in ${took} s this run; $(( seconds / 60 )) minutes of audio in $OUT/data"
