#!/usr/bin/env bash
# Install everything, then generate a piece with the bundled model: MIDI, WAV and a piano roll.
#
#   bash scripts/quickstart.sh                      # 45 s of music into out/quickstart
#   bash scripts/quickstart.sh out/mine --seconds 90 --seed 7 --prompt theme.mid
#
# Arguments after the output folder go to `perceiver-music generate` as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-out/quickstart}
shift || true
start=$(date +%s)
.venv/bin/perceiver-music generate --out "$out" --seconds 45 "$@"
echo
echo "Done in $(( $(date +%s) - start )) s. Listen to $out/sample_00.wav, look at $out/sample_00.png,"
echo "open $out/sample_00.mid in any MIDI player or DAW. More: .venv/bin/perceiver-music --help"
