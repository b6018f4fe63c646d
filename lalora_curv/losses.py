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

import inspect
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Terms", "forward_terms", "logits_at", "backward_vectors", "KINDS", "batch_to_device"]

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


# batch keys that are ours, not model inputs: labels are consumed to build the terms
_CONSUMED_KEYS = ("labels",)


def _forward_keywords(model: nn.Module) -> tuple[set[str], bool]:
    """``(names, open_kwargs)``: the keyword inputs ``model``'s forward accepts.

    peft wrappers forward ``**kwargs`` to the base model, so the base model's forward is read too
    (and (Distributed)DataParallel's wrapped module's).
    A ``**kwargs: Unpack[SomeTypedDict]`` (transformers' ``TransformersKwargs``) adds that
    TypedDict's keys; a bare ``**kwargs`` (undeclared) sets ``open_kwargs``: any key is accepted.
    """
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module  # (*inputs, **kwargs) wrappers: the wrapped model decides
    forwards = [model.forward]
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if base is not model:
            forwards.append(base.forward)
    names: set[str] = set()
    open_kwargs = False
    for position, forward in enumerate(forwards):
        try:
            params = inspect.signature(forward).parameters.values()
        except (TypeError, ValueError):  # builtins / C extensions: nothing to read
            return names, True
        wrapper_with_base = position == 0 and len(forwards) > 1
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
            elif p.kind == p.VAR_KEYWORD and not wrapper_with_base:
                declared = _typed_kwargs(p.annotation)
                if declared is None:
                    open_kwargs = True
                else:
                    names |= declared
    return names, open_kwargs


def _typed_kwargs(annotation) -> set[str] | None:
    """Keys of ``Unpack[TD]`` for a TypedDict ``TD``, else None (undeclared)."""
    if typing.get_origin(annotation) is typing.Unpack:
        (td,) = typing.get_args(annotation)
        if typing.is_typeddict(td):
            return set(td.__required_keys__) | set(td.__optional_keys__)
    return None


def _model_inputs(model: nn.Module, batch: Mapping) -> dict[str, Any]:
    """The batch's model inputs besides ``input_ids``/``attention_mask``; a key the forward does
    not accept is refused by name (never silently dropped)."""
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", *_CONSUMED_KEYS)}
    if not extra:
        return extra
    names, open_kwargs = _forward_keywords(model)
    refused = sorted(k for k in extra if k not in names)
    if refused and not open_kwargs:
        raise ValueError(
            f"batch key(s) {refused} are not inputs of {type(model).__name__}'s forward, and are not "
            "'labels': remove them from the batch (e.g. with the collator's remove_unused_columns) "
            "rather than have them ignored silently")
    return extra


def _check_labels(labels: Tensor, num_classes: int | None, what: str) -> None:
    """Labels are class/token ids in ``[0, num_classes)`` or ``-100`` (ignored); nothing else.
    ``num_classes=None`` checks the lower bound only."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor of class ids (or -100), got {labels.dtype}")
    negative = labels[(labels < 0) & (labels != IGNORE_INDEX)]
    if negative.numel():
        raise ValueError(f"{what} contain {int(negative[0])}: a label is a class/token id >= 0 or {IGNORE_INDEX} "
                         "(ignored); no other negative value is allowed")
    if num_classes is not None:
        too_large = labels[labels >= num_classes]
        if too_large.numel():
            raise ValueError(f"{what} contain {int(too_large[0])}, but the model has {num_classes} classes "
                             f"(logits' last dimension): a label must be < {num_classes} (or {IGNORE_INDEX})")


def _left_padding_positions(attention_mask: Tensor) -> Tensor | None:
    """Position ids that count attended tokens (``cumsum(mask) - 1``), as ``generate`` builds them,
    when some row has padding before an attended token (left padding); else None (the model's
    default ``0..T-1`` is already right)."""
    attended = attention_mask != 0
    seen = attended.long().cumsum(-1)
    padding_before_token = (~attended & (seen < seen[:, -1:])).any()
    if not bool(padding_before_token):
        return None
    return (seen - 1).clamp_min(0)


def _logits_of(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def logits_at(model: nn.Module, keep: Tensor, **inputs) -> Tensor:
    """Logits ``(N, len(keep), V)`` of ``model(**inputs)`` at the sequence positions ``keep`` (1-D,
    the same for every row). Where the model's forward takes ``logits_to_keep`` (transformers'
    causal LMs; read through peft and DDP wrappers as :func:`_forward_keywords` does) the vocabulary
    projection runs at those positions only; otherwise the full logits are sliced."""
    if "logits_to_keep" in _forward_keywords(model)[0]:
        return _logits_of(model(**inputs, logits_to_keep=keep))
    return _logits_of(model(**inputs))[:, keep]


def forward_terms(model: nn.Module, batch: Any) -> Terms:
    """Run the model on ``batch`` and return its prediction terms.

    ``batch`` is a dict with ``input_ids`` (``LongTensor[N, T]``), optional ``attention_mask``
    (``[N, T]``, nonzero = attended) and ``labels`` (``-100`` = ignored; defaults to
    ``input_ids`` masked by attention), or an ``(X, y)`` tuple for a classifier returning logits
    ``(N, C)``. Tensors are moved to the model's device.

    Causal LMs: position ``t`` is a term when ``labels[t+1] != -100`` and both ``t`` (its input)
    and ``t+1`` (its label) are attended, so left-padded, right-padded and unpadded copies of the
    same tokens give the same terms (SEMANTICS §1). Every other key of the dict (``position_ids``
    of packed sequences, ...) is passed to the model; a key its forward does not accept raises
    ``ValueError`` naming it. Without ``position_ids``, a left-padded batch gets position ids that
    count attended tokens (as ``generate`` does), so absolute-position models see the same
    positions as unpadded. Labels must be ``-100`` or ids in ``[0, C)`` with ``C`` the logits'
    last dimension: anything else raises ``ValueError`` naming the value.
    """
    device = _model_device(model)
    batch = batch_to_device(batch, device)
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise KeyError("causal-LM batches need 'input_ids'")
        input_ids = batch["input_ids"]
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (N, T), got shape {tuple(input_ids.shape)}")
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        _check_labels(labels, None, "labels")
        inputs = _model_inputs(model, batch)
        if "position_ids" not in inputs:
            positions = _left_padding_positions(attention_mask)
            if positions is not None and "position_ids" in _forward_keywords(model)[0]:
                inputs["position_ids"] = positions
        shifted_labels = labels[:, 1:]
        attended = attention_mask != 0
        # a term needs a real input token (t) and a real label token (t+1): with left padding the
        # last pad would otherwise "predict" the first real token
        mask = (shifted_labels != IGNORE_INDEX) & attended[:, 1:] & attended[:, :-1]
        N, T = input_ids.shape
        keep = mask.any(0).nonzero().squeeze(1)  # positions some row scores, ascending
        if "logits_to_keep" not in inputs and len(keep) < T - 1:
            # an SFT batch (labels on the answers) skips most of the V-wide logits, forward and backward
            logits = logits_at(model, keep, input_ids=input_ids, attention_mask=attention_mask, **inputs)
            mask_at_logits = mask[:, keep]
        else:
            logits = _logits_of(model(input_ids=input_ids, attention_mask=attention_mask, **inputs))[:, :-1]
            mask_at_logits = mask
        _check_labels(labels, logits.shape[-1], "labels")
        seq = torch.arange(N, device=device)[:, None].expand(N, T - 1)
        return Terms(
            logits=logits[mask_at_logits],
            targets=shifted_labels[mask],
            seq_index=seq[mask],
            num_sequences=N,
            position_mask=attended,
        )
    if len(batch) != 2:
        raise ValueError(f"a classifier batch is an (X, y) pair, got {len(batch)} items")
    X, y = batch
    model_dtype = _model_dtype(model)
    if X.is_floating_point() and model_dtype is not None and X.dtype != model_dtype:
        raise TypeError(f"batch inputs are {X.dtype} but the model's parameters are {model_dtype}: cast the "
                        f"inputs (X.to({model_dtype})) or the model")
    _check_labels(y, None, "classifier labels y")
    logits = model(X)
    if logits.ndim != 2:
        raise ValueError(f"classifier batches need logits of shape (N, C), got {tuple(logits.shape)}")
    if y.shape != logits.shape[:1]:
        raise ValueError(f"classifier labels y have shape {tuple(y.shape)}, expected ({logits.shape[0]},)")
    _check_labels(y, logits.shape[-1], "classifier labels y")
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
