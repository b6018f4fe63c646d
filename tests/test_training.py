"""lalora_curv.training: penalty once per optimizer step (Trainer and custom loops), fp32 penalty
under bf16 autocast, reproducible finetune(), and the LaLoRA-vs-L2 direction test (SEMANTICS §11)."""

from __future__ import annotations

import copy

import pytest
import torch

import lalora_curv as lc
from lalora_curv.curvature import DenseCurvature
from lalora_curv.training import PenalizedTrainer, PenaltyLoop, finetune, penalized_loss, task_loss_sum

from .helpers_continual import (
    collate,
    make_batches,
    make_examples,
    make_model,
    random_psd,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
)

STRENGTH, PRIOR = 0.7, 0.3


def _dense_penalty_setup(model, seed=5, dtype=torch.float64):
    """A LaplacePenalty with a random dense PSD P and an anchor away from the current weights
    (at the anchor the penalty's gradient is zero and a test could not see it)."""
    lora = lc.LoRAParams.from_model(model)
    P = random_psd(lora.numel, seed=seed, dtype=dtype)
    curv = DenseCurvature(P, kind="empirical", signature=lora.signature())
    g = torch.Generator().manual_seed(seed + 1)
    anchor = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in lora.snapshot().items()}
    pen = lc.LaplacePenalty(curv, anchor=anchor, strength=STRENGTH, lora=lora, prior_precision=PRIOR)
    return lora, P, lora.flatten(anchor), pen


def _dense_penalty(theta, P, anchor):
    """The penalty written out densely: lambda/2 (d^T P d + prior |d|^2)."""
    d = theta - anchor
    return 0.5 * STRENGTH * (d @ (P @ d) + PRIOR * (d @ d))


def _set_flat(lora, vec):
    with torch.no_grad():
        for p, v in zip(lora.params, lora.unflatten(vec).values()):
            p.copy_(v)


def _task_objective(model, lora, theta, micro_batches, mode):
    """Task objective of one optimizer step at ``theta`` from HF's own per-batch losses.

    mode "num_items": the token mean over all micro-batches (Trainer with num_items_in_batch);
    mode "batch_mean": the mean of the per-micro-batch means (Trainer without it);
    mode "terms64": the token mean written out from the logits in float64 (HF upcasts to fp32 only).
    """
    _set_flat(lora, theta)
    if mode == "terms64":
        total, count = 0.0, 0
        for b in micro_batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            keep = labels != -100
            total = total + torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
            count += int(keep.sum())
        return total / count
    if mode == "num_items":
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches]
        sums = [model(**b).loss * n for b, n in zip(micro_batches, counts)]
        return sum(sums) / sum(counts)
    return sum(model(**b).loss for b in micro_batches) / len(micro_batches)


def _sgd_reference(model, lora, pen_P, anchor, theta0, steps_batches, lr, mode):
    """theta_{k+1} = theta_k - lr * grad(task objective of step k + dense penalty)."""
    theta = theta0.clone()
    values = []
    for micro in steps_batches:
        th = theta.clone().requires_grad_(True)
        _set_flat(lora, th.detach())
        # gradient of the task objective w.r.t. the LoRA parameters, then of the dense penalty
        task = _task_objective(model, lora, th.detach(), micro, mode)
        g_task = torch.cat([g.reshape(-1) for g in torch.autograd.grad(task, lora.params)])
        penalty = _dense_penalty(th, pen_P, anchor)
        (g_pen,) = torch.autograd.grad(penalty, th)
        values.append((float(task.detach()), float(penalty.detach()), float(g_pen.norm()) * lr))
        theta = theta - lr * (g_task + g_pen)
    _set_flat(lora, theta0)
    return theta, values


def _shifted_ce_sum_over_items(outputs, labels, num_items_in_batch):
    """A user ``compute_loss_func``: float64 token sum / items of the whole accumulated batch."""
    logits, labels = outputs.logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum") / num_items_in_batch


# (how the Trainer scales the micro-batch losses, number of examples, reference objective)
TRAINER_CASES = {
    # model accepts loss kwargs: loss = token sum / num_items_in_batch, not divided by GA
    "num_items": (8, "num_items"),
    # no num_items_in_batch: per-micro-batch means, each divided by GA = 2
    "batch_mean": (8, "batch_mean"),
    # 6 examples: the second step has a single micro-batch (current_gradient_accumulation_steps = 1)
    "batch_mean_short_last_step": (6, "batch_mean"),
    # compute_loss_func: counts as scaled for GA
    "compute_loss_func": (8, "terms64"),
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_grad_accum_equals_dense_objective(tmp_path, case):
    """Two SGD steps of 2 micro-batches of 2 padded sequences: the Trainer's update equals
    theta - lr * (grad task objective + grad penalty), the penalty entering once per step."""
    from transformers import TrainingArguments

    n_examples, mode = TRAINER_CASES[case]
    model = make_model(0)
    lora, P, anchor, pen = _dense_penalty_setup(model)
    examples = make_examples(n_examples, seed=3)  # different lengths: token weighting matters
    lr = 0.5
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0,
                             use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                             train_sampling_strategy="sequential", remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = PenalizedTrainer(model=model, args=args, train_dataset=examples, data_collator=collate,
                               optimizers=(torch.optim.SGD(lora.params, lr=lr), None), penalty=pen,
                               compute_loss_func=_shifted_ce_sum_over_items if case == "compute_loss_func" else None)
    if mode == "batch_mean":
        # the Trainer then passes no num_items_in_batch and divides each micro-batch loss by the
        # number of micro-batches of the step
        trainer.model_accepts_loss_kwargs = False
    theta0 = lora.flatten().detach().clone()
    micro = [collate(examples[i:i + 2]) for i in range(0, n_examples, 2)]
    steps_batches = [micro[0:2], micro[2:4]]
    assert len(steps_batches[1]) == (1 if n_examples == 6 else 2)
    expected, values = _sgd_reference(model, lora, P, anchor, theta0, steps_batches, lr, mode)
    trainer.train()
    theta1 = lora.flatten().detach()
    # the penalty step is large enough that counting it twice (or zero times) would show
    assert min(v[2] for v in values) > 1e-2
    torch.testing.assert_close(theta1, expected, rtol=0, atol=1e-10)
    logs = [h for h in trainer.state.log_history if "task_loss" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for h, (task, penalty, _) in zip(logs, values):
        # HF's causal-LM loss upcasts logits to fp32 (also for fp64 models): fp32-level agreement
        assert h["task_loss"] == pytest.approx(task, rel=1e-6)
        assert h["penalty"] == pytest.approx(penalty, rel=1e-10)
        assert h["loss"] == pytest.approx(task + penalty, rel=1e-6)  # Trainer's own loss log is fp32


def test_trainer_evaluation_loss_is_task_only(tmp_path):
    from transformers import TrainingArguments

    model = make_model(0)
    lora, P, anchor, pen = _dense_penalty_setup(model)
    examples = make_examples(4, seed=3)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, use_cpu=True, report_to=[],
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = PenalizedTrainer(model=model, args=args, eval_dataset=examples, data_collator=collate, penalty=pen)
    metrics = trainer.evaluate()
    with torch.no_grad():
        task = float(model(**collate(examples)).loss)
    assert float(pen().detach()) > 0.1
    assert metrics["eval_loss"] == pytest.approx(task, rel=1e-6)


def test_trainer_bf16_autocast_keeps_penalty_fp32(tmp_path):
    """bf16 mixed precision on CPU: the model runs under bf16 autocast, the penalty in fp32."""
    from transformers import TrainingArguments

    model = make_model(0, dtype=torch.float32)
    lora, P, anchor, pen = _dense_penalty_setup(model, dtype=torch.float32)
    reference = float(pen().detach())  # fp32, no autocast
    dtypes = []
    hook = lora.layers[0].lora_A.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=0.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                             use_cpu=True, bf16=True, report_to=[], logging_steps=1, save_strategy="no",
                             train_sampling_strategy="sequential", remove_unused_columns=False, disable_tqdm=True)
    trainer = PenalizedTrainer(model=model, args=args, train_dataset=make_examples(4, seed=3), data_collator=collate,
                               penalty=pen)
    trainer.train()
    hook.remove()
    assert torch.bfloat16 in dtypes  # autocast really was on for the model
    logged = next(h for h in trainer.state.log_history if "penalty" in h)["penalty"]
    # a bf16 computation of the same quadratic form is off by ~1e-3 relative (8 mantissa bits)
    d = pen.displacement().detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = 0.5 * STRENGTH * (d @ (P @ d) + PRIOR * (d @ d))
    assert abs(float(naive) - reference) > 1e-4 * reference
    assert logged == pytest.approx(reference, rel=1e-6)


def test_penalized_loss_and_loop_under_bf16_autocast():
    model = make_model(0, dtype=torch.float32)
    lora, P, anchor, pen = _dense_penalty_setup(model, dtype=torch.float32)
    batch = make_batches(1, seed=4)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        total = penalized_loss(out.loss, pen)
        inner = pen()
    assert total.dtype == torch.float32 and inner.dtype == torch.float32
    assert float(inner.detach()) == float(pen().detach())  # bitwise the fp32 value
    assert penalized_loss(out.loss, None) is out.loss


def test_penalty_loop_and_finetune_accumulate_exactly():
    """finetune(grad_accum=2, sgd): one step = token mean over both micro-batches + penalty once."""
    model = make_model(0)
    lora, P, anchor, pen = _dense_penalty_setup(model)
    batches = make_batches(2, batch_size=3, seed=6)
    theta0 = lora.flatten().detach().clone()
    expected, _ = _sgd_reference(model, lora, P, anchor, theta0, [batches], 0.3, "terms64")
    result = finetune(model, batches, penalty=pen, steps=1, lr=0.3, grad_accum=2, optimizer="sgd", seed=0,
                      progress=False)
    torch.testing.assert_close(lora.flatten(result.params), expected, rtol=0, atol=1e-10)
    assert not model.training
    assert all(p.grad is None for p in lora.params)

    # PenaltyLoop directly: step only after grad_accum micro-batches, penalty value recorded
    _set_flat(lora, theta0)
    opt = torch.optim.SGD(lora.params, lr=0.3)
    loop = PenaltyLoop(opt, pen, grad_accum=2)
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert loop.backward(task_loss_sum(model, batches[0]), weight=1 / sum(counts)) is None
    record = loop.backward(task_loss_sum(model, batches[1]), weight=1 / sum(counts))
    assert record is not None and loop.num_steps == 1
    assert record["penalty"] == pytest.approx(float(_dense_penalty(theta0, P, anchor)), rel=1e-12)
    torch.testing.assert_close(lora.flatten().detach(), expected, rtol=0, atol=1e-10)


def test_finetune_is_reproducible_and_seeded():
    """LoRA dropout makes the run random: same seed -> identical weights, other seed -> not."""
    base = make_model(0, lora_dropout=0.3)
    batches = make_batches(3, seed=7)
    lora0 = lc.LoRAParams.from_model(base)
    pen = lc.L2Penalty(anchor=lora0.snapshot(), strength=0.1, lora=lora0)
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        return {"eval_loss": float(model(**batches[0]).loss)}

    results = []
    for seed in (3, 3, 4):
        model = copy.deepcopy(base)
        lora = lc.LoRAParams.from_model(model)
        penalty = lc.L2Penalty(anchor=pen.anchor(), strength=0.1, lora=lora)
        results.append(finetune(model, batches, penalty=penalty, steps=4, lr=1e-2, seed=seed, eval_fn=eval_fn,
                                eval_every=2, progress=False))
        assert not model.training
    a, b, c = results
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name])
    assert any(not torch.equal(a.params[n], c.params[n]) for n in a.params)
    assert [h["step"] for h in a.history] == [1, 2, 3, 4]
    assert [("eval_loss" in h) for h in a.history] == [False, True, False, True]
    assert a.initial_eval is not None and not any(calls)  # eval_fn always ran in eval mode
    assert a.history[0]["penalty"] == 0.0 and a.history[-1]["penalty"] > 0
    assert a.history == b.history


def test_laplace_anchors_high_curvature_directions_more_than_l2():
    """SEMANTICS §11: fit a dense curvature on source data (non-zero B), train on different target
    data with LaplacePenalty and with L2Penalty at equal strength (P scaled to mean eigenvalue 1,
    so both have the same trace), and compare the displacement along P's top-k eigenvectors with
    that along its bottom-k ones. LaLoRA must move relatively less along the top directions."""
    model = make_model(0)
    lora = lc.LoRAParams.from_model(model)
    source = make_batches(8, seed=1, vocab_range=(0, 20))
    target = make_batches(4, seed=2, vocab_range=(17, 37))
    theta0 = lora.snapshot()
    curv = lc.fit_curvature(model, source, structure="dense", kind="empirical", progress=False,
                            factor_dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(curv.to_dense())
    assert evals[-1] > 0
    curv = curv * (lora.numel / float(evals.sum()))
    k = 8

    def displacement_ratio(penalty):
        _set_flat(lora, lora.flatten(theta0))
        result = finetune(model, target, penalty=penalty, steps=30, lr=0.02, seed=0, progress=False)
        proj = evecs.T @ (lora.flatten(result.params) - lora.flatten(theta0))
        return float(proj[-k:].norm() / proj[:k].norm())

    strength = 1.0
    ratio_laplace = displacement_ratio(lc.LaplacePenalty(curv, anchor=theta0, strength=strength, lora=lora))
    ratio_l2 = displacement_ratio(lc.L2Penalty(anchor=theta0, strength=strength, lora=lora))
    assert ratio_laplace < ratio_l2, (ratio_laplace, ratio_l2)


def test_finetune_trains_everything_peft_marks_trainable():
    """modules_to_save copies and trainable tokens train too (one SGD step = -lr * gradient of the
    step's token-mean loss + penalty, for every requires_grad parameter), not only LoRA A/B; the
    frozen originals stay."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lalora_curv.training import count_terms

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian",
                        modules_to_save=["lm_head"], trainable_token_indices=[1, 2, 3])
    model = get_peft_model(LlamaForCausalLM(cfg), config).to(torch.float64)
    with pytest.warns(UserWarning, match="trainable_tokens_delta.*modules_to_save"):
        lora = lc.LoRAParams.from_model(model)
    pen = lc.L2Penalty(anchor={k: v + 0.1 for k, v in lora.snapshot().items()}, strength=1.0, lora=lora)
    batches = make_batches(2, batch_size=2, seed=8, vocab_range=(0, 6))  # tokens 1-3 occur
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    extra = [n for n in trainable if "lora_" not in n]
    assert any("modules_to_save" in n for n in extra) and any("trainable_tokens_delta" in n for n in extra)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    total = sum(count_terms(b) for b in batches)
    objective = sum(task_loss_sum(model, b) for b in batches) / total + pen()
    grads = dict(zip(trainable, torch.autograd.grad(objective, list(trainable.values()))))
    lr = 0.5
    finetune(model, batches, penalty=pen, steps=1, lr=lr, grad_accum=2, optimizer="sgd", seed=0, progress=False)
    for name, p in model.named_parameters():
        if name in trainable:
            assert grads[name].norm() > 0, name
            torch.testing.assert_close(p.detach(), before[name] - lr * grads[name], rtol=0, atol=1e-12)
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_finetune_trains_given_params_of_a_model_without_lora():
    """finetune(params=...) trains parameters that are not a LoRA adapter (orthogonal-subspace
    baselines): one SGD step equals theta - lr * grad of the step's exact token-mean loss, the result
    maps the parameters' names to their final values, and lora/params together are refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).double()
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [model.model.layers[0].self_attn.v_proj.weight, model.model.norm.weight]
    for p in trained:
        p.requires_grad_(True)
    batches = make_batches(2, batch_size=3, seed=6)
    for b in batches:
        b["input_ids"] = b["input_ids"] % 64
        b["labels"] = torch.where(b["labels"] == -100, b["labels"], b["labels"] % 64)
    start = [p.detach().clone() for p in trained]

    # reference: the gradient of sum CE / number of terms over both micro-batches, one SGD step
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    loss = sum(task_loss_sum(model, b) for b in batches) / total
    grads = torch.autograd.grad(loss, trained)
    expected = [p0 - 0.3 * g for p0, g in zip(start, grads)]

    result = finetune(model, batches, params=trained, steps=1, lr=0.3, grad_accum=2, optimizer="sgd", seed=0,
                      progress=False)
    assert set(result.params) == {"model.layers.0.self_attn.v_proj.weight", "model.norm.weight"}
    torch.testing.assert_close(result.params["model.layers.0.self_attn.v_proj.weight"], expected[0], rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(result.params["model.norm.weight"], expected[1], rtol=0, atol=1e-12)
    assert result.history[0]["task_loss"] == pytest.approx(float(loss), rel=1e-12)
    assert not model.training and all(p.grad is None for p in trained)

    with pytest.raises(ValueError, match="either lora or params"):
        finetune(make_model(0), batches, params=trained, lora=lc.LoRAParams.from_model(make_model(0)), steps=1,
                 lr=0.1, seed=0, progress=False)
    with pytest.raises(ValueError, match="not parameters of model"):
        finetune(make_model(0), batches, params=trained, steps=1, lr=0.1, seed=0, progress=False)
