"""`picochat speedrun`: one command from nothing to a chat model, resumable at any point.

data -> tokenizer -> pretrain -> base eval -> midtrain -> SFT -> (RL) -> chat eval -> report.

Each stage runs as a child process (`python -m picochat <stage> ...`, or under `picochat launch` when there are
several GPUs) so a crash or a kill of one stage never corrupts the orchestrator's state. Progress is recorded in
`runs/<run>/speedrun.json`: a stage is `done` with the fingerprint of its inputs (its own arguments plus the
fingerprints of the stages it reads). A re-run skips done stages whose fingerprint still matches, re-runs an
interrupted stage (which continues from its own latest checkpoint, `--resume auto`), and redoes a stage whose
inputs changed (its old outputs are removed first, so nothing stale is resumed).

Presets are plain data (`PRESETS`): the depth, data amounts, batch sizes, which stages run, eval sizes. Any stage
flag can be overridden with `--set stage.flag=value` (e.g. `--set pretrain.num-iterations=100`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picochat.config import UserError, fingerprint, require, require_dir
from picochat.files import atomic_write_text

HEARTBEAT_SECONDS = 30.0

# ----------------------------------------------------------------------------------------------------------------
# Presets: plain data


@dataclass
class Preset:
    name: str
    what: str
    depth: int
    data: str                    # "synth" or "download"
    shards: int = 0              # download: shards used for pretraining (the val shard comes on top)
    tokenizer_shards: int = 0    # download: shards fetched before tokenizer training (the rest in background)
    vocab_size: int = 32768
    tokenizer_max_chars: int = 2_000_000_000
    stages: tuple[str, ...] = ("data", "tokenizer", "pretrain", "base_eval", "midtrain", "sft", "chat_eval",
                               "report")
    stage_args: dict[str, dict[str, Any]] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", what="a few-million-parameter model on the embedded synthetic corpus; minutes on any CPU",
        depth=4, data="synth", vocab_size=2048,
        stage_args={
            "pretrain": {"preset": "tiny"},
            "base_eval": {"bpb": True, "samples": True, "eval-tokens": 32768},
            "midtrain": {"num-iterations": 150, "eval-every": 50, "save-every": 50},
            "sft": {"num-iterations": 150, "eval-every": 50, "save-every": 50},
            "rl": {"task": "synth", "num-iterations": 30, "save-every": 10},
            "chat_eval": {"tasks": "synth,spellingbee", "max-problems": 64},
        },
    ),
    "d12": Preset(name="d12", what="GPT-1 size, ~5 min pretrain on 8xH100; research iteration", depth=12,
                  data="download", shards=24, tokenizer_shards=8,
                  stage_args={"base_eval": {"bpb": True, "core": True, "samples": True, "max-per-task": 500},
                              "chat_eval": {"max-problems": 500}}),
    "d20": Preset(name="d20", what="the original $100-class speedrun model; 8xH100, ~hours", depth=20,
                  data="download", shards=100, tokenizer_shards=8,
                  stage_args={"base_eval": {"bpb": True, "core": True, "samples": True}}),
    "d24": Preset(name="d24", what="GPT-2 grade (CORE > 0.2565); 8xH100", depth=24, data="download", shards=170,
                  tokenizer_shards=8, stage_args={"base_eval": {"bpb": True, "core": True, "samples": True}}),
    "d32": Preset(name="d32", what="the $1000-class model; 8xH100, ~a day", depth=32, data="download", shards=400,
                  tokenizer_shards=8, stage_args={"base_eval": {"bpb": True, "core": True, "samples": True}}),
}

ALL_STAGES = ("data", "tokenizer", "pretrain", "base_eval", "midtrain", "sft", "rl", "chat_eval", "report")
# what each stage reads (for fingerprints): a changed upstream stage invalidates everything downstream
UPSTREAM = {
    "data": (), "tokenizer": ("data",), "pretrain": ("data", "tokenizer"), "base_eval": ("pretrain",),
    "midtrain": ("pretrain",), "sft": ("midtrain", "pretrain"), "rl": ("sft",),
    "chat_eval": ("sft", "rl", "midtrain"), "report": ("base_eval", "chat_eval"),
}
# the directory a stage owns under the run (removed when its inputs change)
STAGE_OUTPUT = {"tokenizer": "tokenizer", "pretrain": "base", "midtrain": "mid", "sft": "sft", "rl": "rl"}


@dataclass
class SpeedrunConfig:
    preset: str | None = None
    run: str | None = None
    rl: bool = False
    stages: str | None = None           # comma list: run only these (e.g. "data,tokenizer" on a CPU box)
    max_steps: int | None = None        # cap every training stage's steps (a short end-to-end run)
    sets: list[str] = field(default_factory=list)
    force_restart: bool = False
    yes: bool = False
    dry_run: bool = False
    price: float | None = None          # $ per GPU-hour for the cost estimate
    nproc: int | None = None            # GPUs to use (default: all visible)
    data_dir: str | None = None         # use these shards instead of the preset's data source


# ----------------------------------------------------------------------------------------------------------------
# Hardware and preset choice


def detect_hardware() -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {"gpus": 0, "gpu_name": None, "gpu_mem_gb": 0.0, "cpu_count": os.cpu_count() or 1}
    if torch.cuda.is_available():
        hw["gpus"] = torch.cuda.device_count()
        hw["gpu_name"] = torch.cuda.get_device_name(0)
        hw["gpu_mem_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        hw["mps"] = True
    return hw


def choose_preset(hw: dict[str, Any]) -> tuple[str, str]:
    """The preset a bare `picochat speedrun` picks, and why."""
    n = hw["gpus"]
    if n == 0:
        return "tiny", "no CUDA GPU found, so the CPU-sized tiny preset (offline, embedded corpus)"
    if n >= 8:
        return "d20", f"{n} GPUs ({hw['gpu_name']}) found: the d20 speedrun model"
    return "d12", f"{n} GPU(s) ({hw['gpu_name']}) found: d12 fits a short run on fewer than 8 GPUs"


# ----------------------------------------------------------------------------------------------------------------
# Plan


def parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise UserError(f"--set {s!r}: expected stage.flag=value, e.g. --set pretrain.num-iterations=100")
        key, value = s.split("=", 1)
        stage, flag = key.split(".", 1)
        if stage not in ALL_STAGES:
            raise UserError(f"--set {s!r}: unknown stage {stage!r}; stages are {', '.join(ALL_STAGES)}")
        out.setdefault(stage, {})[flag.replace("_", "-")] = value
    return out


def _flags(d: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        if v is None or v is False:
            continue
        if v is True:
            out.append(f"--{k}")
        else:
            out += [f"--{k}", str(v)]
    return out


@dataclass
class StagePlan:
    name: str
    argv: list[str]            # arguments after `picochat`
    distributed: bool = False  # run under `picochat launch` when several GPUs are used


def build_plan(cfg: SpeedrunConfig, preset: Preset, run: str, nproc: int) -> list[StagePlan]:
    from picochat.runtime import default_data_dir, run_dir  # lazy: torch (~2 s); only the stages need it

    overrides = parse_sets(cfg.sets)
    rdir = run_dir(run)
    stages = list(preset.stages)
    if cfg.rl and "rl" not in stages:
        stages.insert(stages.index("chat_eval"), "rl")
    if cfg.stages:
        wanted = [s.strip() for s in cfg.stages.split(",") if s.strip()]
        bad = [s for s in wanted if s not in ALL_STAGES]
        if bad:
            raise UserError(f"--stages: unknown stage(s) {bad}; stages are {', '.join(ALL_STAGES)}")
        stages = [s for s in ALL_STAGES if s in wanted]

    if cfg.data_dir:
        data_dir = Path(cfg.data_dir)
    elif preset.data == "synth":
        data_dir = default_data_dir("synth")
    else:
        data_dir = default_data_dir("climbmix")
    tok_dir = rdir / "tokenizer"

    def args_for(stage: str) -> dict[str, Any]:
        d = dict(preset.stage_args.get(stage, {}))
        if cfg.max_steps is not None and stage in ("pretrain", "midtrain", "sft", "rl"):
            d["num-iterations"] = cfg.max_steps
        d.update(overrides.get(stage, {}))
        return d

    chat_source = "rl" if "rl" in stages else ("sft" if "sft" in stages else "mid")
    plan: list[StagePlan] = []
    for s in stages:
        a = args_for(s)
        if s == "data":
            if cfg.data_dir:  # the user's own shards: nothing to fetch
                continue
            if preset.data == "synth":
                argv = ["data", "synth", "--out", str(data_dir)] + _flags(a)
            else:
                argv = ["data", "download", "--shards", str(preset.tokenizer_shards), "--out", str(data_dir)] + _flags(a)
        elif s == "tokenizer":
            argv = ["tokenizer", "train", "--data", str(data_dir), "--vocab-size", str(preset.vocab_size),
                    "--out", str(tok_dir)] + _flags(a)
        elif s == "pretrain":
            a.setdefault("depth", preset.depth)
            argv = ["pretrain", "--run", run, "--data", str(data_dir), "--tokenizer", str(tok_dir)] + _flags(a)
        elif s == "base_eval":
            argv = ["eval", "base", "--run", run, "--data", str(data_dir)] + _flags(a)
        elif s in ("midtrain", "sft", "rl"):
            argv = [s, "--run", run] + _flags(a)
        elif s == "chat_eval":
            argv = ["eval", "chat", "--run", run, "--source", chat_source] + _flags(a)
        elif s == "report":
            argv = ["report", "--run", run] + _flags(a)
        else:  # pragma: no cover - ALL_STAGES is closed
            raise AssertionError(s)
        distributed = nproc > 1 and s in ("pretrain", "base_eval", "midtrain", "sft", "rl", "chat_eval")
        plan.append(StagePlan(s, argv, distributed))
    return plan


# ----------------------------------------------------------------------------------------------------------------
# State


class RunState:
    """runs/<run>/speedrun.json, written atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.exists():
            try:
                self.data = json.loads(path.read_text())
            except json.JSONDecodeError:
                print(f"[speedrun] warning: {path} is corrupt; treating every stage as not done")

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2))

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})


# ----------------------------------------------------------------------------------------------------------------
# Running a stage with streaming, heartbeats and clean interruption


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def wait_for_previous_child(pid_file: Path, timeout_s: float = 600.0) -> None:
    """A stage orphaned by a killed orchestrator is still checkpointing: wait for it before starting another."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    t0 = time.monotonic()
    announced = False
    while time.monotonic() - t0 < timeout_s:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"picochat" not in cmdline:
                return
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return
        except OSError:
            return
        if not announced:
            print(f"[speedrun] waiting for the previous stage process {pid} to finish checkpointing", flush=True)
            announced = True
        time.sleep(0.5)


def stream_child(cmd: list[str], label: str, env: dict[str, str] | None = None, log_path: Path | None = None,
                 heartbeat_s: float = HEARTBEAT_SECONDS, pid_file: Path | None = None) -> int:
    """Run `cmd`, copying its merged stdout/stderr line by line; print a heartbeat after each silent interval.

    SIGINT/SIGTERM to the orchestrator are forwarded to the child (which saves a checkpoint and exits).
    """
    log = open(log_path, "a", buffering=1) if log_path else None
    # Own session: a terminal Ctrl-C reaches only us and is forwarded once. If we die (kill -9), the child gets
    # SIGTERM from the kernel (PDEATHSIG) and checkpoints itself instead of running on as an orphan.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, bufsize=0,
                            start_new_session=True, preexec_fn=_die_with_parent)
    if pid_file is not None:
        pid_file.write_text(str(proc.pid))
    last = [time.monotonic()]
    start = time.monotonic()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(1.0):
            silent = time.monotonic() - last[0]
            if silent >= heartbeat_s:
                print(f"[heartbeat] {label}: alive, {time.monotonic() - start:.0f}s elapsed, "
                      f"no output for {silent:.0f}s", flush=True)
                last[0] = time.monotonic()

    def forward(signum, _frame):  # let the stage checkpoint itself, then we exit with it
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    for s in old:
        signal.signal(s, forward)
    hb = threading.Thread(target=heartbeat, daemon=True)
    hb.start()
    try:
        assert proc.stdout is not None
        buf = b""
        while True:
            chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(1)
            if not chunk:
                break
            last[0] = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode("utf-8", errors="replace").rstrip("\r")
                print(text, flush=True)
                if log:
                    log.write(text + "\n")
        if buf:
            text = buf.decode("utf-8", errors="replace")
            print(text, flush=True)
            if log:
                log.write(text + "\n")
        return proc.wait()
    finally:
        done.set()
        for s, h in old.items():
            signal.signal(s, h)
        if log:
            log.close()


def stage_command(sp: StagePlan, nproc: int) -> list[str]:
    base = [sys.executable, "-m", "picochat"]
    if sp.distributed:
        return base + ["launch", "--nproc-per-node", str(nproc)] + sp.argv
    return base + sp.argv


# ----------------------------------------------------------------------------------------------------------------
# Dry run


def resolve_pretrain(plan: list[StagePlan], preset: Preset, world: int):
    """The pretrain stage's config and plan exactly as `picochat pretrain` will resolve them from its argv."""
    import torch

    from picochat.stages import pretrain  # lazy: torch (~2 s); only the stages need it

    sp = next((p for p in plan if p.name == "pretrain"), None)
    argv = sp.argv[1:] if sp else ["--depth", str(preset.depth)]
    parser = argparse.ArgumentParser()
    pretrain.add_cli(parser)
    cfg = pretrain.config_from_cli(parser.parse_args(argv))
    return cfg, pretrain.make_plan(cfg, preset.vocab_size, max(1, world), torch.device("cpu"))


def estimate(preset: Preset, hw: dict[str, Any], nproc: int, price: float | None, plan: list[StagePlan]
             ) -> dict[str, Any]:
    """Model size, tokens, FLOPs, steps, time and cost of the pretraining stage (the dominant cost), from the same
    config resolution the stage itself uses."""
    from picochat.model import flops_per_token, num_scaling_params  # lazy: torch (~2 s); only the stages need it

    cfg, pplan = resolve_pretrain(plan, preset, nproc)
    mc = pplan.model_config
    batch, steps = pplan.total_batch_size, pplan.num_iterations
    tokens = steps * batch
    fpt = flops_per_token(mc)
    flops = fpt * tokens
    mfu = expected_mfu(cfg.depth)
    ref_seconds = flops / (989e12 * mfu * 8)
    if hw["gpus"] > 0:
        from picochat.runtime import PEAK_FLOPS  # lazy: torch (~2 s); only the stages need it

        peak = next((v for k, v in PEAK_FLOPS if hw["gpu_name"] and k in hw["gpu_name"]), 312e12)
        seconds = flops / (peak * mfu * nproc)
        basis = f"{mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s x {nproc} GPU(s)"
    else:
        cpu_flops = 2.0e10 * max(1, hw["cpu_count"])  # measured order of magnitude for fp32 matmuls per core
        seconds = flops / cpu_flops
        basis = f"~{cpu_flops / 1e9:.0f} GFLOP/s effective on {hw['cpu_count']} CPU cores"
    gpu_hours = seconds / 3600 * nproc if hw["gpus"] else ref_seconds / 3600 * 8
    params = mc_params(mc)
    ckpt_bytes = params * 4 * 3  # fp32 weights + up to 2 optimizer moments per parameter
    data_bytes = (preset.shards + 1) * 95e6 if preset.data == "download" else 30e6
    n_ckpts = cfg.keep_last + sum(1 for s in ("midtrain", "sft", "rl") if s in preset.stages)
    return {
        "depth": cfg.depth, "params": params, "scaling_params": num_scaling_params(mc), "seq_len": cfg.seq_len,
        "total_batch_size": batch, "steps": steps, "tokens": tokens, "flops_per_token": fpt, "flops": flops,
        "est_seconds": seconds, "basis": basis, "gpu_hours": gpu_hours, "ref_8xh100_seconds": ref_seconds,
        "est_cost": (gpu_hours * price) if price is not None else None,
        "disk_bytes": data_bytes + ckpt_bytes * n_ckpts,
    }


def expected_mfu(depth: int) -> float:
    """Pretraining MFU to plan with, from the default configs measured on one H200 (README "Performance"): 51% at
    d12 (fp8 MLP and logits), 60% at d20 (fp8); linear in between and held flat outside the measured range; times
    0.955, the H100/H200 ratio measured on the same d12 code (472K against 494K tok/s), since plans are for H100s.
    Multi-GPU communication is not in it (the sharded optimizer overlaps most of it)."""
    lo, hi = (12, 0.51), (20, 0.60)
    t = min(1.0, max(0.0, (depth - lo[0]) / (hi[0] - lo[0])))
    return 0.955 * (lo[1] + t * (hi[1] - lo[1]))


def mc_params(mc) -> int:
    from picochat.model import GPT  # lazy: torch (~2 s); only the stages need it
    import torch

    with torch.device("meta"):
        return GPT(mc).num_params()


def _fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def print_plan(preset: Preset, plan: list[StagePlan], est: dict[str, Any], nproc: int, price: float | None,
               hw: dict[str, Any]) -> None:
    print(f"[speedrun] plan for preset {preset.name}: {preset.what}")
    print(f"  hardware: {hw['gpus']} x {hw['gpu_name']}" if hw["gpus"] else f"  hardware: CPU ({hw['cpu_count']} cores)")
    print(f"  model: depth {est['depth']}, {est['params']:,} parameters ({est['scaling_params']:,} scaling params)")
    print(f"  pretrain: {est['steps']:,} steps x {est['total_batch_size']:,} tokens = {est['tokens']:,} tokens, "
          f"{est['flops_per_token']:.3g} FLOPs/token, {est['flops']:.3g} FLOPs")
    print(f"  estimated pretrain time here: {_fmt_time(est['est_seconds'])} (assumes {est['basis']})")
    print(f"  estimated pretrain time on 8xH100: {_fmt_time(est['ref_8xh100_seconds'])} "
          f"(assumes {expected_mfu(est['depth']):.0%} MFU)")
    if est["est_cost"] is not None:
        where = "here" if hw["gpus"] else "on 8xH100"
        print(f"  estimated pretrain cost {where}: ${est['est_cost']:.2f} at ${price}/GPU-hour "
              f"({est['gpu_hours']:.2f} GPU-hours)")
    print(f"  disk needed: ~{est['disk_bytes'] / 1e9:.1f} GB (data + checkpoints)")
    print("  stages:")
    for sp in plan:
        prefix = f"launch --nproc-per-node {nproc} " if sp.distributed else ""
        print(f"    {sp.name:<10} picochat {prefix}{' '.join(sp.argv)}")


# ----------------------------------------------------------------------------------------------------------------
# Orchestration


def run(cfg: SpeedrunConfig) -> dict[str, Any]:
    from picochat.runtime import picochat_home, run_dir  # lazy: torch (~2 s); only the stages need it

    hw = detect_hardware()
    if cfg.preset is None:
        name, why = choose_preset(hw)
        print(f"[speedrun] preset {name}: {why}")
    else:
        name = cfg.preset
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    run_name = cfg.run or preset.name
    nproc = cfg.nproc if cfg.nproc is not None else max(1, hw["gpus"])
    plan = build_plan(cfg, preset, run_name, nproc)
    est = estimate(preset, hw, nproc if hw["gpus"] else 0, cfg.price, plan)

    home = picochat_home()
    home.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(home).free
    if cfg.dry_run:
        print_plan(preset, plan, est, nproc, cfg.price, hw)
        print(f"  free disk under {home}: {free / 1e9:.1f} GB")
        if free < est["disk_bytes"]:
            print(f"  WARNING: not enough disk for this run: {free / 1e9:.1f} GB free, ~{est['disk_bytes'] / 1e9:.1f} "
                  f"GB needed; a real run would refuse to start")
        return {"dry_run": True, "preset": name, "run": run_name, "estimate": est,
                "stages": [{"name": sp.name, "argv": sp.argv} for sp in plan]}
    if free < est["disk_bytes"]:
        raise UserError(f"not enough disk under {home}: {free / 1e9:.1f} GB free, ~{est['disk_bytes'] / 1e9:.1f} GB "
                        f"needed (see `picochat speedrun --dry-run`); free space or set PICOCHAT_HOME")

    rdir = run_dir(run_name)
    if cfg.force_restart and rdir.exists():
        if not cfg.yes:
            if not sys.stdin.isatty():
                raise UserError(f"--force-restart would delete {rdir}; add --yes to confirm non-interactively")
            answer = input(f"delete {rdir} and start over? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("[speedrun] not restarting")
                return {"aborted": True}
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "logs").mkdir(exist_ok=True)
    wait_for_previous_child(rdir / "stage.pid")
    state = RunState(rdir / "speedrun.json")
    state.data.update(preset=name, run=run_name, hardware=hw)
    state.data.setdefault("started", time.time())
    state.save()

    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    bg: subprocess.Popen | None = None
    fps: dict[str, str] = {}
    summary: list[dict[str, Any]] = []
    t_total = time.time()
    for sp in plan:
        upstream = [fps.get(u) or state.stage(u).get("fingerprint") for u in UPSTREAM[sp.name]]
        fp = fingerprint({"argv": sp.argv, "upstream": upstream})
        fps[sp.name] = fp
        st = state.stage(sp.name)
        if st.get("status") == "done" and st.get("fingerprint") == fp:
            print(f"[speedrun] ===== {sp.name}: done already ({st.get('seconds', 0):.0f}s), skipping =====")
            summary.append({"stage": sp.name, "status": "skipped", "seconds": st.get("seconds", 0)})
            continue
        if st.get("fingerprint") not in (None, fp) and sp.name in STAGE_OUTPUT:
            old = rdir / STAGE_OUTPUT[sp.name]
            if old.exists():
                print(f"[speedrun] {sp.name}: inputs changed since the last run; removing {old}")
                shutil.rmtree(old)
        resumed = st.get("status") == "running" and st.get("fingerprint") == fp
        if sp.name == "pretrain" and bg is not None:
            _wait_background(bg, "pretraining data download")
            bg = None
        banner = "resuming" if resumed else "starting"
        print(f"[speedrun] ===== {sp.name}: {banner} ===== picochat {' '.join(sp.argv)}", flush=True)
        st.update(status="running", fingerprint=fp, argv=sp.argv, started=time.time())
        state.save()
        t0 = time.time()
        rc = stream_child(stage_command(sp, nproc), sp.name, env=env, log_path=rdir / "logs" / f"{sp.name}.log",
                          pid_file=rdir / "stage.pid")
        dt = time.time() - t0
        st["seconds"] = st.get("seconds_before", 0) + dt
        if rc != 0:
            st["seconds_before"] = st["seconds"]
            st["rc"] = rc
            state.save()
            if bg is not None:
                bg.terminate()
            print(f"[speedrun] ===== {sp.name}: stopped (exit code {rc}) after {_fmt_time(dt)}. Re-run the same "
                  f"command to continue from its latest checkpoint. =====", flush=True)
            return {"run": run_name, "failed_stage": sp.name, "rc": rc, "stages": summary}
        st.update(status="done", finished=time.time(), rc=0)
        st.pop("seconds_before", None)
        state.save()
        summary.append({"stage": sp.name, "status": "ran", "seconds": st["seconds"]})
        print(f"[speedrun] ===== {sp.name}: done in {_fmt_time(dt)} =====", flush=True)
        if sp.name == "data" and preset.data == "download" and not cfg.data_dir and preset.shards > preset.tokenizer_shards:
            # the rest of the shards download while the tokenizer trains
            from picochat.runtime import default_data_dir  # lazy: torch (~2 s); only the stages need it

            cmd = [sys.executable, "-m", "picochat", "data", "download", "--shards", str(preset.shards),
                   "--out", str(default_data_dir("climbmix"))]
            print(f"[speedrun] background: {' '.join(cmd[2:])} (log: {rdir / 'logs' / 'download.log'})")
            bg = subprocess.Popen(cmd, stdout=open(rdir / "logs" / "download.log", "a"), stderr=subprocess.STDOUT,
                                  env=env)
    if bg is not None:
        _wait_background(bg, "pretraining data download")
    state.data["finished"] = time.time()
    state.save()
    total = sum(s["seconds"] for s in summary)
    print("[speedrun] ===== summary =====")
    print(f"  {'stage':<10} {'status':<8} {'time':>10}")
    for s in summary:
        print(f"  {s['stage']:<10} {s['status']:<8} {_fmt_time(s['seconds']):>10}")
    print(f"  {'total':<10} {'':<8} {_fmt_time(total):>10}  (this invocation: {_fmt_time(time.time() - t_total)})")
    report = rdir / "report.md"
    if report.exists():
        print(f"[speedrun] report: {report}")
    print(f"[speedrun] talk to it: picochat chat --run {run_name}   or   picochat serve --run {run_name}")
    print(f"[speedrun] share it: picochat export --run {run_name} --out {run_name}-chat")
    return {"run": run_name, "preset": name, "stages": summary, "total_seconds": total}


def _wait_background(proc: subprocess.Popen, what: str) -> None:
    t0 = time.monotonic()
    last = t0
    while proc.poll() is None:
        time.sleep(1.0)
        if time.monotonic() - last >= HEARTBEAT_SECONDS:
            print(f"[heartbeat] waiting for {what} ({time.monotonic() - t0:.0f}s)", flush=True)
            last = time.monotonic()
    if proc.returncode != 0:
        raise UserError(f"{what} failed (exit code {proc.returncode}); see its log, then re-run the speedrun")


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="tiny | d12 | d20 | d24 | d32 (default: picked from the hardware, and said why)")
    parser.add_argument("--run", default=None, help="run name (default: the preset's name)")
    parser.add_argument("--rl", action="store_true", help="include the RL stage")
    parser.add_argument("--stages", default=None, help="comma list: run only these stages, e.g. data,tokenizer")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every training stage at N steps")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.FLAG=VALUE",
                        help="override a stage flag, e.g. --set pretrain.num-iterations=100 (repeatable)")
    parser.add_argument("--data-dir", default=None, help="pretrain on these shards instead of the preset's data")
    parser.add_argument("--nproc", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, time and cost; run nothing")
    parser.add_argument("--price", type=float, default=None, help="$ per GPU-hour for the cost estimate")
    parser.add_argument("--force-restart", action="store_true", help="delete the run and start over")
    parser.add_argument("--yes", action="store_true", help="don't ask before --force-restart")


def validate_args(args: argparse.Namespace) -> None:
    """The orchestrator's own flags, one ConfigError line each, before any stage starts (the stages check theirs)."""
    for flag, value, low in (("--max-steps", args.max_steps, 1), ("--nproc", args.nproc, 1),
                             ("--price", args.price, 0)):
        require(value is None or (math.isfinite(value) and value >= low), f"{flag} {value}: must be >= {low}")
    if args.data_dir:
        require_dir(args.data_dir, "--data-dir", "pass a shard folder (`picochat data download|prepare` make one), "
                                                 "or drop --data-dir for the preset's data")


def cli_main(args: argparse.Namespace) -> int:
    validate_args(args)
    cfg = SpeedrunConfig(preset=args.preset, run=args.run, rl=args.rl, stages=args.stages, max_steps=args.max_steps,
                         sets=args.sets, force_restart=args.force_restart, yes=args.yes, dry_run=args.dry_run,
                         price=args.price, nproc=args.nproc, data_dir=args.data_dir)
    result = run(cfg)
    if result.get("failed_stage"):
        return int(result.get("rc") or 1)
    return 0

