"""``fit_curvature``: pick a backend, loop over batches (tqdm), return a curvature operator."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..losses import KINDS, backward_vectors, forward_terms
from ..params import LoRAParams
from .base import CurvatureOperator, NonFiniteCurvatureError
from .dense import DenseCurvature
from .diag import DiagCurvature
from .diag_lowrank import DiagLowRankCurvature
from .kfac import KFACCurvature
from .kfac_delta_w import KFACDeltaWCurvature
from .kfac_tridiag import KFACTridiagCurvature
from .lowrank import LowRankCurvature, top_eigenpairs_from_factors

__all__ = ["fit_curvature", "STRUCTURES", "BACKENDS", "KRONECKER_STRUCTURES", "GRADIENT_STRUCTURES"]

logger = logging.getLogger("lalora_curv")

KRONECKER_STRUCTURES = ("kfac", "kfac_tridiag", "kfac_delta_w")
GRADIENT_STRUCTURES = ("dense", "diag", "lowrank", "diag_lowrank")
STRUCTURES = GRADIENT_STRUCTURES[:2] + ("kfac", "kfac_tridiag") + GRADIENT_STRUCTURES[2:] + ("kfac_delta_w",)
BACKENDS = ("auto", "hooks", "curvlinops", "backpack")
TERMS = ("token", "sequence")
_OPTIONS = {"terms", "rank", "mc_samples", "seed", "factor_dtype", "damping", "max_dense", "share_inputs",
            "distributed"}


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Fit with dropout off (peft's LoRA dropout included); restore the caller's mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _progress(batches, progress: bool, desc: str):
    if not progress:
        return batches
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, desc=desc, total=total, unit="batch")


def fit_curvature(model: nn.Module, batches: Iterable[Any], structure: str = "kfac", kind: str = "empirical",
                  backend: str = "auto", lora: LoRAParams | None = None, progress: bool = True,
                  **options) -> CurvatureOperator:
    """Estimate the curvature of the loss on ``batches`` w.r.t. the LoRA parameters.

    Args:
        model: a peft model (or any module with peft LoRA layers). It is run in eval mode (dropout
            off); its training flags are restored afterwards and no ``.grad`` is touched.
        batches: iterable of HF causal-LM dicts (``input_ids``, ``attention_mask``, ``labels`` with
            ``-100`` = ignored) or ``(X, y)`` tuples for classifiers.
        structure: "dense" | "diag" | "kfac" | "kfac_tridiag" | "lowrank" | "diag_lowrank" |
            "kfac_delta_w".
        kind: "ggn" (exact GGN, one backward per class) | "mc" (Monte-Carlo Fisher) |
            "empirical" (per-term gradient outer products).
        backend: "auto" (= "hooks", fastest and the only one that masks) | "hooks" |
            "curvlinops" | "backpack".
        lora: the registry; built with ``LoRAParams.from_model(model)`` if None.
        progress: show a tqdm bar over batches.
        **options:
            terms: "sequence" (default for causal LMs; one backward per batch) or "token" (exact
                per-token reference; one backward per token) for dense/diag/lowrank/diag_lowrank.
                Classifiers: a term is a sample and both coincide.
            rank: rank of lowrank/diag_lowrank (default 16).
            mc_samples: labels drawn per term for kind="mc" (default 1).
            seed: seed of the MC label sampling (default 0).
            factor_dtype: dtype of the statistics (default torch.float32, also for bf16 models).
            damping: stored on the operator, used by ``solve`` only (default 0).
            max_dense: size limit of structure="dense" (default 20000 parameters).
            share_inputs: store identical K-FAC input factors once (default True).
            distributed: "auto" (default: on when ``torch.distributed`` is initialized with more
                than one process), True or False. Each rank fits on its own batches; sums and term
                counts are all-reduced so every rank ends with the same operator, equal to the
                single-process curvature on the union of the data. MC labels use ``seed + rank``.

    Returns:
        a :class:`CurvatureOperator` whose scale is the mean over non-ignored terms.
    """
    _check_choice("structure", structure, STRUCTURES)
    _check_choice("kind", kind, KINDS)
    _check_choice("backend", backend, BACKENDS)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown fit_curvature options: {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    lora = lora if lora is not None else LoRAParams.from_model(model)
    factor_dtype = options.get("factor_dtype", torch.float32)
    if isinstance(factor_dtype, str):
        factor_dtype = getattr(torch, factor_dtype)
    if not factor_dtype.is_floating_point:
        raise TypeError(f"factor_dtype must be a floating dtype, got {factor_dtype}")
    terms_mode = options.get("terms", "sequence")
    _check_choice("terms", terms_mode, TERMS)
    damping = float(options.get("damping", 0.0))
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    mc_samples = int(options.get("mc_samples", 1))
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    seed = int(options.get("seed", 0))
    rank = int(options.get("rank", 16))
    if structure in ("lowrank", "diag_lowrank") and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if structure == "dense":
        DenseCurvature.check_size(lora.numel, int(options.get("max_dense", 20_000)))
    if backend == "auto":
        backend = "hooks"
        logger.info("fit_curvature: backend='auto' uses 'hooks'")

    info = {"backend": backend, "terms": terms_mode if structure in GRADIENT_STRUCTURES else "expand",
            "mc_samples": mc_samples if kind == "mc" else None, "seed": seed if kind == "mc" else None}
    if structure in ("lowrank", "diag_lowrank"):
        info["rank"] = rank
    common = dict(kind=kind, signature=lora.signature(), info=info, damping=damping)
    desc = f"fit {structure}/{kind}"
    device = lora.device
    _check_batches_fit_model(batches, lora)
    sync = _resolve_distributed(options.get("distributed", "auto"))
    info["distributed_world_size"] = _world_size() if sync else 1
    # independent MC draws per rank (the same seed everywhere would duplicate samples)
    generator = torch.Generator(device=device).manual_seed(seed + (_rank() if sync else 0))

    if sync and backend == "curvlinops":
        raise ValueError("backend='curvlinops' does not support distributed fitting; use backend='hooks'")
    progress = progress and _rank() == 0
    with _eval_mode(model):
        if backend == "curvlinops":
            from ..backends import curvlinops as cl_backend

            curv = cl_backend.fit(model, lora, list(batches), structure, kind, mc_samples=mc_samples, seed=seed,
                                  rank=rank, dtype=factor_dtype, common=common, progress=progress,
                                  share_inputs=options.get("share_inputs", True))
        elif structure in KRONECKER_STRUCTURES:
            if backend == "backpack":
                raise ValueError(
                    "backend='backpack' cannot build K-FAC structures on peft models: BackPACK's second-order "
                    "extensions need a graph of supported modules and peft's LoRA forward is plain tensor ops "
                    "(SEMANTICS §7); use backend='hooks' or 'curvlinops'")
            curv = _fit_kronecker(model, lora, batches, structure, kind, mc_samples, generator, factor_dtype,
                                  common, _progress(batches, progress, desc), options.get("share_inputs", True),
                                  sync)
        else:
            curv = _fit_gradient_structure(model, lora, batches, structure, kind, terms_mode, mc_samples,
                                           generator, factor_dtype, rank, common,
                                           _progress(batches, progress, desc), backend, sync)
    curv.check_finite()
    return curv


def _check_batches_fit_model(batches, lora) -> None:
    """Fail early on an iterator that cannot be re-read (generators are fine, read once)."""
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}")


# ---------------------------------------------------------------------------------- distributed
def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _dist_ready() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _dist_ready() else 0


def _resolve_distributed(value) -> bool:
    if value == "auto":
        return _world_size() > 1
    if value is True and not _dist_ready():
        raise RuntimeError("distributed=True needs an initialized torch.distributed process group "
                           "(torchrun / accelerate launch, then dist.init_process_group)")
    if value not in (True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {value!r}")
    return bool(value)


def _all_reduce_sums(tensors: list[Tensor], num_terms: int) -> int:
    """All-reduce (sum) statistics in place and return the summed term count."""
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    device = tensors[0].device if tensors else "cpu"
    count = torch.tensor([num_terms], dtype=torch.long, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return int(count.item())


def _all_reduce_counts(counts: list[int], device) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(c) for c in t.tolist()]


# ---------------------------------------------------------------------------------- K-FAC family
def _fit_kronecker(model, lora, batches, structure, kind, mc_samples, generator, dtype, common, iterator,
                   share_inputs, sync=False):
    from ..backends.hooks import KroneckerStats, LoRAHookRecorder

    stats = KroneckerStats(lora, dtype, lora.device, need_cross=structure == "kfac_tridiag")
    num_terms = 0
    with LoRAHookRecorder(lora) as recorder:
        for batch in iterator:
            recorder.clear()
            terms = forward_terms(model, batch)
            if terms.num_terms == 0:
                continue
            R = backward_vectors(terms.logits, terms.targets, kind, mc_samples=mc_samples, generator=generator,
                                 dtype=dtype)
            for k in range(R.shape[0]):
                torch.autograd.grad((terms.logits * R[k].to(terms.logits.dtype)).sum(), lora.params,
                                    retain_graph=k < R.shape[0] - 1)
            stats.add_batch(recorder, terms.position_mask)
            num_terms += terms.num_terms
            recorder.clear()
    if sync:
        num_terms = _all_reduce_sums(stats.U_sum + stats.V_sum, num_terms)
        counts = _all_reduce_counts(stats.V_count, lora.device)
        stats.V_count = counts
    if num_terms == 0:
        raise ValueError("no prediction terms in the batches: the iterator was empty or every label is -100")
    U, V = stats.factors(num_terms)
    for layer, u, v in zip(lora.layers, U, V):
        if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            raise NonFiniteCurvatureError(f"curvature statistics of {layer.name} contain NaN/inf")
    common["info"]["num_terms"] = num_terms
    return kronecker_operator_from_stacked(lora, U, V, structure, common, share_inputs)


def kronecker_operator_from_stacked(lora, U: list[Tensor], V: list[Tensor], structure: str, common: dict,
                                    share_inputs: bool = True) -> CurvatureOperator:
    """Build kfac / kfac_tridiag / kfac_delta_w from per-layer stacked factors ``U``, ``V``."""
    if structure == "kfac_tridiag":
        shapes = [(l.rank, l.d_in, l.d_out) for l in lora.layers]
        return KFACTridiagCurvature(U, V, shapes, **common)
    pairs = []
    for layer, u, v in zip(lora.layers, U, V):
        r, d_in = layer.rank, layer.d_in
        if structure == "kfac":
            pairs.append((u[:r, :r].clone(), v[:d_in, :d_in].clone(), f"{layer.A_name}"))
            pairs.append((u[r:, r:].clone(), v[d_in:, d_in:].clone(), f"{layer.B_name}"))
        else:  # kfac_delta_w: gradient w.r.t. the layer output is g_B / scaling
            s = layer.scaling
            if s == 0:
                raise ValueError(f"{layer.name}: LoRA scaling is 0, the Delta-W gradient factor is undefined")
            pairs.append((u[r:, r:] / s**2, v[:d_in, :d_in].clone(), layer.name))
    cls = KFACCurvature if structure == "kfac" else KFACDeltaWCurvature
    if structure == "kfac_delta_w":
        common["info"]["scaling_at_fit"] = [l.scaling for l in lora.layers]
    return cls.from_factor_pairs(pairs, share_inputs=share_inputs, **common)


# ---------------------------------------------------------------------------------- per-term gradients
class _GradientReducer:
    """Reduces per-term (or per-sequence) gradient vectors into a structure's state."""

    def __init__(self, structure: str, numel: int, dtype, device):
        self.structure = structure
        self.sq_sum = torch.zeros(numel, dtype=dtype, device=device)
        self.outer = torch.zeros(numel, numel, dtype=dtype, device=device) if structure == "dense" else None
        self.vectors: list[Tensor] = []

    def add(self, V: Tensor) -> None:
        if not torch.isfinite(V).all():
            raise NonFiniteCurvatureError("per-term gradients contain NaN/inf (diverged model or bf16 overflow?)")
        self.sq_sum += (V * V).sum(0)
        if self.outer is not None:
            self.outer.addmm_(V.T, V)
        if self.structure in ("lowrank", "diag_lowrank"):
            self.vectors.append(V)

    def all_reduce(self, num_terms: int) -> int:
        """Sum the state over ranks (vectors are all-gathered) and return the global term count."""
        import torch.distributed as dist

        tensors = [self.sq_sum] + ([self.outer] if self.outer is not None else [])
        num_terms = _all_reduce_sums(tensors, num_terms)
        if self.structure in ("lowrank", "diag_lowrank"):
            local = torch.cat(self.vectors) if self.vectors else self.sq_sum.new_zeros(0, self.sq_sum.numel())
            sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
            dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
            longest = int(max(s.item() for s in sizes))
            padded = local.new_zeros(longest, local.shape[1])
            padded[: local.shape[0]] = local
            gathered = [torch.empty_like(padded) for _ in sizes]
            dist.all_gather(gathered, padded)
            self.vectors = [g[: int(n.item())] for g, n in zip(gathered, sizes)]
        return num_terms

    def build(self, num_terms: int, rank: int, common: dict) -> CurvatureOperator:
        scale = 1.0 / num_terms
        if self.structure == "diag":
            return DiagCurvature(self.sq_sum * scale, **common)
        if self.structure == "dense":
            M = self.outer * scale
            return DenseCurvature(0.5 * (M + M.T), **common)
        evals, U = top_eigenpairs_from_factors(torch.cat(self.vectors), rank, scale)
        C = torch.diag(evals)
        if self.structure == "lowrank":
            return LowRankCurvature(U, C, **common)
        D = (self.sq_sum * scale - (U * U) @ evals).clamp_min(0)
        return DiagLowRankCurvature(D, U, C, **common)


def _fit_gradient_structure(model, lora, batches, structure, kind, terms_mode, mc_samples, generator, dtype, rank,
                            common, iterator, backend, sync=False):
    from ..backends.hooks import LoRAHookRecorder, per_sequence_gradients, per_term_gradients

    reducer = _GradientReducer(structure, lora.numel, dtype, lora.device)
    num_terms = 0
    per_sample = None
    if backend == "backpack":
        from ..backends.backpack import BackpackPerSampleGradients

        per_sample = BackpackPerSampleGradients(lora)
    with contextlib.ExitStack() as stack:
        recorder = stack.enter_context(LoRAHookRecorder(lora)) if per_sample is None else None
        if per_sample is not None:
            stack.enter_context(per_sample)
        for batch in iterator:
            if recorder is not None:
                recorder.clear()
            terms = forward_terms(model, batch)
            if terms.num_terms == 0:
                continue
            R = backward_vectors(terms.logits, terms.targets, kind, mc_samples=mc_samples, generator=generator,
                                 dtype=dtype)
            is_lm = terms.position_mask is not None
            if is_lm and terms_mode == "token":
                if per_sample is not None:
                    raise ValueError("backend='backpack' gives per-sequence gradients only; use terms='sequence'")
                V = per_term_gradients(terms, R, lora, dtype)
            else:
                if is_lm and kind == "ggn":
                    raise ValueError(
                        "kind='ggn' with terms='sequence' would mix positions of a sequence (biased); use "
                        "terms='token' (exact) or kind='mc' (unbiased per-sequence estimate)")
                if per_sample is not None:
                    V = per_sample.gradients(terms, R, dtype)
                else:
                    for k in range(R.shape[0]):
                        torch.autograd.grad((terms.logits * R[k].to(terms.logits.dtype)).sum(), lora.params,
                                            retain_graph=k < R.shape[0] - 1)
                    V = per_sequence_gradients(recorder, lora, terms.num_sequences, terms.position_mask, dtype)
                    V = V.reshape(-1, lora.numel)
            reducer.add(V)
            num_terms += terms.num_terms
    if sync:
        num_terms = reducer.all_reduce(num_terms)
    if num_terms == 0:
        raise ValueError("no prediction terms in the batches: the iterator was empty or every label is -100")
    common["info"]["num_terms"] = num_terms
    return reducer.build(num_terms, rank, common)
