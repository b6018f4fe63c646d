"""lalora_curv.continual.noise: process-noise patterns."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from lalora_curv.continual import process_noise

from ..helpers_continual import (
    make_model,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
)


def test_process_noise_patterns():
    model = make_model(0)
    lora = lc.LoRAParams.from_model(model)
    q = process_noise(lora, 1e-4, per_layer={"*.layers.1.self_attn.*": 1e-2},
                      per_matrix={"*layers.1.self_attn.v_proj.lora_B*": 0.5})
    views = lora.unflatten(q)
    for layer in lora.layers:
        expected_a = 1e-2 if ".layers.1." in layer.name else 1e-4
        expected_b = 0.5 if (".layers.1." in layer.name and "v_proj" in layer.name) else expected_a
        assert torch.all(views[layer.A_name] == expected_a)
        assert torch.all(views[layer.B_name] == expected_b)
    with pytest.raises(KeyError, match="matches no LoRA layer"):
        process_noise(lora, per_layer={"*.layers.7.*": 1.0})
    with pytest.raises(ValueError):
        process_noise(lora, -1.0)

