"""``FitCurvatureCallback``: fit the curvature at the end of a ``transformers`` / TRL training run
and save it beside the adapter, ready to be the next task's penalty.

Typical use (the adapter and its curvature end up in one folder)::

    callback = FitCurvatureCallback(calibration_batches, structure="kfac", kind="empirical")
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, callbacks=[callback])
    trainer.train()                 # on_train_end: fit + curv.save_pretrained(config.output_dir)
    trainer.save_model()            # adapter_model.safetensors into the same folder
    # next task: lc.load_curvature(config.output_dir, lora=lc.LoRAParams.from_model(model))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback

from ..curvature import STRUCTURES, fit_curvature
from ..params import LoRAParams

__all__ = ["FitCurvatureCallback"]


class FitCurvatureCallback(TrainerCallback):
    """At ``on_train_end``: ``curv = fit_curvature(model, batches, structure, **options)`` on the
    trained model, then ``curv.save_pretrained(output_dir)`` (``lalora_curvature.safetensors``
    beside ``adapter_model.safetensors``; a non-``"default"`` adapter's subfolder, as peft does).

    The model is fitted as the Trainer leaves it: ``fit_curvature`` runs it in eval mode (dropout
    off) and restores its training flags, so gradient checkpointing (on by default in TRL's
    ``SFTConfig`` and after ``prepare_model_for_kbit_training``), which transformers applies in
    training mode only, neither changes nor double counts the statistics.

    Multi-process training: every process fits on the ``batches`` it was given (the statistics are
    summed across processes, see ``fit_curvature(distributed=...)``); the main process writes the
    file.

    Args:
        batches: the curvature data: a list (or re-iterable) of causal-LM batch dicts
            (``input_ids``, ``attention_mask``, ``labels`` with ``-100``), as for ``fit_curvature``;
            they are moved to the model's device.
        structure: one of ``lalora_curv.STRUCTURES`` (default "kfac").
        output_dir: where to save; default the Trainer's ``args.output_dir`` (where
            ``trainer.save_model()`` writes the adapter).
        adapter_name: the adapter whose LoRA parameters are fitted (default "default").
        save: write the file (default True); False keeps the fit in memory only (:attr:`curvature`).
        **options: passed to ``fit_curvature`` (``kind``, ``backend``, ``terms``, ``rank``,
            ``mc_samples``, ``seed``, ``factor_dtype``, ``damping``, ...; ``progress`` defaults to
            False).

    Attributes:
        curvature: the fitted ``CurvatureOperator`` after training (None before).
        saved_to: the path of the written file (None before, or when not saved on this process).
    """

    def __init__(self, batches: Iterable[Any], structure: str = "kfac", *, output_dir: str | None = None,
                 adapter_name: str = "default", save: bool = True, **options):
        if structure not in STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; choose one of {STRUCTURES}")
        if not isinstance(batches, Iterable):
            raise TypeError(f"batches must be a list of batch dicts (or a re-iterable), got {type(batches).__name__}")
        if not isinstance(batches, (list, tuple)) and iter(batches) is batches:
            raise TypeError("batches is a one-shot iterator; pass a list (or a re-iterable such as a DataLoader) so "
                            "the fit at the end of training sees the data")
        self.batches = batches
        self.structure = structure
        self.output_dir = output_dir
        self.adapter_name = adapter_name
        self.save = bool(save)
        self.options = {"progress": False, **options}
        self.curvature = None
        self.saved_to = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("FitCurvatureCallback.on_train_end got no model from the Trainer")
        lora = LoRAParams.from_model(model, adapter_name=self.adapter_name)
        self.curvature = fit_curvature(model, self.batches, structure=self.structure, lora=lora, **self.options)
        if self.save and state.is_world_process_zero:
            self.saved_to = self.curvature.save_pretrained(self.output_dir or args.output_dir)
        return control
