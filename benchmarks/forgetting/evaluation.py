"""Scores of a model on the target task and the source evaluations, and the cached base-model scores."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.forgetting.config import Config
from benchmarks.forgetting.data import Data
from benchmarks.harness import (
    write_json,
)

# ============================================================================================
# Evaluation
# ============================================================================================

#: evaluation sets that do not depend on the target task (a base model's scores on them can be reused)
SOURCE_SETS = ("src_text_wordnet", "src_text_pydoc", "proxy_text", "src_mcq", "proxy_mcq")


def evaluate(model, tokenizer, cfg: Config, data: Data, *, generate: bool, progress: bool = False,
             known: dict | None = None) -> dict:
    """All scores of ``model``: a flat dict of metrics (``None`` where not measured; lower NLL is
    better), each on the whole set and on its ``_val`` / ``_test`` half, ``n_items`` per set, and
    under ``"items"`` the per-item scores they come from (see :mod:`benchmarks.forgetting.items`).

    ``src_text_nll`` = mean of the WordNet and pydoc held-out NLLs (each a token mean), so both
    sources weigh the same; ``proxy_text_nll`` = NLL on the curvature's own proxy batches.
    ``known``: per-item scores of source sets already computed for this very model and data (the
    base model's, cached); those sets are not scored again.
    """
    from benchmarks.forgetting.items import metrics_from_scores, rounded
    from lalora_curv.experiments import evaluation as E
    from lalora_curv.experiments.data import format_prompt

    t0 = time.perf_counter()
    scores: dict[str, dict] = {}

    def text_set(rows):
        return {"nll_sum": [s for s, _ in rows], "tokens": [c for _, c in rows]}

    def rows_of(batches):  # per-row scores in the original order, computed in length order
        batches, order = length_sorted(batches, cfg.eval_batch_size)
        return unsort(E.row_scores(model, batches), order)

    known = {k: v for k, v in (known or {}).items() if k in SOURCE_SETS}
    scores.update(known)
    for kind, batches in data.text_eval.items():
        if f"src_text_{kind}" not in known:
            scores[f"src_text_{kind}"] = text_set([(s, c) for s, c, _ in rows_of(batches)])
    if "proxy_text" not in known:
        scores["proxy_text"] = text_set(E.row_nll_sums(model, data.proxy[(cfg.proxy_kind, cfg.proxy_batches)]))
    for name, items in (("src_mcq", data.mcq_eval), ("proxy_mcq", data.mcq_proxy)):
        if name in known:
            continue
        if cfg.mcq_impl == "fast":
            from benchmarks.forgetting.mcq import fast_mcq_scores

            s = fast_mcq_scores(model, tokenizer, items, batch_size=cfg.eval_batch_size)
        else:
            s = E.mcq_scores(model, tokenizer, items, batch_size=cfg.eval_batch_size)
        scores[name] = s["item_scores"]
    t1 = time.perf_counter()
    target_rows = rows_of(data.target_batches)
    scores["tgt"] = text_set([(s, c) for s, c, _ in target_rows])
    t2 = time.perf_counter()
    generations = None
    if cfg.em_mode == "teacher_forced":  # greedy decoding would write exactly the target (and stop)
        scores["tgt_gen"] = {"em": [int(g) for _, _, g in target_rows]}
    elif generate:
        items = data.target_eval_items[:data.n_generated]
        prompts = [format_prompt(tokenizer, it["prompt"]) for it in items]
        gens = E.greedy_generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.gen_batch_size, progress=progress)
        predicted = [E.extract_answer_number(g) for g in gens]
        scores["tgt_gen"] = {"em": [int(E.numbers_match(p, it["answer"])) for p, it in zip(predicted, items)]}
        generations = {"tgt_answer_marker": sum("####" in g for g in gens) / len(gens),
                       "generations_sample": [{"answer": it["answer"], "predicted": p, "text": g[:400]}
                                              for it, p, g in list(zip(items, predicted, gens))[:3]]}
    t3 = time.perf_counter()
    scores = rounded(scores)
    out: dict[str, Any] = {m: None for m in ("tgt_em", "tgt_em_val", "tgt_em_test")}
    out.update(metrics_from_scores(scores, data.splits))
    if generations is not None:
        out["tgt_em_n"] = len(scores["tgt_gen"]["em"])
        out.update(generations)
    out["eval_seconds"] = {"source": t1 - t0, "target_nll": t2 - t1, "generate": t3 - t2}
    out["items"] = scores
    return out


def check_teacher_forced_em(model, tokenizer, cfg: Config, data: Data, n: int = 32) -> dict:
    """Teacher-forced exact match against real greedy generation on the first ``n`` target items:
    the generated text (up to the end-of-turn token) must equal the target exactly where, and only
    where, the teacher-forced pass says it does. Recorded in the result; a disagreement is a note."""
    from lalora_curv.experiments import evaluation as E
    from lalora_curv.experiments.data import format_prompt, sft_batches

    items = data.target_eval_items[:n]
    prompts = [format_prompt(tokenizer, it["prompt"]) for it in items]
    targets = [it["target"] for it in items]
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
    gens = E.greedy_generate(model, tokenizer, prompts, max_new_tokens=longest + 2, batch_size=cfg.gen_batch_size)
    batches = sft_batches(prompts, targets, tokenizer, batch_size=cfg.gen_batch_size,
                          seq_len=cfg.target_eval_seq_len, pad_to_longest=True)
    forced = [g for _, _, g in E.row_scores(model, batches)]
    generated = [g == t for g, t in zip(gens, targets)]
    return {"n_items": len(items), "agree": sum(a == b for a, b in zip(forced, generated)),
            "teacher_forced_em": sum(forced), "generated_em": sum(generated),
            "ok": forced == generated}


def length_sorted(batches: list[dict], batch_size: int) -> tuple[list[dict], list[int]]:
    """The rows of right-padded ``batches`` re-batched in order of length (each batch padded to its
    longest row), and ``order``: new row ``i`` is old row ``order[i]``.

    Scores do not depend on which rows share a batch (padding is masked and unlabelled), but the
    time does: mixed lengths waste most of a batch on padding. Same rows, same per-row scores,
    once put back with :func:`unsort`."""
    rows = []
    for b in batches:
        lengths = b["attention_mask"].sum(1).tolist()
        for i, n in enumerate(lengths):
            if not bool(b["attention_mask"][i, :n].all()):
                raise ValueError("length_sorted needs right-padded rows (attention mask 1...1 0...0)")
            rows.append({k: v[i, :n] for k, v in b.items()})
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        width = max(len(r["input_ids"]) for r in chunk)
        fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
        out.append({k: torch.stack([torch.nn.functional.pad(r[k], (0, width - len(r[k])), value=fill[k])
                                    for r in chunk]) for k in chunk[0]})
    return out, order


def unsort(values: list, order: list[int]) -> list:
    """``values`` of length-sorted rows back in the original row order."""
    out = [None] * len(values)
    for new, old in enumerate(order):
        out[old] = values[new]
    return out


def _base_cache_key(cfg: Config, data: Data) -> str:
    blob = json.dumps({"format": "per-item scores, val/test split (2)", "splits": data.splits,
                       "model": cfg.model, "dtype": cfg.dtype, "eval": [data.target_eval_items, data.mcq_eval,
                       data.mcq_proxy, [b["input_ids"].tolist() for v in data.text_eval.values() for b in v],
                       [b["input_ids"].tolist() for b in data.proxy[(cfg.proxy_kind, cfg.proxy_batches)]]],
                       "gen": [cfg.max_new_tokens, cfg.n_generate, cfg.target_eval_seq_len],
                       "versions": _versions_key()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def source_cache_key(cfg: Config, data: Data) -> str:
    """What the base model's scores on :data:`SOURCE_SETS` depend on (not the target task)."""
    blob = json.dumps({"format": "per-item source scores (1)", "model": cfg.model, "dtype": cfg.dtype,
                       "splits": {k: v for k, v in data.splits.items() if k in SOURCE_SETS},
                       "mcq": [data.mcq_eval, data.mcq_proxy, cfg.mcq_impl],
                       "text": [b["input_ids"].tolist() for v in data.text_eval.values() for b in v],
                       "proxy": [b["input_ids"].tolist() for b in data.proxy[(cfg.proxy_kind, cfg.proxy_batches)]],
                       "versions": _versions_key()}, sort_keys=True, default=str)
    return "source-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def _versions_key() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def base_scores(model, tokenizer, cfg: Config, data: Data, cache_path: Path | None, generate: bool,
                device: torch.device) -> tuple[dict, bool]:
    """The base model's scores, cached in ``cache_path`` (keyed by model, data, versions, device type)."""
    key = f"{_base_cache_key(cfg, data)}-{device.type}-{'gen' if generate else 'nogen'}"
    cache = {}
    if cache_path is not None and cache_path.exists():
        try:
            cache = json.loads(cache_path.read_text())
        except json.JSONDecodeError:
            cache = {}
        if key in cache:
            return cache[key], True
    source_key = f"{source_cache_key(cfg, data)}-{device.type}"
    # the source sets' scores are shared by every target task and preset on the same source data
    scores = evaluate(model, tokenizer, cfg, data, generate=generate, progress=False, known=cache.get(source_key))
    if cache_path is not None:
        cache[key] = scores
        cache[source_key] = {k: v for k, v in scores["items"].items() if k in SOURCE_SETS}
        write_json(cache_path, cache)
    return scores, False
