"""Every CLI subcommand through the real entry point, on a tiny Llama saved as a local HF directory;
exit codes (0 ok, 1 runtime error, 2 usage error), --version and ``python -m lalora_curv``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lalora_curv
from lalora_curv.cli import CLIError, main

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "lalora-curv"

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


def run_cli(*argv: str, via: str = "module", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (``python -m lalora_curv`` or the installed console script), on
    this checkout's code: PYTHONPATH puts it ahead of whatever checkout the environment installed."""
    command = [sys.executable, "-m", "lalora_curv"] if via == "module" else [str(CONSOLE_SCRIPT)]
    environment = {k: v for k, v in os.environ.items() if k != "LALORA_DEBUG"}
    environment.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=environment)


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--penalty", "lalora"], "--penalty lalora needs --curvature FILE"),
    (["demo", "--lam", "1", "--lam-relative", "1"], "give --lam or --lam-relative, not both"),
])
def test_contradicting_options_are_usage_errors_exit_2(argv, message, capsys):
    """Found before any work, reported like argparse's own errors: the command's usage, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: lalora-curv {argv[0]}" in err and f"lalora-curv {argv[0]}: error: {message}" in err


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
    (["eval", "--model", "/nonexistent/model"], "model path does not exist"),
    (["finetune", "--model", "{tiny}", "--curvature", "/nonexistent.safetensors"], "curvature file not found"),
])
def test_runtime_errors_are_one_line_without_traceback_exit_1(argv, message, tiny_dir, capsys):
    argv = [a.replace("{tiny}", str(tiny_dir)) for a in argv]
    assert main(argv + ["--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lalora-curv: error:") and message in err[0]


def test_incompatible_saved_curvature_is_one_line(tiny_dir, tmp_path, capsys):
    curv = tmp_path / "c.safetensors"
    assert main(["fit", "--model", str(tiny_dir), "--r", "4", "--structure", "diag", "--proxy-batches", "1",
                 "--proxy-batch-size", "2", "--output", str(curv), *SMALL]) == 0
    code = main(["finetune", "--model", str(tiny_dir), "--r", "8", "--curvature", str(curv), "--steps", "1",
                 "--output-dir", str(tmp_path), *DATA, *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "different rank" in err[0]


MISSING_CURVATURE = ["finetune", "--penalty", "l2", "--curvature", "/nonexistent/curvature.safetensors",
                     "--no-progress"]


def test_debug_flag_and_environment_show_the_traceback(monkeypatch, capsys):
    """A runtime error propagates (traceback) with --debug or LALORA_DEBUG=1, and is one line without."""
    monkeypatch.delenv("LALORA_DEBUG", raising=False)
    with pytest.raises(CLIError, match="curvature file not found"):
        main([*MISSING_CURVATURE, "--debug"])
    monkeypatch.setenv("LALORA_DEBUG", "1")
    with pytest.raises(CLIError, match="curvature file not found"):
        main(MISSING_CURVATURE)
    monkeypatch.setenv("LALORA_DEBUG", "0")
    assert main(MISSING_CURVATURE) == 1
    assert capsys.readouterr().err.strip().startswith("lalora-curv: error: curvature file not found")


def test_runtime_error_in_a_fresh_process_exits_1_and_usage_error_2():
    run = run_cli(*MISSING_CURVATURE)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == ["lalora-curv: error: curvature file not found: "
                                               "/nonexistent/curvature.safetensors"]
    run = run_cli(*MISSING_CURVATURE, env={"LALORA_DEBUG": "1"})
    assert run.returncode == 1 and "Traceback" in run.stderr and "CLIError: curvature file not found" in run.stderr
    run = run_cli("fit", "--structure", "kfack")
    assert run.returncode == 2 and "invalid choice: 'kfack'" in run.stderr


@pytest.mark.parametrize("via", ["module", "console_script"])
def test_version_prints_the_package_version(via):
    run = run_cli("--version", via=via)
    assert run.returncode == 0 and run.stdout.strip() == f"lalora-curv {lalora_curv.__version__}"


def test_python_m_lalora_curv_is_the_cli():
    run = run_cli("--help")
    assert run.returncode == 0 and run.stdout.startswith("usage: lalora-curv")
    assert all(command in run.stdout for command in ("fit", "finetune", "eval", "bench", "demo"))


def test_unknown_structure_and_help_via_console_script():
    run = run_cli("fit", "--structure", "kfack", via="console_script")
    assert run.returncode == 2 and "invalid choice: 'kfack'" in run.stderr
    for sub in ("fit", "finetune", "eval", "bench", "demo"):
        run = run_cli(sub, "--help", via="console_script")
        assert run.returncode == 0 and "--" in run.stdout
