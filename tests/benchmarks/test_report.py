"""``python -m benchmarks.report --check``: the committed pages agree with the committed JSON, and a
page whose table was edited by hand (or whose JSON changed) fails the check with a diff."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import PAGES, check_pages, render_pages
from benchmarks.report.markers import find_blocks, replace_blocks

ROOT = Path(__file__).resolve().parents[2]


def test_committed_pages_match_the_json():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "matches the committed JSON" in proc.stdout


def test_every_page_has_blocks():
    for page in PAGES:
        assert find_blocks((ROOT / page).read_text(), where=page), f"{page} has no report block"


def _copy_repo_pages(tmp_path: Path) -> Path:
    for page in PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    return tmp_path


def test_a_hand_edited_number_fails_the_check(tmp_path):
    root = _copy_repo_pages(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    assert "| 1.176 ± 0.037 |" in text  # plain LoRA's target NLL on q,v, rendered from the JSON
    readme.write_text(text.replace("| 1.176 ± 0.037 |", "| 1.150 ± 0.037 |", 1))
    diffs = check_pages(root)
    assert len(diffs) == 1 and "forgetting-headline" in diffs[0] and "1.150" in diffs[0] and "1.176" in diffs[0]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", "--check", "--root", str(root)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "README.md [forgetting-headline]" in proc.stderr
    # rendering repairs the page, then the check passes
    assert render_pages(root) == ["README.md"]
    assert check_pages(root) == []


def test_changed_json_fails_the_check(tmp_path):
    import json

    root = _copy_repo_pages(tmp_path)
    path = root / "benchmarks/results/cost/small-cpu.json"
    payload = json.loads(path.read_text())
    payload["models"][0]["fits"][0]["paired_ratio"] = 9.99
    path.write_text(json.dumps(payload))
    diffs = check_pages(root)
    blocks = {d.splitlines()[0].split("[")[1].split("]")[0] for d in diffs}
    assert blocks == {"cost-headline", "cost-methods", "cost-width"}


def test_markers_replace_only_their_body_and_reject_an_unclosed_block():
    text = "a\n<!-- report:x -->\nold\n<!-- /report:x -->\nb\n<!-- report:y (no committed JSON yet) -->\n"
    assert replace_blocks(text, lambda name: f"new {name}") == (
        "a\n<!-- report:x -->\nnew x\n<!-- /report:x -->\nb\n<!-- report:y (no committed JSON yet) -->\n")
    with pytest.raises(ValueError, match="report:z"):
        find_blocks("<!-- report:z -->\nbody\n", where="p.md")


def test_unknown_block_name_is_an_error(tmp_path):
    root = _copy_repo_pages(tmp_path)
    (root / "README.md").write_text("<!-- report:nonesuch -->\n<!-- /report:nonesuch -->\n")
    with pytest.raises(KeyError, match="nonesuch"):
        check_pages(root)


def test_demo_placeholder_is_rendered_once_its_json_is_committed(tmp_path):
    import json
    import re

    root = _copy_repo_pages(tmp_path)
    readme = root / "README.md"
    # the state before a demo JSON was committed: a placeholder over a hand-written table
    hand = ("<!-- report:demo (no committed JSON yet) -->\n| model | x |\n|---|---|\n"
            "| LaLoRA (kfac, λ=210, prior 1e-3) | 1 |\n")
    text, n = re.subn(r"<!-- report:demo -->\n.*?<!-- /report:demo -->\n", lambda _: hand, readme.read_text(),
                      flags=re.DOTALL)
    assert n == 1
    readme.write_text(text)
    demo = root / "benchmarks/results/demo/demo.json"
    demo.unlink()
    assert check_pages(root) == []  # no demo JSON: the hand table stays, the check passes
    rows = {"base model": {"source_nll": 3.25, "mcq_accuracy": 0.5, "target_nll": 1.5},
            "LoRA": {"source_nll": 3.3, "mcq_accuracy": 0.25, "target_nll": 1.25}}
    demo.write_text(json.dumps({"rows": rows, "lam": 210.0, "lam_source": "--lam", "structure": "kfac",
                                "model_note": "test", "seconds": 3.0}))
    diffs = check_pages(root)
    assert len(diffs) == 1 and "[demo]" in diffs[0] and "placeholder" in diffs[0]
    assert render_pages(root) == ["README.md"]
    text = readme.read_text()
    assert "<!-- report:demo -->" in text and "<!-- /report:demo -->" in text
    assert "| LoRA | 3.3000 | 25.0 % | 1.2500 |" in text
    assert "| LaLoRA (kfac, λ=210, prior 1e-3) |" not in text  # the hand table is gone
    assert check_pages(root) == []


def test_an_intruder_reduction_that_found_nothing_is_labelled_as_the_plain_model():
    from benchmarks.report.paired_blocks import _unchanged_note

    def run(seed, intruders):
        return {"setting": "qv", "family": "intruders", "point": "mitigation_lambda=0.75", "seed": seed,
                "info": {"intruder_report": {"intruders": intruders, "layers": 60}}}

    plain = {"setting": "qv", "family": "LoRA", "point": "-", "seed": 0, "info": {}}
    none_found = {"runs": [plain, run(0, 0), run(1, 0)]}
    assert "plain LoRA model" in _unchanged_note(none_found, "qv", "intruders", "mitigation_lambda=0.75")
    assert _unchanged_note(none_found, "qv", "LoRA", "-") == ""
    some_found = {"runs": [plain, run(0, 0), run(1, 3)]}  # one seed changed the model: no such label
    assert _unchanged_note(some_found, "qv", "intruders", "mitigation_lambda=0.75") == ""


def test_verdicts_say_in_words_what_the_paired_intervals_show(tmp_path):
    """Each method's line names its paired intervals and the verdict they imply; a LaLoRA row is
    also compared with L2; plain LoRA is the reference, not a line."""
    import json

    from benchmarks.report.paired_blocks import forgetting_verdicts

    def diff(mean, lo, hi, n=3):
        return {"mean": mean, "lo": lo, "hi": hi, "n_seeds": n, "significant": lo > 0 or hi < 0}

    def row(family, point, paired):
        return {"family": family, "point": point, "within_tolerance": True, "paired": paired}

    nll = [row("LoRA", "-", {}),
           row("L2", "rel=1", {"LoRA": {"src_text_nll": diff(-0.01, -0.03, 0.01), "tgt_nll": diff(0.0, -0.1, 0.1)}}),
           row("LaLoRA-kfac", "rel=1", {"LoRA": {"src_text_nll": diff(-0.08, -0.10, -0.06),
                                                  "tgt_nll": diff(0.01, -0.02, 0.04)},
                                         "L2": {"src_text_nll": diff(-0.07, -0.09, -0.05),
                                                "tgt_nll": diff(0.05, 0.02, 0.08)}})]
    acc = [row("LaLoRA-diag", "rel=3", {"LoRA": {"src_mcq_acc": diff(-0.02, -0.03, -0.01, 1),
                                                 "tgt_em": diff(0.05, 0.01, 0.09, 1)}})]
    payload = {"benchmark": "forgetting", "selection": "validation (chosen) / test (reported)", "runs": [],
               "tables": {"qv": {"nll": nll, "acc": acc, "mcq_nll": []}}}
    path = "results.json"
    (tmp_path / path).write_text(json.dumps(payload))
    text = forgetting_verdicts(tmp_path, path, "qv")
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(lines) == 3 and not any(": LoRA" in line for line in lines)
    diag, l2, kfac = lines  # the tables' order: acc, then nll
    assert "vs LoRA (1 seed) it **trades source for target**" in diag and "-2.0 [-3.0, -1.0]" in diag
    assert "vs LoRA (3 seeds) it **does not win**" in l2 and "vs L2" not in l2
    assert "vs LoRA (3 seeds) it **wins**: source **-0.080 [-0.100, -0.060]** (better)" in kfac
    assert "vs L2 (3 seeds) it **trades target for source**" in kfac and "(worse)" in kfac


def test_lr_controls_name_the_best_lr_on_validation_and_whether_it_is_the_main_one(tmp_path):
    import json

    from benchmarks.report.paired_blocks import forgetting_lr_controls

    def point(family, em_val, nll_val, seeds=(0, 1, 2)):
        return {"setting": "qv", "family": family, "point": "-", "seeds": list(seeds), "tgt_em_val": em_val,
                "tgt_nll_val": nll_val, "tgt_em_test": em_val, "src_mcq_acc_test": 0.66, "src_text_nll_test": 3.9}

    def render(points):
        payload = {"benchmark": "forgetting", "config": {"lr": 0.002}, "points": points}
        (tmp_path / "results.json").write_text(json.dumps(payload))
        return forgetting_lr_controls(tmp_path, "results.json", "qv")

    tuned = render([point("LoRA", 0.40, 0.60), point("LoRA (lr=0.004)", 0.40, 0.65),
                    point("LoRA (lr=0.001)", 0.3, 0.7)])  # a tie on exact match goes to the lower NLL
    assert "best on validation: lr 0.002, the main lr" in tuned
    rows = [line for line in tuned.splitlines() if line.startswith("| 0.")]
    assert [r.split(" |")[0] for r in rows] == ["| 0.001", "| 0.002 (main)", "| 0.004"]  # by lr
    untuned = render([point("LoRA", 0.40, 0.60), point("LoRA (lr=0.004)", 0.45, 0.70, seeds=(0, 1))])
    assert "best on validation: lr 0.004, **not the main lr 0.002**" in untuned
    assert "different numbers of seeds" in untuned
    assert "has not run yet" in render([point("LoRA", 0.40, 0.60), point("L2", 0.5, 0.5)])


def test_the_cost_column_is_dropped_when_the_runs_ran_on_hosts_of_different_speed(tmp_path):
    import json

    from benchmarks.report.paired_blocks import forgetting_paired

    row = {"family": "LoRA", "point": "-", "within_tolerance": True, "paired": {}, "target": 0.5,
           "target_sd": None, "source": 3.9, "source_sd": None, "cost_seconds": 456.0, "seeds": 1}
    payload = {"benchmark": "forgetting", "preset": "main", "device": "cpu", "runs": [],
               "selection": "validation (chosen) / test (reported)", "base": {},
               "config": {"settings": [{"name": "qv", "target_modules": ["q_proj", "v_proj"]}], "r": 8, "lr": 1e-3,
                          "steps": 60, "target_task": "chain_sum", "curvature_kind": "mc"},
               "tables": {"qv": {"nll": [row]}}, "provenance": [{"device_name": "AMD EPYC"}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(payload))
    one_host = forgetting_paired(tmp_path, "results.json", "qv", "nll")
    assert "| cost (s) |" in one_host and "| 456 |" in one_host and "No cost column" not in one_host
    # a result without L2 (kfac_gap) shows no empty "vs L2" columns and says why
    assert "vs L2" not in one_host and "No L2 in this result: differences to plain LoRA only." in one_host
    payload["provenance"] += [{"device_name": "AMD EPYC"}, {"device_name": "Intel Xeon"}]
    path.write_text(json.dumps(payload))
    two_hosts = forgetting_paired(tmp_path, "results.json", "qv", "nll")
    assert "cost (s)" not in two_hosts and "456" not in two_hosts
    assert "No cost column: the runs ran on 2 hosts of different speed (AMD EPYC, Intel Xeon)" in two_hosts
    header, rule, *rows = [line for line in two_hosts.splitlines() if line.startswith("|")]
    assert header.count("|") == rule.count("|") == rows[0].count("|")  # the table stays rectangular


def test_gap_table_pairs_each_remedy_with_kfac_and_diag_at_its_own_strength(tmp_path):
    """kfac_gap: a remedy's row holds its paired differences to LaLoRA-kfac and to LaLoRA-diag at the same
    rel, equal to the per-seed differences of the test-half scores; diag (the target) has no row."""
    import json

    from benchmarks.report.paired_blocks import forgetting_gap

    splits = {"src_text_wordnet": {"val": [0], "test": [1, 2]}, "src_text_pydoc": {"val": [0], "test": [1, 2]},
              "tgt": {"val": [0], "test": [1, 2]}, "tgt_gen": {"val": [0], "test": [1, 2]}}

    def items(text_nll, tgt_nll, em):  # every test item scores the same, so each half's metric is that value
        text = {"nll_sum": [9.0, text_nll, text_nll], "tokens": [1, 1, 1]}
        return {"src_text_wordnet": text, "src_text_pydoc": text,
                "tgt": {"nll_sum": [9.0, tgt_nll, tgt_nll], "tokens": [1, 1, 1]}, "tgt_gen": {"em": [0, em, em]}}

    scores = {("LoRA", "-"): (4.0, 0.60, 0.4), ("LaLoRA-kfac", "rel=1"): (3.90, 0.58, 0.5),
              ("LaLoRA-diag", "rel=1"): (3.85, 0.62, 0.4), ("LaLoRA-kfac refit@10", "rel=1"): (3.80, 0.63, 0.5),
              ("LaLoRA-kfac refit@10", "rel=3"): (3.70, 0.70, 0.0),  # rel=3 has no reference: dashes
              ("LaLoRA-kfac_delta_w", "rel=1"): (3.84, 0.58, 0.5), ("LaLoRA-kfac@milora", "rel=1"): (3.88, 0.58, 0.5)}
    runs = [{"setting": "qv", "family": f, "point": pt, "seed": seed, "items": items(t + 0.01 * seed, n, e)}
            for (f, pt), (t, n, e) in scores.items() for seed in (0, 1)]
    points = [{"setting": "qv", "family": f, "point": pt, "seeds": [0, 1]} for f, pt in scores]
    payload = {"benchmark": "forgetting", "selection": "validation (chosen) / test (reported)",
               "data": {"splits": splits}, "points": points, "runs": runs}
    (tmp_path / "results.json").write_text(json.dumps(payload))
    text = forgetting_gap(tmp_path, "results.json")
    header, _, *rows = [line for line in text.splitlines() if line.startswith("|")]
    assert header.startswith("| method (point) | Δ text NLL vs LaLoRA-kfac |") and "vs LaLoRA-diag" in header
    labels = [r.split(" | ")[0] for r in rows]
    assert labels == ["| LaLoRA-kfac (rel=1)", "| LaLoRA-kfac refit@10 (rel=1)", "| LaLoRA-kfac refit@10 (rel=3)",
                      "| LaLoRA-kfac_delta_w (rel=1)", "| LaLoRA-kfac@milora (rel=1)"]
    kfac, refit1, refit3 = (r.split(" | ")[1:-1] for r in rows[:3])
    assert kfac[:3] == ["-", "-", "-"]  # not compared with itself
    assert kfac[3:] == ["**+0.050 [+0.050, +0.050]**", "**-0.040 [-0.040, -0.040]**", "**+10.0 [+10.0, +10.0]**"]
    assert refit1 == ["**-0.100 [-0.100, -0.100]**", "**+0.050 [+0.050, +0.050]**", "+0.0 [+0.0, +0.0]",
                      "**-0.050 [-0.050, -0.050]**", "**+0.010 [+0.010, +0.010]**", "**+10.0 [+10.0, +10.0]**"]
    assert refit3 == ["-"] * 6
    # in words, from the same intervals
    words = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("- ")}
    assert words["- LaLoRA-kfac (rel=1)"].startswith(
        "the gap: against LaLoRA-diag it **trades source for target** (held-out text NLL worse, target NLL better)")
    assert words["- LaLoRA-kfac refit@10 (rel=1)"].startswith("**trades target for source** against LaLoRA-kfac")
    assert words["- LaLoRA-kfac_delta_w (rel=1)"].startswith(
        "**closes the gap** (against LaLoRA-kfac, held-out text NLL better, target NLL no significant difference; "
        "against LaLoRA-diag, held-out text NLL better, target NLL better)")
    assert words["- LaLoRA-kfac@milora (rel=1)"].startswith("**narrows the gap**")
    assert "- LaLoRA-kfac refit@10 (rel=3)" not in words  # nothing to compare with


def test_transfer_table_reads_each_domain_in_domain_against_transfer(tmp_path):
    """ablation_proxy_text: per domain, the curvature from that domain's text minus the one from the other
    domain's, on that domain's held-out text NLL, equal to the per-seed differences, with words that
    follow the interval's sign."""
    import json

    from benchmarks.report.paired_blocks import forgetting_transfer

    half = {"val": [0], "test": [1, 2]}
    splits = {s: half for s in ("src_text_wordnet", "src_text_pydoc", "src_mcq", "tgt")}

    def items(wordnet, pydoc, acc, tgt):
        def text(v):
            return {"nll_sum": [9.0, v, v], "tokens": [1, 1, 1]}
        return {"src_text_wordnet": text(wordnet), "src_text_pydoc": text(pydoc), "tgt": text(tgt),
                "src_mcq": {"correct": [0, acc, acc], "correct_norm": [0, acc, acc], "nll": [9.0, 9.0, 9.0]}}

    kfac = "LaLoRA-kfac proxy_kind="
    scores = {("LoRA", "-"): (4.00, 3.30, 1, 0.60), (kfac + "wordnet", "rel=1"): (3.80, 3.20, 1, 0.60),
              (kfac + "pydoc", "rel=1"): (3.85, 3.25, 0, 0.62), (kfac + "mix", "rel=1"): (3.82, 3.22, 1, 0.61)}
    runs = [{"setting": "qv", "family": f, "point": pt, "seed": seed, "items": items(*v)}
            for (f, pt), v in scores.items() for seed in (0, 1)]
    points = [{"setting": "qv", "family": f, "point": pt, "seeds": [0, 1], "src_text_nll_wordnet_test": v[0],
               "src_text_nll_pydoc_test": v[1], "src_mcq_acc_test": float(v[2])} for (f, pt), v in scores.items()]
    payload = {"benchmark": "forgetting", "selection": "validation (chosen) / test (reported)",
               "config": {"settings": [{"name": "qv"}]}, "data": {"splits": splits}, "points": points, "runs": runs}
    (tmp_path / "results.json").write_text(json.dumps(payload))
    text = forgetting_transfer(tmp_path, "results.json")
    two = {**payload, "config": {"settings": [{"name": "qv"}, {"name": "all"}]}}
    (tmp_path / "two.json").write_text(json.dumps(two))
    with pytest.raises(ValueError, match=r"exactly one setting, got \['qv', 'all'\]"):
        forgetting_transfer(tmp_path, "two.json")
    rows = {r.split(" | ")[0]: r.split(" | ")[1:] for r in text.splitlines() if r.startswith("| ")}
    assert rows["| LoRA"][:3] == ["4.000", "3.300", "100.0 %"] and rows["| LoRA"][3:7] == ["-"] * 4
    pydoc_row = rows[f"| {kfac}pydoc (rel=1)"]
    assert pydoc_row[3:7] == ["**-0.150 [-0.150, -0.150]**", "**-0.050 [-0.050, -0.050]**",
                              "**-100.0 [-100.0, -100.0]**", "**+0.020 [+0.020, +0.020]**"]
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert lines[0].startswith("- wordnet held-out text NLL, curvature from wordnet text (in-domain) minus from pydoc "
                               "text (transfer): **-0.050 [-0.050, -0.050]**: the in-domain curvature protects its "
                               "domain better (2 seeds)")
    assert lines[1].startswith("- pydoc held-out text NLL, curvature from pydoc text (in-domain) minus from wordnet "
                               "text (transfer): **+0.050 [+0.050, +0.050]**: the transferred curvature protects it "
                               "better")
