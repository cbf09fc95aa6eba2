"""launch/modal_app.py offline: the app and its functions are defined without credentials; the Modal-independent
logic (GPU validation, commands, the plan and its confirmation, streaming with heartbeat and commit triggers,
wipe-once, the run lock, continuation past the time limit, task bodies) runs locally on CPU."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APP_FILE = REPO / "launch" / "modal_app.py"


@pytest.fixture(scope="module")
def m():
    spec = importlib.util.spec_from_file_location("picochat_modal_app", APP_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_module_does_not_import_picochat():
    src = APP_FILE.read_text()
    assert "import picochat" not in src and "from picochat" not in src


def test_app_image_and_functions_defined_offline(m):
    pytest.importorskip("modal")
    import modal

    assert isinstance(m.app, modal.App) and isinstance(m.image, modal.Image)
    for name in ("prepare", "plan", "train", "smoke", "doctor", "pipeline", "serve", "main"):
        assert getattr(m, name) is not None
    assert isinstance(m.volume, modal.Volume)
    spec = getattr(m.train, "_spec_", None)  # private in modal 1.x; checked only when present
    if spec is not None:
        assert spec.gpus == "H100:8" and "/vol" in spec.volumes
        assert getattr(m.prepare, "_spec_").gpus is None  # downloads and tokenizer training bill no GPU
        assert getattr(m.plan, "_spec_").gpus is None  # the plan is printed before any GPU starts
    reqs = m.project_requirements()
    assert m.TORCH_SPEC in reqs and any(r.startswith("tiktoken") for r in reqs)
    assert any(r.startswith("fastapi") for r in reqs)  # serve extra is in the image


def test_modal_cli_help_offline(m):
    if shutil.which("modal") is None:
        pytest.skip("modal CLI not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    out = subprocess.run(["modal", "run", str(APP_FILE), "--help"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for opt in ("--task", "--preset", "--gpu", "--force-restart", "--max-steps", "--run", "--yes", "--price"):
        assert opt in out.stdout


@pytest.mark.parametrize("spec,expected", [("H100:8", ("H100", 8)), ("h100", ("H100", 1)), ("A100:8", ("A100", 8)),
                                           ("a100-80gb:4", ("A100-80GB", 4)), ("H100!:8", ("H100!", 8)),
                                           (" L4:2 ", ("L4", 2))])
def test_parse_gpu_valid(m, spec, expected):
    assert m.parse_gpu(spec) == expected


@pytest.mark.parametrize("spec,needle", [("H100:9", "1 to 8"), ("A10:8", "1 to 4"), ("H100:0", "1 to 8"),
                                         ("V100:8", "unknown GPU type"), ("", "unknown GPU type"),
                                         ("H100:x", "must be a number"), ("H100:8:2", "must be a number")])
def test_parse_gpu_invalid(m, spec, needle):
    with pytest.raises(m.ModalAppError, match=needle):
        m.parse_gpu(spec)


def test_commands(m):
    cmd = m.speedrun_command("d20", "d20", force_restart=True, max_steps=5)
    assert cmd[:3] == [sys.executable, "-m", "picochat"]
    assert cmd[3:] == ["speedrun", "--preset", "d20", "--run", "d20", "--max-steps", "5", "--force-restart", "--yes"]
    fetch, smoke = m.smoke_commands("d32", "smoke-d32", "/vol")
    # one shard (plus the validation shard), never the preset's dataset; a small tokenizer trained on a few MB
    assert fetch[3:] == ["data", "download", "--shards", "1", "--out", "/vol/data/fineweb"]
    assert "--max-steps" in smoke and smoke[smoke.index("--max-steps") + 1] == "10"
    assert smoke[smoke.index("--stages") + 1] == "tokenizer,pretrain"  # no data stage: no background download
    assert smoke[smoke.index("--data-dir") + 1] == "/vol/data/fineweb"
    assert f"tokenizer.vocab-size={m.SMOKE_VOCAB}" in smoke
    assert f"tokenizer.max-chars={m.SMOKE_TOKENIZER_CHARS}" in smoke
    (tiny,) = m.smoke_commands("tiny", "smoke-tiny", "/vol")
    assert tiny[tiny.index("--stages") + 1] == "data,tokenizer,pretrain"  # the embedded corpus
    plan = m.plan_command("d20", "d20", "H100!:8")
    assert plan[3:] == ["speedrun", "--dry-run", "--preset", "d20", "--run", "d20", "--gpus", "H100:8", "--price",
                        "3.95"]
    assert m.plan_command("d20", "d20", "L4:2", price=1.5)[-2:] == ["--price", "1.5"]
    with pytest.raises(m.ModalAppError):
        m.speedrun_command("d99", "x")
    with pytest.raises(m.ModalAppError):
        m.speedrun_command("d20", "../etc")
    assert m.serve_command(8000, "--run d20")[-2:] == ["--run", "d20"]


def test_container_env_puts_everything_on_the_volume(m, tmp_path):
    env = m.container_env(str(tmp_path), "H100", base={})
    assert env["PICOCHAT_HOME"] == str(tmp_path)
    for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HF_HOME"):
        assert env[k].startswith(str(tmp_path))
    assert "torch-" in env["TRITON_CACHE_DIR"] and "h100" in env["TRITON_CACHE_DIR"]


def test_force_restart_wipes_once_per_top_level_invocation(m, tmp_path):
    vol, commits = str(tmp_path), []
    run = tmp_path / "runs" / "d20"
    (run / "base").mkdir(parents=True)
    (run / "old.txt").write_text("from before")
    other = tmp_path / "runs" / "d12"
    other.mkdir(parents=True)
    assert m.wipe_once(vol, "d20", "inv-1", commit=lambda: commits.append(1)) is True
    assert not run.exists() and other.exists() and commits == [1]
    run.mkdir(parents=True)
    (run / "new-checkpoint").write_text("trained since the wipe")
    # a retry, a restarted pipeline or a continuation call: same invocation, the checkpoints stay
    assert m.wipe_once(vol, "d20", "inv-1") is False and (run / "new-checkpoint").exists()
    assert m.wipe_once(vol, "d20", "inv-2") is True and not run.exists()  # the next top-level `modal run`
    assert m.new_invocation_id() != m.new_invocation_id()


def test_run_lock_one_trainer_per_run(m, tmp_path):
    vol = str(tmp_path)
    a = m.RunLock(vol, "d20", "inv-1", owner="container-a", beat_s=0.1).acquire()
    with pytest.raises(m.RunLocked, match="container-a"):
        m.RunLock(vol, "d20", "inv-2", owner="container-b").acquire()
    time.sleep(0.35)  # heartbeats keep it fresh
    with pytest.raises(m.RunLocked):
        m.RunLock(vol, "d20", "inv-2", owner="container-b", stale_s=0.3).acquire()
    with m.RunLock(vol, "d12", "inv-2", owner="container-b"):  # another run is free
        pass
    a.release()
    assert not a.path.exists()
    with m.RunLock(vol, "d20", "inv-2", owner="container-b") as b:
        assert b.holder()["owner"] == "container-b"
    # a container that died holding the lock: stale after stale_s, taken over
    dead = m.RunLock(vol, "d20", "inv-3", owner="container-dead")
    dead._write()
    time.sleep(0.3)
    with m.RunLock(vol, "d20", "inv-4", owner="container-c", stale_s=0.2) as c:
        assert c.holder()["owner"] == "container-c"
        dead.release()  # releasing a lock it no longer owns removes nothing
        assert c.holder()["owner"] == "container-c"
    # a garbled lock file (a container killed mid-write would leave a temp file, not this) is not a live lock
    a.path.write_text("{not json")
    with m.RunLock(vol, "d20", "inv-5", owner="container-d"):
        pass


def test_lock_race_check_after_write(m, tmp_path):
    """Two containers writing at once: after commit + reload, the one whose write did not stick gives up."""
    reloads = []

    def reload():  # the first reload sees a free run; by the second, the other container's write has landed
        reloads.append(1)
        if len(reloads) == 2:
            other._write()

    lock = m.RunLock(str(tmp_path), "d20", "inv-1", owner="me", settle_s=0.01, reload=reload)
    other = m.RunLock(str(tmp_path), "d20", "inv-9", owner="them")
    with pytest.raises(m.RunLocked, match="same moment"):
        lock.acquire()


def test_confirm_before_gpus(m):
    assert m.confirm("start?", yes=True, interactive=False)
    with pytest.raises(m.ModalAppError, match="--yes"):
        m.confirm("start?", yes=False, interactive=False)
    assert m.confirm("start?", yes=False, ask=lambda q: "y", interactive=True)
    assert not m.confirm("start?", yes=False, ask=lambda q: "", interactive=True)


def test_plan_body_prints_every_stage_with_dollars(m, tmp_path):
    text = m.plan_body("d12", "d12", "H100:8", str(tmp_path))
    for stage in ("data", "tokenizer", "pretrain", "base_eval", "midtrain", "sft", "chat_eval"):
        assert f"\n  {stage} " in text, stage
    assert "8 x H100" in text and "$3.95/GPU-hour" in text and "all-reduce" in text


MICRO = ("--set", "pretrain.data=random", "--set", "pretrain.vocab-size=128", "--set", "pretrain.depth=2",
         "--set", "pretrain.aspect-ratio=32", "--set", "pretrain.head-dim=16", "--set", "pretrain.seq-len=32",
         "--set", "pretrain.device-batch-size=2", "--set", "pretrain.total-batch-size=64",
         "--set", "pretrain.num-iterations=1500", "--set", "pretrain.eval-every=0", "--set", "pretrain.save-every=0",
         "--set", "pretrain.sample-every=-1")


def test_a_call_past_its_time_limit_continues_in_the_next_without_a_second_wipe(m, tmp_path, monkeypatch):
    vol = tmp_path / "vol"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (vol / "runs" / "r" / "stale").mkdir(parents=True)
    first = m.train_body("tiny", "r", str(vol), force_restart=True, stages="pretrain", invocation="inv-1",
                         time_left_s=12, margin_s=0, extra=MICRO, heartbeat_s=5)
    assert first == "continue"
    assert not (vol / "runs" / "r" / "stale").exists()  # wiped by the first call
    ckpts = sorted((vol / "runs" / "r" / "base" / "checkpoints").glob("step_*"))
    assert ckpts, "the first call stopped without a checkpoint"
    stopped_at = int(ckpts[-1].name.split("_")[1])
    assert 0 < stopped_at < 1500
    assert not (vol / ".modal" / "locks" / "r.json").exists()  # released for the next call
    second = m.train_body("tiny", "r", str(vol), force_restart=True, stages="pretrain", invocation="inv-1",
                          time_left_s=600, margin_s=0, extra=MICRO, heartbeat_s=5)
    assert second == "done"
    metrics = (vol / "runs" / "r" / "base" / "metrics.jsonl").read_text()
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in metrics.splitlines() if '"loss"' in line]
    assert steps == list(range(1, 1501))  # continued from the checkpoint: not wiped, nothing trained twice


def test_train_refuses_a_run_another_container_holds(m, tmp_path):
    m.RunLock(str(tmp_path), "r", "inv-1", owner="container-a")._write()
    with pytest.raises(m.RunLocked, match="container-a"):
        m.train_body("tiny", "r", str(tmp_path), force_restart=True, invocation="inv-2")
    assert (tmp_path / ".modal" / "locks" / "r.json").exists()


CHILD = r'''
import os, sys, time
from pathlib import Path
w = sys.stdout.buffer
w.write(b"starting"); w.flush()                      # a partial line, then silence
time.sleep(0.6)
w.write(b" done\n"); w.flush()
w.write("caf\u00e9 ".encode()[:4]); w.flush()         # a UTF-8 character split across writes
time.sleep(0.05)
w.write("caf\u00e9 ".encode()[4:] + b"ok\n"); w.flush()
w.write(b"progress 1\rprogress 2\r\nline\n"); w.flush()
ck = Path(os.environ["VOLDIR"]) / "runs" / "r" / "base" / "checkpoints" / "step_000010"
ck.mkdir(parents=True); (ck / "meta.json").write_text("{}")
time.sleep(0.7)                                      # the directory poll sees it
print("[checkpoint] saved step 20", flush=True)
time.sleep(0.1)
sys.stderr.write("tail without newline"); sys.stderr.flush()
sys.exit(3)
'''


def test_stream_partial_lines_silence_heartbeat_and_commits(m, tmp_path):
    lines, reasons = [], []
    env = dict(os.environ, VOLDIR=str(tmp_path))
    rc = m.stream([sys.executable, "-c", CHILD], env=env, heartbeat_s=0.25, partial_flush_s=10.0,
                  on_checkpoint=reasons.append, watch_dir=str(tmp_path), poll_s=0.2, emit=lines.append,
                  forward_signals=False)
    assert rc == 3
    out = [l for l in lines if not l.startswith("[HEARTBEAT]")]
    assert out[:6] == ["starting done", "café ok", "progress 1", "progress 2", "line", "[checkpoint] saved step 20"]
    assert out[6] == "tail without newline"  # stderr merged; the unterminated tail is not lost
    assert out[-1].startswith("[modal]") and "code 3" in out[-1]
    assert any(l.startswith("[HEARTBEAT]") for l in lines)  # during the silent 0.6 s after a partial line
    assert "new checkpoint on disk" in reasons and "checkpoint line" in reasons and reasons[-1] == "exit"


def test_stream_flushes_a_partial_line_during_long_silence(m):
    lines = []
    code = "import sys,time; sys.stdout.write('waiting for GPUs...'); sys.stdout.flush(); time.sleep(0.8); print('!')"
    rc = m.stream([sys.executable, "-c", code], heartbeat_s=0.3, partial_flush_s=0.2, emit=lines.append,
                  forward_signals=False)
    assert rc == 0
    i = lines.index("waiting for GPUs...")
    assert any(l.startswith("[HEARTBEAT]") for l in lines[i:]) and "!" in lines


def test_stream_forwards_sigterm_to_the_job(m):
    """Preemption: the job gets the signal, checkpoints, exits; the stream reports its exit code."""
    code = ("import signal,sys,time\n"
            "def h(s,f): print('saving checkpoint', flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, h)\nprint('ready', flush=True)\ntime.sleep(30)\n")
    lines = []

    def emit(line):
        lines.append(line)
        if line == "ready":
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()

    t = time.monotonic()
    rc = m.stream([sys.executable, "-c", code], heartbeat_s=5, emit=emit)
    assert rc == 0 and "saving checkpoint" in lines and time.monotonic() - t < 20
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or callable(
        signal.getsignal(signal.SIGTERM))


def test_run_task_runs_the_cli_with_the_volume_as_home(m, tmp_path):
    """The local body: a real picochat command to completion, PICOCHAT_HOME = the volume dir, commit at exit."""
    vol = tmp_path / "vol"
    commits = []
    cmd = m.picochat_cmd("data", "synth", "--n-docs", "2048", "--docs-per-shard", "1024", "--n-chat-train", "50",
                         "--n-chat-val", "10", "--n-eval", "20")
    rc = m.run_task(cmd, str(vol), commit=lambda: commits.append(1), heartbeat_s=5)
    assert rc == 0 and commits
    assert list((vol / "data" / "synth").glob("shard_*.parquet"))
    with pytest.raises(RuntimeError, match="re-run the same command"):
        m.run_task(m.picochat_cmd("no-such-command"), str(vol), heartbeat_s=5)
