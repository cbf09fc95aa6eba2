"""Speedrun orchestrator: presets, plan, dry-run numbers, streaming with heartbeats, fingerprints."""

import json
import sys
import time

import pytest

from picochat.tools import speedrun
from picochat.config import UserError
from picochat.runtime import run_dir


def test_default_preset_follows_hardware():
    assert speedrun.choose_preset({"gpus": 0, "gpu_name": None, "cpu_count": 2})[0] == "tiny"
    assert speedrun.choose_preset({"gpus": 8, "gpu_name": "H100", "cpu_count": 128})[0] == "d20"
    name, why = speedrun.choose_preset({"gpus": 1, "gpu_name": "H100", "cpu_count": 16})
    assert name == "d12" and "1 GPU" in why


def test_set_overrides_reach_the_stage_and_bad_ones_fail():
    cfg = speedrun.SpeedrunConfig(preset="tiny", sets=["pretrain.num_iterations=7", "sft.num-iterations=3"])
    plan = {sp.name: sp for sp in speedrun.build_plan(cfg, speedrun.PRESETS["tiny"], "t", 1)}
    argv = plan["pretrain"].argv
    assert argv[argv.index("--num-iterations") + 1] == "7"
    assert plan["sft"].argv[plan["sft"].argv.index("--num-iterations") + 1] == "3"
    with pytest.raises(UserError, match="stage.flag=value"):
        speedrun.parse_sets(["pretrain"])
    with pytest.raises(UserError, match="unknown stage"):
        speedrun.parse_sets(["nope.x=1"])


def test_max_steps_caps_every_training_stage_and_rl_is_optional():
    cfg = speedrun.SpeedrunConfig(preset="tiny", max_steps=5, rl=True)
    plan = {sp.name: sp for sp in speedrun.build_plan(cfg, speedrun.PRESETS["tiny"], "t", 1)}
    for s in ("pretrain", "midtrain", "sft", "rl"):
        a = plan[s].argv
        assert a[a.index("--num-iterations") + 1] == "5", s
    assert list(plan).index("rl") < list(plan).index("chat_eval")
    assert plan["chat_eval"].argv[plan["chat_eval"].argv.index("--source") + 1] == "rl"
    no_rl = speedrun.build_plan(speedrun.SpeedrunConfig(preset="tiny"), speedrun.PRESETS["tiny"], "t", 1)
    assert "rl" not in [sp.name for sp in no_rl]


def test_multi_gpu_stages_go_through_launch():
    plan = speedrun.build_plan(speedrun.SpeedrunConfig(preset="d12"), speedrun.PRESETS["d12"], "d12", 8)
    by = {sp.name: sp for sp in plan}
    assert by["pretrain"].distributed and not by["tokenizer"].distributed
    cmd = speedrun.stage_command(by["pretrain"], 8)
    assert cmd[3:6] == ["launch", "--nproc-per-node", "8"]


def test_dry_run_numbers_match_the_stage_config(capsys):
    cfg = speedrun.SpeedrunConfig(preset="tiny", dry_run=True, run="dry", sets=["pretrain.num-iterations=123"])
    result = speedrun.run(cfg)
    est = result["estimate"]
    pre = next(s for s in result["stages"] if s["name"] == "pretrain")["argv"]
    assert est["steps"] == 123 == int(pre[pre.index("--num-iterations") + 1])
    from picochat.stages.pretrain import PRESETS

    assert est["total_batch_size"] == PRESETS["tiny"]["total_batch_size"]  # the preset pretrain itself applies
    assert est["seq_len"] == PRESETS["tiny"]["seq_len"] and est["depth"] == PRESETS["tiny"]["depth"]
    assert est["tokens"] == est["steps"] * est["total_batch_size"]
    assert est["flops"] == pytest.approx(est["flops_per_token"] * est["tokens"])
    out = capsys.readouterr().out
    assert "123 steps" in out and "estimated pretrain time" in out and "disk needed" in out
    # the 8xH100 reference uses the MFU measured for this depth (flat below d12)
    assert est["ref_8xh100_seconds"] == pytest.approx(est["flops"] / (989e12 * speedrun.expected_mfu(est["depth"]) * 8))


def test_expected_mfu_follows_the_measured_points():
    m = speedrun.expected_mfu
    assert m(12) == pytest.approx(0.955 * 0.51) and m(20) == pytest.approx(0.955 * 0.60)
    assert m(4) == m(12) and m(32) == m(20) and m(12) < m(16) < m(20)


def test_stream_child_heartbeats_and_partial_lines(tmp_path, capsys):
    code = ("import sys,time; sys.stdout.write('partial'); sys.stdout.flush(); time.sleep(1.6); "
            "print(' line'); print('done')")
    rc = speedrun.stream_child([sys.executable, "-c", code], "probe", log_path=tmp_path / "log", heartbeat_s=0.5)
    assert rc == 0
    out = capsys.readouterr().out
    assert "[heartbeat] probe: alive" in out
    assert "partial line" in out and "done" in out
    assert "partial line" in (tmp_path / "log").read_text()


def test_failed_stage_is_recorded_and_rerun(tmp_path, monkeypatch):
    """A failing stage stops the run with its exit code; finished stages are skipped on the re-run."""
    calls = []
    pretrain_runs = []

    def fake_stream(cmd, label, **kw):
        calls.append(label)
        if label == "pretrain":
            pretrain_runs.append(1)
            return 3 if len(pretrain_runs) == 1 else 0
        return 0

    monkeypatch.setattr(speedrun, "stream_child", fake_stream)
    cfg = speedrun.SpeedrunConfig(preset="tiny", run="r", stages="data,tokenizer,pretrain,base_eval")
    res = speedrun.run(cfg)
    assert res["failed_stage"] == "pretrain" and res["rc"] == 3
    calls.clear()
    res = speedrun.run(cfg)
    assert "failed_stage" not in res
    assert calls == ["pretrain", "base_eval"]  # data and tokenizer were done
    state = json.loads((run_dir("r") / "speedrun.json").read_text())
    assert all(state["stages"][s]["status"] == "done" for s in ("data", "tokenizer", "pretrain", "base_eval"))
    # changing a stage's inputs re-runs it and everything downstream of it
    calls.clear()
    speedrun.run(speedrun.SpeedrunConfig(preset="tiny", run="r", stages="data,tokenizer,pretrain,base_eval",
                                         sets=["pretrain.num-iterations=9"]))
    assert calls == ["pretrain", "base_eval"]


def test_force_restart_needs_confirmation(monkeypatch):
    monkeypatch.setattr(speedrun, "stream_child", lambda *a, **k: 0)
    speedrun.run(speedrun.SpeedrunConfig(preset="tiny", run="fr", stages="data"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    with pytest.raises(UserError, match="--yes"):
        speedrun.run(speedrun.SpeedrunConfig(preset="tiny", run="fr", stages="data", force_restart=True))
    t0 = time.time()
    speedrun.run(speedrun.SpeedrunConfig(preset="tiny", run="fr", stages="data", force_restart=True, yes=True))
    state = json.loads((run_dir("fr") / "speedrun.json").read_text())
    assert state["started"] >= t0
