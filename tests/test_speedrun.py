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
    assert "123 steps" in out and "disk needed" in out
    # on a CPU the tiny preset is estimated for this machine: pretrain time is its FLOPs at the assumed CPU rate
    pre_row = next(r for r in est["stages"] if r["stage"] == "pretrain")
    assert pre_row["seconds"] == pytest.approx(est["flops"] / est["target"]["flops"])


def test_dry_run_prices_every_stage_and_labels_each_figure(capsys):
    res = speedrun.run(speedrun.SpeedrunConfig(preset="d20", dry_run=True, rl=True, gpus="H100:8", price=2.5))
    est = res["estimate"]
    rows = {r["stage"]: r for r in est["stages"]}
    assert list(rows) == ["data", "tokenizer", "pretrain", "base_eval", "midtrain", "sft", "rl", "chat_eval", "report"]
    for r in rows.values():
        assert r["seconds"] > 0 and r["label"] and r["basis"]
        assert r["dollars"] == pytest.approx(r["seconds"] / 3600 * 8 * 2.5)  # 8 GPUs at $2.5 per GPU-hour
    assert est["est_cost"] == pytest.approx(sum(r["dollars"] for r in rows.values()))
    # pretrain = compute at the measured MFU + one ring all-reduce per step, counted as not overlapped
    comm = speedrun.allreduce_seconds(est["params"], 8, speedrun.RING_BUSBW["NVLink"])
    assert est["comm_step_s"] == pytest.approx(comm) and comm > 0
    assert rows["pretrain"]["seconds"] == pytest.approx(
        est["flops"] / (989e12 * speedrun.expected_mfu(20) * 8) + est["steps"] * comm)
    out = capsys.readouterr().out
    for word in ("[measured", "[assumed]", "computed", "all-reduce", "not overlapped", "total", "$"):
        assert word in out, word


def test_ring_allreduce_model():
    """2(n-1)/n of the fp32 gradient bytes over the bus bandwidth: nothing on one GPU, approaching 2x at large n."""
    a = speedrun.allreduce_seconds
    assert a(10**9, 1, 360e9) == 0.0
    assert a(10**9, 2, 100e9) == pytest.approx(2 * 1 / 2 * 4e9 / 100e9)
    assert a(10**9, 8, 100e9) == pytest.approx(2 * 7 / 8 * 4e9 / 100e9)
    assert a(10**9, 8, 100e9) < a(10**9, 64, 100e9) < 2 * 4e9 / 100e9
    # the same model on a PCIe box is slower, and a bigger machine has more communication per step
    one = speedrun.estimate(speedrun.PRESETS["d12"], {"gpus": 0, "cpu_count": 2}, 0, None,
                            speedrun.build_plan(speedrun.SpeedrunConfig(preset="d12"), speedrun.PRESETS["d12"], "x", 1),
                            gpus="H100:1")
    assert one["comm_step_s"] == 0.0
    pcie = speedrun.estimate(speedrun.PRESETS["d12"], {"gpus": 0, "cpu_count": 2}, 0, None, [], gpus="L4:8")
    assert pcie["target"]["link"] == "PCIe" and pcie["comm_step_s"] > 0


@pytest.mark.parametrize("kw,needle", [({"price": -1.0}, "--price"), ({"price": float("nan")}, "--price"),
                                       ({"budget": 5.0}, "needs --price"), ({"price": 1.0, "budget": 0.0}, "--budget"),
                                       ({"gpus": "H100:x", "dry_run": True}, "--gpus"),
                                       ({"gpus": "H100:8"}, "only for --dry-run")])
def test_bad_money_and_hardware_flags_are_one_line(kw, needle):
    with pytest.raises(UserError, match=needle):
        speedrun.run(speedrun.SpeedrunConfig(preset="tiny", run="m", stages="data", **kw))


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


def test_stream_child_reports_a_forwarded_signal_as_not_finished(tmp_path):
    """Ctrl-C during a stage: the stage checkpoints and exits 0, but the speedrun must not take it for done."""
    import os
    import signal
    import threading

    code = ("import signal,sys,time\n"
            "signal.signal(signal.SIGINT, lambda s, f: (print('saved', flush=True), sys.exit(0)))\n"
            "print('ready', flush=True)\ntime.sleep(30)\n")
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    rc = speedrun.stream_child([sys.executable, "-c", code], "probe", heartbeat_s=60)
    assert rc == 128 + signal.SIGINT


def test_cost_meter_env_step_line_and_budget(monkeypatch, capsys):
    from picochat import training

    assert training.CostMeter.from_env({}) is None
    for bad in ("{", '{"rate": -1}', '{"spent": 1}', '{"rate": 1, "budget": 0}', '[1]'):
        with pytest.raises(UserError, match="PICOCHAT_COST"):
            training.CostMeter.from_env({"PICOCHAT_COST": bad})
    m = training.CostMeter(rate=3600.0, spent=1.0, at=time.time() - 2, later=5.0, budget=100.0)  # $1 per second
    assert 2.9 < m.spent() < 4.0
    text = m.text(eta_s=10.0)
    assert "spent" in text and "projected" in text and "budget $100.00" in text
    assert m.projected() == pytest.approx(m.spent() + 10.0 + 5.0, abs=0.5)
    line = training.format_step_line(1, 10, 2.0, 1.0, 0.1, 1000.0, eta_s=1.0, cost=text)
    assert line.endswith(text)
    assert training.format_step_line(1, 10, 2.0, 1.0, 0.1, 1000.0) == \
        "step 01/10 | loss 2.0000 | lrm 1.00 | dt 100ms | tok/s 1,000"  # unchanged without a meter
    assert not m.budget_due()
    m.budget = m.spent() + m.EXIT_S + 1.0  # less than two steps, a save and the exit are left
    time.sleep(0.3)
    assert m.budget_due()
    with training.Heartbeat("probe", "waiting", interval=0.2, meter=m):
        time.sleep(0.5)
    assert "spent" in capsys.readouterr().out


# a micro model on random tokens: the budget, not the step count, ends each invocation
BUDGET_RUN = ["speedrun", "--preset", "tiny", "--run", "b", "--stages", "pretrain", "--price", "3600",
              "--set", "pretrain.data=random", "--set", "pretrain.vocab-size=128", "--set", "pretrain.depth=2",
              "--set", "pretrain.aspect-ratio=32", "--set", "pretrain.head-dim=16", "--set", "pretrain.seq-len=32",
              "--set", "pretrain.device-batch-size=2", "--set", "pretrain.total-batch-size=64",
              "--set", "pretrain.num-iterations=1000000", "--set", "pretrain.eval-every=0",
              "--set", "pretrain.save-every=0", "--set", "pretrain.sample-every=-1"]


def test_budget_stops_with_a_checkpoint_and_a_larger_budget_resumes(tmp_path):
    """At $1 per second of wall time: each invocation stops under its budget with a checkpoint; a larger budget
    continues from that checkpoint (the spend of earlier invocations counts)."""
    import os
    import re
    import subprocess

    from picochat.checkpoint import checkpoints_dir, list_checkpoints

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    steps = []
    for budget in (25, 50):
        out = subprocess.run([sys.executable, "-m", "picochat", *BUDGET_RUN, "--budget", str(budget)], env=env,
                             capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        assert out.returncode == speedrun.EXIT_BUDGET, text[-3000:]
        assert "stopping at step" in text and "for the budget" in text, text[-3000:]
        assert re.search(r"\| \$[\d.,]+ spent, ~\$[\d.,]+ projected \(budget", text)  # on the step line
        state = json.loads((run_dir("b") / "speedrun.json").read_text())
        assert 0 < state["spent"] <= budget
        assert state["stages"]["pretrain"]["status"] == "running"  # not taken for finished
        ckpts = list_checkpoints(checkpoints_dir("b", "base"))
        steps.append(int(ckpts[-1].name.split("_")[1]))
        if len(steps) == 2:
            assert f"at step {steps[0]}" in text  # resumed from the first stop's checkpoint
    assert 0 < steps[0] < steps[1] < 1000000
