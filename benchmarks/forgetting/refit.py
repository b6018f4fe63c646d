"""LaLoRA with its curvature refitted after a plain warm-up (``{"method": "lalora", "refit_after": k}``).

Why: at the standard LoRA init (B = 0) the gradient w.r.t. A is proportional to B, so a K-FAC fit at
the init has exactly zero curvature on A and the penalty constrains B only. The refit variant trains
``k`` optimizer steps without a penalty (exactly plain LoRA's first ``k`` steps: same seed, same
batches, same optimizer), fits the curvature of the run's structure / kind / proxy at those
weights, and trains the remaining steps with the penalty ``lambda/2 (theta - theta0)^T P_refit
(theta - theta0)`` anchored at the **init** ``theta0``, continuing with the same optimizer state and
the next batches in order: the whole run is one training whose penalty is switched on at step k.

Its relative strength is calibrated consistently (``Benchmark.calibrate``): ``P_refit`` is fitted at
plain LoRA's own weights after ``k`` steps (captured during the plain run), ``q = d^T P_refit d``
with ``d = theta_plain - theta0``, stored under :func:`calibration_key`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from benchmarks.forgetting.config import Config
from benchmarks.forgetting.data import Data, proxy_for
from benchmarks.forgetting.runs import setting_allows


def refit_after_of(spec: dict) -> int | None:
    """The warm-up length (optimizer steps) of a LaLoRA-refit method, None for every other method."""
    k = spec.get("refit_after")
    return None if k is None else int(k)


def refit_tag(k: int) -> str:
    return f"refit@{k}"


def calibration_key(structure: str, k: int) -> str:
    """Key of the refit curvature's entry in a (setting, seed) calibration dict, e.g. ``"kfac refit@10"``."""
    return f"{structure} {refit_tag(k)}"


def calibration_entry(run: dict) -> str:
    """The entry of its (setting, seed) calibration that a relative-strength ``run`` resolves against:
    ``"l2"``, its structure, or for a LaLoRA-refit run :func:`calibration_key`."""
    if run["method"] == "l2":
        return "l2"
    structure, k = run["spec"]["structure"], refit_after_of(run["spec"])
    return calibration_key(structure, k) if run["method"] == "lalora" and k is not None else structure


def check_refit(run_id: str, spec: dict, steps: int, dropout: float) -> None:
    """A clear error for a ``refit_after`` that cannot be honoured (before anything trains)."""
    k = spec.get("refit_after")
    if k is None:
        return
    if spec["method"] != "lalora":
        raise ValueError(f"{run_id}: refit_after is an option of method 'lalora' only, not {spec['method']!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{run_id}: refit_after must be a positive integer (optimizer steps), got {k!r}")
    if k >= steps:
        raise ValueError(f"{run_id}: refit_after={k} must be smaller than steps={steps} (the warm-up without "
                         f"penalty must leave steps to train with the refitted penalty)")
    if dropout:
        raise ValueError(f"{run_id}: refit_after needs dropout=0 (got {dropout}): each training phase reseeds the "
                         f"RNG, so dropout masks after the warm-up would differ from one uninterrupted training")


def refit_pairs(cfg: Config, setting: dict) -> list[tuple[str, int]]:
    """``(structure, k)`` of every LaLoRA-refit method the setting runs (sorted, unique)."""
    return sorted({(s["structure"], refit_after_of(s)) for s in cfg.methods
                   if s["method"] == "lalora" and refit_after_of(s) is not None and setting_allows(setting, s)})


def same_weights(a: dict, b: dict) -> bool:
    """Whether two LoRA snapshots (``name -> tensor``) are identical."""
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _dropout_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def train_in_phases(model: nn.Module, batches: Sequence, *, steps: int, switch_at: dict[int, Callable],
                    penalty: nn.Module | None = None, lr: float, seed: int, lora, grad_accum: int = 1,
                    max_grad_norm: float | None = None, weight_decay: float = 0.0,
                    progress: bool = False) -> tuple[list[dict], float, nn.Module | None]:
    """``steps`` optimizer steps of :func:`lalora_curv.training.finetune` (AdamW, constant ``lr``), with
    the penalty switched at the steps of ``switch_at``: after step ``k``, ``switch_at[k]()`` is called
    (it may fit a curvature at the current weights) and its return value (a penalty module or None)
    is the penalty of the following steps.

    Equal to one uninterrupted ``finetune`` whose penalty changes at those steps: one AdamW instance
    carries its state across the phases (``finetune(optimizer=callable)``), and each phase starts at
    the batch that follows the last one used (``finetune`` cycles ``batches`` in order from the
    first). Each phase reseeds the RNG with ``seed``, so models with active dropout are refused.

    Returns ``(history, train_seconds, penalty)``: the history entries of every step (``step`` counted
    over the whole run), the seconds spent in ``finetune`` (what the ``switch_at`` calls take
    excluded) and the penalty of the last phase.
    """
    from lalora_curv.training import finetune

    batches = list(batches)
    bounds = sorted(switch_at)
    if not batches:
        raise ValueError("train_in_phases: batches is empty")
    if bounds and not (0 < bounds[0] and bounds[-1] < steps):
        raise ValueError(f"train_in_phases: switch steps {bounds} must lie strictly between 0 and steps={steps}")
    dropouts = _dropout_modules(model)
    if bounds and dropouts:
        raise ValueError(f"train_in_phases: active dropout in {dropouts[:3]}: each phase reseeds the RNG, so the "
                         f"phases would not equal one uninterrupted training")
    kept: dict = {}

    def one_optimizer(params):
        params = list(params)
        if "optimizer" not in kept:
            kept["optimizer"], kept["ids"] = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), \
                [id(p) for p in params]
        elif [id(p) for p in params] != kept["ids"]:
            raise RuntimeError("train_in_phases: the trainable parameters changed between phases")
        return kept["optimizer"]

    history: list[dict] = []
    seconds, done = 0.0, 0
    for end in bounds + [steps]:
        first = (done * grad_accum) % len(batches)   # finetune cycles from its first batch
        t0 = time.perf_counter()
        res = finetune(model, batches[first:] + batches[:first], penalty=penalty, steps=end - done, lr=lr,
                       grad_accum=grad_accum, seed=seed, progress=progress, optimizer=one_optimizer,
                       max_grad_norm=max_grad_norm, lora=lora)
        seconds += time.perf_counter() - t0
        history.extend({**h, "step": h["step"] + done} for h in res.history)
        done = end
        if end in switch_at:
            penalty = switch_at[end]()
    return history, seconds, penalty


def refit_curvature(bench, model: nn.Module, lora, run: dict, proxy_key: tuple, proxy: list[dict], structure: str,
                    k: int):
    """The curvature of ``structure`` fitted at the model's current weights, the warm-up point of ``k``
    steps of ``run``'s setting and seed: ``(curvature, its key in bench.curv_info)``.

    Cached per (setting, seed, structure, proxy, k) like the init curvatures (``bench.curvature``):
    plain LoRA's calibration fits it at its own weights after ``k`` steps, which a refit run's warm-up
    reproduces exactly; the cached fit is reused only where the weights are identical (checked),
    otherwise the run gets a fit of its own.
    """
    at = lora.snapshot()
    tag: tuple = (refit_tag(k),)
    key = (run["setting"], run["seed"], structure, proxy_key, *tag)
    if key in bench.curv_cache and not same_weights(bench.refit_points[key], at):
        bench.notes.append(f"{run['id']}: warm-up weights differ from plain LoRA's after {k} steps; "
                           f"curvature refitted for this run")
        tag += (run["id"],)
        key += (run["id"],)
    curv = bench.curvature(model, run, proxy_key, proxy, structure, tag=tag)
    bench.refit_points[key] = at
    info_key = "|".join(map(str, key))
    bench.curv_info[info_key]["fitted_at"] = f"weights after {k} plain steps"
    return curv, info_key


def calibrate_refits(bench, model: nn.Module, lora, run: dict, setting: dict, data: Data, tokenizer,
                     anchor: dict, trained: dict, task: float) -> dict:
    """Calibration entries of the refit methods of ``setting``: ``{calibration_key: {"q", "lam_ratio1"}}``
    with ``q = d^T P_refit d`` at plain LoRA's final weights (``d = trained - anchor``) and ``P_refit``
    fitted at plain LoRA's weights after ``k`` steps (``bench.plain_snapshots``); ``lora``'s weights
    are ``trained`` again on return."""
    from lalora_curv import LaplacePenalty

    out = {}
    for structure, k in refit_pairs(bench.cfg, setting):
        snapshot = bench.plain_snapshots.get((run["setting"], run["seed"]), {}).get(k)
        if snapshot is None:
            raise RuntimeError(f"{run['id']}: no snapshot of plain LoRA after {k} steps to calibrate "
                               f"{calibration_key(structure, k)!r}")
        proxy_key, proxy = proxy_for(bench.cfg, data, tokenizer, {})
        lora.assign(snapshot)
        try:
            curv, _ = refit_curvature(bench, model, lora, run, proxy_key, proxy, structure, k)
        finally:
            lora.assign(trained)
        pen = LaplacePenalty(curv, anchor=anchor, strength=2.0, lora=lora)
        with torch.no_grad():
            q = float(pen.quadratic())
        out[calibration_key(structure, k)] = {"q": q, "lam_ratio1": 2 * task / q if q > 0 else None}
    return out
