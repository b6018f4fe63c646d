"""``lalora-curv``: fit, finetune, eval, bench and demo from the command line.

Exit codes: 0 success; 2 a usage error (argparse's own, and options that contradict each other),
printed with the command's usage; 1 a runtime error (a missing file, a model that does not load,
a curvature that does not fit the adapter, ...), printed as one line ``lalora-curv: error: ...``
without a traceback unless ``--debug`` or ``LALORA_DEBUG=1``; 130 interrupted.
Also runs as ``python -m lalora_curv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .curvature.registry import STRUCTURES

if TYPE_CHECKING:
    from .experiments.pipeline import RunConfig

__all__ = ["main", "build_parser"]

STRUCTURE_CHOICES = STRUCTURES  # the one list, curvature/registry.py


class CLIError(Exception):
    """A runtime error worth one line to the user (exit code 1)."""


#: exit codes of :func:`main`
EXIT_RUNTIME_ERROR = 1
EXIT_INTERRUPTED = 130
#: environment variable that, set to 1, shows tracebacks like ``--debug``
DEBUG_ENV = "LALORA_DEBUG"


# ----------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    p.add_argument("--task", default="gsm_symbolic", help="reasoning-gym target task (default gsm_symbolic; "
                                                          "basic_arithmetic is a simpler one)")
    if model:
        p.add_argument("--model", default=None, metavar="PATH_OR_DIR",
                       help="local HF causal-LM directory or .gguf file (default: packaged SmolLM2-135M-Instruct, "
                            "a dequantized Q4_1 GGUF)")
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where results go (default: outputs/)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is faster on a machine shared with other jobs)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"],
                   help="LoRA target modules, or all-linear (default: q_proj v_proj)")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=24, help="optimizer steps (default 24)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-train", type=int, default=96, help="target training items (default 96)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-mcq", type=int, default=48, help="WordNet MCQ eval items")
    p.add_argument("--n-target-eval", type=int, default=24, help="held-out gsm_symbolic items")
    p.add_argument("--n-source-eval", type=int, default=32, help="held-out source texts")
    p.add_argument("--max-new-tokens", type=int, default=96, help="greedy generation budget for exact match")
    p.add_argument("--no-exact-match", action="store_true", help="skip greedy generation (NLL metrics only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lalora-curv",
        description="Curvature (GGN/Fisher) over LoRA parameters and Laplace penalties against forgetting (LaLoRA).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("fit", help="fit a curvature on proxy source data or your own data and save it (safetensors)",
                       description="Fit the curvature of the source loss w.r.t. LoRA parameters and save it. "
                                   "LoRA: fresh (--r/--alpha/--targets) or an existing adapter folder (--adapter, "
                                   "the curvature is then written beside it). Data: proxy source text, or your own "
                                   "file (--data).")
    _common(p)
    _lora_args(p)
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                   help="existing peft adapter folder (with adapter_config.json) for --model's base; the curvature "
                        "is written beside it as lalora_curvature.safetensors unless --output is given; "
                        "--r/--alpha/--targets are then ignored")
    p.add_argument("--data", type=Path, default=None, metavar="FILE",
                   help="your data instead of proxy text: .jsonl/.ndjson/.json with one object per line holding "
                        "'text' (all tokens are targets) or chat 'messages' [{role, content}, ...] rendered with the "
                        "tokenizer's chat template (see --chat-labels); any other suffix is plain text, one "
                        "document per blank-line-separated paragraph (all tokens are targets)")
    p.add_argument("--chat-labels", default="assistant", choices=("assistant", "all"),
                   help="for chat 'messages': assistant = the loss is on the last assistant message of each "
                        "conversation (earlier turns are context; the default), all = on every token")
    p.add_argument("--max-batches", type=int, default=None,
                   help="with --data: use at most this many batches (default: the whole file)")
    p.add_argument("--structure", default="kfac", choices=STRUCTURE_CHOICES)
    p.add_argument("--kind", default="empirical", choices=("ggn", "mc", "empirical"))
    # structure options default to None = not passed: fit_curvature refuses an option its structure or
    # kind does not use (e.g. --rank for kfac), so only what the user asked for goes through
    p.add_argument("--terms", default=None, choices=("sequence", "token"),
                   help="dense/diag/lowrank/diag_lowrank: curvature terms (library default: sequence)")
    p.add_argument("--rank", type=int, default=None, help="lowrank / diag_lowrank: rank (library default 16)")
    p.add_argument("--mc-samples", type=int, default=None, help="--kind mc: samples per term (library default 1)")
    p.add_argument("--proxy-source", default="mix", choices=("wordnet", "pydoc", "mix"))
    p.add_argument("--proxy-batches", type=int, default=2, help="number of proxy batches (the paper: 1-2 suffice)")
    p.add_argument("--proxy-batch-size", type=int, default=8, help="sequences per batch (proxy text or --data)")
    p.add_argument("--proxy-seq-len", type=int, default=128,
                   help="tokens per sequence, longer ones are cut (proxy text or --data)")
    p.add_argument("--output", type=Path, default=None,
                   help="curvature file (default: beside --adapter, else OUTPUT_DIR/curvature.safetensors)")

    p = sub.add_parser("finetune", help="LoRA fine-tuning on gsm_symbolic with a penalty; saves the adapter",
                       description="Fine-tune LoRA on gsm_symbolic with --penalty none|l2|lalora.")
    _common(p)
    _lora_args(p)
    _train_args(p)
    p.add_argument("--penalty", default="lalora", choices=("none", "l2", "lalora"))
    p.add_argument("--curvature", type=Path, default=None, help="saved curvature (for --penalty lalora)")
    p.add_argument("--structure", default=None, choices=STRUCTURE_CHOICES,
                   help="expected structure of --curvature (checked)")
    p.add_argument("--lam", type=float, default=1000.0, help="penalty strength lambda")
    p.add_argument("--prior-precision", type=float, default=0.0,
                   help="isotropic precision added to the curvature (anchors zero-curvature directions)")

    p = sub.add_parser("eval", help="source and target scores of the base model or a saved adapter",
                       description="Evaluate source (WordNet MCQ, held-out text NLL) and target (gsm_symbolic) scores.")
    _common(p)
    _eval_args(p)
    p.add_argument("--adapter", type=Path, default=None, help="adapter directory saved by `finetune`")

    p = sub.add_parser("bench", help="run a benchmark preset (from a repository checkout)",
                       description="Run benchmarks/<name>.py with a preset; extra arguments are passed on.")
    p.add_argument("name", choices=("approx_accuracy", "cost", "forgetting", "continual"))
    p.add_argument("--preset", default="small")
    p.add_argument("--debug", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")

    p = sub.add_parser("demo", help="the embedded default job: base vs LoRA vs LaLoRA(K-FAC) on SmolLM2, table + plot",
                       description="Offline on SmolLM2-135M: fit K-FAC curvature on proxy source text, fine-tune "
                                   "plain LoRA and LaLoRA for the same short budget on gsm_symbolic, print a "
                                   "before/after table and write a plot.")
    _common(p)
    _lora_args(p)
    _train_args(p)
    _eval_args(p)
    p.add_argument("--structure", default="kfac", choices=STRUCTURE_CHOICES)
    p.add_argument("--lam", type=float, default=None,
                   help="absolute LaLoRA strength (default: set relative to plain LoRA's run, see --lam-relative)")
    p.add_argument("--lam-relative", type=float, default=None,
                   help=f"strength as a multiple of 2*task_loss/q, where q = d^T P d of plain LoRA's displacement d: "
                        f"1 = plain LoRA's solution would pay a penalty equal to its task loss (default "
                        f"{DEMO_LAM_RELATIVE:g}); works for any --structure and --model")
    p.add_argument("--prior-precision", type=float, default=None)
    p.add_argument("--proxy-batches", type=int, default=2)
    p.add_argument("--exact-match", dest="no_exact_match", action="store_false",
                   help="also score greedy exact match (slow on CPU; a 135M model scores ~0-5%% on gsm_symbolic)")
    # the demo's budget: 2 sequences per step keep both fine-tunes and 3 evaluations under 10 min on 2 CPU cores
    p.set_defaults(batch_size=2, no_exact_match=True)
    for command_parser in sub.choices.values():
        # the subcommand's own parser, so that usage errors found after parsing print its usage
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def usage_problem(args: argparse.Namespace) -> str | None:
    """Options that parse but contradict each other: a usage error (exit 2), found before any work."""
    if args.command == "finetune" and args.penalty == "lalora" and args.curvature is None:
        return "--penalty lalora needs --curvature FILE (create one with `lalora-curv fit`)"
    if args.command == "fit" and args.max_batches is not None and args.max_batches < 1:
        return f"--max-batches must be at least 1, got {args.max_batches}"
    if args.command == "fit" and args.max_batches is not None and args.data is None:
        return "--max-batches applies to --data (proxy text has --proxy-batches)"
    if args.command == "demo" and args.lam is not None and args.lam_relative is not None:
        return "give --lam or --lam-relative, not both"
    return None


# ----------------------------------------------------------------------------------------- helpers
def _config(args) -> RunConfig:
    from .experiments.pipeline import RunConfig

    cfg = RunConfig(model=getattr(args, "model", None), device=args.device, dtype=getattr(args, "dtype", "float32"),
                    seed=args.seed, target_task=args.task)
    for name, attr in (("r", "lora_r"), ("alpha", "lora_alpha"), ("steps", "steps"), ("lr", "lr"),
                       ("batch_size", "train_batch_size"), ("seq_len", "train_seq_len"), ("n_train", "n_train"),
                       ("n_mcq", "n_mcq"), ("n_target_eval", "n_target_eval"), ("n_source_eval", "n_source_eval"),
                       ("max_new_tokens", "max_new_tokens"), ("proxy_source", "proxy_source"),
                       ("proxy_batches", "proxy_batches"), ("proxy_batch_size", "proxy_batch_size"),
                       ("proxy_seq_len", "proxy_seq_len")):
        if hasattr(args, name):
            setattr(cfg, attr, getattr(args, name))
    if hasattr(args, "targets"):
        cfg.targets = tuple(args.targets)
    if getattr(args, "no_exact_match", False):
        cfg.exact_match = False
    return cfg


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def _print_table(rows: dict[str, dict[str, float]]) -> str:
    from .experiments.pipeline import METRICS

    keys = [k for k in METRICS if any(k in r for r in rows.values())]
    header = "| model | " + " | ".join(METRICS[k][0] + (" ↑" if METRICS[k][1] else " ↓") for k in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 1)]
    for name, r in rows.items():
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("" if v is None else (f"{100 * v:.1f} %" if METRICS[k][1] else f"{v:.4f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    return table


# ----------------------------------------------------------------------------------------- commands
def _adapter_dir(path: Path) -> Path:
    """An existing peft adapter folder, or a one-line error naming what is missing."""
    if not path.is_dir():
        raise CLIError(f"adapter folder not found: {path}")
    if not (path / "adapter_config.json").is_file():
        raise CLIError(f"not a peft adapter folder (no adapter_config.json): {path}")
    return path


def _fit_batches(args, tokenizer, cfg: RunConfig) -> list:
    """The batches of ``fit``: the user's ``--data`` file, else the proxy source text."""
    from .experiments.pipeline import proxy_batches
    from .experiments.userdata import UserDataError, read_user_data, user_data_batches

    if args.data is None:
        return proxy_batches(tokenizer, cfg)
    try:
        data = read_user_data(args.data)
        batches = user_data_batches(data, tokenizer, batch_size=args.proxy_batch_size, seq_len=args.proxy_seq_len,
                                    chat_labels=args.chat_labels)
    except UserDataError as err:
        raise CLIError(str(err)) from None
    return batches[:args.max_batches] if args.max_batches else batches


def cmd_fit(args) -> int:
    import lalora_curv as lc

    from .experiments.pipeline import Stopwatch, attach_lora, load_adapter, load_base_model

    cfg = _config(args)
    adapter = _adapter_dir(args.adapter) if args.adapter is not None else None
    model, tok = load_base_model(cfg)
    batches = _fit_batches(args, tok, cfg)  # before the adapter: a bad data file fails fast
    model = load_adapter(model, adapter) if adapter is not None else attach_lora(model, cfg)
    clock = Stopwatch()
    options = {name: value for name, value in (("terms", args.terms), ("rank", args.rank),
                                                ("mc_samples", args.mc_samples)) if value is not None}
    curv = lc.fit_curvature(model, batches, structure=args.structure, kind=args.kind, seed=args.seed,
                            progress=not args.no_progress, **options)
    seconds = clock()
    source = f"{len(batches)} batches of {args.data}" if args.data is not None else f"{args.proxy_source} proxy text"
    if adapter is not None and args.output is None:
        out = curv.save_pretrained(adapter)  # metadata in the safetensors header, no sidecar
    else:
        out = args.output or args.output_dir / "curvature.safetensors"
        curv.save(out)
        lora_cfg = ({"adapter": str(adapter)} if adapter is not None
                    else {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(cfg.targets)})
        _write_json(Path(str(out) + ".json"), {"structure": curv.structure, "kind": curv.kind,
                                               "num_params": curv.num_params, "data": source,
                                               "nbytes": curv.nbytes, "seconds": seconds, "lora": lora_cfg,
                                               "config": cfg.to_json(), "info": curv.info})
    print(f"saved {curv.structure}/{curv.kind} curvature over {curv.num_params} parameters from {source} "
          f"({curv.nbytes / 1e6:.1f} MB, {seconds:.1f} s) to {out}")
    return 0


def cmd_finetune(args) -> int:
    # checked before the model stack is imported: a wrong path fails in a second, not after a model load
    if args.curvature is not None and not args.curvature.is_file():
        raise CLIError(f"curvature file not found: {args.curvature}")
    import lalora_curv as lc

    from .experiments.pipeline import attach_lora, build_penalty, load_base_model, save_adapter, train_batches
    from .training import finetune

    cfg = _config(args)
    model, tok = load_base_model(cfg)
    model = attach_lora(model, cfg)
    curv = None
    if args.curvature is not None:
        curv = lc.load_curvature(args.curvature, lora=lc.LoRAParams.from_model(model), structure=args.structure,
                                 device=args.device)
    penalty = build_penalty(args.penalty, model, curvature=curv, strength=args.lam,
                            prior_precision=args.prior_precision)
    result = finetune(model, train_batches(tok, cfg), penalty=penalty, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed,
                      progress=not args.no_progress)
    out = save_adapter(model, args.output_dir / "adapter", {"penalty": args.penalty, "lam": args.lam,
                                                            "curvature": str(args.curvature), "config": cfg.to_json()})
    _write_json(args.output_dir / "finetune_history.json", {"history": result.history, "seconds": result.seconds})
    last = result.history[-1] if result.history else {}
    print(f"trained {cfg.steps} steps in {result.seconds:.1f} s "
          f"(final task loss {last.get('task_loss', float('nan')):.4f}, "
          f"penalty {last.get('penalty', 0.0):.4f}); adapter saved to {out}")
    return 0


def cmd_eval(args) -> int:
    from .experiments.pipeline import evaluate, load_adapter, load_base_model, make_data

    cfg = _config(args)
    model, tok = load_base_model(cfg)
    if args.adapter is not None:
        if not args.adapter.is_dir():
            raise CLIError(f"adapter directory not found: {args.adapter}")
        model = load_adapter(model, args.adapter)
    data = make_data(tok, cfg, train=False)
    scores = evaluate(model, tok, data, cfg, progress=not args.no_progress)
    name = str(args.adapter) if args.adapter else "base model"
    _print_table({name: scores})
    _write_json(args.output_dir / "eval.json", {"model": name, "scores": scores, "config": cfg.to_json()})
    return 0


def cmd_bench(args) -> int:
    import importlib

    try:
        module = importlib.import_module(f"benchmarks.{args.name}")
    except ModuleNotFoundError as err:
        raise CLIError(f"benchmarks.{args.name} not importable ({err}); run `lalora-curv bench` from the repository "
                       "checkout, where benchmarks/ lives") from None
    # argparse's REMAINDER also swallows options given after NAME (e.g. --preset): pass them on as given
    rest = [a for a in args.rest if a != "--"]
    argv = rest if "--preset" in rest else ["--preset", args.preset] + rest
    return int(module.main(argv) or 0)


#: default LaLoRA strength of the demo, relative to plain LoRA's run (``--lam-relative``), and the
#: isotropic prior that anchors the A-blocks, which K-FAC fitted at B = 0 leaves at zero curvature
DEMO_LAM_RELATIVE = 3.0  # the forgetting benchmark's best kfac point on q,v (small preset)
DEMO_PRIOR_PRECISION = 1e-3


def relative_strength(penalty, task_loss: float, relative: float) -> float:
    """``relative * 2 * task_loss / q`` with ``q = penalty.quadratic()`` at the current (trained)
    adapter: the strength at which that adapter would pay ``relative`` times ``task_loss``."""
    import torch

    with torch.no_grad():
        q = float(penalty.quadratic())
    if not q > 0:
        raise CLIError(f"cannot set a relative strength: the trained adapter's quadratic form is {q} "
                       "(did plain LoRA move at all?); pass --lam")
    return relative * 2.0 * task_loss / q


def cmd_demo(args) -> int:
    import datetime

    import lalora_curv as lc

    from .experiments.pipeline import (
        Stopwatch,
        attach_lora,
        build_penalty,
        evaluate,
        load_base_model,
        make_data,
        run_record,
    )
    from .training import finetune

    clock = Stopwatch()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    cfg = _config(args)
    lam_relative = DEMO_LAM_RELATIVE if args.lam_relative is None else args.lam_relative
    prior = DEMO_PRIOR_PRECISION if args.prior_precision is None else args.prior_precision
    progress = not args.no_progress
    print(f"[demo] loading {'SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)' if cfg.model is None else cfg.model}")
    model, tok = load_base_model(cfg)
    model = attach_lora(model, cfg)
    lora = lc.LoRAParams.from_model(model)
    init = lora.snapshot()
    data = make_data(tok, cfg)
    print(f"[demo] {len(data.train_batches)} target batches, {len(data.proxy_batches)} proxy source batches, "
          f"LoRA r={cfg.lora_r} on {', '.join(cfg.targets)} ({lora.numel} parameters)")
    rows: dict[str, dict[str, float]] = {}
    with model.disable_adapter():
        rows["base model"] = evaluate(model, tok, data, cfg, progress=progress)
    curv = lc.fit_curvature(model, data.proxy_batches, structure=args.structure, kind="empirical", progress=progress)
    curv.save(args.output_dir / "curvature.safetensors")
    histories = {}
    lam, lam_source = args.lam, "--lam"
    for kind in ("none", "lalora"):
        lora.assign(init)  # both runs start from the same adapter
        if kind == "none":
            name, penalty = "LoRA", None
        else:
            name = f"LaLoRA ({args.structure}, λ={lam:.3g})"
            penalty = build_penalty(kind, model, curvature=curv, strength=lam, prior_precision=prior, anchor=init)
        print(f"[demo] fine-tuning {name}: {cfg.steps} steps of {cfg.train_batch_size} sequences, lr {cfg.lr:g}")
        result = finetune(model, data.train_batches, penalty=penalty, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed,
                          progress=progress)
        histories[name] = result.history
        rows[name] = evaluate(model, tok, data, cfg, progress=progress)
        if kind == "none" and lam is None:
            # at plain LoRA's solution: the strength at which it would pay lam_relative x its task loss
            task = sum(h["task_loss"] for h in result.history[-5:]) / len(result.history[-5:])
            probe = build_penalty("lalora", model, curvature=curv, strength=1.0, anchor=init)
            lam = relative_strength(probe, task, lam_relative)
            lam_source = f"--lam-relative {lam_relative:g} (2 x task loss {task:.3f} / q at plain LoRA's solution)"
            print(f"[demo] LaLoRA strength λ = {lam:.3g} from {lam_source}")
    print()
    table = _print_table(rows)
    out = args.output_dir
    _write_json(out / "demo.json", {"rows": rows, "histories": histories, "config": cfg.to_json(), "lam": lam,
                                    "lam_source": lam_source,
                                    "prior_precision": prior, "structure": args.structure,
                                    "curvature_nbytes": curv.nbytes, "seconds": clock(),
                                    "model_note": "SmolLM2-135M-Instruct dequantized from Q4_1 GGUF"
                                    if cfg.model is None else cfg.model,
                                    "provenance": run_record(started, str(next(model.parameters()).device))})
    (out / "demo.md").write_text(table + "\n")
    png = _demo_plot(rows, out / "demo.png")
    print(f"\n[demo] done in {clock():.0f} s; wrote {out / 'demo.json'}, {out / 'demo.md'}, {png}")
    return 0


def _demo_plot(rows: dict[str, dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for name, r in rows.items():
        ax.scatter(r["target_nll"], r["mcq_nll"], s=70, label=name)
        ax.annotate(name, (r["target_nll"], r["mcq_nll"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("target NLL, held-out gsm_symbolic templates (lower = learned)")
    # the correct-word NLL of the WordNet MCQ moves more than held-out text NLL in a short budget
    ax.set_ylabel("source: WordNet MCQ NLL of the correct word\n(lower = remembered)")
    ax.set_title("learning vs forgetting")
    ax.grid(alpha=0.3)
    ax = axes[1]
    keys = [k for k in ("mcq_accuracy", "target_exact_match") if all(k in r for r in rows.values())]
    width = 0.8 / max(1, len(rows))
    for i, (name, r) in enumerate(rows.items()):
        ax.bar([j + i * width for j in range(len(keys))], [100 * r[k] for k in keys], width, label=name)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(keys))])
    names = {"mcq_accuracy": "WordNet MCQ accuracy\n(source)",
             "target_exact_match": "gsm_symbolic exact match\n(target)"}
    ax.set_xticklabels([names[k] for k in keys])
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.set_title("accuracies")
    fig.suptitle("SmolLM2-135M-Instruct (dequantized Q4_1): base vs LoRA vs LaLoRA", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COMMANDS = {"fit": cmd_fit, "finetune": cmd_finetune, "eval": cmd_eval, "bench": cmd_bench, "demo": cmd_demo}


def debug_requested(args: argparse.Namespace) -> bool:
    """``--debug`` or ``LALORA_DEBUG=1``: tracebacks and library logs instead of one-line errors."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def error_line(err: BaseException) -> str:
    """One line naming the problem: the message's first line, after the exception type unless it is
    our own :class:`CLIError` (whose messages are written for this line)."""
    text = str(err).strip()
    message = text.splitlines()[0] if text else ""
    if isinstance(err, CLIError):
        return message or "failed"
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


#: third-party loggers kept at ERROR unless --debug / LALORA_DEBUG=1
QUIET_LOGGERS = ("bitsandbytes",)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (usage errors raise ``SystemExit(2)`` as argparse does)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = usage_problem(args)
    if problem is not None:
        args.command_parser.error(problem)  # prints the command's usage and exits 2
    debug = debug_requested(args)
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if not debug:
            import warnings

            warnings.filterwarnings("ignore")
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            # import-time notices of optional dependencies (bitsandbytes logs a missing `kernels` hub
            # package on AVX512-BF16 CPUs) are not the user's problem here; --debug shows them
            for name in QUIET_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
        if getattr(args, "no_progress", False):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("lalora-curv: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # one clear line unless --debug / LALORA_DEBUG=1
        if debug:
            raise
        print(f"lalora-curv: error: {error_line(err)}", file=sys.stderr)
        return EXIT_RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
