"""``lc.suggest_strength`` against the benchmark's calibrated strength (issue: a strength without a
full plain run).

For each seed of the small preset's q,v setting this builds exactly what a LaLoRA run of the
benchmark builds (the seed's LoRA init, the K-FAC curvature on the same proxy batches, the same
training batches, lr, clipping and budget), runs ``lc.suggest_strength`` with a pilot of 10 % of
the budget, and compares its ``lam_ratio1`` (the strength at ``rel = 1``) with the calibrated one of
the committed results (``calibration[<setting>/s<seed>][<structure>]``, from plain LoRA's full
run). The relative strength ``rel * suggested / calibrated`` is what a run at the suggested
strength amounts to on the benchmark's axis: run it with
``python -m benchmarks.forgetting --set ...relative_strengths=[that]`` to see where it lands.

    python -m benchmarks.forgetting.suggest --seeds 0 1 [--setting qv] [--structure kfac]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchmarks.forgetting.config import RESULTS_DIR, make_config
from benchmarks.forgetting.data import load_data, proxy_for, train_batches
from benchmarks.forgetting.run import load_base, lora_kwargs
from benchmarks.harness import fit_options_for


def measure(setting_name: str, structure: str, seeds: list[int], relative: float, pilot_fraction: float,
            results: Path) -> dict:
    import lalora_curv as lc
    from lalora_curv.experiments.models import add_lora

    committed = json.loads(results.read_text())
    cfg = make_config(committed["preset"])
    setting = next(s for s in cfg.settings if s["name"] == setting_name)
    steps, lr = int(setting.get("steps", cfg.steps)), float(setting.get("lr", cfg.lr))
    torch.manual_seed(cfg.data_seed)
    base, tokenizer = load_base(cfg, torch.device("cpu"))
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    data = load_data(cfg, tokenizer)
    _, proxy = proxy_for(cfg, data, tokenizer, {})
    out = {"setting": setting_name, "structure": structure, "steps": steps, "lr": lr, "relative": relative,
           "pilot_steps": max(1, round(pilot_fraction * steps)), "seeds": {}}
    for seed in seeds:
        calibrated = committed["calibration"][f"{setting_name}/s{seed}"][structure]["lam_ratio1"]
        model = add_lora(copy.deepcopy(base), **lora_kwargs(cfg, setting), seed=seed)
        lora = lc.LoRAParams.from_model(model)
        curv = lc.fit_curvature(model, proxy, structure=structure, kind=cfg.curvature_kind, lora=lora, seed=seed,
                                progress=False, **fit_options_for(structure, cfg.curvature_kind,
                                                                  mc_samples=cfg.mc_samples))
        t0 = time.perf_counter()
        suggestion = lc.suggest_strength(curv, model, train_batches(cfg, data, tokenizer, seed), steps=steps, lr=lr,
                                         lora=lora, relative=1.0, pilot_steps=out["pilot_steps"], seed=seed,
                                         grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm)
        seconds = time.perf_counter() - t0
        ratio = suggestion.strength / calibrated
        out["seeds"][seed] = {"suggested_lam_ratio1": suggestion.strength, "calibrated_lam_ratio1": calibrated,
                              "suggested_over_calibrated": ratio,
                              "rel_on_benchmark_axis": relative * ratio,
                              "exponent": suggestion.exponent, "pilot_seconds": seconds}
        print(json.dumps({seed: out["seeds"][seed]}), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--setting", default="qv")
    ap.add_argument("--structure", default="kfac")
    ap.add_argument("--relative", type=float, default=3.0, help="the rel the suggestion aims at (default 3)")
    ap.add_argument("--pilot-fraction", type=float, default=0.1)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR / "small" / "results.json")
    ap.add_argument("--output", type=Path, default=None, help="write the measurement as JSON here")
    args = ap.parse_args(argv)
    out = measure(args.setting, args.structure, args.seeds, args.relative, args.pilot_fraction, args.results)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
