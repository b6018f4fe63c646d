"""Smoke test of benchmarks/continual.py: tiny Llama, 2 tasks, 2 steps, 2 trained methods + smoothing."""

from __future__ import annotations

import copy
import json
import math

import pytest

continual = pytest.importorskip("benchmarks.continual")


def test_tiny_preset_end_to_end(tmp_path):
    cfg = continual.make_config("tiny")
    assert cfg.model == "tiny" and cfg.steps == 2 and len(cfg.tasks) == 2
    assert list(cfg.methods) == ["seq_lora", "filter_dlr", "filter_dlr+smooth"]
    payload = continual.run_benchmark(cfg, tmp_path, "cpu", log=lambda *_: None)
    assert payload["complete"] is True and payload["preset"] == "tiny"
    assert payload["device"] == "cpu"  # top level: what gpu_suite checks

    for name in ("tiny.json", "tiny.md", "tiny_summary.png", "tiny_heatmap_seq_lora.png",
                 "tiny_heatmap_filter_dlr.png", "tiny_heatmap_filter_dlr_smooth.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "tiny_summary.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["complete"] is True
    (prov,) = data["provenance"]  # one part: its commit, clean/dirty tree, versions, command, start/end
    assert prov["preset"] == "tiny" and prov["device"] == "cpu" and prov["started_utc"] <= prov["finished_utc"]
    for key in ("config", "machine", "tasks", "data", "methods", "calibration", "base", "matrices", "summary", "runs",
                "timing", "notes", "figures"):
        assert key in data, key
    T = 2
    assert data["tasks"] == ["basic_arithmetic", "chain_sum"]
    assert set(data["matrices"]) == {"seq_lora", "filter_dlr", "filter_dlr+smooth"}
    for m, M in data["matrices"].items():
        # rows = tasks 1..T, columns = base + after each task; source rows one value per column
        assert len(M["em"]) == T and all(len(r) == T + 1 for r in M["em"]), m
        assert len(M["nll"]) == T and all(len(r) == T + 1 for r in M["nll"]), m
        for k in ("mcq_acc", "mcq_nll", "src_text_nll"):
            assert len(M[k]) == T + 1, (m, k)
        assert all(0 <= v <= 1 for r in M["em"] for v in r)
        assert all(math.isfinite(v) and v > 0 for r in M["nll"] for v in r)
        # column 0 is the base model; column 1 the shared task-1 adapter for every trained method (the
        # smoother's column 1 is the smoothed task-1 adapter instead)
        assert M["nll"][0][0] == data["matrices"]["seq_lora"]["nll"][0][0]
        if m != "filter_dlr+smooth":
            assert M["nll"][0][1] == data["matrices"]["seq_lora"]["nll"][0][1]
        s = data["summary"][m]
        for k in ("avg_final_em", "avg_final_nll", "bwt_em", "bwt_nll", "task_aware_em", "src_text_nll_delta",
                  "mcq_acc_delta", "mcq_nll_delta"):
            assert s[k]["mean"] is not None, (m, k)
    # the smoother's last adapter is the filter's final one; learning metrics do not apply to it
    assert data["matrices"]["filter_dlr+smooth"]["nll"][1][-1] == data["matrices"]["filter_dlr"]["nll"][1][-1]
    assert data["summary"]["filter_dlr+smooth"]["plasticity_em"]["mean"] is None
    assert data["summary"]["filter_dlr"]["plasticity_nll_drop"]["mean"] is not None
    # calibration: the penalised method got a strength from plain LoRA's task-2 solution, and its
    # penalty was active during task 2
    cal = data["calibration"]
    assert cal["strength"]["filter_dlr"] > 0 and cal["process_noise"]["diag_lowrank"] > 0
    filt = next(r for r in data["runs"] if r["method"] == "filter_dlr")
    assert filt["histories"][1]["penalty_last"] > 0 and filt["sequence"]["dynamics"] == "noise"
    assert [h["steps"] for h in filt["histories"]] == [2, 2]
    smooth = next(r for r in data["runs"] if r["method"] == "filter_dlr+smooth")
    assert len(smooth["smoothing"]) == T - 1
    md = (tmp_path / "tiny.md").read_text()
    assert "## Summary" in md and "tiny_summary.png" in md and "filter_dlr+smooth" in md

    # parts split by method (each runs seq_lora first) merge into what the single run gave, keeping
    # every part's provenance; a disagreeing seq_lora run is refused
    from benchmarks.harness import write_json

    paths = []
    for methods, commit in ((["seq_lora", "filter_dlr"], "a" * 40), (["seq_lora", "filter_dlr+smooth"], "b" * 40)):
        part = copy.deepcopy(data)
        part["config"]["methods"] = methods
        part["runs"] = [r for r in part["runs"] if r["method"] in methods]
        part["provenance"][0]["commit"] = commit
        paths.append(write_json(tmp_path / commit[0] / "tiny.json", part).parent)
    merged = continual.merge_results(paths, name="tiny.json")
    assert merged["matrices"] == data["matrices"] and merged["summary"] == data["summary"]
    assert [p["commit"] for p in merged["provenance"]] == ["a" * 40, "b" * 40]
    bad = copy.deepcopy(data)
    bad["runs"][0]["columns"][1]["mcq_acc"] += 0.5
    write_json(tmp_path / "bad" / "tiny.json", bad)
    with pytest.raises(ValueError, match="more than one part with different scores"):
        continual.merge_results([paths[0], tmp_path / "bad"], name="tiny.json")


def test_method_order_and_metrics():
    cfg = continual.make_config("small")
    order = continual.trained_methods(cfg)
    assert order[0] == "seq_lora" and "filter_dlr+smooth" not in order and "filter_dlr" in order
    # a smoothing row pulls in its filter; penalised methods pull in seq_lora (calibration)
    cfg2 = continual.make_config("small", overrides={"methods": ["filter_diag+smooth"]})
    assert continual.trained_methods(cfg2) == ["seq_lora", "filter_diag"]
    with pytest.raises(ValueError):
        continual.make_config("small", overrides={"methods": ["nope"]})
    with pytest.raises(NotImplementedError):  # why filter_kfac_tridiag runs with identity dynamics
        from lalora_curv.continual import TaskSequence
        from lalora_curv.experiments.models import add_lora, tiny_llama

        TaskSequence(add_lora(tiny_llama(), r=2), "kfac_tridiag", dynamics="noise", process_noise=0.1)

    # metrics on a hand-made 2-task matrix: em[i][j], columns base / after 1 / after 2
    M = {"em": [[0.0, 0.5, 0.25], [0.0, 0.1, 0.6]], "nll": [[2.0, 1.0, 1.5], [2.0, 1.8, 0.8]],
         "mcq_acc": [0.5, 0.5, 0.4], "mcq_nll": [3.0, 3.0, 3.2], "src_text_nll": [3.0, 3.1, 3.3]}
    hist = [{"loss_mean": 1.0, "loss_last": 0.5, "penalty_task_ratio_last": 0.0, "penalty_task_ratio_mean": 0.0}] * 2
    s = continual.summary_metrics(M, {"histories": hist})
    assert s["avg_final_em"] == pytest.approx(0.425) and s["bwt_em"] == pytest.approx(-0.25)
    assert s["bwt_nll"] == pytest.approx(0.5) and s["plasticity_em"] == pytest.approx(0.6)
    assert s["plasticity_nll_drop"] == pytest.approx(1.0) and s["fwt_em"] == pytest.approx(0.1)
    assert s["task_aware_em"] == pytest.approx(0.55) and s["src_text_nll_delta"] == pytest.approx(0.3)
    assert s["mcq_acc_delta"] == pytest.approx(-0.1)


def test_cli_flags(capsys):
    from benchmarks.continual.__main__ import main

    assert main(["--list-presets"]) == 0
    assert {"small", "full", "tiny"} <= set(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exc:  # a mistyped setting is a usage error before anything runs
        main(["--preset", "tiny", "--set", "stepz=3"])
    assert exc.value.code == 2 and "stepz" in capsys.readouterr().err
