"""One harness for the four benchmarks: model loading, presets, timing, results with provenance,
merging of parts, and the shared table/plot helpers.

* :mod:`.models` - base models (SmolLM2 GGUF, tiny Llama, random-shape Llama);
* :mod:`.presets` - :class:`PresetTable` (name -> settings) and ``--set`` overrides;
* :mod:`.cli` - the shared flags, parsed once;
* :mod:`.timing` - :func:`measure` (median and spread of repeats, peak memory);
* :mod:`.provenance` - :class:`Provenance` (commit, clean/dirty, versions, device, command, times);
* :mod:`.results` - JSON writing, :func:`load_result` (old files too), :func:`merge_parts`;
* :mod:`.machine` - machine facts; :mod:`.report` - markdown tables and plots;
* :mod:`.fitting` - the ``fit_curvature`` options each structure takes (from the registry).
"""

from benchmarks.harness.cli import benchmark_parser, merge_from_args, print_presets, settings_from_args
from benchmarks.harness.fitting import fit_options_for, structures_taking
from benchmarks.harness.machine import (
                                        machine_info,
                                        package_versions,
                                        resolve_device,
                                        resolve_dtype,
)
from benchmarks.harness.models import (
                                        MODEL_LABELS,
                                        load_base_model,
                                        model_label,
                                        random_shape_llama,
)
from benchmarks.harness.presets import PresetTable, apply_overrides, parse_overrides
from benchmarks.harness.provenance import Provenance, legacy_provenance
from benchmarks.harness.report import (
                                        COLORS,
                                        annotate_bars,
                                        fmt,
                                        fmt_bytes,
                                        markdown_table,
                                        plot_style,
                                        save_figure,
)
from benchmarks.harness.results import (
                                        check_mergeable,
                                        load_result,
                                        merge_parts,
                                        provenance_of,
                                        to_jsonable,
                                        write_json,
)
from benchmarks.harness.timing import PeakMemory, Timing, measure, release_memory, sync

__all__ = [
    "benchmark_parser", "merge_from_args", "print_presets", "settings_from_args", "machine_info", "package_versions",
    "resolve_device",
    "resolve_dtype", "MODEL_LABELS", "load_base_model", "model_label", "random_shape_llama", "PresetTable",
    "apply_overrides", "parse_overrides", "Provenance", "legacy_provenance", "COLORS", "annotate_bars", "fmt",
    "fmt_bytes", "markdown_table", "plot_style", "save_figure", "check_mergeable", "load_result", "merge_parts",
    "provenance_of", "to_jsonable", "write_json", "PeakMemory", "Timing", "measure", "release_memory", "sync",
    "fit_options_for", "structures_taking",
]
