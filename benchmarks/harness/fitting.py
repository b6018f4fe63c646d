"""``fit_curvature`` options per structure, derived from the structure registry.

``lalora_curv.fit_curvature`` refuses, by name, every option the chosen structure/kind does not use
(``rank`` for kfac, ``mc_samples`` for kind="empirical", ...). Benchmarks loop over structures with
one set of settings, so they pass each fit only the options its structure takes. What a structure
takes is read from the library (``COMMON_OPTIONS`` plus the structure class's ``fit_options``),
never from a list kept here, so a new structure or option needs no change in the benchmarks.
"""

from __future__ import annotations

from typing import Any

from lalora_curv.curvature.fit import COMMON_OPTIONS
from lalora_curv.curvature.registry import STRUCTURES, structure_class

__all__ = ["fit_options_for", "structures_taking"]


def _known_options() -> frozenset:
    """Every option some fittable structure takes."""
    return COMMON_OPTIONS.union(*(structure_class(s).fit_options for s in STRUCTURES))


def structures_taking(option: str) -> tuple[str, ...]:
    """The fittable structures, in registry order, whose ``fit_curvature`` takes ``option``
    (e.g. ``"terms"``: the structures built from per-term/per-sequence gradient vectors)."""
    if option not in _known_options():
        raise ValueError(f"{option!r} is not a fit_curvature option of any structure; "
                         f"known: {sorted(_known_options())}")
    return tuple(s for s in STRUCTURES if option in COMMON_OPTIONS | structure_class(s).fit_options)


def fit_options_for(structure: str, kind: str, **options: Any) -> dict[str, Any]:
    """The subset of ``options`` that ``fit_curvature(structure=structure, kind=kind)`` takes.

    ``mc_samples`` is kept for ``kind="mc"`` only. An option that no structure takes is a
    ``TypeError`` (a misspelling is not silently dropped); an unknown ``structure`` is the
    registry's ``ValueError``.
    """
    unknown = sorted(set(options) - _known_options())
    if unknown:
        raise TypeError(f"{unknown} are not fit_curvature options of any structure; known: "
                        f"{sorted(_known_options())}")
    allowed = COMMON_OPTIONS | structure_class(structure, fittable=True).fit_options
    return {k: v for k, v in options.items() if k in allowed and not (k == "mc_samples" and kind != "mc")}
