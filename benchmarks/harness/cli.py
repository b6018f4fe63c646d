"""The command-line flags every benchmark shares, parsed once: ``--preset``, ``--set KEY=VALUE``
(repeatable), ``--list-presets``, ``--output-dir``, ``--device`` and ``--merge DIR...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.harness.presets import PresetTable, parse_overrides


def benchmark_parser(prog: str, description: str, presets: PresetTable, *, default_preset: str = "small",
                     output_help: str = "", merge: bool = True) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared flags (``--merge`` only where the benchmark can merge
    parts: ``merge=True``); a benchmark adds its own flags to it."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset, choices=list(presets))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset setting (VALUE as JSON, else text; dotted KEY for nested settings)")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    parser.add_argument("--output-dir", default=None, help=output_help or None)
    parser.add_argument("--device", nargs="?", const="auto", default=None,
                        help="cpu | cuda | auto (default: the preset's device, else auto)")
    if merge:
        parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                            help="merge the results of these output folders or files (parts of one preset run "
                                 "separately) into --output-dir; every part's provenance is kept")
    return parser


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, presets: PresetTable) -> dict:
    """The chosen preset's settings with every ``--set`` applied; a bad override exits with usage error 2."""
    try:
        return presets.resolve(args.preset, parse_overrides(args.set))
    except (KeyError, ValueError) as err:
        parser.error(str(err.args[0]) if err.args else str(err))
    raise AssertionError("unreachable: parser.error exits")


def print_presets(presets: PresetTable) -> None:
    for name in presets:
        print(f"{name:24s} {presets.describe(name)}")


def merge_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, merge: Callable[[], Any]) -> Any:
    """``--merge`` as every benchmark's ``__main__`` handles it: ``--output-dir`` is required (a usage
    error, exit 2); parts that do not belong together (``ValueError``) or are missing
    (``FileNotFoundError``) print the reason and give ``None``, on which the caller exits 1."""
    if not args.output_dir:
        parser.error("--merge needs --output-dir")
    try:
        return merge()
    except (ValueError, FileNotFoundError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return None
