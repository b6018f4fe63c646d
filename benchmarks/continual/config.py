"""Settings of the continual benchmark: the methods, :class:`Config` and the presets (one
:class:`benchmarks.harness.PresetTable`, ``--set`` overrides applied by :func:`make_config`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.continual.tasks import DEFAULT_TASKS
from benchmarks.harness import PresetTable

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results" / "continual"

# ============================================================================================
# Methods
# ============================================================================================

METHOD_SPECS: dict[str, dict] = {
    "seq_lora": {"family": "none", "label": "sequential LoRA"},
    "l2": {"family": "l2", "label": "L2 to previous adapter"},
    "ewc_diag": {"family": "laplace", "structure": "diag", "dynamics": "identity", "label": "online EWC (diag)"},
    "ewc_kfac": {"family": "laplace", "structure": "kfac", "dynamics": "identity", "label": "online EWC (kfac)"},
    "filter_diag": {"family": "laplace", "structure": "diag", "dynamics": "noise", "label": "filter (diag, noise)"},
    "filter_dlr": {"family": "laplace", "structure": "diag_lowrank", "dynamics": "noise",
                   "label": "filter (diag+low-rank, noise)"},
    "filter_kfac_tridiag": {"family": "laplace", "structure": "kfac_tridiag", "dynamics": "identity",
                            "label": "filter (kfac_tridiag, identity+gamma)"},
    "filter_dlr+smooth": {"family": "smooth", "of": "filter_dlr", "label": "filter (diag+low-rank) + RTS smoothing"},
    "filter_diag+smooth": {"family": "smooth", "of": "filter_diag", "label": "filter (diag) + RTS smoothing"},
}


# ============================================================================================
# Configuration
# ============================================================================================

@dataclass
class Config:
    """Everything a run depends on (stored in the result JSON)."""

    preset: str = "small"
    model: str = "smollm2"                 # "smollm2" | "tiny" | local HF dir / .gguf path
    dtype: str = "float32"
    tasks: list = field(default_factory=lambda: [dict(t) for t in DEFAULT_TASKS])
    chat: Any = False                      # prompt format: False = "Question: ...\nAnswer:" (short rows)
    data_seed: int = 0
    seeds: tuple = (0,)
    # ---- per-task data and training (identical for every method)
    n_train: int = 64
    n_eval: int = 24
    train_batch_size: int = 4
    train_seq_len: int = 128
    steps: int = 16
    lr: float = 2e-3
    max_grad_norm: float | None = 1.0
    r: int = 8
    alpha: float = 16
    target_modules: tuple = ("q_proj", "v_proj")
    # ---- evaluation
    max_new_tokens: int = 8                # answers are <= 7 tokens ("-135.10": SmolLM2 splits digits) + eos
    gen_batch_size: int = 24
    n_mcq: int = 20
    n_source_texts: int = 8                # held-out texts, half WordNet half pydoc
    source_pos: tuple = ("n", "v", "a", "r")  # WordNet parts of speech of the source MCQ / texts
    source_seq_len: int = 96
    eval_batch_size: int = 24
    # ---- curvature (fitted on each task's own training items)
    proxy_batches: int = 3
    proxy_batch_size: int = 8
    curvature_kind: str = "mc"
    mc_samples: int = 1
    rank: int = 8                          # diag_lowrank rank of each task's curvature (grows by this per task)
    prior_rel: float = 1e-3                # prior_precision = prior_rel * mean diag(C_1)
    gamma: float = 0.9                     # online-EWC decay (identity dynamics)
    q_rel: float = 0.1                     # process noise q = q_rel / mean diag(Lambda_1)
    penalty_ratio: float = 1.0             # strength calibration (module docstring)
    methods: tuple = ("seq_lora", "l2", "ewc_diag", "ewc_kfac", "filter_dlr", "filter_kfac_tridiag",
                      "filter_dlr+smooth")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

NOTES = [
    "Task 1 is trained identically (no penalty) for every method and shared; methods differ from task 2 on.",
    "filter_kfac_tridiag uses dynamics='identity' (online accumulation with gamma): TaskSequence has no "
    "closed-form noise predict step for kfac_tridiag (NotImplementedError). Process noise is used by the "
    "diag / diag+low-rank filters only.",
    "Smoothing rows: column t is the RTS-smoothed adapter m_t^s (no retraining); the last column is the "
    "filter's final adapter, so average final scores equal the filter's.",
    "Source scores (task 0) are never trained on nor used for curvature: they measure collateral forgetting.",
]


PRESETS = PresetTable("continual", {
    "small": Config(preset="small"),
    "full": Config(preset="full", seeds=(0, 1, 2), n_train=256, n_eval=100, steps=64, n_mcq=100,
                   n_source_texts=48, source_seq_len=128, proxy_batches=8, max_new_tokens=12,
                   methods=("seq_lora", "l2", "ewc_diag", "ewc_kfac", "filter_diag", "filter_dlr",
                            "filter_kfac_tridiag", "filter_diag+smooth", "filter_dlr+smooth")),
    # tests: tiny random Llama + char tokenizer, 2 tasks, 2 steps
    "tiny": Config(preset="tiny", model="tiny", tasks=[dict(t) for t in DEFAULT_TASKS[:2]], n_train=8, n_eval=3,
                   train_batch_size=2, train_seq_len=160, steps=2, lr=1e-2, r=2, alpha=4, max_new_tokens=3,
                   gen_batch_size=4, n_mcq=3, n_source_texts=2, source_seq_len=48, eval_batch_size=8,
                   proxy_batches=1, proxy_batch_size=4, rank=2, source_pos=("r",),
                   methods=("seq_lora", "filter_dlr", "filter_dlr+smooth")),
}, descriptions={"small": "CPU, 1 seed, 4 tasks (~30 min on a loaded 2-core CPU)",
                 "full": "3 seeds, 64 steps per task, 100 eval items per task (GPU recommended)",
                 "tiny": "tests: tiny random Llama, 2 tasks, 2 steps"})
PRESET_NAMES = tuple(PRESETS)
_TUPLE_KEYS = ("seeds", "methods", "target_modules", "source_pos")


def config_from_settings(settings: dict) -> Config:
    """A :class:`Config` from a settings dict (a preset's, or a result file's ``config``)."""
    settings = dict(settings)
    for key in _TUPLE_KEYS:
        settings[key] = tuple(settings[key])
    return Config(**settings)


def make_config(preset: str, seeds: int | None = None, overrides: dict | None = None) -> Config:
    """A preset's :class:`Config` with ``seeds`` (number of run seeds) and ``key=value`` overrides."""
    cfg = config_from_settings(PRESETS.resolve(preset, overrides))
    if seeds is not None:
        cfg.seeds = tuple(range(seeds))
    unknown = [m for m in cfg.methods if m not in METHOD_SPECS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHOD_SPECS)}")
    return cfg


def trained_methods(cfg: Config) -> list[str]:
    """Methods that train, in execution order: ``seq_lora`` first (it calibrates the strengths), then
    the others; the filter behind a ``+smooth`` row is added (and run) if it is not listed itself."""
    names = [m for m in cfg.methods if METHOD_SPECS[m]["family"] != "smooth"]
    for m in cfg.methods:
        base = METHOD_SPECS[m].get("of")
        if base and base not in names:
            names.append(base)
    if any(METHOD_SPECS[m]["family"] != "none" for m in names) and "seq_lora" not in names:
        names.insert(0, "seq_lora")
    return sorted(names, key=lambda m: m != "seq_lora")
