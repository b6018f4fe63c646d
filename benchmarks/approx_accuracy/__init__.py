"""Approximation-accuracy benchmark: curvature structures vs the exact GGN / empirical Fisher.

Run::

    python -m benchmarks.approx_accuracy --preset small                 # CPU, real SmolLM2-135M, ~15 min
    python -m benchmarks.approx_accuracy --preset full --device cuda    # GPU, bigger batches, same code

On SmolLM2-135M-Instruct (the packaged GGUF, i.e. a *dequantized Q4_1* model) with LoRA r=8 on
q,v and on all linear layers, each curvature structure of ``lalora_curv.fit_curvature`` (diag,
kfac, kfac_tridiag, lowrank, diag_lowrank; kfac_delta_w on its own Delta-W space) is compared
with an **exact** reference restricted to the LoRA parameters:

* exact token-level GGN (= type-2 Fisher; curvlinops ``GGNLinearOperator``) for ``kind="mc"``
  (and ``kind="ggn"`` where the vocabulary is small enough, i.e. not at 49k);
* exact token-level empirical Fisher (curvlinops ``EFLinearOperator``) for ``kind="empirical"``.

Both references are used through matrix-vector products only, on *packed* (unpadded, fully
labelled, equal-length) proxy text batches, because curvlinops cannot mask (SEMANTICS §6); so
no dense matrix of the full size is ever formed. What is measured:

1. ``qf``: relative error of ``d^T P d`` vs ``d^T G d`` along random Gaussian directions, the
   target-loss gradient (gsm_symbolic SFT) and the source-loss gradient (held-out source text) at
   theta0, and the real fine-tuning displacement ``theta_t - theta0`` of a short LoRA fine-tune
   on gsm_symbolic, per LoRA config and per anchor setting: ``b0`` = peft's default init (B = 0,
   so every A-block and A-B cross block is exactly zero and kfac_tridiag == kfac, SEMANTICS §2)
   and ``bnz`` = Gaussian A (peft ``init_lora_weights="gaussian"``) plus a random non-zero B.
2. ``delta_w``: kfac_delta_w against the exact GGN/EF of the *base weights* of the adapted layers
   (the loss depends on ``W + Delta W``, so that GGN is exactly the Delta-W GGN), along random,
   gradient and displacement directions in Delta-W space.
3. ``terms``: ``terms="sequence"`` vs ``terms="token"`` for diag/lowrank/diag_lowrank on a few
   tokens (token-level fitting back-propagates once per token).
4. ``dense_layer``: LoRA on one small module (one ``v_proj``): dense exact GGN and EF of that
   layer, relative Frobenius error (whole matrix and A/B/cross blocks) and top-k eigenspace
   overlap of every structure, plus the best possible diag / rank-k / diag+rank-k ("oracle").
5. ``kfac_memory``: what K-FAC's memory savings cost (shared input factors: exact; bf16 factors).
6. ``stabilization``: fits on 1, 2, 4, 8 proxy batches vs the 8-batch fit and vs the exact GGN
   on the union of the 8 batches (the LaLoRA paper says 1-2 batches suffice).

Everything is recorded in one JSON (machine, versions, config, all numbers), a markdown report
and PNG plots: ``<output-dir>/<preset>-<device>.{json,md}`` and ``...-*.png``.

Package layout: :mod:`.config` (fits, structures, presets), :mod:`.inputs` (models, batches,
directions), :mod:`.references` (exact references and fitted forms), :mod:`.run` (combos, parts,
driver, merging parts), :mod:`.dense` (one layer, dense), :mod:`.report` (markdown and plots from the
JSON), ``__main__`` (the command line).
"""

from benchmarks.approx_accuracy.config import DIRECTION_TYPES, PRESETS, STRUCTURES
from benchmarks.approx_accuracy.dense import exact_dense_ggn
from benchmarks.approx_accuracy.report import write_outputs
from benchmarks.approx_accuracy.run import merge_results, run_benchmark

__all__ = ["DIRECTION_TYPES", "PRESETS", "STRUCTURES", "exact_dense_ggn", "merge_results", "run_benchmark",
           "write_outputs", "main"]


def main(argv: list[str] | None = None) -> int:
    """The command line (see ``python -m benchmarks.approx_accuracy --help``)."""
    from benchmarks.approx_accuracy.__main__ import main as _main

    return _main(argv)
