"""Forgetting-mitigation baselines for the LaLoRA forgetting benchmark.

Interface (used by ``benchmarks/forgetting.py``; keep it stable)::

    @dataclass
    class Baseline:
        name: str     # "migu", "milora", "corda_kpm", "intruders", "osf"
        paper: str    # citation + the exact rule implemented (one paragraph)

        def grid(self, preset: str) -> list[dict]
            # hyperparameter settings; preset "small" (CPU, 1-3 settings) or "full"
        def setup(self, model, *, lora_kwargs: dict, proxy_batches: list[dict], hp: dict,
                  seed: int) -> Prepared
            # model: the bare pretrained HF causal LM (no adapter yet), modified in place by peft;
            # lora_kwargs = dict(r=..., alpha=..., target_modules=..., dropout=...)
            # proxy_batches: source proxy batches (HF causal-LM dicts), the ones LaLoRA fits on
            # returns Prepared(model=<peft model whose requires_grad parameters are exactly what
            #                  the method trains>, cleanup=<callable removing hooks>, info=<dict>)
        def post_train(self, model, hp: dict) -> None
            # in-place post-processing after training (intruders); default no-op

    @dataclass
    class Prepared:
        model: nn.Module
        cleanup: Callable[[], None]      # no-op unless the method attached hooks (MIGU)
        info: dict                       # JSON-able facts (method, init, num_trainable, ...)
        def trainable_parameters(self) -> list[nn.Parameter]   # convenience

    BASELINES: dict[str, Baseline]       # name -> instance, in the order listed below

    lalora_on_init(model_prepared, proxy_batches, structure, strength, *, prior_precision=0.0,
                   **fit_options) -> LaplacePenalty
        # LaLoRA composed with a non-zero init: curvature fitted at the initialized adapter

Methods (each module's docstring has the paper and the exact rule):

* ``migu`` (:mod:`.migu`): LoRA with MIGU gradient masking by output magnitude (hooks).
* ``milora`` (:mod:`.milora`): LoRA initialized from the r minor singular components, base = residual.
* ``corda_kpm`` (:mod:`.corda`): peft CorDA, knowledge-preserved mode, covariance from the proxy batches.
* ``intruders`` (:mod:`.intruders`): plain LoRA, then peft's intruder-dimension reduction in ``post_train``.
* ``osf`` (:mod:`.osf`): peft OSF (orthogonal subspace fine-tuning; not LoRA: train
  ``Prepared.trainable_parameters()``; ``info["lora"] is False``).

Notes for the caller: ``setup`` modifies ``model`` in place (peft injects layers; MiLoRA, CorDA
replace base weights by residuals), so pass a fresh copy per run. CorDA's init needs float32 /
bf16 / fp16 weights (peft refuses float64). MIGU's hooks act in training mode only; call
``prepared.cleanup()`` after training.
"""

from __future__ import annotations

from .base import Baseline, Prepared
from .compose import lalora_on_init
from .corda import CorDAKPM
from .intruders import Intruders
from .migu import MIGU
from .milora import MiLoRA
from .osf import OSF

__all__ = ["Baseline", "Prepared", "BASELINES", "lalora_on_init", "MIGU", "MiLoRA", "CorDAKPM", "Intruders", "OSF"]

BASELINES: dict[str, Baseline] = {b.name: b for b in (MIGU(), MiLoRA(), CorDAKPM(), Intruders(), OSF())}
