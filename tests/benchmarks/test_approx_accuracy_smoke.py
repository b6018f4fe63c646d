"""Smoke test of benchmarks/approx_accuracy.py: the whole pipeline on a tiny random Llama, in seconds.

Checks the structure of the result (keys, rows, files), never the numbers: those are the
benchmark's business (benchmarks/results/approx_accuracy/).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks.approx_accuracy import config, dense, inputs, references, report, run  # noqa: E402
from benchmarks.harness import fit_options_for

MC1 = {"kind": "mc", "mc_samples": 1}
EMP = {"kind": "empirical"}


def _smoke_config() -> dict:
    """The "tiny" preset cut down to one combo and a few fits per part (every part still runs)."""
    cfg = copy.deepcopy(config.PRESETS["tiny"])
    cfg.update(
        combos=[["qv", "bnz"]], fits=[MC1, EMP], auto_ggn=False, n_random=1,
        proxy=dict(batch_size=2, seq_len=8, num_batches=1),
        target=dict(task="basic_arithmetic", n_items=2, batch_size=2, seq_len=64, grad_batches=1),
        source_grad=dict(batch_size=1, seq_len=8, num_batches=1),
        finetune=dict(steps=1, lr=1e-2),
        delta_w=dict(combos=[["qv", "bnz"]], fits=[EMP], ref_chunk=8),
        kfac_memory=dict(combos=[["qv", "bnz"]]),
        terms=dict(combos=[["qv", "bnz"]], batch_size=1, seq_len=6, num_batches=1, structures=["diag"], fits=[EMP]),
        dense=dict(module="layers.1.self_attn.v_proj", settings=["bnz"], batch_size=1, seq_len=6, num_batches=1,
                   seq_fits=[MC1], token_fits=[EMP], structures=["dense", "diag", "kfac", "kfac_tridiag"], k=2,
                   n_random=2, jvp_chunk=64, check_vectors=1),
        stabilization=dict(combo=["qv", "bnz"], num_batches=[1, 2], structures=["diag", "kfac"], fits=[MC1]),
    )
    cfg["preset"] = "smoke"
    return cfg


@pytest.fixture(scope="module")
def smoke_result():
    torch.manual_seed(0)
    return run.run_benchmark(_smoke_config(), device="cpu", progress=False)


def test_result_keys(smoke_result):
    r = smoke_result
    for key in ("benchmark", "preset", "machine", "config", "model", "combos", "crosscheck", "qf", "delta_w",
                "delta_w_reference", "terms", "kfac_memory", "stabilization", "dense_layer", "skipped", "timings",
                "notes"):
        assert key in r, key
    assert r["benchmark"] == "approx_accuracy" and r["device"] == "cpu"  # top level: what gpu_suite checks
    assert {"device", "versions", "timestamp_utc"} <= set(r["machine"])
    (prov,) = r["provenance"]
    assert prov["preset"] == "smoke" and prov["device"] == "cpu" and len(prov["commit"]) == 40
    assert "torch" in r["machine"]["versions"]
    assert list(r["combos"]) == ["qv/bnz"]
    combo = r["combos"]["qv/bnz"]
    assert {"setting", "label", "lora_numel", "directions", "reference", "delta_w_rel_norm"} <= set(combo)
    assert {"q_ggn", "q_ef", "per_batch_q_ggn", "per_batch_q_ef", "seconds_per_batch_jvp"} <= set(combo["reference"])
    assert {c["space"] for c in r["crosscheck"]} == {"theta", "delta_w"}
    for c in r["crosscheck"]:
        assert {"ggn_max_rel_diff", "ef_max_rel_diff", "ggn_seconds_per_batch_matvec"} <= set(c)


def test_qf_rows(smoke_result):
    rows = smoke_result["qf"]
    structures = {row["structure"] for row in rows}
    assert set(config.STRUCTURES) <= structures
    assert "exact EF (token)" in structures
    for row in rows:
        assert {"combo", "setting", "reference", "structure", "kind", "label", "directions", "summary"} <= set(row)
        assert row["reference"] in ("ggn", "ef")
        assert set(config.DIRECTION_TYPES) <= set(row["summary"])
        for d in row["directions"].values():
            assert {"q", "q_ref", "rel_err"} <= set(d)
    fitted = [row for row in rows if row["structure"] in config.STRUCTURES]
    assert all({"nbytes", "fit_seconds", "terms"} <= set(row) for row in fitted)


def test_other_parts(smoke_result):
    r = smoke_result
    assert {row["structure"] for row in r["delta_w"]} == {"kfac_delta_w", "exact EF (token)"}
    assert {"num_params", "q_ggn", "q_ef"} <= set(r["delta_w_reference"]["qv/bnz"])
    assert {row["terms"] for row in r["terms"]} == {"sequence", "token"}
    variants = {row["variant"] for row in r["kfac_memory"]}
    assert any("unshared" in v for v in variants) and any("bf16" in v for v in variants)
    for row in r["kfac_memory"]:
        assert {"nbytes", "nbytes_vs_default", "max_abs_rel_diff_vs_default", "vs_exact_ef"} <= set(row)
    st = r["stabilization"]
    assert st["num_batches"] == [1, 2]
    for curve in st["curves"]:
        assert {"label", "reference", "vs_union", "vs_full_fit"} <= set(curve)
        assert len(curve["vs_union"]) == 2
    dense = r["dense_layer"]
    setting = dense["settings"]["bnz"]
    assert {"num_params", "ggn_seconds", "check_vs_curvlinops_max_rel_diff", "rows"} <= set(setting)
    for row in setting["rows"]:
        assert {"label", "reference", "rel_frobenius", "rel_frobenius_AA", "rel_frobenius_BB", "rel_frobenius_AB",
                "topk_overlap", "qf_random_median_signed_rel_err"} <= set(row)
    assert any(row["label"].startswith("oracle") for row in setting["rows"])


def test_outputs_written(smoke_result, tmp_path):
    paths = report.write_outputs(smoke_result, tmp_path)
    assert {"json", "md", "qf", "stab", "dense"} <= set(paths)
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    data = json.loads(paths["json"].read_text())
    assert data["preset"] == "smoke" and data["qf"]
    md = paths["md"].read_text()
    assert "## Quadratic forms" in md and "## One layer, dense" in md and "## Stabilization" in md


def test_exact_dense_ggn_matches_curvlinops():
    """The dense one-layer reference (J_u^T W^T H W J_u) and the JVP quadratic forms equal curvlinops'
    GGN matvecs."""
    cfg = _smoke_config()
    base, tok = inputs.load_base(cfg, torch.device("cpu"))
    model, lora, _ = inputs.make_lora_model(base, cfg, [cfg["dense"]["module"]], "bnz")
    batches = inputs.packed_batches(tok, cfg, "proxy", 1, 6, 1, 0)
    G = dense.exact_dense_ggn(model, lora, batches, jvp_chunk=32).double()
    V = torch.randn(lora.numel, 2, generator=torch.Generator().manual_seed(0))
    q_matvec = references.matvec_forms(model, lora.params, batches, V, "ggn", 2)[0]
    q_jvp = references.reference_forms(model, lora.params, batches, V, 2)["ggn"][0]
    q = (V.double() * (G @ V.double())).sum(0)
    torch.testing.assert_close(q, q_matvec, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(q_jvp, q_matvec, rtol=1e-4, atol=1e-10)


def test_derived_views_equal_separate_fits():
    """diag / lowrank read off one diag_lowrank fit equal the separate fits (same vectors, same draws)."""
    import lalora_curv as lc

    cfg = _smoke_config()
    base, tok = inputs.load_base(cfg, torch.device("cpu"))
    model, lora, _ = inputs.make_lora_model(base, cfg, ["q_proj", "v_proj"], "bnz")
    batches = inputs.packed_batches(tok, cfg, "proxy", 2, 8, 1, 0)
    views = references.fit_structures(model, lora, batches, ["diag", "lowrank"], MC1, cfg)
    for structure in ("diag", "lowrank"):
        options = fit_options_for(structure, "mc", mc_samples=1, rank=cfg["rank"], seed=cfg["seed"])
        separate = lc.fit_curvature(model, batches, structure=structure, kind="mc", lora=lora, progress=False,
                                    **options)
        torch.testing.assert_close(views[structure][0].to_dense(), separate.to_dense(), rtol=1e-4, atol=1e-7)


def test_every_smoke_fit_ran(smoke_result):
    """The benchmark records a failing fit under "skipped" and goes on; every fit of the smoke
    config is valid (e.g. no option its structure refuses), so none may be skipped."""
    assert smoke_result["skipped"] == []


def test_merge_parts(smoke_result, tmp_path):
    """Parts run separately (``--parts qf`` / ``--parts dense``) merge into one result with every
    part's provenance; a part present twice is refused."""
    from benchmarks.harness import to_jsonable, write_json

    full = to_jsonable(smoke_result)  # what a result file holds
    qf = copy.deepcopy(full)
    qf.update(parts=["qf"], dense_layer=None)
    qf["provenance"][0]["commit"] = "a" * 40
    dn = copy.deepcopy(full)
    dn.update(parts=["dense"], qf=[], crosscheck=[], delta_w=[], terms=[], kfac_memory=[], stabilization=None)
    dn["provenance"][0]["commit"] = "b" * 40
    paths = [write_json(tmp_path / name / "smoke-cpu.json", part).parent for name, part in (("q", qf), ("d", dn))]
    merged = run.merge_results(paths)
    assert merged["parts"] == ["qf", "dense"]
    assert merged["qf"] == full["qf"] and merged["dense_layer"] == full["dense_layer"]
    assert merged["stabilization"] == full["stabilization"]
    assert [p["commit"] for p in merged["provenance"]] == ["a" * 40, "b" * 40]
    with pytest.raises(ValueError, match="more than one"):
        run.merge_results([paths[0], paths[0]])
