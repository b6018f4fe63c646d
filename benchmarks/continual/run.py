"""The continual benchmark's run: data, evaluation and the task sequence of every method."""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.continual.assemble import assemble_payload
from benchmarks.continual.config import (
    METHOD_SPECS,
    NOTES,
    RESULTS_DIR,
    Config,
    trained_methods,
)
from benchmarks.continual.report import write_outputs
from benchmarks.continual.tasks import SEED_STRIDE, task_items
from benchmarks.harness import Provenance, fit_options_for, load_base_model, machine_info, resolve_device

# ============================================================================================
# Data
# ============================================================================================

@dataclass
class Data:
    tasks: list                     # per position: {"name", "config", "train", "eval", "proxy"}
    mcq: list
    source_batches: dict            # kind -> batches
    info: dict = field(default_factory=dict)


def load_data(cfg: Config, tokenizer) -> Data:
    from lalora_curv.experiments import data as D

    tasks = []
    for pos, spec in enumerate(cfg.tasks, start=1):
        seed = cfg.data_seed + SEED_STRIDE * pos
        train = task_items(spec["name"], "train", cfg.n_train, seed=seed, config=spec.get("config"))
        ev = task_items(spec["name"], "eval", cfg.n_eval, seed=seed, config=spec.get("config"))
        assert not {it["prompt"] for it in train} & {it["prompt"] for it in ev}, f"{spec['name']}: train/eval overlap"
        n_proxy = min(len(train), cfg.proxy_batches * cfg.proxy_batch_size)
        proxy = D.reasoning_sft_batches(train[:n_proxy], tokenizer, batch_size=cfg.proxy_batch_size,
                                        seq_len=cfg.train_seq_len, chat=cfg.chat, pad_to_longest=True)
        tasks.append({"name": spec["name"], "config": dict(spec.get("config") or {}), "train": train, "eval": ev,
                      "proxy": proxy, "seed": seed})
    pos = tuple(cfg.source_pos)
    mcq = D.wordnet_mcq("eval", n=cfg.n_mcq, seed=cfg.data_seed, pos=pos)
    n_wn = cfg.n_source_texts // 2
    texts = {"wordnet": D.wordnet_texts("eval", n=n_wn, seed=cfg.data_seed, pos=pos),
             "pydoc": D.pydoc_texts("eval", n=cfg.n_source_texts - n_wn, seed=cfg.data_seed)}
    source_batches = {k: D.lm_batches(v, tokenizer, batch_size=cfg.eval_batch_size, seq_len=cfg.source_seq_len,
                                      pad_to_longest=True) for k, v in texts.items()}
    info = {"tasks": [{"position": i, "name": t["name"], "config": t["config"], "generator_seed": t["seed"],
                       "n_train": len(t["train"]), "n_eval": len(t["eval"]),
                       "proxy_items": sum(int(b["input_ids"].shape[0]) for b in t["proxy"]),
                       "proxy_label_tokens": D.num_label_tokens(t["proxy"]),
                       "example": {"prompt": t["eval"][0]["prompt"], "answer": t["eval"][0]["answer"]}}
                      for i, t in enumerate(tasks, start=1)],
            "n_mcq": len(mcq), "n_source_texts": {k: len(v) for k, v in texts.items()},
            "source_tokens": {k: D.num_label_tokens(v) for k, v in source_batches.items()},
            "source_split": "eval (held out by synset / pydoc topic; no curvature in this benchmark uses source data)"}
    return Data(tasks, mcq, source_batches, info)


def train_batches(cfg: Config, task: dict, tokenizer, seed: int) -> list[dict]:
    """SFT batches of a task's training items in a seed-dependent order (cycled by ``finetune``)."""
    from lalora_curv.experiments import data as D

    items = list(task["train"])
    random.Random(1000 * seed + task["seed"]).shuffle(items)
    return D.reasoning_sft_batches(items, tokenizer, batch_size=cfg.train_batch_size, seq_len=cfg.train_seq_len,
                                   chat=cfg.chat, pad_to_longest=True)


# ============================================================================================
# Model and evaluation
# ============================================================================================

def load_base(cfg: Config, device: torch.device):
    """``(model, tokenizer)`` of ``cfg.model`` (``smollm2`` | ``tiny`` | a local path) via the harness."""
    return load_base_model(cfg.model, device=device, dtype=cfg.dtype)


def evaluate(model, tokenizer, cfg: Config, data: Data) -> dict:
    """Scores of the current adapter: per task ``<name>:em`` / ``<name>:nll``; source ``src_text_nll``
    (mean of the WordNet and pydoc held-out token NLLs), ``mcq_acc``, ``mcq_nll`` (NLL of the correct word)."""
    from lalora_curv.experiments import evaluation as E

    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    samples = {}
    for task in data.tasks:
        s = E.reasoning_scores(model, tokenizer, task["eval"], max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.gen_batch_size, chat=cfg.chat, seq_len=cfg.train_seq_len)
        out[f"{task['name']}:em"] = s["exact_match"]
        out[f"{task['name']}:nll"] = s["nll"]
        samples[task["name"]] = [{"answer": it["answer"], "generated": g}
                                 for it, g in list(zip(task["eval"], s["generations"]))[:2]]
    t1 = time.perf_counter()
    for kind, batches in data.source_batches.items():
        out[f"src_text_nll_{kind}"] = E.lm_scores(model, batches)["nll"]
    out["src_text_nll"] = statistics.fmean(out[f"src_text_nll_{k}"] for k in data.source_batches)
    mcq = E.mcq_scores(model, tokenizer, data.mcq, batch_size=cfg.eval_batch_size)
    out["mcq_acc"], out["mcq_nll"] = mcq["accuracy"], mcq["nll_correct"]
    out["samples"] = samples
    out["eval_seconds"] = {"tasks": t1 - t0, "source": time.perf_counter() - t1}
    return out


# ============================================================================================
# The benchmark
# ============================================================================================

class Benchmark:
    def __init__(self, cfg: Config, out: Path, device: torch.device, *, progress: bool = False,
                 log: Callable[[str], None] = print):
        self.cfg, self.out, self.device, self.progress = cfg, Path(out), device, progress
        self._log = log
        self.t_start = time.perf_counter()
        self.provenance = Provenance(preset=cfg.preset, device=device)
        self.timing: dict[str, float] = {}
        self.notes: list[str] = []

    def log(self, msg: str) -> None:
        self._log(f"[continual {time.perf_counter() - self.t_start:7.1f}s] {msg}")

    # ------------------------------------------------------------------ pieces
    def _fit(self, model, lora, structure: str, batches, seed: int):
        from lalora_curv import fit_curvature

        kind = self.cfg.curvature_kind
        opts = fit_options_for(structure, kind, rank=self.cfg.rank,
                               **({"mc_samples": self.cfg.mc_samples, "seed": seed} if kind == "mc" else {}))
        t0 = time.perf_counter()
        curv = fit_curvature(model, batches, structure=structure, kind=self.cfg.curvature_kind, lora=lora,
                             progress=False, **opts)
        self.timing["curvature_fit_s"] = self.timing.get("curvature_fit_s", 0.0) + time.perf_counter() - t0
        return curv

    def _train(self, model, lora, task: dict, penalty, seed: int, position: int) -> dict:
        from lalora_curv import finetune

        batches = train_batches(self.cfg, task, self.tokenizer, seed)
        res = finetune(model, batches, penalty=penalty, steps=self.cfg.steps, lr=self.cfg.lr,
                       seed=1000 * seed + position, progress=self.progress, max_grad_norm=self.cfg.max_grad_norm,
                       lora=lora)
        self.timing["train_s"] = self.timing.get("train_s", 0.0) + res.seconds
        task_loss, pen = res.column("task_loss"), res.column("penalty")
        ratios = [p / t for p, t in zip(pen, task_loss) if t > 0]
        k = min(3, len(task_loss))
        return {"task": task["name"], "steps": len(task_loss), "task_loss": task_loss, "penalty": pen,
                "loss_first": task_loss[0], "loss_last": statistics.fmean(task_loss[-k:]),
                "loss_mean": statistics.fmean(task_loss), "penalty_last": pen[-1],
                "penalty_task_ratio_mean": statistics.fmean(ratios) if ratios else 0.0,
                "penalty_task_ratio_last": ratios[-1] if ratios else 0.0, "seconds": res.seconds}

    def _eval(self, model, what: str) -> dict:
        t0 = time.perf_counter()
        ev = evaluate(model, self.tokenizer, self.cfg, self.data)
        self.timing["eval_s"] = self.timing.get("eval_s", 0.0) + time.perf_counter() - t0
        self.log(f"eval {what}: " + ", ".join(f"{t['name']} em={ev[t['name'] + ':em']:.2f} "
                                               f"nll={ev[t['name'] + ':nll']:.2f}" for t in self.data.tasks)
                 + f" | src nll={ev['src_text_nll']:.3f} mcq={ev['mcq_acc']:.2f}")
        return ev

    def _make_sequence(self, model, lora, name: str):
        from lalora_curv import TaskSequence

        spec = METHOD_SPECS[name]
        cal = self.calibration
        kw = {"dynamics": spec["dynamics"], "prior_precision": cal["prior_precision"][spec["structure"]],
              "fit_options": fit_options_for(spec["structure"], self.cfg.curvature_kind, rank=self.cfg.rank,
                                             mc_samples=self.cfg.mc_samples)}
        if spec["dynamics"] == "identity":
            kw["gamma"] = self.cfg.gamma
        else:
            kw["process_noise"] = cal["process_noise"][spec["structure"]]
        return TaskSequence(model, spec["structure"], self.cfg.curvature_kind, lora=lora, **kw)

    # ------------------------------------------------------------------ one method, one seed
    def run_method(self, name: str, seed: int, model, lora, shared: dict) -> dict:
        from lalora_curv import L2Penalty

        cfg, spec, T = self.cfg, METHOD_SPECS[name], len(self.data.tasks)
        t0 = time.perf_counter()
        lora.assign(shared["theta1"])
        columns = [self.base_eval, shared["eval1"]]
        histories = [shared["history1"]]
        seq, strength = None, None
        if spec["family"] == "laplace":
            seq = self._make_sequence(model, lora, name)
            seq.add_task(shared["curv1"][spec["structure"]], name=self.data.tasks[0]["name"])
        need_smooth = any(METHOD_SPECS[m].get("of") == name for m in cfg.methods)
        prev = lora.flatten().detach().clone()
        for pos in range(2, T + 1):
            task = self.data.tasks[pos - 1]
            if pos == 2 and name != "seq_lora" and name not in self.calibration["strength"]:
                self._calibrate(name, seq, lora, shared)
            strength = self.calibration["strength"].get(name)
            if spec["family"] == "l2":
                penalty = L2Penalty(prev, strength=strength, lora=lora)
            elif spec["family"] == "laplace":
                penalty = seq.prior_penalty(strength)
            else:
                penalty = None
            hist = self._train(model, lora, task, penalty, seed, pos)
            histories.append(hist)
            self.log(f"{name} s{seed} task {pos} {task['name']}: loss {hist['loss_first']:.3f} -> "
                     f"{hist['loss_last']:.3f}, penalty/task (end) {hist['penalty_task_ratio_last']:.3g}")
            if name == "seq_lora" and pos == 2:
                shared["theta2_plain"] = lora.flatten().detach().clone()
                shared["loss2_plain"] = hist["loss_last"]
            columns.append(self._eval(model, f"{name} s{seed} after task {pos}"))
            prev = lora.flatten().detach().clone()
            if seq is not None and (pos < T or need_smooth):
                seq.add_task(self._fit(model, lora, spec["structure"], task["proxy"], seed), name=task["name"])
        run = {"method": name, "seed": seed, "columns": columns, "histories": histories, "strength": strength,
               "seconds": time.perf_counter() - t0}
        if seq is not None:
            run["sequence"] = {"structure": seq.structure, "dynamics": seq.dynamics, "gamma": seq.gamma,
                               "num_tasks": seq.num_tasks,
                               "final_precision_rank": getattr(seq.tasks[-1].precision, "rank", None)}
            run["_seq"] = seq
        return run

    def run_smoothing(self, name: str, filt: dict, model, lora) -> dict:
        """Evaluate the RTS-smoothed adapters of the filter run ``filt`` (column t = smoothed m_t)."""
        seq = filt["_seq"]
        t0 = time.perf_counter()
        sm = seq.smoothed()
        means = [t.mean for t in seq.tasks]
        T = len(means)
        assert torch.allclose(sm.means[-1], means[-1]), "the last smoothed mean must equal the last filtered one"
        columns = [self.base_eval]
        moves = []
        for t in range(T - 1):
            lora.assign(sm.means[t])
            columns.append(self._eval(model, f"{name} s{filt['seed']} smoothed adapter of task {t + 1}"))
            step = (means[t + 1] - means[t]).norm()
            moves.append({"task": t + 1, "smoothed_minus_filtered_norm": float((sm.means[t] - means[t]).norm()),
                          "next_minus_filtered_norm": float(step),
                          "fraction_moved_towards_later": float(
                              (sm.means[t] - means[t]) @ (sm.means[t + 1] - means[t]) /
                              (sm.means[t + 1] - means[t]).norm().clamp_min(1e-30) ** 2)})
        columns.append(filt["columns"][-1])  # m_T^s = m_T: the filter's final adapter, already evaluated
        self.timing["smoothing_s"] = self.timing.get("smoothing_s", 0.0) + time.perf_counter() - t0
        return {"method": name, "seed": filt["seed"], "columns": columns, "histories": filt["histories"],
                "strength": filt["strength"], "smoothing": moves, "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ calibration
    def _base_calibration(self, shared: dict) -> None:
        """Prior precision and process noise from the task-1 curvatures (first seed)."""
        cal = self.calibration
        for structure, curv in shared["curv1"].items():
            mean_diag = float(curv.diagonal().mean())
            cal["mean_diag_C1"][structure] = mean_diag
            cal["prior_precision"][structure] = self.cfg.prior_rel * mean_diag
            lam1 = mean_diag * (1 + self.cfg.prior_rel)
            cal["process_noise"][structure] = self.cfg.q_rel / lam1

    def _calibrate(self, name: str, seq, lora, shared: dict) -> None:
        """strength = penalty_ratio * L_2 / penalty_1(theta_2 of plain LoRA) (module docstring)."""
        from lalora_curv import L2Penalty

        spec = METHOD_SPECS[name]
        current = lora.flatten().detach().clone()
        if spec["family"] == "l2":
            pen = L2Penalty(shared["theta1"], strength=1.0, lora=lora)
        else:
            pen = seq.prior_penalty(1.0)
        lora.assign(shared["theta2_plain"])
        with torch.no_grad():
            value = float(pen())
        lora.assign(current)
        strength = self.cfg.penalty_ratio * shared["loss2_plain"] / value
        self.calibration["strength"][name] = strength
        self.calibration["penalty_at_plain_theta2"][name] = value
        self.log(f"calibrated {name}: penalty(theta2_plain; 1) = {value:.4g} -> strength {strength:.4g}")

    def _tridiag_evidence(self, shared: dict) -> dict:
        """kfac vs kfac_tridiag at the trained task-1 adapter (B != 0): quadratic forms along plain
        LoRA's task-2 displacement and along a random direction."""
        c = shared["curv1"]
        if "kfac" not in c or "kfac_tridiag" not in c or "theta2_plain" not in shared:
            return {}
        d = (shared["theta2_plain"] - shared["theta1"]).to(c["kfac"].dtype)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(d.shape, generator=g, dtype=d.dtype).to(d.device)
        out = {}
        for label, v in (("plain_displacement", d), ("random", z)):
            qk, qt = float(c["kfac"].quadratic_form(v)), float(c["kfac_tridiag"].quadratic_form(v))
            out[label] = {"kfac": qk, "kfac_tridiag": qt, "relative_difference": (qt - qk) / qk if qk else None}
        B_norm = sum(float(B.norm() ** 2) for _, B in self.lora.split_layers(shared["theta1"])) ** 0.5
        out["lora_B_norm_at_task1_anchor"] = B_norm
        return out

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        from lalora_curv import LoRAParams
        from lalora_curv.experiments.models import add_lora

        cfg = self.cfg
        self.log(f"preset {cfg.preset}: model {cfg.model}, device {self.device}, threads {torch.get_num_threads()}")
        t0 = time.perf_counter()
        base_model, self.tokenizer = load_base(cfg, self.device)
        self.timing["load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.data = load_data(cfg, self.tokenizer)
        self.timing["data_s"] = time.perf_counter() - t0
        self.calibration = {"rule": f"strength = {cfg.penalty_ratio} * L2_plain / penalty(theta2_plain; strength=1)",
                            "mean_diag_C1": {}, "prior_precision": {}, "process_noise": {}, "strength": {},
                            "penalty_at_plain_theta2": {}, "calibrated_on_seed": cfg.seeds[0]}
        order = trained_methods(cfg)
        structures = sorted({METHOD_SPECS[m]["structure"] for m in order if METHOD_SPECS[m]["family"] == "laplace"})
        runs: list[dict] = []
        self.base_eval = None
        for seed in cfg.seeds:
            model = add_lora(copy.deepcopy(base_model), r=cfg.r, alpha=cfg.alpha,
                             target_modules=list(cfg.target_modules), seed=seed)
            model.to(self.device)
            lora = self.lora = LoRAParams.from_model(model)
            if self.base_eval is None:  # B = 0: the adapted model is the base model, for every seed
                self.base_eval = self._eval(model, "base model")
            shared: dict[str, Any] = {}
            first = self.data.tasks[0]
            shared["history1"] = self._train(model, lora, first, None, seed, 1)
            self.log(f"shared task 1 {first['name']} s{seed}: loss {shared['history1']['loss_first']:.3f} -> "
                     f"{shared['history1']['loss_last']:.3f}")
            shared["theta1"] = lora.flatten().detach().clone()
            shared["eval1"] = self._eval(model, f"s{seed} after task 1 (shared by all methods)")
            shared["curv1"] = {s: self._fit(model, lora, s, first["proxy"], seed) for s in structures}
            if seed == cfg.seeds[0]:
                self._base_calibration(shared)
            seed_runs = {}
            for name in order:
                run = self.run_method(name, seed, model, lora, shared)
                seed_runs[name] = run
                runs.append(run)
                if name == "seq_lora" and seed == cfg.seeds[0]:
                    self.calibration["tridiag_vs_kfac"] = self._tridiag_evidence(shared)
                    self.calibration["plain_task2_loss"] = shared["loss2_plain"]
            for name in cfg.methods:
                if METHOD_SPECS[name]["family"] == "smooth":
                    runs.append(self.run_smoothing(name, seed_runs[METHOD_SPECS[name]["of"]], model, lora))
            del model
        runs = [r for r in runs if r["method"] in cfg.methods or r["method"] == "seq_lora"]
        self.timing["total_s"] = time.perf_counter() - self.t_start
        payload = self.assemble(runs)
        self.write(payload)
        self.log(f"done in {self.timing['total_s'] / 60:.1f} min -> {self.out}")
        return payload

    # ------------------------------------------------------------------ outputs
    def assemble(self, runs: list[dict]) -> dict:
        for r in runs:
            r.pop("_seq", None)
        return assemble_payload(self.cfg, [t["name"] for t in self.data.tasks], runs, self.calibration,
                                self.base_eval, machine=machine_info(self.device),
                                provenance=[self.provenance.record()], data_info=self.data.info,
                                timing=dict(self.timing), notes=self.notes + NOTES)

    def write(self, payload: dict) -> None:
        write_outputs(payload, self.out)


def run_benchmark(cfg: Config, output_dir: str | Path | None = None, device: str | None = None, *,
                  progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run ``cfg``; write ``<preset>.json``, ``<preset>.md`` and the PNGs to ``output_dir``."""
    out = Path(output_dir) if output_dir is not None else RESULTS_DIR
    return Benchmark(cfg, out, resolve_device(device), progress=progress, log=log).run()
