"""Smoke test of the benchmarks.forgetting package: the core loop on the tiny Llama, 3 methods, 2 steps."""

from __future__ import annotations

import json

import pytest

forgetting = pytest.importorskip("benchmarks.forgetting")


def test_tiny_preset_end_to_end(tmp_path):
    cfg = forgetting.make_config("tiny")
    assert cfg.model == "tiny" and cfg.steps == 2
    assert [m["method"] for m in cfg.methods] == ["lora", "l2", "lalora"]
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, log=lambda *_: None)

    for name in ("results.json", "summary.md", "pareto_nll.png", "pareto_acc.png", "base_eval_cache.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "pareto_nll.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("machine", "config", "runs", "points", "tables", "forgetting_evidence", "base", "curvature",
                "calibration", "timing", "data", "model"):
        assert key in data, key
    assert data["complete"] is True and data["device"] == "cpu"  # top level: what gpu_suite checks
    (prov,) = data["provenance"]  # this run: commit, clean/dirty tree, versions, command, start/end
    assert prov["preset"] == "tiny" and prov["finished_utc"] is not None and len(prov["commit"]) == 40
    assert data["data"]["disjoint_checked"] is True
    assert {r["family"] for r in data["runs"]} == {"LoRA", "L2", "LaLoRA-kfac"}
    for r in data["runs"]:
        m = r["metrics"]
        for k in ("tgt_nll", "tgt_em", "src_text_nll", "src_mcq_nll", "src_mcq_acc", "proxy_text_nll",
                  "proxy_mcq_acc"):
            assert m[k] is not None, (r["id"], k)
            assert m[k + "_val"] is not None and m[k + "_test"] is not None, (r["id"], k)
        # every set split once into disjoint halves, recorded; per-item scores stored with the run
        assert m["n_items"]["src_mcq"] == {"all": 4, "val": 2, "test": 2}
        assert set(r["items"]) == set(data["data"]["splits"]) == set(m["n_items"])
        h = r["history"]
        assert h["steps"] == 2 and len(h["task_loss"]) == 2
        assert r["init"] == forgetting.B0_INIT
    lalora = next(r for r in data["runs"] if r["method"] == "lalora")
    assert lalora["info"]["prior_precision"] > 0 and lalora["history"]["penalty_max"] >= 0
    assert "kfac" in data["calibration"]["qv/s0"] and "l2" in data["calibration"]["qv/s0"]
    assert len(data["forgetting_evidence"]["qv"]["src_text_nll"]["deltas"]) == 1
    assert {row["family"] for row in data["tables"]["qv"]["nll"]} == {"LoRA", "L2", "LaLoRA-kfac"}
    assert data["selection"].startswith("validation")
    kfac_row = next(row for row in data["tables"]["qv"]["acc"] if row["family"] == "LaLoRA-kfac")
    assert kfac_row["selected_on"] == "val" and kfac_row["reported_on"] == "test"
    assert set(kfac_row["paired"]) == {"LoRA", "L2"} and kfac_row["paired"]["LoRA"]["src_mcq_acc"]["n_seeds"] == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "Forgetting evidence" in summary and "pareto_nll.png" in summary
    assert "Paired by seed, test half" in summary and "chosen on validation" in summary

    # the README's paired table renders from the result file, with the interval of every comparison
    from benchmarks.report.blocks import FORGETTING_MAIN
    from benchmarks.report.paired_blocks import forgetting_paired

    root = tmp_path / "repo"
    (root / FORGETTING_MAIN).parent.mkdir(parents=True)
    (root / FORGETTING_MAIN).write_text((tmp_path / "results.json").read_text())
    table = forgetting_paired(root, FORGETTING_MAIN, "qv", "acc")
    kfac_line = next(line for line in table.splitlines() if line.startswith("| LaLoRA-kfac"))
    assert kfac_line.count("[") == 4 and "validation half" in table
    from benchmarks.report.paired_blocks import forgetting_verdicts

    verdicts = [line for line in forgetting_verdicts(root, FORGETTING_MAIN, "qv").splitlines()
                if line.startswith("- ")]
    assert len(verdicts) == 2 * len(data["tables"]["qv"])  # L2 and LaLoRA-kfac per read-out
    assert all("vs L2 (1 seed)" in line for line in verdicts if "LaLoRA-kfac" in line)
    # the ablation form: every grid point against plain LoRA of its setting
    from benchmarks.report.paired_blocks import forgetting_points

    points = forgetting_points(root, FORGETTING_MAIN)
    lines = [line for line in points.splitlines() if line.startswith("| qv")]
    assert len(lines) == len(data["points"]) == 3
    assert [line.count("[") for line in lines] == [0, 3, 3]  # plain LoRA itself, then L2 and LaLoRA-kfac

    # a resumed run reuses the cached base-model evaluation and every finished run, plain LoRA included
    # (its calibration was saved and nothing left needs its model), and keeps the provenance of the
    # process that made them
    payload2 = forgetting.run_benchmark(forgetting.make_config("tiny"), tmp_path, "cpu", progress=False, resume=True,
                                        log=lambda *_: None)
    assert payload2["timing"]["base_eval_cached"] is True
    assert payload2["base"] == payload["base"]
    assert payload2["runs"] == data["runs"]  # the same records, timings and costs included: nothing retrained
    assert payload2["calibration"] == data["calibration"] and payload2["data"] == data["data"]
    assert payload2["provenance"][0] == data["provenance"][0] and len(payload2["provenance"]) == 2


def _count_evaluations(monkeypatch) -> list:
    """A list that gains one entry per full evaluation the benchmark runs from now on."""
    calls = []
    real_evaluate = forgetting.run.evaluate

    def counting_evaluate(*args, **kwargs):
        calls.append(1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(forgetting.run, "evaluate", counting_evaluate)
    return calls


def test_resume_retrains_plain_lora_only_for_a_missing_calibration(tmp_path, monkeypatch):
    """A relative strength needs the calibration at plain LoRA's solution: when an unfinished run needs
    one that was not saved, plain LoRA trains again first (and, its losses equal to the saved run's,
    keeps its saved scores instead of being scored again); when it was saved, nothing retrains."""
    def config():
        cfg = forgetting.make_config("tiny")
        cfg.methods = [{"method": "lora"}, {"method": "l2", "relative_strengths": [1.0]}]
        return cfg

    def resume():
        return forgetting.run_benchmark(config(), tmp_path, "cpu", progress=False, resume=True, log=lambda *_: None)

    def by_method(payload):
        return {r["method"]: r for r in payload["runs"]}

    first = forgetting.run_benchmark(config(), tmp_path, "cpu", progress=False, log=lambda *_: None)
    saved = json.loads((tmp_path / "results.json").read_text())

    # L2 unfinished, its calibration saved: plain LoRA is reused, L2 runs at the saved strength
    (tmp_path / "results.json").write_text(json.dumps({**saved, "runs": saved["runs"][:1]}))
    again = by_method(resume())
    assert again["lora"] == by_method(saved)["lora"]
    assert again["l2"]["strength"] == pytest.approx(by_method(first)["l2"]["strength"])
    assert again["l2"]["cost"]["calibration_plain_lora_run"] == again["lora"]["train_seconds"]

    # L2 unfinished and no calibration saved: plain LoRA trains again and calibrates
    scored = _count_evaluations(monkeypatch)
    (tmp_path / "results.json").write_text(json.dumps({**saved, "runs": saved["runs"][:1], "calibration": {}}))
    payload = resume()
    retrained = by_method(payload)
    assert len(scored) == 1  # L2 only: plain LoRA's training repeated its losses, so its scores stand
    assert retrained["lora"] == {**by_method(saved)["lora"], "trained_again": True}
    assert "l2" in payload["calibration"]["qv/s0"]
    assert retrained["l2"]["strength"] == pytest.approx(by_method(first)["l2"]["strength"], rel=1e-4)
    assert retrained["l2"]["cost"]["calibration_plain_lora_run"] == retrained["lora"]["train_seconds"]

    # a saved plain record whose losses the new training does not repeat is scored again, with a note
    tampered = by_method(saved)["lora"]
    losses = [0.0] * len(tampered["history"]["task_loss"])
    tampered = {**tampered, "history": {**tampered["history"], "task_loss": losses}}
    scored.clear()
    (tmp_path / "results.json").write_text(json.dumps({**saved, "runs": [tampered], "calibration": {}}))
    payload = resume()
    assert len(scored) == 2 and by_method(payload)["lora"]["history"] != tampered["history"]
    assert any("losses differ" in n for n in payload["notes"])


def test_small_preset_runs_and_tables():
    """The small preset expands to every method family (baselines included when importable), and the
    matched-target table picks the best source score within the tolerance."""
    cfg = forgetting.make_config("small")
    baselines = forgetting.try_baselines()
    runs, notes = forgetting.expand_runs(cfg, baselines)
    families = {r["family"] for r in runs}
    assert {"LoRA", "L2", "LaLoRA-diag", "LaLoRA-kfac", "LaLoRA-kfac_tridiag", "LaLoRA-kfac_delta_w"} <= families
    if baselines is not None:
        assert {"migu", "milora", "corda_kpm", "intruders", "osf", "LaLoRA-kfac_tridiag@milora"} <= families
    else:
        assert notes
    # plain LoRA first within each (setting, seed), seeds for the evidence
    first = {}
    for r in runs:
        first.setdefault((r["setting"], r["seed"]), r["method"])
    assert set(first.values()) == {"lora"}
    assert len({r["seed"] for r in runs if r["method"] == "lora"}) >= 2

    base = {"tgt_nll": 1.0, "src_text_nll": 2.0}
    plain = {"family": "LoRA", "point": "-", "init": "x", "tgt_nll": 0.5, "src_text_nll": 2.5, "seeds": [0]}
    pts = [plain,
           {"family": "A", "point": "lam=1", "init": "x", "tgt_nll": 0.51, "src_text_nll": 2.3, "seeds": [0]},
           {"family": "A", "point": "lam=2", "init": "x", "tgt_nll": 0.6, "src_text_nll": 2.0, "seeds": [0]},
           {"family": "B", "point": "h", "init": "x", "tgt_nll": 0.7, "src_text_nll": 2.0, "seeds": [0]}]
    for p in pts:
        p.update({k: p.get(k) for k in forgetting.METRICS})
        p.update({k + "_sd": None for k in forgetting.METRICS})
    rows = forgetting.best_at_matched_target(pts, plain, base, "tgt_nll", "src_text_nll", 0.02, lower=True)
    by = {r["family"]: r for r in rows}
    assert by["A"]["point"] == "lam=1" and by["A"]["within_tolerance"]
    assert by["A"]["recovered"] == pytest.approx(0.4)
    assert not by["B"]["within_tolerance"]


def test_fast_mcq_matches_reference():
    """The shared-prompt MCQ scorer gives mcq_scores' log-likelihoods (tiny Llama, eager attention)."""
    from benchmarks.forgetting.mcq import check_against_reference
    from lalora_curv.experiments.data import wordnet_mcq
    from lalora_curv.experiments.models import tiny_llama, tiny_tokenizer

    check = check_against_reference(tiny_llama(), tiny_tokenizer(), wordnet_mcq("eval", n=5, seed=1))
    assert check["ok"], check
    assert check["max_abs_loglik_diff"] < 1e-4


def test_relative_strengths_and_merging_parts(tmp_path):
    """Relative strengths resolve to rel * lam_ratio1 of the same seed's calibration, and two parts of
    one preset run separately (as on two CPU cores) merge into one result; mismatched configs refuse."""
    quiet = dict(progress=False, log=lambda *_: None)
    part_a = forgetting.make_config("tiny", overrides={
        "methods": [{"method": "lora"}, {"method": "l2", "relative_strengths": [2.0]}], "plain_seeds": [0]})
    part_b = forgetting.make_config("tiny", overrides={"methods": [{"method": "lora"}], "plain_seeds": [1]})
    a = forgetting.run_benchmark(part_a, tmp_path / "a", "cpu", **quiet)
    forgetting.run_benchmark(part_b, tmp_path / "b", "cpu", **quiet)

    l2 = next(r for r in a["runs"] if r["method"] == "l2")
    assert l2["point"] == "rel=2" and l2["relative"] == 2.0
    assert l2["strength"] == pytest.approx(2.0 * a["calibration"]["qv/s0"]["l2"]["lam_ratio1"])
    # a relative strength costs its own training plus the plain LoRA run and calibration it needs
    plain = next(r for r in a["runs"] if r["method"] == "lora")
    assert l2["cost"]["calibration_plain_lora_run"] == plain["train_seconds"] > 0
    assert l2["cost"]["seconds"] == pytest.approx(l2["train_seconds"] + plain["train_seconds"]
                                                  + a["calibration"]["qv/s0"]["seconds"])
    assert plain["cost"] == {"seconds": plain["train_seconds"], "train": plain["train_seconds"]}

    # as if the parts ran on different commits and hosts
    for part, commit, host in (("a", "a" * 40, "AMD EPYC"), ("b", "b" * 40, "Intel Xeon")):
        payload = json.loads((tmp_path / part / "results.json").read_text())
        payload["provenance"][0]["commit"] = commit
        payload["provenance"][0]["device_name"] = host
        payload["timing"]["total_s"] = 1.0  # as if resumed at the end: the last process's wall time is 1 s
        (tmp_path / part / "results.json").write_text(json.dumps(payload))
    merged = forgetting.merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert [p["commit"] for p in merged["provenance"]] == ["a" * 40, "b" * 40]  # every part's, not the first's
    assert merged["merged_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert sorted(r["id"] for r in merged["runs"]) == ["qv/s0/L2/rel=2", "qv/s0/LoRA/-", "qv/s1/LoRA/-"]
    assert merged["forgetting_evidence"]["qv"]["n_seeds"] == 2
    # the merge note gives each part's summed run time, not its last process's wall time
    took = [sum(r["seconds"] for r in json.loads((tmp_path / part / "results.json").read_text())["runs"]) / 60
            for part in ("a", "b")]
    assert f"merged from 2 parts run in parallel (their runs took {took[0]:.1f} min, {took[1]:.1f} min)" \
        in merged["notes"]
    assert (tmp_path / "m" / "summary.md").is_file() and (tmp_path / "m" / "pareto_nll.png").is_file()
    # the summary names every host and does not pass one process's wall time off as the total
    header = (tmp_path / "m" / "summary.md").read_text().splitlines()[2]
    assert "Device: AMD EPYC, Intel Xeon (cpu)" in header and "Ran in 2 processes" in header
    assert "Total wall time" not in header and "comparable only between runs of the same host" in header
    # so does the line under each plot
    from benchmarks.forgetting.report import plot_footnote, target_label

    assert "AMD EPYC, Intel Xeon (cpu)" in plot_footnote(merged)
    # and the plots' target axis names the task learned (tiny: basic_arithmetic), not gsm_symbolic's templates
    assert target_label(part_a, "tgt_nll") == "target NLL (basic_arithmetic, held-out items) ↓"
    assert target_label(part_a, "tgt_em") == "target exact match (basic_arithmetic, held-out items) ↑"
    gsm = forgetting.make_config("tiny", overrides={"target_task": "gsm_symbolic"})
    assert target_label(gsm, "tgt_nll") == "target NLL (gsm_symbolic, held-out templates) ↓"
    # a run repeated by two parts (plain LoRA, needed by each for its calibration) merges once if its
    # scores agree, and is a conflict if they do not
    again = forgetting.merge_results([tmp_path / "a", tmp_path / "a"], tmp_path / "m2")
    assert len(again["runs"]) == len(a["runs"])
    tampered = json.loads((tmp_path / "a" / "results.json").read_text())
    tampered["runs"][0]["metrics"]["tgt_nll"] += 0.1
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "results.json").write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="more than one part with different scores"):
        forgetting.merge_results([tmp_path / "a", tmp_path / "t"], tmp_path / "m4")

    other = forgetting.make_config("tiny", overrides={"methods": [{"method": "lora"}], "plain_seeds": [2],
                                                      "lr": 0.5})
    forgetting.run_benchmark(other, tmp_path / "c", "cpu", **quiet)
    with pytest.raises(ValueError, match="configs differ in \\['lr'\\]"):
        forgetting.merge_results([tmp_path / "a", tmp_path / "c"], tmp_path / "m3")


def test_setting_level_method_lists():
    """A setting's ``methods`` may list the families it runs (plus plain LoRA)."""
    cfg = forgetting.make_config("tiny", overrides={"settings": [
        {"name": "qv", "target_modules": ["q_proj", "v_proj"], "methods": ["L2"]}]})
    runs, _ = forgetting.expand_runs(cfg, None)
    assert {r["family"] for r in runs} == {"LoRA", "L2"}


def test_calibration_fits_only_the_structures_a_setting_runs(tmp_path):
    cfg = forgetting.make_config("tiny", overrides={"settings": [
        {"name": "qv", "target_modules": ["q_proj", "v_proj"], "methods": ["L2"]}]})
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, log=lambda *_: None)
    assert set(payload["calibration"]["qv/s0"]) == {"task_loss_last", "l2", "seconds"}
    assert not payload["curvature"]


def test_relative_strength_without_calibration_is_a_clear_error(tmp_path):
    cfg = forgetting.make_config("tiny", overrides={
        "methods": [{"method": "lora"}, {"method": "l2", "relative_strengths": [1.0]}], "plain_seeds": [1]})
    with pytest.raises(RuntimeError, match="relative strength needs the calibration of qv/s0"):
        forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, log=lambda *_: None)


def test_proxy_leak_checks():
    """A held-out text or an eval MCQ definition inside the drawn proxy texts is refused."""
    data = forgetting.Data(train_items=[], target_eval_items=[], text_eval={},
                           mcq_eval=[{"definition": "a long definition of something rather rare"}], mcq_proxy=[],
                           text_eval_texts={"wordnet": ["held-out sentence"]})
    forgetting.check_proxy_disjoint(data, ["an unrelated proxy text", "another one"])
    with pytest.raises(AssertionError, match="held-out texts are also proxy texts"):
        forgetting.check_proxy_disjoint(data, ["held-out sentence"])
    with pytest.raises(AssertionError, match="eval MCQ definitions"):
        forgetting.check_proxy_disjoint(data, ["word: a long definition of something rather rare; more"])


def test_baseline_grid_point_sets_its_learning_rate(tmp_path):
    """``{"lr": ...}`` in a baseline grid point trains with that rate and is not passed to the baseline."""
    if forgetting.try_baselines() is None:
        pytest.skip("benchmarks.baselines not importable")
    cfg = forgetting.make_config("tiny", overrides={
        "methods": [{"method": "baseline", "name": "milora", "grid": [{"lr": 0.5}, {}]}], "plain_seeds": []})
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, log=lambda *_: None)
    by_point = {r["point"]: r for r in payload["runs"]}
    assert by_point["lr=0.5"]["lr"] == 0.5 and by_point["default"]["lr"] == cfg.lr
    assert "lr" not in by_point["lr=0.5"]["info"]


def test_plain_lora_learning_rate_control(tmp_path):
    """``{"method": "lora", "lr": x}`` is its own family (an lr control), not the plain reference."""
    cfg = forgetting.make_config("tiny", overrides={"methods": [{"method": "lora"}, {"method": "lora", "lr": 0.5}]})
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, log=lambda *_: None)
    by_family = {r["family"]: r for r in payload["runs"]}
    assert set(by_family) == {"LoRA", "LoRA (lr=0.5)"}
    assert by_family["LoRA (lr=0.5)"]["lr"] == 0.5 and by_family["LoRA"]["lr"] == cfg.lr
    assert payload["forgetting_evidence"]["qv"]["n_seeds"] == 1
    assert list(payload["calibration"]) == ["qv/s0"]


def test_non_lora_baseline_trains_through_finetune(tmp_path):
    """OSF trains parameters that are not LoRA: the benchmark hands them to ``lalora_curv.finetune``
    (``params=``), the same loop as every other method."""
    if forgetting.try_baselines() is None:
        pytest.skip("benchmarks.baselines not importable")
    cfg = forgetting.make_config("tiny", overrides={
        "methods": [{"method": "baseline", "name": "osf", "grid": [{"trainable_rank": None}]}], "plain_seeds": []})
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, log=lambda *_: None)
    (run,) = payload["runs"]
    assert run["info"]["lora"] is False
    h = run["history"]
    assert h["steps"] == 2 and all(x > 0 for x in h["task_loss"]) and h["penalty_max"] == 0.0


def test_empirical_curvature_kind_fits(tmp_path):
    """``curvature_kind="empirical"`` fits LaLoRA's curvature (plain and on MiLoRA's init) without
    ``mc_samples``, which ``fit_curvature`` refuses outside kind="mc"."""
    methods = [{"method": "lora"}, {"method": "lalora", "structure": "diag", "strengths": [1.0]}]
    if forgetting.try_baselines() is not None:
        methods.append({"method": "lalora_on_init", "init": "milora", "structure": "kfac", "strengths": [1.0]})
    cfg = forgetting.make_config("tiny", overrides={"curvature_kind": "empirical", "methods": methods})
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, log=lambda *_: None)
    laplace = [r for r in payload["runs"] if r["method"] in ("lalora", "lalora_on_init")]
    assert len(laplace) == len(methods) - 1
    assert all(r["info"]["curvature_kind"] == "empirical" for r in laplace if r["method"] == "lalora")
    assert all(info["kind"] == "empirical" for info in payload["curvature"].values())


def test_teacher_forced_exact_match_agrees_with_generation(tmp_path):
    """``em_mode="teacher_forced"``: exact match of every run from the target pass, no generation; the
    check against real greedy generation after plain LoRA is recorded."""
    cfg = forgetting.make_config("tiny", overrides={"em_mode": "teacher_forced", "generate": "none",
                                                    "methods": [{"method": "lora"}]})
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, log=lambda *_: None)
    (run,) = payload["runs"]
    assert run["metrics"]["tgt_em"] is not None and run["metrics"]["eval_seconds"]["generate"] < 1.0
    assert len(run["items"]["tgt_gen"]["em"]) == len(run["items"]["tgt"]["tokens"])
    check = payload["data"]["em_check"]
    assert check["ok"] and check["agree"] == check["n_items"] == 2
    with pytest.raises(ValueError, match="em_mode must be"):
        forgetting.run_benchmark(forgetting.make_config("tiny", overrides={"em_mode": "parsed"}), tmp_path / "x",
                                 "cpu", progress=False, log=lambda *_: None)


def test_base_source_scores_are_reused_across_target_tasks(tmp_path):
    """The base model's source-set scores are cached apart from the target's: another target task on
    the same source data scores only its target sets and reuses the cached source items as stored."""
    import torch

    from benchmarks.forgetting.data import load_data
    from benchmarks.forgetting.evaluation import SOURCE_SETS, base_scores, source_cache_key
    from benchmarks.harness import load_base_model

    model, tok = load_base_model("tiny", device=torch.device("cpu"))
    cache = tmp_path / "cache.json"
    cfg = forgetting.make_config("tiny", overrides={"em_mode": "teacher_forced"})
    data = load_data(cfg, tok)
    first, cached = base_scores(model, tok, cfg, data, cache, False, torch.device("cpu"))
    assert not cached
    stored = json.loads(cache.read_text())
    key = f"{source_cache_key(cfg, data)}-cpu"
    assert set(stored[key]) == set(SOURCE_SETS)
    stored[key]["src_mcq"]["correct"] = [1] * len(stored[key]["src_mcq"]["correct"])  # a marker: reused, not rescored
    cache.write_text(json.dumps(stored))
    other = forgetting.make_config("tiny", overrides={"em_mode": "teacher_forced", "target_task": "chain_sum"})
    other_data = load_data(other, tok)
    assert source_cache_key(other, other_data) == source_cache_key(cfg, data)
    second, cached = base_scores(model, tok, other, other_data, cache, False, torch.device("cpu"))
    assert not cached and second["src_mcq_acc"] == 1.0
    assert second["items"]["tgt"] != first["items"]["tgt"]  # the new target was scored


def test_intruder_reduction_that_changes_nothing_takes_plain_loras_scores(tmp_path, monkeypatch):
    """peft's intruder reduction that finds no intruder dimension leaves the model bit for bit plain
    LoRA's: the run then records plain LoRA's scores (``scores_of``) instead of evaluating again; a
    reduction that changes a weight is evaluated."""
    pytest.importorskip("benchmarks.baselines")
    from benchmarks.baselines import BASELINES

    def config():
        cfg = forgetting.make_config("tiny")
        cfg.methods = [{"method": "lora"}, {"method": "baseline", "name": "intruders",
                                             "grid": [{"mitigation_lambda": 0.75}]}]
        return cfg

    evaluated = _count_evaluations(monkeypatch)
    monkeypatch.setattr(BASELINES["intruders"], "post_train", lambda model, hp: None)  # finds nothing
    payload = forgetting.run_benchmark(config(), tmp_path / "none", "cpu", progress=False, log=lambda *_: None)
    plain, intruders = payload["runs"]
    assert len(evaluated) == 1  # plain LoRA only
    assert intruders["info"]["scores_of"] == plain["id"]
    assert intruders["metrics"] == plain["metrics"] and intruders["items"] == plain["items"]

    def nudge(model, hp):  # a reduction that changes one LoRA weight
        import torch

        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)

    monkeypatch.setattr(BASELINES["intruders"], "post_train", nudge)
    evaluated.clear()
    payload = forgetting.run_benchmark(config(), tmp_path / "changed", "cpu", progress=False, log=lambda *_: None)
    plain, intruders = payload["runs"]
    assert len(evaluated) == 2 and "scores_of" not in intruders["info"]
    assert intruders["metrics"]["tgt_nll"] != plain["metrics"]["tgt_nll"]


def test_a_base_model_far_off_the_methods_range_is_a_line_not_a_star():
    """The base model's target NLL (2.9 beside methods at 0.55-0.7) would squash every curve into a
    sliver: far off on one axis it is drawn as a dashed line at its other value, labelled with the far one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.forgetting.report import _draw_base, far_from

    assert far_from(2.91, [0.55, 0.62, 0.70]) and not far_from(0.0, [0.32, 0.45]) and not far_from(1.0, [])
    fig, (far, near) = plt.subplots(1, 2)
    _draw_base(far, 2.91, 3.81, [0.55, 0.70], [3.85, 3.96])
    _draw_base(near, 0.0, 0.66, [0.32, 0.45], [0.65, 0.69])
    assert [line.get_label() for line in far.get_lines()] == ["base model (x = 2.91, off scale)"]
    assert far.get_lines()[0].get_ydata()[0] == 3.81 and not far.collections
    assert not near.get_lines() and [c.get_label() for c in near.collections] == ["base model"]
    plt.close(fig)
