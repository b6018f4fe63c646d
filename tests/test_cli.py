"""Every CLI subcommand through the real entry point, on a tiny Llama saved as a local HF directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lalora_curv.cli import main

SMALL = ["--no-progress", "--seed", "0", "--task", "basic_arithmetic"]  # short prompts for a char tokenizer
DATA = ["--n-train", "4", "--batch-size", "2", "--seq-len", "256"]
EVAL = ["--n-mcq", "4", "--n-target-eval", "2", "--n-source-eval", "4", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from lalora_curv.experiments.models import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(max_position_embeddings=1024).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_fit_finetune_eval_round_trip(tiny_dir, tmp_path, capsys):
    curv = tmp_path / "curv.safetensors"
    assert main(["fit", "--model", str(tiny_dir), "--structure", "kfac", "--proxy-batches", "1",
                 "--proxy-batch-size", "2", "--proxy-seq-len", "64", "--output", str(curv), *SMALL]) == 0
    assert curv.is_file() and json.loads(Path(str(curv) + ".json").read_text())["structure"] == "kfac"
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_dir), "--penalty", "lalora", "--curvature", str(curv),
                 "--structure", "kfac", "--lam", "10", "--steps", "2", "--output-dir", str(out), *DATA, *SMALL]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    history = json.loads((out / "finetune_history.json").read_text())["history"]
    assert len(history) == 2 and history[-1]["penalty"] >= 0
    assert main(["eval", "--model", str(tiny_dir), "--adapter", str(out / "adapter"), "--output-dir", str(out),
                 *EVAL, *SMALL]) == 0
    scores = json.loads((out / "eval.json").read_text())["scores"]
    assert {"source_nll", "mcq_accuracy", "target_nll", "target_exact_match"} <= set(scores)
    assert "source NLL" in capsys.readouterr().out


def test_demo_writes_table_plot_and_json(tiny_dir, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_dir), "--steps", "1", "--proxy-batches", "1", "--output-dir", str(out),
                 *DATA, *EVAL, *SMALL]) == 0
    result = json.loads((out / "demo.json").read_text())
    assert list(result["rows"]) == ["base model", "LoRA", f"LaLoRA (kfac, λ={result['lam']:.3g})"]
    assert result["lam"] > 0 and result["lam_source"].startswith("--lam-relative 3 ")
    assert "target_exact_match" not in result["rows"]["LoRA"]  # the demo skips generation unless --exact-match
    assert (out / "demo.png").stat().st_size > 10_000
    assert (out / "demo.md").read_text().startswith("| model |")


def test_demo_refuses_lam_with_lam_relative(tiny_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(tiny_dir), "--lam", "1", "--lam-relative", "1",
                 "--output-dir", str(tmp_path), *SMALL]) == 2
    assert "--lam or --lam-relative" in capsys.readouterr().err


def test_relative_strength_makes_the_penalty_a_multiple_of_the_task_loss():
    """At the adapter it was computed at, the penalty with the relative strength equals relative x task."""
    import torch

    import lalora_curv as lc
    from lalora_curv.cli import relative_strength
    from tests.conftest import make_lm_batch, make_tiny_lm

    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    curv = lc.fit_curvature(model, [make_lm_batch()], structure="kfac", progress=False)
    anchor = lora.snapshot()
    with torch.no_grad():
        for p in lora.params:
            p.add_(0.1 * torch.randn_like(p))
    probe = lc.LaplacePenalty(curv, anchor=anchor, strength=1.0, lora=lora)
    lam = relative_strength(probe, task_loss=0.7, relative=3.0)
    penalty = lc.LaplacePenalty(curv, anchor=anchor, strength=lam, lora=lora)
    assert float(penalty()) == pytest.approx(3.0 * 0.7, rel=1e-6)  # the penalty runs in fp32


def test_bench_runs_a_benchmark_module(tmp_path, monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("benchmarks.fake_for_cli")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "benchmarks.cost", fake)
    assert main(["bench", "cost", "--preset", "small", "--", "--output-dir", str(tmp_path)]) == 0
    assert calls == [["--preset", "small", "--output-dir", str(tmp_path)]]


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--penalty", "lalora"], "needs --curvature"),
    (["eval", "--model", "/nonexistent/model"], "model path does not exist"),
    (["finetune", "--model", "{tiny}", "--curvature", "/nonexistent.safetensors"], "curvature file not found"),
])
def test_errors_are_one_line_without_traceback(argv, message, tiny_dir, capsys):
    argv = [a.replace("{tiny}", str(tiny_dir)) for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lalora-curv: error:") and message in err[0]


def test_incompatible_saved_curvature_is_one_line(tiny_dir, tmp_path, capsys):
    curv = tmp_path / "c.safetensors"
    assert main(["fit", "--model", str(tiny_dir), "--r", "4", "--structure", "diag", "--proxy-batches", "1",
                 "--proxy-batch-size", "2", "--output", str(curv), *SMALL]) == 0
    code = main(["finetune", "--model", str(tiny_dir), "--r", "8", "--curvature", str(curv), "--steps", "1",
                 "--output-dir", str(tmp_path), *DATA, *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "different rank" in err[0]


def test_unknown_structure_and_help_via_console_script():
    exe = Path(sys.executable).parent / "lalora-curv"
    run = subprocess.run([str(exe), "fit", "--structure", "kfack"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "invalid choice: 'kfack'" in run.stderr
    for sub in ("fit", "finetune", "eval", "bench", "demo"):
        run = subprocess.run([str(exe), sub, "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "--" in run.stdout
