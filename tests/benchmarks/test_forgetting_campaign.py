"""The campaign worker: order, donors first, one worker per part (lock files), failures not retried."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

campaign = pytest.importorskip("benchmarks.forgetting.campaign")
Part = campaign.Part


def _parts(root):
    main = [Part("main", s, root / "main" / f"s{s}") for s in (0, 1)]
    abl = [Part("abl", s, root / "abl" / f"s{s}", (root / "main" / f"s{s}",)) for s in (0, 1)]
    return main + abl


def _finish(part, runs=3, complete=True):
    part.out.mkdir(parents=True, exist_ok=True)
    (part.out / "results.json").write_text(json.dumps({"runs": [{}] * runs, "complete": complete}))


def test_the_real_campaign_lists_main_first_and_ablations_reusing_their_main_seed(tmp_path):
    parts = campaign.campaign_parts(tmp_path)
    assert [p.name for p in parts[:3]] == ["main/s0", "main/s1", "main/s2"]
    for p in parts[3:]:
        assert p.donors == (tmp_path / "main" / "parts" / f"s{p.seed}",) and p.seed in (0, 1)
    assert {p.preset for p in parts[3:]} == set(campaign.ABLATION_ORDER)
    cmd = campaign.command(parts[3], python="python")
    assert cmd[:3] == ["python", "-m", "benchmarks.forgetting"] and "--resume" in cmd
    assert cmd[cmd.index("--reuse") + 1] == str(parts[3].donors[0])
    assert "--reuse" not in campaign.command(parts[0], python="python")


def test_archives_that_exist_are_reused_but_never_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "ARCHIVES", {"main": ("probe", "old/s{seed}")})
    _finish(Part("x", 0, tmp_path / "probe"), complete=False)  # unfinished: still reused, not waited for
    _finish(Part("x", 1, tmp_path / "old" / "s1"))
    parts = {p.name: p for p in campaign.campaign_parts(tmp_path)}
    assert parts["main/s0"].archives == (tmp_path / "probe",)  # old/s0 does not exist
    assert parts["main/s1"].archives == (tmp_path / "probe", tmp_path / "old" / "s1")
    assert parts["main/s1"].donors == () and campaign.runnable(parts["main/s1"])
    cmd = campaign.command(parts["main/s1"], python="python")
    assert cmd[cmd.index("--reuse") + 1:] == [str(tmp_path / "probe"), str(tmp_path / "old" / "s1")]
    ablation = next(p for p in parts.values() if p.preset != "main")
    assert ablation.archives == () and campaign.command(ablation, python="python")[-2] == "--reuse"


def test_worker_runs_in_order_and_ablations_after_their_donor(tmp_path):
    parts = _parts(tmp_path)
    order = []

    def run(part):
        for donor in part.donors:  # never started before its donor is complete
            assert campaign.progress_of(donor)[1]
        order.append(part.name)
        _finish(part)
        return 0

    _finish(parts[1])  # main/s1 already complete: skipped
    ran = campaign.work(parts, tmp_path / "locks", run, wait_s=0, log=lambda *_: None)
    assert ran == order == ["main/s0", "abl/s0", "abl/s1"]
    assert campaign.work(parts, tmp_path / "locks", run, wait_s=0, log=lambda *_: None) == []


def test_a_part_held_by_another_worker_is_left_to_it(tmp_path, monkeypatch):
    parts = _parts(tmp_path)
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    ran = []

    def run(part):
        ran.append(part.name)
        _finish(part)
        return 0

    with open(lock_dir / "main_s0.lock", "w") as held:  # another worker is on main/s0
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert campaign._held(lock_dir / "main_s0.lock")
        calls = iter(range(3))

        def sleep_then_finish(_):
            # while this worker waits for abl/s0's donor, the other worker completes main/s0
            if next(calls) == 0:
                _finish(parts[0])

        monkeypatch.setattr(campaign.time, "sleep", sleep_then_finish)
        campaign.work(parts, lock_dir, run, wait_s=0, log=lambda *_: None)
    assert not campaign._held(lock_dir / "main_s0.lock")
    assert ran == ["main/s1", "abl/s1", "abl/s0"]


def test_a_failed_part_is_not_retried_and_its_dependents_are_not_started(tmp_path):
    parts = _parts(tmp_path)
    ran = []

    def run(part):
        ran.append(part.name)
        if part.name == "main/s0":
            _finish(part, complete=False)  # stopped before its last run
            return 1
        _finish(part)
        return 0

    campaign.work(parts, tmp_path / "locks", run, wait_s=0, log=lambda *_: None)
    assert ran == ["main/s0", "main/s1", "abl/s1"]


def test_complete_presets_are_merged_once_and_again_after_a_part_changes(tmp_path):
    parts = _parts(tmp_path)
    merges = []

    def merge(dirs, out):
        merges.append((out.name, [d.name for d in dirs]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text("{}")

    for part in parts[:2]:
        _finish(part)
    _finish(parts[2], complete=False)
    assert campaign.merge_complete(parts, tmp_path, merge, log=lambda *_: None) == ["main"]
    assert merges == [("main", ["s0", "s1"])]
    assert campaign.merge_complete(parts, tmp_path, merge, log=lambda *_: None) == []  # up to date
    later = (tmp_path / "main" / "results.json").stat().st_mtime + 10
    os.utime(parts[0].out / "results.json", (later, later))  # a part written after the merge
    assert campaign.merge_complete(parts, tmp_path, merge, log=lambda *_: None) == ["main"]
