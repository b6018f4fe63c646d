"""Data-parallel curvature and the penalty under DDP: 2 CPU processes with the gloo backend."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lalora_curv as lc
from tests.conftest import make_lm_batch, make_tiny_lm, options_for

STRUCTURES = ("kfac", "kfac_tridiag", "diag", "diag_lowrank")


def _batches():
    return [make_lm_batch(seed=70 + i, lengths=(6, 4 + i % 2, 5)) for i in range(4)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = make_tiny_lm()
        shard = _batches()[rank::world]
        results = {}
        for s in STRUCTURES:
            op = lc.fit_curvature(model, shard, structure=s, **options_for(s, rank=3), factor_dtype=torch.float64,
                                  progress=False)
            results[s] = op.to_dense()
        # one DDP step with the penalty
        from torch.nn.parallel import DistributedDataParallel as DDP

        lora = lc.LoRAParams.from_model(model)
        curv = lc.fit_curvature(model, _batches(), structure="kfac", factor_dtype=torch.float64, progress=False,
                                distributed=False)
        anchor = {k: v + 0.05 for k, v in lora.snapshot().items()}  # non-zero displacement at the step
        ddp = DDP(model)
        pen = lc.LaplacePenalty(curv, anchor=anchor, strength=3.0, lora=lc.LoRAParams.from_model(ddp))
        opt = torch.optim.SGD(lora.params, lr=0.1)
        batch = shard[0]
        loss = ddp(**batch).loss + pen()
        loss.backward()
        opt.step()
        results["after_step"] = lora.flatten().detach()
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_curvature_and_ddp_step_equal_single_process(tmp_path):
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "dist.pt")
    model = make_tiny_lm()
    for s in STRUCTURES:
        single = lc.fit_curvature(model, _batches(), structure=s, **options_for(s, rank=3), factor_dtype=torch.float64,
                                  progress=False).to_dense()
        assert float((got[s] - single).norm() / single.norm()) < 1e-6, s
    # single process: mean of the two ranks' task losses + the penalty (DDP averages gradients)
    lora = lc.LoRAParams.from_model(model)
    curv = lc.fit_curvature(model, _batches(), structure="kfac", factor_dtype=torch.float64, progress=False)
    anchor = {k: v + 0.05 for k, v in lora.snapshot().items()}
    pen = lc.LaplacePenalty(curv, anchor=anchor, strength=3.0, lora=lora)
    opt = torch.optim.SGD(lora.params, lr=0.1)
    batches = _batches()
    loss = 0.5 * (model(**batches[0]).loss + model(**batches[1]).loss) + pen()
    loss.backward()
    opt.step()
    assert torch.allclose(got["after_step"], lora.flatten().detach(), rtol=1e-9, atol=1e-12)


def test_distributed_true_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        lc.fit_curvature(make_tiny_lm(), _batches(), structure="diag", distributed=True, progress=False)
