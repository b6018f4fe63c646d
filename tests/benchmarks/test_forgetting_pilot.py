"""Smoke test of benchmarks/forgetting/pilot.py: tiny Llama, one task, 2 steps, two learning rates."""

from __future__ import annotations

import json

import pytest

pilot = pytest.importorskip("benchmarks.forgetting.pilot")


def test_pilot_writes_base_and_per_lr_exact_match_with_provenance(tmp_path):
    pilot.main(["--model", "tiny", "--tasks", "chain_sum", "--steps", "2", "--lrs", "1e-3,2e-3", "--n-eval", "4",
                "--output-dir", str(tmp_path), "--name", "smoke"])
    data = json.loads((tmp_path / "smoke.json").read_text())
    (prov,) = data["provenance"]
    assert prov["preset"] == "pilot" and prov["started_utc"] <= prov["finished_utc"]
    task = data["tasks"]["chain_sum"]
    assert task["n_train"] == 16 and task["n_eval"] == 4 and task["config"]["max_digits"] == 2
    assert 0.0 <= task["base"]["em"] <= 1.0 and 0.0 <= task["const_em"] <= 1.0
    assert set(task["lora"]) == {"0.001", "0.002"}
    for run in task["lora"].values():
        assert run["steps"] == 2 and run["n"] == 4 and len(run["samples"]) == 4 and run["train_seconds"] > 0
    assert "| chain_sum |" in (tmp_path / "smoke.md").read_text()


def test_pilot_rejects_empty_lists():
    with pytest.raises(SystemExit):
        pilot.parse_args(["--lrs", ""])
