"""The CPU campaign behind the evidence: the main preset and the ablations, split into one part per
(preset, seed) and worked off by any number of worker processes across sessions.

``python -m benchmarks.forgetting.campaign`` is one worker: it takes the first part that is not
complete, whose donors are complete and that no other worker holds (a lock file per part under
``benchmarks/results/forgetting/.locks``), runs it with ``--resume`` (and ``--reuse`` of its donors),
and goes on to the next until nothing is left it can run. Start one worker per core; a worker killed
at the end of a session loses only its unfinished run, and the next worker resumes the part.

Parts, in order (the main preset first, the comparisons that matter most first inside each):

* ``main`` seeds 0, 1, 2 -> ``main/parts/s{seed}``;
* each ablation preset and ``kfac_gap``, seeds 0 and 1 -> ``<preset>/parts/s{seed}``, reusing the
  finished runs of ``main/parts/s{seed}`` (:mod:`benchmarks.forgetting.reuse`), so it waits until
  that main part is complete.

A part also reuses the identical runs of the finished results listed in :data:`ARCHIVES` for its
preset (e.g. learning-rate controls run ahead of the main parts), without waiting for them.

When every part of a preset is complete, a worker merges them into ``<preset>/results.json`` (again
whenever a part's result is newer than the merged one); ``python -m benchmarks.report`` then renders
the pages. ``--status`` prints every part (runs done / total, complete, held by a worker);
``--dry-run`` the commands.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.forgetting.config import RESULTS_DIR, make_config

REPO_ROOT = RESULTS_DIR.parents[2]

#: the ablations in the order they run (cheap and central first; the 4x-longer training last)
ABLATION_ORDER = ("ablation_lambda", "kfac_gap", "ablation_proxy_batches", "ablation_proxy_text", "ablation_rank",
                  "ablation_length")


#: finished results of other configurations whose identical runs (same fingerprint, see
#: :mod:`benchmarks.forgetting.reuse`) a preset's parts reuse; unlike donors they are never waited
#: for. Folders relative to the results root, ``{seed}`` filled in; only those that exist are passed.
ARCHIVES = {"main": ("main_lr2e-3/parts/s{seed}", "lr_probe")}


@dataclass(frozen=True)
class Part:
    preset: str
    seed: int
    out: Path
    donors: tuple[Path, ...] = ()
    archives: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.preset}/s{self.seed}"


def campaign_parts(root: Path = RESULTS_DIR) -> list[Part]:
    """Every part of the campaign, in the order workers take them."""
    def archives(preset: str, seed: int) -> tuple[Path, ...]:
        folders = (root / rel.format(seed=seed) for rel in ARCHIVES.get(preset, ()))
        return tuple(f for f in folders if (f / "results.json").exists())

    main = [Part("main", s, root / "main" / "parts" / f"s{s}", archives=archives("main", s))
            for s in make_config("main").seeds]
    ablations = [Part(preset, s, root / preset / "parts" / f"s{s}", (root / "main" / "parts" / f"s{s}",),
                      archives(preset, s))
                 for preset in ABLATION_ORDER for s in make_config(preset).seeds]
    return main + ablations


def progress_of(out: Path) -> tuple[int, bool]:
    """(finished runs, complete) of the part written to ``out`` ((0, False) before its first run)."""
    path = out / "results.json"
    if not path.exists():
        return 0, False
    payload = json.loads(path.read_text())
    return len(payload.get("runs", [])), bool(payload.get("complete"))


def command(part: Part, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "benchmarks.forgetting", "--preset", part.preset, "--set", f"seeds=[{part.seed}]",
           "--set", f"plain_seeds=[{part.seed}]", "--output-dir", str(part.out), "--no-progress", "--resume"]
    reuse = part.donors + part.archives
    return cmd + (["--reuse", *map(str, reuse)] if reuse else [])


def runnable(part: Part) -> bool:
    """Not complete, and every donor complete (else it would run the donor's runs itself)."""
    return not progress_of(part.out)[1] and all(progress_of(d)[1] for d in part.donors)


def work(parts: list[Part], lock_dir: Path, run: Callable[[Part], int], *, wait_s: float = 60.0,
         log: Callable[[str], None] = print) -> list[str]:
    """Run parts until none is left that this worker can take; returns the names it ran. A part held
    by another worker is skipped; while parts wait only for donors that another worker is running,
    this worker sleeps ``wait_s`` and looks again. A part whose run fails is not retried here."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    ran, failed = [], set()
    while True:
        took = False
        for part in parts:
            if part.name in failed or not runnable(part):
                continue
            with open(lock_dir / (part.name.replace("/", "_") + ".lock"), "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another worker holds it
                if not runnable(part):  # finished while we looked
                    continue
                log(f"[campaign] {part.name}: start")
                rc = run(part)
                log(f"[campaign] {part.name}: exit {rc}")
                ran.append(part.name)
                if rc != 0 or not progress_of(part.out)[1]:
                    failed.add(part.name)
                took = True
                break
        if took:
            continue
        pending = [p for p in parts if p.name not in failed and not progress_of(p.out)[1]]
        # parts that become runnable once donors another worker is making are complete
        later = [p for p in pending if not all(progress_of(d)[1] for d in p.donors)
                 and not any(q.name in failed for q in parts if q.out in p.donors)]
        if not later:
            return ran
        time.sleep(wait_s)


def merge_complete(parts: list[Part], root: Path, merge: Callable[[list[Path], Path], object] | None = None,
                   log: Callable[[str], None] = print) -> list[str]:
    """Merge the parts of every preset whose parts are all complete into ``root/<preset>``, unless the
    merged result is already newer than each part's; returns the presets merged now."""
    if merge is None:
        from benchmarks.forgetting.merge import merge_results as merge
    merged = []
    for preset in dict.fromkeys(p.preset for p in parts):
        group = [p for p in parts if p.preset == preset]
        if not all(progress_of(p.out)[1] for p in group):
            continue
        target = root / preset / "results.json"
        newest_part = max((p.out / "results.json").stat().st_mtime for p in group)
        if target.exists() and target.stat().st_mtime >= newest_part:
            continue
        merge([p.out for p in group], root / preset)
        log(f"[campaign] merged {len(group)} parts into {root / preset}")
        merged.append(preset)
    return merged


def status(parts: list[Part], lock_dir: Path) -> str:
    lines = []
    for part in parts:
        done, complete = progress_of(part.out)
        total = _total_runs(part)
        held = _held(lock_dir / (part.name.replace("/", "_") + ".lock"))
        lines.append(f"{part.name:32s} {done:3d}/{total:<3d} {'complete' if complete else 'running' if held else '-'}")
    return "\n".join(lines)


def _total_runs(part: Part) -> int:
    from benchmarks.forgetting.run import try_baselines
    from benchmarks.forgetting.runs import expand_runs

    cfg = make_config(part.preset, overrides={"seeds": [part.seed], "plain_seeds": [part.seed]})
    return len(expand_runs(cfg, try_baselines())[0])


def _held(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forgetting.campaign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--status", action="store_true", help="print every part's progress and exit")
    parser.add_argument("--dry-run", action="store_true", help="print every part's command and exit")
    parser.add_argument("--root", type=Path, default=RESULTS_DIR.relative_to(REPO_ROOT),
                        help="results folder of the forgetting benchmark, relative to the repository root")
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)  # relative paths in the commands and in what the results record (reused_from)
    parts, lock_dir = campaign_parts(args.root), args.root / ".locks"
    if args.status:
        print(status(parts, lock_dir))
        return 0
    if args.dry_run:
        for part in parts:
            print(" ".join(command(part)))
        return 0

    def run(part: Part) -> int:
        part.out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # one core per worker
        with open(part.out / "campaign.log", "a") as log:
            return subprocess.run(command(part), stdout=log, stderr=subprocess.STDOUT, env=env).returncode

    ran = work(parts, lock_dir, run)
    merge_complete(parts, args.root)
    print(f"[campaign] this worker ran: {ran or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
