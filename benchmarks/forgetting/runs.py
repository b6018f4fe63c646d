"""The runs a :class:`Config` expands to: method families, grid points, which setting runs what."""

from __future__ import annotations

from benchmarks.forgetting.config import Config

# ============================================================================================
# Runs
# ============================================================================================

def _lam_label(x: float) -> str:
    return f"{x:.0e}".replace("e+0", "e").replace("e-0", "e-") if x >= 100 or x < 0.01 else f"{x:g}"


def _hp_label(hp: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(hp.items())) or "default"


def family_of(spec: dict) -> str:
    """Curve label of a method family (one curve per family in the plots)."""
    m = spec["method"]
    if m == "lora":
        return f"LoRA (lr={spec['lr']:g})" if "lr" in spec else "LoRA"
    if m == "l2":
        return "L2"
    if m == "lalora":
        extra = "".join(f" {k}={spec[k]}" for k in ("proxy_batches", "proxy_kind") if k in spec)
        # curvature refitted after a plain warm-up of k steps (benchmarks.forgetting.refit)
        refit = f" refit@{spec['refit_after']}" if spec.get("refit_after") is not None else ""
        return f"LaLoRA-{spec['structure']}{refit}{extra}"
    if m == "baseline":
        return spec["name"]
    if m == "lalora_on_init":
        return f"LaLoRA-{spec['structure']}@{spec['init']}"
    raise ValueError(f"unknown method {m!r}")


def is_plain(run_or_spec: dict) -> bool:
    """The plain LoRA reference (standard init, the setting's learning rate); a ``{"method": "lora",
    "lr": ...}`` variant is an ordinary method (a learning-rate control for the baselines' lr grids)."""
    spec = run_or_spec.get("spec", run_or_spec)
    return run_or_spec["method"] == "lora" and "lr" not in spec


def setting_allows(setting: dict, spec: dict) -> bool:
    """Whether ``setting["methods"]`` ("all" | "plain" | a list of family / baseline names) runs the
    method ``spec``; plain LoRA runs everywhere."""
    allowed = setting.get("methods", "all")
    if is_plain(spec) or allowed == "all":
        return True
    if allowed == "plain":
        return False
    return family_of(spec) in allowed or spec.get("name") in allowed


def expand_runs(cfg: Config, baselines: dict | None) -> tuple[list[dict], list[str]]:
    """All runs of ``cfg`` in execution order, and notes on skipped methods.

    A run is ``{"id", "setting", "seed", "method", "family", "point", ...}``: ``point`` labels the
    grid point inside its family (strength or baseline hyperparameters). Per setting and seed, plain
    LoRA comes first (its model is reused by the post-hoc ``intruders`` baseline and to calibrate
    lambda), then everything else.
    """
    runs, notes = [], []
    for setting in cfg.settings:
        seeds = sorted(set(cfg.seeds) | set(cfg.plain_seeds))
        for seed in seeds:
            for spec in cfg.methods:
                m = spec["method"]
                plain = is_plain(spec)
                if not plain and (not setting_allows(setting, spec) or seed not in cfg.seeds):
                    continue
                if plain and seed not in cfg.plain_seeds:
                    continue
                family = family_of(spec)
                common = {"setting": setting["name"], "seed": seed, "method": m, "family": family,
                          "spec": {k: v for k, v in spec.items() if k not in ("strengths", "relative_strengths",
                                                                              "grid")}}
                if m == "lora":
                    runs.append({**common, "point": "-"})
                elif m in ("l2", "lalora", "lalora_on_init"):
                    if m == "lalora_on_init" and baselines is None:
                        if setting is cfg.settings[0] and seed == seeds[0]:
                            notes.append(f"{family}: skipped (benchmarks.baselines not importable)")
                        continue
                    for lam in spec.get("strengths", ()):
                        runs.append({**common, "point": f"lam={_lam_label(lam)}", "strength": float(lam)})
                    for rel in spec.get("relative_strengths", ()):
                        # resolved at run time: rel * lam_ratio1 of the same (setting, seed) calibration
                        runs.append({**common, "point": f"rel={rel:g}", "relative": float(rel)})
                elif m == "baseline":
                    if baselines is None or spec["name"] not in baselines:
                        if setting is cfg.settings[0] and seed == seeds[0]:
                            notes.append(f"{family}: skipped (benchmarks.baselines "
                                         f"{'not importable' if baselines is None else 'has no ' + spec['name']})")
                        continue
                    grid = spec.get("grid") or baselines[spec["name"]].grid(cfg.baseline_preset)
                    for hp in grid:
                        runs.append({**common, "point": _hp_label(hp), "hp": dict(hp)})
    # plain LoRA first within each (setting, seed)
    order = {(r["setting"], r["seed"]): i for i, r in enumerate(runs)}
    runs.sort(key=lambda r: (order[(r["setting"], r["seed"])], not is_plain(r)))
    for r in runs:
        r["id"] = run_id(r["setting"], r["seed"], r["family"], r["point"])
    return runs, notes


def run_id(setting: str, seed: int, family: str, point: str) -> str:
    """A run's id: ``<setting>/s<seed>/<family>/<point>`` (plain LoRA's point is ``-``)."""
    return f"{setting}/s{seed}/{family}/{point}"
