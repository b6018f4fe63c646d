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
    prov = result["provenance"]  # the code and environment the committed demo.json came from
    assert len(prov["commit"]) == 40 and isinstance(prov["dirty"], bool) and prov["device"] == "cpu"
    assert isinstance(prov["dirty_code"], bool)  # the same git state as every benchmark part records
    assert set(prov["versions"]) == {"torch", "transformers", "peft"} and prov["finished_utc"] >= prov["started_utc"]


def run_cli(*argv: str, via: str = "module", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (``python -m lalora_curv`` or the installed console script), on
    this checkout's code: PYTHONPATH puts it ahead of whatever checkout the environment installed."""
    command = [sys.executable, "-m", "lalora_curv"] if via == "module" else [str(CONSOLE_SCRIPT)]
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=fresh_environment(env))


def fresh_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without LALORA_DEBUG, with this checkout first on PYTHONPATH."""
    environment = {k: v for k, v in os.environ.items() if k != "LALORA_DEBUG"}
    environment.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})
    return environment


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


def in_fresh_process(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=fresh_environment())


def test_a_missing_curvature_fails_before_the_model_stack_is_imported():
    run = in_fresh_process(
        "import sys; from lalora_curv.cli import main\n"
        f"code = main({MISSING_CURVATURE!r})\n"
        "heavy = ('lalora_curv.experiments.pipeline', 'peft', 'bitsandbytes')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules))")
    assert run.stdout.strip() == "1 []", run.stdout + run.stderr


def test_third_party_import_notices_stay_quiet_without_debug():
    """bitsandbytes logs a warning at import on AVX512-BF16 CPUs (no `kernels` package): one error line stays one."""
    run = in_fresh_process(
        "import logging; from lalora_curv.cli import main\n"
        f"main({MISSING_CURVATURE!r})\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('import-time notice')\n"
        "logging.getLogger('lalora_curv').warning('our own warning')")
    assert run.stderr.strip().splitlines() == [
        "lalora-curv: error: curvature file not found: /nonexistent/curvature.safetensors",
        "lalora_curv: our own warning"]


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


# ------------------------------------------------------------------ fit on an adapter folder and user data
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
FIT_SMALL = ["--structure", "diag", "--proxy-batch-size", "2", "--proxy-seq-len", "64", "--no-progress"]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """The tiny Llama with a tokenizer that has a (minimal) chat template."""
    from lalora_curv.experiments.models import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-chat-model")
    tiny_llama(max_position_embeddings=1024).save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def adapter_dir(chat_model_dir, tmp_path):
    """A trained-looking adapter (random B, so the curvature's A-blocks are not all zero) saved by peft."""
    import torch

    from lalora_curv.experiments.models import add_lora, load_model

    model, _ = load_model(chat_model_dir)
    model = add_lora(model, r=2, alpha=4, target_modules=["q_proj", "v_proj"], seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return path


def expected_curvature(model_dir, adapter, batches):
    """What `fit --adapter --structure diag` must produce on ``batches``, fitted through the API."""
    from peft import PeftModel

    import lalora_curv as lc
    from lalora_curv.experiments.models import load_model

    base, _ = load_model(model_dir)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    curv = lc.fit_curvature(model, batches, structure="diag", kind="empirical", progress=False)
    return curv, lc.LoRAParams.from_model(model)


def test_fit_on_an_adapter_folder_with_jsonl_text_writes_the_curvature_beside_it(chat_model_dir, adapter_dir,
                                                                                  tmp_path, capsys):
    import torch

    import lalora_curv as lc
    from lalora_curv.experiments.batching import lm_batches
    from lalora_curv.experiments.models import tiny_tokenizer

    texts = ["the first document of the user", "a second one, a little longer than the first", "third"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["fit", "--model", str(chat_model_dir), "--adapter", str(adapter_dir), "--data", str(data),
                 *FIT_SMALL]) == 0
    assert (adapter_dir / "lalora_curvature.safetensors").is_file() and "2 batches of" in capsys.readouterr().out
    want, lora = expected_curvature(chat_model_dir, adapter_dir, lm_batches(texts, tiny_tokenizer(), 2, 64))
    got = lc.load_curvature(adapter_dir, lora=lora)
    assert got.structure == "diag" and torch.allclose(got.diagonal(), want.diagonal(), rtol=1e-5, atol=1e-10)
    assert want.diagonal().abs().sum() > 0


def test_fit_on_chat_messages_trains_on_the_assistant_reply(chat_model_dir, adapter_dir, tmp_path):
    import torch

    import lalora_curv as lc
    from lalora_curv.experiments.batching import sft_batches
    from lalora_curv.experiments.models import load_model

    chat = [{"role": "user", "content": "what is 2+3?"}, {"role": "assistant", "content": "2+3 is 5"}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": chat}) + "\n")
    out = tmp_path / "chat.safetensors"
    assert main(["fit", "--model", str(chat_model_dir), "--adapter", str(adapter_dir), "--data", str(data),
                 "--output", str(out), *FIT_SMALL]) == 0
    _, tokenizer = load_model(chat_model_dir)
    prompt = "<user>what is 2+3?\n<assistant>"
    want, lora = expected_curvature(chat_model_dir, adapter_dir,
                                    sft_batches([prompt], ["2+3 is 5\n"], tokenizer, 2, 64, add_eos=False))
    got = lc.load_curvature(out, lora=lora)
    assert torch.allclose(got.diagonal(), want.diagonal(), rtol=1e-5, atol=1e-10)
    assert not (adapter_dir / "lalora_curvature.safetensors").exists()  # --output wins over the adapter folder
    every_token = tmp_path / "all.safetensors"
    assert main(["fit", "--model", str(chat_model_dir), "--adapter", str(adapter_dir), "--data", str(data),
                 "--chat-labels", "all", "--output", str(every_token), *FIT_SMALL]) == 0
    assert not torch.allclose(lc.load_curvature(every_token, lora=lora).diagonal(), want.diagonal())


def test_fit_on_plain_text_paragraphs_with_fresh_lora(chat_model_dir, tmp_path):
    import torch

    import lalora_curv as lc
    from lalora_curv.experiments.batching import lm_batches
    from lalora_curv.experiments.models import add_lora, load_model

    data = tmp_path / "notes.txt"
    data.write_text("one paragraph\nover two lines\n\nanother paragraph\n\n\nand a last one\n")
    out = tmp_path / "c.safetensors"
    assert main(["fit", "--model", str(chat_model_dir), "--data", str(data), "--r", "2", "--max-batches", "1",
                 "--output", str(out), *FIT_SMALL]) == 0
    model, tokenizer = load_model(chat_model_dir)
    model = add_lora(model, r=2, alpha=16, seed=0)
    batches = lm_batches(["one paragraph\nover two lines", "another paragraph"], tokenizer, 2, 64)
    want = lc.fit_curvature(model, batches, structure="diag", kind="empirical", progress=False)
    got = lc.load_curvature(out, lora=lc.LoRAParams.from_model(model))
    assert torch.allclose(got.diagonal(), want.diagonal(), rtol=1e-5, atol=1e-10)
    assert json.loads(Path(str(out) + ".json").read_text())["data"] == f"1 batches of {data}"


@pytest.mark.parametrize("case, message", [
    ("missing", "data file not found: {tmp}/missing.jsonl"),
    ("empty", "data file is empty: {tmp}/empty.jsonl"),
    ("no_text", "{tmp}/no_text.jsonl:2: the object has neither a 'text' string nor 'messages' (keys: prompt)"),
    ("no_adapter_config", "not a peft adapter folder (no adapter_config.json): {tmp}/not_an_adapter"),
    ("no_adapter_folder", "adapter folder not found: {tmp}/nowhere"),
])
def test_fit_data_and_adapter_errors_are_one_line_exit_1(case, message, chat_model_dir, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "no_text.jsonl").write_text('{"text": "fine"}\n{"prompt": "no text here"}\n')
    (tmp_path / "good.jsonl").write_text('{"text": "fine text"}\n')
    (tmp_path / "not_an_adapter").mkdir()
    data = {"missing": "missing.jsonl", "empty": "empty.jsonl", "no_text": "no_text.jsonl"}.get(case, "good.jsonl")
    argv = ["fit", "--model", str(chat_model_dir), "--data", str(tmp_path / data), *FIT_SMALL]
    if case.startswith("no_adapter"):
        argv += ["--adapter", str(tmp_path / ("nowhere" if case == "no_adapter_folder" else "not_an_adapter"))]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lalora-curv: error: {message.format(tmp=tmp_path)}"]


def test_max_batches_without_data_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--max-batches", "2", "--no-progress"])
    assert exit_info.value.code == 2 and "--max-batches applies to --data" in capsys.readouterr().err


def test_a_structure_option_the_structure_does_not_use_is_one_line(tiny_dir, capsys):
    """Options left at their default are not passed (kfac fits without --rank); one given for a
    structure that does not use it is fit_curvature's named error, on one line."""
    assert main(["fit", "--model", str(tiny_dir), "--structure", "kfac", "--rank", "4", *SMALL]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not take ['rank']" in err[0]
