"""Settings of the approximation-accuracy benchmark: fits, structures, direction types and the presets
(one :class:`benchmarks.harness.PresetTable`; ``--set KEY=VALUE`` overrides, dotted for nested keys)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import PresetTable, structures_taking

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results" / "approx_accuracy"

MC1 = {"kind": "mc", "mc_samples": 1}
MC4 = {"kind": "mc", "mc_samples": 4}
MC16 = {"kind": "mc", "mc_samples": 16}
EMP = {"kind": "empirical"}
STRUCTURES = ["diag", "kfac", "kfac_tridiag", "lowrank", "diag_lowrank"]
#: the structures built from per-term / per-sequence gradient vectors (those with a ``terms`` option)
GRADIENT_STRUCTURES = structures_taking("terms")
DIRECTION_TYPES = ["random", "target_grad", "source_grad", "finetune_disp"]
SETTING_LABELS = {
    "b0": "B=0 (peft default init)",
    "bnz": "B!=0 (gaussian A, random B)",
}


PRESETS = PresetTable("approx_accuracy", {
    # CPU, 2 cores, about 15 minutes: the committed result. Everything is cut to the bone (one
    # forward+backward of SmolLM2 on 64 tokens takes seconds on this machine).
    "small": dict(
        description="CPU preset: real SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32, eager attention; "
                    "proxy batches of 1x64 packed tokens (2 for the main comparison, up to 8 for stabilization); "
                    "2 random directions; fine-tune 4 steps",
        model="smollm2", device="cpu", seed=0, r=8, alpha=16, rank=16, bnz_rel_norm=0.05,
        lora_configs={"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"},
        combos=[["qv", "b0"], ["qv", "bnz"], ["all-linear", "bnz"]],
        source_kind="mix",
        proxy=dict(batch_size=1, seq_len=64, num_batches=2),
        structures=STRUCTURES, fits=[MC1, EMP], extra_fits={"qv/bnz": [MC4]}, n_random=2, ref_chunk=8,
        crosscheck=1,
        target=dict(task="gsm_symbolic", n_items=8, batch_size=1, seq_len=320, grad_batches=1),
        source_grad=dict(batch_size=1, seq_len=64, num_batches=1),
        finetune=dict(steps=4, lr=1e-3),
        delta_w=dict(combos=[["qv", "bnz"]], fits=[MC1, EMP], ref_chunk=4),
        kfac_memory=dict(combos=[["all-linear", "bnz"]]),
        terms=dict(combos=[["qv", "bnz"]], batch_size=1, seq_len=16, num_batches=1,
                   structures=["diag", "lowrank", "diag_lowrank"], fits=[MC1, EMP]),
        dense=dict(module="layers.29.self_attn.v_proj", settings=["bnz"], batch_size=1, seq_len=32,
                   num_batches=1, seq_fits=[MC1, MC16, EMP], token_fits=[MC1, EMP],
                   structures=["dense"] + STRUCTURES, k=8, n_random=8, jvp_chunk=512, check_vectors=2),
        stabilization=dict(combo=["qv", "b0"], num_batches=[1, 2, 4, 8],
                           structures=["diag", "kfac", "lowrank", "diag_lowrank"], fits=[MC1]),
    ),
    # GPU (H100), fp32: bigger batches and more directions, the same code path.
    "full": dict(
        description="GPU preset: real SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32, eager attention; "
                    "proxy 4 packed batches of 4x256 tokens; 8 random directions",
        model="smollm2", device="cuda", seed=0, r=8, alpha=16, rank=16, bnz_rel_norm=0.05,
        lora_configs={"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"},
        combos=[["qv", "b0"], ["qv", "bnz"], ["all-linear", "b0"], ["all-linear", "bnz"]],
        source_kind="mix",
        proxy=dict(batch_size=4, seq_len=256, num_batches=4),
        structures=STRUCTURES, fits=[MC1, MC4, MC16, EMP], n_random=8, ref_chunk=4, crosscheck=2,
        target=dict(task="gsm_symbolic", n_items=128, batch_size=4, seq_len=384, grad_batches=4),
        source_grad=dict(batch_size=4, seq_len=256, num_batches=2),
        finetune=dict(steps=60, lr=5e-4),
        delta_w=dict(combos=[["qv", "b0"], ["qv", "bnz"], ["all-linear", "bnz"]], fits=[MC1, MC4, EMP],
                     ref_chunk=2),
        kfac_memory=dict(combos=[["qv", "bnz"], ["all-linear", "bnz"]]),
        terms=dict(combos=[["qv", "b0"], ["qv", "bnz"]], batch_size=2, seq_len=64, num_batches=1,
                   structures=["diag", "lowrank", "diag_lowrank"], fits=[MC1, MC4, EMP]),
        dense=dict(module="layers.15.self_attn.v_proj", settings=["bnz", "b0"], batch_size=2, seq_len=128,
                   num_batches=2, seq_fits=[MC1, MC16, EMP], token_fits=[MC1, MC4, EMP],
                   structures=["dense"] + STRUCTURES, k=8, n_random=16, jvp_chunk=256, check_vectors=4),
        stabilization=dict(combo=["qv", "b0"], num_batches=[1, 2, 4, 8],
                           structures=["diag", "kfac", "lowrank", "diag_lowrank"], fits=[MC1, EMP]),
    ),
    # Seconds on CPU: tiny random Llama (vocab 97, so kind="ggn" is feasible); used by the smoke test.
    "tiny": dict(
        description="smoke preset: tiny random Llama (vocab 97, hidden 32, 2 layers), fp32",
        model="tiny", device="cpu", seed=0, r=4, alpha=8, rank=4, bnz_rel_norm=0.05,
        lora_configs={"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"},
        combos=[["qv", "b0"], ["qv", "bnz"], ["all-linear", "bnz"]],
        source_kind="pydoc",
        proxy=dict(batch_size=2, seq_len=16, num_batches=2),
        structures=STRUCTURES, fits=[MC1, EMP], n_random=2, ref_chunk=8, crosscheck=2,
        target=dict(task="basic_arithmetic", n_items=4, batch_size=2, seq_len=48, grad_batches=1),
        source_grad=dict(batch_size=2, seq_len=16, num_batches=1),
        finetune=dict(steps=2, lr=1e-2),
        delta_w=dict(combos=[["qv", "bnz"]], fits=[MC1, EMP], ref_chunk=4),
        kfac_memory=dict(combos=[["qv", "bnz"]]),
        terms=dict(combos=[["qv", "bnz"]], batch_size=1, seq_len=8, num_batches=1,
                   structures=["diag", "lowrank", "diag_lowrank"], fits=[MC1, EMP]),
        dense=dict(module="layers.1.self_attn.v_proj", settings=["bnz"], batch_size=2, seq_len=8,
                   num_batches=1, seq_fits=[MC1, EMP], token_fits=[MC1, EMP],
                   structures=["dense"] + STRUCTURES, k=4, n_random=4, jvp_chunk=64, check_vectors=2),
        stabilization=dict(combo=["qv", "b0"], num_batches=[1, 2, 4],
                           structures=["diag", "kfac", "lowrank", "diag_lowrank"], fits=[MC1]),
    ),
}, optional={
    "auto_ggn": "also fit kind='ggn' where the vocabulary is small (default true)",
    "extra_fits": "{'config/setting': [fit, ...]} fits added for one combo (default none)",
})
