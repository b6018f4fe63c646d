"""``--reuse``: finished runs of another result stand in for identical runs, and only for those."""

from __future__ import annotations

import copy
import json

import pytest

forgetting = pytest.importorskip("benchmarks.forgetting")
from benchmarks.forgetting.reuse import run_fingerprint  # noqa: E402


def _tiny(methods, settings=None):
    cfg = forgetting.make_config("tiny")
    cfg.methods = methods
    if settings is not None:
        cfg.settings = settings
    return cfg


DONOR_METHODS = [{"method": "lora"}, {"method": "l2", "relative_strengths": [1.0]},
                 {"method": "lalora", "structure": "kfac", "relative_strengths": [1.0]}]
# the same runs as an ablation spells them: another setting name with the rank written out, the
# config's own proxy written out, plus runs the donor does not have
RANK_SETTING = [{"name": "qv-r2", "target_modules": ["q_proj", "v_proj"], "r": 2, "alpha": 4, "methods": "all"}]


def _quiet(*_):
    pass


def _by_id(payload):
    return {r["id"]: r for r in payload["runs"]}


@pytest.fixture(scope="module")
def donor(tmp_path_factory):
    out = tmp_path_factory.mktemp("donor")
    payload = forgetting.run_benchmark(_tiny(DONOR_METHODS), out, "cpu", progress=False, log=_quiet)
    return out, payload


def test_fingerprint_ignores_names_and_sees_content():
    cfg = _tiny(DONOR_METHODS)
    runs, _ = forgetting.expand_runs(cfg, None)
    plain = runs[0]
    renamed = _tiny(DONOR_METHODS, RANK_SETTING)
    plain_renamed = forgetting.expand_runs(renamed, None)[0][0]
    assert run_fingerprint(cfg, plain) == run_fingerprint(renamed, plain_renamed)
    for change in ({"steps": 3}, {"lr": 2e-2}, {"r": 4}, {"n_mcq": 6}, {"target_task": "chain_sum"},
                   {"prior_rel": 1e-2}, {"data_seed": 1}):
        other = copy.deepcopy(cfg)
        for k, v in change.items():
            setattr(other, k, v)
        assert run_fingerprint(other, plain) != run_fingerprint(cfg, plain), change
    assert run_fingerprint(cfg, {**plain, "seed": 1}) != run_fingerprint(cfg, plain)
    l2_1, l2_3 = ({**runs[1], "relative": rel, "point": f"rel={rel:g}"} for rel in (1.0, 3.0))
    assert run_fingerprint(cfg, l2_1) != run_fingerprint(cfg, l2_3)
    kfac = runs[2]
    assert run_fingerprint(cfg, {**kfac, "spec": {**kfac["spec"], "proxy_batches": cfg.proxy_batches}}) == \
        run_fingerprint(cfg, kfac)
    assert run_fingerprint(cfg, {**kfac, "spec": {**kfac["spec"], "proxy_batches": 2}}) != run_fingerprint(cfg, kfac)


def test_an_lr_control_is_the_plain_run_of_a_config_at_that_lr():
    """{"method": "lora", "lr": x} trains exactly as plain LoRA of a config whose lr is x (same steps,
    data, init), so either stands in for the other; at another lr neither does."""
    cfg = _tiny([{"method": "lora"}, {"method": "lora", "lr": 5e-3}])
    runs, _ = forgetting.expand_runs(cfg, None)
    plain, control = runs
    assert control["spec"] == {"method": "lora", "lr": 5e-3}
    at_control_lr = _tiny([{"method": "lora"}])
    at_control_lr.lr = 5e-3
    plain_there = forgetting.expand_runs(at_control_lr, None)[0][0]
    assert run_fingerprint(cfg, control) == run_fingerprint(at_control_lr, plain_there)
    assert run_fingerprint(cfg, control) != run_fingerprint(cfg, plain)
    assert run_fingerprint(cfg, {**control, "spec": {"method": "lora", "lr": 2e-3}}) != run_fingerprint(cfg, control)


def test_a_finished_record_has_the_fingerprint_of_its_run(donor):
    _, payload = donor
    cfg = _tiny(DONOR_METHODS)
    runs = {r["id"]: r for r in forgetting.expand_runs(cfg, None)[0]}
    for record in payload["runs"]:  # relative records also carry their resolved strength
        assert run_fingerprint(cfg, record) == run_fingerprint(cfg, runs[record["id"]]), record["id"]


def test_reuse_takes_identical_runs_and_runs_the_rest(donor, tmp_path):
    donor_dir, donor_payload = donor
    methods = [{"method": "lora"}, {"method": "l2", "relative_strengths": [1.0, 3.0]},
               {"method": "lalora", "structure": "kfac", "relative_strengths": [1.0], "proxy_batches": 1},
               {"method": "lalora", "structure": "kfac", "relative_strengths": [1.0], "proxy_batches": 2}]
    cfg = _tiny(methods, RANK_SETTING)
    assert cfg.proxy_batches == 1
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, reuse=[donor_dir], log=_quiet)
    runs, theirs = _by_id(payload), _by_id(donor_payload)
    reused = {i for i, r in runs.items() if "reused_from" in r}
    assert len(reused) == 3 and len(runs) == 5
    pairs = {"qv-r2/s0/LoRA/-": "qv/s0/LoRA/-", "qv-r2/s0/L2/rel=1": "qv/s0/L2/rel=1"}
    kfac_here = next(i for i in reused if "kfac" in i)
    pairs[kfac_here] = "qv/s0/LaLoRA-kfac/rel=1"
    assert set(pairs) == reused
    for here, there in pairs.items():
        assert runs[here]["reused_from"] == {"result": str(donor_dir), "id": there}
        assert runs[here]["metrics"] == theirs[there]["metrics"] and runs[here]["cost"] == theirs[there]["cost"]
        assert runs[here]["setting"] == "qv-r2"
    # plain LoRA did not train again: its calibration came along, and the new rel=3 point uses it
    assert payload["calibration"]["qv-r2/s0"] == donor_payload["calibration"]["qv/s0"]
    l2_3 = runs["qv-r2/s0/L2/rel=3"]
    assert "reused_from" not in l2_3
    assert l2_3["strength"] == pytest.approx(3 * donor_payload["calibration"]["qv/s0"]["l2"]["lam_ratio1"])
    assert l2_3["cost"]["calibration_plain_lora_run"] == theirs["qv/s0/LoRA/-"]["train_seconds"]
    assert donor_payload["provenance"][0] in payload["provenance"]
    assert any("reused from" in n for n in payload["notes"])
    assert payload["timing"]["base_eval_cached"] is True  # the donor's base-model cache came along
    # what was written resumes as it is (nothing trains again)
    written = json.loads((tmp_path / "results.json").read_text())
    again = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, resume=True, log=_quiet)
    assert again["runs"] == written["runs"]


def test_reuse_retrains_plain_lora_when_its_calibration_lacks_a_penalty(donor, tmp_path):
    donor_dir, donor_payload = donor
    cfg = _tiny(DONOR_METHODS + [{"method": "lalora", "structure": "diag", "relative_strengths": [1.0]}])
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, reuse=[donor_dir], log=_quiet)
    runs, theirs = _by_id(payload), _by_id(donor_payload)
    assert "diag" not in donor_payload["calibration"]["qv/s0"]
    # trained again to calibrate diag, with the donor's losses step for step: its record stands
    assert runs["qv/s0/LoRA/-"]["trained_again"] is True and "reused_from" in runs["qv/s0/LoRA/-"]
    assert {"l2", "kfac", "diag"} <= set(payload["calibration"]["qv/s0"])
    assert runs["qv/s0/L2/rel=1"]["reused_from"]["id"] == "qv/s0/L2/rel=1"
    for key in ("tgt_nll", "src_text_nll", "src_mcq_nll"):  # the same training, trained again
        assert runs["qv/s0/LoRA/-"]["metrics"][key] == pytest.approx(theirs["qv/s0/LoRA/-"]["metrics"][key], rel=1e-5)


def test_nothing_is_reused_across_a_different_training(donor, tmp_path):
    donor_dir, _ = donor
    cfg = _tiny(DONOR_METHODS)
    cfg.lr = 5e-3
    payload = forgetting.run_benchmark(cfg, tmp_path, "cpu", progress=False, reuse=[donor_dir], log=_quiet)
    assert not any("reused_from" in r for r in payload["runs"])
    assert not any("reused from" in n for n in payload["notes"])


def test_a_donor_with_other_base_scores_is_refused(donor, tmp_path):
    """Same fingerprint but different evaluation data behind it (here: a tampered donor) must stop
    the run rather than mix results measured against another base model."""
    donor_dir, _ = donor
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    payload = json.loads((donor_dir / "results.json").read_text())
    payload["base"]["src_mcq_nll_test"] += 0.5
    (tampered / "results.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="src_mcq_nll_test"):
        forgetting.run_benchmark(_tiny(DONOR_METHODS), tmp_path / "out", "cpu", progress=False, reuse=[tampered],
                                 log=_quiet)
