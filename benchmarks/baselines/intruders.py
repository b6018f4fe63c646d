"""Intruder-dimension reduction after LoRA training, through peft.

Paper: Reece Shuttleworth, Jacob Andreas, Antonio Torralba, Pratyusha Sharma. "LoRA vs Full
Fine-tuning: An Illusion of Equivalence", arXiv:2410.21228 (2024). LoRA updates create
"intruder dimensions": top singular vectors of the fine-tuned weight that are nearly orthogonal to
every singular vector of the pretrained weight; scaling them down after training recovers
pretraining knowledge at some cost in task accuracy.

Rule implemented (peft 0.21 ``peft.tuners.lora.intruders.reduce_intruder_dimension``, applied in
:meth:`Intruders.post_train`; training itself is plain LoRA with peft's standard init, B = 0):
per LoRA layer with base ``W`` and ``W' = W + s B A``: SVDs ``W = U_0 S_0 V_0^T`` and
``W' = U S V^T``; the intruders are the indices ``i < top_k`` whose left singular vector has
``max_j |u_i . u0_j| < threshold_epsilon``; ``W'_mit = W' + (lambda - 1) sum_{i intruder}
u_i s_i v_i^T`` (``lambda = mitigation_lambda`` is the fraction of each intruder component that is
**kept**: 1 = no change, 0 = removed; peft's docstring calls it "the portion subtracted", but the
code keeps ``lambda``); the new delta ``(W'_mit - W) / s`` is truncated back to rank ``r`` by SVD
and split as ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``. Layers without intruders are copied
unchanged. peft writes the result into a new adapter (``"intruder_reduced"``) and activates it;
we copy it back into ``"default"`` and delete the extra adapter, so the model keeps one adapter
named ``"default"`` (``LoRAParams.from_model`` and the evaluation code see the reduced one).
A summary (layers, intruders found) is stored on the model as ``model.intruder_report``.

API finding: ``reduce_intruder_dimension(peft_model, old_adapter_name="default",
new_adapter_name="intruder_reduced", top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75,
logging_sink=print)`` is importable from ``peft.tuners.lora.intruders`` only (not re-exported by
``peft`` or ``peft.tuners.lora``); it is public (no underscore) and used as is.

Grid: ``mitigation_lambda`` small ``[0.75, 0.25]``, full ``[0.9, 0.75, 0.5, 0.25, 0.0]``
(``top_k = 10``, ``threshold_epsilon = 0.5``, peft's defaults, overridable through ``hp``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .base import Baseline, Prepared, check_preset, count_trainable, forked_seed, lora_config, lora_layers

__all__ = ["Intruders", "reduce_intruders_in_place"]

PAPER = (
    "Shuttleworth et al. 2024, 'LoRA vs Full Fine-tuning: An Illusion of Equivalence' (arXiv:2410.21228), via peft "
    "0.21 reduce_intruder_dimension after plain LoRA training. Rule: per layer, intruders = top_k left singular "
    "vectors of W + sBA whose max |cosine| with the base W's left singular vectors is < threshold_epsilon; "
    "W' += (lambda - 1) * (intruder components), i.e. lambda is the KEPT fraction; the new delta (W'-W)/s is "
    "truncated to rank r by SVD, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T; result copied back into adapter 'default'."
)

_TMP_ADAPTER = "intruder_reduced"


@torch.no_grad()
def reduce_intruders_in_place(peft_model, *, mitigation_lambda: float, top_k: int = 10,
                              threshold_epsilon: float = 0.5, adapter_name: str = "default") -> dict:
    """Run peft's ``reduce_intruder_dimension`` and write the result back into ``adapter_name``."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    if not 0.0 <= mitigation_lambda <= 1.0:
        raise ValueError(f"mitigation_lambda must be in [0, 1], got {mitigation_lambda}")
    log: list[str] = []
    was_training = peft_model.training
    reduce_intruder_dimension(peft_model, old_adapter_name=adapter_name, new_adapter_name=_TMP_ADAPTER,
                              top_k=int(top_k), threshold_epsilon=float(threshold_epsilon),
                              mitigation_lambda=float(mitigation_lambda),
                              logging_sink=lambda *a, **k: log.append(" ".join(map(str, a))))
    for _, layer in lora_layers(peft_model, adapter_name):
        for pair in ((layer.lora_A, "A"), (layer.lora_B, "B")):
            modules = pair[0]
            modules[adapter_name].weight.copy_(modules[_TMP_ADAPTER].weight.to(modules[adapter_name].weight.dtype))
    peft_model.set_adapter(adapter_name)
    peft_model.delete_adapter(_TMP_ADAPTER)
    peft_model.train(was_training)
    counts = {}
    for line in log:
        m = re.match(r"(.+): Intruders: (\d+)$", line)
        if m:
            counts[m.group(1)] = int(m.group(2))
        elif line.endswith(": No intruders"):
            counts[line[: -len(": No intruders")]] = 0
    report = {"mitigation_lambda": float(mitigation_lambda), "top_k": int(top_k),
              "threshold_epsilon": float(threshold_epsilon), "layers": len(counts),
              "layers_with_intruders": sum(1 for c in counts.values() if c), "intruders": sum(counts.values()),
              "per_layer": counts}
    return report


@dataclass
class Intruders(Baseline):
    name: str = "intruders"
    paper: str = field(default=PAPER)

    def grid(self, preset: str) -> list[dict]:
        check_preset(preset)
        values = [0.75, 0.25] if preset == "small" else [0.9, 0.75, 0.5, 0.25, 0.0]
        return [{"mitigation_lambda": v} for v in values]

    def setup(self, model, *, lora_kwargs, proxy_batches, hp, seed) -> Prepared:
        from peft import get_peft_model

        config = lora_config(lora_kwargs, model)  # plain LoRA, standard init (B = 0)
        with forked_seed(seed):
            peft_model = get_peft_model(model, config)
        info = {"method": self.name, "init": "lora_default (B=0)", "post_train": "reduce_intruder_dimension",
                "num_trainable": count_trainable(peft_model), **{k: hp[k] for k in sorted(hp)}}
        return Prepared(model=peft_model, info=info)

    def post_train(self, model, hp: dict) -> None:
        report = reduce_intruders_in_place(model, mitigation_lambda=float(hp["mitigation_lambda"]),
                                           top_k=int(hp.get("top_k", 10)),
                                           threshold_epsilon=float(hp.get("threshold_epsilon", 0.5)))
        model.intruder_report = report
