"""``python -m benchmarks.cost``: run a preset (or some of its models), or merge parts."""

from __future__ import annotations

from benchmarks.cost.config import PRESETS, RESULTS_DIR
from benchmarks.cost.report import write_outputs
from benchmarks.cost.run import merge_results, run_benchmark
from benchmarks.harness import benchmark_parser, fmt, merge_from_args, print_presets, settings_from_args


def main(argv=None) -> int:
    ap = benchmark_parser("python -m benchmarks.cost", "Cost benchmark: time and peak memory of curvature fits and "
                          "Laplace penalties vs plain training.", PRESETS,
                          output_help=f"default: {RESULTS_DIR.relative_to(RESULTS_DIR.parents[2])}")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the preset's")
    ap.add_argument("--models", nargs="*", default=None, help="only these model keys of the preset")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's; 1 is far more stable on a CPU shared "
                         "with other jobs, where OpenMP threads wait on each other)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.list_presets:
        print_presets(PRESETS)
        return 0
    output_dir = args.output_dir or RESULTS_DIR
    if args.merge:
        result = merge_from_args(ap, args, lambda: merge_results(args.merge))
        if result is None:
            return 1
    else:
        settings = settings_from_args(ap, args, PRESETS)
        settings["name"] = args.preset
        result = run_benchmark(settings, device=args.device, dtype=args.dtype, progress=not args.no_progress,
                               models=args.models, threads=args.threads)
    paths = write_outputs(result, output_dir)
    for k, p in paths.items():
        print(f"{k}: {p}")
    for c in result["target_checks"]:
        print(f"[{'holds' if c['holds'] else 'MISSED'}] {c['model']}: {c['what']} = {fmt(c['value'])} "
              f"(threshold {c['threshold']}; {c['conditions']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
