"""Evaluation metrics on a tiny random Llama, checked against direct manual computations."""

from __future__ import annotations

import math

import pytest
import torch

from lalora_curv.experiments import data as D
from lalora_curv.experiments import evaluation as E
from lalora_curv.experiments.models import add_lora, tiny_llama, tiny_tokenizer
from lalora_curv.losses import logits_at
from tests.conftest import FullLogitsOnly


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


def _manual_nll_terms(model, batch):
    """Per-term NLLs by a plain loop: position t predicts labels[t + 1], -100 skipped."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            label = int(batch["labels"][b, t + 1])
            if label != -100:
                terms.append(-torch.log_softmax(logits[b, t], -1)[label].item())
    return terms


def test_perplexity_is_exp_of_token_mean_nll_over_all_batches(model, tok):
    texts = ["hello there", "a", "tiny models know nothing", "abc def ghi jkl mno pqr"]
    batches = D.lm_batches(texts, tok, batch_size=3, seq_len=16)
    batches += D.sft_batches(["Q: 1+1\nA:"], [" 2"], tok, batch_size=1, seq_len=16)
    terms = [x for b in batches for x in _manual_nll_terms(model, b)]
    scores = E.lm_scores(model, batches)
    assert scores["tokens"] == len(terms) == D.num_label_tokens(batches)
    assert math.isclose(scores["nll"], sum(terms) / len(terms), rel_tol=1e-5)
    assert math.isclose(E.perplexity(model, batches), math.exp(sum(terms) / len(terms)), rel_tol=1e-5)
    assert math.isclose(E.mean_nll(model, batches), scores["nll"], rel_tol=1e-6)


def test_row_nll_sums_are_each_rows_own_terms_and_sum_to_lm_scores(model, tok):
    texts = ["hello there", "tiny models know nothing", "abc def ghi jkl mno pqr", "x y"]
    batches = D.lm_batches(texts, tok, batch_size=3, seq_len=16, pad_to_longest=True)
    rows = E.row_nll_sums(model, batches)
    assert len(rows) == sum(b["input_ids"].shape[0] for b in batches) == 4
    singles = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]
    for (nll_sum, count), single in zip(rows, singles):  # padding of the batch changes nothing
        terms = _manual_nll_terms(model, single)
        assert count == len(terms) and math.isclose(nll_sum, sum(terms), rel_tol=1e-5)
    scores = E.lm_scores(model, batches)
    assert sum(c for _, c in rows) == scores["tokens"]
    assert math.isclose(sum(s for s, _ in rows) / scores["tokens"], scores["nll"], rel_tol=1e-6)


def test_row_scores_greedy_match_is_greedy_decoding_of_the_target(model, tok):
    """A target equal to the model's own greedy continuation matches; one changed token does not."""
    prompts = ["Q: 12+7\nA:", "Q: what is it?\nA:", "Q: x\nA:"]
    gens = E.greedy_generate(model, tok, prompts, max_new_tokens=4, batch_size=3)
    assert all(len(tok(g, add_special_tokens=False)["input_ids"]) == 4 for g in gens)  # no early eos
    batches = D.sft_batches(prompts, gens, tok, batch_size=3, seq_len=32, add_eos=False, pad_to_longest=True)
    assert [g for _, _, g in E.row_scores(model, batches)] == [True, True, True]
    ids = tok(gens[0], add_special_tokens=False)["input_ids"]
    other = tok.decode(ids[:-1] + [(ids[-1] + 1) % tok.vocab_size])
    wrong = D.sft_batches(prompts[:1], [other], tok, batch_size=1, seq_len=32, add_eos=False)
    assert E.row_scores(model, wrong)[0][2] is False
    rows = E.row_scores(model, batches)
    assert [(s, c) for s, c, _ in rows] == E.row_nll_sums(model, batches)


def test_logits_at_is_the_full_logits_at_those_positions(model, tok):
    batch = D.lm_batches(["hello there", "abc def ghi"], tok, batch_size=2, seq_len=12, pad_to_longest=True)[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    keep = torch.tensor([0, 3, 4, 9])
    with torch.no_grad():
        full = model(**inputs).logits
        for m in (model, FullLogitsOnly(model), add_lora(model, init="gaussian", seed=0)):
            part = logits_at(m, keep, **inputs)
            reference = m(**inputs).logits[:, keep] if m is not model else full[:, keep]
            assert part.shape == (2, 4, full.shape[-1])
            torch.testing.assert_close(part, reference, rtol=1e-5, atol=1e-5)


def test_row_scores_score_only_labelled_positions_like_a_manual_loop(model, tok):
    """Rows whose labels start at different positions (prompts of different lengths, right padding):
    every row's NLL sum, count and greedy match equal a manual loop over the full logits, with and
    without ``logits_to_keep``, plain or peft-wrapped."""
    prompts = ["Q: 1+1\nA:", "Q: a much longer question here?\nA:", "Q: x\nA:"]
    targets = [" 2", " yes it is", " y"]
    batch = D.sft_batches(prompts, targets, tok, batch_size=3, seq_len=48, pad_to_longest=True)[0]
    lora_model = add_lora(tiny_llama(seed=3), init="gaussian", seed=1)
    for m in (model, FullLogitsOnly(model), lora_model):
        with torch.no_grad():
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = []
        for b in range(3):
            nll, count, hit = 0.0, 0, True
            for t in range(logits.shape[1] - 1):
                label = int(batch["labels"][b, t + 1])
                if label != -100:
                    nll -= torch.log_softmax(logits[b, t], -1)[label].item()
                    count += 1
                    hit = hit and int(logits[b, t].argmax()) == label
            expected.append((nll, count, hit))
        rows = E.row_scores(m, [batch])
        assert [c for _, c, _ in rows] == [c for _, c, _ in expected]
        assert [g for _, _, g in rows] == [g for _, _, g in expected]
        for (s, _, _), (e, _, _) in zip(rows, expected):
            assert math.isclose(s, e, rel_tol=1e-5)
    empty = {**batch, "labels": torch.full_like(batch["labels"], -100)}  # nothing to score: no forward needed
    assert E.row_scores(model, [empty]) == [(0.0, 0, True)] * 3


def test_mean_nll_matches_hf_loss_on_one_batch(model, tok):
    batch = D.lm_batches(["one unpadded row!", "and another row.."], tok, batch_size=2, seq_len=17)[0]
    assert (batch["attention_mask"] == 1).all()
    with torch.no_grad():
        hf_loss = model(**batch).loss.item()
    assert math.isclose(E.mean_nll(model, [batch]), hf_loss, rel_tol=1e-5)


def test_evaluation_restores_training_mode_and_needs_no_grad(tok):
    lora_model = add_lora(tiny_llama(seed=2), init="gaussian")
    lora_model.train()
    batches = D.lm_batches(["some text here"], tok, batch_size=1, seq_len=16)
    E.mean_nll(lora_model, batches)
    assert lora_model.training
    assert all(p.grad is None for p in lora_model.parameters())


def test_mcq_scores_match_manual_logliks(model, tok):
    items = [
        {"prompt": "Dictionary definition (noun): a small animal.\nWord:", "choices": ["cat", "elephant", "x"],
         "answer_index": 0},
        {"prompt": "Capital of France:", "choices": ["Paris", "Rome"], "answer_index": 1},
    ]
    scores = E.mcq_scores(model, tok, items, batch_size=2)

    def manual_loglik(prompt, continuation):
        ids = tok(prompt + continuation)["input_ids"]
        n_prompt = len(tok(prompt)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        return sum(logprobs[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))

    for item, logliks, prediction in zip(items, scores["logliks"], scores["predictions"]):
        manual = [manual_loglik(item["prompt"], " " + c) for c in item["choices"]]
        assert logliks == pytest.approx(manual, rel=1e-5, abs=1e-5)
        assert prediction == max(range(len(manual)), key=manual.__getitem__)
    correct = [s[i["answer_index"]] for s, i in zip(scores["logliks"], items)]
    assert scores["accuracy"] == sum(p == i["answer_index"] for p, i in zip(scores["predictions"], items)) / 2
    assert math.isclose(scores["nll_correct"], -sum(correct) / 2, rel_tol=1e-6)
    lengths = [len(" " + i["choices"][i["answer_index"]]) for i in items]
    assert math.isclose(scores["nll_correct_per_token"], -sum(c / n for c, n in zip(correct, lengths)) / 2,
                        rel_tol=1e-6)
    # batching must not change the scores (right padding is masked)
    unbatched = E.mcq_scores(model, tok, items, batch_size=1)["logliks"]
    for one, many in zip(unbatched, scores["logliks"]):
        assert one == pytest.approx(many, abs=1e-4)


def test_mcq_on_wordnet_items_runs(model, tok):
    items = D.wordnet_mcq("eval", 6, seed=0)
    scores = E.mcq_scores(model, tok, items, batch_size=8)
    assert scores["n"] == 6 and 0 <= scores["accuracy"] <= 1 and scores["nll_correct"] > 0


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,232 dollars and 5 cents", "1232"),
    ("The answer is -12.5.", "-12.5"),
    ("first 3, then 4, finally 10", "10"),
    ("no digits here", None),
])
def test_extract_answer_number(text, expected):
    assert E.extract_answer_number(text) == expected


def test_numbers_match():
    assert E.numbers_match("8.0", "8") and E.numbers_match("-3", "-3")
    assert not E.numbers_match("8.5", "8") and not E.numbers_match(None, "8")


def test_greedy_generate_with_left_padding_matches_single_prompts(model, tok):
    prompts = ["Question: what?\nAnswer:", "Hi"]
    batched = E.greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    single = [E.greedy_generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    # a hand-written greedy loop gives the same text
    ids = tok(prompts[0])["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            next_id = model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if next_id == tok.eos_token_id:
                break
            new.append(next_id)
    assert single[0] == tok.decode(new, skip_special_tokens=True)


def test_reasoning_scores_exact_match_and_teacher_forced_nll(model, tok, monkeypatch):
    items = D.reasoning_items("basic_arithmetic", "eval", 4, seed=0)
    canned = [f"I think #### {items[0]['answer']}", "no idea", f"it is {items[2]['answer']}", "5 and 6"]
    monkeypatch.setattr(E, "greedy_generate", lambda *args, **kwargs: list(canned))
    scores = E.reasoning_scores(model, tok, items, max_new_tokens=4, batch_size=3)
    expected_matches = [True, False, True, E.numbers_match("6", items[3]["answer"])]
    assert scores["exact_match"] == sum(expected_matches) / 4
    batches = D.reasoning_sft_batches(items, tok, batch_size=3, seq_len=1024)
    assert math.isclose(scores["nll"], E.mean_nll(model, batches), rel_tol=1e-6)


def test_reasoning_scores_end_to_end_on_tiny_model(model, tok):
    items = D.reasoning_items("gsm_symbolic", "eval", 2, seed=0)
    scores = E.reasoning_scores(model, tok, items, max_new_tokens=4, batch_size=2)
    assert scores["n"] == 2 and len(scores["generations"]) == 2 and math.isfinite(scores["nll"])
    assert scores["exact_match"] == 0.0  # a random model does not solve word problems
