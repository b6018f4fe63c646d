"""The forgetting benchmark's run: each grid point trained with ``lalora_curv.finetune`` (LoRA, or
the trainable parameters of a non-LoRA baseline) and evaluated; strengths calibrated at plain LoRA's
solution."""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.forgetting.config import B0_INIT, RESULTS_DIR, Config, lora_kwargs
from benchmarks.forgetting.data import Data, load_data, proxy_for, train_batches
from benchmarks.forgetting.evaluation import base_scores, check_teacher_forced_em, evaluate
from benchmarks.forgetting.refit import (
    calibrate_refits,
    calibration_entry,
    check_refit,
    refit_after_of,
    refit_curvature,
    refit_pairs,
    train_in_phases,
)
from benchmarks.forgetting.report import brief, write_outputs
from benchmarks.forgetting.reuse import adopt_finished_runs, check_same_base
from benchmarks.forgetting.runs import expand_runs, is_plain, run_id, setting_allows
from benchmarks.harness import (
    Provenance,
    fit_options_for,
    fmt,
    legacy_provenance,
    load_base_model,
    machine_info,
    resolve_device,
)

# ============================================================================================
# Models, penalties, training
# ============================================================================================

def load_base(cfg: Config, device: torch.device):
    """``(model, tokenizer)`` of ``cfg.model`` (``smollm2`` | ``tiny`` | a local path) via the harness."""
    return load_base_model(cfg.model, device=device, dtype=cfg.dtype)


def prior_precision_for(curv, rel: float) -> float:
    """``rel`` times the mean of the curvature's non-zero diagonal entries (0 if rel is 0)."""
    if not rel:
        return 0.0
    d = curv.diagonal().float()
    nz = d[d > 0]
    return float(rel * nz.mean()) if nz.numel() else 0.0


def history_summary(history: list[dict], k: int = 5) -> dict:
    """First/last task loss and penalty, penalty/task ratio at the end (mean of the last ``k`` steps)."""
    if not history:
        return {}
    task = [h["task_loss"] for h in history]
    pen = [h.get("penalty", 0.0) for h in history]
    last_task, last_pen = statistics.fmean(task[-k:]), statistics.fmean(pen[-k:])
    return {"steps": len(history), "task_loss_first": task[0], "task_loss_last": last_task,
            "penalty_last": last_pen, "penalty_task_ratio_last": last_pen / last_task if last_task else None,
            "penalty_max": max(pen), "task_loss": [round(x, 5) for x in task], "penalty": [round(x, 6) for x in pen]}


# ============================================================================================
# The benchmark
# ============================================================================================

class Benchmark:
    """Runs the grid of a :class:`Config`; results are written after every run."""

    def __init__(self, cfg: Config, output_dir: Path, device: torch.device, *, progress: bool = True,
                 resume: bool = False, reuse: list | None = None, log: Callable[[str], None] = print):
        self.cfg, self.out, self.device, self.progress, self.log = cfg, Path(output_dir), device, progress, log
        # provenance and machine facts before anything is written (outputs would make the tree dirty)
        self.provenance = Provenance(preset=cfg.preset, device=device)
        self.machine = machine_info(device)
        self.earlier_provenance: list[dict] = []  # of the finished runs a --resume reuses
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            import benchmarks.baselines as bl

            self.baselines, self.lalora_on_init, self.baselines_note = bl.BASELINES, bl.lalora_on_init, None
        except Exception as err:  # noqa: BLE001 - optional integration
            self.baselines, self.lalora_on_init = None, None
            self.baselines_note = f"benchmarks.baselines not importable ({type(err).__name__}: {err})"
        self.runs, self.notes = expand_runs(cfg, self.baselines)
        for run in self.runs:  # a refit_after that cannot be honoured fails before anything trains
            setting = next(s for s in cfg.settings if s["name"] == run["setting"])
            check_refit(run["id"], run["spec"], int(setting.get("steps", cfg.steps)), cfg.dropout)
        if self.baselines_note:
            self.notes.insert(0, self.baselines_note)
        self.curv_cache: dict = {}
        self.curv_info: dict = {}
        self.refit_points: dict = {}      # refit curvature key -> the LoRA weights it was fitted at
        self.plain_snapshots: dict = {}   # (setting, seed) -> {k: plain LoRA's weights after k steps}
        self.calibration: dict = {}
        self.plain_train_seconds: dict = {}   # (setting, seed) -> seconds: the cost of what reuses that run
        self.results: list[dict] = []
        self.done: dict = {}
        self.resumed_em_check = None   # the teacher-forced EM check of the finished plain LoRA run
        self.reuse_bases: dict = {}    # donor folder -> its base-model scores (checked against ours)
        if resume and (self.out / "results.json").exists():
            old = json.loads((self.out / "results.json").read_text())
            if old.get("config_digest") == cfg.digest():
                self.done = {r["id"]: r for r in old.get("runs", [])}
                self.curv_info = old.get("curvature", {})
                self.calibration = old.get("calibration", {})
                self.resumed_em_check = (old.get("data") or {}).get("em_check")
                if self.done:
                    self.earlier_provenance = old.get("provenance") or legacy_provenance(old)
                self.log(f"resume: {len(self.done)} finished runs reused")
        if reuse:  # finished runs of other results that would run identically (benchmarks.forgetting.reuse)
            notes = adopt_finished_runs(self, reuse)
            self.notes.extend(notes)
            for note in notes:
                self.log(f"reuse: {note}")

    # ---------------------------------------------------------------- curvature
    def curvature(self, model, run: dict, proxy_key: tuple, proxy: list[dict], structure: str, tag: tuple = ()):
        """Curvature of ``structure`` for ``run``'s setting and seed, fitted once at the model's current
        weights: the LoRA init, or (``tag``: ``("refit@k",)``) the warm-up point of
        :func:`benchmarks.forgetting.refit.refit_curvature`."""
        from lalora_curv import fit_curvature

        key = (run["setting"], run["seed"], structure, proxy_key, *tag)
        if key not in self.curv_cache:
            t0 = time.perf_counter()
            kind = self.cfg.curvature_kind
            curv = fit_curvature(model, proxy, structure=structure, kind=kind, progress=False,
                                 **fit_options_for(structure, kind, mc_samples=self.cfg.mc_samples, seed=run["seed"]))
            seconds = time.perf_counter() - t0
            diag = curv.diagonal().float()
            self.curv_cache[key] = curv
            self.curv_info["|".join(map(str, key))] = {
                "structure": structure, "kind": curv.kind, "num_params": curv.num_params, "nbytes": curv.nbytes,
                "fit_seconds": seconds, "diag_mean": float(diag.mean()), "diag_max": float(diag.max()),
                "diag_nonzero_fraction": float((diag > 0).float().mean()), "proxy": list(proxy_key),
                "proxy_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in proxy)}
        return self.curv_cache[key]

    # ---------------------------------------------------------------- one run
    def run_one(self, base_model, tokenizer, data: Data, run: dict, plain_state: dict,
                known: dict | None = None) -> list[dict]:
        """Train and evaluate one run (``intruders``: post-process the plain LoRA run of the seed).

        ``known``: this run's finished record, when it trains again only for its model (plain LoRA,
        for a calibration, the intruder reduction or a refit warm-up): if the new training's losses
        equal the record's step for step, the model is the same and the record stands unscored again."""
        from lalora_curv import L2Penalty, LaplacePenalty, LoRAParams
        from lalora_curv.experiments.models import add_lora
        from lalora_curv.training import finetune

        cfg = self.cfg
        setting = next(s for s in cfg.settings if s["name"] == run["setting"])
        steps, lr = int(setting.get("steps", cfg.steps)), float(setting.get("lr", cfg.lr))
        # a baseline grid point may set its own learning rate ("lr"): non-zero inits (MiLoRA, CorDA)
        # put large singular directions in A and B, where the zero-init LoRA learning rate can diverge
        method_hp = {k: v for k, v in run.get("hp", {}).items() if k != "lr"}
        lr = float(run.get("hp", {}).get("lr", run["spec"].get("lr", lr)))
        lk = lora_kwargs(cfg, setting)
        seed = run["seed"]
        generate = cfg.generate == "all" or (cfg.generate == "plain" and is_plain(run))
        batches = train_batches(cfg, data, tokenizer, seed)
        spec = run["spec"]
        record = {k: v for k, v in run.items() if k != "spec"}
        record.update(spec=spec, steps=steps, lr=lr, lora=lk, init=B0_INIT)
        t0 = time.perf_counter()

        if run["method"] == "baseline" and spec["name"] == "intruders":
            # plain LoRA (identical setup: standard init, same seed) + post-hoc intruder reduction
            model, lora, trained, hist = plain_state[(run["setting"], seed)]
            lora.assign(trained)
            baseline = self.baselines["intruders"]
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            baseline.post_train(model, run["hp"])
            plain_id = run_id(run["setting"], seed, "LoRA", "-")
            record.update(init=B0_INIT, info={"post_hoc_on": plain_id,
                                              "intruder_report": getattr(model, "intruder_report", None)},
                          history=history_summary(hist), train_seconds=0.0)
            plain = next((r for r in self.results if r["id"] == plain_id), None)
            if plain is not None and all(torch.equal(p, before[n]) for n, p in model.named_parameters()):
                # no intruder dimension found: the model is plain LoRA's bit for bit, so are its scores
                record["info"]["scores_of"] = plain_id
                record["metrics"], record["items"] = copy.deepcopy(plain["metrics"]), copy.deepcopy(plain["items"])
            else:
                record["metrics"] = evaluate(model, tokenizer, cfg, data, generate=generate, progress=self.progress)
                record["items"] = record["metrics"].pop("items")
            lora.assign(trained)
            record["seconds"] = time.perf_counter() - t0
            record["cost"] = self.cost(run, record)
            return [record]

        model = copy.deepcopy(base_model)
        penalty, prepared, info = None, None, {}
        if run["method"] in ("lora", "l2", "lalora"):
            model = add_lora(model, **lk, seed=seed)
        else:
            name = spec["name"] if run["method"] == "baseline" else spec["init"]
            baseline = self.baselines[name]
            _, proxy = proxy_for(cfg, data, tokenizer, {})
            prepared = baseline.setup(model, lora_kwargs=dict(lk), proxy_batches=proxy,
                                      hp=method_hp, seed=seed)
            model, info = prepared.model, dict(prepared.info)
            record["init"] = info.get("init", name)
        is_lora = info.get("lora", True)
        lora = LoRAParams.from_model(model) if is_lora else None

        if "relative" in run:
            run = {**run, "strength": self.resolve_strength(run)}
            record.update(strength=run["strength"], relative=run["relative"])
        if run["method"] == "l2":
            penalty = L2Penalty(anchor=lora.snapshot(), strength=run["strength"], lora=lora)
        switch_at = {}   # step -> what the penalty becomes after that step (refit_after; plain LoRA's snapshots)
        if run["method"] == "lalora" and refit_after_of(spec) is not None:
            switch_at = self._refit_switch(model, lora, run, data, tokenizer, info)
        elif is_plain(run):
            switch_at = self._snapshot_switches(lora, run, setting)
        elif run["method"] == "lalora":
            proxy_key, proxy = proxy_for(cfg, data, tokenizer, spec)
            curv = self.curvature(model, run, proxy_key, proxy, spec["structure"])
            prior = prior_precision_for(curv, cfg.prior_rel)
            penalty = LaplacePenalty(curv, anchor=lora.snapshot(), strength=run["strength"], lora=lora,
                                     prior_precision=prior)
            info.update(prior_precision=prior, prior_rel=cfg.prior_rel, curvature_kind=curv.kind, proxy=list(proxy_key))
        elif run["method"] == "lalora_on_init":
            _, proxy = proxy_for(cfg, data, tokenizer, {})
            tf = time.perf_counter()
            penalty = self.lalora_on_init(prepared, proxy, spec["structure"], run["strength"], kind=cfg.curvature_kind,
                                          **fit_options_for(spec["structure"], cfg.curvature_kind,
                                                            mc_samples=cfg.mc_samples, seed=seed))
            prior = prior_precision_for(penalty.curv, cfg.prior_rel)
            penalty.prior_precision = prior
            info.update(prior_precision=prior, prior_rel=cfg.prior_rel, curvature_fit_seconds=time.perf_counter() - tf,
                        curvature_diag_mean=float(penalty.curv.diagonal().float().mean()))

        t_train = time.perf_counter()
        if switch_at:  # the same finetune loop, in phases (benchmarks.forgetting.refit)
            hist, train_seconds, penalty = train_in_phases(
                model, batches, steps=steps, switch_at=switch_at, penalty=penalty, lr=lr, seed=seed, lora=lora,
                grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, progress=self.progress)
        else:
            # one loop for every method: a baseline whose trainable parameters are not LoRA (OSF) hands
            # them to finetune(params=...)
            res = finetune(model, batches, penalty=penalty, steps=steps, lr=lr, grad_accum=cfg.grad_accum, seed=seed,
                           progress=self.progress, max_grad_norm=cfg.max_grad_norm, lora=lora if is_lora else None,
                           params=None if is_lora else prepared.trainable_parameters())
            hist = res.history
            train_seconds = time.perf_counter() - t_train
        if prepared is not None:
            prepared.cleanup()
            if run["method"] == "baseline":
                self.baselines[spec["name"]].post_train(model, method_hp)
        if penalty is not None and is_lora:
            with torch.no_grad():
                info["final_quadratic"] = float(penalty.quadratic()) if hasattr(penalty, "quadratic") else None
        record.update(info=info, history=history_summary(hist), train_seconds=train_seconds)
        same = known is not None and (known.get("history") or {}).get("task_loss") == record["history"]["task_loss"]
        if same:  # ``trained_again``: its model was rebuilt here, its scores are the record's
            record = {**copy.deepcopy(known), "trained_again": True}
        else:
            if known is not None:
                self.notes.append(f"{run['id']}: trained again for its model, but its losses differ from the "
                                  "earlier run's, so it was scored again")
            record["metrics"] = evaluate(model, tokenizer, cfg, data, generate=generate, progress=self.progress)
            record["items"] = record["metrics"].pop("items")
            record["seconds"] = time.perf_counter() - t0
        if is_plain(run) and cfg.em_mode == "teacher_forced" and "em_check" not in data.info:
            # after training, where the model writes answers: the one-pass exact match against generation
            check = check_teacher_forced_em(model, tokenizer, cfg, data)
            data.info["em_check"] = {**check, "model": run["id"]}
            if not check["ok"]:
                self.notes.append(f"teacher-forced exact match disagreed with greedy generation on "
                                  f"{check['n_items'] - check['agree']} of {check['n_items']} items ({run['id']})")
        if is_plain(run):
            plain_state[(run["setting"], seed)] = (model, lora, lora.snapshot(), hist)
            self.calibrate(model, lora, run, data, tokenizer, hist)
            self.plain_train_seconds[(run["setting"], seed)] = record["train_seconds"]
        if not same:
            record["cost"] = self.cost(run, record)
        return [record]

    def _refit_switch(self, model, lora, run: dict, data: Data, tokenizer, info: dict) -> dict:
        """``{k: build}`` for a LaLoRA-refit run: after ``k`` plain steps, ``build()`` fits the curvature at
        the current weights and returns the Laplace penalty anchored at the init (the weights now)."""
        from lalora_curv import LaplacePenalty

        k, structure, anchor = refit_after_of(run["spec"]), run["spec"]["structure"], lora.snapshot()
        proxy_key, proxy = proxy_for(self.cfg, data, tokenizer, run["spec"])

        def build():
            curv, curv_key = refit_curvature(self, model, lora, run, proxy_key, proxy, structure, k)
            prior = prior_precision_for(curv, self.cfg.prior_rel)
            info.update(prior_precision=prior, prior_rel=self.cfg.prior_rel, curvature_kind=curv.kind,
                        proxy=list(proxy_key), refit_after=k, curvature_key=curv_key)
            return LaplacePenalty(curv, anchor=anchor, strength=run["strength"], lora=lora, prior_precision=prior)

        return {k: build}

    def _snapshot_switches(self, lora, run: dict, setting: dict) -> dict:
        """Plain LoRA in a setting with refit methods: keep its weights after each warm-up length (the
        refit calibration's curvature point); the penalty stays None."""
        snapshots = self.plain_snapshots.setdefault((run["setting"], run["seed"]), {})

        def keep(k):
            def snapshot():
                snapshots[k] = lora.snapshot()
            return snapshot

        return {k: keep(k) for k in sorted({k for _, k in refit_pairs(self.cfg, setting)})}

    def cost(self, run: dict, record: dict) -> dict:
        """What a user pays for this grid point, in seconds: its training, its curvature fit (LaLoRA),
        and, for a relative strength, the plain LoRA run and the calibration it needs (both counted in
        full for every relative point, as a user tuning one method would pay them)."""
        parts = {"train": record["train_seconds"]}
        if run["method"] == "lalora":  # a refit run: the fit at its warm-up point
            key = record["info"].get("curvature_key") or "|".join(map(str, (
                run["setting"], run["seed"], run["spec"]["structure"], tuple(record["info"]["proxy"]))))
            parts["curvature_fit"] = self.curv_info.get(key, {}).get("fit_seconds", 0.0)
        elif run["method"] == "lalora_on_init":
            parts["curvature_fit"] = record["info"].get("curvature_fit_seconds", 0.0)
        if "relative" in run:
            cal = self.calibration.get(f"{run['setting']}/s{run['seed']}", {})
            parts["calibration_plain_lora_run"] = self.plain_train_seconds.get((run["setting"], run["seed"]), 0.0)
            parts["calibration"] = cal.get("seconds", 0.0)
        if run["method"] == "baseline" and run["spec"]["name"] == "intruders":  # post-hoc on plain LoRA
            parts["plain_lora_run"] = self.plain_train_seconds.get((run["setting"], run["seed"]), 0.0)
        return {"seconds": sum(parts.values()), **parts}

    def resolve_strength(self, run: dict) -> float:
        """``run["relative"] * lam_ratio1`` of the calibration at plain LoRA's solution of the same
        (setting, seed); for ``lalora_on_init`` the ratio of the same structure at the B = 0 init is used
        (the on-init curvature is fitted elsewhere, so its ``rel=1`` is only roughly "penalty = task")."""
        key, penalty = f"{run['setting']}/s{run['seed']}", calibration_entry(run)
        cal = self.calibration.get(key, {}).get(penalty)
        if not cal or not cal.get("lam_ratio1"):
            raise RuntimeError(f"{run['id']}: relative strength needs the calibration of {key} for {penalty!r}; "
                               f"plain LoRA of that setting and seed must run first (it is in plain_seeds: "
                               f"{run['seed'] in self.cfg.plain_seeds})")
        return float(run["relative"] * cal["lam_ratio1"])

    # ---------------------------------------------------------------- lambda calibration
    def calibrate(self, model, lora, run: dict, data: Data, tokenizer, hist: list[dict]) -> None:
        """At plain LoRA's final weights: ``q = d^T P d`` for each structure this setting uses (fitted
        at the same init) and ``||d||^2``; ``lam_ratio1 = 2 * task_loss / q`` is the strength at which
        the penalty of the plain-LoRA solution would equal its final task loss."""
        from lalora_curv import L2Penalty, LaplacePenalty

        setting = next(s for s in self.cfg.settings if s["name"] == run["setting"])
        if setting.get("methods", "all") == "plain" or run["seed"] not in self.cfg.seeds:
            return
        t_start, fit_before = time.perf_counter(), sum(v["fit_seconds"] for v in self.curv_info.values())
        trained = lora.snapshot()
        task = statistics.fmean(h["task_loss"] for h in hist[-5:])
        out = {"task_loss_last": task}
        # the init: the same seed's add_lora init (B = 0, A from the seed)
        from lalora_curv.experiments.models import add_lora

        init_model = add_lora(copy.deepcopy(self._base_for_calib), **lora_kwargs(self.cfg, setting), seed=run["seed"])
        from lalora_curv import LoRAParams

        anchor = LoRAParams.from_model(init_model).snapshot()
        l2 = L2Penalty(anchor=anchor, strength=2.0, lora=lora)
        with torch.no_grad():
            q = float(l2())
        out["l2"] = {"q": q, "lam_ratio1": 2 * task / q if q > 0 else None}
        structures = self.cfg.calibrate_structures
        if structures is None:
            # only what this setting runs: a curvature fit costs up to a minute on CPU
            structures = sorted({s["structure"] for s in self.cfg.methods if s["method"] in ("lalora", "lalora_on_init")
                                 and "proxy_batches" not in s and "proxy_kind" not in s
                                 and refit_after_of(s) is None and setting_allows(setting, s)})
        for structure in structures:
            proxy_key, proxy = proxy_for(self.cfg, data, tokenizer, {})
            curv = self.curvature(init_model, run, proxy_key, proxy, structure)
            pen = LaplacePenalty(curv, anchor=anchor, strength=2.0, lora=lora)
            with torch.no_grad():
                q = float(pen.quadratic())
            out[structure] = {"q": q, "lam_ratio1": 2 * task / q if q > 0 else None}
        del init_model
        lora.assign(trained)
        out.update(calibrate_refits(self, model, lora, run, setting, data, tokenizer, anchor, trained, task))
        # the fits made here are the runs' own curvatures (cached), counted in their cost once
        out["seconds"] = (time.perf_counter() - t_start
                          - (sum(v["fit_seconds"] for v in self.curv_info.values()) - fit_before))
        self.calibration[f"{run['setting']}/s{run['seed']}"] = out

    # ---------------------------------------------------------------- all runs
    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        torch.manual_seed(cfg.data_seed)
        self.log(f"[forgetting] preset={cfg.preset} runs={len(self.runs)} device={self.device}")
        t0 = time.perf_counter()
        base_model, tokenizer = load_base(cfg, self.device)
        base_model.eval()
        for p in base_model.parameters():
            p.requires_grad_(False)
        self._base_for_calib = base_model
        load_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = load_data(cfg, tokenizer)
        data_seconds = time.perf_counter() - t0
        if cfg.mcq_impl == "fast":
            from benchmarks.forgetting.mcq import check_against_reference

            check = check_against_reference(base_model, tokenizer, data.mcq_eval[:8])
            data.info["fast_mcq_check"] = check
            if not check["ok"]:
                self.notes.append(f"fast MCQ scoring disagreed with mcq_scores ({check}); using the reference")
                cfg.mcq_impl = "reference"
        t0 = time.perf_counter()
        base_gen = cfg.generate in ("all", "plain")
        base, cached = base_scores(base_model, tokenizer, cfg, data, self.out / "base_eval_cache.json", base_gen,
                                   self.device)
        self.log(f"[forgetting] base model scores ({'cached' if cached else f'{time.perf_counter() - t0:.0f}s'}): "
                 f"{brief(base)}")
        check_same_base(self.reuse_bases, base)
        self.base = base
        self.timing = {"load_model_s": load_seconds, "data_s": data_seconds,
                       "base_eval_s": 0.0 if cached else time.perf_counter() - t0, "base_eval_cached": cached}
        if self.resumed_em_check is not None:
            data.info.setdefault("em_check", self.resumed_em_check)
        self.data_info = data.info
        plain_state: dict = {}
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.runs), desc="runs", unit="run")
        for i, run in enumerate(self.runs):
            if run["id"] in self.done and not (is_plain(run) and self.plain_model_needed(run, self.runs[i + 1:])):
                self.results.append(self.done[run["id"]])
                if is_plain(run):  # what reuses this run still counts its training in its cost
                    self.plain_train_seconds[(run["setting"], run["seed"])] = self.done[run["id"]]["train_seconds"]
            else:
                records = self.run_one(base_model, tokenizer, data, run, plain_state, known=self.done.get(run["id"]))
                self.results.extend(records)
                for r in records:
                    self.log(f"[forgetting] {r['id']}: {brief(r['metrics'])} "
                             f"pen/task={fmt((r.get('history') or {}).get('penalty_task_ratio_last'))} "
                             f"({r['seconds']:.0f}s)")
                self.timing["total_s"] = time.perf_counter() - t_start
                self.write(final=False)  # after every run made here (a reused one changes nothing on disk)
            if bar is not None:
                bar.update(1)
            # free plain models of finished (setting, seed) groups
            live = {(r["setting"], r["seed"]) for r in self.runs[i + 1:]}
            for key in [k for k in plain_state if k not in live]:
                del plain_state[key]
        if bar is not None:
            bar.close()
        self.timing["total_s"] = time.perf_counter() - t_start
        return self.write(final=True)

    def plain_model_needed(self, plain: dict, later: list[dict]) -> bool:
        """Whether a resumed run must train ``plain`` LoRA again: a later, unfinished run of its setting
        and seed needs its trained model (intruders post-process it; refit runs need its warm-up
        snapshots), or a relative strength needs a calibration that was not saved. Otherwise the
        finished record (and its calibration) is reused, which saves a whole run per resume."""
        key = (plain["setting"], plain["seed"])
        pending = [r for r in later if (r["setting"], r["seed"]) == key and r["id"] not in self.done]
        calibrated = f"{plain['setting']}/s{plain['seed']}" in self.calibration
        return any((r["method"] == "baseline" and r["spec"]["name"] == "intruders")
                   or (r["method"] == "lalora" and refit_after_of(r["spec"]) is not None)
                   or ("relative" in r and not calibrated) for r in pending)

    # ---------------------------------------------------------------- outputs
    def write(self, final: bool) -> dict:
        provenance = self.earlier_provenance + [self.provenance.record(finished=final)]
        return write_outputs(self.out, self.cfg, final=final, machine=self.machine, provenance=provenance,
                             notes=self.notes,
                             data=self.data_info, timing=self.timing, base=self.base, curvature=self.curv_info,
                             calibration=self.calibration, runs=self.results)


def run_benchmark(cfg: Config, output_dir: str | Path | None = None, device: str | None = None, *,
                  progress: bool = True, resume: bool = False, reuse: list | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Run ``cfg`` and write ``results.json``, ``summary.md`` and the Pareto plots to ``output_dir``;
    ``reuse``: result folders whose finished runs stand in for identical runs here
    (:mod:`benchmarks.forgetting.reuse`)."""
    out = Path(output_dir) if output_dir is not None else RESULTS_DIR / cfg.preset
    bench = Benchmark(cfg, out, resolve_device(device), progress=progress, resume=resume, reuse=reuse, log=log)
    return bench.run()


def try_baselines():
    """``benchmarks.baselines.BASELINES``, or None where it cannot be imported (optional dependencies)."""
    try:
        from benchmarks.baselines import BASELINES

        return BASELINES
    except Exception:  # noqa: BLE001 - optional integration
        return None
