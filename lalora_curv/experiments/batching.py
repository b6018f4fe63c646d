"""Prompt formatting and batchers: text -> HF causal-LM dicts.

Batches are ``{"input_ids", "attention_mask", "labels"}`` of LongTensors of shape ``(B, T)``;
label ``-100`` marks positions that are not prediction targets (padding, prompts). Padding is
right padding with ``attention_mask == 0``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------------
# Prompt formatting
# --------------------------------------------------------------------------------------------

def _use_chat(tokenizer, chat: bool | str) -> bool:
    if chat == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but the tokenizer has no chat template")
    return bool(chat)


def format_prompt(tokenizer, question: str, *, chat: bool | str = "auto") -> str:
    """The text a model sees before its answer.

    With a chat template (``chat="auto"`` uses one when the tokenizer has it, as SmolLM2-Instruct
    does): the question as a single user turn plus the generation prompt (for SmolLM2 this
    includes its default system turn). Without: ``"Question: <question>\\nAnswer:"``.
    """
    if _use_chat(tokenizer, chat):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def format_target(tokenizer, target: str, *, chat: bool | str = "auto") -> str:
    """The supervised completion matching :func:`format_prompt`: in the plain format it starts with a
    space (``"Answer: 42"``), after a chat generation prompt it starts directly."""
    return target if _use_chat(tokenizer, chat) else " " + target


# --------------------------------------------------------------------------------------------
# Batchers
# --------------------------------------------------------------------------------------------

def _encode(tokenizer, text: str, *, special: bool = True) -> list[int]:
    """Token ids of ``text``; with ``special`` the tokenizer's own prefix (e.g. BOS) is added unless the
    text already starts with it (chat templates often write the BOS token themselves)."""
    bos = getattr(tokenizer, "bos_token", None)
    add = special and not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    return int(tokenizer.eos_token_id)


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int, length: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) rows to ``length``: padding gets ``pad_id``, attention 0, label -100."""
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, :len(ids)] = 1
        labels[i, :len(labs)] = torch.tensor(labs, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _batch_rows(rows: list, batch_size: int, drop_last: bool, pad_id: int, seq_len: int, pad_to_longest: bool
                ) -> list[dict[str, torch.Tensor]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if drop_last and len(chunk) < batch_size:
            break
        length = max(len(ids) for ids, _ in chunk) if pad_to_longest else seq_len
        batches.append(_collate(chunk, pad_id, length))
    return batches


def lm_batches(texts: Sequence[str], tokenizer, batch_size: int = 8, seq_len: int = 128, *, packed: bool = False,
               add_eos: bool = False, drop_last: bool = False, pad_to_longest: bool = False
               ) -> list[dict[str, torch.Tensor]]:
    """Language-modelling batches of plain text.

    Padded (default): one text per row, truncated to ``seq_len`` tokens (plus eos if ``add_eos``),
    right-padded to ``seq_len`` (or to the batch's longest row if ``pad_to_longest``); labels equal
    ``input_ids`` on real tokens and ``-100`` on padding, whose attention mask is 0. Texts of fewer
    than two tokens are skipped (they hold no prediction term).

    Packed (``packed=True``): all texts are concatenated, each followed by eos, and cut into rows
    of exactly ``seq_len`` tokens; the incomplete tail is dropped. Every position is attended and
    labelled (no padding, no -100), so all rows have equal length: the form curvlinops needs,
    since it cannot mask (SEMANTICS.md §6). Rows may span document boundaries.

    Returns a list of dicts of LongTensors ``(B, T)``; the last batch may be smaller than
    ``batch_size`` unless ``drop_last``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one prediction needs two tokens), got {seq_len}")
    pad_id = pad_token_id(tokenizer)
    if packed:
        eos = _eos_id(tokenizer)
        stream: list[int] = []
        for text in texts:
            stream.extend(_encode(tokenizer, text))
            stream.append(eos)
        num_rows = len(stream) // seq_len
        if num_rows == 0:
            raise ValueError(f"{len(stream)} tokens in total: too few for one packed row of {seq_len}")
        rows = [(stream[i * seq_len:(i + 1) * seq_len],) * 2 for i in range(num_rows)]
        return _batch_rows(rows, batch_size, drop_last, pad_id, seq_len, pad_to_longest=False)
    rows = []
    for text in texts:
        ids = _encode(tokenizer, text)
        if add_eos:
            ids.append(_eos_id(tokenizer))
        ids = ids[:seq_len]
        if len(ids) >= 2:  # a row with one token has no prediction term
            rows.append((ids, ids))
    if not rows:
        raise ValueError("no text produced at least two tokens")
    return _batch_rows(rows, batch_size, drop_last, pad_id, seq_len, pad_to_longest)


def sft_batches(prompts: Sequence[str], targets: Sequence[str], tokenizer, batch_size: int = 8, seq_len: int = 256,
                *, add_eos: bool = True, drop_last: bool = False, pad_to_longest: bool = False
                ) -> list[dict[str, torch.Tensor]]:
    """Supervised fine-tuning batches: labels only on the target tokens (and the closing eos).

    Row = ``prompt tokens + target tokens (+ eos)``; prompt tokens get label ``-100``. Prompts and
    targets are used as given (format them with :func:`format_prompt` / :func:`format_target`);
    the prompt gets the tokenizer's special prefix (e.g. BOS), the target none. Rows longer than
    ``seq_len`` are cut at the end; a row left without any labelled token is dropped with a
    warning. Padding as in :func:`lm_batches`.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pad_id = pad_token_id(tokenizer)
    rows, dropped = [], 0
    for prompt, target in zip(prompts, targets):
        prompt_ids = _encode(tokenizer, prompt)
        target_ids = _encode(tokenizer, target, special=False)
        if add_eos:
            target_ids.append(_eos_id(tokenizer))
        ids = (prompt_ids + target_ids)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:seq_len]
        # The first labelled position needs a predecessor: HF shifts labels by one.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        rows.append((ids, labels))
    if dropped:
        warnings.warn(f"sft_batches: {dropped} example(s) had no target token within seq_len={seq_len} and were "
                      "dropped", stacklevel=2)
    if not rows:
        raise ValueError("no example has a target token within seq_len")
    return _batch_rows(rows, batch_size, drop_last, pad_id, seq_len, pad_to_longest)


def reasoning_sft_batches(items: Sequence[dict], tokenizer, batch_size: int = 8, seq_len: int = 384, *,
                          chat: bool | str = "auto", **options) -> list[dict[str, torch.Tensor]]:
    """:func:`sft_batches` of :func:`reasoning_items`, formatted with :func:`format_prompt` / ``format_target``."""
    prompts = [format_prompt(tokenizer, item["prompt"], chat=chat) for item in items]
    targets = [format_target(tokenizer, item["target"], chat=chat) for item in items]
    return sft_batches(prompts, targets, tokenizer, batch_size, seq_len, **options)


def num_label_tokens(batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Number of prediction terms in ``batches``: labels != -100 after the causal shift by one."""
    return int(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches))
