"""The cost benchmark's measurements on one model: timing context, baselines, curvlinops,
laplace-torch, BackPACK and penalty overheads (each failure is recorded, never hidden)."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import harness
from benchmarks.cost.config import FITS, TYPE2_MAX_CLASSES, WIDTH_FITS
from benchmarks.harness import measure


# ============================================================================================ helpers
def error_record(exc: BaseException) -> dict:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else None
    msg = str(exc).strip()
    return {"ok": False, "error": f"{type(exc).__name__}: {msg}"[:2000], "where": where}


class Ctx:
    """Run-wide state: device, dtype, settings and the tqdm bar over measurements."""

    def __init__(self, cfg: dict, device: torch.device, dtype: torch.dtype, bar=None):
        self.cfg, self.device, self.dtype, self.bar = cfg, device, dtype, bar
        self.warmup, self.repeats = int(cfg["warmup"]), int(cfg["repeats"])

    @contextlib.contextmanager
    def sweep_repeats(self):
        """Sweeps use ``cfg["sweep_repeats"]`` timed repeats (default: ``repeats``)."""
        saved = self.repeats
        self.repeats = int(self.cfg.get("sweep_repeats", saved))
        try:
            yield
        finally:
            self.repeats = saved

    def tick(self, what: str):
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60], refresh=False)
            self.bar.update(1)

    def timed(self, what: str, fn: Callable, *, reference: Callable | None = None, setup: Callable | None = None,
              nb: int = 1, warmup: int | None = None, repeats: int | None = None) -> dict:
        """:func:`harness.measure` of ``fn`` (per batch: divided by ``nb``); with ``reference`` (the
        fwd+bwd) and ``paired``, every timed call is preceded by a timed reference call."""
        warmup = self.warmup if warmup is None else warmup
        repeats = self.repeats if repeats is None else repeats
        try:
            ref_times = []
            if reference is not None and self.cfg.get("paired"):
                user_setup = setup

                calls = [0]

                def setup():  # noqa: F811 - untimed by measure; the reference is timed here itself
                    calls[0] += 1
                    if calls[0] > warmup:  # no reference before the warmup calls
                        harness.sync(self.device)
                        t0 = time.perf_counter()
                        reference()
                        harness.sync(self.device)
                        ref_times.append(time.perf_counter() - t0)
                    if user_setup is not None:
                        user_setup()

            t = measure(fn, self.device, warmup=warmup, repeats=repeats, setup=setup,
                        collect=bool(self.cfg.get("collect_garbage", True)))
            res = dict(t)
            res.update(ok=True, per_batch_s=t["median_s"] / nb, batches=nb)
            if ref_times:
                ref = ref_times
                res["paired_ref_s"] = ref
                pairs = [a / b for a, b in zip(t["times_s"], ref)]
                res["paired_ratio"] = statistics.median(pairs)
                # the spread of the per-pair ratios over the repeats (reported beside the median)
                res.update(paired_ratios=pairs, paired_ratio_min=min(pairs), paired_ratio_max=max(pairs))
            res["_result"] = t.result
        except Exception as exc:  # recorded, never hidden
            res = error_record(exc)
        self.tick(what)
        return res


def zero_grads(params):
    for p in params:
        p.grad = None


def snapshot(params):
    return [p.detach().clone() for p in params]


def restore(params, snap):
    with torch.no_grad():
        for p, s in zip(params, snap):
            p.copy_(s)
        zero_grads(params)


def ratio(a, b):
    try:
        return a / b if a is not None and b else None
    except TypeError:
        return None


def strip_result(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


# ============================================================================================ per model
def fwd_bwd_fn(model, batches):
    def fwd_bwd():
        for b in batches:
            model(**b).loss.backward()
    return fwd_bwd


def lora_step_fn(model, batches, opt):
    def step():
        model.train()
        for b in batches:
            opt.zero_grad(set_to_none=True)
            model(**b).loss.backward()
            opt.step()
        model.eval()
    return step


def fit_plan(full: bool, dtype: torch.dtype) -> list[tuple[str, str, dict]]:
    """(structure, kind, extra fit options) measured for a model. Low-precision models also get kfac
    with statistics in the model's dtype (``factor_dtype``; default fp32), to show what fp32 costs."""
    plan = [(s, k, {}) for s, k in (FITS if full else WIDTH_FITS)]
    if dtype in (torch.bfloat16, torch.float16):
        plan.insert(2, ("kfac", "empirical", {"factor_dtype": dtype}))
    return plan


def fit_name(f: dict) -> str:
    name = f"{f['structure']}/{f['kind']}"
    if f.get("variant"):
        name += " [" + ", ".join(f"{k}={v}" for k, v in f["variant"].items()) + "]"
    return name


def fit_entry(res: dict, base: dict, structure: str, kind: str, backend: str = "hooks") -> dict:
    entry = {"structure": structure, "kind": kind, "backend": backend, **strip_result(res)}
    if res.get("ok"):
        curv = res["_result"]
        entry.update(nbytes=int(curv.nbytes), num_params=int(curv.num_params), info=dict(curv.info))
        entry["ratio_fwd_bwd"] = ratio(res["per_batch_s"], base.get("per_batch_s"))
        entry["mem_ratio_fwd_bwd"] = ratio(res.get("peak_delta_bytes"), base.get("peak_delta_bytes"))
    return entry


def curvlinops_kfac(ctx, model, lora, batches, fwd_bwd, kind="empirical") -> dict:
    from lalora_curv.backends.curvlinops import as_curvlinops_data

    def fn():
        from curvlinops import KFACLinearOperator

        model_func, data, bsf, _ = as_curvlinops_data(model, batches)
        op = KFACLinearOperator(model_func, nn.CrossEntropyLoss(reduction="mean"), lora.params, data,
                                progressbar=False, check_deterministic=False, fisher_type=kind,
                                kfac_approx="expand", batch_size_fn=bsf)
        op.compute_kronecker_factors()
        return op

    res = ctx.timed(f"curvlinops KFAC {kind}", fn, reference=fwd_bwd, nb=len(batches))
    out = {"what": f"curvlinops KFACLinearOperator (fisher_type={kind!r}, kfac_approx='expand', LoRA params)",
           **strip_result(res)}
    if res.get("ok"):
        state = res["_result"].state_dict()
        tensors = list(state["input_covariances"].values()) + list(state["gradient_covariances"].values())
        out["factor_bytes"] = int(sum(t.numel() * t.element_size() for t in tensors))
        out["factor_elements"] = int(sum(t.numel() for t in tensors))
        out["factor_dtype"] = str(tensors[0].dtype) if tensors else None
        out["num_factors"] = len(tensors)
    return out


def ggn_matvec(ctx, model, lora, batches, fwd_bwd) -> dict:
    """One curvlinops GGN matvec (torch.func jvp + vjp). Forward-mode AD through SDPA kernels may be
    missing: then the error is recorded and the matvec is retried with eager attention."""
    from lalora_curv.backends.curvlinops import as_curvlinops_data

    what = "curvlinops GGNLinearOperator @ v (exact type-2 GGN, one J^T H J v over the batches)"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = getattr(base.config, "_attn_implementation", None)
    out: dict[str, Any] = {"what": what, "attn_implementation": attn}

    def run_once(tag):
        try:
            from curvlinops import GGNLinearOperator

            model_func, data, bsf, _ = as_curvlinops_data(model, batches)
            op = GGNLinearOperator(model_func, nn.CrossEntropyLoss(reduction="mean"), lora.params, data,
                                   progressbar=False, check_deterministic=False, batch_size_fn=bsf)
            g = torch.Generator(device="cpu").manual_seed(0)
            v = torch.randn(lora.numel, generator=g).to(device=ctx.device, dtype=lora.params[0].dtype)
        except Exception as exc:
            ctx.tick(f"curvlinops GGN matvec{tag}")
            return error_record(exc)
        return strip_result(ctx.timed(f"curvlinops GGN matvec{tag}", lambda: op @ v, reference=fwd_bwd,
                                      nb=len(batches)))

    res = run_once("")
    out.update(res)
    if not res.get("ok") and attn not in (None, "eager") and hasattr(base, "set_attn_implementation"):
        try:
            base.set_attn_implementation("eager")
            retry = run_once(" (eager)")
        finally:
            base.set_attn_implementation(attn)
        out = {"what": what + " [eager attention: forward-mode AD failed with " + str(attn) + "]",
               "attn_implementation": "eager", "first_attempt": {"attn_implementation": attn, **res}, **retry}
    return out


class _LMLogits(nn.Module):
    """laplace-torch / BackPACK view of a causal LM: dict -> shifted logits ``(N, V, T-1)``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, X):
        out = self.model(input_ids=X["input_ids"], attention_mask=X.get("attention_mask"))
        return out.logits[:, :-1].transpose(1, 2)


def laplace_torch_fits(ctx, model, batches, fwd_bwd, vocab: int, base_fwd_bwd: float | None) -> list[dict]:
    """laplace-torch on the same batches (a DataLoader of per-sequence dicts, shifted labels).

    Its default backend (CurvlinopsGGN, exact type-2) needs one backward per class (kron) or the full
    output Jacobian (diag): above ``cfg["type2_max_classes"]`` classes it is recorded as not attempted."""
    out = []
    try:
        from laplace import Laplace
        from laplace.curvature import BackPackEF, CurvlinopsEF, CurvlinopsGGN
        from torch.utils.data import DataLoader
    except Exception as exc:
        for name in ("kron/CurvlinopsEF", "kron/CurvlinopsGGN", "diag/CurvlinopsEF", "kron/BackPackEF",
                     "diag/CurvlinopsGGN"):
            ctx.tick(f"laplace {name}")
            out.append({"config": name, **error_record(exc)})
        return out
    rows = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            rows.append({"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i],
                         "labels": b["labels"][i, 1:]})
    loader = DataLoader(rows, batch_size=batches[0]["input_ids"].shape[0], shuffle=False)
    wrapper = _LMLogits(model)
    configs = [("kron", CurvlinopsEF, "kron/CurvlinopsEF"), ("kron", CurvlinopsGGN, "kron/CurvlinopsGGN (default)"),
               ("diag", CurvlinopsEF, "diag/CurvlinopsEF"), ("kron", BackPackEF, "kron/BackPackEF"),
               ("diag", CurvlinopsGGN, "diag/CurvlinopsGGN (default)")]
    for structure, backend, name in configs:
        entry = {"config": name, "call": f"Laplace(model, 'classification', subset_of_weights='all', "
                                        f"hessian_structure={structure!r}, backend={backend.__name__})"}
        if backend is CurvlinopsGGN and vocab > ctx.cfg.get("type2_max_classes", TYPE2_MAX_CLASSES):
            # exact type-2: one backward per class (kron), or the full Jacobian (diag): not attempted
            need = (f"{vocab} backward passes per batch" if structure == "kron" else
                    f"the full Jacobian (tokens x {vocab} classes x LoRA params) per batch")
            est = f" (~{vocab} x {base_fwd_bwd:.3g} s per batch)" if structure == "kron" and base_fwd_bwd else ""
            entry.update(ok=False, skipped=True,
                         reason=f"not attempted: exact type-2 GGN needs {need}{est} at vocabulary {vocab}")
            ctx.tick(f"laplace {name}")
            out.append(entry)
            continue

        def fit(structure=structure, backend=backend):
            la = Laplace(wrapper, "classification", subset_of_weights="all", hessian_structure=structure,
                         backend=backend)
            la.fit(loader)
            return la

        res = ctx.timed(f"laplace {name}", fit, reference=fwd_bwd, nb=len(batches), repeats=1)
        entry.update(strip_result(res))
        if res.get("ok"):
            entry["ratio_fwd_bwd"] = None  # filled by caller
        out.append(entry)
    return out


def backpack_kfac_check(ctx, model, batches) -> dict:
    """``backpack.extend(model, use_converter=True)`` + KFAC on a copy of the peft model."""
    entry = {"call": "backpack.extend(_LMLogits(deepcopy(peft_model)), use_converter=True); "
                     "with backpack(KFAC()): extend(CrossEntropyLoss())(logits, labels).backward()"}
    try:
        from backpack import backpack, extend
        from backpack.extensions import KFAC

        m2 = copy.deepcopy(model)
        stage = "extend(use_converter=True)"
        try:
            net = extend(_LMLogits(m2), use_converter=True)
            stage = "backward with KFAC()"
            loss_fn = extend(nn.CrossEntropyLoss())
            b = batches[0]
            logits = net({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
            loss = loss_fn(logits, b["labels"][:, 1:])
            with backpack(KFAC()):
                loss.backward()
            kfac = [getattr(p, "kfac", None) for p in net.parameters() if p.requires_grad]
            entry.update(ok=all(k is not None for k in kfac), stage="done",
                         note=f"{sum(k is not None for k in kfac)}/{len(kfac)} trainable params got .kfac")
        except Exception as exc:
            entry.update(error_record(exc), stage=stage)
        finally:
            del m2
    except Exception as exc:
        entry.update(error_record(exc), stage="import")
    harness.release_memory(ctx.device)
    ctx.tick("backpack extend+KFAC")
    return entry


def penalty_overheads(ctx, model, lora, batches, opt, curvs: dict, structures, step_s: float | None) -> list[dict]:
    """LoRA step with a LaplacePenalty; the penalty's forward+backward is timed inside the step."""
    from lalora_curv import LaplacePenalty

    out = []
    snap = snapshot(lora.params)
    for structure in structures:
        curv = curvs.get(structure)
        if curv is None:
            ctx.tick(f"penalty {structure}")
            out.append({"structure": structure, "ok": False, "error": "no fitted curvature (fit failed)"})
            continue
        try:
            pen = LaplacePenalty(curv, anchor=lora.snapshot(), strength=1.0, lora=lora)
        except Exception as exc:
            ctx.tick(f"penalty {structure}")
            out.append({"structure": structure, **error_record(exc)})
            continue
        pen_times: list[float] = []

        def step(pen=pen, pen_times=pen_times):
            model.train()
            for b in batches:
                opt.zero_grad(set_to_none=True)
                model(**b).loss.backward()
                harness.sync(ctx.device)
                t0 = time.perf_counter()
                pen().backward()
                harness.sync(ctx.device)
                pen_times.append(time.perf_counter() - t0)
                opt.step()
            model.eval()

        res = ctx.timed(f"penalty {structure}", step, nb=len(batches))
        restore(lora.params, snap)
        entry = {"structure": structure, **strip_result(res)}
        if res.get("ok"):
            timed = pen_times[ctx.warmup * len(batches):]
            pen_s = statistics.median(timed) if timed else None
            entry.update(penalty_s=pen_s, penalty_pct_of_step=100 * ratio(pen_s, step_s) if step_s else None,
                         step_with_penalty_s=res["per_batch_s"],
                         step_overhead_pct=100 * (res["per_batch_s"] / step_s - 1) if step_s else None,
                         value_at_anchor=float(pen().detach()))
        out.append(entry)
    return out
