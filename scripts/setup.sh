#!/usr/bin/env bash
# Create .venv and install the project with its dev tools. Safe to run again: it only
# reinstalls when pyproject.toml has changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# FluidSynth and a General MIDI soundfont turn MIDI into audio (`render`, and `generate`'s WAV);
# MuseScore's soundfont holds public-domain Steinway D piano samples (recipes/render_asap_audio.sh),
# opus-tools is the Opus codec bench/codec.py compares the audio codec with, and chromium with
# chromium-driver is the headless browser the studio's tests drive.
if ! command -v fluidsynth >/dev/null || [ ! -e /usr/share/sounds/sf2/FluidR3_GM.sf2 ] \
    || [ ! -e /usr/share/sounds/sf3/MuseScore_General.sf3 ] || ! command -v opusenc >/dev/null \
    || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt=(apt-get)
    [ "$(id -u)" = 0 ] || apt=(sudo -n apt-get)
    if command -v apt-get >/dev/null && "${apt[@]}" update -qq >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq --no-install-recommends \
            fluidsynth fluid-soundfont-gm musescore-general-soundfont opus-tools chromium chromium-driver >/dev/null
    else
        echo "setup: could not install FluidSynth; MIDI and piano rolls work, audio (and the studio's tests) need:" >&2
        echo "       sudo apt-get install fluidsynth fluid-soundfont-gm musescore-general-soundfont opus-tools chromium chromium-driver" >&2
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
# pip warns about every package missing from this machine's extra local indexes: noise.
quiet_pip() { .venv/bin/pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if [ ! -f "$stamp" ]; then
    # torch first, pinned: on CPU machines this version comes from a local wheel, and any other
    # version would pull gigabytes of CUDA packages. pyproject's range admits it.
    quiet_pip "torch==2.13.0"
    # --no-warn-conflicts: basic-pitch, once installed, always "conflicts" (its metadata asks for
    # tensorflow, which its ONNX model does not use; see the transcribe extra in pyproject.toml).
    quiet_pip --no-warn-conflicts -e ".[dev,audio,studio,transcribe]"
    quiet_pip --no-deps "basic-pitch==0.4.0"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
