"""Exact references (curvlinops GGN/EF matvecs, JVP-based forms) and the fitted structures' forms."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import harness
from benchmarks.approx_accuracy.inputs import (
    direction_summary,
    fit_label,
    qf_matrix,
    rel_error,
)

# ---------------------------------------------------------------------------------- exact references


def _curvlinops_data(model, batch, device):
    from lalora_curv.backends.curvlinops import as_curvlinops_data

    model_func, data, bsf, _ = as_curvlinops_data(model, [batch])
    data = [({k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in X.items()}, y.to(device))
            for X, y in data]
    return model_func, data, bsf


def _curvlinops_op(model, params, batch, kind: str):
    """curvlinops exact token-level GGN (type-2) or EF over ``params`` on one packed batch (mean reduction)."""
    from curvlinops import EFLinearOperator, GGNLinearOperator

    model_func, data, bsf = _curvlinops_data(model, batch, params[0].device)
    cls = GGNLinearOperator if kind == "ggn" else EFLinearOperator
    return cls(model_func, nn.CrossEntropyLoss(reduction="mean"), list(params), data, progressbar=False,
               check_deterministic=False, batch_size_fn=bsf)


def matvec_forms(model, params, batches, D: Tensor, kind: str, chunk: int) -> Tensor:
    """Exact ``d^T G d`` per batch from curvlinops' ``GGNLinearOperator`` / ``EFLinearOperator`` matvecs
    (``Tensor[num_batches, num_dirs]``). Used as the cross-check of :func:`reference_forms`."""
    rows = []
    for batch in batches:
        op = _curvlinops_op(model, params, batch, kind)
        q = [(D[:, s:s + chunk] * (op @ D[:, s:s + chunk])).sum(0).double().cpu()
             for s in range(0, D.shape[1], chunk)]
        rows.append(torch.cat(q))
    return torch.stack(rows)


def _split_columns(X: Tensor, shapes) -> list[Tensor]:
    """``X: Tensor[P, k]`` (flat columns) -> per-parameter tangents ``[k, *shape]``."""
    out, off = [], 0
    for shp in shapes:
        n = math.prod(shp)
        out.append(X[off:off + n].T.reshape(X.shape[1], *shp))
        off += n
    return out


def jvp_logits(model_func, params, X, D: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, Z)``: the model output at ``X`` and ``Z[k] = J d_k`` for the columns ``d_k`` of ``D``.

    ``torch.func.jvp`` vmapped over the columns (what curvlinops' ``JacobianLinearOperator`` does),
    returning the primal output once (no extra forward pass).
    """
    from torch.func import functional_call, jvp

    names = {id(p): n for n, p in model_func.named_parameters()}
    pnames = [names[id(p)] for p in params]
    primals = tuple(p.detach() for p in params)

    def f(*ps):
        return functional_call(model_func, dict(zip(pnames, ps)), (X,))

    tangents = _split_columns(D.to(primals[0].dtype), [p.shape for p in primals])
    with torch.no_grad():
        out, Z = torch.vmap(lambda *v: jvp(f, primals, v), out_dims=(None, 0), randomness="same")(*tangents)
    return out, Z


def reference_forms(model, params, batches, D: Tensor, chunk: int) -> dict[str, Any]:
    """Exact token-level ``d^T GGN d`` and ``d^T EF d`` per batch, from one Jacobian-vector product per
    direction (forward-mode AD through the whole model, vmapped over directions).

    With ``z = J d`` the logit tangent of term ``m`` and ``p_m`` its softmax (mean over the
    ``M = N (T-1)`` terms of a packed batch, as curvlinops' ``reduction="mean"``)::

        d^T GGN d = (1/M) sum_m sum_c p_mc (z_mc - p_m . z_m)^2   (= z^T (diag p - p p^T) z, centred form)
        d^T EF  d = (1/M) sum_m ( (p_m - e_{y_m}) . z_m )^2

    i.e. ``d^T (GGNLinearOperator @ d)`` (resp. EF) without the transposed-Jacobian pass, and both
    from the same JVP (reductions in float64). Returns per-batch ``Tensor[num_batches, num_dirs]``
    for "ggn" and "ef" (all batches have the same shape, so a union of batches is the mean of rows).
    """
    device = D.device
    rows = {"ggn": [], "ef": []}
    times = []
    for batch in batches:
        model_func, data, _ = _curvlinops_data(model, batch, device)
        (X, y), = data
        t0 = time.perf_counter()
        qg, qe = [], []
        p = r = None
        for s in range(0, D.shape[1], chunk):
            logits, Z = jvp_logits(model_func, params, X, D[:, s:s + chunk])  # (N, V, T-1), (k, N, V, T-1)
            if p is None:
                p = torch.softmax(logits.double(), dim=1)
                r = p.clone()
                r.scatter_add_(1, y[:, None, :], -torch.ones_like(y[:, None, :], dtype=r.dtype))  # p - onehot(y)
            M = y.numel()
            Z = Z.double()
            pz = (p * Z).sum(2, keepdim=True)
            qg.append(((p * (Z - pz) ** 2).sum(2).sum((1, 2)) / M).cpu())
            qe.append((((r * Z).sum(2) ** 2).sum((1, 2)) / M).cpu())
            del Z, pz
        harness.sync(device)
        times.append(time.perf_counter() - t0)
        rows["ggn"].append(torch.cat(qg))
        rows["ef"].append(torch.cat(qe))
    return {"ggn": torch.stack(rows["ggn"]), "ef": torch.stack(rows["ef"]), "seconds": times,
            "seconds_per_batch_jvp": sum(times) / (len(batches) * D.shape[1])}


# ---------------------------------------------------------------------------------- fitted structures

GRADIENT_GROUP = ("diag", "lowrank", "diag_lowrank")


def _fit_options(cfg: dict, structure: str, fit: dict, terms: str | None, **extra) -> dict:
    """The preset's settings that ``structure`` takes, plus ``extra`` unfiltered: a variant's own
    option (``share_inputs``, ``factor_dtype``) that the structure refuses is an error, not a silent
    copy of the default fit."""
    default_terms = terms or ("token" if fit["kind"] == "ggn" else "sequence")
    options = harness.fit_options_for(structure, fit["kind"], rank=cfg["rank"], seed=cfg["seed"],
                                      mc_samples=fit.get("mc_samples", 1), terms=default_terms)
    return {**options, **extra}


def fit_structures(model, lora, batches, structures, fit: dict, cfg: dict, terms: str | None = None,
                   **extra) -> dict[str, tuple[Any, float]]:
    """``{structure: (operator, fit seconds)}`` for the requested structures, one kind of fit.

    diag, lowrank and diag_lowrank come from ONE ``diag_lowrank`` fit (same per-term or per-sequence
    vectors, same MC draws): its ``diagonal()`` is ``diag(G-hat)`` (by construction ``D = diag(G-hat
    - U C U^T)``), i.e. exactly what ``structure="diag"`` stores, and its ``U, C`` are exactly the
    ``structure="lowrank"`` operator of the same rank. The views are built with the public operator
    classes; the fit time is that of the one diag_lowrank fit.
    """
    import lalora_curv as lc
    from lalora_curv.curvature import DiagCurvature, LowRankCurvature

    out: dict[str, tuple[Any, float]] = {}
    group = [st for st in structures if st in GRADIENT_GROUP]
    todo = [st for st in structures if st not in GRADIENT_GROUP] + (["diag_lowrank"] if group else [])
    for structure in todo:
        t0 = time.perf_counter()
        curv = lc.fit_curvature(model, batches, structure=structure, kind=fit["kind"], lora=lora, progress=False,
                                **_fit_options(cfg, structure, fit, terms, **extra))
        harness.sync(lora.device)
        secs = time.perf_counter() - t0
        if structure != "diag_lowrank":
            out[structure] = (curv, secs)
            continue
        common_kw = dict(kind=curv.kind, signature=curv.signature, info=dict(curv.info, derived_from="diag_lowrank"),
                         damping=curv.damping)
        for st in group:
            if st == "diag":
                out[st] = (DiagCurvature(curv.diagonal(), **common_kw), secs)
            elif st == "lowrank":
                out[st] = (LowRankCurvature(curv.U, curv.C, **common_kw), secs)
            else:
                out[st] = (curv, secs)
    return {st: out[st] for st in structures if st in out}


def _fit_result(curv, secs: float, D: Tensor) -> dict[str, Any]:
    return {"q": qf_matrix(curv, D), "seconds": secs, "nbytes": curv.nbytes, "terms": curv.info.get("terms"),
            "info": dict(curv.info)}


def fits_for(cfg: dict, fits: list[dict], vocab: int) -> list[dict]:
    """The preset's fits plus kind="ggn" where it is affordable (``auto_ggn`` and a small vocabulary:
    one backward per class; applied to the K-FAC family only, see :func:`structures_for`)."""
    out = list(fits)
    if cfg.get("auto_ggn", True) and vocab <= 4096 and not any(f["kind"] == "ggn" for f in out):
        out.append({"kind": "ggn"})
    return out


def structures_for(structures, fit: dict) -> list[str]:
    """kind="ggn" on per-term structures needs one backward per class *and* token: K-FAC family only."""
    if fit["kind"] == "ggn":
        return [st for st in structures if st in ("kfac", "kfac_tridiag", "kfac_delta_w")]
    return list(structures)


def reference_of(fit: dict) -> str:
    return "ef" if fit["kind"] == "empirical" else "ggn"


def qf_row(combo_key, setting, reference, structure, fit, names, q, q_ref, fitres=None, extra=None) -> dict:
    signed = [rel_error(float(a), float(b)) for a, b in zip(q, q_ref)]
    row = {"combo": combo_key, "setting": setting, "reference": reference, "structure": structure,
           "kind": fit.get("kind") if fit else None, "mc_samples": fit.get("mc_samples") if fit else None,
           "label": fit_label(structure, fit, (fitres or {}).get("terms")) if fit else structure,
           "directions": {n: {"q": float(a), "q_ref": float(b), "rel_err": s} for n, a, b, s in
                          zip(names, q, q_ref, signed)},
           "summary": direction_summary(names, signed)}
    if fitres is not None:
        row.update(terms=fitres["terms"], nbytes=fitres["nbytes"], fit_seconds=fitres["seconds"],
                   num_terms=fitres["info"].get("num_terms"), derived_from=fitres["info"].get("derived_from"))
    if extra:
        row.update(extra)
    return row


def fit_rows(model, lora, batches, structures, fits, D, names, q_ref: dict, cfg, key, setting, vocab, result,
              where: str, terms: str | None = None, extra_row=None) -> list[dict]:
    rows = []
    for fit in fits_for(cfg, fits, vocab):
        sts = structures_for(structures, fit)
        if not sts:
            continue
        try:
            fitted = fit_structures(model, lora, batches, sts, fit, cfg, terms=terms)
        except Exception as err:  # noqa: BLE001 - record and continue
            result["skipped"].append({"where": f"{where} {key}", "structure": sts, "fit": fit, "terms": terms,
                                      "error": f"{type(err).__name__}: {err}"})
            continue
        ref = reference_of(fit)
        for structure, (curv, secs) in fitted.items():
            fr = _fit_result(curv, secs, D)
            rows.append(qf_row(key, setting, ref, structure, fit, names, fr["q"], q_ref[ref], fr, extra=extra_row))
    return rows
