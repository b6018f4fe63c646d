"""Offline data: WordNet parsing and splits, MCQ construction, pydoc split, gsm template holdout, batchers."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from lalora_curv.experiments import data as D
from lalora_curv.experiments.models import tiny_tokenizer

KILL_LINE = ('00217593 04 n 01 kill 1 002 @ 00217014 n 0000 + 00355365 v 0101 | the destruction of an enemy plane '
             'or ship or tank or missile; "the pilot reported two kills during the mission"  \n')


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --------------------------------------------------------------------------------------------
# WordNet
# --------------------------------------------------------------------------------------------

def test_parse_data_line_splits_gloss_into_definition_and_examples():
    s = D.parse_data_line(KILL_LINE)
    assert (s.offset, s.pos, s.lexfile, s.words, s.key) == (217593, "n", "noun.act", ("kill",), "n00217593")
    assert s.definition == "the destruction of an enemy plane or ship or tank or missile"
    assert s.examples == ("the pilot reported two kills during the mission",)
    assert D.synset_text(s) == ("kill (noun): the destruction of an enemy plane or ship or tank or missile. "
                                "Example: the pilot reported two kills during the mission.")


def test_parse_data_line_adjective_markers_multiword_and_inline_quotes():
    line = ('00013887 00 s 02 galore(ip) 0 in_abundance 0 001 & 00013442 a 0000 | in abundant supply; '
            'used of the letter "a" here; "there were bargains galore"; "food in abundance"\n')
    s = D.parse_data_line(line)
    assert s.words == ("galore", "in_abundance") and s.lemmas == ("galore", "in abundance")
    assert s.lexfile == "adj.all" and s.key == "a00013887"
    # a quote not introduced by "; " belongs to the definition
    assert s.definition == 'in abundant supply; used of the letter "a" here'
    assert s.examples == ("there were bargains galore", "food in abundance")


def test_wordnet_counts_match_wordnet_3_0():
    counts = {p: len(D.read_wordnet((p,))) for p in "nvar"}
    assert counts == {"n": 82115, "v": 13767, "a": 18156, "r": 3621}
    synsets = D.read_wordnet()
    assert len({s.key for s in synsets}) == len(synsets)
    assert all(s.definition for s in synsets)
    assert sum(bool(s.examples) for s in synsets) > 30000


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        D.read_wordnet(("n",), wordnet_dir=tmp_path)


def test_split_rule_is_fixed_and_roughly_the_eval_fraction():
    synsets = D.read_wordnet()
    eval_share = sum(D.split_of(s.key) == "eval" for s in synsets) / len(synsets)
    assert abs(eval_share - D.EVAL_FRACTION) < 0.01
    assert D.split_of("n00217593") == D.split_of("n00217593")
    with pytest.raises(ValueError):
        D.wordnet_texts("train", 3)


def test_wordnet_texts_proxy_and_eval_are_disjoint_by_synset():
    synsets = D.read_wordnet()
    text_split: dict[str, set[str]] = {}
    for s in synsets:
        text_split.setdefault(D.synset_text(s), set()).add(D.split_of(s.key))
    proxy = D.wordnet_texts("proxy", 500, seed=0)
    evals = D.wordnet_texts("eval", 500, seed=0)
    assert len(set(proxy)) == 500 and not set(proxy) & set(evals)
    assert all("proxy" in text_split[t] for t in proxy)
    assert all("eval" in text_split[t] for t in evals)
    # seed picks the sample, not the split
    assert D.wordnet_texts("eval", 50, seed=0) == evals[:50]
    assert D.wordnet_texts("eval", 50, seed=1) != evals[:50]
    assert all("eval" in text_split[t] for t in D.wordnet_texts("eval", 50, seed=1))


def test_wordnet_mcq_distractors_come_from_the_same_lexfile_and_are_distinct():
    synsets = {s.key: s for s in D.read_wordnet()}
    lexfile_words: dict[str, set[str]] = {}
    for s in synsets.values():
        for lemma in s.lemmas:
            lexfile_words.setdefault(s.lexfile, set()).add(lemma)
    items = D.wordnet_mcq("eval", 200, num_choices=4, seed=0)
    assert len(items) == 200
    for item in items:
        target = synsets[item["synset"]]
        choices = item["choices"]
        assert D.split_of(item["synset"]) == "eval" and item["lexfile"] == target.lexfile
        assert len(choices) == 4 and len({c.lower() for c in choices}) == 4
        answer = choices[item["answer_index"]]
        assert answer in target.lemmas
        assert re.fullmatch(r"[A-Za-z]+(-[A-Za-z]+)*", answer)  # single words by default
        assert item["prompt"].endswith("\nWord:") and target.definition in item["prompt"]
        for i, choice in enumerate(choices):
            assert choice in lexfile_words[target.lexfile]
            if i != item["answer_index"]:
                assert choice.lower() not in {lemma.lower() for lemma in target.lemmas}
    # answers are spread over positions
    assert len({item["answer_index"] for item in items}) == 4


def test_wordnet_mcq_proxy_and_eval_disjoint_and_deterministic():
    evals = D.wordnet_mcq("eval", 300, seed=3)
    proxy = D.wordnet_mcq("proxy", 300, seed=3)
    assert not {i["synset"] for i in evals} & {i["synset"] for i in proxy}
    assert D.wordnet_mcq("eval", 300, seed=3) == evals
    multi = D.wordnet_mcq("eval", 300, num_choices=3, seed=0, single_word=False, pos=("n",))
    assert all(len(i["choices"]) == 3 and "_" not in "".join(i["choices"]) for i in multi)
    assert any(" " in i["choices"][i["answer_index"]] for i in multi)


# --------------------------------------------------------------------------------------------
# pydoc and mixed source text
# --------------------------------------------------------------------------------------------

def test_pydoc_split_is_by_topic_and_no_paragraph_is_on_both_sides():
    documents = D.pydoc_documents()
    eval_topics = {t for t in documents if D.split_of(t) == "eval"}
    assert 0 < len(eval_topics) < len(documents)
    assert set(D.pydoc_paragraphs("eval")) <= eval_topics
    assert not set(D.pydoc_paragraphs("proxy")) & eval_topics
    proxy, evals = D.pydoc_texts("proxy"), D.pydoc_texts("eval")
    # topics overlap (e.g. "specialnames" contains "customization"): shared paragraphs go to proxy
    proxy_paragraphs = {q.strip() for p in proxy for q in p.split("\n\n")}
    eval_paragraphs = {q.strip() for p in evals for q in p.split("\n\n")}
    assert not proxy_paragraphs & eval_paragraphs
    eval_documents = "\n".join(documents[t] for t in eval_topics)
    proxy_documents = "\n".join(d for t, d in documents.items() if t not in eval_topics)
    assert all(q in eval_documents for p in evals[:40] for q in p.split("\n\n"))
    assert all(q in proxy_documents for p in proxy[:40] for q in p.split("\n\n"))
    # passages are cut at paragraphs: only single long paragraphs may exceed max_chars
    assert all(len(p) <= 1000 or "\n\n" not in p for p in proxy + evals)
    assert len(evals) > 50 and len(proxy) > 200


def test_source_texts_mix_and_errors():
    mix = D.source_texts("mix", "eval", 20, seed=0)
    assert len(mix) == 20
    wordnet = set(D.wordnet_texts("eval", 10, seed=0))
    pydoc = set(D.pydoc_texts("eval", 10, seed=0))
    assert set(mix) == wordnet | pydoc
    with pytest.raises(ValueError, match="kind"):
        D.source_texts("wiki", "eval", 3)
    with pytest.raises(ValueError, match="available"):
        D.pydoc_texts("eval", 10**6)


# --------------------------------------------------------------------------------------------
# Target tasks
# --------------------------------------------------------------------------------------------

def test_gsm_symbolic_has_no_task_indices_argument_and_exposes_template_ids():
    """SEMANTICS.md §10: the template of item i is dataset.task_indices[i]; it cannot be chosen."""
    import reasoning_gym

    with pytest.raises(TypeError):
        reasoning_gym.create_dataset("gsm_symbolic", seed=0, size=5, task_indices=[0])
    dataset = reasoning_gym.create_dataset("gsm_symbolic", seed=0, size=200)
    assert len(dataset.task_indices) == 200
    # the template list is a prefix-stable draw: a larger size keeps the same first templates
    bigger = reasoning_gym.create_dataset("gsm_symbolic", seed=0, size=400)
    assert bigger.task_indices[:200] == dataset.task_indices
    assert bigger[17]["question"] == dataset[17]["question"]


def test_gsm_template_holdout():
    import reasoning_gym

    train = D.reasoning_items("gsm_symbolic", "train", 150, seed=0)
    evals = D.reasoning_items("gsm_symbolic", "eval", 60, seed=0)
    train_templates = {i["template_id"] for i in train}
    eval_templates = {i["template_id"] for i in evals}
    assert not train_templates & eval_templates
    assert all(t % D.GSM_EVAL_TEMPLATE_MODULUS == 0 for t in eval_templates) and len(eval_templates) >= 8
    assert all(t % D.GSM_EVAL_TEMPLATE_MODULUS != 0 for t in train_templates)
    # template ids are the dataset's own
    dataset = reasoning_gym.create_dataset("gsm_symbolic", seed=0, size=1000)
    for item in evals[:10] + train[:10]:
        assert dataset.task_indices[item["index"]] == item["template_id"]
        assert dataset[item["index"]]["question"] == item["prompt"]
    for item in evals + train:
        float(item["answer"])
        assert item["target"].endswith(f"#### {item['answer']}") and "\n" in item["target"]
    assert D.reasoning_items("gsm_symbolic", "eval", 60, seed=0) == evals


def test_basic_arithmetic_split_by_question():
    train = D.reasoning_items("basic_arithmetic", "train", 200, seed=0)
    evals = D.reasoning_items("basic_arithmetic", "eval", 50, seed=0)
    assert not {i["prompt"] for i in train} & {i["prompt"] for i in evals}
    for item in train + evals:
        assert item["target"] == item["answer"] and re.fullmatch(r"-?\d+", item["answer"])
        assert item["prompt"].startswith("Calculate ") and item["template_id"] is None
    with pytest.raises(ValueError, match="task"):
        D.reasoning_items("chess", "train", 2)


@pytest.mark.parametrize("task", [t for t in D.REASONING_TASKS if t != "gsm_symbolic"])
def test_short_answer_tasks_split_by_question_with_numeric_answers(task):
    train = D.reasoning_items(task, "train", 120, seed=0)
    evals = D.reasoning_items(task, "eval", 30, seed=0)
    assert len(train) == 120 and len(evals) == 30  # n is honoured
    assert len(D.reasoning_items(task, "eval", 7, seed=1)) == 7
    assert not {i["prompt"] for i in train} & {i["prompt"] for i in evals}
    for split, items in (("train", train), ("eval", evals)):
        for item in items:
            # the split is the hash rule on the question text, whatever the seed
            assert (D.split_of(f"{task}:{item['prompt']}") == "eval") == (split == "eval")
            assert item["target"] == item["answer"] and re.fullmatch(r"-?\d+", item["answer"])
            assert item["task"] == task and item["template_id"] is None
    assert D.reasoning_items(task, "eval", 30, seed=0) == evals


def test_task_defaults_apply_and_can_be_overridden():
    legs = D.reasoning_items("leg_counting", "train", 40, seed=0)
    # default config: 1-2 kinds of animals, so at most one comma in the list
    assert all(item["prompt"].split("if you have ")[1].count(",") <= 1 for item in legs)
    products = D.reasoning_items("products", "train", 40, seed=0, max_digits=1)
    assert all(int(item["answer"]) <= 81 for item in products)
    assert D.default_task_config("chain_sum") is not D.TASK_CONFIGS["chain_sum"]  # callers get a copy


def test_unknown_task_error_names_the_task():
    with pytest.raises(ValueError, match="'gsm8k'.*known tasks: gsm_symbolic"):
        D.reasoning_items("gsm8k", "train", 2)


# --------------------------------------------------------------------------------------------
# Prompt formatting
# --------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_format_prompt_plain_and_chat():
    plain = tiny_tokenizer()
    assert D.format_prompt(plain, "1+1?") == "Question: 1+1?\nAnswer:"
    assert D.format_target(plain, "2") == " 2"
    with pytest.raises(ValueError, match="chat template"):
        D.format_prompt(plain, "1+1?", chat=True)
    chat = tiny_tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    assert D.format_prompt(chat, "1+1?") == "<user>1+1?<|endoftext|><assistant>"
    assert D.format_target(chat, "2") == "2"
    assert D.format_prompt(chat, "1+1?", chat=False) == "Question: 1+1?\nAnswer:"


# --------------------------------------------------------------------------------------------
# Batchers
# --------------------------------------------------------------------------------------------

def test_lm_batches_padding_is_masked_and_truncation_applies(tok):
    texts = ["hello world", "abc", "x" * 50, "the quick brown fox"]
    batches = D.lm_batches(texts, tok, batch_size=3, seq_len=16)
    assert [b["input_ids"].shape for b in batches] == [(3, 16), (1, 16)]
    for b in batches:
        assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == torch.long
    first = batches[0]
    lengths = first["attention_mask"].sum(1).tolist()
    assert lengths == [11, 3, 16]  # "x" * 50 truncated to seq_len
    for row, n in enumerate(lengths):
        assert torch.equal(first["labels"][row, :n], first["input_ids"][row, :n])
        assert (first["labels"][row, n:] == -100).all() and (first["attention_mask"][row, n:] == 0).all()
    assert tok.decode(first["input_ids"][0, :11].tolist()) == "hello world"
    longest = D.lm_batches(texts, tok, batch_size=2, seq_len=16, pad_to_longest=True)
    assert [b["input_ids"].shape[1] for b in longest] == [11, 16]
    with_eos = D.lm_batches(["ab"], tok, batch_size=1, seq_len=8, add_eos=True)[0]
    assert with_eos["labels"][0, :3].tolist() == tok("ab")["input_ids"] + [tok.eos_token_id]


def test_packed_batches_are_unpadded_fully_labelled_and_preserve_the_stream(tok):
    texts = ["alpha beta", "gamma", "delta epsilon zeta", "eta theta iota kappa"]
    batches = D.lm_batches(texts, tok, batch_size=2, seq_len=8, packed=True)
    stream = []
    for text in texts:
        stream += tok(text)["input_ids"] + [tok.eos_token_id]
    rows = torch.cat([b["input_ids"] for b in batches])
    assert rows.shape == (len(stream) // 8, 8)
    assert rows.flatten().tolist() == stream[:rows.numel()]
    for b in batches:
        assert (b["attention_mask"] == 1).all() and torch.equal(b["labels"], b["input_ids"])
    assert all(b["input_ids"].shape[0] == 2 for b in D.lm_batches(texts, tok, 2, 8, packed=True, drop_last=True))
    with pytest.raises(ValueError, match="too few"):
        D.lm_batches(["ab"], tok, 2, 64, packed=True)


def test_sft_batches_label_only_target_and_eos(tok):
    prompts = ["Question: 2+2?\nAnswer:", "Q: hi\nA:"]
    targets = [" 4", " hello"]
    batch = D.sft_batches(prompts, targets, tok, batch_size=2, seq_len=32)[0]
    assert batch["input_ids"].shape == (2, 32)
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        p, t = len(prompt), len(target) + 1  # character tokenizer; +1 for eos
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert (labels[:p] == -100).all()
        assert torch.equal(labels[p:p + t], ids[p:p + t])
        assert ids[p + t - 1] == tok.eos_token_id
        assert (labels[p + t:] == -100).all() and batch["attention_mask"][row].sum() == p + t
    assert D.num_label_tokens([batch]) == (len(" 4") + 1) + (len(" hello") + 1)


def test_sft_batches_truncation_drops_rows_without_targets(tok):
    with pytest.warns(UserWarning, match="dropped"):
        batches = D.sft_batches(["x" * 40, "short:"], [" y", " z"], tok, batch_size=4, seq_len=16)
    assert batches[0]["input_ids"].shape == (1, 16)
    cut = D.sft_batches(["abc:"], [" a long target"], tok, batch_size=1, seq_len=8)[0]
    assert cut["attention_mask"].sum() == 8 and (cut["labels"][0, 4:] != -100).all()
    with pytest.raises(ValueError, match="prompts"):
        D.sft_batches(["a"], ["b", "c"], tok)


def test_reasoning_sft_batches_use_the_formatting(tok):
    items = D.reasoning_items("basic_arithmetic", "train", 3, seed=0)
    batch = D.reasoning_sft_batches(items, tok, batch_size=3, seq_len=128)[0]
    first = items[0]
    prompt = D.format_prompt(tok, first["prompt"])
    labelled = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
    assert tok.decode(labelled[:-1]) == " " + first["answer"] and labelled[-1] == tok.eos_token_id
    assert tok.decode(batch["input_ids"][0, :len(prompt)].tolist()) == prompt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.reasoning_sft_batches(items, tok, batch_size=3, seq_len=128)
