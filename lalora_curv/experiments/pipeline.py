"""The end-to-end LaLoRA workflow used by the CLI: model + LoRA, data, curvature, fine-tuning, scores.

Source domain: general English (WordNet 3.0 definitions/examples and Python's ``pydoc`` topics);
the curvature is fitted on its *proxy* split, source scores are measured on the disjoint *eval*
split (out-of-proxy) and, separately, on held-out proxy text (in-proxy). Target domain:
reasoning-gym ``gsm_symbolic`` (held-out templates for evaluation). Everything is offline.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunConfig", "Data", "load_base_model", "attach_lora", "make_data", "proxy_batches", "train_batches",
           "evaluate", "build_penalty", "run_record",
           "save_adapter", "load_adapter", "METRICS"]

#: metric name -> (label, higher is better)
METRICS = {
    "source_nll": ("source NLL, held-out text (out-of-proxy)", False),
    "source_nll_in_proxy": ("source NLL, proxy-domain text", False),
    "mcq_accuracy": ("WordNet MCQ accuracy", True),
    "mcq_nll": ("WordNet MCQ NLL of the correct word", False),
    "target_nll": ("target NLL (held-out templates)", False),
    "target_exact_match": ("target exact match (greedy)", True),
}


@dataclass
class RunConfig:
    """Settings shared by ``fit``, ``finetune``, ``eval`` and ``demo`` (defaults = the demo's budget)."""

    model: str | None = None            # None: the packaged SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    lora_r: int = 8
    lora_alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    target_task: str = "gsm_symbolic"
    n_train: int = 96
    train_batch_size: int = 4
    train_seq_len: int = 256
    steps: int = 24
    lr: float = 2e-3
    proxy_source: str = "mix"
    proxy_batches: int = 2
    proxy_batch_size: int = 8
    proxy_seq_len: int = 128
    n_source_eval: int = 32
    n_mcq: int = 48
    n_target_eval: int = 24
    max_new_tokens: int = 96
    exact_match: bool = True
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Data:
    proxy_batches: list            # curvature fitting (source proxy split)
    train_batches: list            # target SFT batches
    source_eval_batches: list      # held-out source text (eval split: out-of-proxy)
    source_proxy_eval_batches: list  # proxy-domain text not used for fitting (in-proxy)
    mcq_items: list
    target_eval_items: list


def _dtype(name: str) -> torch.dtype:
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        raise ValueError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)") from None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)")
    return dtype


def load_base_model(cfg: RunConfig):
    """``(model, tokenizer)`` from ``cfg.model`` (local HF dir or .gguf; default packaged SmolLM2)."""
    from .models import load_model

    return load_model(cfg.model, dtype=_dtype(cfg.dtype), device=cfg.device)


def attach_lora(model, cfg: RunConfig):
    from .models import add_lora

    targets = cfg.targets if tuple(cfg.targets) != ("all-linear",) else "all-linear"
    return add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=targets, seed=cfg.seed)


def proxy_batches(tokenizer, cfg: RunConfig) -> list:
    """Proxy source batches for curvature fitting (``cfg.proxy_batches`` of the proxy split)."""
    from . import data as D

    texts = D.source_texts(cfg.proxy_source, split="proxy", n=cfg.proxy_batches * cfg.proxy_batch_size, seed=cfg.seed)
    return D.lm_batches(texts, tokenizer, batch_size=cfg.proxy_batch_size, seq_len=cfg.proxy_seq_len)


def train_batches(tokenizer, cfg: RunConfig) -> list:
    """Target SFT batches (training templates of ``cfg.target_task``)."""
    from . import data as D

    items = D.reasoning_items(cfg.target_task, split="train", n=cfg.n_train, seed=cfg.seed)
    return D.reasoning_sft_batches(items, tokenizer, batch_size=cfg.train_batch_size, seq_len=cfg.train_seq_len)


def make_data(tokenizer, cfg: RunConfig, *, train: bool = True, evaluation: bool = True) -> Data:
    """All batches and items of a run, deterministic in ``cfg.seed`` (parts can be skipped)."""
    from . import data as D

    proxy = proxy_batches(tokenizer, cfg)
    source_eval = in_proxy = mcq = target_eval = []
    if evaluation:
        # in-proxy: proxy-split texts after the ones used for fitting (same domain, never fitted on)
        n_fit = cfg.proxy_batches * cfg.proxy_batch_size
        proxy_texts = D.source_texts(cfg.proxy_source, split="proxy", n=n_fit + cfg.n_source_eval, seed=cfg.seed)
        in_proxy = D.lm_batches(proxy_texts[n_fit:], tokenizer, batch_size=8, seq_len=cfg.proxy_seq_len)
        eval_texts = D.source_texts("mix", split="eval", n=cfg.n_source_eval, seed=cfg.seed + 1)
        source_eval = D.lm_batches(eval_texts, tokenizer, batch_size=8, seq_len=cfg.proxy_seq_len)
        mcq = D.wordnet_mcq("eval", n=cfg.n_mcq, seed=cfg.seed)
        target_eval = D.reasoning_items(cfg.target_task, split="eval", n=cfg.n_target_eval, seed=cfg.seed + 1)
    train_b = train_batches(tokenizer, cfg) if train else []
    return Data(proxy, train_b, source_eval, in_proxy, mcq, target_eval)


def evaluate(model, tokenizer, data: Data, cfg: RunConfig, *, progress: bool = True) -> dict[str, float]:
    """Source and target scores (see :data:`METRICS`)."""
    from .evaluation import lm_scores, mcq_scores, reasoning_scores

    out: dict[str, float] = {}
    out["source_nll"] = lm_scores(model, data.source_eval_batches, progress=progress)["nll"]
    out["source_nll_in_proxy"] = lm_scores(model, data.source_proxy_eval_batches, progress=progress)["nll"]
    mcq = mcq_scores(model, tokenizer, data.mcq_items, progress=progress)
    out["mcq_accuracy"], out["mcq_nll"] = mcq["accuracy"], mcq["nll_correct"]
    if cfg.exact_match:
        target = reasoning_scores(model, tokenizer, data.target_eval_items, max_new_tokens=cfg.max_new_tokens,
                                  progress=progress)
        out["target_nll"], out["target_exact_match"] = target["nll"], target["exact_match"]
    else:
        from .data import format_prompt, format_target, sft_batches

        prompts = [format_prompt(tokenizer, it["prompt"]) for it in data.target_eval_items]
        targets = [format_target(tokenizer, it["target"]) for it in data.target_eval_items]
        batches = sft_batches(prompts, targets, tokenizer, batch_size=8, seq_len=1024, pad_to_longest=True)
        out["target_nll"] = lm_scores(model, batches, progress=progress)["nll"]
    return out


def build_penalty(kind: str, model, *, curvature=None, strength: float = 0.0, prior_precision: float = 0.0,
                  anchor=None):
    """``kind``: "none" | "l2" | "lalora" (needs ``curvature``). The anchor defaults to the current adapter."""
    from ..params import LoRAParams
    from ..penalties import L2Penalty, LaplacePenalty

    if kind == "none":
        return None
    lora = LoRAParams.from_model(model)
    anchor = lora.snapshot() if anchor is None else anchor
    if kind == "l2":
        return L2Penalty(anchor=anchor, strength=strength, lora=lora)
    if kind == "lalora":
        if curvature is None:
            raise ValueError("--penalty lalora needs a curvature (fit one with `lalora-curv fit`)")
        return LaplacePenalty(curvature, anchor=anchor, strength=strength, lora=lora,
                              prior_precision=prior_precision)
    raise ValueError(f"unknown penalty {kind!r}; choose none, l2 or lalora")


def save_adapter(model, out_dir: Path, metadata: dict[str, Any]) -> Path:
    """peft ``save_pretrained`` (safetensors) plus a ``lalora_run.json`` with the run's settings."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    (out_dir / "lalora_run.json").write_text(json.dumps(metadata, indent=2, default=str))
    return out_dir


def load_adapter(base_model, adapter_dir: Path):
    """Attach a saved adapter to ``base_model`` (peft ``PeftModel.from_pretrained``, offline)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"not a saved adapter (no adapter_config.json): {adapter_dir}")
    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=True)


class Stopwatch:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def run_record(started_utc: str, device: str) -> dict:
    """Where a result came from: the git commit of the checkout this package runs from and whether
    its tracked files differ from it (``dirty``; ``dirty_code`` ignores ``benchmarks/results/``),
    torch/transformers/peft versions, device, command line, times. ``commit`` is None outside a git
    checkout (an installed wheel)."""
    import datetime
    import sys

    import peft
    import transformers

    from .gitstate import git_state

    git = git_state() or {}
    return {"commit": git.get("commit"), "dirty": git.get("dirty"), "dirty_code": git.get("dirty_code"),
            "device": device,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
            "command": " ".join(["lalora-curv", *sys.argv[1:]]), "started_utc": started_utc,
            "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
