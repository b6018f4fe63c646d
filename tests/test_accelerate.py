"""The accelerate recipe of docs/recipes/distributed.md, run as written: its script is taken from
the page and launched on 2 CPU processes (``accelerate launch --multi_gpu`` + ``Accelerator(cpu=True)``,
gloo), under DDP and under FSDP2."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lalora_curv as lc

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "recipes" / "distributed.md"
SCRIPT_HEADER = "# distributed_recipe.py"
WORLD = 2


def _write_script(directory: Path) -> Path:
    """The page's python block that starts with ``# distributed_recipe.py``, as a file."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    scripts = [b for b in blocks if b.startswith(SCRIPT_HEADER)]
    assert len(scripts) == 1, f"{PAGE} must hold exactly one python block starting with {SCRIPT_HEADER!r}"
    path = directory / "distributed_recipe.py"
    path.write_text(scripts[0])
    return path


def _import(path: Path):
    spec = importlib.util.spec_from_file_location("distributed_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accelerate() -> str:
    exe = Path(sys.executable).parent / "accelerate"  # the environment's own launcher (.venv/bin)
    if not exe.exists():
        pytest.fail(f"accelerate's launcher is not next to {sys.executable}: install the integrations extra")
    return str(exe)


def _trained_adapter(recipe, directory: Path) -> Path:
    """A 'task A' adapter with non-zero B (so every K-FAC block is fitted), saved as peft does."""
    model = recipe.build_model(dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def recipe_setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("recipe")
    script = _write_script(directory)
    recipe = _import(script)
    adapter = _trained_adapter(recipe, directory / "adapter")
    # the single-process reference: one process fitting on all the proxy batches
    model = recipe.build_model(adapter=str(adapter), dtype=torch.float64)
    reference = lc.fit_curvature(model, recipe.proxy_batches(model.config.vocab_size), structure="kfac",
                                 factor_dtype=torch.float64, progress=False)
    return script, adapter, reference


def _launch(script: Path, adapter: Path, out: Path, *extra: str) -> str:
    command = [_accelerate(), "launch", "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "--cpu", "--dtype", "float64",
               "--adapter", str(adapter), "--out", str(out), *extra]
    # this checkout's lalora_curv first; one thread per process (2 processes on a small machine)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize("variant", ["ddp", "fsdp"])
def test_accelerate_recipe_on_two_cpu_processes(recipe_setup, tmp_path, variant):
    script, adapter, reference = recipe_setup
    out = tmp_path / "out"
    stdout = _launch(script, adapter, out, *(["--fsdp"] if variant == "fsdp" else []))
    summary = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    assert summary["world"] == WORLD and summary["penalty"] > 0
    records = [torch.load(out / f"rank{k}.pt") for k in range(WORLD)]  # both ranks ran to the end
    assert [r["world"] for r in records] == [WORLD] * WORLD
    assert sum(r["fit_batches"] for r in records) == len(_import(script).proxy_batches(64))
    dense = reference.to_dense()
    for record in records:
        assert float((record["curvature"] - dense).norm() / dense.norm()) < 1e-9
    saved = lc.load_curvature(out / "curvature.safetensors")
    assert float((saved.to_dense() - dense).norm() / dense.norm()) < 1e-9
    # training ran and kept the ranks in step
    torch.testing.assert_close(records[0]["final"], records[1]["final"], rtol=0, atol=0)
    start = lc.LoRAParams.from_model(_import(script).build_model(adapter=str(adapter), dtype=torch.float64))
    assert not torch.allclose(records[0]["final"], start.flatten().detach())
