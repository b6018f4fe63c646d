"""TRL's ``SFTTrainer`` (CPU, tiny Llama, tiny in-memory dataset, no hub) with
``PenaltyTrainerMixin`` and ``FitCurvatureCallback``.

The reference for the penalised objective is the one of tests/test_training.py's Trainer tests:
``theta - lr * (grad of the token mean over the step's micro-batches + grad of the dense
penalty)``, the penalty entering once per optimizer step.
"""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from lalora_curv.integrations.callbacks import FitCurvatureCallback
from lalora_curv.training import PenaltyTrainerMixin

from ..helpers_continual import (
    VOCAB,
    collate,
    make_examples,
    make_model,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
)
from ..test_training import _dense_penalty_setup, _sgd_reference

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def tiny_tokenizer():
    """A word-level tokenizer over the tiny Llama's 37 ids ("t0" = id 0 pads, as make_examples does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", unk_token="t1", eos_token="t2")


def tokenized_dataset(examples):
    """The examples unpadded, as a pre-tokenized dataset (SFTTrainer pads them back itself)."""
    rows = [{"input_ids": e["input_ids"][e["attention_mask"].bool()].tolist()} for e in examples]
    return datasets.Dataset.from_list(rows)


class PenalizedSFTTrainer(PenaltyTrainerMixin, trl.SFTTrainer):
    pass


def sft_config(tmp_path, **overrides):
    """SFTConfig for CPU (use_cpu, no bf16), constant lr, no clipping, sequential batches; its
    default gradient checkpointing stays on."""
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                "max_steps": 2, "learning_rate": 0.5, "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
                "use_cpu": True, "bf16": False, "report_to": [], "logging_steps": 1, "save_strategy": "no",
                "train_sampling_strategy": "sequential", "disable_tqdm": True}
    return trl.SFTConfig(**{**settings, **overrides})


def test_sft_trainer_with_mixin_grad_accum_equals_dense_objective(tmp_path):
    """class T(PenaltyTrainerMixin, SFTTrainer): two SGD steps of 2 micro-batches of 2 padded
    sequences (gradient checkpointing on, SFTConfig's default) equal the dense reference; the logs
    carry task_loss and penalty per step."""
    model = make_model(0)
    lora, P, anchor, pen = _dense_penalty_setup(model)
    examples = make_examples(8, seed=3)
    config = sft_config(tmp_path)
    assert config.activation_checkpointing and config.average_tokens_across_devices
    trainer = PenalizedSFTTrainer(model=model, args=config, train_dataset=tokenized_dataset(examples),
                                  processing_class=tiny_tokenizer(), penalty=pen,
                                  optimizers=(torch.optim.SGD(lora.params, lr=0.5), None))
    micro = [collate(examples[i:i + 2]) for i in range(0, 8, 2)]
    theta0 = lora.flatten().detach().clone()
    expected, values = _sgd_reference(model, lora, P, anchor, theta0, [micro[0:2], micro[2:4]], 0.5, "num_items")
    trainer.train()
    assert model.is_activation_checkpointing  # the run really had checkpointing on
    assert min(v[2] for v in values) > 1e-2  # counting the penalty twice (or never) would show
    # TRL computes the task loss through its own tiled LM head (trl.trainer.utils.add_fused_lm_head), not
    # HF's loss: it agrees with the fp64 reference at fp32 roundoff (4e-9 measured on steps of ~1); a
    # penalty counted twice or never would be off by > 1e-2
    torch.testing.assert_close(lora.flatten().detach(), expected, rtol=0, atol=1e-7)
    logs = [h for h in trainer.state.log_history if "task_loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for h, (task, penalty, _) in zip(logs, values):
        assert h["task_loss"] == pytest.approx(task, rel=1e-6)
        assert h["penalty"] == pytest.approx(penalty, rel=1e-7)  # step 2 starts from the fp32-level theta
        assert h["loss"] == pytest.approx(task + penalty, rel=1e-6)
        assert "mean_token_accuracy" in h  # SFTTrainer's own logging still runs


@pytest.mark.parametrize("structure", ["kfac", "dense"])
def test_fit_curvature_callback_saves_beside_the_adapter(tmp_path, structure):
    """A TRL run with gradient checkpointing on and FitCurvatureCallback: the file lands next to
    adapter_model.safetensors, loads back, and equals a fit of the same trained weights on a model
    without checkpointing."""
    model = make_model(0)
    examples = make_examples(4, seed=3)
    calibration = [collate(make_examples(3, seed=11))]
    callback = FitCurvatureCallback(calibration, structure=structure, kind="empirical")
    config = sft_config(tmp_path, max_steps=1, learning_rate=0.05)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=tokenized_dataset(examples),
                             processing_class=tiny_tokenizer(), callbacks=[callback])
    lora = lc.LoRAParams.from_model(model)
    theta0 = lora.flatten().detach().clone()
    trainer.train()
    trainer.save_model()
    assert model.is_activation_checkpointing and not torch.equal(lora.flatten().detach(), theta0)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "adapter_model.safetensors" in files and "lalora_curvature.safetensors" in files
    assert callback.saved_to == tmp_path / "lalora_curvature.safetensors"
    loaded = lc.load_curvature(tmp_path, lora=lora)
    X = torch.randn(loaded.num_params, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(loaded.matmat(X), callback.curvature.matmat(X))

    # the same trained weights in a fresh model that never had checkpointing
    fresh = make_model(0)
    fresh_lora = lc.LoRAParams.from_model(fresh)
    with torch.no_grad():
        for p, q in zip(fresh_lora.params, lora.params):
            p.copy_(q)
    assert not fresh.is_activation_checkpointing
    reference = lc.fit_curvature(fresh, calibration, structure=structure, kind="empirical", progress=False)
    expected = reference.matmat(X)
    assert expected.norm() > 0
    torch.testing.assert_close(callback.curvature.matmat(X), expected, rtol=1e-6,
                               atol=1e-9 * float(expected.abs().max()))


def test_fit_curvature_callback_refuses_bad_arguments():
    with pytest.raises(ValueError, match="unknown structure 'kfak'"):
        FitCurvatureCallback([], structure="kfak")
    with pytest.raises(TypeError, match="one-shot iterator"):
        FitCurvatureCallback(iter([{}]))
    with pytest.raises(TypeError, match="batches must be a list.*got NoneType"):
        FitCurvatureCallback(None)


def test_mixin_order_and_base_are_checked():
    with pytest.raises(TypeError, match="put PenaltyTrainerMixin before the Trainer class"):
        type("Wrong", (trl.SFTTrainer, PenaltyTrainerMixin), {})
    lonely = type("Lonely", (PenaltyTrainerMixin,), {})
    with pytest.raises(TypeError, match="needs a transformers.Trainer subclass"):
        lonely(penalty=None)
