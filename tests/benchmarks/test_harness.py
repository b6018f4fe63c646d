"""The benchmark harness: presets and overrides, timing spread, provenance, result loading (old
committed files included) and merging that keeps every part's provenance."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from benchmarks.harness import PresetTable, Provenance, load_result, measure, merge_parts, parse_overrides, write_json
from benchmarks.harness.cli import benchmark_parser, settings_from_args

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _table():
    return PresetTable("demo", {"small": {"steps": 4, "sweep": {"seqs": [8, 16]}, "model": "tiny"},
                                "full": {"steps": 40, "sweep": {"seqs": [64]}, "model": "smollm2"}})


def test_presets_resolve_with_overrides_and_refuse_unknown_keys():
    table = _table()
    settings = table.resolve("small", parse_overrides(["steps=7", "sweep.seqs=[1, 2]", "model=smollm2"]))
    assert settings == {"steps": 7, "sweep": {"seqs": [1, 2]}, "model": "smollm2"}
    assert table["small"]["steps"] == 4  # resolve works on a copy
    table["small"]["sweep"]["seqs"].append(99)  # so does indexing
    assert table["small"]["sweep"]["seqs"] == [8, 16]
    with pytest.raises(KeyError, match="stepz"):
        table.resolve("small", {"stepz": 1})
    with pytest.raises(KeyError, match="sweep.nope"):
        table.resolve("small", {"sweep.nope": 1})
    with pytest.raises(KeyError, match="'steps' is not a group"):
        table.resolve("small", {"steps.x": 1})
    with pytest.raises(KeyError, match="unknown demo preset 'medium'"):
        table.resolve("medium")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["steps"])


def test_cli_parses_preset_and_set_once_and_bad_set_is_a_usage_error():
    table = _table()
    parser = benchmark_parser("demo", "demo", table)
    args = parser.parse_args(["--preset", "full", "--set", "steps=3"])
    assert settings_from_args(parser, args, table)["steps"] == 3
    with pytest.raises(SystemExit) as exc:
        settings_from_args(parser, parser.parse_args(["--set", "nope=1"]), table)
    assert exc.value.code == 2


def test_measure_reports_median_and_spread():
    t = measure(lambda: sum(range(1000)), "cpu", warmup=0, repeats=5, memory=False)
    assert t["repeats"] == len(t["times_s"]) == 5
    assert t["min_s"] <= t["median_s"] <= t["max_s"]
    assert t["spread_s"] == pytest.approx(t["max_s"] - t["min_s"])
    assert 0 <= t["iqr_s"] <= t["spread_s"]


def test_provenance_record():
    rec = Provenance(preset="tiny", device="cpu", argv=["prog", "--set", "a=b c"]).record()
    for key in ("commit", "dirty", "dirty_code", "dirty_files", "versions", "device", "device_name", "preset",
                "command", "argv", "started_utc", "finished_utc"):
        assert key in rec, key
    assert set(rec["versions"]) == {"torch", "transformers", "peft"}
    assert rec["command"] == "prog --set 'a=b c'" and rec["preset"] == "tiny"
    assert len(rec["commit"]) == 40 and isinstance(rec["dirty"], bool)
    rec = Provenance(preset="tiny", device="cpu", argv=["/x/benchmarks/cost/__main__.py", "--preset", "tiny"]).record()
    assert rec["command"] == "python -m benchmarks.cost --preset tiny"


@pytest.mark.parametrize("path", ["cost/small-cpu.json", "approx_accuracy/small-cpu.json", "continual/small.json",
                                  "forgetting/small/results.json"])
def test_committed_results_load_with_provenance(path):
    payload = load_result(RESULTS / path)
    assert payload["provenance"], "every committed result names the code that produced it"
    for rec in payload["provenance"]:
        assert re.fullmatch(r"[0-9a-f]{40}", rec["commit"]), rec
        if rec["source"] == "recorded":  # written by the harness itself
            assert rec["command"].startswith("python -m benchmarks.") and rec["finished_utc"]
        else:  # rebuilt from an older file's machine block
            assert rec["source"].startswith("legacy file") and rec["commit"] == payload["machine"]["git"]["commit"]
            if "merged_from" in payload:  # the old merge kept only the first part's machine: the record says so
                assert "first of the merged parts" in rec["source"]


def test_load_result_refuses_non_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result file"):
        load_result(tmp_path / "missing.json")
    write_json(tmp_path / "x.json", {"a": 1})
    with pytest.raises(ValueError, match="not a benchmark result"):
        load_result(tmp_path / "x.json")


def test_merge_keeps_every_parts_provenance(tmp_path):
    parts = []
    for i, commit in enumerate(["a" * 40, "b" * 40]):
        rec = Provenance(preset="tiny", device="cpu", argv=[f"part{i}"]).record()
        rec["commit"] = commit
        parts.append(write_json(tmp_path / f"p{i}" / "r.json", {"benchmark": "demo", "preset": "tiny",
                                                                 "config": {"k": 1, "seeds": [i]}, "rows": [i],
                                                                 "provenance": [rec]}))
    # an old-style part without provenance: its machine block becomes its record
    legacy = json.loads(parts[0].read_text())
    del legacy["provenance"]
    legacy["machine"] = {"git": {"commit": "c" * 40, "dirty": True}, "argv": ["old"], "versions": {}}
    parts.append(write_json(tmp_path / "p2" / "r.json", legacy))

    def combine(payloads):
        return {"benchmark": "demo", "preset": "tiny", "config": payloads[0]["config"],
                "rows": [r for p in payloads for r in p["rows"]]}

    merged = merge_parts([p.parent for p in parts], combine, may_differ=("seeds",))
    assert merged["rows"] == [0, 1, 0]
    assert [r["commit"] for r in merged["provenance"]] == ["a" * 40, "b" * 40, "c" * 40]
    assert merged["merged_from"] == [str(p.parent) for p in parts]
    # a merged result merged again keeps all records
    write_json(tmp_path / "m" / "r.json", merged)
    again = merge_parts([tmp_path / "m", parts[1]], combine, may_differ=("seeds",))
    assert len(again["provenance"]) == 4
    bad = json.loads(parts[1].read_text())
    bad["config"]["k"] = 2
    write_json(tmp_path / "bad" / "r.json", bad)
    with pytest.raises(ValueError, match=r"configs differ in \['k'\]"):
        merge_parts([parts[0], tmp_path / "bad" / "r.json"], combine, may_differ=("seeds",))
    with pytest.raises(ValueError, match="configs differ in \\['seeds'\\]"):
        merge_parts([parts[0], parts[1]], combine)


def test_old_committed_continual_result_rerenders(tmp_path):
    """The committed continual JSON (written before the harness) still renders its tables and plots."""
    from benchmarks.continual import rerender

    shutil.copy(RESULTS / "continual" / "small.json", tmp_path / "small.json")
    rerender(tmp_path, "small")
    assert "## Summary" in (tmp_path / "small.md").read_text()
    assert (tmp_path / "small_summary.png").read_bytes()[:4] == b"\x89PNG"


def test_committed_cost_and_approx_results_render(tmp_path):
    """The reports render the committed result files (written before the harness), provenance included."""
    from benchmarks.approx_accuracy.report import write_markdown
    from benchmarks.cost.report import render_markdown

    cost_md = render_markdown(load_result(RESULTS / "cost" / "small-cpu.json"))
    assert "# Cost benchmark" in cost_md and "## Provenance" in cost_md
    assert any(rec["commit"][:7] in cost_md for rec in load_result(RESULTS / "cost" / "small-cpu.json")["provenance"])
    path = write_markdown(load_result(RESULTS / "approx_accuracy" / "small-cpu.json"), tmp_path / "aa.md", {})
    assert "# Approximation accuracy" in path.read_text() and "## Provenance" in path.read_text()


def test_optional_settings_may_be_set_though_a_preset_omits_them():
    table = PresetTable("demo", {"small": {"steps": 4}}, optional={"collect": "a flag read with a default"})
    assert table.resolve("small", {"collect": False}) == {"steps": 4, "collect": False}
    with pytest.raises(KeyError, match=r"valid keys: \['collect', 'steps'\]"):
        table.resolve("small", {"colect": False})


def test_fit_options_for_passes_each_structure_only_what_it_takes(classifier):
    """One set of benchmark settings, filtered per structure and kind, is accepted by the strict
    ``CurvatureFitter`` for every fittable structure and kind; the filter keeps what applies."""
    import lalora_curv as lc
    from benchmarks.harness import fit_options_for
    from lalora_curv.curvature.registry import STRUCTURES

    settings = dict(rank=2, terms="sequence", mc_samples=2, seed=3, share_inputs=True, max_dense=10_000)
    for structure in STRUCTURES:
        for kind in ("empirical", "mc", "ggn"):
            options = fit_options_for(structure, kind, **settings)
            lc.CurvatureFitter(classifier, structure=structure, kind=kind, **options)  # refuses any extra option
            assert options["seed"] == 3
            assert ("mc_samples" in options) == (kind == "mc")
    assert "rank" not in fit_options_for("kfac", "mc", **settings)
    assert fit_options_for("lowrank", "empirical", **settings)["rank"] == 2
    with pytest.raises(TypeError, match="rnak"):
        fit_options_for("kfac", "mc", rnak=2)
    with pytest.raises(ValueError, match="unknown structure"):
        fit_options_for("kfca", "mc", seed=0)


def test_structures_taking_is_read_from_the_registry():
    from benchmarks.harness import structures_taking
    from lalora_curv.curvature.registry import STRUCTURES, structure_class

    assert set(structures_taking("terms")) == {s for s in STRUCTURES if "terms" in structure_class(s).fit_options}
    assert {"diag", "lowrank"} <= set(structures_taking("terms"))
    assert "kfac" not in structures_taking("terms")
    assert structures_taking("seed") == STRUCTURES
    with pytest.raises(ValueError, match="bogus"):
        structures_taking("bogus")


def test_merge_from_args_requires_an_output_dir_and_reports_bad_parts(capsys, tmp_path):
    """The one ``--merge`` handler of every benchmark's ``__main__``."""
    from benchmarks.harness import merge_from_args

    parser = benchmark_parser("prog", "d", _table())
    with pytest.raises(SystemExit) as exit_info:  # a usage error: exit 2, before any merging
        merge_from_args(parser, parser.parse_args(["--merge", "a", "b"]), lambda: pytest.fail("merged"))
    assert exit_info.value.code == 2 and "--merge needs --output-dir" in capsys.readouterr().err
    args = parser.parse_args(["--merge", "a", "b", "--output-dir", str(tmp_path)])

    def refuse():
        raise ValueError("cannot merge: preset differs")

    assert merge_from_args(parser, args, refuse) is None
    assert "prog: error: cannot merge: preset differs" in capsys.readouterr().err
    assert merge_from_args(parser, args, lambda: {"merged": 1}) == {"merged": 1}
