"""PenaltyTrainerMixin + TRL SFTTrainer on 2 CPU processes (gloo, DDP through accelerate) with
gradient accumulation and ``average_tokens_across_devices``: the update equals the single-process
dense reference (token mean over the union of both ranks' micro-batches + the penalty once)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ..helpers_continual import collate, make_examples, make_model
from ..test_training import _dense_penalty_setup, _sgd_reference
from .test_trl import PenalizedSFTTrainer, sft_config, tiny_tokenizer, tokenized_dataset

trl = pytest.importorskip("trl")

N_EXAMPLES, LR = 8, 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # the environment torchrun / accelerate launch would set; accelerate then starts a gloo group
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)

    model = make_model(0)
    lora, _, _, pen = _dense_penalty_setup(model)
    config = sft_config(out_dir, per_device_train_batch_size=1, learning_rate=LR)
    dataset = tokenized_dataset(make_examples(N_EXAMPLES, seed=3))
    trainer = PenalizedSFTTrainer(model=model, args=config, train_dataset=dataset,
                                  processing_class=tiny_tokenizer(), penalty=pen,
                                  optimizers=(torch.optim.SGD(lora.params, lr=LR), None))
    assert trainer.accelerator.num_processes == world and trainer.args.average_tokens_across_devices
    trainer.train()
    if rank == 0:
        logs = [h for h in trainer.state.log_history if "task_loss" in h]
        torch.save({"theta": lora.flatten().detach(), "logs": logs}, os.path.join(out_dir, "result.pt"))
    torch.distributed.destroy_process_group()


def test_sft_trainer_mixin_two_processes_equals_dense_objective(tmp_path):
    # fork: the workers inherit the imported modules (a spawned process re-imports transformers and
    # TRL, ~15 s of CPU each); nothing threaded or distributed is started before the fork
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    got = torch.load(tmp_path / "result.pt")
    model = make_model(0)
    lora, P, anchor, _ = _dense_penalty_setup(model)
    examples = make_examples(N_EXAMPLES, seed=3)
    # accelerate deals the batches of one example round-robin: step 1 = examples 0-3, step 2 = 4-7
    singles = [collate([e]) for e in examples]
    theta0 = lora.flatten().detach().clone()
    expected, values = _sgd_reference(model, lora, P, anchor, theta0, [singles[0:4], singles[4:8]], LR, "num_items")
    assert min(v[2] for v in values) > 1e-2  # a penalty counted twice (or per rank) would show
    # fp32-level agreement: TRL's fused LM head (see test_trl.py)
    torch.testing.assert_close(got["theta"], expected, rtol=0, atol=1e-7)
    assert [h["step"] for h in got["logs"]] == [1, 2]
    for h, (task, penalty, _) in zip(got["logs"], values):
        # the logs are the global ones (both ranks' tokens), as the Trainer's own `loss` is
        assert h["task_loss"] == pytest.approx(task, rel=1e-6)
        assert h["penalty"] == pytest.approx(penalty, rel=1e-7)
        assert h["loss"] == pytest.approx(task + penalty, rel=1e-6)
