"""Shared-prompt MCQ scoring for the forgetting benchmark (same numbers as ``mcq_scores``, ~3x cheaper).

``lalora_curv.experiments.evaluation.mcq_scores`` runs ``prompt + choice`` once per choice, so the prompt
(about 90% of a WordNet MCQ row) is processed ``num_choices`` times. Here one row holds the prompt
once followed by every choice's tokens; a custom 4-D additive attention mask lets each choice token
attend to the prompt and to the earlier tokens of its *own* choice only, and the position ids of
every choice restart right after the prompt. Under causal attention the prompt's hidden states do
not depend on what follows, so each choice's log-likelihood equals the one ``mcq_scores`` computes
(up to float rounding). Token ids come from the library's own tokenization rule
(``evaluation.context_continuation``). :func:`check_against_reference` compares both on a few
items and the benchmark falls back to ``mcq_scores`` if they disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lalora_curv.experiments.batching import pad_token_id
from lalora_curv.experiments.evaluation import context_continuation
from lalora_curv.losses import logits_at

__all__ = ["fast_mcq_scores", "check_against_reference"]


def _rows(tokenizer, items: Sequence[dict], separator: str) -> list[tuple[list[int], list[list[int]]]]:
    rows = []
    for item in items:
        prompt_ids, choices = None, []
        for choice in item["choices"]:
            ctx, cont = context_continuation(tokenizer, item["prompt"], separator + choice)
            if prompt_ids is None:
                prompt_ids = ctx
            elif ctx != prompt_ids:  # the prompt tokenizes the same for every choice (same string)
                raise ValueError("prompt tokenization differs between choices")
            choices.append(cont)
        rows.append((prompt_ids, choices))
    return rows


@torch.no_grad()
def _choice_logliks(model, rows, pad_id: int) -> list[list[tuple[float, int]]]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = [len(p) + sum(len(c) for c in cs) for p, cs in rows]
    T = max(lengths)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.zeros((B, T, T), dtype=torch.bool)
    spans = []  # per row: list of (start, end) of each choice
    for b, (prompt, choices) in enumerate(rows):
        P = len(prompt)
        input_ids[b, :P] = torch.tensor(prompt)
        position_ids[b, :P] = torch.arange(P)
        allowed[b, :P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
        pos, row_spans = P, []
        for c in choices:
            L = len(c)
            input_ids[b, pos:pos + L] = torch.tensor(c)
            position_ids[b, pos:pos + L] = torch.arange(P, P + L)
            allowed[b, pos:pos + L, :P] = True
            allowed[b, pos:pos + L, pos:pos + L] = torch.tril(torch.ones(L, L, dtype=torch.bool))
            row_spans.append((pos, pos + L))
            pos += L
        allowed[b, pos:, pos:] = torch.eye(T - pos, dtype=torch.bool)  # padding attends to itself only
        spans.append(row_spans)
    mask = torch.zeros((B, 1, T, T), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    # token j of a choice (at position start + j) is predicted from position P - 1 (j = 0) or from
    # start + j - 1 (j > 0): the prompt's last token, then the choice's own tokens. Only those
    # positions get logits (the prompt, most of a row, needs none).
    prev = [[[len(prompt) - 1] + list(range(start, end - 1)) for start, end in spans[b]]
            for b, (prompt, _) in enumerate(rows)]
    keep = sorted({t for row in prev for choice in row for t in choice})
    column = {t: i for i, t in enumerate(keep)}
    logits = logits_at(model, torch.tensor(keep, device=device), input_ids=input_ids.to(device),
                       attention_mask=mask.to(device), position_ids=position_ids.to(device)).float()
    logprobs = F.log_softmax(logits, dim=-1)
    out = []
    for b, (_, choices) in enumerate(rows):
        res = []
        for positions, c in zip(prev[b], choices):
            cols = [column[t] for t in positions]
            lp = logprobs[b, cols, :].gather(1, torch.tensor(c, device=logprobs.device)[:, None]).sum()
            res.append((float(lp), len(c)))
        out.append(res)
    return out


def fast_mcq_scores(model, tokenizer, items: Sequence[dict], *, separator: str = " ", batch_size: int = 16) -> dict:
    """``mcq_scores``' ``accuracy``, ``accuracy_norm``, ``nll_correct``, ``nll_correct_per_token``, ``n``,
    ``predictions`` with one forward per item (all choices in one row)."""
    from lalora_curv.experiments.evaluation import mcq_summary

    was_training = model.training
    model.eval()
    try:
        rows = _rows(tokenizer, items, separator)
        # batches of similar length waste little on padding; results go back to the items' order
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + sum(len(c) for c in rows[i][1]))
        results = [None] * len(rows)
        for start in range(0, len(rows), batch_size):
            chunk = order[start:start + batch_size]
            for i, res in zip(chunk, _choice_logliks(model, [rows[i] for i in chunk], pad_token_id(tokenizer))):
                results[i] = res
    finally:
        model.train(was_training)
    return mcq_summary(items, results)


def check_against_reference(model, tokenizer, items: Sequence[dict], *, atol: float = 2e-3) -> dict:
    """Compare :func:`fast_mcq_scores` with ``lalora_curv.experiments.evaluation.mcq_scores`` on ``items``."""
    from lalora_curv.experiments.evaluation import mcq_scores

    fast = fast_mcq_scores(model, tokenizer, items)
    ref = mcq_scores(model, tokenizer, items)
    diff = max(abs(a - b) for fa, ra in zip(fast["logliks"], ref["logliks"]) for a, b in zip(fa, ra))
    return {"max_abs_loglik_diff": diff, "ok": bool(diff <= atol and fast["predictions"] == ref["predictions"]),
            "n_items": len(items), "atol": atol}
