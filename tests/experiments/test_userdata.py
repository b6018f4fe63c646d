"""The reader of a user's data file: jsonl text / chat messages / plain paragraphs -> batches, with
labels on the right tokens and errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from lalora_curv.experiments.batching import IGNORE_INDEX, lm_batches
from lalora_curv.experiments.models import tiny_tokenizer
from lalora_curv.experiments.userdata import UserDataError, read_user_data, user_data_batches

#: a minimal chat template for the character tokenizer: "<role>content\n" per message
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"},
        {"role": "user", "content": "and 4+4?"}, {"role": "assistant", "content": "8, of course"}]


@pytest.fixture
def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def labelled_text(batch, tokenizer, row=0) -> str:
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())


def test_plain_text_is_one_document_per_paragraph(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\nstill first\n\n\nsecond one\r\n\r\nthird\n")
    data = read_user_data(path)
    assert data.format == "text" and data.texts == ["first paragraph\nstill first", "second one", "third"]


def test_jsonl_text_batches_equal_lm_batches(tmp_path):
    texts = ["hello world", "a second document, longer than the first"]
    data = read_user_data(write_jsonl(tmp_path / "d.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)]))
    tokenizer = tiny_tokenizer()
    got = user_data_batches(data, tokenizer, batch_size=2, seq_len=32)
    want = lm_batches(texts, tokenizer, batch_size=2, seq_len=32)
    assert len(got) == len(want) == 1 and all((got[0][k] == want[0][k]).all() for k in want[0])


def test_chat_labels_are_the_last_assistant_reply_only(tmp_path, chat_tokenizer):
    data = read_user_data(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}]))
    (batch,) = user_data_batches(data, chat_tokenizer, batch_size=4, seq_len=128)
    assert labelled_text(batch, chat_tokenizer) == "8, of course\n"  # the reply as the template renders it
    rendered = chat_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert chat_tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()) == rendered


def test_chat_labels_all_train_on_the_whole_rendering(tmp_path, chat_tokenizer):
    data = read_user_data(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}]))
    (batch,) = user_data_batches(data, chat_tokenizer, batch_size=4, seq_len=128, chat_labels="all")
    assert labelled_text(batch, chat_tokenizer) == chat_tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_text_and_chat_records_mix(tmp_path, chat_tokenizer):
    data = read_user_data(write_jsonl(tmp_path / "mix.jsonl", [{"text": "plain words"}, {"messages": CHAT}]))
    assert len(data) == 2
    batches = user_data_batches(data, chat_tokenizer, batch_size=4, seq_len=128)
    assert [labelled_text(b, chat_tokenizer) for b in batches] == ["plain words", "8, of course\n"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"prompt": "no text"}\n', r"d.jsonl:2: the object has neither a 'text' string nor 'messages' "
                                                r"\(keys: prompt\)"),
    ('{"text": "ok"}\nnot json\n', r"d.jsonl:2: not valid JSON"),
    ('["a list"]\n', r"d.jsonl:1: expected a JSON object"),
    ('{"messages": [{"role": "user"}]}\n', r"d.jsonl:1: messages\[0\] is not a"),
    ('{"messages": []}\n', r"d.jsonl:1: 'messages' must be a non-empty list"),
    ("\n  \n", r"data file is empty"),
])
def test_malformed_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserDataError, match=message):
        read_user_data(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserDataError, match="data file not found"):
        read_user_data(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserDataError, match="data file is empty"):
        read_user_data(tmp_path / "empty.txt")


def test_chat_problems_are_named(tmp_path, chat_tokenizer):
    data = read_user_data(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT[:3]}]))
    with pytest.raises(UserDataError, match="conversation 1 does not end with an assistant message"):
        user_data_batches(data, chat_tokenizer)
    assert user_data_batches(data, chat_tokenizer, chat_labels="all")  # every token: no reply needed
    with pytest.raises(UserDataError, match="tokenizer has no chat template"):
        user_data_batches(data, tiny_tokenizer())


def test_records_too_short_to_predict_are_an_error_naming_the_file(tmp_path):
    data = read_user_data(write_jsonl(tmp_path / "short.jsonl", [{"text": "a"}]))
    with pytest.raises(UserDataError, match="short.jsonl: no text produced at least two tokens"):
        user_data_batches(data, tiny_tokenizer())
