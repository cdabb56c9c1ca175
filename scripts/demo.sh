#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo on embedded data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
python examples/demo.py "$@"
