#!/usr/bin/env bash
# Install into ./.venv (see setup_env.sh) and run the embedded default main job.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh bench,integrations,test,docs
exec .venv/bin/lalora-curv demo "$@"
