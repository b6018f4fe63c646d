"""Scores of a model on the target task and the source evaluations, and the cached base-model scores."""

from __future__ import annotations

import hashlib
import json
import statistics
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

def evaluate(model, tokenizer, cfg: Config, data: Data, *, generate: bool, progress: bool = False) -> dict:
    """All scores of ``model`` (flat dict; ``None`` where not measured). Lower NLL is better.

    ``src_text_nll`` = mean of the WordNet and pydoc held-out NLLs (each a token mean), so both
    sources weigh the same; ``proxy_text_nll`` = NLL on the curvature's own proxy batches.
    """
    from lalora_curv.experiments import evaluation as E

    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    for kind, batches in data.text_eval.items():
        out[f"src_text_nll_{kind}"] = E.lm_scores(model, batches)["nll"]
    out["src_text_nll"] = statistics.fmean(out[f"src_text_nll_{k}"] for k in data.text_eval)
    out["proxy_text_nll"] = E.lm_scores(model, data.proxy[(cfg.proxy_kind, cfg.proxy_batches)])["nll"]
    for prefix, items in (("src_mcq", data.mcq_eval), ("proxy_mcq", data.mcq_proxy)):
        if cfg.mcq_impl == "fast":
            from benchmarks.forgetting.mcq import fast_mcq_scores

            s = fast_mcq_scores(model, tokenizer, items, batch_size=cfg.eval_batch_size)
        else:
            s = E.mcq_scores(model, tokenizer, items, batch_size=cfg.eval_batch_size)
        out[f"{prefix}_acc"] = s["accuracy"]
        out[f"{prefix}_acc_norm"] = s["accuracy_norm"]
        out[f"{prefix}_nll"] = s["nll_correct"]
    t1 = time.perf_counter()
    from lalora_curv.experiments import data as D

    items = data.target_eval_items
    prompts = [D.format_prompt(tokenizer, it["prompt"]) for it in items]
    targets = [D.format_target(tokenizer, it["target"]) for it in items]
    batches = D.sft_batches(prompts, targets, tokenizer, batch_size=cfg.eval_batch_size // 2 or 1,
                            seq_len=cfg.target_eval_seq_len, pad_to_longest=True)
    out["tgt_nll"] = E.lm_scores(model, batches)["nll"]
    t2 = time.perf_counter()
    out["tgt_em"] = None
    if generate:
        gen_items = items[:cfg.n_generate] if cfg.n_generate else items
        gens = E.greedy_generate(model, tokenizer, prompts[:len(gen_items)], max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.gen_batch_size, progress=progress)
        predicted = [E.extract_answer_number(g) for g in gens]
        matches = [E.numbers_match(p, it["answer"]) for p, it in zip(predicted, gen_items)]
        out["tgt_em"] = sum(matches) / len(gen_items)
        out["tgt_em_n"] = len(gen_items)
        out["tgt_answer_marker"] = sum("####" in g for g in gens) / len(gen_items)
        out["generations_sample"] = [{"answer": it["answer"], "predicted": p, "text": g[:400]}
                                     for it, p, g in list(zip(gen_items, predicted, gens))[:3]]
    t3 = time.perf_counter()
    out["eval_seconds"] = {"source": t1 - t0, "target_nll": t2 - t1, "generate": t3 - t2}
    return out


def _base_cache_key(cfg: Config, data: Data) -> str:
    blob = json.dumps({"model": cfg.model, "dtype": cfg.dtype, "eval": [data.target_eval_items, data.mcq_eval,
                       data.mcq_proxy, [b["input_ids"].tolist() for v in data.text_eval.values() for b in v],
                       [b["input_ids"].tolist() for b in data.proxy[(cfg.proxy_kind, cfg.proxy_batches)]]],
                       "gen": [cfg.max_new_tokens, cfg.n_generate, cfg.target_eval_seq_len],
                       "versions": _versions_key()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


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
    scores = evaluate(model, tokenizer, cfg, data, generate=generate, progress=False)
    if cache_path is not None:
        cache[key] = scores
        write_json(cache_path, cache)
    return scores, False
