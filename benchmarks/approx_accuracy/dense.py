"""One layer, dense: the exact GGN/EF of one small LoRA module against every structure and the best
possible diag / rank-k / diag+rank-k."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import harness
from benchmarks.approx_accuracy.config import GRADIENT_STRUCTURES, SETTING_LABELS
from benchmarks.approx_accuracy.inputs import (
    fit_label,
    log,
    make_lora_model,
    median,
    packed_batches,
)
from benchmarks.approx_accuracy.references import (
    fit_structures,
    fits_for,
    matvec_forms,
    reference_of,
    structures_for,
)

# ---------------------------------------------------------------------------------- one layer, dense


def _lm_body_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    body = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise TypeError("exact_dense_ggn needs a bias-free linear output head")
    return body, head


@torch.no_grad()
def exact_dense_ggn(model, lora, batches, jvp_chunk: int = 128) -> Tensor:
    """Dense exact token-level GGN (mean over terms) of the LoRA parameters, for small LoRAs.

    With ``u_m`` the last hidden state (after the final norm) of term ``m`` and ``W`` the linear
    output head, ``logits_m = W u_m``, so ``J_m = W J_u_m`` and the GGN is
    ``(1/M) sum_m J_u_m^T K_m J_u_m`` with ``K_m = W^T (diag(p_m) - p_m p_m^T) W`` (``d x d``):
    exact (no sampling, no truncation), one backward-free pass of forward-mode AD per parameter
    (``J_u`` by ``torch.func.jvp`` vmapped over identity columns) and no per-class backward. The
    cost is ``O(M d^2 (V + p) + p^2 M d)``, affordable for one small LoRA layer.
    """
    from torch.func import functional_call, jvp

    body, head = _lm_body_and_head(model)
    W = head.weight.detach()
    dtype = torch.float32
    body_names = {id(p): n for n, p in body.named_parameters()}
    pnames = [body_names[id(p)] for p in lora.params]
    primals = tuple(p.detach() for p in lora.params)
    shapes = [p.shape for p in primals]
    P = lora.numel
    G = torch.zeros(P, P, dtype=dtype, device=W.device)
    total_terms = 0
    for batch in batches:
        ids = batch["input_ids"].to(W.device)
        mask = batch.get("attention_mask")
        mask = mask.to(W.device) if mask is not None else None

        def hidden(*params, ids=ids, mask=mask):  # this batch's inputs bound now, not looked up later
            out = functional_call(body, dict(zip(pnames, params)), args=(),
                                  kwargs={"input_ids": ids, "attention_mask": mask})
            return out.last_hidden_state[:, :-1]  # terms: positions 0..T-2 predict 1..T-1

        u = hidden(*primals)
        N, T1, d = u.shape
        M = N * T1
        Ju = torch.empty(M, d, P, dtype=dtype, device=W.device)
        for s in range(0, P, jvp_chunk):
            k = min(jvp_chunk, P - s)
            E = torch.zeros(k, P, dtype=primals[0].dtype, device=W.device)
            E[torch.arange(k), torch.arange(s, s + k)] = 1
            tangents, off = [], 0
            for shp in shapes:
                n = math.prod(shp)
                tangents.append(E[:, off:off + n].reshape(k, *shp))
                off += n
            cols = torch.vmap(lambda *v: jvp(hidden, primals, tuple(v))[1], randomness="same")(*tangents)
            Ju[:, :, s:s + k] = cols.reshape(k, M, d).permute(1, 2, 0).to(dtype)
        probs = torch.softmax((u.reshape(M, d) @ W.T).to(torch.float32), dim=-1).to(dtype)
        Wd = W.to(dtype)
        KJ = torch.empty_like(Ju)
        for m in range(M):
            p_m = probs[m]
            Wp = Wd.T @ p_m
            K = (Wd.T * p_m) @ Wd - torch.outer(Wp, Wp)
            KJ[m] = K @ Ju[m]
        G += Ju.reshape(M * d, P).T @ KJ.reshape(M * d, P)
        total_terms += M
        del Ju, KJ
    G /= total_terms
    return 0.5 * (G + G.T)


def _top_eigvecs(M: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of a symmetric matrix (dense ``eigh`` below 3000, else ARPACK)."""
    M = M.double()
    p = M.shape[0]
    if p <= 3000:
        evals, evecs = torch.linalg.eigh(M)
        return evals.flip(0)[:k], evecs.flip(1)[:, :k]
    import numpy as np
    from scipy.sparse.linalg import eigsh

    A = M.cpu().numpy()
    try:
        evals, evecs = eigsh(A, k=k, which="LA", tol=1e-10, v0=np.ones(p) / math.sqrt(p))
    except Exception:  # noqa: BLE001 - ARPACK did not converge (e.g. a large null space): dense fallback
        evals, evecs = torch.linalg.eigh(M)
        return evals.flip(0)[:k], evecs.flip(1)[:, :k]
    order = np.argsort(evals)[::-1]
    return (torch.as_tensor(evals[order].copy(), device=M.device),
            torch.as_tensor(evecs[:, order].copy(), device=M.device))


def _dense_metrics(P: Tensor, G: Tensor, UG: Tensor, k: int, nA: int, R: Tensor) -> dict[str, Any]:
    """Relative Frobenius error (whole, AA, BB, AB blocks), top-k eigenspace overlap, random-direction
    quadratic-form error of ``P`` against ``G``."""
    P, G = P.double(), G.double()
    out = {"rel_frobenius": float((P - G).norm() / G.norm())}
    blocks = {"AA": (slice(0, nA), slice(0, nA)), "BB": (slice(nA, None), slice(nA, None)),
              "AB": (slice(0, nA), slice(nA, None))}
    for name, (i, j) in blocks.items():
        gn = float(G[i, j].norm())
        out[f"rel_frobenius_{name}"] = float((P[i, j] - G[i, j]).norm()) / gn if gn > 1e-12 * float(G.norm()) else None
        out[f"norm_{name}"] = float(P[i, j].norm())
    _, UP = _top_eigvecs(P, k)
    out["topk_overlap"] = float((UP.T @ UG).pow(2).sum() / k)
    qP = (R * (P @ R)).sum(0)
    qG = (R * (G @ R)).sum(0)
    rel = [(float(a) / float(b) - 1) if float(b) != 0 else None for a, b in zip(qP, qG)]
    out["qf_random_median_abs_rel_err"] = median([abs(x) for x in rel if x is not None])
    out["qf_random_median_signed_rel_err"] = median(rel)
    return out


def run_dense_layer(base, tok, cfg: dict, device, vocab: int, progress: bool, result: dict) -> None:
    """LoRA on one small module: dense exact GGN and EF of that layer vs every structure."""
    dc = cfg["dense"]
    out = {"module": dc["module"], "k": dc["k"], "rank": cfg["rank"], "settings": {}}
    for setting in dc["settings"]:
        t_set = time.perf_counter()
        model, lora, info = make_lora_model(base, cfg, [dc["module"]], setting)
        if len(lora.layers) != 1:
            raise RuntimeError(f"dense module {dc['module']!r} matched {len(lora.layers)} layers")
        layer = lora.layers[0]
        nA = layer.A.numel()
        batches = packed_batches(tok, cfg, "proxy", dc["batch_size"], dc["seq_len"], dc["num_batches"],
                                 cfg["seed"] + 5)
        t0 = time.perf_counter()
        G = exact_dense_ggn(model, lora, batches, dc["jvp_chunk"])
        harness.sync(device)
        t_ggn = time.perf_counter() - t0
        import lalora_curv as lc

        t0 = time.perf_counter()
        EF = lc.fit_curvature(model, batches, structure="dense", kind="empirical", terms="token", lora=lora,
                              progress=False).to_dense().double()
        t_ef = time.perf_counter() - t0
        G = G.double()
        # cross-check both dense references against curvlinops matvecs on random vectors
        g = torch.Generator().manual_seed(cfg["seed"] + 11)
        V = torch.randn(lora.numel, dc["check_vectors"], generator=g).to(device)
        checks = {}
        for kind, ref in (("ggn", G), ("ef", EF)):
            qc = matvec_forms(model, lora.params, batches, V, kind, dc["check_vectors"]).mean(0)
            qd = (V.double() * (ref.to(device) @ V.double())).sum(0).cpu()
            checks[kind] = max(abs(float(a) / float(b) - 1) for a, b in zip(qd, qc))
        R = torch.randn(lora.numel, dc["n_random"], generator=g).double().to(device)
        R = R / R.norm(dim=0)
        k = dc["k"]
        kmax = max(k, cfg["rank"])
        refs = {}
        for kind, ref in (("ggn", G), ("ef", EF)):
            evals, U = _top_eigvecs(ref, kmax)
            refs[kind] = {"M": ref, "U": U[:, :k], "Ur": U[:, :cfg["rank"]], "evals": evals[:cfg["rank"]]}
        rows = []
        # oracles: the best diag / rank-r / diag+rank-r built from the exact matrix itself
        for kind, rf in refs.items():
            M = rf["M"]
            Ur, lr = rf["Ur"], rf["evals"].clamp_min(0)
            low = (Ur * lr) @ Ur.T
            oracles = {"diag": torch.diag(M.diagonal()), "lowrank": low,
                       "diag_lowrank": low + torch.diag((M.diagonal() - low.diagonal()).clamp_min(0))}
            for name, P in oracles.items():
                rows.append({"label": f"oracle {name} (from exact {kind.upper()})", "structure": name,
                             "kind": "oracle", "reference": kind, "terms": None, "nbytes": None,
                             **_dense_metrics(P, M, rf["U"], k, nA, R)})
        rows.append({"label": "exact EF (token) vs GGN", "structure": "dense", "kind": "empirical", "reference": "ggn",
                     "terms": "token", "nbytes": None, **_dense_metrics(EF, G, refs["ggn"]["U"], k, nA, R)})
        fits = [(f, "sequence") for f in fits_for(cfg, dc["seq_fits"], vocab)]
        fits += [(f, "token") for f in dc["token_fits"]]
        for fit, terms in fits:
            ref = reference_of(fit)
            structures = structures_for(dc["structures"], fit)
            if terms == "token":  # K-FAC family: "expand" statistics, no terms option
                structures = [st for st in structures if st in GRADIENT_STRUCTURES]
                if fit["kind"] == "empirical":  # dense/empirical/token is the EF reference itself
                    structures = [st for st in structures if st != "dense"]
            t0 = time.perf_counter()
            try:
                fitted = fit_structures(model, lora, batches, structures, fit, cfg, terms=terms)
            except Exception as err:  # noqa: BLE001
                result["skipped"].append({"where": f"dense {setting}", "structure": structures, "fit": fit,
                                          "terms": terms, "error": f"{type(err).__name__}: {err}"})
                continue
            for structure, (curv, secs) in fitted.items():
                P = curv.to_dense().double()
                rf = refs[ref]
                rows.append({"label": fit_label(structure, fit, terms if structure in GRADIENT_STRUCTURES else None),
                             "structure": structure, "kind": fit["kind"], "mc_samples": fit.get("mc_samples"),
                             "reference": ref, "terms": curv.info.get("terms"), "nbytes": curv.nbytes,
                             "fit_seconds": secs, "derived_from": curv.info.get("derived_from"),
                             **_dense_metrics(P, rf["M"], rf["U"], k, nA, R)})
            log(f"dense {setting}: fits {fit_label('*', fit)} terms={terms} done in "
                 f"{time.perf_counter() - t0:.0f}s", progress)
        out["settings"][setting] = {
            "label": SETTING_LABELS[setting], "num_params": lora.numel, "A_params": nA, "B_params": layer.B.numel(),
            "num_terms": sum(b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1) for b in batches),
            "ggn_seconds": t_ggn, "ef_seconds": t_ef, "check_vs_curvlinops_max_rel_diff": checks,
            "ggn_top_eigenvalues": refs["ggn"]["evals"], "ef_top_eigenvalues": refs["ef"]["evals"],
            "ggn_frobenius": float(G.norm()), "ef_frobenius": float(EF.norm()),
            "ggn_block_norms": {"AA": float(G[:nA, :nA].norm()), "BB": float(G[nA:, nA:].norm()),
                                "AB": float(G[:nA, nA:].norm())},
            "delta_w_rel_norm": info.get("delta_w_rel_norm"), "rows": rows,
            "seconds": time.perf_counter() - t_set}
        log(f"dense {setting}: done in {time.perf_counter() - t_set:.0f}s (exact GGN {t_ggn:.0f}s; check vs "
             f"curvlinops: GGN {checks['ggn']:.1e}, EF {checks['ef']:.1e})", progress)
        del model, lora, G, EF, refs
        harness.release_memory(device)
    result["dense_layer"] = out
