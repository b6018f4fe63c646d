"""The baseline interface (``Baseline``, ``Prepared``) and helpers shared by the baseline modules.

See ``benchmarks/baselines/__init__.py`` for the contract. Nothing here changes peft: adapters are
created with peft's public ``LoraConfig`` / ``get_peft_model`` and, where a method needs other
weights, the LoRA matrices / base weights are overwritten afterwards under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Baseline", "Prepared", "PRESETS", "lora_config", "resolve_target_modules", "forked_seed",
           "check_preset", "linear_weight"]

PRESETS = ("small", "full")
_LORA_KEYS = {"r", "alpha", "target_modules", "dropout"}


def _noop() -> None:
    return None


@dataclass
class Prepared:
    """What :meth:`Baseline.setup` returns.

    Attributes:
        model: the peft model ready to train; its parameters with ``requires_grad=True`` are exactly
            what the method trains (LoRA ``lora_A``/``lora_B`` for the LoRA-based methods, OSF's
            ``osf_svd_params`` for OSF).
        cleanup: removes anything the method attached to the model (hooks); idempotent.
        info: JSON-able facts about the setup (method, init, trainable parameter count, ...).
    """

    model: nn.Module
    cleanup: Callable[[], None] = _noop
    info: dict = field(default_factory=dict)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the method trains (``requires_grad=True``), in module order."""
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class Baseline:
    """A forgetting-mitigation baseline.

    Attributes:
        name: registry key ("migu", "milora", "corda_kpm", "intruders", "osf").
        paper: citation and the exact rule implemented (one paragraph).
    """

    name: str
    paper: str

    def grid(self, preset: str) -> list[dict]:
        """Hyperparameter settings: ``"small"`` (CPU, 2-3 settings) or ``"full"``."""
        check_preset(preset)
        return [{}]

    def setup(self, model: nn.Module, *, lora_kwargs: dict, proxy_batches: list[dict], hp: dict,
              seed: int) -> Prepared:
        """Attach the method to the bare pretrained causal LM ``model`` (no adapter yet).

        ``lora_kwargs = dict(r=..., alpha=..., target_modules=..., dropout=...)``; ``proxy_batches``
        are HF causal-LM dicts from the source (proxy) data, the same LaLoRA fits its curvature on;
        ``hp`` one entry of :meth:`grid`; ``seed`` seeds any random init.
        """
        raise NotImplementedError

    def post_train(self, model: nn.Module, hp: dict) -> None:
        """In-place post-processing after training (default: nothing)."""
        return None


# ---------------------------------------------------------------------------------------- helpers
def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def _check_lora_kwargs(lora_kwargs: dict) -> dict:
    unknown = set(lora_kwargs) - _LORA_KEYS
    if unknown:
        raise TypeError(f"unknown lora_kwargs {sorted(unknown)}; known: {sorted(_LORA_KEYS)}")
    if "r" not in lora_kwargs:
        raise TypeError("lora_kwargs needs 'r'")
    # lalora_curv.experiments.models.add_lora's defaults
    out = dict(alpha=16, target_modules=("q_proj", "v_proj"), dropout=0.0)
    out.update(lora_kwargs)
    return out


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] | str) -> list[str] | str:
    """``"all-linear"`` -> the leaf names of every ``nn.Linear``/``Conv1D`` except the output head
    (peft's own expansion rule), as a list of suffixes; anything else is returned as a list / regex.

    peft expands ``"all-linear"`` inside ``get_peft_model`` only: ``preprocess_corda`` matches
    ``config.target_modules`` literally, so CorDA needs the expanded list.
    """
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return target_modules  # a regex, as peft reads it
    targets = list(target_modules) if not isinstance(target_modules, str) else ["all-linear"]
    if targets != ["all-linear"]:
        return targets
    from transformers.pytorch_utils import Conv1D

    heads = _output_head_names(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, (nn.Linear, Conv1D)) and name not in heads})
    if not leaves:
        raise ValueError("target_modules='all-linear' matched no linear layer")
    return leaves


def lora_config(lora_kwargs: dict, model: nn.Module | None = None, **extra):
    """peft ``LoraConfig`` from our ``lora_kwargs`` (+ extra ``LoraConfig`` fields), task CAUSAL_LM."""
    from peft import LoraConfig

    kw = _check_lora_kwargs(lora_kwargs)
    targets = kw["target_modules"]
    if model is not None:
        targets = resolve_target_modules(model, targets)
    elif not isinstance(targets, str):
        targets = list(targets)
    return LoraConfig(r=int(kw["r"]), lora_alpha=kw["alpha"], target_modules=targets,
                      lora_dropout=float(kw["dropout"]), task_type="CAUSAL_LM", **extra)


@contextlib.contextmanager
def forked_seed(seed: int) -> Iterator[None]:
    """Seed the global torch RNG inside, restore the caller's RNG state after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def linear_weight(layer) -> torch.Tensor:
    """A peft LoRA layer's base weight in the ``(d_out, d_in)`` convention (GPT-2 Conv1D transposed)."""
    w = layer.get_base_layer().weight
    return w.T if getattr(layer, "fan_in_fan_out", False) else w


def lora_layers(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, Any]]:
    """``(name, peft LoRA Linear layer)`` holding ``adapter_name``, in module order."""
    from peft.tuners.lora import Linear as LoraLinear

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, LoraLinear) and adapter_name in m.lora_A]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
