"""Offline, seeded data for forgetting experiments: source text, a source MCQ, target tasks, batchers.

Sources (what the model should not forget):

* WordNet 3.0 (Debian ``wordnet-base``: ``/usr/share/wordnet/data.{noun,verb,adj,adv}``), rendered
  as short dictionary sentences (:func:`wordnet_texts`) and as a definition -> word multiple
  choice test (:func:`wordnet_mcq`).
* Python's own reference text, ``pydoc_data.topics`` (one document per topic, cut into passages at
  paragraph boundaries; :func:`pydoc_texts`).

Splits (SEMANTICS.md §10): curvature *proxy* data and source *evaluation* data are disjoint.
WordNet is split by synset and pydoc by topic, with a fixed hash rule (:func:`split_of`): about
``EVAL_FRACTION`` of the keys are ``"eval"``, the rest ``"proxy"``. The rule depends on the key
only, never on ``seed`` or ``n``, so no seed can leak an eval synset or topic into the proxy set.
``seed`` only chooses and orders the returned sample.

Target (what the model learns): reasoning-gym's ``gsm_symbolic`` (grade-school word problems from
85 templates) and short-answer tasks (``basic_arithmetic``, ``chain_sum``, ``products``,
``leg_counting``; names and default configs in :mod:`.tasks`), see :func:`reasoning_items`.
``gsm_symbolic`` holds out whole templates: template ``t`` is eval iff
``t % GSM_EVAL_TEMPLATE_MODULUS == 0`` (17 of the 85 templates in reasoning-gym 0.1.25).

Batchers turn text into HF causal-LM dicts ``{"input_ids", "attention_mask", "labels"}`` of
LongTensors of shape ``(B, T)``; label ``-100`` marks positions that are not prediction targets
(padding, prompts). Padding is right padding with ``attention_mask == 0``.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

# prompt formatting and batchers live in batching.py; re-exported here (with the private encoding
# helpers some experiment modules import from here)
from .batching import (  # noqa: F401
    IGNORE_INDEX,
    _encode,
    _eos_id,
    format_prompt,
    format_target,
    lm_batches,
    num_label_tokens,
    pad_token_id,
    reasoning_sft_batches,
    sft_batches,
)

# task names and default configs live in tasks.py (re-exported here)
from .tasks import BASIC_ARITHMETIC_CONFIG, REASONING_TASKS, TASK_CONFIGS, default_task_config  # noqa: F401

EVAL_FRACTION = 0.2
WORDNET_DIR = pathlib.Path("/usr/share/wordnet")
GSM_EVAL_TEMPLATE_MODULUS = 5

# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def split_of(key: str, eval_fraction: float = EVAL_FRACTION) -> str:
    """``"eval"`` or ``"proxy"`` for a WordNet synset key or pydoc topic name (fixed hash rule).

    The first 8 bytes of ``sha256(key)``, read as a fraction of 2**64, below ``eval_fraction``
    mean ``"eval"``. Deterministic across runs, machines and Python versions.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction else "proxy"


def _check_source_split(split: str) -> None:
    if split not in ("proxy", "eval"):
        raise ValueError(f"source split must be 'proxy' (curvature data) or 'eval' (held out), got {split!r}")


def _sample(population: list, n: int | None, seed: int, what: str) -> list:
    """``n`` elements of ``population`` in a seeded random order (all of them if ``n`` is None)."""
    order = list(population)
    random.Random(seed).shuffle(order)
    if n is None:
        return order
    if n > len(order):
        raise ValueError(f"asked for {n} {what} but only {len(order)} are available")
    return order[:n]


# --------------------------------------------------------------------------------------------
# WordNet 3.0
# --------------------------------------------------------------------------------------------

# Lexicographer file numbers -> names (WordNet's lexnames(5WN); Debian does not ship the file).
LEXFILE_NAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives, e.g. "galore(ip)"
_SINGLE_WORD = re.compile(r"^[A-Za-z]+(?:-[A-Za-z]+)*$")


@dataclass(frozen=True)
class Synset:
    """One WordNet synset.

    ``key`` is ``<file pos><offset>``, e.g. ``"n02084071"`` (satellite adjectives ``"s"`` live in
    the adjective file, so their key starts with ``"a"``). ``words`` are the lemmas as written in
    the database (underscores for spaces, adjective markers removed); ``lemmas`` has spaces.
    ``definition`` is the gloss without its quoted example sentences, which are ``examples``.
    """

    offset: int
    pos: str
    lexfile_num: int
    words: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{'a' if self.pos == 's' else self.pos}{self.offset:08d}"

    @property
    def lexfile(self) -> str:
        return LEXFILE_NAMES[self.lexfile_num]

    @property
    def lemmas(self) -> tuple[str, ...]:
        return tuple(w.replace("_", " ") for w in self.words)


def _split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """``'def; "ex 1"; "ex 2"'`` -> ``('def', ('ex 1', 'ex 2'))``.

    Examples are the ``; "..."`` chunks; quotes inside the definition itself (e.g. 'the letter
    "a"') stay in the definition because they are not preceded by ``;``.
    """
    chunks = re.split(r';\s*(?=")', gloss.strip())
    definition_parts, examples = [], []
    for i, chunk in enumerate(chunks):
        chunk = chunk.strip()
        quoted = re.match(r'"([^"]*)"', chunk)
        if quoted and (i > 0 or chunk.startswith('"')):
            if quoted.group(1).strip():
                examples.append(quoted.group(1).strip())
        else:
            definition_parts.append(chunk)
    definition = "; ".join(p for p in definition_parts if p).strip().rstrip(";").strip()
    return definition, tuple(examples)


def parse_data_line(line: str) -> Synset:
    """Parse one synset line of a WordNet ``data.*`` file (format: wndb(5WN))."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lexfile_num, pos, word_count = int(fields[0]), int(fields[1]), fields[2], int(fields[3], 16)
    words = tuple(_ADJ_MARKER.sub("", fields[4 + 2 * i]) for i in range(word_count))
    definition, examples = _split_gloss(gloss)
    return Synset(offset=offset, pos=pos, lexfile_num=lexfile_num, words=words, definition=definition,
                  examples=examples)


@functools.lru_cache(maxsize=8)
def _read_pos(wordnet_dir: str, pos: str) -> tuple[Synset, ...]:
    path = pathlib.Path(wordnet_dir) / _DATA_FILES[pos]
    if not path.is_file():
        raise FileNotFoundError(f"WordNet 3.0 data file {path} not found: install it with "
                                "`apt-get install wordnet-base` (or pass wordnet_dir=)")
    with open(path, encoding="utf-8", errors="replace") as fh:
        # License header lines start with two spaces; every other line is one synset.
        return tuple(parse_data_line(line) for line in fh if not line.startswith("  ") and line.strip())


def read_wordnet(pos: Sequence[str] = ("n", "v", "a", "r"), wordnet_dir: str | pathlib.Path = WORDNET_DIR
                 ) -> list[Synset]:
    """All synsets of the given parts of speech (``"n"``, ``"v"``, ``"a"`` incl. satellites, ``"r"``).

    Parsed once per process and cached. WordNet 3.0 has 82115 noun, 13767 verb, 18156 adjective
    and 3621 adverb synsets.
    """
    unknown = set(pos) - set(_DATA_FILES)
    if unknown:
        raise ValueError(f"unknown WordNet part(s) of speech {sorted(unknown)}; use 'n', 'v', 'a', 'r'")
    return [s for p in pos for s in _read_pos(str(wordnet_dir), p)]


def synset_text(synset: Synset) -> str:
    """A synset as a short dictionary sentence.

    e.g. ``'kill (noun): the destruction of an enemy plane or ship or tank or missile. Example: the
    pilot reported two kills during the mission.'``; further lemmas are listed as synonyms.
    """
    head, *others = synset.lemmas
    text = f"{head} ({POS_NAMES[synset.pos]}): {_sentence(synset.definition)}"
    if others:
        text += f" Synonyms: {', '.join(others)}."
    for example in synset.examples:
        text += f" Example: {_sentence(example)}"
    return text


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def wordnet_texts(split: str = "proxy", n: int | None = None, seed: int = 0, *,
                  pos: Sequence[str] = ("n", "v", "a", "r"), eval_fraction: float = EVAL_FRACTION,
                  wordnet_dir: str | pathlib.Path = WORDNET_DIR) -> list[str]:
    """``n`` WordNet synsets of ``split`` rendered by :func:`synset_text` (split by synset key)."""
    _check_source_split(split)
    synsets = [s for s in read_wordnet(pos, wordnet_dir) if s.definition and split_of(s.key, eval_fraction) == split]
    return [synset_text(s) for s in _sample(synsets, n, seed, f"WordNet {split} synsets")]


# --------------------------------------------------------------------------------------------
# WordNet multiple choice: definition -> word
# --------------------------------------------------------------------------------------------

def _headword(synset: Synset, single_word: bool) -> str | None:
    """The first lemma usable as an MCQ choice (single words only if ``single_word``)."""
    for lemma in synset.lemmas:
        if not single_word or _SINGLE_WORD.match(lemma):
            return lemma
    return None


@functools.lru_cache(maxsize=8)
def _distractor_pools(pos: tuple[str, ...], single_word: bool, wordnet_dir: str) -> dict[int, list[str]]:
    """Lexicographer file number -> distinct (case-insensitive) headwords of its synsets, file order."""
    pools: dict[int, list[str]] = {}
    seen: dict[int, set[str]] = {}
    for s in read_wordnet(pos, wordnet_dir):
        word = _headword(s, single_word) if s.definition else None
        if word is not None and word.lower() not in seen.setdefault(s.lexfile_num, set()):
            seen[s.lexfile_num].add(word.lower())
            pools.setdefault(s.lexfile_num, []).append(word)
    return pools


def mcq_prompt(definition: str, pos: str) -> str:
    """Cloze prompt of a WordNet MCQ item; a choice is scored as the continuation ``" " + choice``."""
    return f"Dictionary definition ({POS_NAMES[pos]}): {_sentence(definition)}\nWord:"


def wordnet_mcq(split: str = "eval", n: int | None = 100, num_choices: int = 4, seed: int = 0, *,
                pos: Sequence[str] = ("n", "v", "a", "r"), single_word: bool = True,
                eval_fraction: float = EVAL_FRACTION, wordnet_dir: str | pathlib.Path = WORDNET_DIR
                ) -> list[dict]:
    """Definition -> word multiple choice over WordNet synsets of ``split`` (split by synset key).

    Each item: ``prompt`` (see :func:`mcq_prompt`), ``choices`` (``num_choices`` distinct words),
    ``answer_index``, and ``synset`` (key), ``lexfile``, ``definition``. The answer is the
    synset's first usable lemma (with ``single_word``, lemmas like ``"dog"`` or ``"well-being"``;
    otherwise multiword lemmas too, underscores rendered as spaces). Distractors are headwords of
    *other* synsets from the same lexicographer file (e.g. ``noun.animal``), so they are
    plausible words of the same kind. Items are skipped when the definition contains the answer,
    or when no set of distinct distractors outside the target synset's lemmas can be drawn.
    Distractor words may come from either split: only the tested (definition, word) pair is held
    out.
    """
    _check_source_split(split)
    if num_choices < 2:
        raise ValueError(f"num_choices must be at least 2, got {num_choices}")
    synsets = [s for s in read_wordnet(pos, wordnet_dir) if s.definition]
    pools = _distractor_pools(tuple(pos), single_word, str(wordnet_dir))
    rng = random.Random(seed)
    targets = [s for s in synsets if split_of(s.key, eval_fraction) == split]
    rng.shuffle(targets)
    items = []
    for s in targets:
        if n is not None and len(items) >= n:
            break
        answer = _headword(s, single_word)
        if answer is None or re.search(rf"\b{re.escape(answer)}\b", s.definition, flags=re.IGNORECASE):
            continue
        pool = pools.get(s.lexfile_num, [])
        taken = {lemma.lower() for lemma in s.lemmas}
        distractors: list[str] = []
        for _ in range(8 * num_choices):  # rejection sampling; pools hold hundreds to tens of thousands
            if len(distractors) == num_choices - 1 or len(pool) < num_choices:
                break
            word = pool[rng.randrange(len(pool))]
            if word.lower() not in taken:
                taken.add(word.lower())
                distractors.append(word)
        if len(distractors) < num_choices - 1:
            continue
        answer_index = rng.randrange(num_choices)
        choices = distractors[:answer_index] + [answer] + distractors[answer_index:]
        items.append({"prompt": mcq_prompt(s.definition, s.pos), "choices": choices, "answer_index": answer_index,
                      "synset": s.key, "lexfile": s.lexfile, "definition": s.definition})
    if n is not None and len(items) < n:
        raise ValueError(f"only {len(items)} WordNet MCQ items available in split {split!r}, asked for {n}")
    return items


# --------------------------------------------------------------------------------------------
# pydoc topics
# --------------------------------------------------------------------------------------------

def pydoc_documents() -> dict[str, str]:
    """Python's reference text by topic (``pydoc_data.topics.topics``: topic name -> document)."""
    from pydoc_data.topics import topics

    return dict(topics)


def _paragraphs(document: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n\s*\n", document) if p.strip()]


def _passages(paragraphs: list[str], max_chars: int) -> list[str]:
    """Join consecutive paragraphs into passages of at most ``max_chars`` characters where possible
    (a single paragraph longer than ``max_chars`` stays whole; batchers truncate it)."""
    passages, current = [], ""
    for paragraph in paragraphs:
        if current and len(current) + 2 + len(paragraph) > max_chars:
            passages.append(current)
            current = paragraph
        else:
            current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        passages.append(current)
    return passages


def pydoc_paragraphs(split: str, eval_fraction: float = EVAL_FRACTION) -> dict[str, list[str]]:
    """Topic -> its paragraphs that belong to ``split`` (topics of ``split`` only, in document order).

    Topics are split by :func:`split_of`, but pydoc topics overlap heavily (``specialnames``
    contains ``customization`` and ``attribute-access``, ``compound`` contains ``if``, ``while``,
    ``try`` ...). So paragraphs are deduplicated across all topics first: a paragraph occurring in
    any proxy topic belongs to proxy only; eval keeps the paragraphs found in eval topics alone.
    Every distinct paragraph is thus on exactly one side, at most once.
    """
    _check_source_split(split)
    documents = sorted(pydoc_documents().items())
    topic_split = {topic: split_of(topic, eval_fraction) for topic, _ in documents}
    in_proxy = {p.strip() for topic, doc in documents if topic_split[topic] == "proxy" for p in _paragraphs(doc)}
    seen: set[str] = set()
    result: dict[str, list[str]] = {}
    for topic, doc in documents:
        if topic_split[topic] != split:
            continue
        kept = []
        for paragraph in _paragraphs(doc):
            key = paragraph.strip()
            if key in seen or (split == "eval" and key in in_proxy):
                continue
            seen.add(key)
            kept.append(paragraph)
        if kept:
            result[topic] = kept
    return result


def pydoc_texts(split: str = "proxy", n: int | None = None, seed: int = 0, *, max_chars: int = 1000,
                eval_fraction: float = EVAL_FRACTION) -> list[str]:
    """Passages (at most ``max_chars`` characters, cut at paragraphs) of the pydoc topics of ``split``.

    Split by topic, with paragraphs shared between topics deduplicated so that no paragraph is in
    both splits (see :func:`pydoc_paragraphs`).
    """
    passages = [p for paragraphs in pydoc_paragraphs(split, eval_fraction).values()
                for p in _passages(paragraphs, max_chars)]
    return _sample(passages, n, seed, f"pydoc {split} passages")


def source_texts(kind: str = "mix", split: str = "proxy", n: int | None = None, seed: int = 0, **options
                 ) -> list[str]:
    """Source-domain text: ``kind`` = ``"wordnet"``, ``"pydoc"`` or ``"mix"`` (half of each, shuffled).

    ``split="proxy"`` for curvature fitting, ``"eval"`` for held-out measurement (disjoint by
    synset / topic). ``options`` go to :func:`wordnet_texts` / :func:`pydoc_texts`. With ``mix`` and
    ``n=None`` all of both are returned.
    """
    if kind == "wordnet":
        return wordnet_texts(split, n, seed, **options)
    if kind == "pydoc":
        return pydoc_texts(split, n, seed, **options)
    if kind == "mix":
        wordnet_opts = {k: v for k, v in options.items() if k in ("pos", "eval_fraction", "wordnet_dir")}
        pydoc_opts = {k: v for k, v in options.items() if k in ("max_chars", "eval_fraction")}
        unknown = set(options) - set(wordnet_opts) - set(pydoc_opts)
        if unknown:
            raise TypeError(f"unknown option(s) for source_texts: {sorted(unknown)}")
        n_wordnet = None if n is None else n // 2
        n_pydoc = None if n is None else n - n // 2
        texts = wordnet_texts(split, n_wordnet, seed, **wordnet_opts) + pydoc_texts(split, n_pydoc, seed, **pydoc_opts)
        random.Random(seed + 1).shuffle(texts)
        return texts
    raise ValueError(f"kind must be 'wordnet', 'pydoc' or 'mix', got {kind!r}")


# --------------------------------------------------------------------------------------------
# Target tasks (reasoning-gym)
# --------------------------------------------------------------------------------------------

def gsm_template_split(template_id: int) -> str:
    """``"eval"`` for held-out gsm_symbolic templates (id divisible by 5), else ``"train"``."""
    return "eval" if template_id % GSM_EVAL_TEMPLATE_MODULUS == 0 else "train"


def _worked_solution(raw: dict) -> str:
    """gsm_symbolic's chain of thought with its last line normalized to ``#### <answer>``.

    The generators end ``answer_cot`` with ``#### <value>``, sometimes as a float (``#### 8.0``)
    while ``answer`` is ``"8"``; the target ends with the canonical answer string.
    """
    cot = (raw.get("metadata") or {}).get("answer_cot")
    if not cot:
        return raw["answer"]
    lines = cot.strip().splitlines()
    if lines and lines[-1].lstrip().startswith("####"):
        lines = lines[:-1]
    return "\n".join(lines + [f"#### {raw['answer']}"])


def reasoning_items(task: str = "gsm_symbolic", split: str = "train", n: int = 100, seed: int = 0,
                    **task_config) -> list[dict]:
    """``n`` target-task items of ``split`` (``"train"`` or ``"eval"``) from reasoning-gym.

    Each item: ``prompt`` (the raw question, before chat formatting; see :func:`format_prompt`),
    ``answer`` (the final number as a string), ``target`` (the supervised completion: the worked
    solution ending ``#### <answer>`` for gsm_symbolic, the bare answer for the other tasks),
    ``template_id`` (gsm_symbolic; None otherwise), ``task``, ``index`` (index in the generator).

    Splits: ``gsm_symbolic`` holds out whole templates (:func:`gsm_template_split`). reasoning-gym
    has no argument to choose templates; item ``i`` of ``create_dataset("gsm_symbolic", seed=s)``
    uses template ``dataset.task_indices[i]`` (drawn by ``Random(s).choices``) and its own
    ``Random(s + i)``, so we walk the indices and keep those whose template is in ``split``.
    The other tasks (default configs in ``TASK_CONFIGS``, e.g. ``BASIC_ARITHMETIC_CONFIG``,
    overridable through ``task_config``) have no templates; they are split by a hash of
    ``"<task>:<question text>"``, which also keeps identical questions on one side.
    """
    if task not in REASONING_TASKS:
        raise ValueError(f"unknown target task {task!r}; known tasks: {', '.join(REASONING_TASKS)}")
    if split not in ("train", "eval"):
        raise ValueError(f"target split must be 'train' or 'eval', got {split!r}")
    import reasoning_gym

    config = default_task_config(task)
    config.update(task_config)
    # Generating an item takes microseconds; a generous virtual size costs only the list of
    # template ids (prefixes of Random.choices are the same for any size).
    size = max(1000, 50 * n)
    dataset = reasoning_gym.create_dataset(task, seed=seed, size=size, **config)
    items, seen_questions = [], set()
    for index in range(size):
        if len(items) == n:
            break
        if task == "gsm_symbolic":
            template_id = int(dataset.task_indices[index])
            if gsm_template_split(template_id) != split:
                continue
            raw = dataset[index]
        else:
            template_id = None
            raw = dataset[index]
            question_is_eval = split_of(f"{task}:{raw['question']}") == "eval"
            if question_is_eval != (split == "eval"):
                continue
        if raw["question"] in seen_questions:
            continue
        seen_questions.add(raw["question"])
        answer = str(raw["answer"]).strip()
        target = _worked_solution(raw) if task == "gsm_symbolic" else answer
        items.append({"prompt": raw["question"], "answer": answer, "target": target,
                      "template_id": template_id, "task": task, "index": index})
    if len(items) < n:
        raise ValueError(f"only {len(items)} {task} items found for split {split!r} in {size} draws, asked for {n}")
    return items


__all__ = [
    "IGNORE_INDEX", "EVAL_FRACTION", "GSM_EVAL_TEMPLATE_MODULUS", "LEXFILE_NAMES", "Synset", "split_of",
    "parse_data_line", "read_wordnet", "synset_text", "wordnet_texts", "wordnet_mcq", "mcq_prompt",
    "pydoc_documents", "pydoc_paragraphs", "pydoc_texts", "source_texts", "gsm_template_split", "reasoning_items",
    "REASONING_TASKS", "TASK_CONFIGS", "BASIC_ARITHMETIC_CONFIG", "default_task_config",
    "format_prompt",
    "format_target", "lm_batches", "sft_batches", "reasoning_sft_batches", "num_label_tokens",
]

