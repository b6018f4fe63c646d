"""Presets in one form for every benchmark: a :class:`PresetTable` maps a preset name to its full
settings (a JSON-like dict, nested dicts allowed), and ``--set KEY=VALUE`` overrides are applied to
a copy by :meth:`PresetTable.resolve`.

``KEY`` is a settings key, or a dotted path into nested dicts (``seq_sweep.seqs=[8,16]``); an
unknown key is an error that lists the valid ones. ``VALUE`` is parsed as JSON where it is JSON,
else kept as text (``--set model=tiny`` and ``--set 'seeds=[0,1]'`` both work).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments as an ordered dict; VALUE is JSON where it parses, else text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _as_settings(value: Any) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return copy.deepcopy(dict(value))
    raise TypeError(f"a preset is a dict or a dataclass instance, got {type(value).__name__}")


def apply_overrides(settings: dict, overrides: Mapping[str, Any], optional: Iterable[str] = ()) -> dict:
    """Set each (dotted) key of ``overrides`` in ``settings`` (in place; returned). Every path
    component must exist already, except the top-level keys named in ``optional`` (settings a
    benchmark reads with a default when a preset omits them): a typo is an error, not a new silent
    setting."""
    optional = set(optional)
    for key, value in overrides.items():
        if key in optional:
            settings[key] = copy.deepcopy(value)
            continue
        node, parts = settings, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                where = ".".join(parts[:depth + 1])
                raise KeyError(f"unknown setting {key!r}: {where!r} is not a group of settings")
            node = child
        if parts[-1] not in node:
            prefix = ".".join(parts[:-1])
            valid = sorted(set(node) | (optional if not prefix else set()))
            raise KeyError(f"unknown setting {key!r}; valid keys{' of ' + prefix if prefix else ''}: {valid}")
        node[parts[-1]] = copy.deepcopy(value)
    return settings


class PresetTable(Mapping[str, dict]):
    """``name -> settings`` of one benchmark. Indexing returns a deep copy (callers may edit it).

    ``presets``: dicts, or dataclass instances (stored as ``dataclasses.asdict``); ``descriptions``:
    one line per preset for ``--list-presets``; ``optional``: ``{key: meaning}`` of top-level settings
    that ``--set`` may add although a preset omits them (the benchmark reads them with a default).
    """

    def __init__(self, benchmark: str, presets: Mapping[str, Any], descriptions: Mapping[str, str] | None = None,
                 optional: Mapping[str, str] | None = None):
        if not presets:
            raise ValueError(f"{benchmark}: a preset table needs at least one preset")
        self.benchmark = benchmark
        self._presets = {name: _as_settings(value) for name, value in presets.items()}
        self.descriptions = dict(descriptions or {})
        self.optional = dict(optional or {})

    def __getitem__(self, name: str) -> dict:
        if name not in self._presets:
            raise KeyError(f"unknown {self.benchmark} preset {name!r}; choose one of {list(self._presets)}")
        return copy.deepcopy(self._presets[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._presets)

    def __len__(self) -> int:
        return len(self._presets)

    def resolve(self, name: str, overrides: Mapping[str, Any] | None = None) -> dict:
        """The settings of preset ``name`` with ``overrides`` (``--set``) applied."""
        return apply_overrides(self[name], overrides or {}, optional=self.optional)

    def describe(self, name: str) -> str:
        return self.descriptions.get(name) or str(self._presets[name].get("description", ""))
