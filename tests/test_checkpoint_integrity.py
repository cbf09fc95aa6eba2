"""Checkpoints verify themselves: a damaged file is named and skipped (resume falls back and still ends bit-exact),
`--resume never` deletes nothing, one process per run and stage, a full disk is one line that loses nothing, and
paths survive a moved PICOCHAT_HOME."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from picochat import checkpoint, training
from picochat.checkpoint import (checkpoints_dir, latest_checkpoint, list_checkpoints, load_model, prune_checkpoints,
                                 read_meta, save_checkpoint, update_meta, verify_checkpoint)
from picochat.config import UserError
from picochat.model import GPTConfig, build_model
from picochat.runtime import default_tokenizer_dir, picochat_home, stage_dir
from picochat.stages.pretrain import PretrainConfig, run
from picochat.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TINY = ["--data", "random", "--vocab-size", "128", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "16",
        "--seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "128", "--lr-scale", "1",
        "--warmup-steps", "2", "--weight-decay", "0.05", "--eval-tokens", "256", "--sample-every", "-1",
        "--eval-every", "0"]


def _cfg(run_name, **kw):
    base = dict(data="random", vocab_size=128, depth=2, aspect_ratio=32, head_dim=16, seq_len=32, device_batch_size=2,
                total_batch_size=128, lr_scale=1.0, warmup_steps=2, weight_decay=0.05, eval_tokens=256,
                sample_every=-1, run=run_name, num_iterations=8, eval_every=0, save_every=2, keep_last=2)
    base.update(kw)
    return PretrainConfig(**base)


def _losses(run_name, home=None):
    home = Path(home or os.environ["PICOCHAT_HOME"])
    recs = training.read_metrics(home / "runs" / run_name / "base" / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The loss of every step of an uninterrupted 8-step run (computed once, in a home of its own)."""
    home = tmp_path_factory.mktemp("ref_home")
    old = os.environ.get("PICOCHAT_HOME")
    os.environ["PICOCHAT_HOME"] = str(home)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(_cfg("ref"))
    finally:
        torch.set_num_threads(n)
        if old is None:
            del os.environ["PICOCHAT_HOME"]
        else:
            os.environ["PICOCHAT_HOME"] = old
    losses = _losses("ref", home)
    assert sorted(losses) == list(range(1, 9))
    return losses


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock"}


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    elif how == "garbage":
        path.write_text("{not json")
    else:
        raise AssertionError(how)


CASES = [(f, how) for f in ("model.pt", "optim_rank0.pt", "state_rank0.pt", "meta.json") for how in ("flip", "truncate")]
CASES += [("model.pt", "delete"), ("state_rank0.pt", "delete"), ("meta.json", "delete"), ("meta.json", "garbage")]


@pytest.mark.parametrize("name,how", CASES)
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_still_ends_bit_exact(name, how, reference, capsys):
    part = run(_cfg("r", stop_at_step=6))
    assert part["step"] == 6
    root = checkpoints_dir("r", "base")
    assert [p.name for p in list_checkpoints(root)] == ["step_000004", "step_000006"]
    _damage(root / "step_000006" / name, how)
    capsys.readouterr()
    out = run(_cfg("r"))
    printed = capsys.readouterr().out
    assert out["step"] == 8 and out["steps_this_run"] == 4  # continued from step 4, the newest that verifies
    warning = next(line for line in printed.splitlines() if "WARNING" in line and "step_000006" in line)
    assert "skipped" in warning and (name in warning or "meta.json" in warning), warning
    assert "continuing from" in printed and "step_000004" in printed
    assert _losses("r") == reference  # every step's loss, bit-exact on CPU fp32
    assert (root / "step_000006.bad").is_dir()  # moved aside, not deleted
    assert [p.name for p in list_checkpoints(root)] == ["step_000006", "step_000008"]
    assert not verify_checkpoint(root / "step_000008")


def test_every_file_and_meta_json_carry_checksums_and_a_hand_edit_is_caught():
    run(_cfg("c", num_iterations=2, save_every=0))
    ck = latest_checkpoint(checkpoints_dir("c", "base"))
    meta = json.loads((ck / "meta.json").read_text())
    files = meta["checksums"]["files"]
    assert meta["checksums"]["algorithm"] == "sha256"
    assert set(files) == {"model.pt", "optim_rank0.pt", "state_rank0.pt"}
    for n, rec in files.items():
        data = (ck / n).read_bytes()
        assert rec["bytes"] == len(data) and rec["chunk_bytes"] == checkpoint.CHUNK_BYTES
        assert rec["digest"] == _chunked_sha256(data, rec["chunk_bytes"])
    assert verify_checkpoint(ck) == []
    update_meta(ck, metrics={"core": 0.5})  # a rewrite by picochat reseals meta.json
    assert verify_checkpoint(ck) == []
    edited = json.loads((ck / "meta.json").read_text())
    edited["step"] = 3
    (ck / "meta.json").write_text(json.dumps(edited))
    problems = verify_checkpoint(ck)
    assert len(problems) == 1 and "meta_checksum" in problems[0]
    del edited["meta_checksum"]  # the way out the message names, after a deliberate edit
    (ck / "meta.json").write_text(json.dumps(edited))
    assert verify_checkpoint(ck) == []


def _chunked_sha256(data: bytes, chunk: int) -> str:
    """The digest a checkpoint records, computed independently: sha256 over the sha256s of the chunks."""
    parts = [data[i:i + chunk] for i in range(0, max(len(data), 1), chunk)]
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).hexdigest()


def test_chunked_digests_catch_a_flip_in_any_chunk_and_whole_file_records_still_verify(monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)  # the tiny model's files span many chunks
    ck, _ = _tiny_model_checkpoint(checkpoints_dir("chunks", "base"))
    meta = json.loads((ck / "meta.json").read_text())
    rec = meta["checksums"]["files"]["model.pt"]
    data = (ck / "model.pt").read_bytes()
    assert rec["chunk_bytes"] == 4096 and len(data) > 3 * 4096
    assert rec["digest"] == _chunked_sha256(data, 4096) and verify_checkpoint(ck) == []
    for at in (0, 4096 + 17, len(data) - 1):  # the first chunk, a middle one, the last (partial) one
        bad = bytearray(data)
        bad[at] ^= 0xFF
        (ck / "model.pt").write_bytes(bytes(bad))
        assert verify_checkpoint(ck) == ["model.pt: sha256 mismatch (corrupted)"], at
    swapped = data[4096:8192] + data[:4096] + data[8192:]  # the same chunks in another order
    (ck / "model.pt").write_bytes(swapped)
    assert verify_checkpoint(ck) == ["model.pt: sha256 mismatch (corrupted)"]
    (ck / "model.pt").write_bytes(data)
    # a record of the whole file's sha256 (exports; checkpoints written before chunking) verifies as before
    meta["checksums"]["files"]["model.pt"] = {"bytes": len(data), "digest": hashlib.sha256(data).hexdigest()}
    meta["meta_checksum"] = checkpoint._meta_digest(meta)
    (ck / "meta.json").write_text(json.dumps(meta))
    assert verify_checkpoint(ck) == []
    (ck / "model.pt").write_bytes(swapped)
    assert verify_checkpoint(ck) == ["model.pt: sha256 mismatch (corrupted)"]
    (ck / "model.pt").write_bytes(data)
    for bad in ("4096", 0, -4096, 1, True):  # a hand-edited record: malformed, not a corrupted file
        meta["checksums"]["files"]["model.pt"] = {"bytes": len(data), "digest": rec["digest"], "chunk_bytes": bad}
        meta["meta_checksum"] = checkpoint._meta_digest(meta)
        (ck / "meta.json").write_text(json.dumps(meta))
        problems = verify_checkpoint(ck)
        assert len(problems) == 1 and "malformed checksums" in problems[0] and "chunk_bytes" in problems[0], bad


def _tiny_model_checkpoint(root: Path, step: int = 1, tok_dir: Path | None = None, **meta):
    tok_dir = tok_dir or default_tokenizer_dir()
    if not (tok_dir / "tokenizer.json").exists():
        Tokenizer.train(["hello world, the cat sat on the mat. " * 20] * 10, vocab_size=300).save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    cfg = GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(step)
    m = build_model(cfg)
    ck = save_checkpoint(root, step, m.state_dict(), None,
                         {"model_config": asdict(cfg), "tokenizer_dir": str(tok_dir), **meta}, keep_last=0)
    return ck, m


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_loading_a_damaged_checkpoint_is_one_clear_error(how):
    ck, _ = _tiny_model_checkpoint(checkpoints_dir("m", "sft"))
    _damage(ck / "model.pt", how)
    with pytest.raises(UserError) as e:
        load_model(ck)
    msg = str(e.value)
    assert str(ck) in msg and "model.pt" in msg and "\n" not in msg
    # the CLI prints it as one line and exits 2 (no traceback)
    res = subprocess.run([sys.executable, "-m", "picochat", "chat", "--checkpoint", str(ck), "--prompt", "hi"],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "fails verification" in res.stderr


def test_chat_serve_and_eval_by_run_name_load_past_a_damaged_newest_checkpoint(capsys):
    root = checkpoints_dir("fallback", "sft")
    good, m = _tiny_model_checkpoint(root, step=1)
    bad, _ = _tiny_model_checkpoint(root, step=2)
    _damage(bad / "model.pt", "flip")
    before = _tree_digest(root)
    run_name, ck = checkpoint.find_run_with_stage("sft", "fallback")
    assert (run_name, ck) == ("fallback", good)
    err = capsys.readouterr().err
    assert f"{bad} fails verification" in err and "loading step_000001 instead" in err
    model, _, _ = load_model(ck)
    assert torch.equal(model.lm_head.weight, m.lm_head.weight)
    assert _tree_digest(root) == before  # nothing moved or deleted by loading
    # the real CLI, by run name: answers from step 1 and warns on stderr
    res = subprocess.run([sys.executable, "-m", "picochat", "chat", "--run", "fallback", "--source", "sft",
                          "--prompt", "hi", "--max-tokens", "2"], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fails verification" in res.stderr and "fails verification" not in res.stdout
    _damage(good / "model.pt", "truncate")
    with pytest.raises(UserError, match=r"no checkpoint under .* verifies: step_000002: .*step_000001: "):
        checkpoint.find_run_with_stage("sft", "fallback")


def test_a_checkpoint_without_checksums_still_loads_and_its_zip_crcs_are_checked(capsys):
    ck, m = _tiny_model_checkpoint(checkpoints_dir("old", "base"))
    meta = json.loads((ck / "meta.json").read_text())
    for k in ("checksums", "meta_checksum"):
        del meta[k]
    meta["tokenizer_dir"] = str(default_tokenizer_dir())  # older checkpoints stored it absolute
    (ck / "meta.json").write_text(json.dumps(meta))
    checkpoint._warned.discard("legacy")
    m2, _, _ = load_model(ck)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert "no checksums" in capsys.readouterr().out
    load_model(ck)
    assert "no checksums" not in capsys.readouterr().out  # warned once
    _damage(ck / "model.pt", "flip")
    with pytest.raises(UserError, match="CRC|unreadable"):
        load_model(ck)


def test_pruning_keeps_everything_while_the_newest_is_damaged_and_never_the_one_just_written():
    root = checkpoints_dir("p", "base")
    for step in (2, 4, 6):
        _tiny_model_checkpoint(root, step)
    _damage(root / "step_000006" / "model.pt", "truncate")
    prune_checkpoints(root, keep_last=1)
    assert [p.name for p in list_checkpoints(root)] == ["step_000002", "step_000004", "step_000006"]
    shutil.rmtree(root / "step_000006")
    # a checkpoint saved at a lower step than the ones present (a run restarted from an early checkpoint) survives
    # its own save's pruning
    ck, _ = _tiny_model_checkpoint(root, 1)
    prune_checkpoints(root, keep_last=1, keep=ck)
    assert [p.name for p in list_checkpoints(root)] == ["step_000001", "step_000004"]


def test_resume_never_on_a_run_with_checkpoints_refuses_and_deletes_nothing(reference):
    run(_cfg("n", stop_at_step=4))
    sdir = stage_dir("n", "base")
    before = _tree_digest(sdir)
    with pytest.raises(UserError) as e:
        run(_cfg("n", resume="never"))
    msg = str(e.value)
    assert "'n'" in msg and "--run" in msg and "--resume wipe" in msg and "nothing was deleted" in msg
    assert _tree_digest(sdir) == before
    # the CLI: one line, exit 2, still nothing deleted
    res = subprocess.run([sys.executable, "-m", "picochat", "pretrain", "--run", "n", "--resume", "never",
                          "--num-iterations", "8", *TINY], env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "--resume wipe" in res.stderr
    assert _tree_digest(sdir) == before
    # a fresh run name with --resume never trains and keeps its checkpoints (they used to be pruned on save)
    out = run(_cfg("fresh", resume="never"))
    assert out["step"] == 8 and [p.name for p in list_checkpoints(checkpoints_dir("fresh", "base"))] == [
        "step_000006", "step_000008"]
    # --resume wipe starts over explicitly, and trains exactly like a fresh run
    out = run(_cfg("n", resume="wipe"))
    assert out["step"] == 8 and out["steps_this_run"] == 8
    assert _losses("n") == reference == _losses("fresh")


def test_all_checkpoints_damaged_is_one_line_and_nothing_is_deleted():
    run(_cfg("d", stop_at_step=4))
    root = checkpoints_dir("d", "base")
    for ck in list_checkpoints(root):
        _damage(ck / "model.pt", "truncate")
    with pytest.raises(UserError, match="none of its 2 checkpoint"):
        run(_cfg("d"))
    assert sorted(p.name for p in root.iterdir()) == ["step_000002.bad", "step_000004.bad"]


def test_an_explicit_resume_path_that_fails_verification_is_refused():
    run(_cfg("x", stop_at_step=4))
    ck = checkpoints_dir("x", "base") / "step_000004"
    _damage(ck / "optim_rank0.pt", "flip")
    with pytest.raises(UserError, match="fails verification.*optim_rank0.pt"):
        run(_cfg("y", resume=str(ck)))


# ----------------------------------------------------------------------------------------------------------------
# One process per run and stage


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "picochat", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(cond, p, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not cond():
        time.sleep(0.01)
    assert cond(), "the first process never got going"


def test_a_second_process_on_the_same_run_refuses_and_the_first_ends_like_a_lone_run(reference):
    args = ["pretrain", "--run", "busy", "--num-iterations", "8", "--save-every", "2", *TINY]
    metrics = stage_dir("busy", "base") / "metrics.jsonl"
    first = _cli(args)
    try:
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, first)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, lock held, while the second one tries
        second = subprocess.run([sys.executable, "-m", "picochat", *args], env=dict(os.environ, PYTHONPATH=str(REPO)),
                                cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert f"pid {first.pid}" in line and "already being trained" in line and "--run" in line
    assert _losses("busy") == reference
    lock = stage_dir("busy", "base") / "lock"
    assert lock.read_text() == ""  # released at the end


def test_a_kill9_leaves_a_stale_lock_that_the_next_run_takes_over(reference):
    args = ["pretrain", "--run", "k", "--num-iterations", "8", "--save-every", "2", *TINY]
    root = checkpoints_dir("k", "base")
    p = _cli(args)
    _wait_for(lambda: (root / "step_000002").exists(), p)
    p.kill()
    p.communicate()
    holder = json.loads((stage_dir("k", "base") / "lock").read_text())
    assert holder["pid"] == p.pid and holder["host"]
    q = _cli(args)
    out, _ = q.communicate(timeout=300)
    assert q.returncode == 0, out
    assert f"took over the lock of pid {p.pid}" in out
    assert _losses("k") == reference


def test_a_lock_held_by_an_orphaned_descriptor_of_a_dead_process_is_taken_over():
    """A dead trainer whose forked child still holds the flock: same host, the recorded pid is gone."""
    import fcntl
    import socket

    sdir = stage_dir("orphan", "base")
    sdir.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    fd = os.open(sdir / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: to the code it is another holder
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": gone.pid}).encode())
        lock = training.lock_stage(sdir, "orphan", "base")
        assert lock is not None and json.loads((sdir / "lock").read_text())["pid"] == os.getpid()
        lock.release()
        # a live holder on this host is never taken over
        os.close(fd)
        fd = os.open(sdir / "lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getppid()}).encode())
        with pytest.raises(UserError, match=f"pid {os.getppid()} on {socket.gethostname()}"):
            training.lock_stage(sdir, "orphan", "base")
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# A full disk during save


@pytest.mark.parametrize("victim", ["model.pt", "optim_rank0.pt", "state_rank0.pt", "meta.json"])
def test_a_full_disk_during_save_is_one_line_and_the_rerun_resumes(victim, monkeypatch, reference):
    run(_cfg("full", stop_at_step=4))
    sdir = stage_dir("full", "base")
    prev = checkpoints_dir("full", "base") / "step_000004"
    prev_bytes = checkpoint.checkpoint_bytes(prev)

    real_write, real_text = checkpoint._HashingWriter.write, checkpoint.atomic_write_text

    def write(self, b):
        if "step_000006" in self.name and Path(self.name).name.startswith(victim):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, b)

    def write_text(path, text):
        if "step_000006" in str(path) and Path(path).name == victim:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_text(path, text)

    with monkeypatch.context() as mp, pytest.raises(UserError) as e:
        mp.setattr(checkpoint._HashingWriter, "write", write)
        mp.setattr(checkpoint, "atomic_write_text", write_text)
        run(_cfg("full"))
    msg = str(e.value)
    assert "\n" not in msg and f"PICOCHAT_HOME={picochat_home()}" in msg and "step_000006" in msg
    assert checkpoint._human(prev_bytes) in msg and str(prev) in msg and "rerun" in msg
    assert ("quota" if victim == "meta.json" else "disk full") in msg
    assert json.loads((sdir / "run.json").read_text())["config"]["run"] == "full"  # whole, this run's header
    assert [p.name for p in list_checkpoints(prev.parent)] == ["step_000002", "step_000004"]
    assert not verify_checkpoint(prev)
    litter = [p for p in sdir.rglob("*") if ".tmp" in p.name or ".old" in p.name]
    assert not litter, litter
    out = run(_cfg("full"))  # space freed: resumes from step 4
    assert out["step"] == 8 and out["steps_this_run"] == 4
    assert _losses("full") == reference


def test_a_full_disk_while_writing_run_json_keeps_the_old_one(monkeypatch, tmp_path):
    training.write_run_header(tmp_path, {"a": 1})
    before = (tmp_path / "run.json").read_text()

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "atomic_write_text", full)
    with pytest.raises(UserError, match="PICOCHAT_HOME=.*run.json is intact"):
        training.write_run_header(tmp_path, {"a": 2})
    assert (tmp_path / "run.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_while_logging_metrics_is_one_line(tmp_path):
    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.flush()

    logger = training.MetricsLogger(tmp_path / "base" / "metrics.jsonl", enabled=True)
    logger.log({"step": 1, "loss": 1.0})
    logger._f.close()
    logger._f = FullDisk()
    with pytest.raises(UserError, match=r"disk full while writing .*metrics\.jsonl.*checkpoints are intact.*rerun"):
        logger.log({"step": 2, "loss": 0.5})
    logger.close()  # the buffered tail cannot be written either: no second, raw error
    assert (tmp_path / "base" / "metrics.jsonl").read_text().count("\n") == 1


def test_a_real_full_tmpfs_during_save(tmp_path, monkeypatch, reference):
    """The same on a real, tiny file system: the second checkpoint does not fit."""
    home = tmp_path / "small"
    if not _mount_tmpfs(home, "2200k"):
        pytest.skip("needs root and tmpfs to mount a small file system")
    try:
        monkeypatch.setenv("PICOCHAT_HOME", str(home))
        with pytest.raises(UserError) as e:
            run(_cfg("t", keep_last=3))
        msg = str(e.value)
        assert f"PICOCHAT_HOME={home}" in msg and "needs about" in msg and "\n" not in msg
        root = checkpoints_dir("t", "base")
        kept = list_checkpoints(root)
        assert kept and all(not verify_checkpoint(c) for c in kept)
        assert json.loads((stage_dir("t", "base") / "run.json").read_text())["config"]["run"] == "t"
        assert not [p for p in root.parent.rglob("*") if ".tmp" in p.name]
        subprocess.run(["mount", "-o", "remount,size=64m", str(home)], check=True)  # space freed
        out = run(_cfg("t", keep_last=3))
        assert out["step"] == 8 and out["steps_this_run"] == 8 - int(kept[-1].name[5:])
        assert _losses("t") == reference
    finally:
        subprocess.run(["umount", str(home)], capture_output=True)


# ----------------------------------------------------------------------------------------------------------------
# Paths


def test_a_moved_picochat_home_still_loads(monkeypatch, tmp_path):
    home = picochat_home()
    ck, m = _tiny_model_checkpoint(checkpoints_dir("mv", "base"))
    child, _ = _tiny_model_checkpoint(checkpoints_dir("mv", "sft"), 3, parent=str(ck))
    raw = json.loads((child / "meta.json").read_text())
    assert not os.path.isabs(raw["tokenizer_dir"]) and not os.path.isabs(raw["parent"])
    # an older checkpoint, written with absolute paths and no checksums
    legacy, _ = _tiny_model_checkpoint(checkpoints_dir("mv", "mid"), 2)
    meta = json.loads((legacy / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("checksums", "meta_checksum")}
    meta["tokenizer_dir"] = str(home / "tokenizer")
    (legacy / "meta.json").write_text(json.dumps(meta))

    moved = tmp_path / "elsewhere" / "home"
    moved.parent.mkdir()
    os.replace(home, moved)
    monkeypatch.setenv("PICOCHAT_HOME", str(moved))
    idx = torch.tensor([[1, 2, 3]])
    for c in (ck, child, legacy):
        new = moved / c.relative_to(home)
        m2, tok, meta = load_model(new)
        assert Path(meta["tokenizer_dir"]) == moved / "tokenizer" and tok.vocab_size == m.config.vocab_size
    assert Path(read_meta(moved / child.relative_to(home))["parent"]) == moved / ck.relative_to(home)
    assert torch.equal(load_model(moved / ck.relative_to(home))[0](idx), m(idx))


def test_a_tokenizer_outside_picochat_home_stays_absolute(tmp_path):
    tok_dir = tmp_path / "my_tokenizer"
    ck, _ = _tiny_model_checkpoint(checkpoints_dir("abs", "base"), tok_dir=tok_dir)
    assert json.loads((ck / "meta.json").read_text())["tokenizer_dir"] == str(tok_dir)
    assert read_meta(ck)["tokenizer_dir"] == str(tok_dir)


# ----------------------------------------------------------------------------------------------------------------
# The chat stages (midtrain, SFT, RL) share the same opener, saves and resume


def _chat_base(run_name: str):
    from picochat.config import to_dict

    tok = Tokenizer.train(["hello there, how are you? fine thanks. " * 50], vocab_size=300)
    tok.save(default_tokenizer_dir())
    cfg = GPTConfig(sequence_len=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    meta = {"stage": "base", "run": run_name, "model_config": to_dict(cfg), "tokenizer_dir": str(default_tokenizer_dir()),
            "config": {"data_dir": "", "total_batch_size": 32, "device_batch_size": 2, "max_seq_len": 16}}
    save_checkpoint(checkpoints_dir(run_name, "base"), 1, build_model(cfg).state_dict(), None, meta, None)


def _chat_train(cfg, stop_at: int = 0):
    """Open the SFT stage on the base and train 4 deterministic next-token steps (stopping after `stop_at`)."""
    from functools import partial

    from picochat.stages import chat

    def step(st, stop_at=0):
        x = torch.randint(0, st.tok.vocab_size, (2, 17), generator=torch.Generator().manual_seed(st.step))
        loss = st.train_model(x[:, :-1], x[:, 1:])
        st.opt.arm(True)
        loss.backward()
        if stop_at and st.step + 1 == stop_at:
            st.stop.requested = True
        return chat.StepOut(loss.detach(), 32, "", {})

    with chat.open_stage("sft", cfg, source="base", source_order=("base",), shape_of=partial(chat.inherit, cfg),
                         setup=lambda st: (4, {})) as st:
        resumed = st.resume_from
        chat.train_loop(st, step_fn=partial(step, stop_at=stop_at), evaluate=lambda st, at: {"val": 0.0},
                        lr_at=lambda s, total: 1.0, doing="training", oom_shape=(2, 16, 32))
        return resumed, {k: v.clone() for k, v in st.model.state_dict().items()}


def test_a_chat_stage_skips_a_damaged_checkpoint_and_refuses_resume_never():
    from dataclasses import replace

    from picochat.stages import sft

    for name in ("lone", "cut"):
        _chat_base(name)
    cfg = sft.SFTConfig(device="cpu", dtype="float32", eval_every=0, save_every=1, keep_last=3)
    _, lone = _chat_train(replace(cfg, run="lone"))
    _chat_train(replace(cfg, run="cut"), stop_at=3)
    root = checkpoints_dir("cut", "sft")
    assert [p.name for p in list_checkpoints(root)] == ["step_000001", "step_000002", "step_000003"]
    raw = json.loads((root / "step_000003" / "meta.json").read_text())
    assert not os.path.isabs(raw["parent"]) and not os.path.isabs(raw["tokenizer_dir"])
    _damage(root / "step_000003" / "optim_rank0.pt", "flip")
    resumed, cut = _chat_train(replace(cfg, run="cut"))
    assert resumed.name == "step_000002" and (root / "step_000003.bad").is_dir()
    assert all(torch.equal(lone[k], cut[k]) for k in lone)  # the fallback continues exactly
    before = _tree_digest(stage_dir("cut", "sft"))
    with pytest.raises(UserError, match="run 'cut' stage sft.*--resume wipe"):
        _chat_train(replace(cfg, run="cut", resume="never"))
    assert _tree_digest(stage_dir("cut", "sft")) == before


def test_loads_for_an_accelerator_are_memory_mapped_and_cpu_loads_are_not(monkeypatch, tmp_path):
    ck, m = _tiny_model_checkpoint(checkpoints_dir("mm", "base"))
    seen = []
    real_load = torch.load

    def spy(*a, **kw):
        seen.append(kw.get("mmap", False))
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    on_cpu = checkpoint.load_model_state(ck, "cpu")
    assert seen == [False] and torch.equal(on_cpu["lm_head.weight"], m.lm_head.weight)
    seen.clear()
    # "meta" stands in for a GPU here: not the CPU, so the file is mapped (and nothing is read into memory)
    off_cpu = checkpoint.load_model_state(ck, torch.device("meta"))
    assert seen == [True] and off_cpu["lm_head.weight"].device.type == "meta"
    assert off_cpu["lm_head.weight"].shape == m.lm_head.weight.shape
    # a file in torch's old serialization cannot be mapped: it is read whole instead
    old = tmp_path / "old.pt"
    torch.save({"w": torch.arange(4.0)}, old, _use_new_zipfile_serialization=False)
    seen.clear()
    assert checkpoint.torch_load(old, torch.device("meta"), weights_only=True)["w"].device.type == "meta"
    assert seen == [False]
