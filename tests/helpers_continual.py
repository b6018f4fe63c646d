"""Tiny Llama + peft LoRA and causal-LM batches for tests/test_training.py and tests/continual/.

Model: ``LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
num_attention_heads=4, num_key_value_heads=2)``, eager attention, LoRA ``r=2, alpha=4`` on
``q_proj``/``v_proj`` (224 LoRA parameters). peft's "gaussian" init leaves ``B = 0``, where the
A-blocks of every curvature vanish (SEMANTICS §2): ``nonzero_b=True`` draws ``B`` at random too.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 37


def make_model(seed: int = 0, *, dtype=torch.float64, nonzero_b: bool = True, lora_dropout: float = 0.0, r: int = 2,
               targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                             init_lora_weights="gaussian", lora_dropout=lora_dropout))
    if nonzero_b:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.to(dtype)


def make_examples(n: int, *, T: int = 8, seed: int = 0, pad: bool = True, vocab_range=(0, VOCAB)):
    """``n`` single examples (dicts of 1-D LongTensors, length ``T``), right-padded with label -100.

    ``vocab_range`` restricts the tokens, so "source" and "target" data can differ in distribution.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    lo, hi = vocab_range
    for _ in range(n):
        length = int(torch.randint(T // 2, T + 1, (1,), generator=g)) if pad else T
        ids = torch.randint(lo, hi, (T,), generator=g)
        mask = torch.zeros(T, dtype=torch.long)
        mask[:length] = 1
        ids = ids.masked_fill(mask == 0, 0)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def collate(examples):
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def make_batches(num_batches: int, batch_size: int = 4, **kwargs):
    """``num_batches`` batches (dicts of ``(batch_size, T)`` LongTensors)."""
    ex = make_examples(num_batches * batch_size, **kwargs)
    return [collate(ex[i * batch_size:(i + 1) * batch_size]) for i in range(num_batches)]


def random_psd(n: int, *, seed: int = 0, rank: int | None = None, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank or n, generator=g, dtype=dtype)
    return X @ X.T / (rank or n)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices: intra-op threads only add synchronisation; on a loaded 2-core machine they
    made these tests ~15x slower. One thread for the module, the previous setting restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
