#!/usr/bin/env bash
# Run the whole test suite (what README.md and CI call). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m pytest -q "$@"
