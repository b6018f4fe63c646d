#!/usr/bin/env bash
# The GPU presets of all four benchmarks in one go, sized to fit 12 minutes of one H100/H200.
#
#   scripts/gpu_suite.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results/gpu
#   scripts/gpu_suite.sh --dry-run [OUT_DIR]   # or GPU_SUITE_DRY_RUN=1: the tiny presets on CPU, same path
#   scripts/gpu_suite.sh --check-commands      # print the GPU commands and resolve each preset + --set
#                                              # (unknown keys, bad values) on CPU without running them
#   GPU_SUITE_ONLY="forgetting continual" ...  # run only these parts (any mode)
#
# Uses the interpreter in $PYTHON (default: .venv/bin/python if present, else python) and installs
# nothing. Each benchmark runs under its own `timeout` so one slow part cannot eat the others'
# time; a part that fails or times out is reported and the suite goes on (exit status 1 at the end).
# After each part the suite checks that the result JSON it wrote says device `cuda` (`cpu` in the
# dry run) and writes OUT_DIR/suite.json listing every part, its command, status and seconds.
#
# Time budget (seconds of wall time: 660 for the parts, up to 4 x 15 s for a killed part's
# clean-up, under 12 minutes in all). These are ESTIMATES, not measurements: no GPU run of any
# full preset exists yet. Basis: the committed CPU small results' own wall times (approx 415 s,
# cost 673 s, forgetting 3419 s summed over 40 runs = ~85 s a run, continual 1438 s, all on a
# loaded 2-core CPU) and an assumed 30-100x speed-up of one H100/H200 for SmolLM2-135M's
# fwd+bwd at the full presets' batches (~30 ms a step at 8 x 256 tokens). The full presets are
# cut with --set where their own size would not fit:
#   approx_accuracy full   140 s  (as the preset; the JVP references dominate)
#   cost full              140 s  (warmup 1, repeats 3 instead of 2/5; random-weight 1B/3B shapes)
#   forgetting main        250 s  (seed 0 of 3: the main q,v grid's 16 runs; one CPU thread takes
#                                  ~20 min a run (60 steps of 8 items ~8 min, scoring 1,000 MCQ items,
#                                  400 texts and 400 target items ~11 min), so ~12-25 s a run at the
#                                  assumed speed-up; at its low end the part stops at its budget with
#                                  the finished runs written (results are saved after every run))
#   continual full         130 s  (seed 0 of 3, 32 steps per task instead of 64)
# Model load and CUDA start-up are inside each budget. Re-measure on the first lent GPU and adjust.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN="${GPU_SUITE_DRY_RUN:-0}"
CHECK_ONLY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift
elif [[ "${1:-}" == "--check-commands" ]]; then CHECK_ONLY=1; shift; fi
OUT="${1:-benchmarks/results/gpu}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
mkdir -p "$OUT"

if [[ "$DRY_RUN" == "1" ]]; then
  DEVICE=cpu
  # name | preset | budget s | extra flags
  PARTS=(
    "approx_accuracy|tiny|300|"
    "cost|tiny|300|"
    "forgetting|tiny|300|"
    "continual|tiny|300|"
  )
else
  DEVICE=cuda
  if [[ "$CHECK_ONLY" == "0" ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_suite: no CUDA device visible to $PYTHON (use --dry-run for the CPU check)" >&2
    exit 2
  fi
  PARTS=(
    "approx_accuracy|full|140|"
    "cost|full|140|--set warmup=1 --set repeats=3"
    "forgetting|main|250|--set seeds=[0] --set plain_seeds=[0]"
    "continual|full|130|--set seeds=[0] --set steps=32"
  )
fi

if [[ -n "${GPU_SUITE_ONLY:-}" ]]; then
  selected=()
  for part in "${PARTS[@]}"; do
    for want in $GPU_SUITE_ONLY; do [[ "${part%%|*}" == "$want" ]] && selected+=("$part"); done
  done
  if [[ ${#selected[@]} -eq 0 ]]; then echo "gpu_suite: GPU_SUITE_ONLY=$GPU_SUITE_ONLY names no part" >&2; exit 2; fi
  PARTS=("${selected[@]}")
fi

if [[ "$CHECK_ONLY" == "1" ]]; then
  # Each part's preset with its --set overrides, resolved and turned into the benchmark's config
  # exactly as its __main__ does (harness parser + PresetTable.resolve); nothing runs.
  rc=0
  for part in "${PARTS[@]}"; do
    IFS='|' read -r name preset budget extra <<<"$part"
    echo "gpu_suite: [$name] budget ${budget}s: $PYTHON -m benchmarks.$name --preset $preset --device cuda --output-dir $OUT/$name $extra"
    # shellcheck disable=SC2086
    "$PYTHON" - "$name" "$preset" $extra <<'PY' || rc=1
import importlib, sys
from benchmarks.harness.presets import parse_overrides
name, preset, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
if len(flags) % 2 or any(f != "--set" for f in flags[::2]):
    sys.exit(f"{name}: extra flags must be '--set KEY=VALUE' pairs, got {flags}")
config = importlib.import_module(f"benchmarks.{name}.config")
overrides = parse_overrides(flags[1::2])
settings = config.PRESETS.resolve(preset, overrides)
if hasattr(config, "make_config"):  # forgetting, continual: their typed Config, as their __main__ builds it
    settings = config.make_config(preset, overrides=overrides).to_dict()
print(f"gpu_suite: [{name}] preset {preset!r} with {len(overrides)} override(s) resolves "
      f"({len(settings)} settings; device {settings.get('device', 'from --device')})")
PY
  done
  exit $rc
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
manifest="["
for part in "${PARTS[@]}"; do
  IFS='|' read -r name preset budget extra <<<"$part"
  dir="$OUT/$name"
  mkdir -p "$dir"
  # shellcheck disable=SC2206  # the extra flags are words by design (no spaces inside a value)
  cmd=("$PYTHON" -m "benchmarks.$name" --preset "$preset" --device "$DEVICE" --output-dir "$dir" $extra)
  echo "gpu_suite: [$name] budget ${budget}s: ${cmd[*]}"
  start=$SECONDS
  timeout --signal=TERM --kill-after=15 "$budget" "${cmd[@]}" >"$dir/log.txt" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  verdict=ok
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then verdict="timed out after ${budget}s"; status=1
  elif [[ $rc -ne 0 ]]; then verdict="failed (exit $rc), see $dir/log.txt"; status=1
  elif ! "$PYTHON" - "$dir" "$DEVICE" <<'PY'
import json, sys
from pathlib import Path
folder, want = Path(sys.argv[1]), sys.argv[2]
found = []
for path in sorted(folder.rglob("*.json")):
    payload = json.loads(path.read_text())
    if isinstance(payload, dict) and "benchmark" in payload:
        device = payload.get("device") or (payload.get("machine") or {}).get("device")
        found.append((path, device))
if not found:
    sys.exit(f"no result JSON under {folder}")
wrong = [f"{p}: device {d!r}" for p, d in found if d != want]
if wrong:
    sys.exit("result not on " + want + ": " + "; ".join(wrong))
PY
  then verdict="result JSON missing or not on $DEVICE"; status=1
  fi
  echo "gpu_suite: [$name] $verdict in ${secs}s"
  [[ "$manifest" == "[" ]] || manifest+=","
  manifest+="{\"benchmark\":\"$name\",\"preset\":\"$preset\",\"device\":\"$DEVICE\",\"budget_s\":$budget,\"seconds\":$secs,\"exit\":$rc,\"verdict\":\"$verdict\"}"
done
manifest+="]"
printf '{"suite": "gpu_suite", "dry_run": %s, "device": "%s", "parts": %s}\n' \
  "$([[ $DRY_RUN == 1 ]] && echo true || echo false)" "$DEVICE" "$manifest" >"$OUT/suite.json"
echo "gpu_suite: wrote $OUT/suite.json"
exit $status
