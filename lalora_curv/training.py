"""Training with a penalty: custom loops, the HF ``Trainer``, and a small ``finetune()``.

The objective of one optimizer step is ``task objective + penalty``, where the task objective is
the loss averaged over the *whole* accumulated batch (all micro-batches of the step) and the
penalty (``LaplacePenalty`` / ``L2Penalty``, or any module returning a scalar) enters **once per
optimizer step**, never once per micro-batch (SEMANTICS §9). Three ways in:

* :func:`penalized_loss` — ``task_loss + penalty()`` for a loop without gradient accumulation
  (or for the one micro-batch of a step that should carry the penalty).
* :class:`PenaltyLoop` — a plain-PyTorch helper for custom loops with gradient accumulation: call
  ``loop.backward(micro_batch_loss)`` per micro-batch; on the last micro-batch of a step it
  back-propagates the penalty once (weight 1), clips, steps and zeroes the gradients.
* :class:`PenaltyTrainerMixin` — adds ``penalty=`` to any ``transformers.Trainer`` subclass
  (``class T(PenaltyTrainerMixin, trl.SFTTrainer)``), exact under gradient accumulation with and
  without ``num_items_in_batch`` (see its docstring); :class:`PenalizedTrainer` is the mixin +
  ``Trainer``.

:func:`finetune` trains the LoRA parameters of a peft causal LM with :class:`PenaltyLoop`.

Precision: the penalties compute in their anchor/curvature dtype (fp32 for bf16/fp16 models) with
autocast disabled inside ``forward``; the sum ``task + penalty`` is then promoted to fp32.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .losses import IGNORE_INDEX, batch_to_device, forward_terms
from .params import LoRAParams

__all__ = ["penalized_loss", "PenaltyLoop", "PenaltyTrainerMixin", "PenalizedTrainer", "finetune", "FinetuneResult",
           "count_terms", "task_loss_sum"]


# ---------------------------------------------------------------------------------- small helpers
def penalized_loss(task_loss: Tensor, penalty: nn.Module | None) -> Tensor:
    """``task_loss + penalty()`` (``task_loss`` unchanged when ``penalty`` is None).

    The penalty is evaluated in fp32 (or its own dtype) with autocast disabled, so under bf16
    autocast the result is fp32. With gradient accumulation, add the penalty to **one**
    micro-batch loss per optimizer step (or use :class:`PenaltyLoop`), not to every micro-batch.
    """
    if penalty is None:
        return task_loss
    return task_loss + penalty()


def count_terms(batch: Any) -> int:
    """Number of prediction terms in a batch (SEMANTICS §1).

    Causal-LM dict: positions ``t`` whose next label ``labels[:, t+1]`` is not ``-100`` and whose
    input and label positions are both attended (``attention_mask[:, t] != 0`` and
    ``attention_mask[:, t+1] != 0``: left padding adds no term); labels default to ``input_ids``
    under the mask. ``(X, y)`` tuple: samples with ``y != -100``. Agrees with ``forward_terms``.
    """
    if isinstance(batch, Mapping):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        labels = batch.get("labels")
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None else labels
        attended = mask != 0
        return int(((labels[:, 1:] != IGNORE_INDEX) & attended[:, 1:] & attended[:, :-1]).sum())
    _, y = batch
    return int((y != IGNORE_INDEX).sum())


def task_loss_sum(model: nn.Module, batch: Any) -> Tensor:
    """Sum over the batch's prediction terms of the cross-entropy, computed in (at least) fp32.

    Uses the same terms as ``fit_curvature`` (shifted labels, ``-100`` and attention-masked
    positions dropped), so ``task_loss_sum / count_terms`` is the mean loss HF models report for
    right-padded batches whose padding carries label ``-100``.
    """
    terms = forward_terms(model, batch)
    logits = terms.logits.to(torch.promote_types(terms.logits.dtype, torch.float32))
    return nn.functional.cross_entropy(logits, terms.targets, reduction="sum")


def _move_penalty(penalty: nn.Module | None, device: torch.device) -> None:
    """Put a penalty's buffers (anchor) and its curvature operator on ``device``.

    ``LaplacePenalty.curv`` is a plain attribute (not a buffer), so ``nn.Module.to`` does not
    move it; trainers may move the model after the penalty was built.
    """
    if penalty is None:
        return
    buffers = list(penalty.buffers())
    if buffers and buffers[0].device != device:
        penalty.to(device)
    curv = getattr(penalty, "curv", None)
    if curv is not None and curv.device != device:
        penalty.curv = curv.to(device)


def _penalty_params_device(penalty: nn.Module) -> torch.device | None:
    lora = getattr(penalty, "lora", None)
    return lora.device if isinstance(lora, LoRAParams) else None


# ---------------------------------------------------------------------------------- custom loops
class PenaltyLoop:
    """Gradient accumulation for custom loops, with the penalty added once per optimizer step.

    Example (``grad_accum`` micro-batches per step, each loss a per-micro-batch mean)::

        loop = PenaltyLoop(optimizer, penalty, grad_accum=4, max_grad_norm=1.0)
        for batch in batches:
            record = loop.backward(model(**batch).loss)   # weight 1/grad_accum by default
            if record is not None:                        # an optimizer step was taken
                print(record["task_loss"], record["penalty"])

    What ends up in ``.grad`` before each optimizer step is
    ``grad(sum_i w_i * loss_i) + grad(penalty)``: with the default weights ``w_i = 1/grad_accum``
    the task part is the mean of the micro-batch means; pass ``weight = n_i / N`` (terms of the
    micro-batch over terms of the step, see :func:`count_terms`) with per-micro-batch *means*,
    or ``weight = 1/N`` with per-micro-batch *sums*, for the exact token mean over the step.
    The penalty is back-propagated separately, with weight 1, on the last micro-batch of a step
    (its gradient does not depend on which micro-batch carries it: the parameters do not change
    within a step). Call :meth:`step` yourself to close a shorter last window.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (at least) the LoRA parameters.
        penalty: ``LaplacePenalty`` / ``L2Penalty`` / None.
        grad_accum: micro-batches per optimizer step (>= 1).
        max_grad_norm: clip the total gradient norm (task + penalty) to this value; None = off.
        params: the parameters to clip (default: every parameter of ``optimizer``).
        scaler: an optional ``torch.amp.GradScaler`` (fp16 training); the penalty goes through it
            too, and gradients are unscaled before clipping.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, penalty: nn.Module | None = None, *,
                 grad_accum: int = 1, max_grad_norm: float | None = None,
                 params: Iterable[Tensor] | None = None, scaler: Any | None = None):
        if int(grad_accum) < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if max_grad_norm is not None and not (max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.optimizer = optimizer
        self.penalty = penalty
        self.grad_accum = int(grad_accum)
        self.max_grad_norm = max_grad_norm
        self.params = list(params) if params is not None else [
            p for group in optimizer.param_groups for p in group["params"]]
        self.scaler = scaler
        self.num_steps = 0
        self._micro = 0
        self._task_value = 0.0

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def backward(self, task_loss: Tensor, weight: float | None = None) -> dict[str, float] | None:
        """Back-propagate ``weight * task_loss`` (default ``1/grad_accum``); after the
        ``grad_accum``-th call, take the optimizer step (see :meth:`step`) and return its record."""
        weight = 1.0 / self.grad_accum if weight is None else float(weight)
        self._backward(task_loss * weight)
        self._task_value += float(task_loss.detach()) * weight
        self._micro += 1
        if self._micro == self.grad_accum:
            return self.step()
        return None

    def step(self) -> dict[str, float]:
        """Add the penalty's gradient (once), clip, step, zero the gradients.

        Returns ``{"task_loss", "penalty", "grad_norm"}`` (``grad_norm`` is the total norm before
        clipping, NaN when ``max_grad_norm`` is None), with ``task_loss`` the weighted sum of the
        micro-batch losses of this step.
        """
        pen_value = 0.0
        if self.penalty is not None:
            pen = self.penalty()  # fp32, autocast disabled inside the penalty
            self._backward(pen)
            pen_value = float(pen.detach())
        grad_norm = math.nan
        if self.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = {"task_loss": self._task_value, "penalty": pen_value, "grad_norm": grad_norm}
        self.num_steps += 1
        self._micro = 0
        self._task_value = 0.0
        return record


# ---------------------------------------------------------------------------------- HF Trainer
def _trainer_class():
    from transformers import Trainer

    return Trainer


class PenaltyTrainerMixin:
    """Adds ``penalty=`` to any ``transformers.Trainer`` subclass: the training objective becomes
    ``task loss + penalty``. Put it first in the bases::

        class PenalizedSFTTrainer(PenaltyTrainerMixin, trl.SFTTrainer):
            pass

        trainer = PenalizedSFTTrainer(model=model, args=sft_config, train_dataset=ds, penalty=pen)

    Everything else is the wrapped Trainer's (its own ``compute_loss`` computes the task loss).
    The logs gain ``task_loss`` and ``penalty`` (means over the optimizer steps since the last
    log and, like the Trainer's ``loss``, over processes; ``task_loss + penalty`` equals the
    Trainer's ``loss``). Evaluation losses stay task-only.

    Gradient accumulation (transformers 5.x ``Trainer.training_step``/``compute_loss``): per
    micro-batch the Trainer calls ``compute_loss(model, inputs, num_items_in_batch)`` and then,
    unless the loss counts as "scaled for gradient accumulation", divides it by
    ``self.current_gradient_accumulation_steps`` (the number of micro-batches of this step)
    before ``accelerator.backward``. The loss counts as scaled when ``loss_is_scaled_for_ga`` is
    set, else when ``model_accepts_loss_kwargs and num_items_in_batch is not None`` (the model, or
    e.g. TRL's ``SFTTrainer.compute_loss``, then returns ``sum / num_items_in_batch`` over the whole
    accumulated batch) or a ``compute_loss_func`` is given. The mixin adds the penalty in
    ``compute_loss`` on the **first micro-batch of each optimizer step only** (detected by
    ``state.global_step`` changing), multiplied by exactly the factor the Trainer will divide by
    (1 when scaled, ``current_gradient_accumulation_steps`` otherwise). The gradient accumulated
    over a step is therefore ``grad(task objective) + grad(penalty)`` in both regimes. The penalty
    is added after the Trainer's ``average_tokens_across_devices`` rescaling of the task loss
    (which multiplies by the number of processes to undo DDP's gradient averaging); every rank adds
    the same penalty and DDP averages it, so it also enters once in multi-process training.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # after the Trainer in the MRO, the Trainer's compute_loss/log would run instead of ours
        trainer = _trainer_class()
        if trainer in cls.__mro__ and cls.__mro__.index(trainer) < cls.__mro__.index(PenaltyTrainerMixin):
            raise TypeError(f"{cls.__name__}: put PenaltyTrainerMixin before the Trainer class in the bases, e.g. "
                            f"class {cls.__name__}(PenaltyTrainerMixin, trl.SFTTrainer)")

    def __init__(self, *args, penalty: nn.Module | None = None, **kwargs):
        if not isinstance(self, _trainer_class()):
            raise TypeError(f"{type(self).__name__}: PenaltyTrainerMixin needs a transformers.Trainer subclass "
                            "after it in the bases")
        super().__init__(*args, **kwargs)
        self.penalty = penalty
        self._penalty_step: int | None = None  # global_step at which the penalty was last added
        self._in_training_step = False
        self._log_task = 0.0
        self._log_penalty = 0.0
        self._log_steps = 0

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # mirrors Trainer.training_step (transformers 5.x)
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def _ga_divisor(self, num_items_in_batch) -> float:
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            return 1.0
        return float(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps))

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._in_training_step = True
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not self._in_training_step:  # evaluation / prediction: task loss only
            return result
        loss, outputs = result if return_outputs else (result, None)
        divisor = self._ga_divisor(num_items_in_batch)
        # what this micro-batch contributes to the Trainer's logged loss of the step
        self._log_task += float(loss.detach().float().mean()) / divisor
        if self._penalty_step != self.state.global_step:  # first micro-batch of this optimizer step
            self._penalty_step = self.state.global_step
            self._log_steps += 1
            if self.penalty is not None:
                device = _penalty_params_device(self.penalty)
                if device is not None:
                    _move_penalty(self.penalty, device)
                pen = self.penalty()  # fp32 with autocast disabled inside
                self._log_penalty += float(pen.detach())
                # the Trainer divides the returned loss by `divisor`: pre-multiply so the penalty
                # enters the step's gradient with weight exactly 1
                loss = loss + divisor * pen
        return (loss, outputs) if return_outputs else loss

    def _mean_over_processes(self, values: list[float]) -> list[float]:
        """Mean across processes of per-process values, as the Trainer logs its ``loss`` (every
        process calls ``log``; with ``average_tokens_across_devices`` each process's task loss is
        its share of the global token sum times the number of processes, so only the mean over
        processes is the global task loss)."""
        if getattr(self.args, "world_size", 1) <= 1:
            return values
        local = torch.tensor(values, dtype=torch.float64, device=self.args.device)
        return self.accelerator.gather(local[None]).mean(0).tolist()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._log_steps > 0:
            task, penalty = self._mean_over_processes([self._log_task, self._log_penalty])
            logs["task_loss"] = task / self._log_steps
            logs["penalty"] = penalty / self._log_steps
            self._log_task = self._log_penalty = 0.0
            self._log_steps = 0
        super().log(logs, *args, **kwargs)


class PenalizedTrainer(PenaltyTrainerMixin, _trainer_class()):
    """``transformers.Trainer`` whose training objective is ``task loss + penalty``:
    :class:`PenaltyTrainerMixin` + ``Trainer``.

    ``PenalizedTrainer(model, args, ..., penalty=LaplacePenalty(...))``; see the mixin for the
    logs and the exact handling of gradient accumulation and multi-process token averaging.
    """


# ---------------------------------------------------------------------------------- finetune
@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`.

    Attributes:
        history: one dict per optimizer step: ``step`` (1-based), ``task_loss`` (mean loss over
            the prediction terms of the step's micro-batches), ``penalty`` (value before the
            step, 0 without a penalty), ``grad_norm`` (NaN unless clipping), and the metrics of
            ``eval_fn`` on the steps where it ran.
        params: the final LoRA weights (``lora.snapshot()``), or with ``finetune(params=...)`` the
            final values of those parameters by name.
        initial_eval: ``eval_fn`` before the first step (None without ``eval_fn``).
        seconds: wall time of the training loop.
    """

    history: list[dict[str, float]]
    params: dict[str, Tensor]
    initial_eval: dict[str, float] | None = None
    seconds: float = 0.0

    def column(self, key: str) -> list[float]:
        """``[h[key] for h in history if key in h]``."""
        return [h[key] for h in self.history if key in h]


_OPTIMIZERS = ("adamw", "adam", "sgd")
_RESERVED = {"step", "task_loss", "penalty", "grad_norm"}


def _make_optimizer(optimizer, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {_OPTIMIZERS} or pass a callable(params)")


def _run_eval(model: nn.Module, eval_fn: Callable[[nn.Module], Mapping[str, float]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metrics = dict(eval_fn(model))
    finally:
        model.train(was_training)
    clash = _RESERVED & set(metrics)
    if clash:
        raise ValueError(f"eval_fn returned reserved keys {sorted(clash)}; rename them (e.g. 'eval_loss')")
    return {k: float(v) for k, v in metrics.items()}


def _trainable_parameters(model: nn.Module, lora: LoRAParams) -> list[nn.Parameter]:
    """The LoRA matrices (canonical order), then every other ``requires_grad`` parameter of ``model``
    (``modules_to_save`` copies, trainable tokens, ...) once each."""
    params, seen = list(lora.params), {id(p) for p in lora.params}
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def finetune(model: nn.Module, train_batches: Iterable[Any], *, penalty: nn.Module | None = None, steps: int,
             lr: float, grad_accum: int = 1, seed: int,
             eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None, eval_every: int | None = None,
             progress: bool = True, optimizer: str | Callable = "adamw", weight_decay: float = 0.0,
             max_grad_norm: float | None = None, lora: LoRAParams | None = None,
             params: Iterable[Tensor] | None = None) -> FinetuneResult:
    """LoRA fine-tuning of a peft causal LM (or classifier) with an optional penalty.

    The optimizer trains what peft marks trainable: every ``requires_grad`` parameter of
    ``model`` (the LoRA matrices, and also ``modules_to_save`` copies, trainable tokens, biases
    with ``bias="lora_only"``; the penalty covers the LoRA matrices only, and
    ``LoRAParams.untracked_trainable()`` names the rest). Each
    optimizer step takes the next ``grad_accum`` batches of ``train_batches`` (cycled in order,
    no shuffling) and minimises ``sum_terms CE / num_terms`` over those micro-batches (exact
    token mean of the step, SEMANTICS §1 terms) ``+ penalty()`` (once per step, via
    :class:`PenaltyLoop`). Constant learning rate.

    Reproducible: the global torch RNG is seeded with ``seed`` inside a forked RNG state (dropout
    draws are identical across runs; the caller's RNG state is left untouched). The model is in
    train mode during the steps and left in **eval mode**, with ``.grad`` cleared, at the end.

    Args:
        model: a peft model (LoRA parameters trainable, base frozen).
        train_batches: HF causal-LM dicts (``input_ids``, ``attention_mask``, ``labels`` with
            ``-100``) or ``(X, y)`` tuples; a list, or any iterable (cycled).
        penalty: None, ``L2Penalty``, ``LaplacePenalty`` (built on the same model).
        steps: optimizer steps.
        lr, weight_decay: of the optimizer.
        grad_accum: micro-batches per optimizer step.
        seed: RNG seed for the run.
        eval_fn: ``eval_fn(model) -> {name: value}``, run (eval mode, no grad) before training,
            every ``eval_every`` steps and after the last step; metrics go into that step's
            history entry.
        progress: tqdm bar over steps.
        optimizer: "adamw" | "adam" | "sgd" | ``callable(params) -> Optimizer``.
        max_grad_norm: clip the total gradient norm (task + penalty); None = off.
        lora: the registry (built from ``model`` if None).
        params: train these parameters instead of the LoRA ones, for a model whose trainable
            parameters are not a LoRA adapter (e.g. an orthogonal-subspace method); ``lora`` must
            then be None, and ``FinetuneResult.params`` maps their ``model.named_parameters()``
            names to the final values. Same loop, optimizer and seeding otherwise.
    """
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eval_every is not None and int(eval_every) < 1:
        raise ValueError(f"eval_every must be >= 1 or None, got {eval_every}")
    if params is not None:
        if lora is not None:
            raise ValueError("finetune: pass either lora or params, not both")
        trained = list(params)
        if not trained:
            raise ValueError("finetune: params is empty")
        names = {id(p): name for name, p in model.named_parameters()}
        missing = sum(id(p) not in names for p in trained)
        if missing:
            raise ValueError(f"finetune: {missing} of params are not parameters of model")
        device = trained[0].device
        optimized = trained
    else:
        lora = LoRAParams.from_model(model) if lora is None else lora
        trained = lora.params
        device = lora.device
        optimized = _trainable_parameters(model, lora)  # what peft marks trainable, LoRA matrices first
    _move_penalty(penalty, device)
    batches = itertools.cycle(train_batches)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    history: list[dict[str, float]] = []
    initial_eval = None
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        opt = _make_optimizer(optimizer, optimized, lr, weight_decay)
        loop = PenaltyLoop(opt, penalty, grad_accum=grad_accum, max_grad_norm=max_grad_norm, params=optimized)
        if eval_fn is not None:
            initial_eval = _run_eval(model, eval_fn)
        model.train()
        opt.zero_grad(set_to_none=True)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="finetune", unit="step")
        try:
            for step in range(1, steps + 1):
                window = [next(batches, None) for _ in range(loop.grad_accum)]
                if any(b is None for b in window):
                    raise ValueError("train_batches is empty")
                window = [batch_to_device(b, device) for b in window]
                total_terms = sum(count_terms(b) for b in window)
                if total_terms == 0:
                    raise ValueError(f"step {step}: no prediction terms in its batches (every label is -100?)")
                record = None
                for batch in window:
                    # weight 1/N on the micro-batch *sum*: the step's loss is the exact term mean
                    record = loop.backward(task_loss_sum(model, batch), weight=1.0 / total_terms)
                entry = {"step": step, **record}
                if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == steps):
                    entry.update(_run_eval(model, eval_fn))
                history.append(entry)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(task_loss=f"{entry['task_loss']:.4f}", penalty=f"{entry['penalty']:.4g}")
        finally:
            if bar is not None:
                bar.close()
            opt.zero_grad(set_to_none=True)
            model.eval()
    final = lora.snapshot() if lora is not None else {names[id(p)]: p.detach().clone() for p in trained}
    return FinetuneResult(history=history, params=final, initial_eval=initial_eval,
                          seconds=time.perf_counter() - start)
