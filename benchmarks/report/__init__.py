"""``python -m benchmarks.report``: render every marked results table of README.md and
docs/benchmarks/*.md from the committed result JSON; ``--check`` fails when a page disagrees.

* :mod:`benchmarks.report.markers` - the ``<!-- report:NAME -->`` blocks;
* :mod:`benchmarks.report.blocks` - one renderer per block name, from the JSON only.
"""

from benchmarks.report.cli import PAGES, check_pages, main, render_pages

__all__ = ["PAGES", "check_pages", "main", "render_pages"]
