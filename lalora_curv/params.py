"""LoRA parameter registry: discovery, canonical order, flatten/unflatten.

Conventions (fixed by the public API, see docs/concepts.md):

* **Layer order** is module order (``model.named_modules()``), the *canonical order*.
* Within a layer the ``A`` matrix (shape ``(r, d_in)``) comes before ``B`` (shape ``(d_out, r)``).
* Each matrix is flattened row-major (``tensor.flatten()``), so the flat vector of one layer is
  ``[vec_r(A), vec_r(B)]`` and a Kronecker block of a weight ``W`` of shape ``(d_out, d_in)`` is
  ``G (x) A_in`` (output-gradient factor first).
* ``Delta W = scaling * B @ A`` has shape ``(d_out, d_in)`` for every supported layer, also for
  GPT-2 ``Conv1D`` bases (``fan_in_fan_out=True``), whose *stored* base weight is transposed.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LoRALayer", "LoRAParams", "LoRADiscoveryError"]


def is_sharded(t: Tensor) -> bool:
    """True for a ``torch.distributed`` ``DTensor`` (FSDP2 ``fully_shard`` turns every parameter it
    manages into one: each rank holds a shard, ``shape`` is the full shape)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The full value of ``t`` as a plain tensor: a ``DTensor`` is gathered from all ranks
    (``DTensor.full_tensor()``, a collective: every rank must call it; differentiable, its backward
    hands each rank the gradient of its own shard), any other tensor is returned as is."""
    return t.full_tensor() if is_sharded(t) else t


def copy_full_(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` for a ``value`` of the full shape, in place. Where ``param`` is an FSDP2
    ``DTensor`` it receives this rank's shard of ``value``, cut locally (``src_data_rank=None``: no
    communication, so every rank must pass the same ``value``), rather than torch's "mixed
    torch.Tensor and DTensor" error."""
    if is_sharded(param) and not is_sharded(value):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.detach().to(param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
    param.copy_(value)


class LoRADiscoveryError(ValueError):
    """The model has no usable LoRA layers for the requested adapter, or unsupported ones."""


@dataclass
class LoRALayer:
    """One adapted linear layer.

    Attributes:
        name: module path of the peft LoRA layer (e.g. ``base_model.model.model.layers.0.self_attn.q_proj``).
        module: the peft LoRA layer itself (``peft.tuners.lora.Linear``, or a quantized-base one such
            as ``peft.tuners.lora.bnb.Linear4bit`` / ``Linear8bitLt``).
        adapter_name: which adapter of ``module`` this entry describes.
        A: ``lora_A`` weight, shape ``(r, d_in)``.
        B: ``lora_B`` weight, shape ``(d_out, r)``.
        lora_A, lora_B: the ``nn.Linear`` modules holding ``A`` and ``B`` (hook points).
        base: the frozen base layer (``nn.Linear``, transformers ``Conv1D``, or a quantized linear
            layer such as ``bitsandbytes.nn.Linear4bit``: nothing in the fit or the penalties reads
            its weight, which stays quantized).
        fan_in_fan_out: True when the base weight is stored as ``(d_in, d_out)`` (GPT-2 Conv1D).
    """

    name: str
    module: nn.Module
    adapter_name: str
    A: nn.Parameter
    B: nn.Parameter
    lora_A: nn.Linear
    lora_B: nn.Linear
    base: nn.Module
    fan_in_fan_out: bool
    A_name: str
    B_name: str

    @property
    def scaling(self) -> float:
        """The live LoRA scaling ``alpha / r`` (read from peft each time: ``set_scale`` may change it)."""
        return float(self.module.scaling[self.adapter_name])

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    @property
    def numel(self) -> int:
        return self.A.numel() + self.B.numel()

    @property
    def base_is_quantized(self) -> bool:
        """True when the base layer holds no plain floating ``(d_out, d_in)`` weight (bitsandbytes
        4-/8-bit, GPTQ, AWQ, ... bases): its weight is packed integers, not the matrix."""
        weight = getattr(self.base, "weight", None)
        if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point:
            return True
        expected = (self.d_in, self.d_out) if self.fan_in_fan_out else (self.d_out, self.d_in)
        return tuple(weight.shape) != expected

    def base_weight(self) -> Tensor:
        """The frozen base weight in the ``(d_out, d_in)`` convention (Conv1D transposed).

        Raises ``TypeError`` for a quantized base (see :attr:`base_is_quantized`): its stored weight
        is packed integers; dequantize it with the quantization library if you need the matrix. No
        curvature structure needs it (``kfac_delta_w`` uses only the layer's inputs and output
        gradients).
        """
        if self.base_is_quantized:
            weight = getattr(self.base, "weight", None)
            raise TypeError(
                f"{self.name}: the base layer {type(self.base).__name__} is quantized (weight "
                f"{type(weight).__name__} of dtype {getattr(weight, 'dtype', None)}, shape "
                f"{tuple(getattr(weight, 'shape', ()))}), not a ({self.d_out}, {self.d_in}) matrix; dequantize it "
                "with its quantization library (e.g. bitsandbytes.functional.dequantize_4bit)")
        weight = self.base.weight
        return weight.T if self.fan_in_fan_out else weight

    def delta_w(self, A: Tensor | None = None, B: Tensor | None = None) -> Tensor:
        """``scaling * B @ A``, shape ``(d_out, d_in)``; current values unless ``A``/``B`` given."""
        A = full_tensor(self.A) if A is None else A  # FSDP2: the full matrices, not this rank's shards
        B = full_tensor(self.B) if B is None else B
        return self.scaling * (B @ A)


def _lora_layer_types():
    """peft's ``LoraLayer`` base class, and the ``LoraLayer`` classes that never *call* their
    ``lora_A`` / ``lora_B`` modules (they merge the weights before the forward, or use them
    functionally), so hooks on those modules would see nothing: refused by name."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import layer as lora_layer_module

    not_called = tuple(getattr(lora_layer_module, name) for name in ("MultiheadAttention", "ParamWrapper")
                       if hasattr(lora_layer_module, name))
    return LoraLayer, not_called


def _adapter_state_problem(module: nn.Module, adapter_name: str) -> str | None:
    """Why the LoRA layer ``module`` does not currently apply ``adapter_name`` (None when it does)."""
    if getattr(module, "merged", False):
        return "adapter is merged into the base weight; unmerge first"
    if module.disable_adapters:
        return "adapters are disabled on this layer (e.g. inside `with model.disable_adapter():`)"
    if adapter_name not in module.active_adapters:
        return f"adapter {adapter_name!r} is not active (active: {module.active_adapters})"
    return None


def _untracked_trainable(model: nn.Module, tracked: set[int]) -> list[str]:
    """Names of the parameters of ``model`` that train (``requires_grad``) but are not in ``tracked``."""
    names, seen = [], set(tracked)
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            names.append(name)
    return names


def _same_parameter(registered: Tensor, tracked: Tensor) -> bool:
    """``registered`` (on the module now) is the registry's parameter ``tracked``. Under FSDP2 the
    registry holds the sharded DTensor, and between a forward and its backward FSDP2 may leave its
    unsharded full-size plain tensor on the module instead (always for the root module's parameters,
    which are not resharded after the forward): accepted when its shape is the full shape (FSDP2
    offers no public way to map the two)."""
    if registered is tracked:
        return True
    return is_sharded(tracked) and not is_sharded(registered) and registered.shape == tracked.shape


class LoRAParams:
    """Registry of the LoRA parameters of one adapter in canonical order.

    Build it with :meth:`from_model`. ``names`` are exactly the names from
    ``model.named_parameters()``; the flat vector concatenates, per layer, ``A.flatten()`` then
    ``B.flatten()``.
    """

    def __init__(self, layers: list[LoRALayer], adapter_name: str, model: nn.Module | None = None):
        if not layers:
            raise LoRADiscoveryError("LoRAParams needs at least one LoRA layer")
        self.layers = layers
        self.adapter_name = adapter_name
        self.names: list[str] = [n for layer in layers for n in (layer.A_name, layer.B_name)]
        self.params: list[nn.Parameter] = [p for layer in layers for p in (layer.A, layer.B)]
        self.shapes: list[torch.Size] = [p.shape for p in self.params]
        self.numels: list[int] = [p.numel() for p in self.params]
        self.numel: int = sum(self.numels)
        offsets = [0]
        for n in self.numels:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        # a weak reference: the registry must not keep a deleted model alive
        self._model = weakref.ref(model) if model is not None else None

    # ------------------------------------------------------------------ discovery
    @classmethod
    def from_model(cls, model: nn.Module, adapter_name: str = "default") -> LoRAParams:
        """Discover the peft LoRA layers of ``adapter_name`` in ``model``.

        Works on a ``PeftModel`` and on any module containing peft LoRA layers. Accepted: every
        peft ``LoraLayer`` whose ``lora_A`` / ``lora_B`` of this adapter are ``nn.Linear`` maps
        called in its forward: ``lora.Linear`` over ``nn.Linear`` / GPT-2 ``Conv1D`` and the
        quantized-base layers peft builds the same way (bitsandbytes ``Linear4bit`` /
        ``Linear8bitLt``, GPTQ, AWQ, HQQ, EETQ, torchao, ...). Raises :class:`LoRADiscoveryError`
        naming the problem: no LoRA layers (with the adapters that do exist), unknown adapter,
        unsupported layer types (embedding / convolution LoRA, LoRA on ``nn.MultiheadAttention`` or
        on bare parameters, which never call ``lora_A``/``lora_B``), DoRA or other variants,
        ``lora_bias``, merged or disabled adapters, frozen LoRA matrices, tied (shared) LoRA weights.

        Parameters that train (``requires_grad``) but are not LoRA matrices of this adapter
        (``modules_to_save`` copies, trainable tokens, LoRA-trained biases, ...) are in neither the
        curvature nor the penalties: a ``UserWarning`` names them (see
        :meth:`untracked_trainable`).
        """
        LoraLayer, not_called_as_modules = _lora_layer_types()
        # DDP / DataParallel wrappers prefix every name with "module.": register the inner model so
        # a curvature fitted on the bare model fits the wrapped one too
        from torch.nn.parallel import DataParallel, DistributedDataParallel

        while isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        seen_params: dict[int, str] = {}
        layers: list[LoRALayer] = []
        adapters_found: set[str] = set()
        unsupported: list[str] = []
        problems: list[str] = []
        for mod_name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            adapters_here = set(module.lora_A.keys()) | set(module.lora_embedding_A.keys())
            adapters_found |= adapters_here
            if adapter_name not in adapters_here:
                continue
            if adapter_name not in module.lora_A or isinstance(module, not_called_as_modules) or not (
                    isinstance(module.lora_A[adapter_name], nn.Linear)
                    and isinstance(module.lora_B[adapter_name], nn.Linear)):
                unsupported.append(f"{mod_name} ({type(module).__name__})")
                continue
            if adapter_name in getattr(module, "lora_variant", {}) or module.use_dora.get(adapter_name, False):
                problems.append(f"{mod_name}: LoRA variant (e.g. DoRA) is not supported")
                continue
            if module.lora_bias.get(adapter_name, False):
                problems.append(f"{mod_name}: lora_bias=True is not supported (B has a bias)")
                continue
            state_problem = _adapter_state_problem(module, adapter_name)
            if state_problem is not None:
                problems.append(f"{mod_name}: {state_problem}")
                continue
            lora_A, lora_B = module.lora_A[adapter_name], module.lora_B[adapter_name]
            A, B = lora_A.weight, lora_B.weight
            layer_problems = []
            for p, which in ((A, "A"), (B, "B")):
                if not p.requires_grad:
                    layer_problems.append(
                        f"{mod_name}: lora_{which} is frozen (requires_grad=False, e.g. MiCA); "
                        "curvature is defined over trainable LoRA matrices only"
                    )
                if id(p) in seen_params:
                    layer_problems.append(
                        f"{mod_name}: lora_{which} is shared with {seen_params[id(p)]} (tied adapters)"
                    )
                seen_params[id(p)] = mod_name
            if layer_problems:
                problems.extend(layer_problems)
                continue
            if id(A) not in param_names or id(B) not in param_names:
                problems.append(f"{mod_name}: LoRA weights are not registered parameters of the model")
                continue
            layers.append(
                LoRALayer(
                    name=mod_name,
                    module=module,
                    adapter_name=adapter_name,
                    A=A,
                    B=B,
                    lora_A=lora_A,
                    lora_B=lora_B,
                    base=module.get_base_layer(),
                    fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
                    A_name=param_names[id(A)],
                    B_name=param_names[id(B)],
                )
            )
        if unsupported:
            raise LoRADiscoveryError(
                "unsupported LoRA layer types for adapter "
                f"{adapter_name!r} (supported: LoRA layers whose lora_A / lora_B are nn.Linear maps called in the "
                "forward, over nn.Linear, Conv1D or quantized linear bases): " + ", ".join(unsupported)
            )
        if problems:
            raise LoRADiscoveryError("cannot use these LoRA layers: " + "; ".join(problems))
        if not layers:
            if adapters_found:
                raise LoRADiscoveryError(
                    f"adapter {adapter_name!r} not found; the model's LoRA adapters are: "
                    + ", ".join(sorted(adapters_found))
                )
            raise LoRADiscoveryError(
                f"no LoRA parameters found in {type(model).__name__}: attach peft LoRA layers first "
                "(peft.get_peft_model(model, LoraConfig(...)))"
            )
        registry = cls(layers, adapter_name, model=model)
        untracked = registry.untracked_trainable()
        if untracked:
            warnings.warn(registry.untracked_message(untracked), UserWarning, stacklevel=2)
        return registry

    def __getstate__(self) -> dict:
        # a weak reference cannot be pickled (torch.save of a penalty, multiprocessing): the copy
        # keeps no link to the model, so its untracked_trainable() is empty
        return {**self.__dict__, "_model": None}

    # ------------------------------------------------------------------ what else trains
    def untracked_trainable(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the parameters that train
        (``requires_grad=True``) but are not LoRA matrices of this registry: ``modules_to_save``
        copies, peft trainable tokens (``trainable_token_indices``), LoRA-trained biases, other
        trainable adapters. They are in neither the curvature nor the penalties, so nothing
        protects them against forgetting. Read live from the model (empty when the registry was
        built without one, or the model no longer exists)."""
        model = self._model() if self._model is not None else None
        if model is None:
            return []
        return _untracked_trainable(model, {id(p) for p in self.params})

    @staticmethod
    def untracked_message(names: list[str]) -> str:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        return ("these parameters train (requires_grad=True) but are not LoRA A/B matrices, so they are in neither "
                f"the curvature nor the penalty (nothing anchors them): {shown}. Freeze them "
                "(requires_grad_(False)) or accept that they are unprotected.")

    # ------------------------------------------------------------------ flat vectors
    def flatten(self, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
        """Concatenate in canonical order -> ``Tensor[numel]``.

        ``tensors`` is a dict ``name -> tensor`` (all names needed); ``None`` takes the current
        parameter values (differentiable w.r.t. them).
        """
        if tensors is None:
            # FSDP2 shards the parameters (DTensors): gather each to its full value (differentiable)
            return torch.cat([full_tensor(p).reshape(-1) for p in self.params])
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"missing LoRA tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = tensors[name]
            if t.shape != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            parts.append(full_tensor(t).reshape(-1))  # e.g. an FSDP2 state_dict's DTensors: full values
        return torch.cat(parts)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Inverse of :meth:`flatten`: ``Tensor[numel]`` -> dict ``name -> view`` of ``vec``."""
        if vec.ndim != 1 or vec.numel() != self.numel:
            raise ValueError(f"expected a flat vector of {self.numel} entries, got shape {tuple(vec.shape)}")
        return {
            name: vec[a:b].view(shape)
            for name, shape, a, b in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])
        }

    def check_live(self) -> None:
        """Raise :class:`LoRADiscoveryError` if this registry went stale: a LoRA layer was deleted,
        re-created or replaced since it was built, or no longer applies this adapter (another
        adapter set active, adapter merged into the base weight, adapters disabled, e.g. inside
        ``with model.disable_adapter():``). A stale registry would fit or penalise weights that do
        not act in the model's forward."""
        for layer in self.layers:
            lora_A, lora_B = getattr(layer.module, "lora_A", {}), getattr(layer.module, "lora_B", {})
            name = layer.adapter_name
            if name not in lora_A or name not in lora_B or not _same_parameter(lora_A[name].weight, layer.A) \
                    or not _same_parameter(lora_B[name].weight, layer.B):
                raise LoRADiscoveryError(
                    f"stale LoRA registry: LoRA layer {layer.name} changed since the registry was built (adapter "
                    "deleted, re-created or replaced): rebuild LoRAParams.from_model(model) and refit or reload the "
                    "curvature")
            problem = _adapter_state_problem(layer.module, name)
            if problem is not None:
                raise LoRADiscoveryError(
                    f"stale LoRA registry: {layer.name}: {problem}; the registry's weights do not act in the forward")

    def split_layers(self, vec: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Split a flat vector into per-layer ``(A-part (r, d_in), B-part (d_out, r))`` views."""
        parts = list(self.unflatten(vec).values())
        return [(parts[2 * i], parts[2 * i + 1]) for i in range(len(self.layers))]

    def snapshot(self) -> dict[str, Tensor]:
        """Detached clones of the current LoRA weights (the anchor ``theta0``)."""
        return {name: full_tensor(p.detach()).clone() for name, p in zip(self.names, self.params)}

    def as_flat(self, value: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Accept a flat vector or a dict ``name -> tensor`` and return the flat vector."""
        if isinstance(value, Mapping):
            return self.flatten(value)
        if value.ndim != 1 or value.numel() != self.numel:
            raise ValueError(f"expected Tensor[{self.numel}], got shape {tuple(value.shape)}")
        return value

    def assign(self, value: Tensor | Mapping[str, Tensor]) -> None:
        """Copy ``value`` (a flat ``Tensor[numel]`` or a dict ``name -> tensor``, full shapes) into the
        live LoRA parameters, in place and without autograd (e.g. put back an anchor or load a
        smoothed adapter). Under FSDP2 each rank keeps its shard of it (:func:`copy_full_`)."""
        flat = self.as_flat(value)
        with torch.no_grad():
            for p, v in zip(self.params, self.unflatten(flat).values()):
                copy_full_(p, v)  # cast to p's dtype by the copy

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def signature(self) -> dict:
        """What a saved curvature is validated against: adapter, names, shapes (JSON-able)."""
        return {
            "adapter_name": self.adapter_name,
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "layers": [layer.name for layer in self.layers],
        }

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        text = f"LoRAParams(adapter={self.adapter_name!r}, layers={len(self.layers)}, numel={self.numel}"
        untracked = self.untracked_trainable()
        if untracked:
            shown = ", ".join(untracked[:4]) + (f", ... ({len(untracked)} in all)" if len(untracked) > 4 else "")
            text += f", untracked_trainable=[{shown}]"
        return text + ")"
