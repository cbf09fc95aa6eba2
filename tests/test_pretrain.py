"""pretrain: exact resume (in-process and after kill -9), crash-safe saves, NaN guard, 2 processes == 1, bench,
and the shared training.py machinery."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picochat import training
from picochat.checkpoint import checkpoints_dir, latest_checkpoint, list_checkpoints, load_model_state
from picochat.stages.pretrain import PretrainConfig, RandomTokens, run


pytestmark = pytest.mark.usefixtures("one_thread")


REPO = Path(__file__).resolve().parent.parent
# a 2-layer, 64-wide model on synthetic tokens; 2 micro-batches per step so accumulation is exercised
TINY = ["--data", "random", "--vocab-size", "128", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "16",
        "--seq-len", "32",
        "--device-batch-size", "2", "--total-batch-size", "128", "--lr-scale", "1", "--warmup-steps", "2",
        "--weight-decay", "0.05", "--eval-tokens", "256", "--sample-every", "-1"]


def _cfg(run_name, **kw):
    base = dict(data="random", vocab_size=128, depth=2, aspect_ratio=32, head_dim=16, seq_len=32, device_batch_size=2,
                total_batch_size=128, lr_scale=1.0, warmup_steps=2, weight_decay=0.05, eval_tokens=256,
                sample_every=-1, run=run_name, num_iterations=8, eval_every=0, save_every=4)
    base.update(kw)
    return PretrainConfig(**base)


def _losses(run_name):
    recs = training.read_metrics(Path(os.environ["PICOCHAT_HOME"]) / "runs" / run_name / "base" / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_interrupted_run_resumes_bit_exact():
    full = run(_cfg("full"))
    assert full["step"] == 8 and full["val_bpb"] is not None
    part = run(_cfg("part", stop_at_step=3, save_every=0))
    assert part["stopped_early"] and part["step"] == 3
    rest = run(_cfg("part", save_every=0))
    assert rest["step"] == 8 and rest["steps_this_run"] == 5
    a, b = _losses("full"), _losses("part")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b  # bit-exact on CPU fp32: every step's loss, not just the last
    assert torch.equal(load_model_state(latest_checkpoint(checkpoints_dir("full", "base")))["lm_head.weight"],
                       load_model_state(latest_checkpoint(checkpoints_dir("part", "base")))["lm_head.weight"])


def test_resume_without_the_flag_keeps_the_checkpoints_smaller_micro_batch():
    """A run continued with a smaller --device-batch-size (after running out of memory, or from before a default
    changed) and later resumed without the flag keeps that micro-batch: still bit-exact against an uninterrupted run
    at that micro-batch. The default here would be 4 rows (the whole 128-token batch of 32-token rows)."""
    full = run(_cfg("full1"))  # micro-batch 2, 2 accumulation steps
    run(_cfg("sticky", stop_at_step=3, save_every=0))
    rest = run(_cfg("sticky", device_batch_size=0, save_every=0))
    assert rest["step"] == 8 and rest["steps_this_run"] == 5
    assert _losses("full1") == _losses("sticky") and full["step"] == 8
    header = json.loads((Path(os.environ["PICOCHAT_HOME"]) / "runs" / "sticky" / "base" / "run.json").read_text())
    assert header["plan"]["device_batch_size"] == 2
    fresh = run(_cfg("fresh", device_batch_size=0, num_iterations=1, save_every=0))
    assert fresh["step"] == 1
    header = json.loads((Path(os.environ["PICOCHAT_HOME"]) / "runs" / "fresh" / "base" / "run.json").read_text())
    assert header["plan"]["device_batch_size"] == 4


def test_crash_during_save_keeps_previous_checkpoint(monkeypatch):
    import picochat.checkpoint as ck

    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **kw):  # checkpoints are saved through an open file (hashed as written)
        calls["n"] += 1
        if "step_000008" in f.name and Path(f.name).name.startswith("model.pt"):
            f.write(b"half a checkpoint")
            raise OSError("disk full (injected)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", flaky_save)
    with pytest.raises(OSError, match="injected"):
        run(_cfg("crash"))
    root = checkpoints_dir("crash", "base")
    assert [p.name for p in list_checkpoints(root)] == ["step_000004"]
    assert load_model_state(latest_checkpoint(root))["lm_head.weight"].isfinite().all()
    monkeypatch.setattr(ck.torch, "save", real_save)
    out = run(_cfg("crash"))  # resumes from step 4; the torn .tmp directory is cleaned up
    assert out["step"] == 8 and out["steps_this_run"] == 4
    assert not list(root.glob("*.tmp"))


def test_nan_loss_stops_with_clear_message(monkeypatch):
    import picochat.stages.pretrain as pt

    real = pt.train_step
    count = {"n": 0}

    def poisoned(*a, **kw):
        loss, batch = real(*a, **kw)
        count["n"] += 1
        return (loss * float("nan") if count["n"] == 6 else loss), batch

    monkeypatch.setattr(pt, "train_step", poisoned)
    with pytest.raises(training.NonFiniteLoss, match="step 6.*step_000004"):
        run(_cfg("nan"))
    assert [p.name for p in list_checkpoints(checkpoints_dir("nan", "base"))] == ["step_000004"]


def test_default_micro_batch_fits_the_gpu():
    """Without --device-batch-size: the depth rule on 80 GB-class GPUs and on CPU, lowered to the memory estimate on
    a smaller card, and one clear error when not even one sequence fits."""
    from picochat.config import UserError
    from picochat.stages.pretrain import default_device_batch

    h100, rtx4090 = 85.5e9, 25.4e9  # torch's total_memory of an 80 GB H100 and a 24 GB card, in bytes
    assert default_device_batch(12, 2048, 1, None) == 32 and default_device_batch(20, 2048, 1, None) == 16
    assert default_device_batch(12, 2048, 1, h100) == 32 and default_device_batch(20, 2048, 1, h100) == 16
    assert default_device_batch(12, 2048, 1, 150e9) == 32  # never above the rule on a bigger GPU
    assert default_device_batch(12, 2048, 1, rtx4090) == 8 and default_device_batch(20, 2048, 1, rtx4090) == 2
    # with fp8: twice the rows where they fit (80 GB); on a 24 GB card what the fp8 memory estimate fits
    assert default_device_batch(12, 2048, 1, h100, fp8=True) == 64
    assert default_device_batch(20, 2048, 1, h100, fp8=True) == 32
    assert default_device_batch(12, 2048, 1, rtx4090, fp8=True) == 16
    with pytest.raises(UserError, match="--depth 32.*--device-batch-size 1"):
        default_device_batch(32, 2048, 1, 8e9)


def test_out_of_memory_names_the_flag_and_resumes_with_a_smaller_micro_batch(monkeypatch, capsys):
    import picochat.stages.pretrain as pt
    from picochat.config import UserError

    real = pt.train_step
    count = {"n": 0}

    def oom_at_6(*a, **kw):
        count["n"] += 1
        if count["n"] == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(pt, "train_step", oom_at_6)
    with pytest.raises(UserError, match=r"step 6 .*micro-batch of 2 x 32.*step_000004.*--device-batch-size 1"):
        run(_cfg("oom"))
    assert [p.name for p in list_checkpoints(checkpoints_dir("oom", "base"))] == ["step_000004"]
    monkeypatch.setattr(pt, "train_step", real)
    capsys.readouterr()
    out = run(_cfg("oom", device_batch_size=1))  # half the micro-batch, twice the accumulation
    assert out["step"] == 8 and out["steps_this_run"] == 4 and math.isfinite(out["train_loss"])
    assert "micro-batch of 2 rows, resuming with 1" in capsys.readouterr().out


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "picochat", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_then_kill9_then_resume_matches_uninterrupted():
    """One run, three processes: SIGTERM (clean save, exit 0), resume and SIGKILL mid-run, resume to the end. The
    loss curve equals an uninterrupted in-process run's, step for step."""
    n = 24
    out = run(_cfg("ref", num_iterations=n, save_every=0))
    ref = _losses("ref")
    assert sum(ref[k] for k in (n - 2, n - 1, n)) / 3 < ref[1] - 1.0, ref  # the synthetic chain is learnable
    assert out["val_bpb"] < ref[1] / 0.6931
    args = ["pretrain", "--run", "killed", "--num-iterations", str(n), "--save-every", "2", "--eval-every", "0",
            "--keep-last", "2", *TINY]
    root = checkpoints_dir("killed", "base")
    metrics = Path(os.environ["PICOCHAT_HOME"]) / "runs" / "killed" / "base" / "metrics.jsonl"

    p = _cli(args)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    out1, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out1
    first = latest_checkpoint(root)
    assert first is not None
    if int(first.name[5:]) < n:
        assert "SIGTERM" in out1 and "stopping at step" in out1

    p = _cli(args)
    target = root / f"step_{int(first.name[5:]) + 4:06d}"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not target.exists():
        time.sleep(0.005)
    killed_mid_run = p.poll() is None
    p.send_signal(signal.SIGKILL)
    out2, _ = p.communicate()
    assert f"continuing from {first}" in out2 or int(first.name[5:]) == n
    last = latest_checkpoint(root)

    p = _cli(args)
    out3, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out3
    assert (not killed_mid_run) or f"continuing from {last}" in out3
    assert _losses("killed") == ref


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_like_one():
    run(_cfg("one", num_iterations=4, save_every=0))
    # torchrun's own parser takes `--run` for its `--run-path` (argparse prefix matching), so this run keeps the
    # default name (d2) in a home of its own
    home2 = Path(os.environ["PICOCHAT_HOME"]).parent / "home2"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", USE_LIBUV="0", PICOCHAT_HOME=str(home2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "picochat", "pretrain", "--num-iterations", "4",
           "--save-every", "0", "--eval-every", "0", *TINY]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = _losses("one")
    b = {r["step"]: r["loss"] for r in training.read_metrics(home2 / "runs" / "d2" / "base" / "metrics.jsonl")
         if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4)
    one = load_model_state(latest_checkpoint(checkpoints_dir("one", "base")))
    ck = latest_checkpoint(home2 / "runs" / "d2" / "base" / "checkpoints")
    two = load_model_state(ck)
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-3, atol=1e-5), k
    assert (ck / "optim_rank0.pt").exists() and (ck / "optim_rank1.pt").exists()
    # resuming the 2-process checkpoint in 1 process reshards the optimizer (the data order is approximate)
    import shutil

    shutil.copytree(ck.parent.parent.parent, Path(os.environ["PICOCHAT_HOME"]) / "runs" / "two")
    out = run(_cfg("two", num_iterations=6, save_every=0))
    assert out["step"] == 6 and out["steps_this_run"] == 2


def test_random_tokens_global_index_and_state():
    one = RandomTokens(64, 2, 16, seed=3)
    b0, b1 = one.next_batch(), one.next_batch()
    r0 = RandomTokens(64, 2, 16, seed=3, rank=0, world_size=2).next_batch()
    r1 = RandomTokens(64, 2, 16, seed=3, rank=1, world_size=2).next_batch()
    assert torch.equal(b0[0], r0[0]) and torch.equal(b1[0], r1[0])
    st = one.state_dict()
    nxt = one.next_batch()
    again = RandomTokens(64, 2, 16, seed=3)
    again.load_state_dict(st)
    assert torch.equal(again.next_batch()[0], nxt[0])
    assert torch.equal(b0[0][:, 1:], b0[1][:, :-1])  # targets are inputs shifted by one


def test_random_tokens_follow_their_definition():
    """Each row: a uniform first token, then next = perm[current], or with 10% probability a uniform token; the
    draws come from one generator seeded by the global batch index, in this order (what earlier runs saw)."""
    r = RandomTokens(50, 3, 40, seed=5)
    x, y = r.next_batch()
    g = torch.Generator().manual_seed(r.seed * 1_000_003 + 0 + 1)
    rows = torch.empty(3, 41, dtype=torch.long)
    rows[:, 0] = torch.randint(0, 50, (3,), generator=g)
    noise = torch.rand(3, 40, generator=g) < 0.1
    rnd = torch.randint(0, 50, (3, 40), generator=g)
    for t in range(40):
        rows[:, t + 1] = torch.where(noise[:, t], rnd[:, t], r.perm[rows[:, t]])
    assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
    assert noise.any() and (~noise).any()  # both branches are exercised


def test_bench_pretrain_prints_metrics(capsys):
    from picochat.cli import main

    assert main(["bench", "pretrain", "--depth", "2", "--head-dim", "16", "--seq-len", "32", "--device-batch-size",
                 "2", "--steps", "2", "--warmup", "1", "--vocab-size", "128", "--no-compile", "--no-smear",
                 "--no-backout"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bench"] == "pretrain" and res["tok_per_s"] > 0 and res["steps"] == 2 and res["params"] > 0
    assert res["grad_accum"] == 1 and res["total_batch_size"] == 64
    assert res["smear"] is False and res["backout"] is False
    assert res["fp8"] is False and res["fp8_scope"] is None  # CPU: bf16/fp32 matmuls, and the trail says so
    assert main(["bench", "pretrain", "--depth", "2", "--head-dim", "16", "--seq-len", "32", "--device-batch-size",
                 "2", "--steps", "1", "--warmup", "1", "--vocab-size", "128", "--no-compile"]) == 0
    res2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the defaults: both on
    assert res2["smear"] is True and res2["backout"] is True and res2["params"] > res["params"]
    assert "profile" not in res2
    assert res2["startup"]["first_step_at_s"] > 0 and res2["startup"]["cache"] is None  # not compiled on a CPU
    assert main(["bench", "pretrain", "--depth", "2", "--head-dim", "16", "--seq-len", "32", "--device-batch-size",
                 "2", "--steps", "1", "--warmup", "0", "--vocab-size", "128", "--no-compile"]) == 0
    res3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # no warm-up: timed from the first step
    assert res3["startup"]["first_step_at_s"] is None and res3["tok_per_s"] > 0


def test_bench_takes_its_flags_from_the_pretrain_config():
    """Every PretrainConfig field but those only the full run reads is a bench flag; --data and --total-batch-size
    keep the bench's defaults (random tokens, one micro-batch per process) under a preset and explicit flags."""
    import argparse
    import dataclasses

    from picochat.config import flag_name
    from picochat.stages.pretrain import BENCH_SKIP, add_bench_args, bench_config

    p = argparse.ArgumentParser()
    add_bench_args(p)
    helptext = p.format_help()
    for f in dataclasses.fields(PretrainConfig):
        assert (flag_name(f.name) in helptext) is (f.name not in BENCH_SKIP), f.name
    cfg = bench_config(p.parse_args([]))
    assert (cfg.data, cfg.total_batch_size, cfg.depth, cfg.seed) == ("random", -1, 12, PretrainConfig().seed)
    cfg = bench_config(p.parse_args(["--preset", "tiny", "--total-batch-size", "0", "--matrix-lr", "0.01"]))
    assert (cfg.depth, cfg.seq_len, cfg.total_batch_size, cfg.matrix_lr, cfg.data) == (4, 256, 0, 0.01, "random")
    assert bench_config(p.parse_args(["--preset", "tiny"])).total_batch_size == 4096


def test_prepare_model_applies_dtype_fp8_attention_and_compile_in_one_place(monkeypatch):
    from picochat import scaling
    from picochat.config import UserError
    from picochat.model import build_model

    cpu = torch.device("cpu")
    mc = scaling.gpt_config(2, 128, 32, 16, aspect_ratio=32)
    monkeypatch.delenv("PICOCHAT_COMPILE", raising=False)
    monkeypatch.setenv("PICOCHAT_FUSED_LOSS", "0")
    model = build_model(mc)
    cmodel, info = training.prepare_model(model, device=cpu, dtype=torch.float32, seq_len=32, fp8=None)
    parts = info.pop("prepare_s")  # seconds by part, for the start-up line
    assert set(parts) == {"dtype/fp8", "attention plan", "compile cache + artifacts", "compile setup"}
    assert all(v >= 0 for v in parts.values())
    assert cmodel is model and info == {"compiled": False, "fp8": False, "fp8_scope": None, "cache": None,
                                        "artifacts": None, "device": torch.device("cpu")}
    assert model.fused_loss is False and model.compute_dtype == torch.float32
    monkeypatch.setenv("PICOCHAT_FUSED_LOSS", "1")
    assert training.prepare_model(build_model(mc), device=cpu, dtype=torch.float32, seq_len=32)[0].fused_loss
    with pytest.raises(UserError, match="--fp8"):  # asked for on a device without fp8 cores: refused, not ignored
        training.prepare_model(build_model(mc), device=cpu, dtype=torch.float32, seq_len=32, fp8=True)


def test_bench_pretrain_profile_breaks_a_step_down(capsys):
    from picochat.cli import main
    from picochat.training import kernel_category

    assert main(["bench", "pretrain", "--depth", "2", "--head-dim", "16", "--seq-len", "32", "--device-batch-size",
                 "2", "--steps", "1", "--warmup", "1", "--vocab-size", "128", "--no-compile", "--profile", "5"]) == 0
    out = capsys.readouterr().out
    prof = json.loads(out.strip().splitlines()[-1])["profile"]
    assert len(prof["top"]) == 5 and prof["categories"]["matmul"] > 0
    assert sum(prof["categories"].values()) == pytest.approx(prof["total_ms"], rel=1e-3)
    assert out.count("[profile]") == 6  # the category line and the five biggest
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention"
    assert kernel_category("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_splitK_NTN") == "matmul"
    assert kernel_category("_softcap_ce_kernel") == "triton"
    assert kernel_category("triton_poi_fused__scaled_mm__to_copy_clamp_t_view_19") == "triton"


def test_smear_backout_flags_reach_the_model_and_resume():
    import argparse

    from picochat.stages.pretrain import add_cli, config_from_cli, make_plan

    p = argparse.ArgumentParser()
    add_cli(p)
    cfg = config_from_cli(p.parse_args(TINY + ["--smear", "--backout"]))
    assert cfg.smear and cfg.backout
    mc = make_plan(cfg, 128, 1, torch.device("cpu")).model_config
    assert mc.smear and mc.backout
    plain = config_from_cli(p.parse_args(TINY + ["--no-smear", "--no-backout"]))
    assert not make_plan(plain, 128, 1, torch.device("cpu")).model_config.smear
    assert make_plan(config_from_cli(p.parse_args(TINY)), 128, 1, torch.device("cpu")).model_config.backout
    # trains, saves the flags in the checkpoint, and resumes (the saved model config must match this run's)
    part = run(_cfg("sb", smear=True, backout=True, num_iterations=4, stop_at_step=2, save_every=0))
    assert part["stopped_early"]
    state = load_model_state(latest_checkpoint(checkpoints_dir("sb", "base")))
    assert {"smear_gate.weight", "smear_lambda", "backout_lambda"} <= set(k.removeprefix("_orig_mod.") for k in state)
    rest = run(_cfg("sb", smear=True, backout=True, num_iterations=4, save_every=0))
    assert rest["step"] == 4 and rest["steps_this_run"] == 2 and math.isfinite(rest["val_bpb"])
    from picochat.config import UserError

    with pytest.raises(UserError, match="differs from this run"):  # the flags are part of the model identity
        run(_cfg("sb", smear=False, backout=False, num_iterations=6, save_every=0))


def test_activation_budget_and_fp8_flags_fail_clearly():
    from picochat.config import UserError
    from picochat.stages.pretrain import make_plan

    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match="--activation-budget"):
            make_plan(_cfg("ab", activation_budget=bad), 128, 1, torch.device("cpu"))
    with pytest.raises(UserError, match="--activation-budget"):
        training.maybe_compile(torch.nn.Linear(2, 2), True, torch.device("cpu"), activation_budget=-1.0)
    with pytest.raises(UserError, match="--fp8"):  # CPU has no fp8 tensor cores: refused before any training
        run(_cfg("fp8cpu", fp8=True))


# ----------------------------------------------------------------------------------------------------------------
# training.py pieces


def test_metrics_logger_truncates_after_resume_point(tmp_path):
    path = tmp_path / "m.jsonl"
    with training.MetricsLogger(path, enabled=True) as m:
        for s in range(1, 6):
            m.log({"step": s, "loss": float(s)})
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # torn line from a kill -9
    with training.MetricsLogger(path, resume_step=3, enabled=True) as m:
        m.log({"step": 4, "loss": 40.0})
    assert [(r["step"], r["loss"]) for r in training.read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                                             (4, 40.0)]


def test_heartbeat_and_step_line(capsys):
    with training.Heartbeat("pretrain", "compiling", interval=0.2):
        time.sleep(0.5)
    out = capsys.readouterr().out
    assert "[heartbeat] pretrain alive, compiling for" in out
    line = training.format_step_line(12, 100, 2.5, 0.5, 0.25, 123456.0, 0.42, 3725, 41.25)
    assert line == ("step 012/100 | loss 2.5000 | lrm 0.50 | dt 250ms | tok/s 123,456 | mfu 42.0% | eta 1h02m | "
                    "mem 41.2GB")


def test_stop_flag_and_rng_roundtrip():
    flag = training.StopFlag.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert flag.requested and flag.signame == "SIGTERM"
        with pytest.raises(SystemExit) as e:  # a second one does not wait for the step boundary
            flag._handle(signal.SIGTERM, None)
        assert e.value.code == 128 + signal.SIGTERM
    finally:
        flag.restore()
    st = training.capture_rng_state()
    a = torch.rand(3)
    training.restore_rng_state(st)
    assert torch.equal(torch.rand(3), a)
    with pytest.raises(training.NonFiniteLoss, match="step 7"):
        training.check_finite(float("inf"), 7)
    assert training.should_compile(None, torch.device("cpu")) is False


def test_real_loader_and_tokenizer_resume_exact_with_samples(tmp_path):
    """The tokenizing loader end to end: shards + BPE tokenizer; resume is exact through the loader's state and the
    batch held across the checkpoint; samples decode."""
    import random

    from picochat.data.shards import write_shards
    from picochat.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "saw", "bird", "sky", "blue"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + "." for _ in range(600)]
    data = tmp_path / "data"
    write_shards(docs, data, docs_per_shard=200, row_group=50)
    tok = Tokenizer.train(docs, vocab_size=300)
    tok.save(tmp_path / "tok")
    kw = dict(data=str(data), tokenizer=str(tmp_path / "tok"), sample_every=4, eval_every=2, save_every=0,
              num_iterations=4, loader_threads=1)
    full = run(_cfg("real_full", **kw))
    assert full["val_bpb"] is not None and math.isfinite(full["val_bpb"])
    run(_cfg("real_part", **{**kw, "stop_at_step": 2}))
    run(_cfg("real_part", **kw))
    assert _losses("real_full") == _losses("real_part")
    recs = training.read_metrics(Path(os.environ["PICOCHAT_HOME"]) / "runs" / "real_full" / "base" / "metrics.jsonl")
    assert any("sample" in r for r in recs) and [r["step"] for r in recs if "val_bpb" in r] == [2, 4]
