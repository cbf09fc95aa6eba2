"""picochat launch: planning (pure), the no-libuv store patch, and real multi-process launches on CPU (gloo).

The libuv-less build is simulated with a sitecustomize shim on PYTHONPATH: in every Python process it replaces
torch.distributed.TCPStore by a subclass that raises, like a torch built without libuv, whenever a store is made
with use_libuv=True (torch's default). A bare torchrun then fails; `picochat launch` must still work.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from picochat.config import UserError
from picochat.tools.launch import no_libuv_stores, parse_launch_args, plan_launch, worker_env

REPO = Path(__file__).resolve().parent.parent

SHIM = textwrap.dedent('''
    """Simulate a torch built without libuv: any TCPStore asked for libuv raises like the real build does."""
    import sys
    import torch.distributed as _dist

    _Real = _dist.TCPStore

    class TCPStore(_Real):
        def __init__(self, *args, **kwargs):
            use = args[8] if len(args) > 8 else kwargs.get("use_libuv", True)
            if use:
                raise RuntimeError("use_libuv was requested but PyTorch was build without libuv support, "
                                   "run with USE_LIBUV=0 to disable it.")
            super().__init__(*args, **kwargs)

    for _m in list(sys.modules.values()):
        if getattr(_m, "TCPStore", None) is _Real:
            setattr(_m, "TCPStore", TCPStore)
''')


def _plan(argv, env=None):
    return plan_launch(parse_launch_args(argv), env=env if env is not None else {})


def _env(**extra):
    env = dict(os.environ)
    env.pop("USE_LIBUV", None)
    env.update(PICOCHAT_DEVICE="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(out: Path, n: int) -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert len(files) == n, f"expected {n} rank files, got {[f.name for f in files]}"
    return [json.loads(f.read_text()) for f in files]


# ---------------------------------------------------------------------------------------------------------------
# Planning


def test_single_node_plan():
    p = _plan(["--nproc-per-node", "2", "--libuv", "on", "pretrain", "--depth", "4"])
    a = p.torchrun_args
    assert "--nproc-per-node=2" in a and "--nnodes=1" in a and "--rdzv-backend=c10d" in a
    assert "--rdzv-endpoint=127.0.0.1:0" in a  # the OS picks a free port atomically
    assert p.argv[-5:] == ["-m", "picochat", "pretrain", "--depth", "4"]
    assert p.env["OMP_NUM_THREADS"] and p.env["PYTHONUNBUFFERED"] == "1"
    assert p.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and "USE_LIBUV" not in p.env
    assert str(REPO) in p.env["PYTHONPATH"].split(os.pathsep)
    # CPU "auto" is one process; a pinned port is honoured
    p = _plan(["--nproc-per-node", "auto", "--master-port", "29511", "--libuv", "on", "doctor"])
    assert p.nproc_per_node == 1 and "--rdzv-endpoint=127.0.0.1:29511" in p.torchrun_args


def test_stage_flags_are_never_taken_for_launcher_flags():
    # `--run` is a prefix of torchrun's --run-path, `--log` of our --log-dir, `--dry-run` is ours: all belong to the stage
    stage = ["pretrain", "--run", "x", "--log", "3", "--dry-run", "--nnodes", "9"]
    args = parse_launch_args(["-n", "1", "--libuv", "on"] + stage)
    assert args.stage_args == stage and not args.dry_run and args.nnodes == "1"
    p = plan_launch(args, env={})
    assert p.script_args == stage
    from torch.distributed.run import parse_args

    assert parse_args(p.torchrun_args).training_script == "picochat"  # the options alone parse cleanly


def test_multi_node_plan_and_validation():
    p = _plan(["-n", "8", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "j7",
               "--libuv", "on", "pretrain"])
    a = p.torchrun_args
    assert "--rdzv-endpoint=node0:29400" in a and "--rdzv-id=j7" in a and "--rdzv-conf=is_host=0" in a
    p = _plan(["-n", "1", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "node0", "--libuv", "on",
               "pretrain"], env={"SLURM_JOB_ID": "123"})
    assert "--rdzv-endpoint=node0:29400" in p.torchrun_args and "--rdzv-id=123" in p.torchrun_args
    assert "--rdzv-conf=is_host=1" in p.torchrun_args
    p = _plan(["-n", "2", "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "static", "--master-addr", "n0",
               "--libuv", "on", "sft"])
    assert {"--rdzv-backend=static", "--node-rank=1", "--master-addr=n0", "--master-port=29400"} <= set(
        p.torchrun_args)
    bad = [
        ["-n", "2", "--nnodes", "2", "pretrain"],               # multi-node without an endpoint
        ["-n", "0", "pretrain"], ["-n", "lots", "pretrain"],
        ["--nnodes", "x", "pretrain"],
        ["-n", "1", "--nnodes", "2", "--rdzv-endpoint", "h:notaport", "pretrain"],
        ["-n", "1", "nosuchstage"], ["-n", "1"],
        ["-n", "2", "speedrun", "--preset", "tiny"],            # speedrun launches its own stages
    ]
    for argv in bad:
        with pytest.raises(UserError):
            _plan(argv + ["--libuv", "on"] if argv[-1] != "1" else argv)


def test_no_libuv_plan_covers_every_store_path():
    p = _plan(["-n", "2", "--libuv", "off", "pretrain"])
    assert p.libuv is False and p.env["USE_LIBUV"] == "0"  # env:// store and the static rendezvous store
    assert "--rdzv-conf=is_host=1,use_libuv=0" in p.torchrun_args  # c10d rendezvous (older torch reads it)
    assert p.argv[-5:] == ["-m", "picochat.tools.launch", "_worker", "picochat", "pretrain"]  # worker stores
    # an explicit USE_LIBUV=0 from the user is trusted without probing
    assert _plan(["-n", "1", "doctor"], env={"USE_LIBUV": "0"}).libuv is False


def test_worker_env_keeps_user_settings():
    env = worker_env({"OMP_NUM_THREADS": "7", "PYTHONPATH": "/x"}, nproc=4, use_cuda=True, libuv=True)
    assert "OMP_NUM_THREADS" not in env and env["PYTHONPATH"].split(os.pathsep)[0] == "/x"
    assert worker_env({}, nproc=4, use_cuda=True, libuv=True)["OMP_NUM_THREADS"] == "1"


def test_no_libuv_stores_patches_and_restores():
    import datetime

    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as c10d_backend

    real = dist.TCPStore
    with no_libuv_stores():
        assert dist.TCPStore is not real and c10d_backend.TCPStore is dist.TCPStore
        s = dist.TCPStore("127.0.0.1", 0, 1, True, datetime.timedelta(seconds=5), wait_for_workers=False)
        assert s.libuvBackend is False and isinstance(s, real)
        s2 = dist.TCPStore("127.0.0.1", 0, 1, True, datetime.timedelta(seconds=5), False, False, None, True)
        assert s2.libuvBackend is False  # positional use_libuv=True is overridden too
        assert os.environ["USE_LIBUV"] == "0"
    os.environ.pop("USE_LIBUV", None)
    assert dist.TCPStore is real and c10d_backend.TCPStore is real


def test_dry_run_prints_command(capsys):
    from picochat.cli import main

    assert main(["launch", "-n", "2", "--libuv", "off", "--dry-run", "pretrain", "--depth", "4"]) == 0
    out = capsys.readouterr().out
    assert "USE_LIBUV=0" in out and "torch.distributed.run" in out and "pretrain --depth 4" in out
    os.environ.pop("USE_LIBUV", None)


# ---------------------------------------------------------------------------------------------------------------
# Real launches (gloo on CPU)


@pytest.fixture
def no_libuv_shim(tmp_path):
    d = tmp_path / "shim"
    d.mkdir()
    (d / "sitecustomize.py").write_text(SHIM)
    return d


def test_launch_works_on_a_torch_without_libuv(tmp_path, no_libuv_shim):
    env = _env(PYTHONPATH=os.pathsep.join([str(no_libuv_shim), str(REPO)]))
    # the shim bites: plain torchrun cannot even create its rendezvous store
    bare = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "-m", "tests.dist_probe", str(tmp_path / "bare")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "without libuv" in bare.stdout + bare.stderr
    assert not (tmp_path / "bare").exists()
    # picochat launch probes, notices, and disables libuv everywhere
    out = tmp_path / "ok"
    r = subprocess.run([sys.executable, "-m", "picochat", "launch", "--nproc-per-node", "2", "--module",
                        "tests.dist_probe", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no libuv" in r.stderr
    res = _results(out, 2)
    assert [x["rank"] for x in res] == [0, 1]
    assert all(x["world_size"] == 2 and x["sum"] == 3.0 for x in res)
    assert all(x["use_libuv_env"] == "0" and x["libuv"] is False for x in res)


def test_two_nodes_on_one_machine_c10d(tmp_path):
    """Two launcher processes (2 nodes x 1 process) meet at a c10d rendezvous on 127.0.0.1 and all_reduce."""
    port, out = _free_port(), tmp_path / "two"
    env = _env(PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "picochat", "launch", "--nproc-per-node", "1", "--nnodes", "2",
                               "--node-rank", str(r), "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t2n",
                               "--module", "tests.dist_probe", str(out)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        finally:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)
    res = _results(out, 2)
    assert {x["rank"] for x in res} == {0, 1} and all(x["world_size"] == 2 and x["sum"] == 3.0 for x in res)
    assert len({x["pid"] for x in res}) == 2


# ---------------------------------------------------------------------------------------------------------------
# Reliability: the local equivalent of a preempted job


@pytest.mark.slow
def test_sigterm_mid_run_then_rerun_continues_from_the_last_checkpoint(tmp_path):
    """SIGTERM `picochat launch ... pretrain` mid-run (what SLURM/Modal/spot preemption send), re-run the same
    command, and check it continued from the last checkpoint instead of starting over."""
    if importlib.util.find_spec("picochat.stages.pretrain") is None:
        pytest.skip("picochat pretrain is not there yet")
    import signal
    import time

    home = tmp_path / "home"
    env = _env(PICOCHAT_HOME=str(home), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "picochat", "launch", "--nproc-per-node", "1", "pretrain", "--run", "pre",
           "--data", "random", "--vocab-size", "256", "--depth", "2", "--head-dim", "32", "--seq-len", "32",
           "--device-batch-size", "2", "--total-batch-size", "64", "--num-iterations", "30", "--save-every", "2",
           "--eval-every", "0", "--eval-tokens", "256", "--sample-every", "-1", "--warmup-steps", "2"]
    ckpts = home / "runs" / "pre" / "base" / "checkpoints"
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (ckpts / "step_000002" / "meta.json").exists():  # one periodic checkpoint, then "preempt"
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        log1 = first.communicate(timeout=120)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, log1
    assert "[signal] SIGTERM" in log1
    steps = sorted(int(p.name[5:]) for p in ckpts.glob("step_*") if p.name[5:].isdigit())
    stopped_at = steps[-1]
    assert 2 <= stopped_at < 30, (steps, log1)  # stopped early, at a step boundary, with a checkpoint
    metrics = home / "runs" / "pre" / "base" / "metrics.jsonl"
    n_before = len(metrics.read_text().splitlines())

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    new = [json.loads(line) for line in metrics.read_text().splitlines()[n_before:]]
    train_steps = [m["step"] for m in new if "loss" in m]
    assert train_steps[0] == stopped_at + 1 and train_steps[-1] == 30, train_steps  # nothing lost, nothing redone
    final = json.loads((ckpts / "step_000030" / "meta.json").read_text())
    assert final["step"] == 30
