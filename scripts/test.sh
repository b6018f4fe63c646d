#!/usr/bin/env bash
# Install into ./.venv (see setup_env.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh bench,test,docs
exec .venv/bin/python -m pytest tests "$@"
