"""Settings of the cost benchmark: what is measured per model, the issue's targets, and the presets
(one :class:`benchmarks.harness.PresetTable`; ``--set KEY=VALUE`` overrides, dotted for nested keys)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import PresetTable

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results" / "cost"

FULL_DEPTH = {"smollm2-135m": 30, "llama-3.2-1b": 16, "llama-3.2-3b": 28}
PRETTY = {"smollm2-135m": "SmolLM2-135M", "llama-3.2-1b": "Llama-3.2-1B", "llama-3.2-3b": "Llama-3.2-3B",
          "tiny": "tiny Llama"}

# (structure, kind) fitted per model; "width" models run the subset in WIDTH_FITS.
FITS = [("diag", "empirical"), ("kfac", "empirical"), ("kfac", "mc"), ("kfac_tridiag", "empirical"),
        ("kfac_delta_w", "empirical"), ("diag_lowrank", "empirical")]
WIDTH_FITS = [("diag", "empirical"), ("kfac", "empirical")]
PENALTY_STRUCTURES = ["diag", "kfac", "kfac_tridiag", "kfac_delta_w", "diag_lowrank"]
WIDTH_PENALTIES = ["diag", "kfac"]

# Targets of the issue (reported against, never used to shape results).
TARGETS = {
    "fit_ratio": {"structures": ["diag", "kfac"], "max": 1.15,
                  "text": "fit <= 1.15x one plain fwd+bwd for diag/kfac (bf16, GPU)"},
    "faster_than_curvlinops": {"text": "our kfac fit faster than curvlinops KFACLinearOperator in the same run"},
    "kfac_memory": {"max": 0.5, "text": "K-FAC state memory <= 0.5x curvlinops' factors"},
    "penalty": {"limits": {"diag": 3.0, "kfac": 3.0, "kfac_tridiag": 10.0},
                "text": "penalty <= 3% of a LoRA step (diag, kfac), <= 10% (kfac_tridiag)"},
}
ANCHOR = ("issue anchor (H100, batch 4x512, LoRA r=8 q,v, random-weight Llama shapes): curvlinops 3.0.1 KFAC "
          "factors (empirical) / one plain fwd+bwd = 1.24x (1B) and 1.47x (3B) in bf16, 1.08x / 1.13x in fp32; "
          "curvlinops' K-FAC state added ~3 GB on the 3B shape")


# laplace-torch's default GGN backend runs one backward per class above this: skipped
TYPE2_MAX_CLASSES = 256


def _spec(key: str, source: str, batch: int, seq: int, layers: int | None = None, scope: str = "all") -> dict:
    return dict(key=key, source=source, batch=batch, seq=seq, layers=layers, scope=scope)


PRESETS = PresetTable("cost", {
    # CPU, 2 cores: the committed result. Real SmolLM2 for everything; truncated random shapes for width.
    "small": dict(
        description="CPU preset: real SmolLM2-135M-Instruct (GGUF Q4_1 dequantized) fp32, batch 2x128; "
                    "width: Llama-3.2-1B/3B shapes with random weights truncated to 2/1 decoder layers, batch 1x64",
        device="cpu", dtype="float32", warmup=1, repeats=3, fit_batches=1, r=8, alpha=16,
        target_modules=["q_proj", "v_proj"], lowrank_rank=16, paired=True, sweep_repeats=2,
        models=[_spec("smollm2-135m", "gguf", 2, 128),
                _spec("llama-3.2-1b", "random", 1, 64, layers=2, scope="width"),
                _spec("llama-3.2-3b", "random", 1, 64, layers=1, scope="width")],
        seq_sweep=dict(model="smollm2-135m", seqs=[64, 128, 256], structures=["diag", "kfac"], curvlinops=True),
        rank_sweep=dict(model="smollm2-135m", ranks=[4, 8, 16], structures=["diag", "kfac"]),
        extras_models=["smollm2-135m"],  # laplace-torch / BackPACK / GGN matvec on these
    ),
    # GPU (H100): bf16, batch 4x512, full-depth random-weight shapes (the GPU machine has no GGUF).
    "full": dict(
        description="GPU preset: bf16, batch 4x512, LoRA r=8 on q,v; SmolLM2-135M / Llama-3.2-1B / Llama-3.2-3B "
                    "shapes with random weights at full depth",
        device="cuda", dtype="bfloat16", warmup=2, repeats=5, fit_batches=2, r=8, alpha=16,
        target_modules=["q_proj", "v_proj"], lowrank_rank=16, paired=True,
        models=[_spec("smollm2-135m", "random", 4, 512),
                _spec("llama-3.2-1b", "random", 4, 512),
                _spec("llama-3.2-3b", "random", 4, 512)],
        seq_sweep=dict(model="llama-3.2-1b", seqs=[128, 256, 512, 1024, 2048], structures=["diag", "kfac"],
                       curvlinops=True),
        rank_sweep=dict(model="llama-3.2-1b", ranks=[4, 8, 16], structures=["diag", "kfac"]),
        extras_models=["smollm2-135m", "llama-3.2-1b", "llama-3.2-3b"],
    ),
    # Seconds on CPU: a tiny random Llama (no GGUF, no download); used by the smoke test.
    "tiny": dict(
        description="smoke preset: tiny random Llama (vocab 128, hidden 32, 2 layers), batch 2x16",
        device="cpu", dtype="float32", warmup=0, repeats=1, fit_batches=1, r=4, alpha=8,
        target_modules=["q_proj", "v_proj"], lowrank_rank=4, paired=True,
        models=[_spec("tiny", "tiny", 2, 16), _spec("tiny-wide", "tiny", 1, 8, scope="width")],
        seq_sweep=dict(model="tiny", seqs=[8, 16], structures=["diag", "kfac"], curvlinops=True),
        rank_sweep=dict(model="tiny", ranks=[2, 4], structures=["diag", "kfac"]),
        extras_models=["tiny"],
        tiny_configs={"tiny": dict(vocab_size=128, hidden_size=32, num_layers=2),
                      "tiny-wide": dict(vocab_size=128, hidden_size=64, num_layers=1)},
    ),
}, optional={
    "type2_max_classes": f"laplace-torch's exact type-2 paths are skipped above this many classes "
                         f"(default {TYPE2_MAX_CLASSES})",
    "collect_garbage": "a full gc.collect() before each measurement (default true)",
    "sweep_repeats": "timed repeats of the sweeps (default: repeats)",
})
