"""LoRA registry: discovery, canonical order, flatten/unflatten, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lalora_curv as lc
from tests.conftest import make_tiny_lm


def test_q_v_targets_order_and_names():
    model = make_tiny_lm(targets=("q_proj", "v_proj"))
    lora = lc.LoRAParams.from_model(model)
    assert len(lora.layers) == 4
    assert [l.name.split(".")[-1] for l in lora.layers] == ["q_proj", "v_proj"] * 2
    named = dict(model.named_parameters())
    assert all(n in named for n in lora.names)
    assert lora.names[0].endswith("q_proj.lora_A.default.weight")
    assert lora.names[1].endswith("q_proj.lora_B.default.weight")
    assert lora.numel == sum(named[n].numel() for n in lora.names)
    layer = lora.layers[0]
    assert layer.A.shape == (2, 16) and layer.B.shape == (16, 2)
    assert layer.scaling == 2.0  # alpha = 2r
    assert isinstance(layer.base, nn.Linear)


def test_all_linear_targets():
    model = make_tiny_lm(targets=("all-linear",))
    lora = lc.LoRAParams.from_model(model)
    kinds = {l.name.split(".")[-1] for l in lora.layers}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in " ".join(l.name for l in lora.layers)


def test_flatten_unflatten_round_trip_and_row_major():
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    flat = lora.flatten()
    assert flat.shape == (lora.numel,)
    back = lora.unflatten(flat)
    assert list(back) == lora.names
    assert all(torch.equal(back[n], p) for n, p in zip(lora.names, lora.params))
    A = lora.layers[0].A
    assert torch.equal(flat[: A.numel()], A.detach().reshape(-1))  # row-major
    assert torch.equal(flat[1], A[0, 1])
    snap = lora.snapshot()
    assert torch.equal(lora.flatten(snap), flat)
    with torch.no_grad():
        lora.params[0].add_(1.0)
    assert not torch.equal(lora.flatten(snap), lora.flatten())  # snapshot is a detached clone


def test_assign_writes_a_flat_vector_or_a_dict_in_place():
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    ids = [id(p) for p in lora.params]
    target = torch.arange(lora.numel, dtype=torch.float32) / lora.numel  # another dtype: cast to the params'
    lora.assign(target)
    assert [id(p) for p in lora.params] == ids  # the same Parameters, written in place
    assert torch.equal(lora.flatten().detach(), target.to(lora.params[0].dtype))
    assert all(p.grad is None and p.requires_grad for p in lora.params)  # no autograd history
    as_dict = {n: -v for n, v in lora.snapshot().items()}
    lora.assign(as_dict)
    assert torch.equal(lora.flatten().detach(), lora.flatten(as_dict))
    with pytest.raises(ValueError, match="expected Tensor"):
        lora.assign(target[:-1])
    with pytest.raises(KeyError, match="missing LoRA tensors"):
        lora.assign(dict(list(as_dict.items())[1:]))


def test_flatten_is_differentiable():
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    (lora.flatten() ** 2).sum().backward()
    assert all(p.grad is not None for p in lora.params)


def test_scaling_is_read_live():
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    lora.layers[0].module.set_scale("default", 0.5)
    assert lora.layers[0].scaling == 1.0


def test_errors():
    with pytest.raises(lc.LoRADiscoveryError, match="no LoRA parameters found"):
        lc.LoRAParams.from_model(nn.Sequential(nn.Linear(3, 3)))
    model = make_tiny_lm()
    with pytest.raises(lc.LoRADiscoveryError, match="adapter 'nope' not found.*default"):
        lc.LoRAParams.from_model(model, adapter_name="nope")
    lora = lc.LoRAParams.from_model(model)
    with pytest.raises(ValueError, match="flat vector"):
        lora.unflatten(torch.zeros(3))
    with pytest.raises(KeyError, match="missing"):
        lora.flatten({})


def test_embedding_lora_is_listed_not_skipped():
    model = make_tiny_lm(targets=("q_proj", "embed_tokens"))
    with pytest.raises(lc.LoRADiscoveryError, match="embed_tokens.*Embedding"):
        lc.LoRAParams.from_model(model)


def test_dora_merged_frozen_rejected_by_name():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    dora = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(lc.LoRADiscoveryError, match="q_proj.*DoRA"):
        lc.LoRAParams.from_model(dora)
    model = make_tiny_lm()
    model.base_model.model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(lc.LoRADiscoveryError, match="layers.0.self_attn.q_proj.*merged"):
        lc.LoRAParams.from_model(model)
    model = make_tiny_lm()
    model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight.requires_grad_(False)
    with pytest.raises(lc.LoRADiscoveryError, match="layers.1.self_attn.v_proj: lora_B is frozen"):
        lc.LoRAParams.from_model(model)


def test_gpt2_conv1d_supported_with_transposed_base():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=23, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    lora = lc.LoRAParams.from_model(model)
    layer = lora.layers[0]
    assert layer.fan_in_fan_out
    assert layer.base_weight().shape == (layer.d_out, layer.d_in) == (48, 16)
    ids = torch.randint(0, 23, (2, 5))
    curv = lc.fit_curvature(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}],
                            structure="kfac_delta_w", progress=False)
    assert curv.num_params == 48 * 16


def _tiny_llama(attention_bias=False, **lora_kwargs):
    """fp64 tiny Llama with LoRA on q_proj/v_proj plus the given LoraConfig options."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=attention_bias)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian", **lora_kwargs)
    return get_peft_model(LlamaForCausalLM(cfg), config).to(torch.float64)


@pytest.mark.parametrize("option, expected", [
    ({"modules_to_save": ["lm_head"]}, ["base_model.model.lm_head.modules_to_save.default.weight"]),
    ({"trainable_token_indices": [1, 2]},
     ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]),
    ({"bias": "lora_only", "attention_bias": True},
     ["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias",
      "base_model.model.model.layers.0.self_attn.v_proj.base_layer.bias"]),
])
def test_trainable_non_lora_parameters_are_named_in_warning_and_repr(option, expected):
    """modules_to_save copies, trainable tokens, LoRA-trained biases train but are not LoRA A/B: they
    are in neither the curvature nor the penalty, so discovery warns with their names and the repr
    shows them."""
    model = _tiny_llama(**option)
    with pytest.warns(UserWarning, match="neither the curvature nor the penalty") as caught:
        lora = lc.LoRAParams.from_model(model)
    message = str(caught[0].message)
    assert all(name in message for name in expected)
    assert lora.untracked_trainable() == expected
    assert f"untracked_trainable=[{expected[0]}" in repr(lora)
    # frozen again: nothing left untracked, the repr and the warning follow live
    for name, p in model.named_parameters():
        if name in expected:
            p.requires_grad_(False)
    assert lora.untracked_trainable() == [] and "untracked" not in repr(lora)


def test_plain_lora_model_warns_nothing():
    import warnings

    model = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora = lc.LoRAParams.from_model(model)
    assert lora.untracked_trainable() == []
    assert repr(lora) == "LoRAParams(adapter='default', layers=2, numel=112)"  # q: 2x16 + 16x2, v: 2x16 + 8x2


def _stale_setup():
    from peft import LoraConfig

    model = _tiny_llama()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    lora = lc.LoRAParams.from_model(model)  # adapter "default", still the active one
    lora.check_live()
    pen = lc.L2Penalty(anchor={k: v + 1 for k, v in lora.snapshot().items()}, strength=1.0, lora=lora)
    assert float(pen()) > 0
    return model, lora, pen


def test_stale_registry_when_other_adapter_is_set_active():
    model, lora, pen = _stale_setup()
    model.set_adapter("other")
    for use in (lora.check_live, pen):
        with pytest.raises(lc.LoRADiscoveryError, match="stale LoRA registry.*q_proj.*'default' is not active"):
            use()
    model.set_adapter("default")
    pen()


def test_stale_registry_when_adapter_is_deleted():
    model, _, pen = _stale_setup()
    model.set_adapter("other")
    model.delete_adapter("default")
    with pytest.raises(lc.LoRADiscoveryError, match="stale LoRA registry.*q_proj.*deleted"):
        pen()


def test_stale_registry_when_merged_and_after_merge_and_unload():
    model, lora, pen = _stale_setup()
    model.merge_adapter()
    with pytest.raises(lc.LoRADiscoveryError, match="stale LoRA registry.*q_proj.*merged"):
        pen()
    model.unmerge_adapter()
    pen()
    model.merge_and_unload()
    with pytest.raises(lc.LoRADiscoveryError, match="stale LoRA registry.*q_proj.*merged"):
        lora.check_live()


def test_stale_registry_inside_disable_adapter_context():
    model, _, pen = _stale_setup()
    with model.disable_adapter(), pytest.raises(lc.LoRADiscoveryError, match="stale LoRA registry.*q_proj.*disabled"):
        pen()
    pen()


def test_registry_pickles_without_its_model_link():
    import pickle

    model = _tiny_llama(modules_to_save=["lm_head"])
    with pytest.warns(UserWarning):
        lora = lc.LoRAParams.from_model(model)
    copy = pickle.loads(pickle.dumps(lora))
    assert copy.names == lora.names and copy.untracked_trainable() == []
    assert lora.untracked_trainable()  # the original still reads the model live


def test_lora_layers_that_never_call_lora_a_b_are_refused_by_name():
    """peft's LoRA on nn.MultiheadAttention merges the weights around the forward and its LoRA on
    bare parameters (target_parameters) uses them functionally: the lora_A / lora_B modules (nn.Linear)
    are never called, so hooks would see nothing. Conv LoRA is not a linear map. All refused by name."""
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = nn.Linear(8, 8)
            self.conv = nn.Conv1d(8, 8, 1)

    for targets, kind in ((["attn"], "MultiheadAttention"), (["conv"], "Conv1d")):
        model = get_peft_model(Net(), LoraConfig(r=2, target_modules=targets + ["proj"]))
        with pytest.raises(lc.LoRADiscoveryError, match=f"unsupported LoRA layer.*{targets[0]} \\({kind}\\)"):
            lc.LoRAParams.from_model(model)
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=[], target_parameters=["proj.weight"]))
    with pytest.raises(lc.LoRADiscoveryError, match="unsupported LoRA layer.*proj \\(ParamWrapper\\)"):
        lc.LoRAParams.from_model(model)
