"""Inputs of the approximation-accuracy benchmark: small helpers, the base and LoRA models, packed
batches, and the directions along which quadratic forms are compared."""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from benchmarks import harness
from benchmarks.approx_accuracy.config import SETTING_LABELS

# ---------------------------------------------------------------------------------- small helpers


def log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[approx_accuracy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fit_label(structure: str, fit: dict, terms: str | None = None) -> str:
    kind = fit["kind"]
    label = f"{structure}/{kind}"
    if kind == "mc":
        label += f"x{fit.get('mc_samples', 1)}"
    if terms == "token":
        label += "/token"
    return label


def rel_error(q: float, q_ref: float) -> float | None:
    """Signed relative error ``q / q_ref - 1`` (None where the reference is 0)."""
    if q_ref == 0 or not math.isfinite(q_ref):
        return None if q != 0 else 0.0
    return q / q_ref - 1.0


def pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    v = 100 * x
    if abs(v) >= 1000:
        return f"{v:+.2g}%".replace("e+0", "e").replace("e+", "e")
    if abs(v) >= 10:
        return f"{v:+.0f}%"
    return f"{v:+.1f}%"


def median(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def direction_summary(names: list[str], signed: list[float | None]) -> dict[str, Any]:
    """Per direction type: signed relative error (random: median of |.| and median signed)."""
    out: dict[str, Any] = {}
    rnd = [s for n, s in zip(names, signed) if n.startswith("random")]
    if rnd:
        out["random"] = median([abs(s) if s is not None else None for s in rnd])
        out["random_signed"] = median(rnd)
    for n, s in zip(names, signed):
        if not n.startswith("random"):
            out[n] = s
    return out


def qf_matrix(curv, D: Tensor) -> Tensor:
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
    """``(model, tokenizer)`` of the preset via the harness: ``cfg["model"]`` (``smollm2`` | ``tiny`` | a
    local path), or ``model_path`` when given; eager attention, frozen, eval mode."""
    name = "tiny" if cfg["model"] == "tiny" else (model_path or cfg["model"])
    model, tok = harness.load_base_model(name, device=device, seed=cfg["seed"], frozen=True)
    _set_eager(model)
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
    lora.assign(theta0)
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
    log(f"directions ready in {out['seconds']:.1f}s (finetune loss {out['finetune_losses'][0]:.3f} -> "
         f"{out['finetune_losses'][-1]:.3f})", progress)
    return out
