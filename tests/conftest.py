"""Shared tiny models and batches. Everything is float64 where tests compare with dense references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# Tiny models: intra-op threads only add overhead (and thrash on a loaded 2-core machine).
torch.set_num_threads(1)


def _randomize_lora_b(peft_model, seed):
    """peft's inits leave B = 0 (then A-blocks vanish, SEMANTICS §2): tests need non-zero B."""
    g = torch.Generator().manual_seed(seed + 100)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def make_tiny_lm(*, init="nonzero", targets=("q_proj", "v_proj"), r=2, seed=0, dtype=torch.float64, vocab=23,
                 hidden=16, layers=2):
    """Tiny random Llama causal LM with peft LoRA (eager attention, deterministic).

    ``init``: "nonzero" (random A and B, the default here), "gaussian" (peft: random A, B = 0),
    "default" (peft's standard init: B = 0).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg)
    init_arg = {"default": True, "gaussian": "gaussian", "nonzero": "gaussian"}[init]
    target_modules = "all-linear" if tuple(targets) == ("all-linear",) else list(targets)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules,
                                                  init_lora_weights=init_arg, lora_dropout=0.0))
    if init == "nonzero":
        _randomize_lora_b(peft_model, seed)
    return peft_model.to(dtype)


def make_lm_batch(vocab=23, lengths=(6, 4, 5), T=6, seed=1, prompt_len=0):
    """Right-padded causal-LM batch: padding has attention 0 and label -100; optional -100 prompt."""
    g = torch.Generator().manual_seed(seed)
    N = len(lengths)
    ids = torch.randint(0, vocab, (N, T), generator=g)
    mask = torch.zeros(N, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    if prompt_len:
        labels[:, :prompt_len] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_classifier(*, init="nonzero", seed=0, dtype=torch.float64, d_in=5, hidden=6, classes=4, r=2):
    """MLP classifier with LoRA on both linear layers (``init="nonzero"``: random A and B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    init_arg = {"default": True, "gaussian": "gaussian", "nonzero": "gaussian"}[init]
    peft_model = get_peft_model(mlp, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"],
                                                init_lora_weights=init_arg))
    if init == "nonzero":
        _randomize_lora_b(peft_model, seed)
    return peft_model.to(dtype)


def make_classifier_batch(N=5, d_in=5, classes=4, seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (N,), generator=g)


@pytest.fixture
def tiny_lm():
    return make_tiny_lm()


@pytest.fixture
def classifier():
    return make_classifier()


def options_for(structure: str, kind: str = "empirical", **options) -> dict:
    """The subset of ``options`` that ``fit_curvature(structure=..., kind=...)`` takes (it refuses
    the others by name): for tests that loop over structures with one set of options."""
    from lalora_curv.curvature.fit import COMMON_OPTIONS
    from lalora_curv.curvature.registry import structure_class

    allowed = COMMON_OPTIONS | structure_class(structure).fit_options
    return {k: v for k, v in options.items() if k in allowed and not (k == "mc_samples" and kind != "mc")}


class FullLogitsOnly(torch.nn.Module):
    """The same causal LM behind a forward without ``logits_to_keep``: logits at every position
    (the path a model takes whose forward cannot project only where scored)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids=None, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
