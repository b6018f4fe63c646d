"""``python -m benchmarks.forgetting``: run a preset (or a part of it), list, dry-run or merge parts."""

from __future__ import annotations

import sys

from benchmarks.forgetting.config import PRESETS, RESULTS_DIR, make_config
from benchmarks.forgetting.merge import merge_results
from benchmarks.forgetting.run import run_benchmark, try_baselines
from benchmarks.forgetting.runs import expand_runs, family_of
from benchmarks.harness import benchmark_parser, merge_from_args, parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("python -m benchmarks.forgetting", "Learning vs forgetting: LoRA, L2, LaLoRA and the "
                              "forgetting-mitigation baselines on SmolLM2-135M.", PRESETS,
                              output_help="default: benchmarks/results/forgetting/<preset>")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of run seeds (plain LoRA gets at least as many)")
    parser.add_argument("--only", default=None, help="comma-separated method families to keep (e.g. LoRA,L2)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs of an identical config")
    parser.add_argument("--reuse", nargs="+", default=None, metavar="DIR",
                        help="result folders whose finished runs stand in for runs here that would train and "
                             "evaluate identically (e.g. the main preset's parts for an ablation)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    args = parser.parse_args(argv)
    if args.merge:
        return 0 if merge_from_args(parser, args, lambda: merge_results(args.merge, args.output_dir)) else 1
    if args.list_presets:
        for name in PRESETS:
            cfg = make_config(name)
            runs, _ = expand_runs(cfg, try_baselines())
            print(f"{name:24s} {len(runs):4d} runs, settings={[s['name'] for s in cfg.settings]}, seeds={cfg.seeds}")
        return 0
    try:
        cfg = make_config(args.preset, args.seeds, parse_overrides(args.set))
    except (KeyError, ValueError) as err:  # a bad --set is a usage error (exit 2) before anything runs
        parser.error(str(err.args[0]) if err.args else str(err))
    if args.only:
        keep = set(args.only.split(","))
        cfg.methods = [m for m in cfg.methods if family_of(m) in keep or m["method"] in keep or m.get("name") in keep]
    if args.dry_run:
        runs, notes = expand_runs(cfg, try_baselines())
        for r in runs:
            print(r["id"])
        print(f"{len(runs)} runs; notes: {notes}")
        return 0
    run_benchmark(cfg, args.output_dir or RESULTS_DIR / cfg.preset, args.device or "auto",
                  progress=not args.no_progress, resume=args.resume, reuse=args.reuse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
