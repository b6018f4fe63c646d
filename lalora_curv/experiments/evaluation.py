"""Scores for any Hugging Face causal LM (plain or peft-wrapped): NLL/perplexity, MCQ, reasoning.

Conventions (same as the batchers in :mod:`lalora_curv.experiments.data` and as HF's own loss):

* A prediction term is a position ``t`` whose next label ``labels[t + 1]`` is not ``-100``;
  logits at ``t`` are scored against ``labels[t + 1]``.
* Means are over terms (tokens), pooled over all batches, not means of batch means.
* Every function runs under ``torch.no_grad()`` with the model in eval mode, restoring its
  previous train/eval mode afterwards, and moves batches to the model's device.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..losses import logits_at
from .batching import IGNORE_INDEX, _encode, format_prompt, format_target, pad_token_id, sft_batches


@contextlib.contextmanager
def _inference(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total)


def _token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                    with_hits: bool = False) -> tuple[torch.Tensor, ...]:
    """Log-probabilities of the shifted labels and the mask of real terms, both ``(B, T - 1)``.

    Entry ``[b, t]`` is ``log p(labels[b, t + 1] | tokens <= t)``; it is 0 where the label is -100.
    With ``with_hits`` a third ``(B, T - 1)`` tensor: whether the arg-max token is the label (True
    where there is no label). Logits are computed only at positions some row of the batch scores.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logprobs = torch.zeros(targets.shape, device=targets.device)
    hits = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
    keep = mask.any(0).nonzero().squeeze(1)
    if keep.numel():
        logits = logits_at(model, keep, input_ids=input_ids, attention_mask=attention_mask)
        kept_targets, kept_mask = targets[:, keep], mask[:, keep]
        # Flattened (N, V) rows: cross_entropy on a (B, V, T) transposed view is far slower.
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                              kept_targets.masked_fill(~kept_mask, 0).reshape(-1), reduction="none")
        logprobs[:, keep] = -nll.view(kept_targets.shape) * kept_mask
        hits[:, keep] = (logits.argmax(-1) == kept_targets) | ~kept_mask
    if with_hits:
        return logprobs, mask, hits
    return logprobs, mask


def nll_sum_and_count(model, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed NLL (nats) over the prediction terms of one causal-LM batch, and the number of terms."""
    device = _device(model)
    attention_mask = batch.get("attention_mask")
    input_ids = batch["input_ids"].to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    logprobs, mask = _token_logprobs(model, input_ids, attention_mask, batch["labels"].to(device))
    return float(-logprobs.sum()), int(mask.sum())


def row_scores(model, batches: Iterable[dict[str, torch.Tensor]]) -> list[tuple[float, int, bool]]:
    """Per batch row, in order: ``(summed NLL in nats, number of prediction terms, greedy match)``.

    The per-item form of :func:`lm_scores` (one text or one prompt/target pair per row, as the
    padded batchers make them): summing the first two columns over the rows gives its ``nll``, and
    a subset of rows gives the score of that subset (validation/test halves, bootstrap resamples).

    ``greedy match``: at every labelled position the arg-max token is the label. For an SFT row
    (labels on the target and its closing eos only) that is exactly "greedy decoding from the
    prompt writes this target token by token and then stops": the exact match of a short answer,
    read from one teacher-forced pass instead of a generation loop. It is stricter than a parsed
    match (the answer must come out in the reference's own tokenization, with nothing around it).
    """
    rows: list[tuple[float, int, bool]] = []
    device = None
    with _inference(model):
        for batch in batches:
            device = device or _device(model)
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
            logprobs, mask, hits = _token_logprobs(model, input_ids, attention_mask, batch["labels"].to(device),
                                                   with_hits=True)
            rows.extend(zip((-logprobs.sum(1)).tolist(), mask.sum(1).tolist(), hits.all(1).tolist()))
    return [(float(s), int(c), bool(g)) for s, c, g in rows]


def row_nll_sums(model, batches: Iterable[dict[str, torch.Tensor]]) -> list[tuple[float, int]]:
    """Per batch row: ``(summed NLL in nats, number of prediction terms)`` (see :func:`row_scores`)."""
    return [(s, c) for s, c, _ in row_scores(model, batches)]


def lm_scores(model, batches: Iterable[dict[str, torch.Tensor]], *, progress: bool = False) -> dict:
    """``{"nll": mean NLL per term (nats), "ppl": exp(nll), "tokens": number of terms}``."""
    total, count = 0.0, 0
    total_batches = len(batches) if hasattr(batches, "__len__") else None
    with _inference(model):
        for batch in _progress(batches, progress, "nll", total_batches):
            batch_total, batch_count = nll_sum_and_count(model, batch)
            total += batch_total
            count += batch_count
    if count == 0:
        raise ValueError("the batches contain no labelled prediction terms")
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}


def mean_nll(model, batches: Iterable[dict[str, torch.Tensor]], *, progress: bool = False) -> float:
    """Token-level mean NLL (nats) over all labelled prediction terms of ``batches``."""
    return lm_scores(model, batches, progress=progress)["nll"]


def perplexity(model, batches: Iterable[dict[str, torch.Tensor]], *, progress: bool = False) -> float:
    """``exp(mean_nll)``: token-level perplexity over all labelled prediction terms."""
    return lm_scores(model, batches, progress=progress)["ppl"]


# --------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood
# --------------------------------------------------------------------------------------------

def context_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as they appear in ``context + continuation``.

    The whole string is tokenized once and split after the context's tokens (as lm-eval-harness
    does), so the continuation is scored with the tokenization the model would see; if the
    context's tokens are not a prefix of the whole (a merge across the boundary), the
    continuation is tokenized on its own.
    """
    context_ids = _encode(tokenizer, context)
    whole_ids = _encode(tokenizer, context + continuation)
    if whole_ids[:len(context_ids)] == context_ids and len(whole_ids) > len(context_ids):
        return context_ids, whole_ids[len(context_ids):]
    return context_ids, _encode(tokenizer, continuation, special=False)


def continuation_logliks(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                         max_length: int | None = None, progress: bool = False) -> list[tuple[float, int]]:
    """``(sum of log p(continuation tokens | context), number of continuation tokens)`` per pair.

    Contexts longer than ``max_length - len(continuation)`` tokens lose their *start* (the end,
    next to the continuation, is kept).
    """
    encoded = []
    for context, continuation in pairs:
        context_ids, continuation_ids = context_continuation(tokenizer, context, continuation)
        if not continuation_ids:
            raise ValueError(f"empty continuation after tokenization: {continuation!r}")
        if not context_ids:
            raise ValueError("empty context: the first continuation token would have nothing to be predicted from")
        if max_length is not None:
            context_ids = context_ids[-max(1, max_length - len(continuation_ids)):]
        encoded.append((context_ids, continuation_ids))

    pad_id = pad_token_id(tokenizer)
    device = _device(model)
    results: list[tuple[float, int]] = []
    starts = range(0, len(encoded), batch_size)
    with _inference(model):
        for start in _progress(starts, progress, "choices", len(starts)):
            chunk = encoded[start:start + batch_size]
            length = max(len(c) + len(t) for c, t in chunk)
            input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            for i, (context_ids, continuation_ids) in enumerate(chunk):
                ids = context_ids + continuation_ids
                input_ids[i, :len(ids)] = torch.tensor(ids)
                attention_mask[i, :len(ids)] = 1
                labels[i, len(context_ids):len(ids)] = torch.tensor(continuation_ids)
            logprobs, mask = _token_logprobs(model, input_ids.to(device), attention_mask.to(device),
                                             labels.to(device))
            results.extend(zip(logprobs.sum(1).tolist(), mask.sum(1).tolist()))
    return results


def mcq_scores(model, tokenizer, items: Sequence[dict], *, separator: str = " ", batch_size: int = 16,
               max_length: int | None = None, progress: bool = False) -> dict:
    """Multiple choice by log-likelihood (cloze style): choice ``c`` is scored as the continuation
    ``separator + c`` of ``item["prompt"]``.

    Returns:
        ``accuracy``: fraction of items whose correct choice has the highest summed log-prob;
        ``accuracy_norm``: the same with log-probs divided by the choice's token count;
        ``nll_correct``: mean over items of ``-log p(correct choice | prompt)`` (summed over the
        choice's tokens), the smooth counterpart of accuracy; ``nll_correct_per_token``: mean over
        items of that NLL divided by the choice's token count; ``n``; ``predictions``: the argmax
        choice index per item; ``logliks``: per item, the summed log-prob of each choice.
    """
    if not items:
        raise ValueError("no MCQ items")
    pairs, owners = [], []
    for item_index, item in enumerate(items):
        if not 0 <= item["answer_index"] < len(item["choices"]):
            raise ValueError(f"item {item_index}: answer_index {item['answer_index']} out of range")
        for choice in item["choices"]:
            pairs.append((item["prompt"], separator + choice))
            owners.append(item_index)
    scored = continuation_logliks(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length,
                                  progress=progress)
    per_item: list[list[tuple[float, int]]] = [[] for _ in items]
    for owner, result in zip(owners, scored):
        per_item[owner].append(result)
    return mcq_summary(items, per_item)


def mcq_summary(items: Sequence[dict], per_item: Sequence[Sequence[tuple[float, int]]]) -> dict:
    """The scores of :func:`mcq_scores` from ``per_item[i][c] = (summed log-prob, token count)`` of
    choice ``c`` of item ``i`` (shared by scorers that compute the log-probs differently).

    ``item_scores`` holds the per-item values the means come from: ``correct`` and ``correct_norm``
    (0/1: the arg-max of the summed / per-token log-prob is the answer) and ``nll`` (minus the
    summed log-prob of the correct choice)."""
    flags, flags_norm, nlls, nlls_per_token = [], [], [], []
    predictions, logliks = [], []
    for item, results in zip(items, per_item):
        sums = [s for s, _ in results]
        normalized = [s / k for s, k in results]
        prediction = max(range(len(sums)), key=sums.__getitem__)
        answer = item["answer_index"]
        flags.append(int(prediction == answer))
        flags_norm.append(int(max(range(len(normalized)), key=normalized.__getitem__) == answer))
        nlls.append(-sums[answer])
        nlls_per_token.append(-normalized[answer])
        predictions.append(prediction)
        logliks.append(sums)
    n = len(items)
    return {"accuracy": sum(flags) / n, "accuracy_norm": sum(flags_norm) / n, "nll_correct": sum(nlls) / n,
            "nll_correct_per_token": sum(nlls_per_token) / n, "n": n, "predictions": predictions,
            "logliks": logliks, "item_scores": {"correct": flags, "correct_norm": flags_norm, "nll": nlls}}


# --------------------------------------------------------------------------------------------
# Reasoning: greedy generation + exact match, teacher-forced NLL
# --------------------------------------------------------------------------------------------

# Thousands-grouped numbers first ("1,232"), then plain ones; an optional sign and decimals.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def extract_answer_number(text: str) -> str | None:
    """The final numeric answer in a generation, commas removed; None if there is no number.

    If the text contains the GSM marker ``####``, the first number after it is taken (what a
    model trained on our targets writes); otherwise the last number in the text.
    """
    marker = text.find("####")
    if marker >= 0:
        match = _NUMBER.search(text, marker)
        if match:
            return match.group(0).replace(",", "")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def numbers_match(predicted: str | None, reference: str, rel_tol: float = 1e-6) -> bool:
    """Numeric equality of two number strings (``"8.0"`` matches ``"8"``)."""
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted), float(reference), rel_tol=rel_tol, abs_tol=rel_tol)
    except ValueError:
        return False


def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8,
                    progress: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded new text only, special tokens skipped).

    Prompts are left-padded inside each batch (decoder-only generation continues from the last
    column); generation stops at the tokenizer's eos or after ``max_new_tokens`` tokens.
    """
    pad_id = pad_token_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    device = _device(model)
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    with _inference(model):
        for start in _progress(starts, progress, "generate", len(starts)):
            encoded = [_encode(tokenizer, p) for p in prompts[start:start + batch_size]]
            length = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, ids in enumerate(encoded):
                input_ids[i, length - len(ids):] = torch.tensor(ids)
                attention_mask[i, length - len(ids):] = 1
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       temperature=None, top_p=None, top_k=None,
                                       pad_token_id=pad_id, eos_token_id=eos_id)
            for row in generated[:, length:].tolist():
                if eos_id is not None and eos_id in row:
                    row = row[:row.index(eos_id)]
                outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


def reasoning_scores(model, tokenizer, items: Sequence[dict], *, max_new_tokens: int = 256, batch_size: int = 8,
                     chat: bool | str = "auto", seq_len: int = 1024, progress: bool = False) -> dict:
    """Exact match of greedy answers and teacher-forced NLL of the reference targets.

    ``items`` as from :func:`lalora_curv.experiments.data.reasoning_items` (``prompt``, ``answer``, ``target``),
    formatted with :func:`~lalora_curv.experiments.data.format_prompt` / ``format_target`` (``chat``).

    Returns:
        ``exact_match``: fraction of items whose generated answer (:func:`extract_answer_number`)
        equals ``answer`` numerically; ``nll``: mean NLL per target token (eos included) of the
        reference ``target`` given the prompt; ``n``; ``generations``; ``predicted`` numbers.
    """
    if not items:
        raise ValueError("no reasoning items")
    prompts = [format_prompt(tokenizer, item["prompt"], chat=chat) for item in items]
    targets = [format_target(tokenizer, item["target"], chat=chat) for item in items]
    generations = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  progress=progress)
    predicted = [extract_answer_number(text) for text in generations]
    matches = [numbers_match(p, item["answer"]) for p, item in zip(predicted, items)]
    batches = sft_batches(prompts, targets, tokenizer, batch_size=batch_size, seq_len=seq_len, pad_to_longest=True)
    nll = lm_scores(model, batches, progress=progress)["nll"]
    return {"exact_match": sum(matches) / len(items), "nll": nll, "n": len(items), "generations": generations,
            "predicted": predicted}


__all__ = [
    "context_continuation", "nll_sum_and_count", "lm_scores", "mean_nll", "perplexity",
    "continuation_logliks", "mcq_scores",
    "row_scores", "row_nll_sums", "mcq_summary", "extract_answer_number", "numbers_match", "greedy_generate",
    "reasoning_scores",
]
