#!/usr/bin/env bash
# Set everything up, then prepare a folder of piano MIDI into training data and print its
# summary. Usage: scripts/quickstart.sh [MIDI_DIR [DATA_DIR]]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
midi_dir=${1:-../shared/data/asap}
data_dir=${2:-data/asap}
if [ ! -d "$midi_dir" ]; then
    echo "quickstart: no MIDI folder at $midi_dir; pass one: scripts/quickstart.sh MIDI_DIR" >&2
    exit 2
fi
.venv/bin/perceiver-music prepare "$midi_dir" --out "$data_dir"
echo
echo "Token data is in $data_dir; look at one piece's events with:"
echo "  .venv/bin/perceiver-music tokenize \"$(find "$midi_dir" -name '*.mid' | sort | head -n 1)\" | head -c 600"
