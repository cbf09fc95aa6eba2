"""Start-up: the compile cache's keying and folder, regional compilation = whole model, warm-up messages and the
start-up breakdown of a real (CPU) pretraining run."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from picochat import training, warmup
from picochat.config import UserError
from picochat.model import GPTConfig, build_model
from picochat.stages.pretrain import PretrainConfig, run

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def test_cache_key_changes_with_torch_and_names_the_device(monkeypatch):
    key = warmup.compile_cache_key(CPU)
    assert key.startswith(f"torch{torch.__version__.split('+')[0]}") and "cpu" in key
    assert all(c.isalnum() or c in "._-" for c in key)
    monkeypatch.setattr(torch, "__version__", "9.9.9+cu999 weird/name")
    other = warmup.compile_cache_key(CPU)
    assert other != key and other.startswith("torch9.9.9") and "/" not in other


def test_cache_folder_cold_then_warm_under_picochat_home():
    env: dict[str, str] = {}
    first = warmup.use_compile_cache(CPU, env)
    folder = Path(os.environ["PICOCHAT_HOME"]) / "cache" / "compile" / warmup.compile_cache_key(CPU)
    assert first == {"dir": str(folder), "state": "cold", "entries": 0}
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(folder) and env["TRITON_CACHE_DIR"] == str(folder / "triton")
    (folder / "fxgraph").mkdir()
    (folder / "fxgraph" / "entry").write_text("x")
    again = warmup.use_compile_cache(CPU, env)  # a second stage in the same process: still ours, now warm
    assert again["state"] == "warm" and again["entries"] == 1
    assert "warm, 1 files" in warmup.describe_cache(again)


def test_cache_respects_the_users_folder_and_the_off_switch(tmp_path):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")}
    got = warmup.use_compile_cache(CPU, env)
    assert got["state"] == "user" and env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert "TRITON_CACHE_DIR" not in env
    off = {warmup.CACHE_ENV: "off"}
    assert warmup.use_compile_cache(CPU, off)["state"] == "off" and "TORCHINDUCTOR_CACHE_DIR" not in off
    assert "PICOCHAT_COMPILE_CACHE=off" in warmup.describe_cache({"state": "off"})


def test_compile_scope_is_checked():
    assert warmup.compile_scope({}) == "model"
    assert warmup.compile_scope({warmup.SCOPE_ENV: "blocks"}) == "blocks"
    with pytest.raises(UserError, match="PICOCHAT_COMPILE_SCOPE='layers'.*'model'.*'blocks'"):
        warmup.compile_scope({warmup.SCOPE_ENV: "layers"})


def test_regional_compile_matches_the_eager_model_and_reuses_graphs():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=128, n_layer=4, n_head=2, n_kv_head=2, n_embd=64,
                    window_pattern="SL", value_embeds=True)
    eager = build_model(cfg)
    regional = copy.deepcopy(eager)
    idx = torch.randint(0, 128, (2, 32))
    with warmup.CompileWatch() as watch:
        out = warmup.compile_blocks(regional, backend="eager")
        loss = out(idx, idx)
        loss.backward()
    ref = eager(idx, idx)
    ref.backward()
    assert out is regional and list(regional.state_dict()) == list(eager.state_dict())
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(regional.blocks[1].mlp.c_fc.weight.grad, eager.blocks[1].mlp.c_fc.weight.grad, atol=1e-6)
    # four layers, but only (window kind x value-embed presence) block graphs plus the head
    assert 1 <= watch.graphs < cfg.n_layer + 1 + 1


def test_compile_watch_keeps_the_heartbeat_current():
    hb = training.Heartbeat("pretrain", "running the first step")
    fn = torch.compile(lambda x: x * 2 + 1, backend="eager")
    with warmup.CompileWatch({"state": "cold"}, hb) as watch:
        fn(torch.ones(3))
    assert watch.graphs == 1 and watch.compile_s >= 0
    assert hb.what == "compiling graph 1 (compile cache cold)"
    fn(torch.ones(3))  # after the watch: no longer counted
    assert watch.graphs == 1


def test_compile_watch_counts_cache_misses_then_hits(tmp_path, monkeypatch):
    """A warm folder is not a warm start: the watch counts what Inductor's cache actually served, and says so in
    the heartbeat and the start-up line."""
    pytest.importorskip("torch._inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))

    def f(x):
        return (x * 2 + 1).sin()

    hb = training.Heartbeat("pretrain", "running the first step")
    outcomes = []
    for _ in range(2):
        torch._dynamo.reset()  # a new process, as far as Dynamo's in-memory state goes
        with warmup.CompileWatch({"state": "warm"}, hb) as watch:
            torch.compile(f)(torch.ones(8))
            torch.compile(lambda x: f(x) * 3)(torch.ones(8))
        outcomes.append(watch.counts())
    assert outcomes[0]["misses"] == 2 and outcomes[0]["hits"] == 0, outcomes
    assert outcomes[1]["hits"] == 2 and outcomes[1]["misses"] == 0, outcomes
    assert hb.what == "compiling graph 2 (compile cache warm: 1 hits, 0 misses so far)"
    t0 = warmup.PROCESS_T0
    b = warmup.startup_breakdown({"setup": t0 + 1, "model": t0 + 2, "loop": t0 + 3}, watch, 5.0)
    assert (b["cache_hits"], b["cache_misses"], b["cache_bypassed"]) == (2, 0, 0)
    assert "cache warm: 2 hits, 0 misses, 0 bypassed)" in warmup.format_breakdown(b)


def test_startup_breakdown_adds_up():
    t0 = warmup.PROCESS_T0
    marks = {"setup": t0 + 2.0, "model": t0 + 3.5, "loop": t0 + 4.0}
    watch = warmup.CompileWatch({"state": "warm"})
    watch.graphs, watch.compile_s = 5, 12.25
    b = warmup.startup_breakdown(marks, watch, 20.0)
    assert b == {"start_s": 2.0, "model_s": 1.5, "setup_s": 0.5, "before_s": 0.0, "first_step_s": 20.0,
                 "total_s": 24.0, "graphs": 5, "compile_s": 12.25, "cache": "warm"}
    line = warmup.format_breakdown(b)
    assert line.startswith("[startup] first step done 24.0s after start") and "5 graphs in 12.2s, cache warm" in line
    assert "before the first step" not in line
    # time between the loop's start and the first step (an eval, say) is its own part: the parts add up
    b = warmup.startup_breakdown(marks, None, 20.0, now=t0 + 30.5)
    assert b["before_s"] == 6.5 and b["start_s"] + b["model_s"] + b["setup_s"] + 6.5 + 20.0 == b["total_s"] == 30.5
    assert "optimizer/data/resume 0.5s, before the first step 6.5s, first step 20.0s" in warmup.format_breakdown(b)
    # pretraining also splits the model phase: planning + building, then prepare_model's own parts
    b = warmup.startup_breakdown({**marks, "built": t0 + 2.25}, None, 20.0,
                                 parts={"dtype/fp8": 0.75, "attention plan": 0.02, "compile setup": 0.48})
    assert b["model_parts"] == {"plan + build": 0.25, "dtype/fp8": 0.75, "attention plan": 0.02, "compile setup": 0.48}
    line = warmup.format_breakdown(b)
    assert "model 1.5s (plan + build 0.2s, dtype/fp8 0.8s, compile setup 0.5s)" in line  # parts under 0.05 s left out


def test_pretraining_reports_its_startup(capsys):
    cfg = PretrainConfig(data="random", vocab_size=128, depth=2, aspect_ratio=32, head_dim=16, seq_len=32,
                         device_batch_size=2, total_batch_size=64, run="startup", num_iterations=2, eval_every=0,
                         eval_tokens=128, sample_every=-1, save_every=0)
    out = run(cfg)
    assert out["startup"]["first_step_s"] >= 0 and out["startup"]["total_s"] >= out["startup"]["first_step_s"]
    assert "graphs" not in out["startup"]  # not compiled on a CPU by default
    assert set(out["startup"]["model_parts"]) == {"plan + build", "dtype/fp8", "attention plan",
                                                  "compile cache + artifacts", "compile setup"}
    assert "[startup] first step done" in capsys.readouterr().out
    recs = [json.loads(line) for line in (Path(os.environ["PICOCHAT_HOME"]) / "runs" / "startup" / "base" /
                                          "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "startup" in r] == [1]


class _Info:
    artifacts = {"inductor": ["a", "b"], "aot_autograd": ["c"]}


def test_compile_artifacts_saved_with_the_run_and_loaded_by_its_next_start(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # no cache folder: no marker, always loaded
    blob, loaded = b"compiled-artifacts", []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (blob, _Info()))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data) or _Info())
    assert warmup.load_artifacts(tmp_path, CPU)["loaded"] == 0 and loaded == []  # nothing saved yet
    path = tmp_path / "compile" / f"{warmup.compile_cache_key(CPU)}.bin"
    assert warmup.save_artifacts(tmp_path, CPU) == {"file": str(path), "bytes": len(blob), "artifacts": 3}
    assert path.read_bytes() == blob and [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left
    assert warmup.load_artifacts(tmp_path, CPU)["loaded"] == 3 and loaded == [blob]
    monkeypatch.setattr(warmup, "compile_cache_key", lambda device: "torch0-other_gpu")  # another machine's key
    assert warmup.load_artifacts(tmp_path, CPU)["loaded"] == 0 and len(loaded) == 1


def test_bad_compile_artifacts_cost_a_cold_compile_not_the_run(tmp_path, monkeypatch, capsys):
    path = warmup.artifacts_file(tmp_path, CPU)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")

    def broken(data):
        raise ValueError("unpickling failed")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", broken)
    assert warmup.load_artifacts(tmp_path, CPU)["loaded"] == 0
    assert "ignoring the saved compile artifacts" in capsys.readouterr().out

    def full_disk():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", full_disk)
    assert warmup.save_artifacts(tmp_path, CPU) is None and path.read_bytes() == b"garbage"
    assert "could not save the compile artifacts" in capsys.readouterr().out


def test_first_step_report_saves_the_artifacts(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"x", _Info()))
    logged = []

    class Metrics:
        def log(self, record):
            logged.append(record)

    now = 1e9
    info = {"compiled": True, "device": CPU, "marks": {"setup": now - 3, "model": now - 2, "loop": now - 1},
            "artifacts": {"folder": str(tmp_path), "loaded": 0}}
    b = warmup.report_startup(info, warmup.CompileWatch(), 1, 0.5, Metrics(), now=now)
    assert b["artifacts_saved"] == 3 and logged[0]["startup"]["artifacts_saved"] == 3
    assert warmup.artifacts_file(tmp_path, CPU).read_bytes() == b"x"


@pytest.mark.parametrize("art", [{"loaded": 3}, {"loaded": 0, "in_cache": True}], ids=["loaded", "in_cache"])
def test_a_start_that_loaded_the_artifacts_does_not_write_them_again(tmp_path, monkeypatch, art):
    """Loaded by this start, or already in its compile cache (the marker): writing them again would only cost time."""
    def no_save():
        raise AssertionError("saved although the artifacts were loaded or already in the cache")

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", no_save)

    class Metrics:
        def log(self, record):
            pass

    now = 1e9
    info = {"compiled": True, "device": CPU, "marks": {"setup": now - 3, "model": now - 2, "loop": now - 1},
            "artifacts": {"folder": str(tmp_path), **art}}
    assert "artifacts_saved" not in warmup.report_startup(info, warmup.CompileWatch(), 1, 0.5, Metrics(), now=now)


def test_a_graph_holding_the_fused_loss_is_served_by_the_autograd_cache(tmp_path, monkeypatch):
    """The training graph holds torch.autograd.Functions (the fused loss here); AOTAutograd's cache bypasses such a
    graph unless `cache_autograd_functions` allows it, and a warm start then re-traces forward + backward."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config

    from picochat.ops.loss import fused_linear_cross_entropy

    if not hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
        pytest.skip("this torch has no switch for caching graphs with autograd.Functions")
    monkeypatch.setattr(functorch_config, "autograd_cache_allow_custom_autograd_functions", False)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", env["TORCHINDUCTOR_CACHE_DIR"])
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert warmup.cache_autograd_functions({warmup.AUTOGRAD_FN_ENV: "0"}) is False  # torch's own switch wins
    assert warmup.use_compile_cache(CPU, env)["state"] == "user"
    assert functorch_config.autograd_cache_allow_custom_autograd_functions is True

    def loss_fn(x, w, t):
        return fused_linear_cross_entropy(torch.tanh(x), w, t, vocab_size=24, softcap=15.0)

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 8, generator=g), torch.randn(32, 8, generator=g)
    t = torch.randint(0, 24, (16,), generator=g)
    got = []
    for _ in range(2):
        torch._dynamo.reset()  # a new process, as far as Dynamo's in-memory state goes
        before = dict(counters["aot_autograd"])
        xs = x.clone().requires_grad_()
        loss = torch.compile(loss_fn)(xs, w, t)
        loss.backward()
        got.append({k: counters["aot_autograd"][k] - before.get(k, 0) for k in
                    ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")} | {"grad": xs.grad})
    assert got[0]["autograd_cache_bypass"] == 0 and got[0]["autograd_cache_miss"] == 1, got
    assert got[1]["autograd_cache_hit"] == 1 and got[1]["autograd_cache_bypass"] == 0, got
    torch.testing.assert_close(got[0]["grad"], got[1]["grad"], rtol=0, atol=0)


def test_artifacts_already_in_the_compile_cache_are_not_loaded_again(tmp_path, monkeypatch):
    """Loading a run's artifacts into the cache that produced (or already loaded) them costs seconds for nothing: a
    marker in the cache folder, keyed by the file's path, size and mtime, skips it; another cache folder (a new
    machine) or a rewritten file loads."""
    blob, loaded = b"compiled-artifacts", []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (blob, _Info()))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data) or _Info())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache_a"))
    run = tmp_path / "run"
    warmup.save_artifacts(run, CPU)
    got = warmup.load_artifacts(run, CPU)
    assert got["in_cache"] and got["loaded"] == 0 and loaded == []  # this cache compiled them
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache_b"))  # a new machine's empty cache
    assert warmup.load_artifacts(run, CPU)["loaded"] == 3 and len(loaded) == 1
    assert warmup.load_artifacts(run, CPU)["in_cache"] and len(loaded) == 1  # loaded once per cache
    path = warmup.artifacts_file(run, CPU)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # rewritten by a later process
    assert warmup.load_artifacts(run, CPU)["loaded"] == 3 and len(loaded) == 2


def test_an_eager_stage_does_not_import_dynamo_to_watch_it():
    """Importing Dynamo costs seconds: a stage that compiles nothing keeps it out (on an H100 an eager SFT start
    spent 6.5 s outside every part of its start-up line)."""
    import subprocess
    import sys

    code = ("import sys; from picochat import warmup\n"
            "with warmup.CompileWatch(compiled=False) as w: pass\n"
            "print('torch._dynamo' in sys.modules, w.counts())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "{}"], out.stdout + out.stderr
