#!/usr/bin/env bash
# Install into ./.venv (see setup_env.sh), lint with ruff (config in pyproject.toml), run the whole test suite.
# A ruff finding fails the command before any test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh bench,integrations,test,docs
.venv/bin/ruff check .
exec .venv/bin/python -m pytest tests "$@"
