"""CorDA in knowledge-preserved mode (KPM), through peft's public API.

Paper: Yibo Yang, Xiaojie Li, Zhongzhu Zhou, Shuaiwen Leon Song, Jianlong Wu, Liqiang Nie, Bernard
Ghanem. "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
Task-Aware Parameter-Efficient Fine-tuning", NeurIPS 2024, arXiv:2406.05223.

Rule implemented (all of it is peft 0.21's code, ``peft.tuners.lora.corda`` and
``LoraLayer.corda_init``): for each target linear layer, the input covariance
``C = mean_calls X^T X`` is collected from the **source proxy batches** (the same batches LaLoRA
fits its curvature on), one unpadded sequence per forward call (``X`` = that sequence's token
inputs to the layer, ``T x d_in``, divided by its largest entry ``max(X)`` as peft does);
``C`` is damped (``C + 0.01 * mean(diag C) * I``, damping doubled until the inverse is accurate)
and ``W C = U S V^T`` is decomposed; KPM keeps the ``r`` components of **smallest** singular
value: ``B = U_min diag(sqrt(S_min / s))``, ``A = diag(sqrt(S_min / s)) V_min^T C^{-1}``, and the
base weight becomes the residual ``W - s B A`` (so the initial model function is unchanged up to
float32 rounding). The minor directions of ``W C`` are those least used by the source inputs, so
training them is meant to disturb the source behaviour least.

API used: ``LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm",
cache_file=None, covariance_file=None))``, ``peft.tuners.lora.corda.preprocess_corda(model,
lora_config, run_model=...)`` on the bare model, then ``peft.get_peft_model``. With both files
``None`` peft writes no cache to disk. Findings: ``preprocess_corda``'s hook computes
``input[0].squeeze(0).t() @ ...`` and so needs batch size 1 (we feed sequences one at a time,
padding stripped); it matches ``config.target_modules`` literally (``"all-linear"`` must be
expanded first, see ``resolve_target_modules``); ``corda_init`` refuses float64 weights (use
float32/bf16 for the init, cast afterwards); ``preprocess_corda`` is exported from
``peft.tuners.lora.corda`` only and ``CordaConfig`` from ``peft.tuners.lora.config`` only (not
from ``peft``), as in peft's CorDA docs. **peft 0.21.2 bug**: ``peft/tuners/lora/corda.py`` does
``from attr import dataclass`` (the ``attrs`` package) but peft does not depend on ``attrs``, so
the module fails to import where ``attrs`` is absent; lalora-curv's ``bench`` extra installs
``attrs`` (:func:`import_preprocess_corda` names the fix otherwise). peft itself is not modified.

Hyperparameters: none besides the LoRA rank (peft fixes the damping): grid ``[{}]``; optional
``hp["max_sequences"]`` caps the number of calibration sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Baseline, Prepared, check_preset, count_trainable, forked_seed, lora_config

__all__ = ["CorDAKPM", "corda_run_model", "import_preprocess_corda"]

PAPER = (
    "Yang et al. 2024, 'CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware "
    "Parameter-Efficient Fine-tuning' (NeurIPS 2024, arXiv:2406.05223), knowledge-preserved mode (KPM), via peft "
    "0.21 (init_lora_weights='corda', CordaConfig(corda_method='kpm'), preprocess_corda). Rule: input covariance C "
    "of each target layer from the source proxy sequences (one unpadded sequence per call, scaled by its max), "
    "damped; SVD of W C; the r smallest components give B = U_min sqrt(S_min/s), A = sqrt(S_min/s) V_min^T C^-1; "
    "base weight replaced by W - s B A (initial outputs unchanged)."
)


def import_preprocess_corda():
    """``peft.tuners.lora.corda.preprocess_corda`` (peft imports ``attrs`` there without declaring it:
    lalora-curv's ``bench`` extra installs ``attrs``)."""
    try:
        from peft.tuners.lora.corda import preprocess_corda
    except ModuleNotFoundError as err:
        if err.name == "attr":
            raise ModuleNotFoundError(
                "peft's CorDA needs the 'attrs' package, which peft does not declare: pip install attrs "
                "(or install lalora-curv[bench])") from None
        raise
    return preprocess_corda


def corda_run_model(model, proxy_batches, max_sequences: int | None = None):
    """A ``run_model`` callback for ``preprocess_corda``: every attended (unpadded) sequence of the
    proxy batches, one per forward call (peft's covariance hook needs batch size 1)."""
    def run():
        device = next(model.parameters()).device
        seen = 0
        with torch.no_grad():
            for batch in proxy_batches:
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                for i in range(ids.shape[0]):
                    row = ids[i] if mask is None else ids[i][mask[i].bool()]
                    if row.numel() == 0:
                        continue
                    model(input_ids=row[None].to(device))
                    seen += 1
                    if max_sequences is not None and seen >= max_sequences:
                        return
        if seen == 0:
            raise ValueError("CorDA: the proxy batches contain no tokens")
    return run


@dataclass
class CorDAKPM(Baseline):
    name: str = "corda_kpm"
    paper: str = field(default=PAPER)

    def grid(self, preset: str) -> list[dict]:
        check_preset(preset)
        return [{}]

    def setup(self, model, *, lora_kwargs, proxy_batches, hp, seed) -> Prepared:
        from peft import get_peft_model
        from peft.tuners.lora.config import CordaConfig
        preprocess_corda = import_preprocess_corda()
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"CorDA (peft corda_init) needs float32/float16/bfloat16 weights, got {dtype}; "
                            "initialize in float32 and cast the prepared model afterwards")
        corda = CordaConfig(corda_method="kpm", cache_file=None, covariance_file=None, verbose=False)
        config = lora_config(lora_kwargs, model, init_lora_weights="corda", corda_config=corda)
        was_training = model.training
        max_sequences = hp.get("max_sequences")
        preprocess_corda(model, config, run_model=corda_run_model(model, proxy_batches, max_sequences))
        model.train(was_training)
        with forked_seed(seed):
            peft_model = get_peft_model(model, config)
        info = {"method": self.name, "init": "corda kpm (peft), base = residual",
                "num_trainable": count_trainable(peft_model), "max_sequences": max_sequences}
        return Prepared(model=peft_model, info=info)
