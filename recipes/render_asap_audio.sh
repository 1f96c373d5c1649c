#!/usr/bin/env bash
# Renders the ASAP performances to piano audio through FluidSynth and prepares them for the
# audio codec, with ASAP's own split (by piece folder), so its test pieces stay test:
#
#   bash recipes/render_asap_audio.sh              # every performance: 1067 files, 93.6 h of music
#   LIMIT=60 bash recipes/render_asap_audio.sh     # every n-th performance, 60 of them (~5 h)
#   JOBS=1 ...                                     # one render at a time (default: one a core)
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
# With one render a core (JOBS=2) on an idle 2-core CPU, LIMIT=20 (109 minutes of music) took
# 203 s: 32x real time, so all of ASAP would take about 3 hours.
set -euo pipefail
cd "$(dirname "$0")/.."

ASAP=${ASAP:-../shared/data/asap}
OUT=${OUT:-data/asap_audio}
RATE=${RATE:-22050}
LIMIT=${LIMIT:-0}
JOBS=${JOBS:-$(nproc)}

if [ "${SETUP:-1}" = 1 ]; then  # SETUP=0: use the perceiver-music and python already on PATH
    bash scripts/setup.sh >/dev/null
    . .venv/bin/activate
fi

font=/usr/share/sounds/sf3/MuseScore_General.sf3
[ -e "$font" ] || font=/usr/share/sounds/sf2/FluidR3_GM.sf2
echo "soundfont: $font"

# The split of every performance (ASAP's piece folders, as `prepare` splits them), so a LIMIT
# selection can keep held-out pieces held out.
perceiver-music prepare "$ASAP" --out "$OUT/asap_midi" --quiet > /dev/null

# A tree of links to the performances to render (all, or every n-th of metadata.csv), so the
# rendered files keep ASAP's folders and match the MIDI pieces they come from. Every n-th alone
# can miss a split (LIMIT=20 drew no test piece), so valid and test are each topped up, every
# n-th of their own, to a tenth of LIMIT and at least 2.
links="$OUT/midi"
mkdir -p "$links"
python - "$ASAP" "$links" "$LIMIT" "$OUT/asap_midi/meta.json" <<'PY'
import csv, json, os, sys
from pathlib import Path
asap, links, limit = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3])
split = {p["path"]: p["split"] for p in json.loads(Path(sys.argv[4]).read_text())["pieces"]}
with open(asap / "metadata.csv", newline="") as f:
    perf = sorted({row["midi_performance"] for row in csv.DictReader(f)})
if limit:
    chosen = perf[:: max(1, len(perf) // limit)][:limit]
    for held_out in ("valid", "test"):
        pool = [p for p in perf if split.get(p) == held_out]
        want = max(2, round(limit / 10))
        have = [p for p in chosen if split.get(p) == held_out]
        extra = [p for p in pool[:: max(1, len(pool) // want)] if p not in have]
        chosen += extra[: max(0, want - len(have))]
    perf = sorted(chosen)
for rel in perf:
    link = links / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        os.symlink(asap / rel, link)
counts = {s: sum(split.get(p) == s for p in perf) for s in ("train", "valid", "test")}
print(f"{len(perf)} performances to render ({', '.join(f'{n} {s}' for s, n in counts.items())})")
PY

# What is not rendered yet, dealt round-robin into JOBS trees: FluidSynth renders one file on one
# core, so one render process a core. Each tree keeps ASAP's folders, so all write into one wav/.
todo="$OUT/todo"
rm -rf "$todo"
(cd "$links" && find . -name '*.mid' | sort | while read -r f; do
    [ -e "../wav/${f%.mid}.flac" ] && continue
    n=$(( ${n:--1} + 1 ))
    dest="../todo/$(( n % JOBS ))/$f"
    mkdir -p "$(dirname "$dest")" && ln -s "$(readlink -f "$f")" "$dest"
done)
start=$(date +%s)
pids=()
for tree in "$todo"/*/; do
    [ -d "$tree" ] || continue
    perceiver-music render "$tree" --out "$OUT/wav" --format flac --no-png --soundfont "$font" \
        --sample-rate "$RATE" --loudness -20 --quiet > /dev/null &
    pids+=("$!")
done
for pid in "${pids[@]}"; do wait "$pid"; done
rm -rf "$todo"
took=$(( $(date +%s) - start ))

perceiver-music prepare-audio "$OUT/wav" --out "$OUT/data" --sample-rate "$RATE" --splits-from "$OUT/asap_midi"
seconds=$(python -c "import json,sys; m=json.load(open(sys.argv[1])); print(round(sum(c['seconds'] for c in m['counts'].values())))" "$OUT/data/meta.json")
echo "rendered in ${took} s this run; $(( seconds / 60 )) minutes of audio in $OUT/data"
