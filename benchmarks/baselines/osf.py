"""OSF: orthogonal subspace fine-tuning, through peft's ``OSFConfig`` (its own parameterization).

Paper: Nikhil Shivakumar Nayak, Krishnateja Killamsetty, Ligong Han, Abhishek Bhandwaldar, Prateek
Chanda, Kai Xu, Hao Wang, Aldo Pareja, Oleg Silkin, Mustafa Eyceoglu, Akash Srivastava.
"Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning",
arXiv:2504.07097 (2025); implemented in peft as OSF ("Orthogonal Subspace Fine-tuning").

Rule implemented (all of it peft 0.21's ``peft.tuners.osf``): for each target linear layer
``W = U S V^T`` (float32 SVD); the top ``k = effective_rank`` singular triplets (``U_high``,
``S_high``, ``V_high``) are frozen, the remaining ``min(d_out, d_in) - k`` (``U_low``, ``S_low``,
``V_low``) are trainable, initialized from the SVD (the model is unchanged at init). The layer
computes ``W x + (U_low diag(S_low) V_low - U_low0 diag(S_low0) V_low0) x``; tensor hooks project
the gradients of ``U_low`` (``(I - U_high U_high^T) g``) and ``V_low`` (``g (I - V_high^T
V_high)``) onto the orthogonal complement of the frozen high subspace; ``S_low`` is unconstrained.
It is not LoRA: the trainable parameters are peft's ``osf_svd_params`` (``Prepared.model`` is a
``PeftModel`` with ``peft_type == "OSF"``; ``lalora_curv.finetune`` / ``LoRAParams`` do not apply,
train ``Prepared.trainable_parameters()`` with an ordinary loop). No dropout (``lora_kwargs
["dropout"]`` is ignored), no LoRA scaling.

Hyperparameters (our choice of parameterization): ``hp["trainable_rank"]`` = the trainable rank
per layer (``effective_rank = min(d_out, d_in) - trainable_rank``, set per module through
``OSFConfig.rank_pattern``; ``None`` = the LoRA rank ``r`` of ``lora_kwargs``, which gives
``(d_out + d_in + 1) r`` trainable parameters per layer, LoRA's budget plus ``r``), or
``hp["effective_rank"]`` (an int, or a float in (0, 1] = fraction of ``min(d_out, d_in)``
preserved, peft's own meaning; peft's default is 0.5). Grid: small
``[{"trainable_rank": None}, {"effective_rank": 0.5}]``; full adds ``trainable_rank = 4r`` and
``effective_rank = 0.75``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .base import Baseline, Prepared, check_preset, count_trainable, forked_seed, resolve_target_modules

__all__ = ["OSF", "osf_config"]

PAPER = (
    "Nayak et al. 2025, 'Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning' "
    "(arXiv:2504.07097), peft 0.21 OSFConfig/OSFModel. Rule: per target weight W = U S V^T, top effective_rank "
    "triplets frozen, the rest (U_low, S_low, V_low) trainable from the SVD init; the gradients of U_low and V_low "
    "are projected onto the orthogonal complement of U_high / V_high by tensor hooks; not LoRA (no dropout, no "
    "scaling). Trainable rank per layer = min(d_out, d_in) - effective_rank (hp trainable_rank, None = LoRA r)."
)


def _is_target(name: str, targets) -> bool:
    """peft's matching rule for ``target_modules``: a string is a full-match regex, a list matches a
    module name exactly or as a ``.``-separated suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def osf_config(model: nn.Module, lora_kwargs: dict, hp: dict):
    """peft ``OSFConfig`` for ``model`` from our ``lora_kwargs`` (targets, rank) and ``hp``."""
    from peft import OSFConfig

    targets = resolve_target_modules(model, lora_kwargs.get("target_modules", ("q_proj", "v_proj")))
    if "effective_rank" in hp and hp.get("trainable_rank") is not None:
        raise ValueError("OSF: give either effective_rank or trainable_rank, not both")
    if "effective_rank" in hp:
        return OSFConfig(effective_rank=hp["effective_rank"], target_modules=targets, task_type="CAUSAL_LM")
    trainable = hp.get("trainable_rank")
    trainable = int(lora_kwargs["r"]) if trainable is None else int(trainable)
    pattern = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _is_target(name, targets):
            min_dim = min(module.weight.shape)
            if trainable >= min_dim:
                raise ValueError(f"OSF: trainable rank {trainable} must be < min(d_out, d_in) = {min_dim} ({name})")
            pattern["^" + re.escape(name) + "$"] = min_dim - trainable
    if not pattern:
        raise ValueError(f"OSF: target_modules {targets!r} match no linear layer")
    return OSFConfig(effective_rank=None, target_modules=targets, rank_pattern=pattern, task_type="CAUSAL_LM")


@dataclass
class OSF(Baseline):
    name: str = "osf"
    paper: str = field(default=PAPER)

    def grid(self, preset: str) -> list[dict]:
        check_preset(preset)
        small = [{"trainable_rank": None}, {"effective_rank": 0.5}]
        if preset == "small":
            return small
        return small + [{"trainable_rank": "4r"}, {"effective_rank": 0.75}]

    def setup(self, model, *, lora_kwargs, proxy_batches, hp, seed) -> Prepared:
        from peft import get_peft_model

        hp = dict(hp)
        if hp.get("trainable_rank") == "4r":
            hp["trainable_rank"] = 4 * int(lora_kwargs["r"])
        config = osf_config(model, lora_kwargs, hp)
        with forked_seed(seed):
            peft_model = get_peft_model(model, config)
        from peft.tuners.osf.layer import OSFLayer

        layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, OSFLayer)]
        if not layers:
            raise ValueError("OSF: no target layer was adapted")
        ranks = {n: int(m.effective_rank["default"]) for n, m in layers}
        if "effective_rank" not in hp:
            trainable = int(lora_kwargs["r"]) if hp.get("trainable_rank") is None else int(hp["trainable_rank"])
            wrong = [n for n, m in layers if min(m.get_base_layer().weight.shape) - ranks[n] != trainable]
            if wrong:
                raise ValueError(f"OSF: trainable rank {trainable} is not available in {wrong[:3]} "
                                 "(it must be < min(d_out, d_in))")
        info = {"method": self.name, "init": "osf svd (model unchanged)", "num_trainable": count_trainable(peft_model),
                "num_layers": len(layers), "trainable_rank_hp": hp.get("trainable_rank"),
                "effective_rank_hp": hp.get("effective_rank"),
                "effective_rank_min": min(ranks.values()), "effective_rank_max": max(ranks.values()),
                "lora": False, "dropout_ignored": float(lora_kwargs.get("dropout", 0.0))}
        return Prepared(model=peft_model, info=info)
