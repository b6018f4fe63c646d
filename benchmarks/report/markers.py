"""Marked blocks in markdown pages: find them, replace their body, compare with a rendering.

A block is ``<!-- report:NAME -->`` on its own line, the body, and ``<!-- /report:NAME -->``. The
body is whatever :mod:`benchmarks.report.blocks` renders for ``NAME`` from the committed JSON; text
outside the markers is never touched. A marker ``<!-- report:NAME (reason) -->`` without a closing
marker is a placeholder (e.g. a table whose result file is not committed yet): it is left alone
while its renderer raises ``FileNotFoundError``; once the result exists, rendering turns it and the
table right below it into a block, and the check reports it until then.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

_BLOCK = re.compile(r"^<!-- report:(?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /report:(?P=name) -->$",
                    re.MULTILINE | re.DOTALL)
_OPEN = re.compile(r"^<!-- report:(?P<name>[\w.-]+) -->$", re.MULTILINE)
#: a placeholder and the hand-written table right below it (kept until its result file is committed)
_PLACEHOLDER = re.compile(r"^<!-- report:(?P<name>[\w.-]+) \((?P<why>[^)]*)\) -->\n(?P<table>(?:\|.*\n)*)",
                          re.MULTILINE)


@dataclass(frozen=True)
class Block:
    name: str
    body: str  # the text between the markers, ending with a newline (or empty)


def find_blocks(text: str, *, where: str = "page") -> list[Block]:
    """Every marked block of ``text``; an opening marker without its closing one is an error naming it."""
    blocks = [Block(m["name"], m["body"]) for m in _BLOCK.finditer(text)]
    closed = {b.name for b in blocks}
    unclosed = [m["name"] for m in _OPEN.finditer(text) if m["name"] not in closed]
    if unclosed:
        raise ValueError(f"{where}: marker <!-- report:{unclosed[0]} --> has no <!-- /report:{unclosed[0]} -->")
    return blocks


def replace_blocks(text: str, render: Callable[[str], str], *, where: str = "page") -> str:
    """``text`` with the body of each marked block replaced by ``render(name)``."""
    find_blocks(text, where=where)  # validates the markers

    def _sub(m: re.Match) -> str:
        body = render(m["name"])
        body = body if body.endswith("\n") else body + "\n"
        return f"<!-- report:{m['name']} -->\n{body}<!-- /report:{m['name']} -->"

    return _BLOCK.sub(_sub, text)


def block_diffs(text: str, render: Callable[[str], str], *, where: str = "page", context: int = 1) -> list[str]:
    """One unified diff per block whose committed body differs from ``render(name)`` (empty: all agree)."""
    out = []
    for block in find_blocks(text, where=where):
        want = render(block.name)
        want = want if want.endswith("\n") else want + "\n"
        if block.body != want:
            diff = difflib.unified_diff(block.body.splitlines(), want.splitlines(), f"{where} [{block.name}] committed",
                                        f"{where} [{block.name}] from JSON", n=context, lineterm="")
            out.append("\n".join(diff))
    return out


def placeholders(text: str) -> list[str]:
    """Names of the placeholders (``<!-- report:NAME (why) -->``) in ``text``."""
    return [m["name"] for m in _PLACEHOLDER.finditer(text)]


def promote_placeholders(text: str, render: Callable[[str], str]) -> str:
    """Each placeholder whose result now exists (``render`` does not raise ``FileNotFoundError``)
    becomes a block; its hand-written table is replaced by the rendering."""

    def _sub(m: re.Match) -> str:
        try:
            body = render(m["name"])
        except FileNotFoundError:
            return m.group(0)
        body = body if body.endswith("\n") else body + "\n"
        return f"<!-- report:{m['name']} -->\n{body}<!-- /report:{m['name']} -->\n"

    return _PLACEHOLDER.sub(_sub, text)


def ready_placeholders(text: str, render: Callable[[str], str]) -> list[str]:
    """Placeholders whose result file exists now (they should have been rendered)."""
    ready = []
    for name in placeholders(text):
        try:
            render(name)
        except FileNotFoundError:
            continue
        ready.append(name)
    return ready
