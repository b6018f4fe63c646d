"""A user's own data file -> causal-LM batches (for ``lalora-curv fit --data FILE``).

Formats, chosen by the file's suffix:

* ``.jsonl`` / ``.ndjson`` / ``.json`` (one JSON object per line; blank lines skipped): each object
  has a ``text`` string, or chat ``messages`` (a list of ``{"role", "content"}`` dicts) rendered
  with the tokenizer's chat template. Both kinds may be mixed in one file.
* anything else: plain text, one document per blank-line-separated paragraph.

Labels (``-100`` = not a prediction target, see :mod:`.batching`): ``text`` records and paragraphs
are trained on every token (:func:`~.batching.lm_batches`). Chat records, with
``chat_labels="assistant"`` (default), are trained on the **last assistant message** only: the
prompt is the template's rendering of the earlier messages plus its generation prompt, the target
the rest of the full rendering (:func:`~.batching.sft_batches`), so earlier turns are context. With
``chat_labels="all"`` every token of the rendered conversation is a target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .batching import lm_batches, sft_batches

__all__ = ["UserDataError", "UserData", "read_user_data", "user_data_batches", "JSONL_SUFFIXES", "CHAT_LABELS"]

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CHAT_LABELS = ("assistant", "all")


class UserDataError(ValueError):
    """A data file that is missing, empty or malformed; the message names the file (and line)."""


@dataclass
class UserData:
    """Records of one file: ``texts`` (plain documents) and ``chats`` (message lists), in file order
    within each kind; ``path`` and ``format`` (``"jsonl"`` | ``"text"``) for messages."""

    path: Path
    format: str
    texts: list[str] = field(default_factory=list)
    chats: list[list[dict[str, str]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts) + len(self.chats)


def _check_messages(messages, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise UserDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise UserDataError(f"{where}: messages[{i}] is not a {{\"role\": str, \"content\": str}} object")
    return messages


def read_user_data(path: str | Path) -> UserData:
    """Read ``path`` (format by suffix, module docstring); raises :class:`UserDataError` for a missing
    or empty file, a line that is not a JSON object, or an object without ``text`` / ``messages``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserDataError(f"data file not found: {path}")
    content = path.read_text(encoding="utf-8")
    if not content.strip():
        raise UserDataError(f"data file is empty: {path}")
    if path.suffix.lower() not in JSONL_SUFFIXES:
        paragraphs = [p.strip() for p in content.replace("\r\n", "\n").split("\n\n")]
        return UserData(path=path, format="text", texts=[p for p in paragraphs if p])
    data = UserData(path=path, format="jsonl")
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserDataError(f"{where}: not valid JSON ({err.msg}); a .jsonl file holds one object per "
                                "line") from None
        if not isinstance(record, dict):
            raise UserDataError(f"{where}: expected a JSON object with 'text' or 'messages', "
                                f"got {type(record).__name__}")
        if isinstance(record.get("text"), str):
            data.texts.append(record["text"])
        elif "messages" in record:
            data.chats.append(_check_messages(record["messages"], where))
        else:
            raise UserDataError(f"{where}: the object has neither a 'text' string nor 'messages' "
                                f"(keys: {', '.join(sorted(record)) or 'none'})")
    return data


def _render(tokenizer, messages, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_pairs(data: UserData, tokenizer) -> tuple[list[str], list[str]]:
    """(prompt, target) per conversation: the target is the last assistant message as rendered."""
    prompts, targets = [], []
    for index, messages in enumerate(data.chats):
        if messages[-1]["role"] != "assistant":
            raise UserDataError(f"{data.path}: conversation {index + 1} does not end with an assistant message, so "
                                "there is no reply to train on (use --chat-labels all to train on every token)")
        prompt = _render(tokenizer, messages[:-1], generation_prompt=True)
        full = _render(tokenizer, messages, generation_prompt=False)
        if not full.startswith(prompt):
            raise UserDataError(f"{data.path}: the chat template's rendering of conversation {index + 1} does not "
                                "extend its prompt, so the reply cannot be separated (use --chat-labels all)")
        prompts.append(prompt)
        targets.append(full[len(prompt):])
    return prompts, targets


def user_data_batches(data: UserData, tokenizer, *, batch_size: int = 8, seq_len: int = 256,
                      chat_labels: str = "assistant") -> list[dict]:
    """Causal-LM batches of ``data`` (labels as in the module docstring): the text records' batches,
    then the chat records'. Each row is cut to ``seq_len`` tokens; batches are dicts of LongTensors
    ``(B, T)`` padded to ``seq_len``."""
    if chat_labels not in CHAT_LABELS:
        raise ValueError(f"chat_labels must be one of {CHAT_LABELS}, got {chat_labels!r}")
    if not len(data):
        raise UserDataError(f"no records in {data.path}")
    if data.chats and not getattr(tokenizer, "chat_template", None):
        raise UserDataError(f"{data.path} has chat 'messages' but the model's tokenizer has no chat template")
    batches: list[dict] = []
    try:
        if data.texts:
            batches += lm_batches(data.texts, tokenizer, batch_size=batch_size, seq_len=seq_len)
        if data.chats and chat_labels == "all":
            rendered = [_render(tokenizer, messages, generation_prompt=False) for messages in data.chats]
            batches += lm_batches(rendered, tokenizer, batch_size=batch_size, seq_len=seq_len)
        elif data.chats:
            prompts, targets = _chat_pairs(data, tokenizer)
            # the template writes its own end-of-turn tokens: no extra eos after the reply
            batches += sft_batches(prompts, targets, tokenizer, batch_size=batch_size, seq_len=seq_len, add_eos=False)
    except UserDataError:
        raise
    except ValueError as err:  # e.g. every row shorter than two tokens, or no reply within seq_len
        raise UserDataError(f"{data.path}: {err}") from None
    return batches
