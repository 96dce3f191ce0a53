#!/usr/bin/env bash
# Run the whole test suite (README's test command; CI runs it too). Extra args go to pytest.
# On a fresh checkout it first installs what the tests need (scripts/dev_install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import pytest, hypothesis, openai, llama_cpp, distributed" 2>/dev/null; then
  bash scripts/dev_install.sh
fi
exec .venv/bin/python -m pytest -q "$@"
