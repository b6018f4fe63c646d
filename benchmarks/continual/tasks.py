"""Offline reasoning-gym task items for the continual benchmark (:mod:`benchmarks.continual`).

``lalora_curv.experiments.data.reasoning_items`` covers ``gsm_symbolic`` and ``basic_arithmetic`` only; the
continual sequence needs more tasks, so this helper draws items of any reasoning-gym task whose
answer is a short number, with the same conventions as ``reasoning_items``:

* item = ``{"prompt", "answer", "target", "task", "index", "template_id"}``; ``target`` is the bare
  answer (what the model is trained to write after the chat prompt);
* train / eval split by a fixed hash of the question text (``lalora_curv.experiments.data.split_of``, about 20 %
  eval), so no question is on both sides, whatever the seed;
* duplicates (same question) are dropped.

Each task gets its own generator seed (``seed + SEED_STRIDE * position``): reasoning-gym's arithmetic
generators draw the *same* numbers for the same seed (``chain_sum`` ``15 - 43 - 75`` and ``products``
``15 * 43`` with seed 0), which would leak operands across tasks.
"""

from __future__ import annotations

import warnings

SEED_STRIDE = 1009

#: The task sequence (position 1..4; the source scores are "task 0"). Difficulty is set so that a
#: 135M model learns every task to a non-zero exact match within ~20 LoRA steps, while the greedy
#: answers stay a few tokens long (see docs/benchmarks/continual.md for the reasoning).
DEFAULT_TASKS: tuple[dict, ...] = (
    {"name": "basic_arithmetic", "config": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)},
    {"name": "chain_sum", "config": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)},
    {"name": "products", "config": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2)},
    {"name": "decimal_chain_sum", "config": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2,
                                                 min_decimal_places=1, max_decimal_places=2)},
)


def task_items(task: str, split: str, n: int, seed: int = 0, config: dict | None = None) -> list[dict]:
    """``n`` items of reasoning-gym ``task`` from ``split`` ("train" | "eval"), bare-answer targets."""
    from lalora_curv.experiments.data import split_of

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    size = 10 * n + 50  # ~20 % of the questions are eval: enough draws for either split, grown if not
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import reasoning_gym

            dataset = reasoning_gym.create_dataset(task, seed=seed, size=size, **dict(config or {}))
        items, seen = [], set()
        for index in range(size):
            if len(items) == n:
                break
            raw = dataset[index]
            question = raw["question"]
            if question in seen or (split_of(f"{task}:{question}") == "eval") != (split == "eval"):
                continue
            seen.add(question)
            answer = str(raw["answer"]).strip()
            items.append({"prompt": question, "answer": answer, "target": answer, "task": task, "index": index,
                          "template_id": None})
        if len(items) == n or size >= 200 * n + 1000:
            break
        size *= 4
    if len(items) < n:
        raise ValueError(f"only {len(items)} {task} items for split {split!r} in {size} draws, asked for {n}")
    return items
