"""``scripts/gpu_suite.sh``: its GPU commands resolve (preset + ``--set`` overrides) without a GPU,
a typo in an override is caught, and its CPU dry run carries a tiny preset end to end through the
same script path (one benchmark only, forgetting's tiny preset, ~20 s: all four together take
~100 s on this CPU, too long for the test command; run `scripts/gpu_suite.sh --dry-run` for all)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(script: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def test_every_gpu_command_resolves():
    proc = _run(SCRIPT, "--check-commands", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = [line for line in proc.stdout.splitlines() if " -m benchmarks." in line]
    resolved = [line for line in proc.stdout.splitlines() if "resolves" in line]
    assert len(commands) == 4 and len(resolved) == 4
    # the GPU presets: full, and for forgetting the main evidence setting (one seed fits the budget)
    for bench, preset in (("approx_accuracy", "full"), ("cost", "full"), ("forgetting", "main"),
                          ("continual", "full")):
        line = next(c for c in commands if f"-m benchmarks.{bench} " in c)
        assert f"--preset {preset} " in line and "--device cuda" in line and f"benchmarks/results/gpu/{bench}" in line


def test_a_bad_override_fails_the_command_check(tmp_path):
    # a copy of the script beside links to the code, with one --set key misspelt
    (tmp_path / "scripts").mkdir()
    bad = tmp_path / "scripts" / "gpu_suite.sh"
    text = SCRIPT.read_text()
    assert "--set steps=32" in text
    bad.write_text(text.replace("--set steps=32", "--set stepz=32"))
    for name in ("benchmarks", "lalora_curv"):
        (tmp_path / name).symlink_to(ROOT / name)
    proc = _run(bad, "--check-commands", timeout=120)
    assert proc.returncode != 0
    assert "stepz" in proc.stdout + proc.stderr


def test_without_cuda_the_gpu_run_refuses(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the real suite would run")
    proc = _run(SCRIPT, str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "out" / "suite.json").exists()


def test_dry_run_carries_a_tiny_preset_end_to_end(tmp_path):
    out = tmp_path / "gpu"
    proc = _run(SCRIPT, "--dry-run", str(out), env={"GPU_SUITE_ONLY": "forgetting"})
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out / "forgetting" / "log.txt").read_text()
    suite = json.loads((out / "suite.json").read_text())
    assert suite["dry_run"] is True and suite["device"] == "cpu"
    assert [(p["benchmark"], p["preset"], p["verdict"]) for p in suite["parts"]] == [("forgetting", "tiny", "ok")]
    result = json.loads((out / "forgetting" / "results.json").read_text())
    assert result["benchmark"] == "forgetting" and result["preset"] == "tiny"
    assert result["machine"]["device"] == "cpu"
