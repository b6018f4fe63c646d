"""Pilot for the forgetting benchmark's target task: can plain LoRA learn it, and how fast?

For each candidate task (short numeric answers, see :mod:`lalora_curv.experiments.tasks`): greedy
exact match (EM) of the base model on ``--n-eval`` held-out (eval-split) items, then plain LoRA
(q_proj, v_proj, r=8, alpha=16) trained for ``--steps`` steps of batch 8 on fresh train-split items
(each seen once), in the chat format the benchmark uses, at each ``--lrs`` value; EM again.

Two reference points tell a learned skill from a learned format: ``const_em``, the EM of always
answering the most common training answer, and ``bare_number``, the share of generations that are
a bare integer (the trained format). A task is useful when the base EM is low, the trained EM is
well above ``const_em``, and the skill (not only the format) grows with training.

    python -m benchmarks.forgetting.pilot [--tasks a,b] [--steps N] [--lrs 1e-3,2e-3] [--n-eval N]
                                          [--output-dir DIR] [--name pilot]

Writes ``<output-dir>/<name>.json`` (with provenance) and ``<name>.md`` after every measurement.
"""

from __future__ import annotations

import argparse
import collections
import copy
import re
import statistics
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness.report import provenance_markdown

DEFAULT_TASKS = ("basic_arithmetic", "chain_sum", "products", "leg_counting")
OUTPUT_DIR = Path("benchmarks/results/forgetting/pilot")
LORA = dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"), dropout=0.0, seed=0)
_BARE_INTEGER = re.compile(r"\s*-?\d+\s*")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.forgetting.pilot", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated reasoning-gym tasks")
    p.add_argument("--steps", type=int, default=60, help="LoRA steps (each of batch_size fresh items)")
    p.add_argument("--lrs", default="1e-3", help="comma-separated learning rates")
    p.add_argument("--n-eval", type=int, default=100, help="held-out items scored by greedy exact match")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    p.add_argument("--name", default="pilot", help="stem of the output files")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    if not args.tasks or not args.lrs:
        p.error("--tasks and --lrs need at least one value each")
    if args.steps < 1 or args.n_eval < 1:
        p.error("--steps and --n-eval must be positive")
    return args


def score(model, tokenizer, items: list[dict], max_new_tokens: int) -> dict:
    """Greedy exact match of ``model`` on ``items`` (chat prompts), timed, with a few samples."""
    from lalora_curv.experiments import evaluation as E
    from lalora_curv.experiments.data import format_prompt

    start = time.perf_counter()
    prompts = [format_prompt(tokenizer, it["prompt"]) for it in items]
    gens = E.greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=32)
    hits = [E.numbers_match(E.extract_answer_number(g), it["answer"]) for g, it in zip(gens, items)]
    return {"em": sum(hits) / len(items), "n": len(items), "bare_number": sum(map(bool, map(_BARE_INTEGER.fullmatch,
            gens))) / len(items), "eval_seconds": time.perf_counter() - start,
            "samples": [{"question": it["prompt"][-90:], "answer": it["answer"], "generated": g}
                        for it, g in zip(items[:4], gens[:4])]}


def run_task(task: str, base, tokenizer, args, out: dict, save) -> None:
    """Base EM, then one plain-LoRA run per learning rate, on ``task``, filled into ``out``;
    ``save()`` after each (a long run killed midway keeps what it measured)."""
    from lalora_curv.experiments.batching import num_label_tokens, reasoning_sft_batches
    from lalora_curv.experiments.data import default_task_config, format_prompt, reasoning_items
    from lalora_curv.experiments.models import add_lora
    from lalora_curv.training import finetune

    n_train = args.steps * args.batch_size
    train = reasoning_items(task, "train", n_train, seed=0)
    evals = reasoning_items(task, "eval", args.n_eval, seed=0)
    batches = reasoning_sft_batches(train, tokenizer, batch_size=args.batch_size, seq_len=args.seq_len,
                                    pad_to_longest=True)
    common, _ = collections.Counter(it["answer"] for it in train).most_common(1)[0]
    prompt_tokens = [len(tokenizer(format_prompt(tokenizer, it["prompt"]))["input_ids"]) for it in evals]
    out.update({"task": task, "config": default_task_config(task), "n_train": n_train, "n_eval": len(evals),
                "prompt_tokens_mean": statistics.fmean(prompt_tokens),
                "label_tokens_per_item": num_label_tokens(batches) / n_train,  # answer tokens + eos
                "const_answer": common, "const_em": sum(it["answer"] == common for it in evals) / len(evals),
                "lora": {}})
    print(f"[{task}] {n_train} train items, {len(evals)} eval items, "
          f"{out['label_tokens_per_item']:.2f} label tokens/item; scoring the base model", flush=True)
    out["base"] = score(base, tokenizer, evals, args.max_new_tokens)
    print(f"[{task}] base EM {out['base']['em']:.3f} ({out['base']['eval_seconds']:.0f} s)", flush=True)
    save()
    for lr in args.lrs:
        model = add_lora(copy.deepcopy(base), **LORA)
        res = finetune(model, batches, steps=args.steps, lr=lr, seed=0, max_grad_norm=1.0, progress=False)
        losses = [h["task_loss"] for h in res.history]
        run = {"steps": args.steps, "train_seconds": res.seconds, "loss_first": losses[0],
               "loss_last5": statistics.fmean(losses[-5:])}
        run.update(score(model, tokenizer, evals, args.max_new_tokens))
        out["lora"][f"{lr:g}"] = run
        print(f"[{task}] lr {lr:g}: EM {run['em']:.3f}, loss {run['loss_first']:.3f} -> {run['loss_last5']:.3f}, "
              f"train {run['train_seconds']:.0f} s, eval {run['eval_seconds']:.0f} s", flush=True)
        del model
        save()


def markdown(payload: dict) -> str:
    rows = []
    for t in payload["tasks"].values():
        if "base" in t and not t["lora"]:
            rows.append([t["task"], t["base"]["em"], t["const_em"]] + ["-"] * 9)
        for lr, run in t["lora"].items():
            rows.append([t["task"], t["base"]["em"], t["const_em"], lr, run["em"], run["bare_number"],
                         f"{run['loss_first']:.2f} -> {run['loss_last5']:.2f}", run["steps"],
                         f"{run['train_seconds']:.0f}", f"{run['eval_seconds']:.0f}", t["label_tokens_per_item"],
                         f"{t['prompt_tokens_mean']:.0f}"])
    a = payload["args"]
    head = (f"# Forgetting target-task pilot ({payload['model']})\n\nPlain LoRA (q_proj, v_proj, r=8, alpha=16), "
            f"batch {a['batch_size']}, each train item seen once, chat format; greedy exact match on "
            f"{a['n_eval']} held-out items, max_new_tokens={a['max_new_tokens']}; {payload['threads']} CPU thread(s). "
            "const EM: always the most common training answer; bare: share of generations that are a bare "
            "integer.\n\n")
    table = harness.markdown_table(["task", "base EM", "const EM", "lr", "LoRA EM", "bare", "loss", "steps",
                                    "train s", "eval s", "label tok/item", "prompt tok"], rows)
    return head + table + "\n" + provenance_markdown(payload["provenance"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    provenance = harness.Provenance(preset="pilot", device="cpu")
    base, tokenizer = harness.load_base_model(args.model, device=torch.device("cpu"), dtype="float32")
    payload = {"benchmark": "forgetting_pilot", "preset": "pilot", "model": harness.model_label(args.model),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "lora": LORA, "threads": torch.get_num_threads(), "machine": harness.machine_info("cpu"), "tasks": {}}
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        payload["provenance"] = [provenance.record()]
        harness.write_json(args.output_dir / f"{args.name}.json", payload)
        (args.output_dir / f"{args.name}.md").write_text(markdown(payload))

    for task in args.tasks:
        run_task(task, base, tokenizer, args, payload["tasks"].setdefault(task, {}), save)
    return payload


if __name__ == "__main__":
    main()
