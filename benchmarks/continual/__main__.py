"""``python -m benchmarks.continual``: run a preset, re-render a finished result, or merge parts."""

from __future__ import annotations

import sys

import torch

from benchmarks.continual.config import PRESETS, RESULTS_DIR, make_config
from benchmarks.continual.merge import merge_results
from benchmarks.continual.report import rerender, write_outputs
from benchmarks.continual.run import run_benchmark
from benchmarks.harness import (
    benchmark_parser,
    merge_from_args,
    parse_overrides,
    print_presets,
    resolve_device,
)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("python -m benchmarks.continual",
                              "Continual learning: LoRA on a sequence of reasoning-gym tasks, with Laplace filtering "
                              "and smoothing.", PRESETS, output_help="default: benchmarks/results/continual")
    parser.add_argument("--seeds", type=int, default=None, help="number of run seeds (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: 1; on a loaded 2-core machine 2 threads were "
                             "4-15x slower than 1 through OpenMP contention)")
    parser.add_argument("--progress", action="store_true", help="tqdm bars while training")
    parser.add_argument("--render-only", action="store_true",
                        help="re-write <preset>.md and the plots from an existing <preset>.json in --output-dir")
    args = parser.parse_args(argv)
    if args.list_presets:
        print_presets(PRESETS)
        return 0
    if args.merge:  # parts split by method (--set methods=[...]), each with <preset>.json
        merged = merge_from_args(parser, args, lambda: merge_results(args.merge, name=f"{args.preset}.json"))
        if merged is None:
            return 1
        write_outputs(merged, args.output_dir)
        return 0
    if args.render_only:
        rerender(args.output_dir or RESULTS_DIR, args.preset)
        return 0
    try:
        cfg = make_config(args.preset, args.seeds, parse_overrides(args.set))
    except (KeyError, ValueError) as err:  # a bad --set is a usage error (exit 2) before anything runs
        parser.error(str(err.args[0]) if err.args else str(err))
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)
    run_benchmark(cfg, args.output_dir, str(device), progress=args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
