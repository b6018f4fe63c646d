"""Adapters over curvlinops' public operators (curvlinops-for-pytorch 3.x).

* ``kfac`` / ``kfac_delta_w``: ``KFACLinearOperator`` restricted to the LoRA parameters (its
  public ``state_dict`` gives the Kronecker factors, which our accumulators turn into operators).
* ``dense`` / ``diag`` / ``lowrank`` / ``diag_lowrank``: from the exact token-level GGN
  (``GGNLinearOperator``), Monte-Carlo Fisher (``FisherMCLinearOperator``) or empirical Fisher
  (``EFLinearOperator``) matvecs: the mean matrix by multiplying the identity in column blocks.

curvlinops cannot mask labels (SEMANTICS §6): it counts ``-100`` and padding as terms. This
backend therefore only accepts unpadded, fully labelled batches of equal shape, and says so.
For causal LMs a small wrapper returns the shifted logits with the class dimension at position 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..curvature.base import DEFAULT_MAX_DENSE, DenseTooLargeError
from ..curvature.statistics import GradientMoment, KroneckerMeans

__all__ = ["CurvlinopsBackend", "CausalLMLogits", "as_curvlinops_data", "curvlinops_matvec_operator",
           "curvlinops_kfac_factors"]

_FISHER_TYPE = {"ggn": "type-2", "mc": "mc", "empirical": "empirical"}


class CausalLMLogits(nn.Module):
    """``X`` (a dict with input_ids/attention_mask) -> shifted logits ``(N, V, T-1)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, X):
        out = self.model(input_ids=X["input_ids"], attention_mask=X.get("attention_mask"))
        return out.logits[:, :-1].transpose(1, 2)


def as_curvlinops_data(model: nn.Module, batches: list):
    """``(model_func, data, batch_size_fn, module_prefix)`` for curvlinops; refuses masked batches."""
    if not batches:
        raise ValueError("no batches given")
    if isinstance(batches[0], dict):
        data, shapes = [], set()
        for b in batches:
            extra = sorted(set(b) - {"input_ids", "attention_mask", "labels"})
            if extra:  # curvlinops calls the model with input_ids/attention_mask only: never drop a key
                raise ValueError(f"backend='curvlinops' passes only input_ids and attention_mask to the model; the "
                                 f"batch also has {extra}: use backend='hooks', which passes every model input")
            ids = b["input_ids"]
            mask = b.get("attention_mask")
            labels = b.get("labels", ids)
            if (mask is not None and not bool((mask != 0).all())) or bool((labels[:, 1:] == -100).any()):
                raise ValueError(
                    "backend='curvlinops' cannot mask labels or padding (it would count them as terms): pass "
                    "unpadded, fully labelled batches (e.g. packed text), or use backend='hooks'")
            if labels is not ids and not torch.equal(labels[:, 1:], labels[:, 1:]):
                raise ValueError("labels must be a tensor")
            shapes.add(tuple(ids.shape[1:]))
            data.append(({"input_ids": ids, "attention_mask": mask}, labels[:, 1:]))
        if len(shapes) > 1:
            raise ValueError("backend='curvlinops' needs batches of equal sequence length")
        return CausalLMLogits(model), data, (lambda X: X["input_ids"].shape[0]), "model."
    for _X, y in batches:
        if bool((y == -100).any()):
            raise ValueError("backend='curvlinops' cannot ignore -100 labels; use backend='hooks'")
    return model, [(X, y) for X, y in batches], None, ""


def _device_batches(data, device):
    out = []
    for X, y in data:
        X = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in X.items()} if isinstance(X, dict) \
            else X.to(device)
        out.append((X, y.to(device)))
    return out


def curvlinops_matvec_operator(model, lora, batches, kind, *, mc_samples=1, seed=0, progress=False):
    """The curvlinops operator of the exact (token-level, mean-reduced) GGN / MC Fisher / EF."""
    from curvlinops import EFLinearOperator, FisherMCLinearOperator, GGNLinearOperator

    model_func, data, bsf, _ = as_curvlinops_data(model, batches)
    data = _device_batches(data, lora.device)
    loss = nn.CrossEntropyLoss(reduction="mean")
    kwargs = dict(progressbar=progress, check_deterministic=False, batch_size_fn=bsf)
    if kind == "ggn":
        return GGNLinearOperator(model_func, loss, lora.params, data, **kwargs)
    if kind == "mc":
        return FisherMCLinearOperator(model_func, loss, lora.params, data, seed=seed, mc_samples=mc_samples, **kwargs)
    return EFLinearOperator(model_func, loss, lora.params, data, **kwargs)


def curvlinops_kfac_factors(model, lora, batches, kind, *, mc_samples=1, seed=0, progress=False):
    """K-FAC factors of curvlinops' ``KFACLinearOperator`` (expand) for every LoRA matrix.

    Returns a list, in flat order (per layer A then B), of ``(G, A_in)``.
    """
    from curvlinops import KFACLinearOperator

    model_func, data, bsf, prefix = as_curvlinops_data(model, batches)
    data = _device_batches(data, lora.device)
    op = KFACLinearOperator(model_func, nn.CrossEntropyLoss(reduction="mean"), lora.params, data,
                            progressbar=progress, check_deterministic=False, fisher_type=_FISHER_TYPE[kind],
                            mc_samples=mc_samples if kind == "mc" else 1, seed=seed, kfac_approx="expand",
                            batch_size_fn=bsf)
    op.compute_kronecker_factors()
    state = op.state_dict()
    inputs, grads = state["input_covariances"], state["gradient_covariances"]
    out = []
    for layer in lora.layers:
        for which in ("lora_A", "lora_B"):
            name = f"{prefix}{layer.name}.{which}.{layer.adapter_name}"
            out.append((grads[name], inputs[name]))
    return out


class CurvlinopsBackend:
    """Statistics from curvlinops for one structure's accumulator; needs every batch at once.

    :meth:`batch` only collects; :meth:`finish` hands over, for the K-FAC family, curvlinops'
    K-FAC factors (:class:`KroneckerMeans`; no A-B cross factors: ``kfac_tridiag`` is refused),
    and for the gradient structures the exact token-level mean matrix ``G`` built from matvecs
    (:class:`GradientMoment`; ``num_params <= max_dense``). Terms are always tokens: curvlinops
    has no per-sequence reduction. Computation runs in the model's dtype: bf16 models are refused
    (their statistics would be accumulated in bf16; use backend="hooks", which accumulates in fp32).
    """

    name = "curvlinops"
    provides = frozenset()

    def __init__(self, lora, statistics: str, *, kind: str, mc_samples: int, seed: int, dtype: torch.dtype,
                 max_dense: int = DEFAULT_MAX_DENSE):
        low_precision = sorted({str(p.dtype) for p in lora.params if p.dtype in (torch.bfloat16, torch.float16)})
        if low_precision:
            raise ValueError(f"backend='curvlinops' computes in the model's dtype ({', '.join(low_precision)}), so its "
                             "statistics would be accumulated in low precision; use backend='hooks' (fp32 statistics "
                             "for bf16 models) or cast the model to float32")
        if statistics == "gradients" and lora.numel > max_dense:
            raise DenseTooLargeError(f"backend='curvlinops' builds the {lora.numel} x {lora.numel} matrix from "
                                     f"matvecs: more than max_dense={max_dense} parameters; use backend='hooks'")
        self.lora, self.statistics, self.kind = lora, statistics, kind
        self.mc_samples, self.seed, self.dtype = mc_samples, seed, dtype
        self.batches: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def batch(self, model, batch):
        self.batches.append(batch)
        return None

    def finish(self, model) -> list:
        if not self.batches:
            return []
        model_func, data, _, _ = as_curvlinops_data(model, self.batches)
        num_terms = sum(int(y.numel()) for _, y in data)
        lora, dtype = self.lora, self.dtype
        if self.statistics == "kronecker":
            factors = curvlinops_kfac_factors(model, lora, self.batches, self.kind, mc_samples=self.mc_samples,
                                              seed=self.seed)
            per_layer = [(factors[2 * i][0].to(dtype), factors[2 * i][1].to(dtype), factors[2 * i + 1][0].to(dtype),
                          factors[2 * i + 1][1].to(dtype)) for i in range(len(lora.layers))]
            return [KroneckerMeans(per_layer, num_terms)]
        op = curvlinops_matvec_operator(model, lora, self.batches, self.kind, mc_samples=self.mc_samples,
                                        seed=self.seed)
        p = lora.numel
        cols = []
        for start in range(0, p, 256):
            E = torch.zeros(p, min(256, p - start), dtype=lora.params[0].dtype, device=lora.device)
            E[torch.arange(start, start + E.shape[1]), torch.arange(E.shape[1])] = 1
            cols.append((op @ E).to(dtype))
        G = torch.cat(cols, 1)
        return [GradientMoment(0.5 * (G + G.T), num_terms)]
