"""Finished runs of another result reused where they would run identically (``--reuse DIR ...``).

An ablation shares most of its runs with the main preset: the same plain LoRA of the same seed, the
rel=1 points at the main rank, length and proxy. Those need not train again. A run is reused only
when its *fingerprint* matches: everything its training and evaluation depend on (the data and
evaluation options of the config, the setting's effective steps, learning rate and LoRA
configuration, the method spec, the seed and grid point), never the preset's or setting's name.

What comes along with a reused run:

* a reused plain LoRA run brings the strength calibration of its (setting, seed), but only when that
  calibration covers every penalty this config needs there; otherwise plain LoRA trains again
  (``Benchmark.plain_model_needed``) and calibrates afresh;
* the curvature records of its (setting, seed), renamed to this setting;
* the provenance of every donor (commit, command, times) and a note naming the donors;
* the donor's cached base-model scores (content-addressed keys, so only identical data hits).

Every data sample is drawn from config fields alone (``benchmarks.forgetting.data``), so equal
fingerprints mean equal data; :func:`check_same_base` still compares the base model's scores of
every donor with this run's once they are known, and stops on any difference.

Each reused record keeps its own scores, history and cost and gains ``reused_from``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from benchmarks.forgetting.config import Config, lora_kwargs
from benchmarks.forgetting.refit import calibration_entry
from benchmarks.forgetting.runs import is_plain
from benchmarks.forgetting.summary import METRICS
from benchmarks.harness import load_result, provenance_of, write_json

#: config fields a single run does not depend on: names, grids, table tolerances, and the per-setting
#: values that enter the fingerprint resolved (steps, lr, LoRA configuration)
_NOT_PER_RUN = ("preset", "seeds", "plain_seeds", "methods", "settings", "calibrate_structures", "baseline_preset",
                "nll_tolerance", "acc_tolerance", "r", "alpha", "dropout", "steps", "lr")
#: what a record takes from the run it stands for in this config (names, not content)
_NAMES = ("id", "setting", "family", "point", "spec")


def run_fingerprint(cfg: Config, run: dict) -> str:
    """Digest of what ``run`` (an expanded run, or a finished record) of ``cfg`` trains and evaluates."""
    setting = next(s for s in cfg.settings if s["name"] == run["setting"])
    spec = dict(run["spec"])
    for key in ("proxy_batches", "proxy_kind"):  # a spec spelling out the config's own proxy is the same run
        if key in spec and spec[key] == getattr(cfg, key):
            del spec[key]
    # the learning rate the run trains at (as run.py resolves it: a grid point's, else the method's,
    # else the setting's): an lr control {"method": "lora", "lr": x} is plain LoRA of a config at lr x
    lr = float(run.get("hp", {}).get("lr", spec.pop("lr", setting.get("lr", cfg.lr))))
    point = {k: run[k] for k in ("seed", "method", "relative", "hp") if k in run}
    if "relative" not in run and "strength" in run:  # a relative record also holds its resolved strength
        point["strength"] = run["strength"]
    what = {"config": {k: v for k, v in cfg.to_dict().items() if k not in _NOT_PER_RUN},
            "steps": int(setting.get("steps", cfg.steps)), "lr": lr,
            "lora": lora_kwargs(cfg, setting), "spec": spec, **point}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def needed_calibrations(runs: list[dict]) -> dict[tuple, set]:
    """(setting, seed) -> the calibration entries its relative-strength runs resolve against."""
    need: dict[tuple, set] = {}
    for r in runs:
        if "relative" not in r:
            continue
        need.setdefault((r["setting"], r["seed"]), set()).add(calibration_entry(r))
    return need


def adopt_finished_runs(bench, donors: list[str | Path]) -> list[str]:
    """Put the finished runs of ``donors`` (result folders) that match a run of ``bench`` into
    ``bench.done`` (runs already there stay); returns notes on what was reused."""
    wanted = {run_fingerprint(bench.cfg, r): r for r in bench.runs if r["id"] not in bench.done}
    need = needed_calibrations(bench.runs)
    notes, used = [], []
    for donor in donors:
        payload = load_result(donor, name="results.json")
        donor_cfg = Config(**payload["config"])
        adopted = 0
        for record in payload["runs"]:
            run = wanted.pop(run_fingerprint(donor_cfg, record), None)
            if run is None:
                continue
            adopted += 1
            bench.done[run["id"]] = {**record, **{k: run[k] for k in _NAMES},
                                     "reused_from": {"result": str(donor), "id": record["id"]}}
            here, there = (run["setting"], run["seed"]), f"{record['setting']}/s{record['seed']}"
            if is_plain(run):
                cal = payload.get("calibration", {}).get(there, {})
                if need.get(here, set()) <= set(cal):
                    bench.calibration.setdefault(f"{here[0]}/s{here[1]}", cal)
            prefix = f"{record['setting']}|{record['seed']}|"
            for key, info in payload.get("curvature", {}).items():
                if key.startswith(prefix):
                    bench.curv_info.setdefault(f"{run['setting']}|{run['seed']}|" + key[len(prefix):], info)
        if adopted:
            used.append(payload)
            bench.reuse_bases[str(donor)] = payload["base"]
            notes.append(f"{adopted} finished runs reused from {donor} (same fingerprint: data, evaluation, "
                         f"steps, lr, LoRA configuration, method, seed, grid point)")
        _seed_base_cache(Path(donor) / "base_eval_cache.json", bench.out / "base_eval_cache.json")
    if used:
        known = {json.dumps(p, sort_keys=True) for p in bench.earlier_provenance}
        bench.earlier_provenance += [p for p in provenance_of(used) if json.dumps(p, sort_keys=True) not in known]
    return notes


def _seed_base_cache(donor: Path, ours: Path) -> None:
    """Entries of the donor's base-model cache that ours lacks (keys are digests of the data)."""
    if not donor.exists():
        return
    mine = json.loads(ours.read_text()) if ours.exists() else {}
    theirs = json.loads(donor.read_text())
    if set(theirs) - set(mine):
        write_json(ours, {**theirs, **mine})


def check_same_base(donor_bases: dict[str, dict], base: dict, tol: float = 1e-6) -> None:
    """The base model's scores here equal every donor's (same model, same evaluation data): else a
    reused run would be compared against another base, so this is an error naming the donor."""
    for donor, theirs in donor_bases.items():
        for key in METRICS:
            for k in (key, f"{key}_val", f"{key}_test"):
                a, b = base.get(k), theirs.get(k)
                if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=tol, abs_tol=tol)):
                    raise ValueError(f"--reuse {donor}: its base-model {k} is {b}, here {a}; the evaluation data "
                                     f"differ, so its runs cannot stand in for runs here")
