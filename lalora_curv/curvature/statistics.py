"""What a backend hands a structure, and the accumulator protocol that turns it into an operator.

Two kinds of statistics exist (LAYOUT.md):

* :class:`KroneckerBatch` (``statistics = "kronecker"``): per LoRA layer and module call, the
  layer inputs ``a`` and output gradients ``g`` of ``lora_A`` and ``lora_B`` at the terms'
  positions, one gradient per backward vector ("expand" K-FAC statistics). Backends that only
  expose finished factors (curvlinops) hand :class:`KroneckerMeans` instead.
* :class:`GradientRows` (``statistics = "gradients"``): rows ``J^T r`` in the flat LoRA order,
  one per term (``terms="token"``) or per sequence and backward vector (``terms="sequence"``).

Every structure that can be fitted returns an :class:`Accumulator` from its ``accumulator``
classmethod: ``update`` (one batch of statistics), ``all_reduce`` (sum over ranks),
``finalize`` (the operator, scaled to the mean over terms). The K-FAC family and the gradient
structures share the running sums below and differ only in ``finalize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .base import NonFiniteCurvatureError

__all__ = [
    "KroneckerCall", "KroneckerBatch", "KroneckerMeans", "GradientRows", "GradientMoment", "Accumulator",
    "KroneckerSums", "GradientSums", "dist_world_size", "dist_rank", "resolve_distributed", "all_reduce_sum",
    "NoTermsError",
]


class NoTermsError(ValueError):
    """Nothing was accumulated: the batches were empty or every label is ``-100``."""


# ---------------------------------------------------------------------------------- statistics
@dataclass
class KroneckerCall:
    """One call of one LoRA layer in one forward, rows at the term positions (``P`` rows).

    ``inputs_A: (P, d_in)`` inputs of ``lora_A``; ``inputs_B: (P, r)`` inputs of ``lora_B``
    (``A x``); ``grads_A``/``grads_B``: per backward vector ``(P, r)`` / ``(P, d_out)`` gradients
    of the loss w.r.t. the outputs of ``lora_A`` / ``lora_B``. ``input_key`` identifies the input
    tensor, so modules reading the same activation share one input covariance.
    """

    inputs_A: Tensor
    inputs_B: Tensor
    grads_A: list[Tensor]
    grads_B: list[Tensor]
    input_key: tuple = ()


@dataclass
class KroneckerBatch:
    """``calls[l]``: the :class:`KroneckerCall` s of LoRA layer ``l``; ``num_terms`` of the batch."""

    calls: list[list[KroneckerCall]]
    num_terms: int


@dataclass
class KroneckerMeans:
    """Finished K-FAC factors from a backend, per layer ``(G_A, X_A, G_B, X_B)`` (means)."""

    factors: list[tuple[Tensor, Tensor, Tensor, Tensor]]
    num_terms: int


@dataclass
class GradientMoment:
    """The exact mean second moment ``G: Tensor[numel, numel]`` over ``num_terms`` terms (backends
    that only give matvecs build it column by column)."""

    matrix: Tensor
    num_terms: int


@dataclass
class GradientRows:
    """``rows: Tensor[n, numel]`` with ``sum_rows rows^T rows = num_terms * P``."""

    rows: Tensor
    num_terms: int


# ---------------------------------------------------------------------------------- distributed
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def dist_world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def dist_rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def resolve_distributed(value) -> bool:
    """The ``distributed`` option: ``"auto"`` is on when ``torch.distributed`` is initialized with more
    than one process; True needs an initialized process group; False is off."""
    if value == "auto":
        return dist_world_size() > 1
    if value is True and _dist() is None:
        raise RuntimeError("distributed=True needs an initialized torch.distributed process group "
                           "(torchrun / accelerate launch, then dist.init_process_group)")
    if value not in (True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {value!r}")
    return bool(value)


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """Sum ``tensors`` over all ranks in place."""
    dist = _dist()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _all_reduce_int(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    all_reduce_sum([t])
    return int(t.item())


def _all_gather_rows(local: Tensor) -> Tensor:
    """Concatenate every rank's ``(n_rank, p)`` rows (ranks may hold different ``n``)."""
    dist = _dist()
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    longest = int(max(s.item() for s in sizes))
    padded = local.new_zeros(longest, local.shape[1])
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n.item())] for g, n in zip(gathered, sizes)])


# ---------------------------------------------------------------------------------- protocol
class Accumulator:
    """Reduces a backend's statistics into a structure's state (init / update / all-reduce / finalize).

    Attributes:
        statistics: "kronecker" or "gradients", what :meth:`update` consumes.
        requires: backend capabilities beyond the basic statistics (e.g. ``"cross"`` for the
            A-B cross factors of ``kfac_tridiag``); a backend that lacks one refuses by name.
    """

    statistics: ClassVar[str] = ""
    requires: ClassVar[frozenset] = frozenset()

    def update(self, stats) -> None:
        raise NotImplementedError

    def all_reduce(self) -> None:
        raise NotImplementedError

    def finalize(self, common: dict):
        raise NotImplementedError


def _check_finite(t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteCurvatureError(f"{what} contain NaN/inf (diverged model or a bf16 overflow?)")


def _add_gram(target: Tensor, first: Tensor, second: Tensor, first_gram: Tensor | None, cross: bool) -> None:
    """``target += [first, second]^T [first, second]`` (cross blocks only when ``cross``).

    ``first`` may be None (its blocks are known to be zero and are not stored: ``target`` then
    holds only the ``second`` block); ``first_gram`` is ``first^T first`` when already computed."""
    if first is None:
        target.addmm_(second.T, second)
        return
    n = first.shape[1]
    target[:n, :n] += first.T @ first if first_gram is None else first_gram
    target[n:, n:].addmm_(second.T, second)
    if cross:
        block = first.T @ second
        target[:n, n:] += block
        target[n:, :n] += block.T


class KroneckerSums(Accumulator):
    """Running sums of the K-FAC family, per layer (stacked A/B statistics, SEMANTICS §3).

    ``U_sum[l]``: sum over term positions and backward vectors of ``u u^T``, ``u = [g_A; g_B]``
    (``r + d_out``); ``V_sum[l]``: sum over positions of ``v v^T``, ``v = [a_A; a_B]``
    (``d_in + r``), with ``V_count[l]`` positions. Factors: ``U = U_sum / num_terms`` (mean over
    terms) and ``V = V_sum / V_count`` (mean over positions; a forward replayed by gradient
    checkpointing adds to both sums alike, so the mean is unchanged).

    ``zero_A[l]``: the layer's ``B`` is exactly zero, so ``g_A = s B^T g = 0`` and every A and
    A-B cross block is exactly zero (SEMANTICS §2): only the B parts are summed and stored
    (``U_sum[l]: (d_out, d_out)``, ``V_sum[l]: (r, r)``), saving the ``d_in x d_in`` input factor.
    """

    statistics = "kronecker"

    def __init__(self, lora, dtype: torch.dtype, *, cross: bool = False, skip_zero_A: bool = True):
        self.dtype, self.cross = dtype, cross
        self.shapes = [(layer.rank, layer.d_in, layer.d_out) for layer in lora.layers]
        self.zero_A = [bool(skip_zero_A and not layer.B.detach().any()) for layer in lora.layers]
        device = lora.device
        self.U_sum, self.V_sum = [], []
        for (r, d_in, d_out), zero in zip(self.shapes, self.zero_A):
            self.U_sum.append(torch.zeros((d_out, d_out) if zero else (r + d_out, r + d_out), dtype=dtype,
                                          device=device))
            self.V_sum.append(torch.zeros((r, r) if zero else (d_in + r, d_in + r), dtype=dtype, device=device))
        self.V_count = [0] * len(self.shapes)
        self.num_terms = 0
        self._device = device

    def update(self, stats) -> None:
        if isinstance(stats, KroneckerMeans):
            return self._update_means(stats)
        # Modules reading the same activation (q_proj, v_proj after one norm) share one input
        # covariance x^T x, the largest product here: computed once per batch.
        shared: dict[tuple, Tensor] = {}
        for i, calls in enumerate(stats.calls):
            zero = self.zero_A[i]
            for call in calls:
                xa, xb = call.inputs_A.to(self.dtype), call.inputs_B.to(self.dtype)
                gram = None
                if not zero:
                    key = call.input_key or (id(call),)
                    if key not in shared:
                        shared[key] = xa.T @ xa
                    gram = shared[key]
                _add_gram(self.V_sum[i], None if zero else xa, xb, gram, self.cross)
                self.V_count[i] += xb.shape[0]
                for gA, gB in zip(call.grads_A, call.grads_B, strict=True):
                    ga, gb = gA.to(self.dtype), gB.to(self.dtype)
                    _add_gram(self.U_sum[i], None if zero else ga, gb, None, self.cross)
        self.num_terms += stats.num_terms

    def _update_means(self, stats: KroneckerMeans) -> None:
        if self.cross:
            raise ValueError("finished K-FAC factors carry no A-B cross factors (needed by kfac_tridiag)")
        for i, (G_A, X_A, G_B, X_B) in enumerate(stats.factors):
            r = self.shapes[i][0]
            w = stats.num_terms
            if self.zero_A[i]:
                self.U_sum[i] += w * G_B.to(self.dtype)
                self.V_sum[i] += w * X_B.to(self.dtype)
            else:
                self.U_sum[i][:r, :r] += w * G_A.to(self.dtype)
                self.U_sum[i][r:, r:] += w * G_B.to(self.dtype)
                self.V_sum[i][: X_A.shape[0], : X_A.shape[0]] += w * X_A.to(self.dtype)
                self.V_sum[i][X_A.shape[0]:, X_A.shape[0]:] += w * X_B.to(self.dtype)
            self.V_count[i] += w
        self.num_terms += stats.num_terms

    def all_reduce(self) -> None:
        all_reduce_sum(self.U_sum + self.V_sum)
        counts = torch.tensor(self.V_count + [self.num_terms], dtype=torch.long, device=self._device)
        all_reduce_sum([counts])
        *self.V_count, self.num_terms = (int(c) for c in counts.tolist())

    def factors(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(U, V)`` per layer: gradient factors (mean over terms), input factors (mean over positions)."""
        if self.num_terms == 0:
            raise NoTermsError("no prediction terms in the batches: the iterator was empty or every label is -100")
        U = [u / self.num_terms for u in self.U_sum]
        V = []
        for (_r, _d_in, _d_out), v, c in zip(self.shapes, self.V_sum, self.V_count):
            if c == 0:
                raise ValueError("a LoRA layer never received a gradient: is it used in the forward pass?")
            V.append(v / c)
        for u, v in zip(U, V):
            _check_finite(u, "K-FAC gradient statistics")
            _check_finite(v, "K-FAC input statistics")
        return U, V

    def nonzero_blocks(self):
        """Per layer ``(r, d_in, d_out, zero_A, U, V)`` with the factors of :meth:`factors`."""
        U, V = self.factors()
        return [(r, d_in, d_out, zero, u, v) for (r, d_in, d_out), zero, u, v in zip(self.shapes, self.zero_A, U, V)]


@dataclass
class GradientSums(Accumulator):
    """Running sums of gradient rows: ``sq_sum`` (diagonal), and, when asked for, ``outer`` (the
    full second moment, dense only) or the rows themselves (for the low-rank structures)."""

    numel: int
    dtype: torch.dtype
    device: torch.device
    keep_outer: bool = False
    keep_rows: bool = False
    num_terms: int = 0
    sq_sum: Tensor = field(init=False)
    outer: Tensor | None = field(init=False, default=None)
    rows: list[Tensor] = field(init=False, default_factory=list)

    statistics: ClassVar[str] = "gradients"

    def __post_init__(self):
        self.sq_sum = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        if self.keep_outer:
            self.outer = torch.zeros(self.numel, self.numel, dtype=self.dtype, device=self.device)

    def update(self, stats: GradientRows | GradientMoment) -> None:
        if isinstance(stats, GradientMoment):
            stats = _moment_as_rows(stats, self.dtype)
        V = stats.rows.to(self.dtype)
        _check_finite(V, "per-term gradients")
        self.sq_sum += (V * V).sum(0)
        if self.outer is not None:
            self.outer.addmm_(V.T, V)
        if self.keep_rows:
            self.rows.append(V)
        self.num_terms += stats.num_terms

    def all_reduce(self) -> None:
        all_reduce_sum([self.sq_sum] + ([self.outer] if self.outer is not None else []))
        self.num_terms = _all_reduce_int(self.num_terms, self.device)
        if self.keep_rows:
            self.rows = [_all_gather_rows(self.stacked_rows())]

    def stacked_rows(self) -> Tensor:
        return torch.cat(self.rows) if self.rows else self.sq_sum.new_zeros(0, self.numel)

    def scale(self) -> float:
        if self.num_terms == 0:
            raise NoTermsError("no prediction terms in the batches: the iterator was empty or every label is -100")
        return 1.0 / self.num_terms


def _moment_as_rows(stats: GradientMoment, dtype: torch.dtype) -> GradientRows:
    """Rows ``sqrt(n lambda_i) u_i^T`` with ``rows^T rows = n G`` (eigen-decomposition of ``G``;
    eigenvalues below rounding are dropped)."""
    G = stats.matrix.to(dtype)
    _check_finite(G, "the curvature matrix")
    evals, U = torch.linalg.eigh(0.5 * (G + G.T))
    keep = evals > evals.abs().max().clamp_min(1e-300) * G.shape[0] * torch.finfo(dtype).eps
    rows = (U[:, keep] * (evals[keep] * stats.num_terms).sqrt()).T
    return GradientRows(rows, stats.num_terms)
