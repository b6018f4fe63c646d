"""Smoke test of the cost benchmark: its core measurement path on a tiny random Llama (no GGUF).

Checks that the JSON, markdown and PNG outputs are produced with the expected keys/sections; it
does not check any timing value (those depend on the machine).
"""

from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def _tiny_cfg():
    from benchmarks import cost

    cfg = copy.deepcopy(cost.PRESETS["tiny"])
    cfg["models"] = [m for m in cfg["models"] if m["key"] == "tiny"]
    cfg["seq_sweep"]["seqs"] = [8, 16]  # 16 = the main measurement, reused
    cfg["rank_sweep"]["ranks"] = [2, 4]  # 4 = the main rank, reused
    cfg["type2_max_classes"] = 0  # laplace-torch's exact type-2 paths: recorded as not attempted
    cfg["collect_garbage"] = False
    cfg["name"] = "smoke"
    return cfg


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import torch

    from benchmarks import cost

    out = tmp_path_factory.mktemp("cost")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster and immune to a busy machine's spin-waits
    try:
        result = cost.run_benchmark(_tiny_cfg(), device="cpu", dtype="float32", progress=False)
    finally:
        torch.set_num_threads(threads)
    paths = cost.write_outputs(result, out)
    return result, paths


def test_json_keys(smoke):
    result, paths = smoke
    data = json.loads(paths["json"].read_text())
    assert paths["json"].name == "smoke-cpu.json"
    for key in ("benchmark", "preset", "device", "dtype", "machine", "config", "targets", "models", "target_checks",
                "wall_s"):
        assert key in data, key
    assert {"torch", "transformers", "peft", "curvlinops-for-pytorch"} <= set(data["machine"]["versions"])
    (prov,) = data["provenance"]
    assert prov["preset"] == "smoke" and prov["device"] == "cpu" and len(prov["commit"]) == 40
    assert data["machine"]["device_name"]
    (m,) = data["models"]
    for key in ("label", "config", "lora", "batch", "baseline", "fits", "curvlinops", "laplace_torch", "backpack",
                "penalty", "seq_sweep", "rank_sweep"):
        assert key in m, key
    assert "random weights" in m["label"]
    for key in ("median_s", "per_batch_s", "peak_delta_bytes", "times_s", "spread_s", "iqr_s"):
        assert key in m["baseline"]["fwd_bwd"], key
        assert key in m["baseline"]["lora_step"], key
    fits = {(f["structure"], f["kind"]): f for f in m["fits"]}
    assert set(fits) == {("diag", "empirical"), ("kfac", "empirical"), ("kfac", "mc"), ("kfac_tridiag", "empirical"),
                         ("kfac_delta_w", "empirical"), ("diag_lowrank", "empirical")}
    for f in fits.values():
        assert f["ok"], f.get("error")
        for key in ("per_batch_s", "ratio_fwd_bwd", "paired_ratio", "nbytes", "peak_delta_bytes", "info"):
            assert key in f, key
    cl = m["curvlinops"]
    assert cl["kfac"]["ok"], cl["kfac"].get("error")
    for key in ("factor_bytes", "factor_dtype", "per_batch_s", "ratio_fwd_bwd"):
        assert key in cl["kfac"], key
    for key in ("time_ours_over_theirs", "memory_ours_over_theirs", "state_bytes_ours", "state_bytes_theirs"):
        assert key in cl["ours_vs_curvlinops_kfac"], key
    assert "ok" in cl["ggn_matvec"]
    assert {e["config"].split(" ")[0] for e in m["laplace_torch"]} == {"kron/CurvlinopsEF", "kron/CurvlinopsGGN",
                                                                        "diag/CurvlinopsEF", "kron/BackPackEF",
                                                                        "diag/CurvlinopsGGN"}
    for e in m["laplace_torch"]:  # each either ran, failed with its error, or says why it was not attempted
        assert e["ok"] or e.get("error") or e.get("reason")
    bp = m["backpack"]
    assert "ok" in bp["extend_converter_kfac"]
    assert bp["extend_converter_kfac"]["ok"] or bp["extend_converter_kfac"]["error"]
    assert bp["diag_batchgrad"]["backend"] == "backpack"
    pens = {p["structure"]: p for p in m["penalty"]}
    assert set(pens) == {"diag", "kfac", "kfac_tridiag", "kfac_delta_w", "diag_lowrank"}
    for p in pens.values():
        assert p["ok"], p.get("error")
        for key in ("penalty_s", "penalty_pct_of_step", "step_with_penalty_s", "step_overhead_pct"):
            assert key in p, key
    assert [p["seq_len"] for p in m["seq_sweep"]["points"]] == [8, 16]
    assert [p["r"] for p in m["rank_sweep"]["points"]] == [2, 4]
    assert {c["target"] for c in data["target_checks"]} == {"fit_ratio", "faster_than_curvlinops", "kfac_memory",
                                                          "penalty"}
    for c in data["target_checks"]:
        assert {"value", "threshold", "holds", "conditions"} <= set(c)


def test_markdown_sections(smoke):
    _, paths = smoke
    md = paths["md"].read_text()
    for text in ("# Cost benchmark", "| method |", "curvlinops KFAC", "laplace-torch", "BackPACK",
                 "Penalty per LoRA step", "Sequence-length sweep", "LoRA-rank sweep", "## Width", "## Targets"):
        assert text in md, text


def test_pngs(smoke):
    _, paths = smoke
    for name in ("fit_ratio", "memory", "cost_vs_tokens", "cost_vs_rank", "penalty_overhead", "width"):
        png = paths[name]
        assert png.suffix == ".png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000


def test_cli_parses_presets():
    from benchmarks import cost

    assert {"small", "full", "tiny"} <= set(cost.PRESETS)
    full = cost.PRESETS["full"]
    assert full["device"] == "cuda" and full["dtype"] == "bfloat16"
    assert all(m["source"] != "gguf" for m in full["models"])  # the GPU machine cannot load the GGUF
    assert all(m["batch"] == 4 and m["seq"] == 512 for m in full["models"])


def test_merge_parts_keeps_each_parts_provenance(smoke, tmp_path):
    """Parts split by model (``--models``) merge into one result with every part's provenance."""
    from benchmarks import cost
    from benchmarks.harness import write_json

    result, _ = smoke
    parts = []
    for i, commit in enumerate(("a" * 40, "b" * 40)):
        part = copy.deepcopy(result)
        part["models"] = [result["models"][0]] if i == 0 else [dict(result["models"][0], key="other")]
        part["config"]["models"] = [result["config"]["models"][0]]
        part["provenance"][0]["commit"] = commit
        parts.append(write_json(tmp_path / f"p{i}" / "smoke-cpu.json", part).parent)
    merged = cost.merge_results(parts)
    assert [m["key"] for m in merged["models"]] == ["tiny", "other"]
    assert [p["commit"] for p in merged["provenance"]] == ["a" * 40, "b" * 40]
    assert merged["wall_s"] == pytest.approx(2 * result["wall_s"])
    assert {c["model"] for c in merged["target_checks"]} >= {c["model"] for c in result["target_checks"]}
    from benchmarks.cost.report import render_markdown

    assert "# Cost benchmark" in render_markdown(merged)
    with pytest.raises(ValueError, match="more than one part"):
        cost.merge_results([parts[0], parts[0]])


def test_cli_list_presets_and_bad_set(capsys):
    from benchmarks.cost.__main__ import main

    assert main(["--list-presets"]) == 0
    assert "tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tiny", "--set", "seq_sweep.seqz=[8]"])
    assert exc.value.code == 2 and "seqz" in capsys.readouterr().err
