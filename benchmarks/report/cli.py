"""Render or check the marked tables of the repository's pages (see :mod:`benchmarks.report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.report.blocks import RENDERERS
from benchmarks.report.markers import block_diffs, promote_placeholders, ready_placeholders, replace_blocks

#: pages whose marked blocks are rendered, relative to the repository root
PAGES = ("README.md", "docs/benchmarks/forgetting.md", "docs/benchmarks/cost.md",
         "docs/benchmarks/approx_accuracy.md", "docs/benchmarks/continual.md")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _renderer(root: Path, page: str):
    def render(name: str) -> str:
        if name not in RENDERERS:
            raise KeyError(f"{page}: unknown report block {name!r} (known: {', '.join(sorted(RENDERERS))})")
        return RENDERERS[name](root)

    return render


def render_pages(root: Path = REPO_ROOT, pages=PAGES) -> list[str]:
    """Rewrite each page's marked blocks from the JSON; returns the pages that changed."""
    changed = []
    for page in pages:
        path = root / page
        text = path.read_text()
        new = replace_blocks(promote_placeholders(text, _renderer(root, page)), _renderer(root, page), where=page)
        if new != text:
            path.write_text(new)
            changed.append(page)
    return changed


def check_pages(root: Path = REPO_ROOT, pages=PAGES) -> list[str]:
    """One diff per marked block that disagrees with the JSON (empty: every page agrees)."""
    diffs = []
    for page in pages:
        text = (root / page).read_text()
        diffs += block_diffs(text, _renderer(root, page), where=page)
        diffs += [f"{page} [{name}]: its result file is committed now but the page still holds the hand-written "
                  "placeholder table" for name in ready_placeholders(text, _renderer(root, page))]
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 and print a diff per block when a page disagrees with the JSON")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    if args.check:
        diffs = check_pages(args.root)
        for d in diffs:
            print(d, file=sys.stderr)
        if diffs:
            print(f"{len(diffs)} report block(s) disagree with the committed JSON; run `python -m benchmarks.report`",
                  file=sys.stderr)
            return 1
        print("every report block matches the committed JSON")
        return 0
    changed = render_pages(args.root)
    print("rendered: " + (", ".join(changed) if changed else "nothing changed"))
    return 0
