"""Target tasks of :func:`lalora_curv.experiments.data.reasoning_items`: names and default configs.

Every task except ``gsm_symbolic`` is a reasoning-gym task with a short numeric answer (a few
tokens; SmolLM2 writes one token per digit), trained on the bare answer. Their default configs keep
the answers short and the skill within reach of a 135M model after a few dozen LoRA steps
(``benchmarks/forgetting/pilot.py`` measures this); ``task_config`` overrides them.
"""

from __future__ import annotations

#: 2-3 terms of 1-2 digits over ``+ - * /`` (integer results), parentheses and negation allowed.
BASIC_ARITHMETIC_CONFIG = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)

#: default reasoning-gym config of each bare-answer task (a copy is taken per call)
TASK_CONFIGS: dict[str, dict] = {
    "basic_arithmetic": BASIC_ARITHMETIC_CONFIG,
    # sums and differences of 2-3 terms of 1-2 digits: "9 - 4 - 3 =" -> "2"
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    # one product of two 0-99 numbers: "15 * 43" -> "645"
    "products": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2),
    # legs of 1-2 kinds of animals, 1-4 of each (needs each animal's leg count, then * and +)
    "leg_counting": dict(min_animals=1, max_animals=2, min_instances=1, max_instances=4),
}

#: every task ``reasoning_items`` serves: gsm_symbolic (worked solutions, template split) + the above
REASONING_TASKS = ("gsm_symbolic", *TASK_CONFIGS)


def default_task_config(task: str) -> dict:
    """A fresh copy of ``task``'s default reasoning-gym config (empty for gsm_symbolic)."""
    if task not in REASONING_TASKS:
        raise ValueError(f"unknown target task {task!r}; known tasks: {', '.join(REASONING_TASKS)}")
    return dict(TASK_CONFIGS.get(task, {}))


__all__ = ["BASIC_ARITHMETIC_CONFIG", "TASK_CONFIGS", "REASONING_TASKS", "default_task_config"]
