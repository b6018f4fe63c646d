"""Cost benchmark: time and peak memory of curvature fits and Laplace penalties vs plain training.

Run::

    python -m benchmarks.cost --preset small                      # CPU, real SmolLM2-135M, < ~10 min
    python -m benchmarks.cost --preset full --device cuda --dtype bfloat16   # GPU, random-weight shapes

Per model config, on the same batches in the same run:

* baselines: one plain forward+backward (LoRA parameters get gradients, base frozen) and one plain
  LoRA training step (forward+backward+AdamW);
* ``lalora_curv.fit_curvature`` per structure (diag, kfac, kfac_tridiag, kfac_delta_w, diag_lowrank
  rank 16; kind "empirical", plus "mc" for kfac): time per batch as a ratio to fwd+bwd (also
  *paired*: each timed fit right after a timed fwd+bwd, ratio = median of the pairs, robust to a
  machine whose speed drifts), ``curv.nbytes`` and peak memory;
* curvlinops ``KFACLinearOperator`` (empirical Fisher, expand, LoRA params) factor time and factor
  memory, ours/theirs ratios; one curvlinops ``GGNLinearOperator`` matvec (exact type-2 GGN);
* laplace-torch ``Laplace(..., subset_of_weights="all", hessian_structure="kron"/"diag")`` where it
  can handle the model (the exact error where it cannot); BackPACK: ``extend(model,
  use_converter=True)`` + KFAC (outcome/error) and our ``backend="backpack"`` diag;
* penalty overhead: LoRA step with ``LaplacePenalty`` per structure, the penalty's forward+backward
  timed inside the step, as % of a plain LoRA step;
* sweeps: sequence length (tokens), LoRA rank, and model width (the model list).

Random-weight models (Llama-3.2-1B/3B shapes, SmolLM2 shape on GPU) are for cost only: their
losses mean nothing. The real SmolLM2-135M-Instruct comes from the packaged GGUF, i.e. a
*dequantized Q4_1* model.

Package layout: :mod:`.config` (what is measured, targets, presets), :mod:`.measure` (the timed pieces),
:mod:`.run` (per model, sweeps, the preset loop, target checks, merging parts), :mod:`.report` and
:mod:`.plots` (markdown and PNGs from the result JSON), ``__main__`` (the command line).
"""

from benchmarks.cost.config import PRESETS, TARGETS
from benchmarks.cost.report import write_outputs
from benchmarks.cost.run import (
    check_targets,
    measure_model,
    merge_results,
    run_benchmark,
)

__all__ = ["PRESETS", "TARGETS", "check_targets", "measure_model", "merge_results", "run_benchmark", "write_outputs",
           "main"]


def main(argv: list[str] | None = None) -> int:
    """The command line (see ``python -m benchmarks.cost --help``)."""
    from benchmarks.cost.__main__ import main as _main

    return _main(argv)
