#!/usr/bin/env bash
# Set everything up, lint, and run the test suite (slow tests excluded; add `-m slow` for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench scripts recipes
.venv/bin/ruff format --check src tests bench scripts recipes
.venv/bin/python -m pytest "$@"
