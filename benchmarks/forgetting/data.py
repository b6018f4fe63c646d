"""Data of the forgetting benchmark: target training items, held-out source texts and MCQ items,
curvature proxy batches, and the checks that they stay disjoint."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from benchmarks.forgetting.config import Config
from benchmarks.forgetting.items import make_splits

# ============================================================================================
# Data
# ============================================================================================

@dataclass
class Data:
    train_items: list
    target_eval_items: list
    mcq_eval: list
    mcq_proxy: list
    text_eval: dict                    # kind -> list of batches
    text_eval_texts: dict = field(default_factory=dict)   # kind -> held-out texts
    proxy: dict = field(default_factory=dict)   # (kind, n_batches) -> list of batches
    info: dict = field(default_factory=dict)
    target_batches: list = field(default_factory=list)   # one target item per row, teacher-forced
    n_generated: int = 0               # the first n_generated target items are scored by generation
    splits: dict = field(default_factory=dict)   # set -> {"val": positions, "test": positions}


def _proxy_batches(cfg: Config, tokenizer, kind: str, n_batches: int) -> tuple[list[dict], list[str]]:
    """``n_batches`` packed proxy batches of source text, and every text drawn to build them."""
    from lalora_curv.experiments import data as D

    need_tokens = n_batches * cfg.proxy_batch_size * cfg.proxy_seq_len
    n_texts = max(16, need_tokens // 20)
    while True:
        texts = D.source_texts(kind, "proxy", n=n_texts, seed=cfg.data_seed)
        batches = D.lm_batches(texts, tokenizer, batch_size=cfg.proxy_batch_size, seq_len=cfg.proxy_seq_len,
                               packed=True, drop_last=True)
        if len(batches) >= n_batches:
            return batches[:n_batches], texts
        n_texts *= 2


def add_proxy(cfg: Config, data: Data, tokenizer, key: tuple) -> list[dict]:
    """Build the proxy batches of ``key = (kind, n_batches)`` once, checked disjoint from the eval data."""
    if key not in data.proxy:
        batches, texts = _proxy_batches(cfg, tokenizer, *key)
        check_proxy_disjoint(data, texts)
        data.proxy[key] = batches
        data.info.setdefault("proxy_texts_checked", {})["|".join(map(str, key))] = len(texts)
    return data.proxy[key]


def load_data(cfg: Config, tokenizer) -> Data:
    """Draw every sample once (seeded by ``cfg.data_seed``)."""
    from lalora_curv.experiments import data as D

    train = D.reasoning_items(cfg.target_task, "train", n=cfg.n_train, seed=cfg.data_seed, **cfg.target_task_config)
    target_eval = D.reasoning_items(cfg.target_task, "eval", n=cfg.n_target_eval, seed=cfg.data_seed,
                                    **cfg.target_task_config)
    mcq_eval = D.wordnet_mcq("eval", n=cfg.n_mcq, seed=cfg.data_seed)
    mcq_proxy = D.wordnet_mcq("proxy", n=cfg.n_mcq_proxy, seed=cfg.data_seed)
    n_wn = cfg.n_source_eval // 2
    texts = {"wordnet": D.wordnet_texts("eval", n=n_wn, seed=cfg.data_seed),
             "pydoc": D.pydoc_texts("eval", n=cfg.n_source_eval - n_wn, seed=cfg.data_seed,
                                    max_chars=cfg.pydoc_max_chars)}
    text_eval = {k: D.lm_batches(v, tokenizer, batch_size=cfg.eval_batch_size, seq_len=cfg.source_seq_len,
                                 pad_to_longest=True) for k, v in texts.items()}
    data = Data(train, target_eval, mcq_eval, mcq_proxy, text_eval, text_eval_texts=texts)
    data.info = check_disjoint(cfg, data)
    add_proxy(cfg, data, tokenizer, (cfg.proxy_kind, cfg.proxy_batches))
    prompts = [D.format_prompt(tokenizer, it["prompt"]) for it in target_eval]
    targets = [D.format_target(tokenizer, it["target"]) for it in target_eval]
    data.target_batches = D.sft_batches(prompts, targets, tokenizer, batch_size=max(cfg.eval_batch_size // 2, 1),
                                        seq_len=cfg.target_eval_seq_len, pad_to_longest=True)
    if cfg.em_mode not in ("generate", "teacher_forced"):
        raise ValueError(f"em_mode must be 'generate' or 'teacher_forced', got {cfg.em_mode!r}")
    data.n_generated = (len(target_eval) if cfg.em_mode == "teacher_forced"
                        else min(cfg.n_generate or len(target_eval), len(target_eval)))
    data.splits = make_splits(_set_sizes(cfg, data), cfg.data_seed)
    data.info["splits"] = data.splits
    data.info.update(n_train=len(train), n_target_eval=len(target_eval), n_mcq=len(mcq_eval),
                     n_mcq_proxy=len(mcq_proxy), n_text_eval={k: len(v) for k, v in texts.items()},
                     text_eval_tokens={k: D.num_label_tokens(v) for k, v in text_eval.items()},
                     proxy_tokens=D.num_label_tokens(data.proxy[(cfg.proxy_kind, cfg.proxy_batches)]),
                     train_label_tokens=D.num_label_tokens(
                         D.reasoning_sft_batches(train, tokenizer, batch_size=cfg.train_batch_size,
                                                 seq_len=cfg.train_seq_len, pad_to_longest=True)))
    return data


def _set_sizes(cfg: Config, data: Data) -> dict[str, int]:
    """Items per evaluation set (see :data:`benchmarks.forgetting.items.SETS`); a text set counts batch rows."""
    def rows(batches):
        return sum(int(b["input_ids"].shape[0]) for b in batches)

    sizes = {"src_mcq": len(data.mcq_eval), "proxy_mcq": len(data.mcq_proxy),
             **{f"src_text_{k}": rows(v) for k, v in data.text_eval.items()},
             "proxy_text": rows(data.proxy[(cfg.proxy_kind, cfg.proxy_batches)]),
             "tgt": rows(data.target_batches), "tgt_gen": data.n_generated}
    if sizes["tgt"] != len(data.target_eval_items):
        raise ValueError(f"{len(data.target_eval_items)} target items gave {sizes['tgt']} scored rows")
    return sizes


def check_disjoint(cfg: Config, data: Data) -> dict:
    """Verify on the drawn samples that curvature proxy data and source evaluation data are disjoint.

    * every eval MCQ synset is in the eval split, every proxy MCQ synset in the proxy split;
    * held-out target templates are disjoint from the training templates (gsm_symbolic);
    * (:func:`check_proxy_disjoint`, for every proxy set built) no held-out text is among the texts
      drawn for the proxy batches, and no eval MCQ definition occurs inside one of them.
    Raises ``AssertionError`` on a leak; returns the facts for the JSON.
    """
    from lalora_curv.experiments import data as D

    assert all(D.split_of(it["synset"]) == "eval" for it in data.mcq_eval), "eval MCQ synset in the proxy split"
    assert all(D.split_of(it["synset"]) == "proxy" for it in data.mcq_proxy), "proxy MCQ synset in the eval split"
    info = {"disjoint_checked": True, "mcq_eval_synsets_in_eval_split": len(data.mcq_eval),
            "mcq_proxy_synsets_in_proxy_split": len(data.mcq_proxy)}
    if cfg.target_task == "gsm_symbolic":
        train_t = {it["template_id"] for it in data.train_items}
        eval_t = {it["template_id"] for it in data.target_eval_items}
        assert not (train_t & eval_t), "gsm_symbolic train and eval templates overlap"
        info.update(train_templates=sorted(train_t), eval_templates=sorted(eval_t))
    return info


def check_proxy_disjoint(data: Data, proxy_texts: list[str]) -> None:
    """No held-out source text is a proxy text and no eval MCQ definition occurs in one.

    WordNet repeats some glosses across synsets, so a definition of an eval synset can occur in the
    text of a different, proxy-split synset; the check is therefore on the texts actually drawn."""
    drawn = set(proxy_texts)
    leaked = [t for texts in data.text_eval_texts.values() for t in texts if t in drawn]
    assert not leaked, f"{len(leaked)} held-out texts are also proxy texts"
    joined = "\n".join(drawn)
    leaked_defs = [it["definition"] for it in data.mcq_eval
                   if len(it["definition"]) > 25 and it["definition"] in joined]
    assert not leaked_defs, f"eval MCQ definitions found in proxy texts: {leaked_defs[:2]}"


def train_batches(cfg: Config, data: Data, tokenizer, seed: int) -> list[dict]:
    """SFT batches of the training items in a seed-dependent order (cycled by the trainer).

    Length bucketing (to waste less compute on padding): the items are shuffled with the seed,
    sorted by token length inside windows of ``8 * batch_size`` items, batched, and the batches
    shuffled again with the seed.
    """
    from lalora_curv.experiments import data as D

    rng = random.Random(1000 + seed)
    items = list(data.train_items)
    rng.shuffle(items)
    bs = cfg.train_batch_size

    def length(it):
        return len(tokenizer(D.format_prompt(tokenizer, it["prompt"]) + D.format_target(tokenizer, it["target"]))
                   ["input_ids"])

    window = 8 * bs
    ordered = []
    for start in range(0, len(items), window):
        ordered.extend(sorted(items[start:start + window], key=length))
    batches = D.reasoning_sft_batches(ordered, tokenizer, batch_size=bs, seq_len=cfg.train_seq_len,
                                      pad_to_longest=True)
    rng.shuffle(batches)
    return batches


def proxy_for(cfg: Config, data: Data, tokenizer, spec: dict) -> tuple[tuple, list[dict]]:
    key = (spec.get("proxy_kind", cfg.proxy_kind), int(spec.get("proxy_batches", cfg.proxy_batches)))
    return key, add_proxy(cfg, data, tokenizer, key)
