"""picochat on Modal: the speedrun on cloud GPUs, with everything that matters on one persistent Volume.

    pip install modal && modal setup
    modal run launch/modal_app.py --task smoke                      # 10 steps: CUDA, NCCL, one shard, small tokenizer
    modal run --detach launch/modal_app.py --preset d20             # the whole pipeline, on H100:8
    modal run --detach launch/modal_app.py --preset d24 --gpu H100:8 --force-restart --yes
    modal run launch/modal_app.py --task doctor --gpu H100:1       # what picochat sees on that GPU
    modal deploy launch/modal_app.py                                # then open the `serve` URL: web chat + /v1 API

What happens:
- The image is built at deploy time: Python 3.11, gcc (Triton compiles kernels at runtime), the package's
  dependencies installed with uv (one cached layer), then this repository copied in and `uv pip install`ed.
- One Volume (`picochat`, mounted at /vol) is PICOCHAT_HOME: data shards, tokenizer, checkpoints, metrics, logs,
  report, and the torch.compile/Triton caches (keyed by torch, Triton and GPU type, so a cold start reuses them).
- Before any GPU starts, a small CPU call prints `picochat speedrun --dry-run` for those GPUs (every stage's time
  and dollars at Modal's list price, or --price) and the app asks; --yes answers for scripts.
- `prepare` (CPU only, no GPU billed) runs the data and tokenizer stages; `train` (GPU) runs `picochat speedrun`,
  which starts `picochat launch --nproc-per-node <all GPUs>` for each distributed stage. `pipeline` chains the two
  inside Modal, so `--detach` is safe (a detached client keeps only the last function it triggered alive).
- Output is streamed line by line with a `[HEARTBEAT]` line after every 30 s of silence (torch.compile is silent for
  minutes). The Volume is committed after every new checkpoint (seen by polling the checkpoint directories and by
  the log) and on exit, so a preempted or killed run loses at most the steps since its last checkpoint.
- Re-running the same command resumes: picochat's stages default to `--resume auto` and the speedrun skips done
  stages. Modal restarts preempted GPU functions on the same input (`retries`).
- `--force-restart` wipes the run once per top-level `modal run`: the local entrypoint makes an invocation id that
  every call it causes carries (retries, a restarted pipeline, continuations), and the wipe is recorded on the
  volume under that id.
- One container trains a run at a time: a lock file on the volume (container id + a heartbeat every minute; stale
  after 5 minutes) makes a second `train` of the same run refuse with one line.
- A call may run 24 h; 30 minutes before that, `train` stops the speedrun at a checkpoint, releases the lock and
  spawns the next call (same invocation), which continues from the checkpoint (d32 takes more than a day). Use
  `--detach` for such runs, so the app outlives the local client.

The app only shells out to the `picochat` CLI; it never imports picochat. The Modal-independent parts (GPU string
validation, command building, streaming with heartbeat and commit triggers, wipe-once, the run lock, the task
bodies) are plain functions that run locally without Modal:
`python launch/modal_app.py --local --vol /tmp/vol --preset tiny --max-steps 20 [--time-limit 60] [--task plan]`.
"""

import argparse
import codecs
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
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
DAY_S = 24 * 3600                 # the longest a Modal function call may run
CONTINUE_MARGIN_S = 1800          # a train call checkpoints and hands over to a new call this long before its limit
SMOKE_STEPS = 10
SMOKE_VOCAB = 4096                # the smoke's tokenizer: small, trained on a few MB of the one shard it fetches
SMOKE_TOKENIZER_CHARS = 20_000_000
LOCK_STALE_S = 300.0              # a run lock whose heartbeat is older than this belongs to a dead container
LOCK_BEAT_S = 60.0
# $ per GPU-hour on Modal (modal.com/pricing, GPU only; CPU and memory add a little): the plan's default --price
MODAL_PRICES = {"T4": 0.59, "L4": 0.80, "A10": 1.10, "A10G": 1.10, "L40S": 1.95, "A100": 2.10, "A100-40GB": 2.10,
                "A100-80GB": 2.50, "RTX-PRO-6000": 3.03, "H100": 3.95, "H100!": 3.95, "H200": 4.54, "B200": 6.25,
                "B200+": 6.25}

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


def smoke_commands(preset: str, run: str, vol_dir: str) -> list[list[str]]:
    """A 10-step pretrain on fresh state: CUDA, NCCL (all GPUs), data and tokenizer are all exercised, on one data
    shard (plus the validation shard) and a small tokenizer, never the preset's whole dataset."""
    small_tok = ("--set", f"tokenizer.vocab-size={SMOKE_VOCAB}",
                 "--set", f"tokenizer.max-chars={SMOKE_TOKENIZER_CHARS}")
    if preset == "tiny":  # the embedded synthetic corpus: nothing to download
        return [speedrun_command(preset, run, force_restart=True, stages="data,tokenizer,pretrain",
                                 max_steps=SMOKE_STEPS, extra=small_tok)]
    data = str(Path(vol_dir) / "data" / "fineweb")
    return [picochat_cmd("data", "download", "--shards", "1", "--out", data),
            speedrun_command(preset, run, force_restart=True, stages="tokenizer,pretrain", max_steps=SMOKE_STEPS,
                             extra=("--data-dir", data) + small_tok)]


def plan_command(preset: str, run: str, gpu: str, price: Optional[float] = None, rl: bool = False) -> list[str]:
    """`picochat speedrun --dry-run` for the GPUs the app will start: every stage's time and dollars."""
    kind, n = parse_gpu(gpu)
    price = MODAL_PRICES.get(kind) if price is None else price
    cmd = picochat_cmd("speedrun", "--dry-run", "--preset", validate_preset(preset), "--run", validate_run(run),
                       "--gpus", f"{kind.rstrip('!+')}:{n}")
    if price is not None:
        cmd += ["--price", f"{float(price):g}"]
    return cmd + (["--rl"] if rl else [])


def confirm(question: str, yes: bool, ask: Callable[[str], str] = input, interactive: Optional[bool] = None) -> bool:
    """True to go ahead: --yes, or a y/yes answer on a terminal. Without a terminal and without --yes: ModalAppError
    (a script must say --yes rather than start GPUs unasked)."""
    if yes:
        return True
    if not (sys.stdin.isatty() if interactive is None else interactive):
        raise ModalAppError("not starting GPUs without confirmation: no terminal to ask on; add --yes after reading "
                            "the plan")
    return ask(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def new_invocation_id() -> str:
    """The id of one top-level `modal run` (made by the local entrypoint and passed to every call it causes)."""
    return uuid.uuid4().hex[:16]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


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


def wipe_once(vol_dir: str, run: str, invocation: str, commit: Optional[Callable[[], None]] = None) -> bool:
    """Delete runs/<run> the first time top-level invocation `invocation` asks to; True when it wiped.

    Everything one `modal run --force-restart` causes carries its invocation id: Modal's retries of a preempted
    call, a restarted pipeline, the calls that continue a run past the time limit. Only the first wipes; the rest
    resume from the checkpoints made since. The marker is written after the delete and lives on the volume: a
    container that dies mid-delete wipes again on its retry (nothing was trained yet), one that finished does not.
    """
    marker = Path(vol_dir) / ".modal" / f"wiped.{_safe(run)}.{_safe(invocation)}"
    if marker.exists():
        return False
    target = Path(vol_dir) / "runs" / run
    if target.exists():
        shutil.rmtree(target)
    marker.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(marker, json.dumps({"run": run, "invocation": invocation, "at": time.time()}))
    if commit is not None:
        commit()
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def container_id() -> str:
    """This container (Modal sets MODAL_TASK_ID); elsewhere host and process."""
    return os.environ.get("MODAL_TASK_ID") or f"{socket.gethostname()}:{os.getpid()}"


class RunLocked(ModalAppError):
    """Another live container holds the run's lock."""


class RunLock:
    """One container trains a run at a time: `.modal/locks/<run>.json` on the volume holds the owner (container id,
    invocation) and a heartbeat time, rewritten every `beat_s`. A lock whose heartbeat is older than `stale_s`
    belongs to a container that died without releasing it and is taken over.

    A Modal Volume is not a lock server: a write is seen by other containers after our commit and their reload.
    So acquiring writes, commits, waits `settle_s`, reloads and reads again, and keeps the lock only if it is still
    ours (two containers starting within the same moment: at most one keeps it; both may give up, never both go on).
    """

    def __init__(self, vol_dir: str, run: str, invocation: str, owner: Optional[str] = None,
                 commit: Optional[Callable[[], None]] = None, reload: Optional[Callable[[], None]] = None,
                 stale_s: float = LOCK_STALE_S, beat_s: float = LOCK_BEAT_S, settle_s: float = 0.0):
        self.path = Path(vol_dir) / ".modal" / "locks" / f"{_safe(run)}.json"
        self.run, self.invocation, self.owner = run, invocation, owner or container_id()
        self.commit, self.reload = commit or (lambda: None), reload or (lambda: None)
        self.stale_s, self.beat_s, self.settle_s = stale_s, beat_s, settle_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def holder(self) -> Optional[dict]:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None  # absent, or half-written by a dead container: not a live lock

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps({"owner": self.owner, "invocation": self.invocation, "run": self.run,
                                             "heartbeat": time.time()}))

    def acquire(self) -> "RunLock":
        self.reload()
        h = self.holder()
        if h and h.get("owner") != self.owner:
            age = time.time() - float(h.get("heartbeat") or 0)
            if age < self.stale_s:
                raise RunLocked(f"run {self.run!r} is being trained by container {h.get('owner')} (heartbeat "
                                f"{age:.0f}s ago): not starting a second one; wait for it to end (or `modal app stop` "
                                f"it), or pass another --run. A dead container's lock expires after "
                                f"{self.stale_s:.0f}s")
        self._write()
        self.commit()
        if self.settle_s:
            time.sleep(self.settle_s)
        self.reload()
        h = self.holder()
        if not h or h.get("owner") != self.owner:
            raise RunLocked(f"run {self.run!r}: container {h.get('owner') if h else '?'} took the lock at the same "
                            f"moment; not starting a second trainer (re-run once it is done)")
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._write()
                self.commit()
            except Exception as e:  # a missed beat is survivable; stale_s is several beats
                print(f"[modal] run lock heartbeat failed: {e}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        h = self.holder()
        if h and h.get("owner") == self.owner:
            self.path.unlink(missing_ok=True)
            self.commit()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------------------------
# Streaming


def stream(cmd: list[str], env: Optional[dict] = None, heartbeat_s: float = HEARTBEAT_S,
           on_checkpoint: Optional[Callable[[str], None]] = None, watch_dir: Optional[str] = None,
           poll_s: float = 15.0, partial_flush_s: float = 2.0, emit: Callable[[str], None] = None,
           forward_signals: bool = True, deadline: Optional[float] = None) -> int:
    """Run `cmd` with stdout+stderr merged; emit its output line by line; return its exit code.

    - Lines end at \\n or a lone \\r (progress bars); bytes are decoded incrementally, so a UTF-8 character split
      across reads is not mangled. A partial line left without its newline for `partial_flush_s` is emitted as is.
    - After `heartbeat_s` without output, `[HEARTBEAT]` lines say the job is alive (once per silent interval).
    - `on_checkpoint(reason)` is called when a line announces a checkpoint, when the checkpoint signature of
      `watch_dir` changes (polled every `poll_s`), and once at exit.
    - SIGTERM/SIGINT to this process are forwarded to the child, which checkpoints and exits; we keep streaming
      until it does. At `deadline` (time.monotonic()) the child gets SIGTERM the same way, once.
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
            if deadline is not None and now >= deadline and proc.poll() is None:
                emit("[modal] the call's time limit is near: asking the job to checkpoint and stop; a new call "
                     "continues from the checkpoint")
                deadline = None
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
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
             heartbeat_s: float = HEARTBEAT_S, poll_s: float = 15.0, check: bool = True,
             deadline: Optional[float] = None) -> int:
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
                watch_dir=vol_dir, poll_s=poll_s, deadline=deadline)
    if check and rc != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed with exit code {rc}; re-run the same command to resume "
                           f"from the last checkpoint on the volume")
    return rc


def prepare_body(preset: str, run: str, vol_dir: str, commit=None, heartbeat_s: float = HEARTBEAT_S,
                 stages: str = "data,tokenizer") -> int:
    """CPU only: data shards and the tokenizer (no GPU billed while downloading and counting bytes)."""
    return run_task(speedrun_command(preset, run, stages=stages), vol_dir, commit, heartbeat_s=heartbeat_s)


def train_body(preset: str, run: str, vol_dir: str, commit=None, gpu_kind: str = "cpu", force_restart: bool = False,
               max_steps: int = 0, stages: str = "", invocation: str = "local", heartbeat_s: float = HEARTBEAT_S,
               time_left_s: Optional[float] = None, reload=None, extra: tuple = (), lock_settle_s: float = 0.0,
               margin_s: float = CONTINUE_MARGIN_S) -> str:
    """Train under the run lock: wipe once per invocation (--force-restart), then the speedrun, which resumes
    whatever is on the volume. Returns "done", or "continue" when it stopped at a checkpoint because the call's
    time limit (`time_left_s` from now, less `margin_s` for the checkpoint) came near: the caller starts the next
    call."""
    deadline = None if time_left_s is None else time.monotonic() + max(0.0, time_left_s - margin_s)
    with RunLock(vol_dir, run, invocation, commit=commit, reload=reload, settle_s=lock_settle_s):
        if force_restart:
            if wipe_once(vol_dir, run, invocation, commit):
                print(f"[modal] --force-restart: deleted run {run!r} (once for invocation {invocation})", flush=True)
            else:
                print(f"[modal] invocation {invocation} wiped run {run!r} already: resuming from its checkpoints, "
                      f"not wiping again", flush=True)
        cmd = speedrun_command(preset, run, stages=stages, max_steps=max_steps, extra=tuple(extra))
        rc = run_task(cmd, vol_dir, commit, gpu_kind=gpu_kind, heartbeat_s=heartbeat_s, check=False,
                      deadline=deadline)
    if deadline is not None and time.monotonic() >= deadline and rc != 0:
        return "continue"
    if rc != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed with exit code {rc}; re-run the same command to resume "
                           f"from the last checkpoint on the volume")
    return "done"


def smoke_body(preset: str, vol_dir: str, commit=None, gpu_kind: str = "cpu",
               heartbeat_s: float = HEARTBEAT_S) -> int:
    run_task(picochat_cmd("doctor"), vol_dir, None, gpu_kind=gpu_kind, heartbeat_s=heartbeat_s)
    for cmd in smoke_commands(preset, f"smoke-{preset}", vol_dir):
        run_task(cmd, vol_dir, commit, gpu_kind=gpu_kind, heartbeat_s=heartbeat_s)
    return 0


def plan_body(preset: str, run: str, gpu: str, vol_dir: str, price: Optional[float] = None) -> str:
    """The dry run's text (CPU, no GPU billed): every stage's time and dollars on `gpu`."""
    out = subprocess.run(plan_command(preset, run, gpu, price), env=container_env(vol_dir), capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        why = (out.stderr or out.stdout).strip()[-500:]
        raise ModalAppError(f"the plan failed (exit code {out.returncode}): {why}")
    return out.stdout


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

    _commit_lock = threading.Lock()

    def _commit() -> None:  # the stream and the run lock's heartbeat both commit
        with _commit_lock:
            volume.commit()

    @app.function(cpu=8.0, memory=32768, timeout=6 * 3600, volumes={VOL: volume}, retries=_retries)
    def prepare(preset: str, run: str, stages: str = "data,tokenizer") -> int:
        return prepare_body(preset, run, VOL, commit=_commit, stages=stages)

    @app.function(cpu=2.0, memory=8192, timeout=900, volumes={VOL: volume})
    def plan(preset: str, run: str, gpu: str, price: Optional[float] = None) -> str:
        return plan_body(preset, run, gpu, VOL, price)

    @app.function(gpu=validate_gpu(DEFAULT_GPU), cpu=16.0, memory=131072, timeout=DAY_S, volumes={VOL: volume},
                  retries=_retries)
    def train(preset: str, run: str, force_restart: bool = False, max_steps: int = 0, stages: str = "",
              gpu: str = DEFAULT_GPU, invocation: str = "", part: int = 1) -> str:
        invocation = invocation or new_invocation_id()
        t0 = time.monotonic()
        status = train_body(preset, run, VOL, commit=_commit, reload=volume.reload, gpu_kind=parse_gpu(gpu)[0],
                            force_restart=force_restart, max_steps=max_steps, stages=stages, invocation=invocation,
                            time_left_s=DAY_S - (time.monotonic() - t0), lock_settle_s=5.0)
        if status == "continue":  # checkpointed and unlocked: the next call takes over from the volume
            nxt = train.with_options(gpu=gpu).spawn(preset, run, force_restart, max_steps, stages, gpu, invocation,
                                                    part + 1)
            return (f"run {run!r}: part {part} reached the time limit; part {part + 1} continues in call "
                    f"{nxt.object_id}")
        return f"run {run!r}: done in part {part}"

    @app.function(gpu=validate_gpu(DEFAULT_GPU), cpu=16.0, memory=131072, timeout=3600, volumes={VOL: volume})
    def smoke(preset: str, gpu: str = DEFAULT_GPU) -> int:
        return smoke_body(preset, VOL, commit=_commit, gpu_kind=parse_gpu(gpu)[0])

    @app.function(gpu=validate_gpu(DEFAULT_GPU), timeout=600, volumes={VOL: volume})
    def doctor(gpu: str = DEFAULT_GPU) -> int:
        return run_task(picochat_cmd("doctor"), VOL, None, gpu_kind=parse_gpu(gpu)[0])

    @app.function(cpu=1.0, memory=2048, timeout=DAY_S, volumes={VOL: volume})
    def pipeline(task: str, preset: str, run: str, gpu: str, force_restart: bool = False,
                 max_steps: int = 0, invocation: str = "") -> str:
        """Runs inside Modal, so a detached client cannot orphan the GPU step: CPU prepare, then the GPU work. A
        restart of this function passes the same invocation id, so --force-restart still wipes only once."""
        gpu = validate_gpu(gpu)
        if task == "smoke":  # one shard and a small tokenizer, fetched on the GPU box in seconds
            smoke.with_options(gpu=gpu).remote(preset, gpu)
            return f"smoke of {preset} on {gpu}: ok"
        prepare.remote(preset, run)
        return train.with_options(gpu=gpu).remote(preset, run, force_restart, max_steps, "", gpu,
                                                  invocation or new_invocation_id(), 1)

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
             force_restart: bool = False, max_steps: int = 0, yes: bool = False, price: float = -1.0) -> None:
        """task: run (prepare on CPU, then train on GPU) | smoke | prepare | train | doctor. Before any GPU starts,
        the plan with its time and dollars is printed and confirmed (--yes for scripts; --price $/GPU-hour, default
        Modal's list price)."""
        if task not in TASKS:
            raise ModalAppError(f"--task {task!r}: use one of {', '.join(TASKS)}")
        gpu, preset = validate_gpu(gpu), validate_preset(preset)
        run = validate_run(run or preset)
        invocation = new_invocation_id()  # one per top-level call: --force-restart wipes once under it
        if task == "prepare":
            prepare.remote(preset, run)
            return
        if task in ("run", "train"):
            print(plan.remote(preset, run, gpu, None if price < 0 else price))
            if force_restart:
                print(f"--force-restart: run {run!r} on volume {VOLUME_NAME!r} is deleted first (once)")
        what = {"run": f"the {preset} pipeline", "train": f"training {preset}", "smoke": f"a {SMOKE_STEPS}-step smoke "
                f"test of {preset}", "doctor": "the doctor"}[task]
        if not confirm(f"start {gpu} on Modal for {what}?", yes):
            print("not started")
            return
        if task == "train":
            print(train.with_options(gpu=gpu).remote(preset, run, force_restart, max_steps, "", gpu, invocation, 1))
        elif task == "doctor":
            doctor.with_options(gpu=gpu).remote(gpu)
        else:
            print(pipeline.remote(task, preset, run, gpu, force_restart, max_steps, invocation))


# ----------------------------------------------------------------------------------------------------------------
# Local mode: the same bodies on this machine, a directory standing in for the volume


def _local_main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="Run the Modal task bodies locally (no Modal): a directory is the volume")
    p.add_argument("--local", action="store_true", required=True)
    p.add_argument("--vol", required=True, help="directory standing in for the Modal volume (PICOCHAT_HOME)")
    p.add_argument("--task", choices=["run", "smoke", "prepare", "train", "doctor", "plan"], default="run")
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--run", default="")
    p.add_argument("--gpu", default=DEFAULT_GPU, help="the GPUs the plan is for")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--force-restart", action="store_true")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds one train call may run (then it checkpoints and the next call continues)")
    a = p.parse_args(argv)
    run = validate_run(a.run or a.preset)
    if a.task == "plan":
        print(plan_body(a.preset, run, validate_gpu(a.gpu), a.vol))
        return 0
    if a.task == "doctor":
        return run_task(picochat_cmd("doctor"), a.vol)
    if a.task == "smoke":
        return smoke_body(a.preset, a.vol)
    if a.task in ("run", "prepare"):
        prepare_body(a.preset, run, a.vol)
    if a.task in ("run", "train"):
        invocation, part = new_invocation_id(), 1
        while train_body(a.preset, run, a.vol, force_restart=a.force_restart, max_steps=a.max_steps,
                         invocation=invocation, time_left_s=a.time_limit, margin_s=0.0) == "continue":
            part += 1  # what Modal's spawned next call does: same invocation, so no second wipe
            print(f"[modal] part {part} continues run {run!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_local_main())
