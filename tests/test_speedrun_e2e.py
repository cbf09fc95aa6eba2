"""The tiny speedrun at micro scale, end to end: killed at several points and re-run, it finishes with no finished
stage repeated and the same final metrics as an uninterrupted run. Then the report renders with its plots."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

MICRO = [
    "--preset", "tiny", "--run", "micro",
    "--set", "pretrain.num-iterations=10", "--set", "pretrain.save-every=2", "--set", "pretrain.eval-every=5",
    "--set", "pretrain.eval-tokens=4096", "--set", "pretrain.device-batch-size=8",
    "--set", "pretrain.total-batch-size=2048",
    "--set", "base_eval.eval-tokens=4096",
    "--set", "midtrain.num-iterations=4", "--set", "midtrain.save-every=2", "--set", "midtrain.eval-every=4",
    "--set", "sft.num-iterations=6", "--set", "sft.save-every=2", "--set", "sft.eval-every=6",
    "--set", "chat_eval.tasks=synth", "--set", "chat_eval.max-problems=6", "--set", "chat_eval.max-new-tokens=16",
]


def _env(home: Path) -> dict:
    env = dict(os.environ, PICOCHAT_HOME=str(home), PYTHONUNBUFFERED="1", PICOCHAT_DEVICE="cpu",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _speedrun(home: Path, kill_when=None, timeout: float = 400) -> tuple[int, str]:
    """Run the micro speedrun; if `kill_when(home, output)` becomes true, SIGKILL the orchestrator."""
    proc = subprocess.Popen([sys.executable, "-m", "picochat", "speedrun", *MICRO], cwd=REPO, env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if kill_when is not None and kill_when(home, "".join(out)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        raise AssertionError("speedrun timed out:\n" + "".join(out)[-3000:])
    reader.join(timeout=10)
    return proc.returncode, "".join(out)


def _ckpts(home: Path, stage: str) -> list[str]:
    d = home / "runs" / "micro" / stage / "checkpoints"
    return sorted(p.name for p in d.glob("step_*") if not p.name.endswith(".tmp")) if d.is_dir() else []


def _final_metrics(home: Path) -> dict:
    run = home / "runs" / "micro"
    chat = json.loads((run / "eval" / "sft_chat.json").read_text())
    base = [json.loads(line) for line in (run / "base" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sft = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "val_bpb": [r["val_bpb"] for r in base if "val_bpb" in r][-1],
        "base_losses": {r["step"]: r["loss"] for r in base if "loss" in r},
        "sft_losses": {r["step"]: r["loss"] for r in sft if "loss" in r},
        "chat": chat,
    }


@pytest.mark.slow
def test_killed_and_rerun_speedrun_matches_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    rc, out = _speedrun(straight)
    assert rc == 0, out[-3000:]
    assert (straight / "runs" / "micro" / "report.md").exists()
    expected = _final_metrics(straight)

    home = tmp_path / "killed"
    # 1) kill during pretraining, once it has a checkpoint
    rc, out = _speedrun(home, kill_when=lambda h, o: len(_ckpts(h, "base")) >= 1)
    assert rc == -signal.SIGKILL, out[-2000:]
    # 2) re-run: data and tokenizer are not redone, pretraining resumes; kill during SFT after a checkpoint
    rc, out = _speedrun(home, kill_when=lambda h, o: len(_ckpts(h, "sft")) >= 1)
    assert "data: done already" in out and "tokenizer: done already" in out
    assert "pretrain: resuming" in out
    assert rc == -signal.SIGKILL, out[-2000:]
    # 3) re-run: kill during the chat eval
    rc, out = _speedrun(home, kill_when=lambda h, o: "chat_eval: starting" in o)
    assert "pretrain: done already" in out and "midtrain: done already" in out
    assert rc == -signal.SIGKILL, out[-2000:]
    # 4) re-run to the end: only the chat eval (and report) run again
    rc, out = _speedrun(home)
    assert rc == 0, out[-3000:]
    for stage in ("data", "tokenizer", "pretrain", "base_eval", "midtrain", "sft"):
        assert f"{stage}: done already" in out, stage
    got = _final_metrics(home)
    assert got["base_losses"] == expected["base_losses"]
    assert got["val_bpb"] == expected["val_bpb"]
    assert got["sft_losses"] == expected["sft_losses"]
    def scores(chat: dict) -> dict:
        return {name: (t["n"], t["correct"], t["accuracy"]) for name, t in chat["tasks"].items()}

    assert scores(got["chat"]) == scores(expected["chat"]) and got["chat"]["step"] == expected["chat"]["step"]

    # the report renders with its plots
    report = (home / "runs" / "micro" / "report.md").read_text()
    assert "## Summary" in report and "![" in report
    for name in ("loss.png", "val_bpb.png"):
        assert (home / "runs" / "micro" / "plots" / name).stat().st_size > 1000
