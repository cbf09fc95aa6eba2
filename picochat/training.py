"""Training-loop machinery shared by every training stage (pretrain, midtrain, sft, rl).

Nothing here knows about a particular stage. A stage uses it like this:

    write_run_header(stage_dir, cfg, rt.device)                  # run.json: config, versions, GPU, git SHA
    metrics = MetricsLogger(stage_dir / "metrics.jsonl", resume_step=start_step)
    stop = StopFlag.install()                                     # SIGTERM/SIGINT -> stop at the next step boundary
    cmodel, info = prepare_model(model, device=rt.device, dtype=rt.dtype, seq_len=cfg.seq_len, compile=cfg.compile)
    with Heartbeat("pretrain", "compiling the first step"):      # a line every 30 s while nothing else prints
        ...first step...
    for step in ...:
        ...
        loss, stop_now = agree_on_step(loss_sum, stop.requested, rt.device)   # one host sync per step
        check_finite(loss, step, last_ckpt)                       # NaN/inf -> NonFiniteLoss (clear message)
        print0(format_step_line(...)); metrics.log({...})
        if stop_now: save; break

Resume: `lock_stage(stage_dir, run, stage)` makes the process the stage's one trainer (rank 0 holds a flock on
`<stage dir>/lock`), `find_resume_checkpoint(ckpt_root, mode)` picks the newest checkpoint that verifies, and
`capture_rng_state()` / `restore_rng_state()` make the continuation exact.
"""

from __future__ import annotations

import fcntl
import gc
import json
import math
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from picochat import warmup
from picochat.checkpoint import (all_ranks, checkpoint_files, disk_full_error, quarantine, read_meta,
                                 verify_checkpoint)
from picochat.config import UserError, to_dict
from picochat.files import atomic_write_bytes, atomic_write_text, is_disk_full
from picochat.ops import attention
from picochat.ops import fp8 as fp8_ops
from picochat.runtime import (barrier, environment_info, fused_loss_switch, get_rank, get_world_size, gpu_memory,
                              is_rank0, print0)

# ----------------------------------------------------------------------------------------------------------------
# Run header and metrics


def write_run_header(stage_dir: Path, config: Any, device: torch.device | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `run.json` (resolved config, versions, GPU, git SHA) on rank 0. Returns the header dict on every rank.

    `config` is a dataclass or a dict. Re-running a stage (resume) rewrites the header; the previous one is kept as
    `run.prev.json` so a changed config stays visible. Both are written atomically, the copy first, so a full disk
    leaves `run.json` as it was (and raises one UserError).
    """
    cfg = to_dict(config) if hasattr(config, "__dataclass_fields__") else dict(config)
    header = {"config": cfg, "env": environment_info(device), **(extra or {})}
    if is_rank0():
        stage_dir = Path(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        path = stage_dir / "run.json"
        text = json.dumps(header, indent=2, default=str)
        try:
            if path.exists():
                atomic_write_bytes(stage_dir / "run.prev.json", path.read_bytes())
            atomic_write_text(path, text)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(e, f"{path}", stage_dir, 2 * len(text), "run.json is intact") from e
            raise
    return header


class MetricsLogger:
    """Rank-0 JSON-lines metrics: one object per step / eval, appended and flushed at once.

    With `resume_step`, lines of steps after the resume point (written by the interrupted run after its last
    checkpoint) are dropped first, so the file holds exactly one curve.
    """

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool | None = None):
        self.path = Path(path)
        self.enabled = is_rank0() if enabled is None else enabled
        self._f = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a kill -9
                    continue
                if int(rec.get("step", 0)) <= resume_step:
                    keep.append(line)
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        elif resume_step is None and self.path.exists():
            os.replace(self.path, self.path.with_suffix(".jsonl.prev"))
        self._f = open(self.path, "a")

    def log(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        line = json.dumps(record, default=_json_default) + "\n"
        try:
            self._f.write(line)
            self._f.flush()
        except OSError as e:  # a full disk mid-run: one line; the rerun resumes and trims the torn line
            if is_disk_full(e):
                raise disk_full_error(e, str(self.path), self.path.parent, 64 * len(line),
                                      "the checkpoints are intact and the rerun resumes from the newest") from e
            raise

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:  # the buffered tail of a full disk: `log` already raised the one-line error
                pass

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (torn lines skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ----------------------------------------------------------------------------------------------------------------
# The per-step log line


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_step_line(step: int, total: int, loss: float, lrm: float, dt: float, tokens_per_s: float,
                     mfu: float | None = None, eta_s: float | None = None, peak_mem_gb: float | None = None,
                     extra: str = "", cost: str = "") -> str:
    """`step 00123/01000 | loss 3.1234 | lrm 1.00 | dt 812ms | tok/s 645,123 | mfu 52.1% | eta 11m52s | mem 41.2GB`
    and, when `picochat speedrun --price` runs the stage, `| $1.23 spent, ~$4.56 projected` (`cost`)."""
    width = len(str(total))
    parts = [f"step {step:0{width}d}/{total}", f"loss {loss:.4f}", f"lrm {lrm:.2f}", f"dt {dt * 1000:.0f}ms",
             f"tok/s {tokens_per_s:,.0f}"]
    if mfu is not None:
        parts.append(f"mfu {mfu * 100:.1f}%")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    if peak_mem_gb is not None:
        parts.append(f"mem {peak_mem_gb:.1f}GB")
    if cost:
        parts.append(cost)
    if extra:
        parts.append(extra)
    return " | ".join(parts)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


class StepTimer:
    """Step timing that ignores the first `skip` steps (compilation) for tok/s averages and the ETA."""

    def __init__(self, skip: int = 1):
        self.skip = skip
        self.n = 0
        self.total = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        dt = time.perf_counter() - self._t0
        self.n += 1
        if self.n > self.skip:
            self.total += dt
        return dt

    def mean(self) -> float | None:
        k = self.n - self.skip
        return self.total / k if k > 0 else None

    def eta(self, steps_left: int, last_dt: float) -> float:
        m = self.mean()
        return steps_left * (m if m is not None else last_dt)


# ----------------------------------------------------------------------------------------------------------------
# Heartbeat


class Heartbeat:
    """Print `[heartbeat] <stage> alive, <what> for <n>s` every `interval` s while the block runs silently.

    Used around anything that can be quiet for minutes (torch.compile's first step, a long eval, a checkpoint
    write), so log watchers and humans can tell a slow stage from a hung one. `beat()` resets the silence timer;
    `what` may be updated on the fly. Rank 0 only; a daemon thread, so it never keeps the process alive.
    """

    def __init__(self, stage: str, what: str, interval: float = 30.0, meter: "CostMeter | None" = None):
        self.stage, self.what, self.interval, self.meter = stage, what, interval, meter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._last = 0.0

    def beat(self, what: str | None = None) -> None:
        self._last = time.monotonic()
        if what is not None:
            self.what = what

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.interval / 4)):
            now = time.monotonic()
            if now - self._last >= self.interval:
                cost = f" | {self.meter.text()}" if self.meter is not None else ""
                print0(f"[heartbeat] {self.stage} alive, {self.what} for {now - self._t0:.0f}s{cost}")
                self._last = now

    def __enter__(self) -> "Heartbeat":
        self._t0 = self._last = time.monotonic()
        if is_rank0():
            self._thread = threading.Thread(target=self._run, name="picochat-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


# ----------------------------------------------------------------------------------------------------------------
# Dollars: spent, projected, and the budget stop


COST_ENV = "PICOCHAT_COST"


class CostMeter:
    """Dollars spent and projected while a stage runs, and the `--budget` stop, from PICOCHAT_COST.

    `picochat speedrun --price` sets PICOCHAT_COST for each stage it starts, as JSON: `rate` ($ per hour of the whole
    job: price x GPUs), `spent` ($ when it was written) and `at` (that moment, Unix time, so the stage's own start-up
    is counted), `later` (the estimated $ of the stages after this one, for the projection) and, with --budget,
    `budget` ($ for the whole run) and `ledger` (a file this stage writes when it stops for the budget, so the
    speedrun knows the stage stopped rather than finished). Machines are billed by wall time, so
    spent = spent + rate x (now - at), whatever the stage is doing.
    """

    def __init__(self, rate: float, spent: float = 0.0, at: float | None = None, budget: float | None = None,
                 later: float = 0.0, ledger: str | None = None):
        self.rate, self.spent0, self.at = float(rate), float(spent), time.time() if at is None else float(at)
        self.budget = None if budget is None else float(budget)
        self.later, self.ledger = float(later), ledger
        self._mark = time.monotonic()
        self._step_s = 0.0   # wall time of the last loop iteration (a step with whatever eval or save it did)
        self._save_s = 0.0   # the longest checkpoint save so far
        self._eta_s: float | None = None
        self._eta_at = 0.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "CostMeter | None":
        text = (os.environ if env is None else env).get(COST_ENV, "")
        if not text:
            return None
        try:
            d = json.loads(text)
            meter = cls(d["rate"], d.get("spent", 0.0), d.get("at"), d.get("budget"), d.get("later", 0.0),
                        d.get("ledger"))
            ok = all(math.isfinite(v) and v >= 0 for v in (meter.rate, meter.spent0, meter.later)) and (
                meter.budget is None or (math.isfinite(meter.budget) and meter.budget > 0))
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise UserError(f"{COST_ENV}={text[:80]!r}: expected the JSON `picochat speedrun --price` writes "
                            f'(e.g. {{"rate": 24.0, "spent": 0.0}}); unset it to train without cost tracking')
        return meter

    def spent(self) -> float:
        return self.spent0 + self.rate * max(0.0, time.time() - self.at) / 3600

    def projected(self) -> float:
        """Spent, plus this stage's remaining time (its last ETA, counted down) and the later stages' estimate."""
        left = 0.0 if self._eta_s is None else max(0.0, self._eta_s - (time.monotonic() - self._eta_at))
        return self.spent() + self.rate * left / 3600 + self.later

    def text(self, eta_s: float | None = None) -> str:
        if eta_s is not None:
            self._eta_s, self._eta_at = eta_s, time.monotonic()
        budget = f" (budget ${self.budget:,.2f})" if self.budget is not None else ""
        return f"${self.spent():,.2f} spent, ~${self.projected():,.2f} projected{budget}"

    # seconds held back for a checkpoint save before one has been timed, and for the process to exit after it
    FIRST_SAVE_S = 2.0
    EXIT_S = 5.0

    def budget_due(self) -> bool:
        """Called once per step, before the step's sync: True when finishing this step, one more, a checkpoint and
        the process exit could pass the budget, so the loop saves and stops now, under it. The times are the last
        loop iteration's, the longest save seen (FIRST_SAVE_S before the first) and EXIT_S."""
        now = time.monotonic()
        self._step_s, self._mark = now - self._mark, now
        if self.budget is None:
            return False
        save_s = self._save_s or max(self._step_s, self.FIRST_SAVE_S)
        reserve_s = 2 * self._step_s + save_s + self.EXIT_S
        return self.spent() + self.rate * reserve_s / 3600 >= self.budget

    def saved(self, seconds: float) -> None:
        self._save_s = max(self._save_s, seconds)

    def record_stop(self, stage: str, step: int, checkpoint: Path | None) -> str:
        """Rank 0 writes the ledger (the speedrun reads it); returns the line to print."""
        spent = self.spent()
        if self.ledger and is_rank0():
            atomic_write_text(Path(self.ledger), json.dumps({"stage": stage, "step": step, "spent": spent,
                                                             "budget": self.budget, "checkpoint": str(checkpoint)}))
        return (f"[{stage}] stopping at step {step} for the budget: ${spent:,.2f} spent of ${self.budget:,.2f}; "
                f"checkpoint {checkpoint}; re-run with a larger --budget to continue from it")


# ----------------------------------------------------------------------------------------------------------------
# Signals: SIGTERM/SIGINT -> checkpoint at the next step boundary, exit 0


class StopFlag:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary (the loop saves, then exits 0).

    Spot preemption and `kill` send SIGTERM; Ctrl-C sends SIGINT. A second SIGINT restores the default behaviour
    (KeyboardInterrupt) and a second SIGTERM exits at once (status 143), so a process stuck before its next step
    boundary (minutes of compile before the first) can still be stopped. `restore()` puts the old handlers back.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signame = ""
        self._old: dict[int, Any] = {}

    @classmethod
    def install(cls) -> "StopFlag":
        flag = cls()
        if threading.current_thread() is not threading.main_thread():
            return flag  # signal handlers can only be set from the main thread (e.g. a stage run in a test thread)
        for sig in (signal.SIGTERM, signal.SIGINT):
            flag._old[sig] = signal.signal(sig, flag._handle)
        return flag

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.requested and signum == signal.SIGTERM:
            print("[signal] second SIGTERM: exiting now, without waiting for the step boundary", flush=True)
            raise SystemExit(128 + signal.SIGTERM)
        self.requested = True
        self.signame = signal.Signals(signum).name
        print(f"[signal] {self.signame} received: saving a checkpoint at the next step boundary, then exiting",
              flush=True)

    def restore(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old.clear()


def agree_on_step(loss_sum: torch.Tensor, stop: bool, device: torch.device, count: int = 1) -> tuple[float, bool]:
    """The step's one host sync: mean loss over ranks and whether any rank wants to stop.

    `loss_sum` is this rank's summed (detached) micro-batch loss and `count` the number of micro-batches in it.
    One small all-reduce carries both numbers, so all ranks see the same loss (NaN checks agree) and stop together.
    """
    t = torch.stack([loss_sum.detach().float().reshape(()) / count,
                     torch.tensor(float(stop), device=loss_sum.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t[0] /= dist.get_world_size()
    loss, s = t.tolist()
    return loss, s > 0


# ----------------------------------------------------------------------------------------------------------------
# NaN / inf guard


class NonFiniteLoss(UserError):
    """Training produced a NaN/inf loss. The run stops; the last good checkpoint is left untouched."""


def check_finite(loss: float, step: int, last_checkpoint: Path | None = None) -> None:
    if math.isfinite(loss):
        return
    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
    raise NonFiniteLoss(
        f"loss became {loss} at step {step}; stopping without saving ({where}). Lower the learning rate "
        f"(--matrix-lr / --embedding-lr), check the data, or resume from the checkpoint with a different --seed")


# ----------------------------------------------------------------------------------------------------------------
# fp16 loss scaling


class LossScaler:
    """Dynamic loss scaling for fp16 training (GPUs without bf16). fp16 gradients below ~6e-8 flush to zero, so each
    micro-batch's loss is multiplied by `scale` before backward and the fp32 master gradients are divided by it
    before the optimizer step. A step whose gradients hold an inf/NaN on any rank (the scale was too large) is
    skipped everywhere and the scale multiplied by `backoff`; after `growth_interval` good steps in a row it is
    multiplied by `growth`. Powers of two keep the unscaling exact.

    The policy is torch.amp.GradScaler's; GradScaler itself does not fit MuonAdamW: its overflow flag is per
    process, while here each rank holds un-reduced gradients (the optimizer reduces them), so the flag is
    all-reduced. The optimizer must not be armed during a scaled backward (its hooks would start reducing the
    gradients before they are checked); `step` then reduces them itself.

        loss = ...; scaler.backward(loss)        # per micro-batch, with opt.arm(False)
        scaler.step(opt)                         # unscale, check, step or skip, adjust the scale
    """

    def __init__(self, scale: float = 2.0 ** 16, growth: float = 2.0, backoff: float = 0.5,
                 growth_interval: int = 2000, max_skips_in_row: int = 50):
        self.scale = float(scale)
        self.growth, self.backoff, self.growth_interval = growth, backoff, growth_interval
        self.max_skips_in_row = max_skips_in_row
        self.good_steps = 0     # good steps since the scale last changed
        self.skips_in_row = 0
        self.skipped = 0        # steps skipped in this run (all time, across resumes)

    def update(self, found_inf: bool) -> None:
        """The scale after a step: halved (by `backoff`) on overflow, grown after `growth_interval` good steps."""
        if found_inf:
            self.scale *= self.backoff
            self.good_steps = 0
            self.skips_in_row += 1
            self.skipped += 1
            if self.skips_in_row > self.max_skips_in_row:
                raise UserError(f"fp16: the gradients were inf/NaN for {self.skips_in_row} steps in a row (loss "
                                f"scale now {self.scale:g}); the model diverged in half precision. Use --dtype "
                                f"float32 (or bfloat16 on a GPU that has it), or a lower learning rate")
            return
        self.skips_in_row = 0
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth
            self.good_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale).backward()

    def unscale_(self, params: list[torch.Tensor]) -> bool:
        """Divide every gradient by the scale in place; True when any gradient on any rank is inf/NaN."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        found = torch.zeros(1, device=grads[0].device)
        inv = torch.full((1,), 1.0 / self.scale, device=grads[0].device)
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault((g.device, g.dtype), []).append(g)
        for (dev, _), gs in by_device.items():
            f = found if dev == found.device else torch.zeros(1, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(gs, f, inv.to(dev))
            if f is not found:
                found += f.to(found.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item())

    def step(self, opt: Any) -> bool:
        """Unscale, then the optimizer step unless a gradient overflowed; adjust the scale. True if it stepped."""
        before = self.scale
        found = self.unscale_([p for g in opt.param_groups for p in g["params"]])
        if not found:
            opt.step()
        self.update(found)
        if found:
            print0(f"[fp16] inf/NaN gradients: step skipped, loss scale {before:g} -> {self.scale:g}")
        return not found

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skips_in_row": self.skips_in_row,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state.get("good_steps", 0))
        self.skips_in_row = int(state.get("skips_in_row", 0))
        self.skipped = int(state.get("skipped", 0))


def loss_scaler(dtype: torch.dtype) -> LossScaler | None:
    """A scaler for fp16 training; None for bf16 and fp32, whose range needs none (their path is unchanged)."""
    return LossScaler() if dtype == torch.float16 else None


def out_of_memory(stage: str, step: int, rows: int, seq_len: int | None, total_tokens: int | None,
                  device: torch.device, last_checkpoint: Path | None, activation_budget: float | None = None
                  ) -> UserError:
    """The one error for a training step that ran out of GPU memory: where, with what micro-batch, what is kept,
    and the flag to change. Halving --device-batch-size keeps the step's batch (more, smaller micro-batches) and
    the rerun resumes from the last checkpoint."""
    mem = gpu_memory(device)
    where = f" ({mem / 1e9:.0f} GB)" if mem else ""
    kept = (f"the last checkpoint, {last_checkpoint}, is intact and a rerun resumes from it" if last_checkpoint
            else "no checkpoint was saved yet")
    same = (f"the total batch stays {total_tokens:,} tokens through gradient accumulation" if total_tokens
            else "each step still trains on the same samples, in more micro-batches")
    smaller = (f"--device-batch-size {rows // 2} ({same})" if rows > 1
               else "a shorter sequence length or a smaller model")
    budget = (" or --activation-budget 0.7 (recompute some activations)"
              if activation_budget is not None and activation_budget >= 1.0 else "")
    shape = f"{rows} x {seq_len} tokens" if seq_len else f"{rows} sequences"
    return UserError(f"[{stage}] out of GPU memory at step {step} with a micro-batch of {shape}{where}; {kept}. "
                     f"Rerun the same command with {smaller}{budget}")


# ----------------------------------------------------------------------------------------------------------------
# Resume helpers


RESUME_MODES = ("auto", "never", "wipe")
RESUME_HELP = ("auto (the newest checkpoint of the run that verifies) | never (refuses if the run has checkpoints) | "
               "wipe (deletes them, starts over) | a checkpoint directory")


def _where(ckpt_root: Path) -> str:
    """`run 'x' stage base` for `PICOCHAT_HOME/runs/x/base/checkpoints`."""
    return f"run {ckpt_root.parent.parent.name!r} stage {ckpt_root.parent.name}"


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """Every `step_XXXXXX` folder, oldest first, with or without its meta.json (a damaged one is named, not
    silently passed over)."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def verify_on_all_ranks(ckpt: Path) -> list[str]:
    """verify_checkpoint with the hashing split across ranks (rank r checks every world-th file); every rank gets
    the same list of problems, so all ranks make the same choice."""
    names = checkpoint_files(ckpt)
    mine = set(names[get_rank()::get_world_size()])
    return sorted({msg for part in all_ranks(verify_checkpoint(ckpt, mine)) for msg in part})


def find_resume_checkpoint(ckpt_root: Path, mode: str = "auto") -> Path | None:
    """The checkpoint to continue from (collective: every rank calls it), or None to start fresh.

    'auto': the newest checkpoint that verifies; each newer one that does not is named in a warning and moved
    aside (`step_XXXXXX.bad`, nothing deleted). 'never': start fresh, refusing (and deleting nothing) when the stage
    already has checkpoints, which a fresh run would overwrite and prune. 'wipe': delete the stage's checkpoints,
    then start fresh. A path: that checkpoint directory, which must verify.
    """
    ckpt_root = Path(ckpt_root)
    existing = _step_dirs(ckpt_root)
    if mode == "never":
        if existing:
            raise UserError(f"--resume never: {_where(ckpt_root)} already has {len(existing)} checkpoint(s) "
                            f"(newest {existing[-1].name}, in {ckpt_root}); nothing was deleted. Continue it with "
                            f"--resume auto, train under another --run NAME, or start it over with --resume wipe "
                            f"(deletes them)")
        return None
    if mode == "wipe":
        if is_rank0() and ckpt_root.is_dir():
            shutil.rmtree(ckpt_root)
            print0(f"[resume] --resume wipe: deleted {len(existing)} checkpoint(s) of {_where(ckpt_root)}")
        barrier()
        return None
    if mode == "auto":
        return _newest_verified(ckpt_root, existing)
    p = Path(mode)
    if not (p / "meta.json").exists():
        raise UserError(f"--resume {mode!r}: expected {', '.join(RESUME_MODES)}, or a checkpoint directory holding "
                        f"meta.json")
    problems = verify_on_all_ranks(p)
    if problems:
        raise UserError(f"--resume {mode}: the checkpoint fails verification ({'; '.join(problems)}); pass "
                        f"another checkpoint directory, or --resume auto for the newest one that verifies")
    read_meta(p)
    return p


def _newest_verified(ckpt_root: Path, ckpts: list[Path]) -> Path | None:
    for ck in reversed(ckpts):
        problems = verify_on_all_ranks(ck)
        if not problems:
            return ck
        moved = quarantine(ck) if is_rank0() else ck
        barrier()
        print0(f"[resume] WARNING: checkpoint {ck} is damaged and was skipped ({'; '.join(problems)}); moved aside "
               f"to {moved.name} (nothing deleted); falling back to the previous checkpoint")
    if ckpts:
        raise UserError(f"{_where(ckpt_root)}: none of its {len(ckpts)} checkpoint(s) verifies (each named above, "
                        f"moved aside as step_*.bad in {ckpt_root}, nothing deleted); rerun to start fresh, or "
                        f"train under another --run NAME")
    return None


# ----------------------------------------------------------------------------------------------------------------
# One trainer per run and stage


_held: dict[str, int] = {}  # lock path -> descriptor, of the locks this process holds


class StageLock:
    """The flock on `<stage dir>/lock` (its content: host, pid, start time). The kernel drops a flock when its
    process dies, however it dies, so a held lock means a live holder; `release()` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        if _held.get(str(self.path)) == self.fd:
            del _held[str(self.path)]
            try:
                os.ftruncate(self.fd, 0)  # empty: nobody holds it
            except OSError:
                pass
            os.close(self.fd)
        self.fd = -1


def _holder(path: Path) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text() or "{}")
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    return True


def _acquire(path: Path, run: str, stage: str) -> StageLock | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path) in _held:  # an earlier stage of this process did not release it: ours to take again
        StageLock(path, _held[str(path)]).release()
    for attempt in range(3):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = _holder(path)
            if who.get("host") == socket.gethostname() and not _alive(who.get("pid")) and attempt < 2:
                # the recorded process is gone, yet its lock is held: a child it forked kept the descriptor. The run
                # is dead; a new lock file (new inode) takes over
                print0(f"[lock] {path}: its holder, pid {who.get('pid')}, is gone; taking the lock over")
                path.unlink(missing_ok=True)
                continue
            raise UserError(f"run {run!r} stage {stage} is already being trained by pid {who.get('pid', '?')} on "
                            f"{who.get('host', '?')} (lock {path}); wait for it to finish, stop it, or train under "
                            f"another --run NAME") from None
        except OSError as e:  # e.g. ENOLCK: a network file system without locks
            os.close(fd)
            print0(f"[lock] WARNING: cannot lock {path} ({e.strerror}); a second process on this run would not be "
                   f"stopped")
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # unlinked by a take-over between our open and our flock: lock the new file instead
            os.close(fd)
            continue
        prev = _holder(path)
        if prev.get("pid") and (prev.get("pid"), prev.get("host")) != (os.getpid(), socket.gethostname()):
            print0(f"[lock] took over the lock of pid {prev['pid']} on {prev.get('host')}, which ended without "
                   f"releasing it (killed?)")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode())
        _held[str(path)] = fd
        return StageLock(path, fd)
    raise UserError(f"{path}: could not take the run's lock (it changed hands during the attempt); rerun")


def lock_stage(stage_dir: Path, run: str, stage: str) -> StageLock | None:
    """Make this process the one that trains `run`'s `stage` (collective; rank 0 takes the lock, which also covers a
    file system shared across nodes). A second process refuses on every rank with one line naming the holder."""
    lock, err = None, None
    if is_rank0():
        try:
            lock = _acquire(Path(stage_dir) / "lock", run, stage)
        except UserError as e:
            err = str(e)
    errors = [e for e in all_ranks(err) if e]
    if errors:
        if lock is not None:
            lock.release()
        raise UserError(errors[0])
    return lock


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, torch CPU and (if used) CUDA RNG states of this process."""
    import random

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device is not None and device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    import random

    if "python" in state:
        random.setstate(state["python"])
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    if "mps" in state and device is not None and device.type == "mps":
        torch.mps.set_rng_state(state["mps"].cpu())


# ----------------------------------------------------------------------------------------------------------------
# Compile and GC


def should_compile(flag: bool | None, device: torch.device) -> bool:
    """torch.compile on CUDA by default, off on CPU/MPS (compile time dominates tiny CPU runs). Flag overrides;
    PICOCHAT_COMPILE=0/1 overrides both (handy for debugging a graph break on the GPU)."""
    env = os.environ.get("PICOCHAT_COMPILE")
    if env in ("0", "1"):
        return env == "1"
    if flag is not None:
        return flag
    return device.type == "cuda"


def maybe_compile(model: torch.nn.Module, flag: bool | None, device: torch.device,
                  activation_budget: float = 1.0) -> torch.nn.Module:
    """The model to call in the training loop (compiled or not). Save/load `state_dict` from the original module.

    dynamic=False: shapes are fixed in training, and a dynamic-shape graph is slower; eval with another batch shape
    compiles one more graph. `activation_budget` < 1 asks the compiler's partitioner to keep at most that fraction
    of the activations it would save for backward and recompute the cheapest rest (torch._functorch's
    activation_memory_budget). Measured at d20, micro-batch 32, on an H200: 1.0 -> 72.3 GB peak, 150.8K tok/s;
    0.7 -> 47.4 GB, 147.0K tok/s (README "Performance").
    """
    if not should_compile(flag, device):
        return model
    if not 0.0 < activation_budget <= 1.0:
        raise UserError(f"--activation-budget {activation_budget}: must be in (0, 1] (1 = no recomputation)")
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "activation_memory_budget"):
        functorch_config.activation_memory_budget = activation_budget
    elif activation_budget < 1.0:
        raise UserError(f"--activation-budget {activation_budget}: this torch ({torch.__version__}) has no "
                        f"activation memory budget; upgrade torch or drop the flag")
    budget = f", activation budget {activation_budget:g}" if activation_budget < 1.0 else ""
    if warmup.compile_scope() == "blocks":
        print0(f"[compile] torch.compile of each block and the head (dynamic=False{budget}, "
               f"{warmup.SCOPE_ENV}=blocks): the first step takes a while")
        return warmup.compile_blocks(model)
    print0(f"[compile] torch.compile(model, dynamic=False{budget}): the first step takes a while")
    return torch.compile(model, dynamic=False)


# ----------------------------------------------------------------------------------------------------------------
# Preparing a built model for training: dtype -> fp8 -> attention plan -> compile, in one place


def apply_fp8(model: torch.nn.Module, flag: bool | None, device: torch.device, compiled: bool = True) -> int:
    """--fp8 / --no-fp8 / the default (`fp8.resolve`): switch the block matmuls to fp8 (picochat/ops/fp8.py), or fail
    clearly where fp8 was asked for and the GPU has no fp8 cores. Returns how many matmuls were switched."""
    if not fp8_ops.resolve(flag, model.config.n_layer, device, compiled):
        return 0
    ok, why = fp8_ops.supported(device)
    if not ok:
        raise UserError(f"--fp8: {why}; drop --fp8 to train in bf16")
    which = fp8_ops.scope(model.config.n_layer)
    n = fp8_ops.convert(model, which)
    how = "--fp8" if flag else f"default for d{fp8_ops.FP8_MIN_DEPTH}+ on this GPU; --no-fp8 turns it off"
    what = ("MLP matmuls (attention projections stay bf16 below "
            f"d{fp8_ops.FP8_ALL_DEPTH})" if which == "mlp" else "block matmuls")
    print0(f"[fp8] {n - 1} {what} in fp8 (tensorwise e4m3 forward, e5m2 gradients; {how}), and the lm_head's "
           "logits in the training loss")
    return n


def prepare_model(model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype, seq_len: int,
                  compile: bool | None = None, fp8: bool | None = False, activation_budget: float = 1.0,
                  run_folder: Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Apply, in this order, dtype -> fp8 -> attention plan -> compile to a built GPT; return (the module to call for
    training, info) with info = {"compiled": bool, "fp8": bool, "fp8_scope": "mlp" | "all" | None}. Also sets
    `model.fused_loss` from PICOCHAT_FUSED_LOSS.

    `fp8` is the --fp8 flag's tri-state (None = `fp8.resolve`'s default rule, which needs the compile decision, so
    it is taken first). The attention plan is decided before compiling so the traced graph holds no prints or env
    reads (`attention.prepare`). Parameters are never replaced (fp8 swaps module classes in place; compile wraps),
    so an optimizer built on `model` afterwards sees the same tensors; save and load through `model`, not the
    returned module. `run_folder`: where compile artifacts are loaded from now and saved after the first step
    (warmup.load_artifacts)."""
    model.fused_loss = fused_loss_switch()
    t0 = time.perf_counter()
    model.set_compute_dtype(dtype)
    compiled = should_compile(compile, device)
    fp8_on = apply_fp8(model, fp8, device, compiled) > 0
    t1 = time.perf_counter()
    attention.prepare(model.window_sizes, seq_len, device)
    t2 = time.perf_counter()
    cache = warmup.use_compile_cache(device) if compiled else None
    artifacts = None
    if cache is not None:
        print0(f"[compile] {warmup.describe_cache(cache)}")
        if run_folder is not None:
            artifacts = warmup.load_artifacts(run_folder, device)
            if artifacts["loaded"]:
                print0(f"[compile] loaded {artifacts['loaded']} compile artifacts saved by this run "
                       f"({artifacts['file']})")
            elif artifacts["in_cache"]:
                print0(f"[compile] the compile cache already holds this run's saved artifacts ({artifacts['file']})")
    t3 = time.perf_counter()
    cmodel = maybe_compile(model, compile, device, activation_budget)
    # seconds of each part, for the start-up line: "compile setup" took 5.8 s of a d20 start on an H100, so the
    # cache and artifacts are timed apart from torch.compile's own set-up (its imports)
    parts = {"dtype/fp8": t1 - t0, "attention plan": t2 - t1, "compile cache + artifacts": t3 - t2,
             "compile setup": time.perf_counter() - t3}
    return cmodel, {"compiled": compiled, "fp8": fp8_on, "cache": cache, "artifacts": artifacts, "device": device,
                    "fp8_scope": fp8_ops.scope(model.config.n_layer) if fp8_on else None, "prepare_s": parts}


KERNEL_CATEGORIES = (  # first match wins: cuDNN attention kernels also carry "sm90_" like the GEMMs
    ("attention", ("sdpa", "flash", "fmha", "attention", "cudnn", "scaled_dot_product")),
    ("matmul", ("nvjet", "gemm", "xmma", "cutlass", "cublas", "splitkreduce", "aten::mm", "aten::addmm",
                "aten::bmm", "scaled_mm")),
    ("triton", ("triton",)),
    ("nccl", ("nccl", "gloo")),
    ("memory", ("memcpy", "memset")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    if low.startswith("_") and low.endswith("_kernel"):  # picochat's own Triton kernels (picochat/ops/kernels.py)
        return "triton"
    # compiler-generated kernels are elementwise work even when named after the op they feed
    # ("triton_poi_fused__scaled_mm_..." is an fp8 cast, not a GEMM)
    if low.startswith("triton_"):
        return "triton"
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def profile_step(step: Any, device: torch.device, top: int = 25) -> dict[str, Any]:
    """Run `step()` once under torch.profiler and sum kernel time (GPU kernel time on CUDA, CPU op self time elsewhere)
    by name and by category (matmul, attention, triton, nccl, memory, other). Prints the `top` names on rank 0."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []  # (ms, calls, name, category)
    for e in prof.key_averages():
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t > 0:
            rows.append((t / 1000.0, e.count, e.key, kernel_category(e.key)))
    rows.sort(key=lambda r: -r[0])
    cats: dict[str, float] = {}
    for ms, _, _, cat in rows:
        cats[cat] = cats.get(cat, 0.0) + ms
    total = sum(cats.values())
    print0(f"[profile] one step: {total:.1f} ms of {'kernel' if cuda else 'CPU op'} time; "
           + ", ".join(f"{k} {v:.1f} ms ({100 * v / max(total, 1e-9):.0f}%)"
                       for k, v in sorted(cats.items(), key=lambda kv: -kv[1])))
    for ms, count, name, cat in rows[:top]:
        print0(f"[profile] {ms:9.2f} ms {count:6d}x  {cat:9s} {name[:110]}")
    return {"total_ms": round(total, 2), "categories": {k: round(v, 2) for k, v in cats.items()},
            "top": [[name[:200], round(ms, 3), count] for ms, count, name, _ in rows[:top]]}


def freeze_gc() -> None:
    """Collect once and stop the cyclic GC: long-lived training state makes gen-2 collections cost ~0.5 s
    pauses (measured by nanochat); reference counting still frees everything the loop allocates."""
    gc.collect()
    gc.freeze()
    gc.disable()


def unfreeze_gc() -> None:
    gc.unfreeze()
    gc.enable()
