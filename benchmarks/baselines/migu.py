"""MIGU: magnitude-based gradient updating, on LoRA.

Paper: Wenyu Du, Shuang Cheng, Tongxu Luo, Zihan Qiu, Zeyu Huang, Ka Chun Cheung, Reynold Cheng,
Jie Fu. "Unlocking Continual Learning Abilities in Language Models" (MIGU), EMNLP Findings 2024,
arXiv:2406.17245. During the forward pass MIGU caches, for every linear layer, the L1-normalized
magnitude of its output per output channel; after backpropagation it keeps only the gradients of
the weight rows (output channels) whose normalized magnitude is in the top ``T`` fraction and zeroes
the others.

Rule implemented here (per adapted layer ``out = W x + s B A drop(x)``, on every forward of a
training step, i.e. per micro-batch):

1. ``m_c = mean_t |out_{t,c}|`` over the batch's tokens ``t`` (positions with attention mask 1
   when the model was called with a 2-D ``attention_mask``; every position otherwise), computed on
   the **whole adapted layer's output** (base + LoRA branch; at the standard init B = 0 it is the
   pretrained layer's output). ``p = m / ||m||_1`` (the L1 normalization does not change the
   ranking; it is kept to follow the paper).
2. ``k = ceil(T * d_out)`` (at least 1) with ``T = hp["threshold"]`` the kept fraction; the mask
   ``M_c = 1`` for the ``k`` channels of largest ``p`` (``torch.topk``), ``0`` otherwise.
3. LoRA gradients are built from the masked output gradient ``M * g`` (``g = dL/d out``):
   ``grad B = s (M * g) h^T`` (exactly: the rows of ``lora_B``'s gradient of unselected
   channels are zero, the others are unchanged) and ``grad A = s B^T (M * g) drop(x)^T``
   (**our choice for A**: A's gradient sees only the selected channels' error signal, the natural
   reading of "update only the parameters behind large-magnitude outputs" when a channel's
   parameters are shared through ``A``). The gradient that flows *through* the layer to earlier
   layers is **not** masked (as in full-finetuning MIGU, which masks parameter gradients only).

Implementation: forward hooks + tensor gradient hooks, no change to the training loop. A forward
hook on ``lora_A`` splits the LoRA branch into a path that carries gradients to ``A`` (input
detached) and a parallel path to the layer input (``A`` detached); a forward hook on ``lora_B``
puts a tensor hook ``g -> M * g`` on the parameter path and adds the input path as
``z - z.detach()`` (value exactly 0), so the forward **values are bit-identical** to plain LoRA
and only gradients change. A forward hook on the peft layer computes ``M`` from its output. The
hooks act only when the layer is in training mode with grad enabled (so ``fit_curvature``, which
runs in eval mode, and evaluation are unaffected); ``Prepared.cleanup`` removes them.

Hyperparameter grid: ``threshold`` (kept fraction ``T``), small ``[0.3, 0.7]``, full
``[0.1, 0.3, 0.5, 0.7, 0.9]`` (our grid; ``T`` = 1 is plain LoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import Baseline, Prepared, check_preset, count_trainable, forked_seed, lora_config, lora_layers

__all__ = ["MIGU", "MIGUHooks", "topk_channel_mask", "channel_magnitude"]

PAPER = (
    "Du et al. 2024, 'Unlocking Continual Learning Abilities in Language Models' (MIGU, EMNLP Findings 2024, "
    "arXiv:2406.17245). Rule: per adapted linear layer and forward pass, m_c = mean over (attended) tokens of "
    "|output_c| of the whole adapted layer, p = m/||m||_1, mask M = top ceil(T*d_out) channels of p; LoRA "
    "gradients are computed from the masked output gradient M*g: grad B rows of unselected channels are zero, "
    "grad A = s B^T (M*g) x^T (our choice for A); the gradient to earlier layers is unmasked. Standard LoRA "
    "init (B = 0). Forward/tensor hooks only; forward values unchanged."
)


def channel_magnitude(out: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L1-normalized mean |output| per output channel: ``out`` ``(..., d_out)`` -> ``(d_out,)``.

    With a 2-D ``attention_mask`` matching ``out.shape[:2]`` the mean runs over attended positions.
    """
    a = out.detach().abs().to(torch.promote_types(out.dtype, torch.float32))
    if attention_mask is not None and out.dim() == 3 and tuple(attention_mask.shape) == tuple(out.shape[:2]):
        w = attention_mask.to(device=a.device, dtype=a.dtype)
        mag = (a * w.unsqueeze(-1)).sum(dim=(0, 1)) / w.sum().clamp_min(1)
    else:
        mag = a.reshape(-1, a.shape[-1]).mean(dim=0)
    return mag / mag.sum().clamp_min(torch.finfo(mag.dtype).tiny)


def topk_channel_mask(normalized: torch.Tensor, threshold: float) -> torch.Tensor:
    """0/1 mask (same dtype) of the ``ceil(threshold * d)`` (>= 1) largest entries."""
    d = normalized.numel()
    k = min(d, max(1, math.ceil(threshold * d - 1e-9)))
    mask = torch.zeros_like(normalized)
    mask[torch.topk(normalized, k).indices] = 1
    return mask


class _Cell:
    """The mask of one forward of one layer, filled by the layer's forward hook, read in backward."""

    __slots__ = ("mask",)

    def __init__(self):
        self.mask = None


class MIGUHooks:
    """The hooks of MIGU on every peft LoRA layer of ``adapter_name`` (see the module docstring).

    ``enabled`` switches them off without removing them; ``last_masks`` holds each layer's most
    recent mask (name -> 0/1 tensor) for inspection; :meth:`remove` detaches everything.
    """

    def __init__(self, model: nn.Module, threshold: float, adapter_name: str = "default"):
        if not 0 < threshold <= 1:
            raise ValueError(f"MIGU threshold (kept fraction) must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.adapter_name = adapter_name
        self.enabled = True
        self.attention_mask: torch.Tensor | None = None
        self.last_masks: dict[str, torch.Tensor] = {}
        self._handles = []
        self._pending_hx: dict[int, list] = {}
        self._pending_cell: dict[int, list] = {}
        layers = lora_layers(model, adapter_name)
        if not layers:
            raise ValueError(f"MIGU: no peft LoRA layers with adapter {adapter_name!r}")
        for name, layer in layers:
            lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            if lora_A.bias is not None or lora_B.bias is not None:
                raise ValueError(f"MIGU: {name} has a LoRA bias (lora_bias=True), not supported")
            if adapter_name in getattr(layer, "lora_variant", {}):
                raise ValueError(f"MIGU: {name} uses a LoRA variant (e.g. DoRA), not supported")
            key = id(layer)
            self._pending_hx[key] = []
            self._pending_cell[key] = []
            self._handles.append(lora_A.register_forward_hook(self._a_hook(layer, key)))
            self._handles.append(lora_B.register_forward_hook(self._b_hook(layer, key)))
            self._handles.append(layer.register_forward_hook(self._layer_hook(name, key)))
        # the attention mask: on the outer model and on every transformers PreTrainedModel inside
        # (peft's tuner calls the causal LM's .forward directly, bypassing its hooks; the decoder
        # is called normally and receives the 2-D mask)
        from transformers import PreTrainedModel

        roots = [model] + [m for m in model.modules() if isinstance(m, PreTrainedModel) and m is not model]
        for m in roots:
            self._handles.append(m.register_forward_pre_hook(self._mask_hook, with_kwargs=True))

    def _active(self, module: nn.Module) -> bool:
        return self.enabled and module.training and torch.is_grad_enabled()

    def _mask_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None

    def _a_hook(self, layer, key):
        def hook(module, inputs, output):
            if not self._active(layer) or not module.weight.requires_grad:
                return None
            x = inputs[0]
            h_param = F.linear(x.detach(), module.weight)  # carries gradient to A only
            h_input = F.linear(x, module.weight.detach()) if x.requires_grad else None  # to x only
            self._pending_hx[key].append(h_input)
            return h_param
        return hook

    def _b_hook(self, layer, key):
        def hook(module, inputs, output):
            if not self._active(layer) or not self._pending_hx[key]:
                return None
            h_input = self._pending_hx[key].pop()
            cell = _Cell()
            self._pending_cell[key].append(cell)
            if output.requires_grad:
                def mask_grad(g, cell=cell):
                    if cell.mask is None:
                        raise RuntimeError("MIGU: no channel mask was computed for this forward")
                    return g * cell.mask.to(dtype=g.dtype, device=g.device)
                output.register_hook(mask_grad)
            if h_input is not None:  # unmasked path to the layer input, value exactly 0
                z = F.linear(h_input, module.weight.detach())
                output = output + (z - z.detach())
            return output
        return hook

    def _layer_hook(self, name, key):
        def hook(module, inputs, output):
            if not self._pending_cell[key]:
                return None
            cell = self._pending_cell[key].pop()
            out = output[0] if isinstance(output, tuple) else output
            cell.mask = topk_channel_mask(channel_magnitude(out, self.attention_mask), self.threshold)
            self.last_masks[name] = cell.mask
            return None
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.enabled = False


@dataclass
class MIGU(Baseline):
    name: str = "migu"
    paper: str = field(default=PAPER)

    def grid(self, preset: str) -> list[dict]:
        check_preset(preset)
        values = [0.3, 0.7] if preset == "small" else [0.1, 0.3, 0.5, 0.7, 0.9]
        return [{"threshold": t} for t in values]

    def setup(self, model, *, lora_kwargs, proxy_batches, hp, seed) -> Prepared:
        from peft import get_peft_model

        config = lora_config(lora_kwargs, model)  # standard peft init: Kaiming A, B = 0
        with forked_seed(seed):
            peft_model = get_peft_model(model, config)
        hooks = MIGUHooks(peft_model, float(hp["threshold"]))
        info = {"method": self.name, "init": "lora_default (B=0)", "threshold": hooks.threshold,
                "a_gradient": "from masked output gradient", "num_trainable": count_trainable(peft_model)}
        return Prepared(model=peft_model, cleanup=hooks.remove, info=info)
