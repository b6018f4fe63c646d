"""``python -m benchmarks.approx_accuracy``: run a preset (or some of its parts), or merge parts."""

from __future__ import annotations

import traceback

from benchmarks.approx_accuracy.config import PRESETS, RESULTS_DIR
from benchmarks.approx_accuracy.report import write_outputs
from benchmarks.approx_accuracy.run import merge_results, run_benchmark
from benchmarks.harness import benchmark_parser, merge_from_args, print_presets, settings_from_args


def main(argv=None) -> int:
    ap = benchmark_parser("python -m benchmarks.approx_accuracy", "Approximation-accuracy benchmark: curvature "
                          "structures vs the exact GGN / empirical Fisher.", PRESETS,
                          output_help="default: benchmarks/results/approx_accuracy")
    ap.add_argument("--model-path", default=None,
                    help="a local .gguf file or HF model directory instead of the packaged SmolLM2 GGUF")
    ap.add_argument("--parts", nargs="*", choices=["qf", "dense"], default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.list_presets:
        print_presets(PRESETS)
        return 0
    if args.merge:
        result = merge_from_args(ap, args, lambda: merge_results(args.merge))
        if result is None:
            return 1
    else:
        settings = settings_from_args(ap, args, PRESETS)
        settings["preset"] = args.preset
        try:
            result = run_benchmark(settings, device=args.device, progress=not args.no_progress,
                                   model_path=args.model_path, parts=args.parts)
        except Exception:
            traceback.print_exc()
            return 1
    paths = write_outputs(result, args.output_dir or RESULTS_DIR)
    for k, p in paths.items():
        print(f"{k}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
