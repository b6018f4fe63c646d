"""MiLoRA: LoRA initialized from the minor singular components of the pretrained weight.

Paper: Hanqing Wang, Yixia Li, Shuo Wang, Guanhua Chen, Yun Chen. "MiLoRA: Harnessing Minor
Singular Components for Parameter-Efficient LLM Finetuning", NAACL 2025, arXiv:2406.09044.

Rule implemented (per target weight ``W`` of shape ``(d_out, d_in)``, Conv1D transposed, SVD in
float64): ``W = U diag(S) V^T`` with ``S`` descending; the *minor* part is the ``r`` smallest
components ``W_min = U[:, -r:] diag(S[-r:]) V[:, -r:]^T``. With the LoRA scaling
``s = alpha / r`` (peft's ``scaling``):
``B = U[:, -r:] diag(sqrt(S[-r:] / s))``, ``A = diag(sqrt(S[-r:] / s)) V[:, -r:]^T``, so that
``s B A = W_min``; the frozen base weight becomes the residual ``W - s B A`` (computed from the
B, A actually stored, in float64, then cast), so the initial model function is unchanged up to
rounding (float32: ~1e-7 relative; in bf16 the residual itself is rounded to bf16, as with peft's
PiSSA/CorDA). peft 0.21 has no MiLoRA init (its ``"pissa"`` takes the *largest* components and its
``"mica"`` takes the smallest left singular vectors for a *frozen* B with A = 0): the adapter is
created with peft's public ``LoraConfig``/``get_peft_model`` and the weights are then set.

Hyperparameters: none besides the LoRA rank (shared with every method): grid ``[{}]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Baseline, Prepared, check_preset, count_trainable, forked_seed, lora_config, lora_layers

__all__ = ["MiLoRA", "milora_init_", "minor_factors"]

PAPER = (
    "Wang et al. 2024, 'MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning' "
    "(NAACL 2025, arXiv:2406.09044). Rule: W = U S V^T (float64), r smallest components; "
    "B = U_min sqrt(S_min/s), A = sqrt(S_min/s) V_min^T with s = alpha/r, so s B A = U_min S_min V_min^T; "
    "base weight replaced by the residual W - s B A; initial outputs unchanged. Adapter created with peft's "
    "LoraConfig/get_peft_model, weights set afterwards (peft has no MiLoRA init)."
)


def minor_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, A, S_min)`` in float64 from ``weight`` ``(d_out, d_in)``: ``scaling * B @ A`` = the ``r`` minor
    singular components of ``weight``."""
    if r > min(weight.shape):
        raise ValueError(f"MiLoRA needs r <= min(d_out, d_in) = {min(weight.shape)}, got r={r}")
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    S_min = S[-r:]
    root = torch.sqrt(S_min / scaling)
    B = U[:, -r:] * root
    A = root[:, None] * Vh[-r:]
    return B, A, S_min


@torch.no_grad()
def milora_init_(peft_model, adapter_name: str = "default") -> dict:
    """Overwrite every LoRA layer of ``adapter_name`` with the MiLoRA init and residualize its base weight."""
    stats = {}
    for name, layer in lora_layers(peft_model, adapter_name):
        base = layer.get_base_layer()
        fan = bool(getattr(layer, "fan_in_fan_out", False))
        W = base.weight.T if fan else base.weight
        s = float(layer.scaling[adapter_name])
        B, A, S_min = minor_factors(W, layer.r[adapter_name], s)
        lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        lora_A.copy_(A.to(lora_A.dtype))
        lora_B.copy_(B.to(lora_B.dtype))
        residual = W.to(torch.float64) - s * (lora_B.to(torch.float64) @ lora_A.to(torch.float64))
        base.weight.copy_((residual.T if fan else residual).to(base.weight.dtype))
        stats[name] = {"minor_singular_values": [float(v) for v in S_min]}
    if not stats:
        raise ValueError(f"MiLoRA: no LoRA layers with adapter {adapter_name!r}")
    return stats


@dataclass
class MiLoRA(Baseline):
    name: str = "milora"
    paper: str = field(default=PAPER)

    def grid(self, preset: str) -> list[dict]:
        check_preset(preset)
        return [{}]

    def setup(self, model, *, lora_kwargs, proxy_batches, hp, seed) -> Prepared:
        from peft import get_peft_model

        config = lora_config(lora_kwargs, model)
        with forked_seed(seed):
            peft_model = get_peft_model(model, config)
        stats = milora_init_(peft_model)
        smin = [v for s in stats.values() for v in s["minor_singular_values"]]
        info = {"method": self.name, "init": "milora (minor singular components, base = residual)",
                "num_trainable": count_trainable(peft_model), "num_layers": len(stats),
                "minor_singular_value_max": max(smin), "minor_singular_value_min": min(smin)}
        return Prepared(model=peft_model, info=info)
