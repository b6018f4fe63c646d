"""Exact sum of curvature operators (e.g. ``kfac + kfac``: a sum of Kronecker products is not a
Kronecker product, so we keep the terms)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CurvatureOperator
from .dense import _merged_common

__all__ = ["SumCurvature"]


class SumCurvature(CurvatureOperator):
    """``P = sum_i P_i``; flattens nested sums. ``terms`` keep their own structure."""

    structure = "sum"

    def __init__(self, terms, **common):
        flat = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, SumCurvature) else [t])
        if not flat:
            raise ValueError("SumCurvature needs at least one term")
        spaces = {t.space for t in flat}
        if len(spaces) > 1:
            raise ValueError(f"cannot sum curvatures over different spaces: {sorted(spaces)}")
        self.terms = flat
        self.space = flat[0].space
        if not common:
            merged = flat[0]._common()
            for t in flat[1:]:
                merged = _merged_common(_Proxy(merged), t)
            common = merged
        common.pop("num_params", None)
        super().__init__(flat[0].num_params, **common)

    def _matmat(self, X: Tensor) -> Tensor:
        out = self.terms[0]._matmat(X)
        for t in self.terms[1:]:
            out = out + t._matmat(X)
        return out

    def quadratic_form(self, delta, lora=None) -> Tensor:
        return sum(t.quadratic_form(delta, lora) for t in self.terms)

    def diagonal(self) -> Tensor:
        return torch.stack([t.diagonal() for t in self.terms]).sum(0)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.terms)

    @property
    def dtype(self):
        return self.terms[0].dtype

    @property
    def device(self):
        return self.terms[0].device

    def state_tensors(self):
        return {f"term{i}.{k}": v for i, t in enumerate(self.terms) for k, v in t.state_tensors().items()}

    def psd_parts(self):
        # a sum of PSD terms is PSD: the union of the terms' parts
        vectors, matrices = [], []
        for t in self.terms:
            v, m = t.psd_parts()
            vectors += v
            matrices += m
        return vectors, matrices

    def state_meta(self):
        return {"terms": [{"structure": t.structure, "meta": t.state_meta(), "common": t._common()
                           | {"num_params": t.num_params}} for t in self.terms]}

    @classmethod
    def from_state(cls, tensors, meta, common):
        terms = []
        for i, spec in enumerate(meta["terms"]):
            prefix = f"term{i}."
            sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            sub_cls = CurvatureOperator.registry[spec["structure"]]
            terms.append(sub_cls.from_state(sub, spec["meta"], dict(spec["common"])))
        common = dict(common)
        return cls(terms, **common)

    def _scaled(self, alpha):
        return SumCurvature([alpha * t for t in self.terms], **self._common())

    def _add_same(self, other):
        # another exact term; structures that add in closed form were handled by their own _add_same
        return SumCurvature(self.terms + [other])


class _Proxy:
    """Lets ``_merged_common`` fold over several operators' metadata."""

    def __init__(self, common: dict):
        self.kind, self.signature, self.info, self.damping = (
            common["kind"], common["signature"], common["info"], common["damping"])
