"""A tiny random Llama saved to a folder and reloaded quantized through ``BitsAndBytesConfig``
(QLoRA's loading path, no hub), its fp32 twin with the dequantized weights, and causal-LM batches.

Sizes: ``hidden=32`` so every quantized weight holds a multiple of bitsandbytes' 4-bit block of
64 values; LoRA ``r=2, alpha=4`` on ``q_proj``, ``v_proj``, ``down_proj`` with random non-zero
``A`` and ``B`` (with ``B = 0`` the A-blocks vanish, SEMANTICS §2, and a test could not see them).
"""

from __future__ import annotations

import torch

VOCAB, HIDDEN = 37, 32
TARGETS = ("q_proj", "v_proj", "down_proj")


def tiny_llama_folder(folder, seed: int = 0) -> str:
    """Save a random fp32 tiny Llama into ``folder``; returns the folder path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return str(folder)


def lora_config(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=4, target_modules=list(TARGETS), init_lora_weights="gaussian",
                      lora_dropout=0.0, **kwargs)


def randomize_lora(model, seed: int = 0) -> None:
    """Random non-zero LoRA A and B (peft's init leaves B = 0)."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def load_quantized(folder, bits: int, seed: int = 0, compute_dtype=torch.float32, **lora_kwargs):
    """QLoRA's path: ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` (NF4 with fp32
    compute dtype by default, or LLM.int8), ``prepare_model_for_kbit_training`` (which also turns gradient
    checkpointing on), ``get_peft_model``; random non-zero LoRA weights."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    elif bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32,
                                             attn_implementation="eager")
    model = prepare_model_for_kbit_training(model)
    peft_model = get_peft_model(model, lora_config(**lora_kwargs))
    randomize_lora(peft_model, seed)
    return peft_model


def dequantized_weight(linear) -> torch.Tensor:
    """The fp32 matrix a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` holds, by bitsandbytes'
    public dequantization functions."""
    import bitsandbytes.functional as bnbF

    weight = linear.weight
    if hasattr(weight, "quant_state"):  # Params4bit
        return bnbF.dequantize_4bit(weight.data, weight.quant_state).float()
    return bnbF.int8_vectorwise_dequant(weight.data, weight.SCB).float()  # Int8Params


def fp32_twin(folder, quantized_peft_model):
    """The same model in fp32: every bitsandbytes linear weight replaced by its dequantized matrix,
    LoRA weights copied by name. Its curvature is what the quantized model's should be."""
    import bitsandbytes as bnb
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    base = quantized_peft_model.get_base_model()
    modules = dict(model.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                # peft's LoRA wrapper nests the quantized layer as `<name>.base_layer`
                twin_name = name.removesuffix(".base_layer")
                modules[twin_name].weight.copy_(dequantized_weight(module))
                replaced += 1
    assert replaced == 14, replaced  # 7 linear layers x 2 decoder layers: all quantized
    twin = get_peft_model(model, lora_config())
    lora_state = {n: p for n, p in quantized_peft_model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_" in name:
                p.copy_(lora_state[name])
    return twin


def lm_batches(num: int = 2, batch_size: int = 3, T: int = 8, seed: int = 1):
    """Right-padded causal-LM batches (padding: attention 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, VOCAB, (batch_size, T), generator=g)
        lengths = torch.randint(T // 2, T + 1, (batch_size,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out
