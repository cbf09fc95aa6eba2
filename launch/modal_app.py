"""picochat on Modal: the speedrun on cloud GPUs, with everything that matters on one persistent Volume.

    pip install modal && modal setup
    modal run launch/modal_app.py --task smoke                      # 10 steps: CUDA, NCCL, data, tokenizer
    modal run --detach launch/modal_app.py --preset d20             # the whole pipeline, on H100:8
    modal run --detach launch/modal_app.py --preset d24 --gpu H100:8 --force-restart
    modal run launch/modal_app.py --task doctor --gpu H100:1       # what picochat sees on that GPU
    modal deploy launch/modal_app.py                                # then open the `serve` URL: web chat + /v1 API

What happens:
- The image is built at deploy time: Python 3.11, gcc (Triton compiles kernels at runtime), the package's
  dependencies installed with uv (one cached layer), then this repository copied in and `uv pip install`ed.
- One Volume (`picochat`, mounted at /vol) is PICOCHAT_HOME: data shards, tokenizer, checkpoints, metrics, logs,
  report, and the torch.compile/Triton caches (keyed by torch, Triton and GPU type, so a cold start reuses them).
- `prepare` (CPU only, no GPU billed) runs the data and tokenizer stages; `train` (GPU) runs `picochat speedrun`,
  which starts `picochat launch --nproc-per-node <all GPUs>` for each distributed stage. `pipeline` chains the two
  inside Modal, so `--detach` is safe (a detached client keeps only the last function it triggered alive).
- Output is streamed line by line with a `[HEARTBEAT]` line after every 30 s of silence (torch.compile is silent for
  minutes). The Volume is committed after every new checkpoint (seen by polling the checkpoint directories and by
  the log) and on exit, so a preempted or killed run loses at most the steps since its last checkpoint.
- Re-running the same command resumes: picochat's stages default to `--resume auto` and the speedrun skips done
  stages. Modal restarts preempted GPU functions on the same input (`retries`); `--force-restart` wipes the run once
  per call, never again on a retry. Each attempt may run up to 24 h; longer runs (d32) continue when re-run.

The app only shells out to the `picochat` CLI; it never imports picochat. The Modal-independent parts (GPU string
validation, command building, streaming with heartbeat and commit triggers, the task bodies) are plain functions
that run locally without Modal: `python launch/modal_app.py --local --vol /tmp/vol --preset tiny --max-steps 20`.
"""

import argparse
import codecs
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

try:  # Modal is optional: the plain functions below work (and are tested) without it
    import modal
except ImportError:  # pragma: no cover - exercised where modal is not installed
    modal = None

APP_NAME = os.environ.get("PICOCHAT_MODAL_APP", "picochat")
VOLUME_NAME = os.environ.get("PICOCHAT_MODAL_VOLUME", "picochat")
VOL = "/vol"
REPO_DIR = Path(__file__).resolve().parent.parent
REMOTE_REPO = "/root/picochat"
PRESETS = ("tiny", "d12", "d20", "d24", "d32")
TASKS = ("run", "smoke", "prepare", "train", "doctor")
DEFAULT_GPU = os.environ.get("PICOCHAT_MODAL_GPU", "H100:8")
SERVE_GPU = os.environ.get("PICOCHAT_MODAL_SERVE_GPU", "L4")
TORCH_SPEC = os.environ.get("PICOCHAT_MODAL_TORCH", "torch==2.11.0")  # the version this code is measured with
HEARTBEAT_S = 30.0
DAY_S = 24 * 3600
SMOKE_STEPS = 10

# Modal GPU types (case-insensitive) and the most of each one container can have.
GPU_TYPES = {"T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8, "A100-80GB": 8,
             "RTX-PRO-6000": 8, "H100": 8, "H100!": 8, "H200": 8, "B200": 8, "B200+": 8}
# Lines that announce a saved checkpoint (the directory poll is the backstop when the wording differs).
CHECKPOINT_LINE = re.compile(r"(checkpoint\b.*\b(saved|written))|(saved\b.*\bcheckpoint)|(\[checkpoint\])", re.I)


class ModalAppError(ValueError):
    """Bad input to the Modal runner (a flag value); the message says what to use instead."""


# ----------------------------------------------------------------------------------------------------------------
# Validation and commands (pure)


def parse_gpu(spec: str) -> tuple[str, int]:
    """'H100:8' -> ('H100', 8); 'a100-80gb' -> ('A100-80GB', 1). Raises ModalAppError with the valid choices."""
    text = (spec or "").strip()
    kind, sep, count = text.partition(":")
    kind = kind.upper()
    if kind not in GPU_TYPES:
        raise ModalAppError(f"--gpu {spec!r}: unknown GPU type {kind or '(empty)'!r}; use one of "
                            f"{', '.join(GPU_TYPES)}, optionally with a count, e.g. H100:8")
    if sep:
        if not count.isdigit():
            raise ModalAppError(f"--gpu {spec!r}: the count after ':' must be a number, e.g. {kind}:8")
        n = int(count)
    else:
        n = 1
    if not 1 <= n <= GPU_TYPES[kind]:
        raise ModalAppError(f"--gpu {spec!r}: {kind} comes 1 to {GPU_TYPES[kind]} per container on Modal")
    return kind, n


def validate_gpu(spec: str) -> str:
    kind, n = parse_gpu(spec)
    return f"{kind}:{n}"


def validate_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ModalAppError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
    return preset


def validate_run(run: str) -> str:
    if not run or "/" in run or run.startswith(".") or any(c.isspace() for c in run):
        raise ModalAppError(f"--run {run!r}: a run name is a plain folder name such as 'd20'")
    return run


def picochat_cmd(*args: str) -> list[str]:
    """The CLI in this interpreter (the image installs the package; locally the repo is importable)."""
    return [sys.executable, "-m", "picochat", *args]


def speedrun_command(preset: str, run: str, force_restart: bool = False, stages: str = "", max_steps: int = 0,
                     extra: tuple[str, ...] = ()) -> list[str]:
    """`picochat speedrun` (it runs each distributed stage through `picochat launch` on all visible GPUs)."""
    cmd = picochat_cmd("speedrun", "--preset", validate_preset(preset), "--run", validate_run(run))
    if stages:
        cmd += ["--stages", stages]
    if max_steps:
        cmd += ["--max-steps", str(int(max_steps))]
    if force_restart:
        cmd += ["--force-restart", "--yes"]
    return cmd + list(extra)


def smoke_command(preset: str, run: str) -> list[str]:
    """A 10-step pretrain on fresh state: CUDA, NCCL (all GPUs), data and tokenizer are all exercised."""
    return speedrun_command(preset, run, force_restart=True, stages="data,tokenizer,pretrain", max_steps=SMOKE_STEPS)


def serve_command(port: int = 8000, extra: str = "") -> list[str]:
    return picochat_cmd("serve", "--host", "0.0.0.0", "--port", str(port), *shlex.split(extra))


def cache_key(gpu_kind: str) -> str:
    """Compile caches are only valid for one torch + Triton version on one GPU type."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("torch", "triton"):
        try:
            parts.append(f"{pkg}-{version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg}-none")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts + [gpu_kind.lower()]))


def container_env(vol_dir: str, gpu_kind: str = "cpu", base: Optional[dict] = None) -> dict:
    """Environment for the CLI: everything under the volume, compile caches included."""
    env = dict(os.environ if base is None else base)
    cache = Path(vol_dir) / "cache" / cache_key(gpu_kind)
    env.update(PICOCHAT_HOME=str(vol_dir), TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
               TRITON_CACHE_DIR=str(cache / "triton"), HF_HOME=str(Path(vol_dir) / "cache" / "hf"),
               PYTHONUNBUFFERED="1")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def checkpoint_signature(vol_dir: str) -> tuple:
    """What is on the volume that a preemption must not lose: complete checkpoints and the runs' state files."""
    root = Path(vol_dir) / "runs"
    if not root.is_dir():
        return ()
    sig = []
    for pattern in ("*/*/checkpoints/step_*/meta.json", "*/*.json", "*/*/run.json"):
        for p in root.glob(pattern):
            try:
                sig.append((str(p.relative_to(root)), p.stat().st_mtime_ns))
            except OSError:  # pruned between glob and stat
                pass
    return tuple(sorted(sig))


def force_restart_once(vol_dir: str, run: str, token: str) -> bool:
    """True the first time a call (token = Modal input id) asks to force-restart `run`; False on its retries.

    Modal retries a preempted function with the same input; wiping the run again would throw away the checkpoints
    the first attempt made. The marker lives on the volume, so it survives the container.
    """
    marker = Path(vol_dir) / ".modal" / f"force_restart.{run}.{re.sub(r'[^A-Za-z0-9_-]', '_', token)}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(time.time()))
    return True


# ----------------------------------------------------------------------------------------------------------------
# Streaming


def stream(cmd: list[str], env: Optional[dict] = None, heartbeat_s: float = HEARTBEAT_S,
           on_checkpoint: Optional[Callable[[str], None]] = None, watch_dir: Optional[str] = None,
           poll_s: float = 15.0, partial_flush_s: float = 2.0, emit: Callable[[str], None] = None,
           forward_signals: bool = True) -> int:
    """Run `cmd` with stdout+stderr merged; emit its output line by line; return its exit code.

    - Lines end at \\n or a lone \\r (progress bars); bytes are decoded incrementally, so a UTF-8 character split
      across reads is not mangled. A partial line left without its newline for `partial_flush_s` is emitted as is.
    - After `heartbeat_s` without output, `[HEARTBEAT]` lines say the job is alive (once per silent interval).
    - `on_checkpoint(reason)` is called when a line announces a checkpoint, when the checkpoint signature of
      `watch_dir` changes (polled every `poll_s`), and once at exit.
    - SIGTERM/SIGINT to this process are forwarded to the child, which checkpoints and exits; we keep streaming
      until it does.
    """
    emit = emit or (lambda s: print(s, flush=True))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, bufsize=0,
                            start_new_session=True)
    chunks: "queue.Queue[Optional[bytes]]" = queue.Queue()

    def reader() -> None:
        fd = proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                chunks.put(None)
                return
            chunks.put(data)

    threading.Thread(target=reader, daemon=True).start()

    def forward(signum, _frame):
        emit(f"[modal] received signal {signum}: asking the job to checkpoint and stop")
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old_handlers = {}
    if forward_signals and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            old_handlers[s] = signal.signal(s, forward)

    def checkpoint(reason: str) -> None:
        if on_checkpoint is not None:
            try:
                on_checkpoint(reason)
            except Exception as e:  # a failed commit must not kill the training run; the next one may work
                emit(f"[modal] commit after {reason} failed: {e}")

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, pending_since = "", 0.0
    last_out = last_beat = start
    last_poll, sig = start, checkpoint_signature(watch_dir) if watch_dir else ()

    def emit_line(line: str) -> None:
        emit(line)
        if CHECKPOINT_LINE.search(line):
            checkpoint("checkpoint line")

    try:
        eof = False
        while not eof:
            try:
                data = chunks.get(timeout=0.25)
            except queue.Empty:
                data = b""
            now = time.monotonic()
            if data is None:
                eof = True
                text = decoder.decode(b"", final=True)
            else:
                text = decoder.decode(data) if data else ""
            if text:
                if not pending:
                    pending_since = now
                pending += text
                last_out = last_beat = now
                # split on \n, \r\n and a lone \r; a trailing \r may be the first half of \r\n: keep it pending
                parts = re.split(r"\r\n|\n|\r(?!$)", pending)
                pending = parts.pop()
                for line in parts:
                    emit_line(line)
                if pending:
                    pending_since = now if parts else pending_since
            if pending and (eof or now - pending_since >= partial_flush_s):
                emit_line(pending.rstrip("\r"))
                pending = ""
            if not eof and now - last_beat >= heartbeat_s:
                emit(f"[HEARTBEAT] alive: no output for {now - last_out:.0f}s, {now - start:.0f}s elapsed")
                last_beat = now
            if watch_dir and now - last_poll >= poll_s:
                last_poll = now
                new = checkpoint_signature(watch_dir)
                if new != sig:
                    sig = new
                    checkpoint("new checkpoint on disk")
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # we are being torn down (an exception in emit, Modal cancelling): stop the job
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    checkpoint("exit")
    emit(f"[modal] `{shlex.join(cmd[1:] if cmd[:1] == [sys.executable] else cmd)}` exited with code {rc} "
         f"after {time.monotonic() - start:.0f}s")
    return rc


# ----------------------------------------------------------------------------------------------------------------
# Task bodies (plain functions: Modal calls them with /vol and Volume.commit; tests call them with a temp dir)


def run_task(cmd: list[str], vol_dir: str, commit: Optional[Callable[[], None]] = None, gpu_kind: str = "cpu",
             heartbeat_s: float = HEARTBEAT_S, poll_s: float = 15.0, check: bool = True) -> int:
    """Run one CLI command with the volume as PICOCHAT_HOME, committing the volume on checkpoints and at exit."""
    Path(vol_dir).mkdir(parents=True, exist_ok=True)
    commits = {"n": 0}

    def on_checkpoint(reason: str) -> None:
        if commit is not None:
            commit()
            commits["n"] += 1
            print(f"[modal] volume committed ({reason})", flush=True)

    print(f"[modal] $ {shlex.join(cmd)}", flush=True)
    rc = stream(cmd, env=container_env(vol_dir, gpu_kind), heartbeat_s=heartbeat_s, on_checkpoint=on_checkpoint,
                watch_dir=vol_dir, poll_s=poll_s)
    if check and rc != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed with exit code {rc}; re-run the same command to resume "
                           f"from the last checkpoint on the volume")
    return rc


def prepare_body(preset: str, run: str, vol_dir: str, commit=None, heartbeat_s: float = HEARTBEAT_S,
                 stages: str = "data,tokenizer") -> int:
    """CPU only: data shards and the tokenizer (no GPU billed while downloading and counting bytes)."""
    return run_task(speedrun_command(preset, run, stages=stages), vol_dir, commit, heartbeat_s=heartbeat_s)


def train_body(preset: str, run: str, vol_dir: str, commit=None, gpu_kind: str = "cpu", force_restart: bool = False,
               max_steps: int = 0, stages: str = "", token: str = "local", heartbeat_s: float = HEARTBEAT_S) -> int:
    force = bool(force_restart) and force_restart_once(vol_dir, run, token)
    if force_restart and not force:
        print(f"[modal] retry of call {token}: not wiping run {run!r} again; resuming from its checkpoints",
              flush=True)
    cmd = speedrun_command(preset, run, force_restart=force, stages=stages, max_steps=max_steps)
    return run_task(cmd, vol_dir, commit, gpu_kind=gpu_kind, heartbeat_s=heartbeat_s)


def smoke_body(preset: str, vol_dir: str, commit=None, gpu_kind: str = "cpu",
               heartbeat_s: float = HEARTBEAT_S) -> int:
    run_task(picochat_cmd("doctor"), vol_dir, None, gpu_kind=gpu_kind, heartbeat_s=heartbeat_s)
    return run_task(smoke_command(preset, f"smoke-{preset}"), vol_dir, commit, gpu_kind=gpu_kind,
                    heartbeat_s=heartbeat_s)


# ----------------------------------------------------------------------------------------------------------------
# The Modal app


def project_requirements(extras: tuple[str, ...] = ("serve", "report")) -> list[str]:
    """The package's dependencies (+ extras) from pyproject.toml, with torch pinned to TORCH_SPEC."""
    path = REPO_DIR / "pyproject.toml"
    try:
        import tomllib

        data = tomllib.loads(path.read_text())
        reqs = list(data["project"]["dependencies"])
        for e in extras:
            reqs += data["project"].get("optional-dependencies", {}).get(e, [])
    except Exception:  # Python 3.10 (no tomllib) or no pyproject next to us: the known core set
        reqs = ["torch", "numpy", "tiktoken", "tokenizers", "pyarrow", "tqdm", "fastapi", "uvicorn", "matplotlib"]
    reqs = [r for r in reqs if not re.match(r"torch\b", r)] + [TORCH_SPEC]
    return sorted(set(reqs))


IGNORE = [".git", ".venv", "**/__pycache__", "**/*.pyc", ".pytest_cache", "*.egg-info", "build", "dist"]

if modal is not None:
    image = (
        modal.Image.debian_slim(python_version="3.11")
        # Triton compiles its kernels with the system C compiler at runtime; bubblewrap is the OS sandbox for the
        # python tool and HumanEval (without it both are off)
        .apt_install("build-essential", "git", "bubblewrap")
        .uv_pip_install("uv", *project_requirements())
        .env({"PICOCHAT_HOME": VOL, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        .add_local_dir(str(REPO_DIR), REMOTE_REPO, copy=True, ignore=IGNORE)
        .run_commands(f"uv pip install --system --no-deps {REMOTE_REPO}")
    )
    volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
    app = modal.App(APP_NAME, image=image)
    _retries = modal.Retries(max_retries=3, initial_delay=10.0, backoff_coefficient=2.0, max_delay=60.0)

    def _token() -> str:
        return modal.current_input_id() or modal.current_function_call_id() or "local"

    @app.function(cpu=8.0, memory=32768, timeout=6 * 3600, volumes={VOL: volume}, retries=_retries)
    def prepare(preset: str, run: str, stages: str = "data,tokenizer") -> int:
        return prepare_body(preset, run, VOL, commit=volume.commit, stages=stages)

    @app.function(gpu=validate_gpu(DEFAULT_GPU), cpu=16.0, memory=131072, timeout=DAY_S, volumes={VOL: volume},
                  retries=_retries)
    def train(preset: str, run: str, force_restart: bool = False, max_steps: int = 0, stages: str = "",
              gpu: str = DEFAULT_GPU) -> int:
        return train_body(preset, run, VOL, commit=volume.commit, gpu_kind=parse_gpu(gpu)[0],
                          force_restart=force_restart, max_steps=max_steps, stages=stages, token=_token())

    @app.function(gpu=validate_gpu(DEFAULT_GPU), cpu=16.0, memory=131072, timeout=3600, volumes={VOL: volume})
    def smoke(preset: str, gpu: str = DEFAULT_GPU) -> int:
        return smoke_body(preset, VOL, commit=volume.commit, gpu_kind=parse_gpu(gpu)[0])

    @app.function(gpu=validate_gpu(DEFAULT_GPU), timeout=600, volumes={VOL: volume})
    def doctor(gpu: str = DEFAULT_GPU) -> int:
        return run_task(picochat_cmd("doctor"), VOL, None, gpu_kind=parse_gpu(gpu)[0])

    @app.function(cpu=1.0, memory=2048, timeout=DAY_S, volumes={VOL: volume})
    def pipeline(task: str, preset: str, run: str, gpu: str, force_restart: bool = False,
                 max_steps: int = 0) -> str:
        """Runs inside Modal, so a detached client cannot orphan the GPU step: CPU prepare, then the GPU work."""
        gpu = validate_gpu(gpu)
        if task == "smoke":
            # data is shared by all runs: fetch it on CPU. The smoke itself starts from scratch (--force-restart), so
            # its small tokenizer is trained again on the GPU box as part of what the smoke validates.
            prepare.remote(preset, f"smoke-{preset}", "data")
            smoke.with_options(gpu=gpu).remote(preset, gpu)
            return f"smoke of {preset} on {gpu}: ok"
        prepare.remote(preset, run)
        train.with_options(gpu=gpu).remote(preset, run, force_restart, max_steps, "", gpu)
        return f"run {run!r} ({preset}) on {gpu}: done; artifacts in volume {VOLUME_NAME!r} under runs/{run}/"

    @app.function(gpu=SERVE_GPU, volumes={VOL: volume}, timeout=DAY_S, scaledown_window=900,
                  env={"PICOCHAT_SERVE_ARGS": os.environ.get("PICOCHAT_SERVE_ARGS", "")})
    @modal.concurrent(max_inputs=32)
    @modal.web_server(port=8000, startup_timeout=900)
    def serve() -> None:
        """Web chat + OpenAI-compatible API from the volume's newest chat checkpoint (PICOCHAT_SERVE_ARGS at deploy
        time adds flags, e.g. "--run d20 --api-key KEY")."""
        subprocess.Popen(serve_command(8000, os.environ.get("PICOCHAT_SERVE_ARGS", "")), env=container_env(VOL))

    @app.local_entrypoint()
    def main(task: str = "run", preset: str = "d20", gpu: str = DEFAULT_GPU, run: str = "",
             force_restart: bool = False, max_steps: int = 0) -> None:
        """task: run (prepare on CPU, then train on GPU) | smoke | prepare | train | doctor."""
        if task not in TASKS:
            raise ModalAppError(f"--task {task!r}: use one of {', '.join(TASKS)}")
        gpu, preset = validate_gpu(gpu), validate_preset(preset)
        run = validate_run(run or preset)
        if task == "prepare":
            prepare.remote(preset, run)
        elif task == "train":
            train.with_options(gpu=gpu).remote(preset, run, force_restart, max_steps, "", gpu)
        elif task == "doctor":
            doctor.with_options(gpu=gpu).remote(gpu)
        else:
            print(pipeline.remote(task, preset, run, gpu, force_restart, max_steps))


# ----------------------------------------------------------------------------------------------------------------
# Local mode: the same bodies on this machine, a directory standing in for the volume


def _local_main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="Run the Modal task bodies locally (no Modal): a directory is the volume")
    p.add_argument("--local", action="store_true", required=True)
    p.add_argument("--vol", required=True, help="directory standing in for the Modal volume (PICOCHAT_HOME)")
    p.add_argument("--task", choices=["run", "smoke", "prepare", "train", "doctor"], default="run")
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--run", default="")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--force-restart", action="store_true")
    a = p.parse_args(argv)
    run = validate_run(a.run or a.preset)
    if a.task == "doctor":
        return run_task(picochat_cmd("doctor"), a.vol)
    if a.task == "smoke":
        return smoke_body(a.preset, a.vol)
    if a.task in ("run", "prepare"):
        prepare_body(a.preset, run, a.vol)
    if a.task in ("run", "train"):
        train_body(a.preset, run, a.vol, force_restart=a.force_restart, max_steps=a.max_steps)
    return 0


if __name__ == "__main__":
    sys.exit(_local_main())
