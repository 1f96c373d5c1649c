#!/usr/bin/env bash
# Create .venv and install the project with its dev tools. Safe to run again: it only
# reinstalls when pyproject.toml has changed.
set -euo pipefail
cd "$(dirname "$0")/.."

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
    quiet_pip -e ".[dev]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
