"""Prediction terms of a batch and the backward vectors of each curvature kind.

A *term* (SEMANTICS §1) is a sample for classifiers and a predicted token for causal LMs:
position ``t`` predicts ``labels[:, t+1]``; labels ``-100`` are not terms. The curvature is the
mean over terms of ``J_m^T H_m J_m`` (``ggn``), of its Monte-Carlo estimate (``mc``), or of
``J_m^T r_m r_m^T J_m`` with ``r_m`` the gradient of the loss w.r.t. the logits (``empirical``).

Every kind is written as ``P = (1/M) sum_m sum_k J_m^T r_mk r_mk^T J_m`` with *backward vectors*
``r_mk`` (logit space):

* ``empirical``: ``k = 1``, ``r = softmax(z) - onehot(y)``;
* ``mc``: ``k = 1..S``, ``r = (softmax(z) - onehot(y_s)) / sqrt(S)``, ``y_s ~ softmax(z)``;
* ``ggn``: ``k = 1..C``, ``r_c = sqrt(p_c) (e_c - p)``, the columns of a square root of the
  cross-entropy Hessian ``diag(p) - p p^T`` (one backward per class: small output spaces only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["Terms", "forward_terms", "backward_vectors", "KINDS", "batch_to_device"]

KINDS = ("ggn", "mc", "empirical")
IGNORE_INDEX = -100


@dataclass
class Terms:
    """The prediction terms of one batch.

    Attributes:
        logits: ``Tensor[M, C]`` logits of the ``M`` terms (attached to the model's graph).
        targets: ``Tensor[M]`` class indices.
        seq_index: ``Tensor[M]`` which sequence/sample each term belongs to.
        num_sequences: ``N``, the batch size.
        position_mask: ``Tensor[N, T]`` bool, the attended positions (inputs of the K-FAC input
            factors), or None for classifiers (every sample is one position).
    """

    logits: Tensor
    targets: Tensor
    seq_index: Tensor
    num_sequences: int
    position_mask: Tensor | None

    @property
    def num_terms(self) -> int:
        return self.logits.shape[0]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def batch_to_device(batch: Any, device: torch.device):
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v.to(device) if isinstance(v, Tensor) else v for v in batch)
    raise TypeError(
        f"a batch must be an HF causal-LM dict (input_ids, attention_mask, labels) or an (X, y) tuple, "
        f"got {type(batch).__name__}"
    )


def forward_terms(model: nn.Module, batch: Any) -> Terms:
    """Run the model on ``batch`` and return its prediction terms.

    ``batch`` is a dict with ``input_ids`` (``LongTensor[N, T]``), optional ``attention_mask``
    and ``labels`` (``-100`` = ignored; defaults to ``input_ids`` masked by attention), or an
    ``(X, y)`` tuple for a classifier returning logits ``(N, C)``. Tensors are moved to the
    model's device.
    """
    device = _model_device(model)
    batch = batch_to_device(batch, device)
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise KeyError("causal-LM batches need 'input_ids'")
        input_ids = batch["input_ids"]
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits if hasattr(out, "logits") else out[0]
        shifted_labels = labels[:, 1:]
        mask = (shifted_labels != IGNORE_INDEX) & (attention_mask[:, 1:] != 0)
        N, T = input_ids.shape
        seq = torch.arange(N, device=device)[:, None].expand(N, T - 1)
        return Terms(
            logits=logits[:, :-1][mask],
            targets=shifted_labels[mask],
            seq_index=seq[mask],
            num_sequences=N,
            position_mask=attention_mask != 0,
        )
    X, y = batch
    model_dtype = _model_dtype(model)
    if X.is_floating_point() and model_dtype is not None and X.dtype != model_dtype:
        raise TypeError(f"batch inputs are {X.dtype} but the model's parameters are {model_dtype}: cast the "
                        f"inputs (X.to({model_dtype})) or the model")
    logits = model(X)
    if logits.ndim != 2:
        raise ValueError(f"classifier batches need logits of shape (N, C), got {tuple(logits.shape)}")
    keep = y != IGNORE_INDEX
    N = logits.shape[0]
    return Terms(
        logits=logits[keep],
        targets=y[keep],
        seq_index=torch.arange(N, device=logits.device)[keep],
        num_sequences=N,
        position_mask=None,
    )


def backward_vectors(logits: Tensor, targets: Tensor, kind: str, *, mc_samples: int = 1,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Iterator[Tensor]:
    """Backward vectors ``r_k: Tensor[M, C]``, one at a time, with
    ``P = (1/M) sum_{m,k} J_m^T r_mk r_mk^T J_m``.

    ``logits: Tensor[M, C]`` (detached inside), ``targets: Tensor[M]``. Computed in ``dtype``
    (fp32 by default, also for bf16 models). Yields 1 vector for ``empirical``, ``mc_samples``
    for ``mc`` and ``C`` for ``ggn``: produced class by class, never as one ``(C, M, C)`` tensor.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    z = logits.detach().to(dtype)
    p = torch.softmax(z, dim=-1)
    M, C = p.shape
    rows = torch.arange(M, device=p.device)
    if kind == "empirical":
        r = p.clone()
        r[rows, targets] -= 1.0
        yield r
        return
    if kind == "mc":
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        for _ in range(mc_samples):
            sampled = torch.multinomial(p, 1, generator=generator).squeeze(-1) if M else targets
            r = p.clone()
            r[rows, sampled] -= 1.0
            yield r / mc_samples**0.5
        return
    if C > 4096:
        raise ValueError(
            f"kind='ggn' needs one backward per class and the output space has {C} classes; "
            "use kind='mc' (unbiased) for large vocabularies"
        )
    # r_c = sqrt(p_c) (e_c - p), the columns of a square root of diag(p) - p p^T
    sqrt_p = p.sqrt()
    for c in range(C):
        r = -p * sqrt_p[:, c : c + 1]
        r[:, c] += sqrt_p[:, c]
        yield r
