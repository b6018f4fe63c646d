"""Adapters over curvlinops' public operators (curvlinops-for-pytorch 3.x).

* ``kfac``: ``KFACLinearOperator`` restricted to the LoRA parameters (its public ``state_dict``
  gives the Kronecker factors, which we hand to our own operator).
* ``dense`` / ``diag`` / ``lowrank`` / ``diag_lowrank``: from the exact token-level GGN
  (``GGNLinearOperator``), Monte-Carlo Fisher (``FisherMCLinearOperator``) or empirical Fisher
  (``EFLinearOperator``) matvecs: dense by multiplying the identity in column blocks, lowrank by
  Lanczos (``scipy.sparse.linalg.eigsh``) on matvecs.

curvlinops cannot mask labels (SEMANTICS §6): it counts ``-100`` and padding as terms. This
backend therefore only accepts unpadded, fully labelled batches of equal shape, and says so.
For causal LMs a small wrapper returns the shifted logits with the class dimension at position 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..curvature.base import DEFAULT_MAX_DENSE, DenseTooLargeError

__all__ = ["fit", "CausalLMLogits", "as_curvlinops_data", "curvlinops_matvec_operator", "curvlinops_kfac_factors"]

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
    for X, y in batches:
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


def fit(model, lora, batches, structure, kind, *, mc_samples, seed, rank, dtype, common, progress, share_inputs):
    """Build one of our operators from curvlinops' statistics/matvecs (see module docstring)."""
    from ..curvature.dense import DenseCurvature
    from ..curvature.diag import DiagCurvature
    from ..curvature.diag_lowrank import DiagLowRankCurvature
    from ..curvature.kfac import KFACCurvature
    from ..curvature.lowrank import LowRankCurvature

    common["info"]["terms"] = "token"
    if structure == "kfac":
        factors = curvlinops_kfac_factors(model, lora, batches, kind, mc_samples=mc_samples, seed=seed,
                                          progress=progress)
        pairs = [(G.to(dtype), A.to(dtype), name) for (G, A), name in zip(factors, lora.names)]
        common["info"]["terms"] = "expand"
        return KFACCurvature.from_factor_pairs(pairs, share_inputs=share_inputs, **common)
    if structure not in ("dense", "diag", "lowrank", "diag_lowrank"):
        raise ValueError(f"backend='curvlinops' does not build {structure!r} (no cross-factor or base-layer "
                         "statistics in its public API); use backend='hooks'")
    op = curvlinops_matvec_operator(model, lora, batches, kind, mc_samples=mc_samples, seed=seed, progress=progress)
    p = lora.numel
    if structure == "lowrank":
        import numpy as np
        from scipy.sparse.linalg import eigsh

        k = min(rank, p - 1)
        evals, evecs = eigsh(op.to_scipy(dtype=np.float64), k=k, which="LA")
        order = np.argsort(evals)[::-1]
        U = torch.as_tensor(evecs[:, order].copy(), dtype=dtype, device=lora.device)
        C = torch.diag(torch.as_tensor(evals[order].clip(min=0).copy(), dtype=dtype, device=lora.device))
        return LowRankCurvature(U, C, **common)
    if p > DEFAULT_MAX_DENSE:
        raise DenseTooLargeError(f"backend='curvlinops' builds {structure!r} from {p} matvecs: too many "
                                 "parameters; use backend='hooks'")
    cols = []
    for start in range(0, p, 256):
        E = torch.zeros(p, min(256, p - start), dtype=lora.params[0].dtype, device=lora.device)
        E[torch.arange(start, start + E.shape[1]), torch.arange(E.shape[1])] = 1
        cols.append((op @ E).to(dtype))
    G = torch.cat(cols, 1)
    G = 0.5 * (G + G.T)
    if structure == "dense":
        return DenseCurvature(G, **common)
    if structure == "diag":
        return DiagCurvature(G.diagonal().clone(), **common)
    evals, U = torch.linalg.eigh(G)
    evals, U = evals.flip(0)[:rank].clamp_min(0), U.flip(1)[:, :rank]
    D = (G.diagonal() - (U * U) @ evals).clamp_min(0)
    return DiagLowRankCurvature(D, U, torch.diag(evals), **common)
