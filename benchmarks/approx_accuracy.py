"""Approximation-accuracy benchmark: curvature structures vs the exact GGN / empirical Fisher.

Run::

    python -m benchmarks.approx_accuracy --preset small                 # CPU, real SmolLM2-135M, ~15 min
    python -m benchmarks.approx_accuracy --preset full --device cuda    # GPU, bigger batches, same code

On SmolLM2-135M-Instruct (the packaged GGUF, i.e. a *dequantized Q4_1* model) with LoRA r=8 on
q,v and on all linear layers, each curvature structure of ``lalora_curv.fit_curvature`` (diag,
kfac, kfac_tridiag, lowrank, diag_lowrank; kfac_delta_w on its own Delta-W space) is compared
with an **exact** reference restricted to the LoRA parameters:

* exact token-level GGN (= type-2 Fisher; curvlinops ``GGNLinearOperator``) for ``kind="mc"``
  (and ``kind="ggn"`` where the vocabulary is small enough, i.e. not at 49k);
* exact token-level empirical Fisher (curvlinops ``EFLinearOperator``) for ``kind="empirical"``.

Both references are used through matrix-vector products only, on *packed* (unpadded, fully
labelled, equal-length) proxy text batches, because curvlinops cannot mask (SEMANTICS §6); so
no dense matrix of the full size is ever formed. What is measured:

1. ``qf``: relative error of ``d^T P d`` vs ``d^T G d`` along random Gaussian directions, the
   target-loss gradient (gsm_symbolic SFT) and the source-loss gradient (held-out source text) at
   theta0, and the real fine-tuning displacement ``theta_t - theta0`` of a short LoRA fine-tune
   on gsm_symbolic, per LoRA config and per anchor setting: ``b0`` = peft's default init (B = 0,
   so every A-block and A-B cross block is exactly zero and kfac_tridiag == kfac, SEMANTICS §2)
   and ``bnz`` = Gaussian A (peft ``init_lora_weights="gaussian"``) plus a random non-zero B.
2. ``delta_w``: kfac_delta_w against the exact GGN/EF of the *base weights* of the adapted layers
   (the loss depends on ``W + Delta W``, so that GGN is exactly the Delta-W GGN), along random,
   gradient and displacement directions in Delta-W space.
3. ``terms``: ``terms="sequence"`` vs ``terms="token"`` for diag/lowrank/diag_lowrank on a few
   tokens (token-level fitting back-propagates once per token).
4. ``dense_layer``: LoRA on one small module (one ``v_proj``): dense exact GGN and EF of that
   layer, relative Frobenius error (whole matrix and A/B/cross blocks) and top-k eigenspace
   overlap of every structure, plus the best possible diag / rank-k / diag+rank-k ("oracle").
5. ``kfac_memory``: what K-FAC's memory savings cost (shared input factors: exact; bf16 factors).
6. ``stabilization``: fits on 1, 2, 4, 8 proxy batches vs the 8-batch fit and vs the exact GGN
   on the union of the 8 batches (the LaLoRA paper says 1-2 batches suffice).

Everything is recorded in one JSON (machine, versions, config, all numbers), a markdown report
and PNG plots: ``<output-dir>/<preset>-<device>.{json,md}`` and ``...-*.png``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import common
from .common import fmt, fmt_bytes, markdown_table

__all__ = ["PRESETS", "run_benchmark", "write_outputs", "exact_dense_ggn", "main"]

MC1 = {"kind": "mc", "mc_samples": 1}
MC4 = {"kind": "mc", "mc_samples": 4}
MC16 = {"kind": "mc", "mc_samples": 16}
EMP = {"kind": "empirical"}
STRUCTURES = ["diag", "kfac", "kfac_tridiag", "lowrank", "diag_lowrank"]
GRADIENT_STRUCTURES = ("dense", "diag", "lowrank", "diag_lowrank")
DIRECTION_TYPES = ["random", "target_grad", "source_grad", "finetune_disp"]
SETTING_LABELS = {
    "b0": "B=0 (peft default init)",
    "bnz": "B!=0 (gaussian A, random B)",
}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, 2 cores, about 15 minutes: the committed result. Everything is cut to the bone (one
    # forward+backward of SmolLM2 on 64 tokens takes seconds on this machine).
    "small": dict(
        description="CPU preset: real SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32, eager attention; "
                    "proxy batches of 1x64 packed tokens (2 for the main comparison, up to 8 for stabilization); "
                    "2 random directions; fine-tune 4 steps",
        model="smollm2", device="cpu", seed=0, r=8, alpha=16, rank=16, bnz_rel_norm=0.05,
        lora_configs={"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"},
        combos=[["qv", "b0"], ["qv", "bnz"], ["all-linear", "bnz"]],
        source_kind="mix",
        proxy=dict(batch_size=1, seq_len=64, num_batches=2),
        structures=STRUCTURES, fits=[MC1, EMP], extra_fits={"qv/bnz": [MC4]}, n_random=2, ref_chunk=8,
        crosscheck=1,
        target=dict(task="gsm_symbolic", n_items=8, batch_size=1, seq_len=320, grad_batches=1),
        source_grad=dict(batch_size=1, seq_len=64, num_batches=1),
        finetune=dict(steps=4, lr=1e-3),
        delta_w=dict(combos=[["qv", "bnz"]], fits=[MC1, EMP], ref_chunk=4),
        kfac_memory=dict(combos=[["all-linear", "bnz"]]),
        terms=dict(combos=[["qv", "bnz"]], batch_size=1, seq_len=16, num_batches=1,
                   structures=["diag", "lowrank", "diag_lowrank"], fits=[MC1, EMP]),
        dense=dict(module="layers.29.self_attn.v_proj", settings=["bnz"], batch_size=1, seq_len=32,
                   num_batches=1, seq_fits=[MC1, MC16, EMP], token_fits=[MC1, EMP],
                   structures=["dense"] + STRUCTURES, k=8, n_random=8, jvp_chunk=512, check_vectors=2),
        stabilization=dict(combo=["qv", "b0"], num_batches=[1, 2, 4, 8],
                           structures=["diag", "kfac", "lowrank", "diag_lowrank"], fits=[MC1]),
    ),
    # GPU (H100), fp32: bigger batches and more directions, the same code path.
    "full": dict(
        description="GPU preset: real SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32, eager attention; "
                    "proxy 4 packed batches of 4x256 tokens; 8 random directions",
        model="smollm2", device="cuda", seed=0, r=8, alpha=16, rank=16, bnz_rel_norm=0.05,
        lora_configs={"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"},
        combos=[["qv", "b0"], ["qv", "bnz"], ["all-linear", "b0"], ["all-linear", "bnz"]],
        source_kind="mix",
        proxy=dict(batch_size=4, seq_len=256, num_batches=4),
        structures=STRUCTURES, fits=[MC1, MC4, MC16, EMP], n_random=8, ref_chunk=4, crosscheck=2,
        target=dict(task="gsm_symbolic", n_items=128, batch_size=4, seq_len=384, grad_batches=4),
        source_grad=dict(batch_size=4, seq_len=256, num_batches=2),
        finetune=dict(steps=60, lr=5e-4),
        delta_w=dict(combos=[["qv", "b0"], ["qv", "bnz"], ["all-linear", "bnz"]], fits=[MC1, MC4, EMP],
                     ref_chunk=2),
        kfac_memory=dict(combos=[["qv", "bnz"], ["all-linear", "bnz"]]),
        terms=dict(combos=[["qv", "b0"], ["qv", "bnz"]], batch_size=2, seq_len=64, num_batches=1,
                   structures=["diag", "lowrank", "diag_lowrank"], fits=[MC1, MC4, EMP]),
        dense=dict(module="layers.15.self_attn.v_proj", settings=["bnz", "b0"], batch_size=2, seq_len=128,
                   num_batches=2, seq_fits=[MC1, MC16, EMP], token_fits=[MC1, MC4, EMP],
                   structures=["dense"] + STRUCTURES, k=8, n_random=16, jvp_chunk=256, check_vectors=4),
        stabilization=dict(combo=["qv", "b0"], num_batches=[1, 2, 4, 8],
                           structures=["diag", "kfac", "lowrank", "diag_lowrank"], fits=[MC1, EMP]),
    ),
    # Seconds on CPU: tiny random Llama (vocab 97, so kind="ggn" is feasible); used by the smoke test.
    "tiny": dict(
        description="smoke preset: tiny random Llama (vocab 97, hidden 32, 2 layers), fp32",
        model="tiny", device="cpu", seed=0, r=4, alpha=8, rank=4, bnz_rel_norm=0.05,
        lora_configs={"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"},
        combos=[["qv", "b0"], ["qv", "bnz"], ["all-linear", "bnz"]],
        source_kind="pydoc",
        proxy=dict(batch_size=2, seq_len=16, num_batches=2),
        structures=STRUCTURES, fits=[MC1, EMP], n_random=2, ref_chunk=8, crosscheck=2,
        target=dict(task="basic_arithmetic", n_items=4, batch_size=2, seq_len=48, grad_batches=1),
        source_grad=dict(batch_size=2, seq_len=16, num_batches=1),
        finetune=dict(steps=2, lr=1e-2),
        delta_w=dict(combos=[["qv", "bnz"]], fits=[MC1, EMP], ref_chunk=4),
        kfac_memory=dict(combos=[["qv", "bnz"]]),
        terms=dict(combos=[["qv", "bnz"]], batch_size=1, seq_len=8, num_batches=1,
                   structures=["diag", "lowrank", "diag_lowrank"], fits=[MC1, EMP]),
        dense=dict(module="layers.1.self_attn.v_proj", settings=["bnz"], batch_size=2, seq_len=8,
                   num_batches=1, seq_fits=[MC1, EMP], token_fits=[MC1, EMP],
                   structures=["dense"] + STRUCTURES, k=4, n_random=4, jvp_chunk=64, check_vectors=2),
        stabilization=dict(combo=["qv", "b0"], num_batches=[1, 2, 4],
                           structures=["diag", "kfac", "lowrank", "diag_lowrank"], fits=[MC1]),
    ),
}

# ---------------------------------------------------------------------------------- small helpers


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[approx_accuracy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _fit_label(structure: str, fit: dict, terms: str | None = None) -> str:
    kind = fit["kind"]
    label = f"{structure}/{kind}"
    if kind == "mc":
        label += f"x{fit.get('mc_samples', 1)}"
    if terms == "token":
        label += "/token"
    return label


def _rel(q: float, q_ref: float) -> float | None:
    """Signed relative error ``q / q_ref - 1`` (None where the reference is 0)."""
    if q_ref == 0 or not math.isfinite(q_ref):
        return None if q != 0 else 0.0
    return q / q_ref - 1.0


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    v = 100 * x
    if abs(v) >= 1000:
        return f"{v:+.2g}%".replace("e+0", "e").replace("e+", "e")
    if abs(v) >= 10:
        return f"{v:+.0f}%"
    return f"{v:+.1f}%"


def _median(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def _direction_summary(names: list[str], signed: list[float | None]) -> dict[str, Any]:
    """Per direction type: signed relative error (random: median of |.| and median signed)."""
    out: dict[str, Any] = {}
    rnd = [s for n, s in zip(names, signed) if n.startswith("random")]
    if rnd:
        out["random"] = _median([abs(s) if s is not None else None for s in rnd])
        out["random_signed"] = _median(rnd)
    for n, s in zip(names, signed):
        if not n.startswith("random"):
            out[n] = s
    return out


def _qf_matrix(curv, D: Tensor) -> Tensor:
    """``diag(D^T P D)`` for the columns of ``D``."""
    D = D.to(device=curv.device, dtype=curv.dtype)
    return (D * curv.matmat(D)).sum(0).double().cpu()


def _set_eager(model) -> None:
    """curvlinops multiplies with forward-mode AD, which the CPU SDPA kernel lacks: use eager attention
    for every computation (fits and references alike)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover
        model.config._attn_implementation = "eager"


# ---------------------------------------------------------------------------------- model and data


def load_base(cfg: dict, device: torch.device, model_path: str | None = None):
    """``(model, tokenizer)`` of the preset: the packaged SmolLM2 GGUF (or ``model_path``) or a tiny Llama."""
    from lalora_curv.experiments import models

    if cfg["model"] == "tiny":
        model, tok = models.tiny_llama(seed=cfg["seed"]), models.tiny_tokenizer()
        model.to(device)
    else:
        model, tok = models.load_model(model_path, device=device)
    _set_eager(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def make_lora_model(base, cfg: dict, targets, setting: str):
    """A deep copy of ``base`` with LoRA (r, alpha of the preset) on ``targets`` in anchor ``setting``.

    ``b0``: peft's default init (Kaiming A, B = 0). ``bnz``: Gaussian A (std 1/r) and a random B
    scaled per layer so that ``||s B A||_F = bnz_rel_norm * ||W||_F``.
    """
    from lalora_curv import LoRAParams
    from lalora_curv.experiments.models import add_lora

    model = add_lora(copy.deepcopy(base), r=cfg["r"], alpha=cfg["alpha"], target_modules=targets,
                     init="default" if setting == "b0" else "gaussian", seed=cfg["seed"])
    model.eval()
    lora = LoRAParams.from_model(model)
    info: dict[str, Any] = {"setting": setting, "label": SETTING_LABELS[setting], "lora_numel": lora.numel,
                            "num_layers": len(lora.layers)}
    if setting == "bnz":
        g = torch.Generator().manual_seed(cfg["seed"] + 1000)
        ratios = []
        with torch.no_grad():
            for layer in lora.layers:
                B = torch.randn(layer.B.shape, generator=g).to(layer.B)
                dW = layer.scaling * (B @ layer.A)
                c = cfg["bnz_rel_norm"] * layer.base_weight().norm() / dW.norm()
                layer.B.copy_(c * B)
                ratios.append(float(layer.delta_w().norm() / layer.base_weight().norm()))
        info["delta_w_rel_norm"] = statistics.mean(ratios)
    return model, lora, info


def packed_batches(tok, cfg: dict, split: str, batch_size: int, seq_len: int, num_batches: int, seed: int):
    """``num_batches`` packed (unpadded, fully labelled) LM batches of ``batch_size x seq_len`` tokens."""
    from lalora_curv.experiments.data import lm_batches, source_texts

    n = 32
    while True:
        texts = source_texts(cfg["source_kind"], split, n=n, seed=seed)
        batches = lm_batches(texts, tok, batch_size=batch_size, seq_len=seq_len, packed=True, drop_last=True)
        if len(batches) >= num_batches:
            return batches[:num_batches]
        n *= 2


def target_batches(tok, cfg: dict):
    from lalora_curv.experiments.data import reasoning_items, reasoning_sft_batches

    t = cfg["target"]
    items = reasoning_items(t["task"], "train", n=t["n_items"], seed=cfg["seed"])
    return reasoning_sft_batches(items, tok, batch_size=t["batch_size"], seq_len=t["seq_len"], pad_to_longest=True)


# ---------------------------------------------------------------------------------- directions


def loss_gradients(model, lora, batches, want_delta_w: bool = False) -> tuple[Tensor, Tensor | None]:
    """Gradient of the mean loss over ``batches`` w.r.t. the flat LoRA vector (and w.r.t. the flat
    Delta-W space: the gradient of the base weights of the adapted layers, since the loss depends on
    ``W + Delta W``)."""
    from lalora_curv.training import count_terms, task_loss_sum

    weights = [layer.base.weight for layer in lora.layers] if want_delta_w else []
    for layer in lora.layers:
        if layer.fan_in_fan_out:
            raise NotImplementedError("Conv1D bases are not used by this benchmark")
    for p in lora.params:
        p.grad = None
    for w in weights:
        w.grad = None
        w.requires_grad_(True)
    total = sum(count_terms(b) for b in batches)
    model.eval()
    try:
        for b in batches:
            (task_loss_sum(model, b) / total).backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in zip(lora.names, lora.params)}
        g = lora.flatten(grads).detach().clone()
        gw = torch.cat([w.grad.reshape(-1) for w in weights]).detach().clone() if want_delta_w else None
    finally:
        for p in lora.params:
            p.grad = None
        for w in weights:
            w.grad = None
            w.requires_grad_(False)
    return g, gw


def flat_delta_w(lora, params: dict[str, Tensor] | None = None) -> Tensor:
    """Flat Delta-W space vector ``s B A`` of every layer (current values, or those in ``params``)."""
    parts = []
    for layer in lora.layers:
        A = layer.A if params is None else params[layer.A_name]
        B = layer.B if params is None else params[layer.B_name]
        parts.append(layer.delta_w(A.to(layer.A), B.to(layer.B)).reshape(-1))
    return torch.cat(parts).detach()


def make_directions(model, lora, tok, cfg: dict, device, want_delta_w: bool, progress: bool) -> dict[str, Any]:
    """Random, target-gradient, source-gradient and fine-tuning-displacement directions (theta space and,
    if asked, Delta-W space). The LoRA parameters are restored to theta0 afterwards."""
    from lalora_curv.training import finetune

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(cfg["seed"] + 7)
    names = [f"random_{i}" for i in range(cfg["n_random"])]
    cols = [torch.randn(lora.numel, generator=g) for _ in names]
    dw_cols = []
    num_dw = sum(l.d_out * l.d_in for l in lora.layers)
    if want_delta_w:
        dw_cols = [torch.randn(num_dw, generator=g) for _ in names]
    tb = target_batches(tok, cfg)
    gb = tb[: cfg["target"]["grad_batches"]]
    sg = cfg["source_grad"]
    sb = packed_batches(tok, cfg, "eval", sg["batch_size"], sg["seq_len"], sg["num_batches"], cfg["seed"] + 1)
    tg, tgw = loss_gradients(model, lora, gb, want_delta_w)
    sgr, sgw = loss_gradients(model, lora, sb, want_delta_w)
    names += ["target_grad", "source_grad"]
    cols += [tg.cpu(), sgr.cpu()]
    if want_delta_w:
        dw_cols += [tgw.cpu(), sgw.cpu()]
    # real fine-tuning displacement theta_t - theta0
    theta0 = lora.snapshot()
    flat0 = lora.flatten().detach().clone()
    dw0 = flat_delta_w(lora)
    ft = cfg["finetune"]
    res = finetune(model, tb, steps=ft["steps"], lr=ft["lr"], seed=cfg["seed"], progress=False, lora=lora)
    disp = (lora.flatten(res.params) - flat0).cpu()
    dw_disp = (flat_delta_w(lora, res.params) - dw0).cpu() if want_delta_w else None
    with torch.no_grad():
        for n, p in zip(lora.names, lora.params):
            p.copy_(theta0[n])
    model.eval()
    names.append("finetune_disp")
    cols.append(disp)
    if want_delta_w:
        dw_cols.append(dw_disp)
    D = torch.stack(cols, 1)
    D = (D / D.norm(dim=0).clamp_min(1e-30)).to(device)
    out = {"names": names, "D": D, "finetune_losses": res.column("task_loss"),
           "finetune_disp_norm": float(disp.norm()), "theta0_norm": float(flat0.norm()),
           "seconds": time.perf_counter() - t0, "target_num_batches": len(tb)}
    if want_delta_w:
        DW = torch.stack(dw_cols, 1)
        out["DW"] = (DW / DW.norm(dim=0).clamp_min(1e-30)).to(device)
    _log(f"directions ready in {out['seconds']:.1f}s (finetune loss {out['finetune_losses'][0]:.3f} -> "
         f"{out['finetune_losses'][-1]:.3f})", progress)
    return out


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
        common.sync(device)
        times.append(time.perf_counter() - t0)
        rows["ggn"].append(torch.cat(qg))
        rows["ef"].append(torch.cat(qe))
    return {"ggn": torch.stack(rows["ggn"]), "ef": torch.stack(rows["ef"]), "seconds": times,
            "seconds_per_batch_jvp": sum(times) / (len(batches) * D.shape[1])}


# ---------------------------------------------------------------------------------- fitted structures

GRADIENT_GROUP = ("diag", "lowrank", "diag_lowrank")


def _fit_options(cfg: dict, structure: str, fit: dict, terms: str | None, **extra) -> dict:
    options = dict(rank=cfg["rank"], seed=cfg["seed"], **extra)
    if fit["kind"] == "mc":
        options["mc_samples"] = fit.get("mc_samples", 1)
    if structure in GRADIENT_STRUCTURES:
        options["terms"] = terms or ("token" if fit["kind"] == "ggn" else "sequence")
    return options


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
        common.sync(lora.device)
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
    return {"q": _qf_matrix(curv, D), "seconds": secs, "nbytes": curv.nbytes, "terms": curv.info.get("terms"),
            "info": dict(curv.info)}


def _fits_for(cfg: dict, fits: list[dict], vocab: int) -> list[dict]:
    """The preset's fits plus kind="ggn" where it is affordable (``auto_ggn`` and a small vocabulary:
    one backward per class; applied to the K-FAC family only, see :func:`_structures_for`)."""
    out = list(fits)
    if cfg.get("auto_ggn", True) and vocab <= 4096 and not any(f["kind"] == "ggn" for f in out):
        out.append({"kind": "ggn"})
    return out


def _structures_for(structures, fit: dict) -> list[str]:
    """kind="ggn" on per-term structures needs one backward per class *and* token: K-FAC family only."""
    if fit["kind"] == "ggn":
        return [st for st in structures if st in ("kfac", "kfac_tridiag", "kfac_delta_w")]
    return list(structures)


def _ref_of(fit: dict) -> str:
    return "ef" if fit["kind"] == "empirical" else "ggn"


def _row(combo_key, setting, reference, structure, fit, names, q, q_ref, fitres=None, extra=None) -> dict:
    signed = [_rel(float(a), float(b)) for a, b in zip(q, q_ref)]
    row = {"combo": combo_key, "setting": setting, "reference": reference, "structure": structure,
           "kind": fit.get("kind") if fit else None, "mc_samples": fit.get("mc_samples") if fit else None,
           "label": _fit_label(structure, fit, (fitres or {}).get("terms")) if fit else structure,
           "directions": {n: {"q": float(a), "q_ref": float(b), "rel_err": s} for n, a, b, s in
                          zip(names, q, q_ref, signed)},
           "summary": _direction_summary(names, signed)}
    if fitres is not None:
        row.update(terms=fitres["terms"], nbytes=fitres["nbytes"], fit_seconds=fitres["seconds"],
                   num_terms=fitres["info"].get("num_terms"), derived_from=fitres["info"].get("derived_from"))
    if extra:
        row.update(extra)
    return row


def _fit_rows(model, lora, batches, structures, fits, D, names, q_ref: dict, cfg, key, setting, vocab, result,
              where: str, terms: str | None = None, extra_row=None) -> list[dict]:
    rows = []
    for fit in _fits_for(cfg, fits, vocab):
        sts = _structures_for(structures, fit)
        if not sts:
            continue
        try:
            fitted = fit_structures(model, lora, batches, sts, fit, cfg, terms=terms)
        except Exception as err:  # noqa: BLE001 - record and continue
            result["skipped"].append({"where": f"{where} {key}", "structure": sts, "fit": fit, "terms": terms,
                                      "error": f"{type(err).__name__}: {err}"})
            continue
        ref = _ref_of(fit)
        for structure, (curv, secs) in fitted.items():
            fr = _fit_result(curv, secs, D)
            rows.append(_row(key, setting, ref, structure, fit, names, fr["q"], q_ref[ref], fr, extra=extra_row))
    return rows


# ---------------------------------------------------------------------------------- one combo


def run_combo(base, tok, cfg: dict, config_name: str, setting: str, device, vocab: int, progress: bool,
              result: dict) -> None:
    """Quadratic-form fidelity (+ delta_w, terms, kfac_memory, stabilization where configured)."""
    combo = [config_name, setting]
    key = f"{config_name}/{setting}"
    want_dw = combo in cfg["delta_w"]["combos"]
    want_terms = combo in cfg["terms"]["combos"]
    want_mem = combo in cfg["kfac_memory"]["combos"]
    stab = cfg["stabilization"]
    want_stab = combo == stab["combo"]
    _log(f"=== {key}: building model", progress)
    model, lora, info = make_lora_model(base, cfg, cfg["lora_configs"][config_name], setting)
    info.update(config=config_name, targets=cfg["lora_configs"][config_name])
    result["combos"][key] = info
    px = cfg["proxy"]
    n_proxy = max(px["num_batches"], max(stab["num_batches"]) if want_stab else 0)
    proxy = packed_batches(tok, cfg, "proxy", px["batch_size"], px["seq_len"], n_proxy, cfg["seed"])
    main_batches = proxy[: px["num_batches"]]
    dirs = make_directions(model, lora, tok, cfg, device, want_dw, progress)
    names, D = dirs["names"], dirs["D"]
    info["directions"] = {k: v for k, v in dirs.items() if k not in ("D", "DW")}

    # exact references on every proxy batch (the main experiment uses the first num_batches of them)
    t0 = time.perf_counter()
    refs = reference_forms(model, lora.params, proxy, D, cfg["ref_chunk"])
    nb = px["num_batches"]
    q_ref = {"ggn": refs["ggn"][:nb].mean(0), "ef": refs["ef"][:nb].mean(0)}
    info["reference"] = {"method": "torch.func.jvp (one JVP per direction and batch; centred z^T H z, float64)",
                         "seconds_per_batch_jvp": refs["seconds_per_batch_jvp"], "num_batches": len(proxy),
                         "per_batch_q_ggn": refs["ggn"], "per_batch_q_ef": refs["ef"],
                         "q_ggn": q_ref["ggn"], "q_ef": q_ref["ef"]}
    _log(f"{key}: exact GGN+EF forms on {len(proxy)} batches in {time.perf_counter() - t0:.0f}s "
         f"({refs['seconds_per_batch_jvp']:.2f}s per batch-JVP)", progress)
    if cfg.get("crosscheck") and not result["crosscheck"]:
        run_crosscheck(model, lora.params, main_batches[:1], D, cfg, key, "theta", refs, result, progress)
    result["qf"].append(_row(key, setting, "ggn", "exact EF (token)", {"kind": "empirical"}, names, q_ref["ef"],
                             q_ref["ggn"], extra={"label": "exact EF vs GGN", "nbytes": None}))

    # fitted structures vs the exact references
    fits = cfg["fits"] + [f for f in cfg.get("extra_fits", {}).get(key, []) if f not in cfg["fits"]]
    result["qf"] += _fit_rows(model, lora, main_batches, cfg["structures"], fits, D, names, q_ref, cfg, key,
                              setting, vocab, result, "qf")
    _log(f"{key}: fitted structures done", progress)
    if want_mem:
        run_kfac_memory(model, lora, main_batches, D, names, q_ref["ef"], cfg, key, result)
        _log(f"{key}: kfac memory variants done", progress)
    if want_stab:
        run_stabilization(model, lora, proxy, refs, D, names, cfg, key, result, progress)
    if want_dw:
        run_delta_w(model, lora, main_batches, dirs["DW"], names, cfg, key, setting, vocab, result, progress)
    if want_terms:
        run_terms(model, lora, tok, cfg, key, setting, D, names, result, progress)
    del model, lora, dirs, D
    common.release_memory(device)


def run_crosscheck(model, params, batches, D, cfg, key, space, refs, result, progress) -> None:
    """The JVP-based references against curvlinops' GGN/EF operators (matvecs) on a few directions."""
    k = max(1, int(cfg["crosscheck"]))
    out = {"combo": key, "space": space, "num_dirs": k, "num_batches": len(batches)}
    for kind in ("ggn", "ef"):
        t0 = time.perf_counter()
        qm = matvec_forms(model, params, batches, D[:, :k], kind, k).mean(0)
        out[f"{kind}_seconds_per_batch_matvec"] = (time.perf_counter() - t0) / (k * len(batches))
        qj = refs[kind][: len(batches)].mean(0)[:k]
        out[f"{kind}_max_rel_diff"] = max(abs(float(a) / float(b) - 1) for a, b in zip(qj, qm))
    result["crosscheck"].append(out)
    _log(f"{key}: cross-check vs curvlinops operators: GGN {out['ggn_max_rel_diff']:.1e}, EF "
         f"{out['ef_max_rel_diff']:.1e} ({out['ggn_seconds_per_batch_matvec']:.1f}s per GGN batch-matvec)", progress)


def run_kfac_memory(model, lora, batches, D, names, q_ef, cfg, key, result) -> None:
    """Memory-saving variants of the K-FAC family (deterministic kind="empirical", so every
    difference is the variant's own): shared input factors (the default) vs not shared, and bf16
    factors (used as stored, i.e. bf16 arithmetic, and upcast to fp32 after fitting)."""
    for structure in ("kfac", "kfac_tridiag"):
        variants = [("fp32, shared inputs (default)", {}), ("fp32, unshared inputs", {"share_inputs": False}),
                    ("bf16 factors", {"factor_dtype": torch.bfloat16})]
        if structure == "kfac_tridiag":
            variants = [v for v in variants if "unshared" not in v[0]]  # stacked factors, nothing shared
        base = None
        for label, extra in variants:
            try:
                (curv, secs), = fit_structures(model, lora, batches, [structure], EMP, cfg, **extra).values()
            except Exception as err:  # noqa: BLE001
                result["skipped"].append({"where": f"kfac_memory {key}", "structure": structure, "variant": label,
                                          "error": f"{type(err).__name__}: {err}"})
                continue
            outs = [(label, _qf_matrix(curv, D), curv.nbytes)]
            if "bf16" in label:
                outs.append(("bf16 factors, upcast to fp32 for use", _qf_matrix(curv.to(dtype=torch.float32), D),
                             curv.nbytes))
            for lab, q, nbytes in outs:
                if base is None:
                    base = (q, nbytes)
                vs_default = [_rel(float(a), float(b)) for a, b in zip(q, base[0])]
                result["kfac_memory"].append({
                    "combo": key, "structure": structure, "variant": lab, "nbytes": nbytes,
                    "nbytes_vs_default": nbytes / base[1],
                    "max_abs_rel_diff_vs_default": max(abs(x) for x in vs_default if x is not None),
                    "vs_exact_ef": _direction_summary(names, [_rel(float(a), float(b)) for a, b in zip(q, q_ef)]),
                    "fit_seconds": secs})


def run_terms(model, lora, tok, cfg, key, setting, D, names, result, progress) -> None:
    """terms="sequence" vs terms="token" on a few tokens, each against the exact references on them."""
    tc = cfg["terms"]
    batches = packed_batches(tok, cfg, "proxy", tc["batch_size"], tc["seq_len"], tc["num_batches"], cfg["seed"] + 3)
    refs = reference_forms(model, lora.params, batches, D, cfg["ref_chunk"])
    q_ref = {k: refs[k].mean(0) for k in ("ggn", "ef")}
    ntok = sum(b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1) for b in batches)
    for terms in ("sequence", "token"):
        t0 = time.perf_counter()
        result["terms"] += _fit_rows(model, lora, batches, tc["structures"], tc["fits"], D, names, q_ref,
                                     dict(cfg, auto_ggn=False), key, setting, 0, result, "terms", terms=terms,
                                     extra_row={"num_tokens": ntok})
        _log(f"{key}: terms={terms} fits on {ntok} tokens done in {time.perf_counter() - t0:.0f}s", progress)


def run_stabilization(model, lora, proxy, refs, D, names, cfg, key, result, progress) -> None:
    """Fits on the first n of the proxy batches, n in num_batches, vs the fit on all of them and vs the
    exact GGN / EF on the union (also: the exact curvature on the first n batches vs the union)."""
    stab = cfg["stabilization"]
    ns = stab["num_batches"]
    nmax = max(ns)
    union = {k: refs[k][:nmax].mean(0) for k in ("ggn", "ef")}
    out = {"combo": key, "num_batches": ns, "batch_shape": [cfg["proxy"]["batch_size"], cfg["proxy"]["seq_len"]],
           "curves": []}
    for kind in ("ggn", "ef"):
        if not any(_ref_of(f) == kind for f in stab["fits"]):
            continue
        per_n = []
        for n in ns:
            qn = refs[kind][:n].mean(0)
            per_n.append(_direction_summary(names, [_rel(float(a), float(b)) for a, b in zip(qn, union[kind])]))
        out["curves"].append({"label": f"exact {kind.upper()} on n batches", "reference": kind, "vs_union": per_n,
                              "vs_full_fit": None})
    for fit in stab["fits"]:
        ref = _ref_of(fit)
        qs: dict[str, list[Tensor]] = {}
        for n in ns:
            t0 = time.perf_counter()
            for structure, (curv, _) in fit_structures(model, lora, proxy[:n], stab["structures"], fit, cfg).items():
                qs.setdefault(structure, []).append(_qf_matrix(curv, D))
            _log(f"{key}: stabilization {_fit_label('*', fit)} n={n} done in {time.perf_counter() - t0:.0f}s",
                 progress)
        for structure, qlist in qs.items():
            vs_full = [_direction_summary(names, [_rel(float(a), float(b)) for a, b in zip(q, qlist[-1])])
                       for q in qlist]
            vs_union = [_direction_summary(names, [_rel(float(a), float(b)) for a, b in zip(q, union[ref])])
                        for q in qlist]
            out["curves"].append({"label": _fit_label(structure, fit), "structure": structure, "fit": fit,
                                  "reference": ref, "q": [q.tolist() for q in qlist], "vs_full_fit": vs_full,
                                  "vs_union": vs_union})
    out["union_q"] = {k: v.tolist() for k, v in union.items()}
    result["stabilization"] = out


def run_delta_w(model, lora, batches, DW, names, cfg, key, setting, vocab, result, progress) -> None:
    """kfac_delta_w vs the exact GGN/EF of the base weights (= the Delta-W GGN/EF) in Delta-W space."""
    dc = cfg["delta_w"]
    weights = [layer.base.weight for layer in lora.layers]
    t0 = time.perf_counter()
    refs = reference_forms(model, weights, batches, DW, dc["ref_chunk"])
    q_ref = {k: refs[k].mean(0) for k in ("ggn", "ef")}
    result["delta_w_reference"][key] = {"num_params": int(DW.shape[0]),
                                        "seconds_per_batch_jvp": refs["seconds_per_batch_jvp"],
                                        "q_ggn": q_ref["ggn"], "q_ef": q_ref["ef"]}
    if cfg.get("crosscheck") and not any(c["space"] == "delta_w" for c in result["crosscheck"]):
        run_crosscheck(model, weights, batches[:1], DW, cfg, key, "delta_w", refs, result, progress)
    result["delta_w"].append(_row(key, setting, "ggn", "exact EF (token)", {"kind": "empirical"}, names,
                                  q_ref["ef"], q_ref["ggn"], extra={"label": "exact EF vs GGN", "space": "delta_w"}))
    result["delta_w"] += _fit_rows(model, lora, batches, ["kfac_delta_w"], dc["fits"], DW, names, q_ref, cfg, key,
                                   setting, vocab, result, "delta_w", extra_row={"space": "delta_w"})
    _log(f"{key}: kfac_delta_w vs exact Delta-W references done in {time.perf_counter() - t0:.0f}s "
         f"({DW.shape[0]:,} Delta-W parameters)", progress)


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

        def hidden(*params):
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
    out["qf_random_median_abs_rel_err"] = _median([abs(x) for x in rel if x is not None])
    out["qf_random_median_signed_rel_err"] = _median(rel)
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
        common.sync(device)
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
        fits = [(f, "sequence") for f in _fits_for(cfg, dc["seq_fits"], vocab)]
        fits += [(f, "token") for f in dc["token_fits"]]
        for fit, terms in fits:
            ref = _ref_of(fit)
            structures = _structures_for(dc["structures"], fit)
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
                rows.append({"label": _fit_label(structure, fit, terms if structure in GRADIENT_STRUCTURES else None),
                             "structure": structure, "kind": fit["kind"], "mc_samples": fit.get("mc_samples"),
                             "reference": ref, "terms": curv.info.get("terms"), "nbytes": curv.nbytes,
                             "fit_seconds": secs, "derived_from": curv.info.get("derived_from"),
                             **_dense_metrics(P, rf["M"], rf["U"], k, nA, R)})
            _log(f"dense {setting}: fits {_fit_label('*', fit)} terms={terms} done in "
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
        _log(f"dense {setting}: done in {time.perf_counter() - t_set:.0f}s (exact GGN {t_ggn:.0f}s; check vs "
             f"curvlinops: GGN {checks['ggn']:.1e}, EF {checks['ef']:.1e})", progress)
        del model, lora, G, EF, refs
        common.release_memory(device)
    result["dense_layer"] = out


# ---------------------------------------------------------------------------------- driver


def resolve_config(preset: str | dict, **overrides) -> dict:
    cfg = copy.deepcopy(PRESETS[preset] if isinstance(preset, str) else preset)
    cfg["preset"] = preset if isinstance(preset, str) else cfg.get("preset", "custom")
    for k, v in overrides.items():
        if v is not None:
            cfg[k] = v
    return cfg


def run_benchmark(preset: str | dict = "small", device: str | None = None, progress: bool = True,
                  model_path: str | None = None, parts: list[str] | None = None, **overrides) -> dict:
    """Run the benchmark and return the result dict (see module docstring).

    ``parts``: subset of ``["qf", "dense"]`` (default both; ``qf`` includes delta_w, terms,
    kfac_memory and stabilization as configured in the preset).
    """
    cfg = resolve_config(preset, **overrides)
    dev = common.resolve_device(device or cfg["device"])
    parts = parts or ["qf", "dense"]
    torch.manual_seed(cfg["seed"])
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "approx_accuracy", "preset": cfg["preset"], "description": cfg["description"],
        "machine": common.machine_info(dev), "config": cfg, "parts": parts,
        "combos": {}, "crosscheck": [], "qf": [], "delta_w": [], "delta_w_reference": {}, "terms": [], "kfac_memory": [],
        "stabilization": None, "dense_layer": None, "skipped": [], "timings": {}, "notes": [],
    }
    _log(f"loading model ({cfg['model']}) on {dev}", progress)
    t0 = time.perf_counter()
    base, tok = load_base(cfg, dev, model_path)
    vocab = base.config.vocab_size
    result["model"] = {"name": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)" if cfg["model"] == "smollm2"
                       else "tiny random Llama", "vocab_size": vocab, "num_layers": base.config.num_hidden_layers,
                       "hidden_size": base.config.hidden_size, "attn_implementation": "eager",
                       "dtype": str(next(base.parameters()).dtype), "path": model_path}
    result["timings"]["load_s"] = time.perf_counter() - t0
    if vocab > 4096:
        result["notes"].append(f"kind='ggn' fits skipped: one backward per class at vocab {vocab} "
                               "(the exact GGN references use curvlinops matvecs instead)")
    if "qf" in parts:
        for config_name, setting in cfg["combos"]:
            t0 = time.perf_counter()
            run_combo(base, tok, cfg, config_name, setting, dev, vocab, progress, result)
            result["timings"][f"combo {config_name}/{setting}_s"] = time.perf_counter() - t0
            _log(f"{config_name}/{setting} done in {time.perf_counter() - t0:.0f}s", progress)
    if "dense" in parts:
        t0 = time.perf_counter()
        run_dense_layer(base, tok, cfg, dev, vocab, progress, result)
        result["timings"]["dense_layer_s"] = time.perf_counter() - t0
    result["timings"]["total_s"] = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------------- outputs

_DIR_COLS = ["random", "target_grad", "source_grad", "finetune_disp"]


def _qf_table(rows: list[dict], extra_cols=()) -> str:
    headers = ["fit", "vs", "terms", *extra_cols, "random (median abs)", "random (median signed)", "target grad",
               "source grad", "finetune disp", "state"]
    body = []
    for r in rows:
        s = r["summary"]
        body.append([r["label"], r["reference"].upper(), r.get("terms") or "-",
                     *[fmt(r.get(c)) if not isinstance(r.get(c), str) else r.get(c) for c in extra_cols],
                     _pct(s.get("random")), _pct(s.get("random_signed")), _pct(s.get("target_grad")),
                     _pct(s.get("source_grad")), _pct(s.get("finetune_disp")), fmt_bytes(r.get("nbytes"))])
    return markdown_table(headers, body, align=["l", "l", "l"] + ["r"] * (len(headers) - 3))


def write_markdown(result: dict, path: Path, plots: dict[str, Path]) -> Path:
    cfg = result["config"]
    m = result["machine"]
    lines = [f"# Approximation accuracy ({result['preset']} preset)", "",
             f"{result['description']}.", "",
             f"Device: {m['device']} ({m.get('device_name')}), torch {m['versions'].get('torch')}, "
             f"transformers {m['versions'].get('transformers')}, peft {m['versions'].get('peft')}, curvlinops "
             f"{m['versions'].get('curvlinops-for-pytorch')}; {m['timestamp_utc']}; total "
             f"{result['timings'].get('total_s', 0):.0f} s.", "",
             f"Model: {result['model']['name']}, vocab {result['model']['vocab_size']}, "
             f"{result['model']['attn_implementation']} attention, {result['model']['dtype']}. LoRA r={cfg['r']}, "
             f"alpha={cfg['alpha']}; lowrank/diag_lowrank rank {cfg['rank']}.", "",
             "Numbers are signed relative errors `d^T P d / d^T G d - 1` (negative = underestimates the "
             "reference), with G the **exact** token-level GGN (for kind mc/ggn) or the exact token-level "
             "empirical Fisher (for kind empirical), both exact, computed from Jacobian-vector products (see "
             "below) on the same packed (unpadded, fully labelled) proxy batches as the fits. `random` = over "
             "random Gaussian directions (`median abs` = median of |error|). "
             f"Directions: gradients at theta0 of the target loss ({cfg['target']['task']} SFT batch) and of the "
             "source loss (held-out source text), and the displacement theta_t - theta0 of a short LoRA fine-tune "
             f"on {cfg['target']['task']} from the same anchor. `state` = the operator's `nbytes`.", ""]
    for note in result["notes"]:
        lines.append(f"- {note}")
    lines.append("")
    if result["crosscheck"]:
        lines += ["## How the exact references are computed", "",
                  "`d^T G d` for the full LoRA (and Delta-W) space comes from one Jacobian-vector product per "
                  "direction and batch (`torch.func.jvp` vmapped over directions, as curvlinops' "
                  "`JacobianLinearOperator`; forward-mode AD through the whole model): with `z = J d` per term, `d^T GGN d = mean_m z^T (diag p - p p^T) z` and `d^T EF d = "
                  "mean_m ((p - e_y)^T z)^2`, the same numbers as `d^T (GGNLinearOperator @ d)` / `EFLinearOperator` "
                  "without their transposed-Jacobian pass, and both from one JVP. Cross-check against the "
                  "curvlinops operators (matvecs) on a few directions:", ""]
        body = [[c["combo"], c["space"], c["num_dirs"], fmt(c["ggn_max_rel_diff"]), fmt(c["ef_max_rel_diff"]),
                 fmt(c["ggn_seconds_per_batch_matvec"]), fmt(c["ef_seconds_per_batch_matvec"])]
                for c in result["crosscheck"]]
        lines += [markdown_table(["combo", "space", "directions", "GGN max rel. diff", "EF max rel. diff",
                                  "s per GGN matvec", "s per EF matvec"], body), ""]
    if result["qf"]:
        lines += ["## Quadratic forms along directions, full LoRA", "",
                  "diag and lowrank rows are read off the diag_lowrank fit of the same kind (same vectors and MC "
                  "draws; `diag(P) = diag(G-hat)` and `U C U^T` are exactly what `structure=\"diag\"` / "
                  "`\"lowrank\"` store).", ""]
        for key, info in result["combos"].items():
            rows = [r for r in result["qf"] if r["combo"] == key]
            ref = info["reference"]
            dirs = info["directions"]
            lines += [f"### {key}: {info['label']}", "",
                      f"{info['lora_numel']:,} LoRA parameters in {info['num_layers']} layers; proxy "
                      f"{cfg['proxy']['num_batches']} batches x {cfg['proxy']['batch_size']}x{cfg['proxy']['seq_len']} "
                      f"tokens. Exact references: {ref['seconds_per_batch_jvp']:.2f} s per batch and direction "
                      f"(one JVP gives both). Fine-tune: {cfg['finetune']['steps']} "
                      f"steps, loss {dirs['finetune_losses'][0]:.3f} -> {dirs['finetune_losses'][-1]:.3f}, "
                      f"|theta_t - theta0| = {dirs['finetune_disp_norm']:.3g}"
                      + (f"; ||s B A|| / ||W|| = {info['delta_w_rel_norm']:.3f}" if "delta_w_rel_norm" in info else "")
                      + ".", "", _qf_table(rows), ""]
        if "qf" in plots:
            lines += [f"![quadratic-form errors]({plots['qf'].name})", ""]
    if result["delta_w"]:
        lines += ["## kfac_delta_w in Delta-W space", "",
                  "kfac_delta_w acts on Delta W = s B A, not on theta (its penalty is quartic in (A, B)), so it "
                  "is compared with the exact GGN / EF of the frozen **base weights** of the adapted layers: the "
                  "loss depends on W + Delta W, so that is exactly the Delta-W curvature. Directions: random in "
                  "Delta-W space, the loss gradients w.r.t. W (= w.r.t. Delta W), and s(B_t A_t - B_0 A_0) of the "
                  "same fine-tune.", ""]
        for key, ref in result["delta_w_reference"].items():
            lines.append(f"- {key}: {ref['num_params']:,} Delta-W parameters, exact references "
                         f"{ref['seconds_per_batch_jvp']:.2f} s per batch and direction")
        lines += ["", _qf_table(result["delta_w"], extra_cols=("combo",)), ""]
    if result["terms"]:
        lines += ["## terms=\"sequence\" vs terms=\"token\"", "",
                  "On a few tokens (token-level fitting back-propagates once per token and sample), each fit "
                  "against the exact references on the same tokens. With kind=mc the per-sequence estimate is "
                  "unbiased for the token-level GGN; with kind=empirical it is the per-sequence EF, a different "
                  "matrix than the token-level EF reference.", "",
                  _qf_table(result["terms"], extra_cols=("combo", "num_tokens")), ""]
    if result["kfac_memory"]:
        lines += ["## Accuracy cost of K-FAC memory savings", "",
                  "kind=empirical (deterministic): differences are the variant's own. `max |rel diff|` = largest "
                  "relative change of a quadratic form vs the default (fp32, shared input factors).", ""]
        body = [[r["combo"], r["structure"], r["variant"], fmt_bytes(r["nbytes"]), fmt(r["nbytes_vs_default"]),
                 fmt(r["max_abs_rel_diff_vs_default"]), _pct(r["vs_exact_ef"].get("random")),
                 _pct(r["vs_exact_ef"].get("finetune_disp"))] for r in result["kfac_memory"]]
        lines += [markdown_table(["combo", "structure", "variant", "state", "vs default", "max |rel diff|",
                                  "vs exact EF: random", "vs exact EF: finetune disp"], body,
                                 align=["l", "l", "l", "r", "r", "r", "r", "r"]), ""]
    st = result.get("stabilization")
    if st:
        ns = st["num_batches"]
        lines += ["## Stabilization with the number of proxy batches", "",
                  f"{st['combo']}: fits on the first n proxy batches ({st['batch_shape'][0]}x{st['batch_shape'][1]} "
                  f"tokens each). Median over all directions of |rel. error| of the quadratic forms vs the fit on "
                  f"{max(ns)} batches and vs the exact curvature on the union of the {max(ns)} batches. The "
                  "`exact on n batches` rows show how much the true curvature itself moves with the data.", ""]
        body = []
        for c in st["curves"]:
            body.append([c["label"], c["reference"].upper()]
                        + ([_pct(_summary_all(s)) for s in c["vs_full_fit"]] if c["vs_full_fit"] else ["-"] * len(ns))
                        + [_pct(_summary_all(s)) for s in c["vs_union"]])
        headers = (["fit", "ref"] + [f"vs {max(ns)}-batch fit, n={n}" for n in ns]
                   + [f"vs exact union, n={n}" for n in ns])
        lines += [markdown_table(headers, body, align=["l", "l"] + ["r"] * (2 * len(ns))), ""]
        if "stab" in plots:
            lines += [f"![stabilization]({plots['stab'].name})", ""]
    dl = result.get("dense_layer")
    if dl:
        lines += ["## One layer, dense", "",
                  f"LoRA on `{dl['module']}` only. Dense references: the exact token-level GGN (computed as "
                  "`(1/M) sum_m J_u^T W^T (diag p - p p^T) W J_u`, with `J_u` the Jacobian of the last hidden "
                  "state by forward-mode AD and W the linear output head: exact, no sampling) and the exact "
                  "token-level EF (`fit_curvature(structure='dense', kind='empirical', terms='token')`). Both are "
                  "cross-checked against curvlinops matvecs. `overlap` = mean squared cosine of the principal "
                  f"angles between the top-{dl['k']} eigenspaces. `oracle` rows = the best diag / rank-{dl['rank']} "
                  "/ diag+rank built from the exact matrix (structure error alone, no estimation error).", ""]
        for setting, s in dl["settings"].items():
            lines += [f"### {setting}: {s['label']}", "",
                      f"{s['num_params']:,} parameters (A {s['A_params']}, B {s['B_params']}), {s['num_terms']} "
                      f"terms. Exact GGN in {s['ggn_seconds']:.0f} s (max rel. diff vs curvlinops matvecs "
                      f"{s['check_vs_curvlinops_max_rel_diff']['ggn']:.1e}), EF in {s['ef_seconds']:.0f} s "
                      f"({s['check_vs_curvlinops_max_rel_diff']['ef']:.1e}). GGN block norms: "
                      + ", ".join(f"{k} {v:.3g}" for k, v in s["ggn_block_norms"].items()) + ".", ""]
            body = [[r["label"], r["reference"].upper(), fmt(r["rel_frobenius"]), fmt(r["rel_frobenius_AA"]),
                     fmt(r["rel_frobenius_BB"]), fmt(r["rel_frobenius_AB"]), fmt(r["topk_overlap"]),
                     _pct(r["qf_random_median_signed_rel_err"]), fmt_bytes(r.get("nbytes"))] for r in s["rows"]]
            lines += [markdown_table(["fit", "vs", "rel. Frobenius", "AA", "BB", "AB",
                                      f"top-{dl['k']} overlap", "random qf (median signed)", "state"], body,
                                     align=["l", "l"] + ["r"] * 7), ""]
        if "dense" in plots:
            lines += [f"![dense layer]({plots['dense'].name})", ""]
    if result["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['where']}: {s.get('structure')} {s.get('fit', '')} "
                                       f"{s.get('terms', '')}: {s['error']}" for s in result["skipped"]] + [""]
    lines += ["## Timings", "", markdown_table(["phase", "seconds"], [[k, v] for k, v in result["timings"].items()]),
              ""]
    path.write_text("\n".join(lines))
    return path


def _summary_all(s: dict) -> float | None:
    """Median over all directions of |rel err| from a direction summary."""
    vals = [s.get("random")] + [abs(v) for k, v in s.items() if k not in ("random", "random_signed") and v is not None]
    return _median(vals)


def make_plots(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    plt = common.plot_style()
    m = result["machine"]
    foot = (f"approx_accuracy, preset {result['preset']}, {m['device']} ({m.get('device_name')}), "
            f"{result['model']['name']}")
    paths: dict[str, Path] = {}
    keys = list(result["combos"])
    if result["qf"] and keys:
        fig, axes = plt.subplots(len(keys), 1, figsize=(11, 3.4 * len(keys)), squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            rows = [r for r in result["qf"] if r["combo"] == key]
            labels = [r["label"] for r in rows]
            width = 0.8 / len(_DIR_COLS)
            for j, col in enumerate(_DIR_COLS):
                vals = [abs(r["summary"].get(col)) if r["summary"].get(col) is not None else float("nan")
                        for r in rows]
                vals = [max(v, 1e-4) for v in vals]
                ax.bar([i + (j - (len(_DIR_COLS) - 1) / 2) * width for i in range(len(rows))], vals, width,
                       label=col.replace("_", " "))
            ax.set_yscale("log")
            ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
            ax.set_ylabel("|d'Pd / d'Gd - 1|")
            ax.set_title(f"{key}: {result['combos'][key]['label']} (vs exact GGN; empirical vs exact EF)")
            ax.legend(ncol=4, loc="upper left")
        fig.tight_layout()
        paths["qf"] = common.save_figure(fig, out_dir / f"{stem}-qf.png", foot)
    st = result.get("stabilization")
    if st:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        ns = st["num_batches"]
        for c in st["curves"]:
            ls = "--" if c["label"].startswith("exact") else "-"
            for ax, key in zip(axes, ("vs_full_fit", "vs_union")):
                if c[key] is None:
                    continue
                ys = [max(_summary_all(s) or 0, 1e-4) for s in c[key]]
                ax.plot(ns, ys, ls, marker="o", label=c["label"])
        axes[0].set_title(f"vs the fit on {max(ns)} batches")
        axes[1].set_title(f"vs exact GGN/EF on the union of {max(ns)} batches")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ns)
            ax.set_xticklabels([str(n) for n in ns])
            ax.set_xlabel("proxy batches")
        axes[0].set_ylabel("median |rel. error| of d'Pd")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"Stabilization, {st['combo']}")
        fig.tight_layout()
        paths["stab"] = common.save_figure(fig, out_dir / f"{stem}-stabilization.png", foot)
    dl = result.get("dense_layer")
    if dl and dl["settings"]:
        settings = list(dl["settings"])
        fig, axes = plt.subplots(len(settings), 1, figsize=(11, 3.6 * len(settings)), squeeze=False)
        for ax, setting in zip(axes[:, 0], settings):
            rows = dl["settings"][setting]["rows"]
            x = range(len(rows))
            ax.bar([i - 0.2 for i in x], [min(r["rel_frobenius"], 10) for r in rows], 0.4, label="rel. Frobenius error")
            ax.bar([i + 0.2 for i in x], [r["topk_overlap"] for r in rows], 0.4, label=f"top-{dl['k']} overlap")
            ax.set_xticks(list(x))
            ax.set_xticklabels([f"{r['label']} [{r['reference'].upper()}]" for r in rows], rotation=40, ha="right",
                               fontsize=7)
            ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
            ax.set_title(f"one layer ({dl['module']}), {dl['settings'][setting]['label']}")
            ax.legend(loc="upper right")
        fig.tight_layout()
        paths["dense"] = common.save_figure(fig, out_dir / f"{stem}-dense_layer.png", foot)
    return paths


def write_outputs(result: dict, output_dir: str | Path) -> dict[str, Path]:
    """``<preset>-<device>.json``, ``.md`` and PNG plots in ``output_dir``."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['preset']}-{torch.device(result['machine']['device']).type}"
    paths = {"json": common.write_json(out_dir / f"{stem}.json", result)}
    plots = make_plots(result, out_dir, stem)
    paths.update(plots)
    paths["md"] = write_markdown(result, out_dir / f"{stem}.md", plots)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default=None, help="cpu | cuda | auto (default: the preset's)")
    ap.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results" / "approx_accuracy"))
    ap.add_argument("--model-path", default=None,
                    help="a local .gguf file or HF model directory instead of the packaged SmolLM2 GGUF")
    ap.add_argument("--parts", nargs="*", choices=["qf", "dense"], default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        result = run_benchmark(args.preset, device=args.device, progress=not args.no_progress,
                               model_path=args.model_path, parts=args.parts)
    except Exception:
        traceback.print_exc()
        return 1
    paths = write_outputs(result, args.output_dir)
    for k, p in paths.items():
        print(f"{k}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
