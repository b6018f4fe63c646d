"""Curvature fitting and the penalties under FSDP2 (``torch.distributed.fsdp.fully_shard``):
2 CPU processes with the gloo backend, ``fully_shard`` on each decoder layer and then on the
peft model, so every LoRA parameter is a sharded ``DTensor`` outside the forward."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lalora_curv as lc
from tests.conftest import make_lm_batch, make_tiny_lm, options_for

pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.fsdp import fully_shard  # noqa: E402

KINDS = ("empirical", "mc")
PENALTY_STRUCTURES = ("kfac", "diag", "kfac_delta_w")
WORLD = 2


def _batches():
    return [make_lm_batch(seed=90 + i, lengths=(6, 4 + i % 2, 5)) for i in range(4)]


def _pilot_batches():
    """Batches with equal term counts: FSDP2 averages the ranks' gradients, which equals the
    single-process token mean over a step only when every rank's batch has as many terms."""
    return [make_lm_batch(seed=70 + i, lengths=(6, 5, 5)) for i in range(2 * WORLD)]


def _options(structure: str, kind: str) -> dict:
    return options_for(structure, kind, rank=3, mc_samples=2, seed=5, factor_dtype=torch.float64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(model, per_layer: bool = True):
    """FSDP2 as users apply it: each decoder layer, then the whole peft model (``per_layer=False``:
    the peft model only, so the LoRA parameters belong to the root, which FSDP2 does not reshard
    after the forward)."""
    if per_layer:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
    fully_shard(model)
    return model


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _displaced_anchor(lora):
    g = torch.Generator().manual_seed(11)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in lora.snapshot().items()}


def _penalties(curvs: dict, lora):
    """The penalties compared: LaplacePenalty for each curvature (with a prior) and L2Penalty."""
    anchor = _displaced_anchor(lora)
    pens = {s: lc.LaplacePenalty(c, anchor=anchor, strength=3.0, lora=lora, prior_precision=0.7)
            for s, c in curvs.items()}
    pens["l2"] = lc.L2Penalty(anchor=anchor, strength=3.0, lora=lora)
    return pens


def _penalty_curvatures():
    """Unsharded curvatures (what a previous task hands over), the same on every rank."""
    model = make_tiny_lm()
    return {s: lc.fit_curvature(model, _batches(), structure=s, factor_dtype=torch.float64, progress=False,
                                distributed=False) for s in PENALTY_STRUCTURES}


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        model = make_tiny_lm()
        before = lc.LoRAParams.from_model(model)  # fully_shard replaces the parameters: stale after it
        model = _shard(model)
        try:
            lc.fit_curvature(model, _batches()[rank::world], structure="diag", lora=before, progress=False)
            results["stale_error"] = None
        except lc.LoRADiscoveryError as error:
            results["stale_error"] = str(error)
        lora = lc.LoRAParams.from_model(model)  # after fully_shard: the DTensor parameters
        results["signature"] = lora.signature()
        shard = _batches()[rank::world]
        for s in lc.STRUCTURES:
            for kind in KINDS:
                curv = lc.fit_curvature(model, shard, structure=s, kind=kind, lora=lora, progress=False,
                                        **_options(s, kind))
                results[s, kind] = curv.to_dense()
        # the penalties alone: value and gradient
        pens = _penalties(_penalty_curvatures(), lora)
        for name, pen in pens.items():
            for p in lora.params:
                p.grad = None
            value = pen()
            value.backward()
            results["penalty", name] = (value.detach(), [_full(p.grad) for p in lora.params])
        # an anchor read from the sharded model's state_dict (DTensors) gives the same penalty
        sharded_anchor = {k: v for k, v in model.state_dict().items() if k in lora.names}
        assert all(type(v).__name__ == "DTensor" for v in sharded_anchor.values())
        results["penalty_from_state_dict"] = lc.L2Penalty(anchor=sharded_anchor, strength=1.0, lora=lora).anchor_flat
        # one FSDP training step: task loss (its gradients reduce-scattered, averaged) + penalty
        for p in lora.params:
            p.grad = None
        loss = model(**shard[0]).loss + pens["kfac"]()
        loss.backward()
        results["step"] = [_full(p.grad) for p in lora.params]
        # the same step with the LoRA parameters in the root group: the penalty runs while FSDP2
        # keeps the unsharded parameters on the modules (between the forward and the backward)
        root_only = _shard(make_tiny_lm(), per_layer=False)
        root_lora = lc.LoRAParams.from_model(root_only)
        pen = _penalties(_penalty_curvatures(), root_lora)["kfac_delta_w"]
        loss = root_only(**shard[0]).loss + pen()
        loss.backward()
        results["step_root_only"] = [_full(p.grad) for p in root_lora.params]
        # B = 0 everywhere (peft's init): K-FAC drops the A-blocks alike on every rank
        zero_b = _shard(make_tiny_lm(init="default"))
        results["kfac_zero_B"] = lc.fit_curvature(zero_b, shard, structure="kfac", factor_dtype=torch.float64,
                                                  progress=False).to_dense()
        # per-term gradients differentiate w.r.t. the (sharded) parameters: refused by name, not zeros
        try:
            lc.fit_curvature(model, shard, structure="diag", terms="token", progress=False)
            results["token_error"] = None
        except ValueError as error:
            results["token_error"] = str(error)
        # writing full values into the sharded parameters: each rank keeps its shard (dict and flat)
        written = _displaced_anchor(lora)
        lora.assign(written)
        results["assign"] = lora.flatten().detach()
        lc.TaskSequence(model, structure="diag", lora=lora).set_adapter(2 * lora.flatten(written))
        results["set_adapter"] = lora.flatten().detach()
        # a custom loop with clipping: the norm is the full gradient's (mean task loss + penalty)
        clipped = _shard(make_tiny_lm())
        clipped_lora = lc.LoRAParams.from_model(clipped)
        loop = lc.PenaltyLoop(torch.optim.SGD(clipped_lora.params, lr=0.1),
                              _penalties(_penalty_curvatures(), clipped_lora)["kfac"], max_grad_norm=0.05)
        record = loop.backward(clipped(**shard[0]).loss)
        results["clip"] = (record["grad_norm"], clipped_lora.flatten().detach())
        # the strength pilot: each rank trains on its own batches; every rank must get one strength
        piloted = _shard(make_tiny_lm())
        piloted_lora = lc.LoRAParams.from_model(piloted)
        before = piloted_lora.flatten().detach()
        suggestion = lc.suggest_strength(_penalty_curvatures()["kfac"], piloted, _pilot_batches()[rank::world],
                                         steps=20, lr=1e-2, lora=piloted_lora, prior_precision=0.1)
        strengths = [None] * world
        dist.all_gather_object(strengths, suggestion.strength)
        results["suggest"] = (strengths, bool(torch.equal(piloted_lora.flatten().detach(), before)))
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "fsdp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    # forkserver where possible: its server imports transformers/peft once and forks the workers
    # from a process that never ran a kernel (spawned workers import them each, ~40 s on a loaded
    # 2-core machine; plain fork of this process can abort a child: "Invalid thread pool!")
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if method == "forkserver":
        import multiprocessing

        multiprocessing.set_forkserver_preload(["tests.test_fsdp", "peft", "transformers.models.llama.modeling_llama"])
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True, start_method=method)
    return torch.load(out / "fsdp.pt", weights_only=False)


def _single_process_fit(model, structure: str, kind: str):
    """The fit of one process on the union of the ranks' batches; for kind="mc" rank ``k``'s batches
    use the MC seed ``seed + k``, as each rank does."""
    options = _options(structure, kind)
    fitter = lc.CurvatureFitter(model, structure=structure, kind=kind, **options)
    batches = _batches()
    for rank in range(WORLD):
        fitter.backend.generator.manual_seed(options.get("seed", 0) + rank)
        for batch in batches[rank::WORLD]:
            fitter.update(batch)
    return fitter.finalize()


def test_fsdp_signature_has_the_full_shapes(fsdp_results):
    assert fsdp_results["signature"] == lc.LoRAParams.from_model(make_tiny_lm()).signature()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structure", lc.STRUCTURES)
def test_fsdp_fit_equals_single_process_fit_on_the_union(fsdp_results, structure, kind):
    single = _single_process_fit(make_tiny_lm(), structure, kind).to_dense()
    got = fsdp_results[structure, kind]
    assert got.shape == single.shape
    assert float((got - single).norm() / single.norm()) < 1e-9, (structure, kind)


@pytest.mark.parametrize("name", PENALTY_STRUCTURES + ("l2",))
def test_fsdp_penalty_value_and_gradient_equal_unsharded(fsdp_results, name):
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    pen = _penalties(_penalty_curvatures(), lora)[name]
    value = pen()
    value.backward()
    got_value, got_grads = fsdp_results["penalty", name]
    assert float(value.detach()) > 0
    torch.testing.assert_close(got_value, value.detach(), rtol=1e-10, atol=0)
    for p, g in zip(lora.params, got_grads):
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)


def _unsharded_step_loss(penalty: str):
    """``(lora, loss)`` of the step the ranks take together, on one unsharded model: the mean of the
    ranks' task losses (each rank one batch) plus the penalty ``penalty``."""
    model = make_tiny_lm()
    lora = lc.LoRAParams.from_model(model)
    pen = _penalties(_penalty_curvatures(), lora)[penalty]
    loss = sum(model(**b).loss for b in _batches()[:WORLD]) / WORLD + pen()
    return lora, loss


def test_fsdp_step_gradient_is_mean_task_gradient_plus_penalty_gradient(fsdp_results):
    lora, loss = _unsharded_step_loss("kfac")
    loss.backward()
    for p, g in zip(lora.params, fsdp_results["step"]):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)


def test_fsdp_root_only_sharding_penalty_after_forward(fsdp_results):
    lora, loss = _unsharded_step_loss("kfac_delta_w")
    loss.backward()
    for p, g in zip(lora.params, fsdp_results["step_root_only"]):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)


def test_fsdp_fit_with_zero_B_equals_single_process(fsdp_results):
    single = lc.fit_curvature(make_tiny_lm(init="default"), _batches(), structure="kfac",
                              factor_dtype=torch.float64, progress=False).to_dense()
    assert single.abs().max() > 0
    assert float((fsdp_results["kfac_zero_B"] - single).norm() / single.norm()) < 1e-9


def test_fsdp_token_terms_are_refused_by_name(fsdp_results):
    assert fsdp_results["token_error"] is not None and "terms='sequence'" in fsdp_results["token_error"]


def test_fsdp_anchor_from_the_sharded_state_dict_is_the_full_anchor(fsdp_results):
    lora = lc.LoRAParams.from_model(make_tiny_lm())
    torch.testing.assert_close(fsdp_results["penalty_from_state_dict"], lora.flatten().detach(), rtol=0, atol=0)


def test_fsdp_registry_built_before_sharding_is_refused_by_name(fsdp_results):
    assert fsdp_results["stale_error"] is not None and "stale LoRA registry" in fsdp_results["stale_error"]


def test_fsdp_assign_writes_full_values_into_the_shards(fsdp_results):
    lora = lc.LoRAParams.from_model(make_tiny_lm())
    written = lora.flatten(_displaced_anchor(lora))
    torch.testing.assert_close(fsdp_results["assign"], written, rtol=0, atol=0)
    torch.testing.assert_close(fsdp_results["set_adapter"], 2 * written, rtol=0, atol=0)


def test_fsdp_clipping_uses_the_norm_of_the_full_gradient(fsdp_results):
    lora, loss = _unsharded_step_loss("kfac")
    grads = torch.autograd.grad(loss, lora.params)
    norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    assert norm > 0.05  # so that the clipping acts
    stepped = lora.flatten().detach() - 0.1 * (0.05 / norm) * torch.cat([g.reshape(-1) for g in grads])
    got_norm, got_params = fsdp_results["clip"]
    assert abs(got_norm - norm) <= 1e-9 * norm
    torch.testing.assert_close(got_params, stepped, rtol=1e-6, atol=1e-9)


def test_fsdp_suggest_strength_is_one_strength_for_all_ranks_and_restores_the_model(fsdp_results):
    strengths, restored = fsdp_results["suggest"]
    assert restored
    # the single-process pilot over the union accumulates rank 0's and rank 1's batch of each step
    single = lc.suggest_strength(_penalty_curvatures()["kfac"], make_tiny_lm(), _pilot_batches(), steps=20, lr=1e-2,
                                 grad_accum=WORLD, prior_precision=0.1, distributed=False)
    assert strengths[0] == strengths[1]
    assert abs(strengths[0] - single.strength) <= 1e-6 * single.strength
