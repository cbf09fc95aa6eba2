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

`--until-core 0.2565` is nanochat's leaderboard protocol: pretraining evaluates CORE as it goes (`pretrain
--core-target`, every 5% of the run unless `--set pretrain.core-every=N`), saves and stops at the first eval that
reaches the score, logs the wall clock of its training steps until then, and the pipeline goes on from that
checkpoint; the summary and the report show the time.
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
from typing import Any, Callable

from picochat.config import UserError, fingerprint, require, require_dir
from picochat.files import atomic_write_text
from picochat.tools.report import target_line, time_to_core

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
    price: float | None = None          # $ per GPU-hour (per machine-hour without GPUs): estimate, meter, budget
    budget: float | None = None         # $ for the whole run: training stages checkpoint and stop before passing it
    gpus: str | None = None             # dry run: plan for NAME:COUNT GPUs instead of this machine's
    nproc: int | None = None            # GPUs to use (default: all visible)
    data_dir: str | None = None         # use these shards instead of the preset's data source
    until_core: float | None = None     # pretraining stops at the first CORE eval reaching this score


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
        if cfg.until_core is not None and stage == "pretrain":
            d["core-target"] = cfg.until_core
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
# Dollars: --price and --budget

EXIT_BUDGET = 3  # the speedrun's exit code when it stopped for --budget (a checkpoint is saved; not finished)
TRAINING_STAGES = ("pretrain", "midtrain", "sft", "rl")  # the stages that can stop at a checkpoint


def check_money(cfg: SpeedrunConfig) -> None:
    for flag, v in (("--price", cfg.price), ("--budget", cfg.budget)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UserError(f"{flag} {v}: expected a positive number of dollars")
    if cfg.budget is not None and cfg.price is None:
        raise UserError("--budget needs --price (dollars per GPU-hour) to turn time into dollars")


class Money:
    """What this run has cost across invocations, billed by wall time: speedrun.json keeps the dollars of earlier
    invocations (`spent`), this one adds rate x its own time. Each stage gets PICOCHAT_COST (training.CostMeter)
    to show dollars on its step line and heartbeat and, with a budget, to stop at a checkpoint before passing it;
    a stage that stopped for the budget writes `ledger`."""

    def __init__(self, state: RunState, price: float | None, gpus: int, budget: float | None, ledger: Path):
        self.state, self.budget, self.ledger = state, budget, ledger
        self.rate = price * max(1, gpus) if price else 0.0  # $/hour of the whole machine
        self.before = float(state.data.get("spent") or 0.0)
        self.t0 = time.time()
        ledger.unlink(missing_ok=True)  # a stop of an earlier invocation is history

    def spent(self) -> float:
        return self.before + self.rate * (time.time() - self.t0) / 3600

    def save(self) -> None:
        self.state.data["spent"] = self.spent()
        self.state.save()

    def stage_env(self, env: dict[str, str], later: float) -> dict[str, str]:
        out = {k: v for k, v in env.items() if k != "PICOCHAT_COST"}
        if self.rate:
            out["PICOCHAT_COST"] = json.dumps({"rate": self.rate, "spent": self.spent(), "at": time.time(),
                                               "later": later, "budget": self.budget,
                                               "ledger": str(self.ledger) if self.budget else None})
        return out

    def refuse(self, stage: str, est: float) -> str | None:
        """Why `stage` must not start under the budget, or None. A training stage starts while any budget is left
        (it stops itself at a checkpoint); another stage cannot stop halfway, so it needs its estimate left."""
        if self.budget is None:
            return None
        spent, left = self.spent(), self.budget - self.spent()
        if left <= 0:
            return (f"budget reached before {stage}: ${spent:,.2f} spent of ${self.budget:,.2f}; re-run with a "
                    f"larger --budget to continue")
        if stage not in TRAINING_STAGES and est > left:
            return (f"{stage} is estimated at ${est:,.2f} and ${left:,.2f} of the ${self.budget:,.2f} budget is left; "
                    f"it cannot stop at a checkpoint, so it does not start; re-run with a larger --budget")
        return None

    def stopped_for_budget(self) -> dict[str, Any] | None:
        """The ledger of a stage that stopped for the budget (then removed), or None."""
        if not self.ledger.exists():
            return None
        try:
            d = json.loads(self.ledger.read_text())
        except (OSError, json.JSONDecodeError):
            d = {}
        self.ledger.unlink(missing_ok=True)
        return d if isinstance(d, dict) else {}


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
                 heartbeat_s: float = HEARTBEAT_SECONDS, pid_file: Path | None = None, money: "Money | None" = None
                 ) -> int:
    """Run `cmd`, copying its merged stdout/stderr line by line; print a heartbeat (with the dollars spent, given
    `money`) after each silent interval.

    SIGINT/SIGTERM to the orchestrator are forwarded to the child (which saves a checkpoint and exits 0); the
    return code is then 128 + the signal, so the stage is not taken for finished and the speedrun stops.
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
                cost = f", ${money.spent():,.2f} spent" if money is not None and money.rate else ""
                print(f"[heartbeat] {label}: alive, {time.monotonic() - start:.0f}s elapsed, "
                      f"no output for {silent:.0f}s{cost}", flush=True)
                last[0] = time.monotonic()

    forwarded: list[int] = []

    def forward(signum, _frame):  # let the stage checkpoint itself, then we exit with it
        forwarded.append(signum)
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
        rc = proc.wait()
        return 128 + forwarded[0] if rc == 0 and forwarded else rc
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
# Dry run: time and dollars of every stage
#
# Every figure is labelled: "measured" (a README Performance row, scaled as said), "computed" (exact from the
# config: parameters, FLOPs, steps, bytes) or "assumed" (a round number we have not measured; change it here).

DOWNLOAD_BPS = 100e6          # assumed: HuggingFace download rate of one machine, bytes/s
SHARD_BYTES = 95e6            # the FineWeb-Edu parquet shard size (nanochat's dataset), bytes
TOKENIZER_S_PER_SHARD = 3.88 / 3 * 16  # measured: 3.88 s for shards 0-2 on 16 cores (README); per shard per core
CORE_S_D12 = 89.6             # measured: CORE, 52,400 examples, d12-size model, one H100 (README)
CORE_EXAMPLES = 52_400
CORE_TASKS = 22
DECODE_TOK_S_D20 = 1_837 * 0.955  # measured: d20 decode at batch 1 on H200 (README), x 0.955 for an H100
RING_BUSBW = {"NVLink": 360e9, "PCIe": 20e9}  # assumed: NCCL all-reduce bus bandwidth per GPU, bytes/s
CHAT_MFU_FACTOR = 0.5         # assumed: midtrain/SFT/RL run uncompiled with variable-length rows
TOKENS_PER_CONVERSATION = 450  # assumed: mean tokens of one conversation of the chat mixtures
# conversations in the full mixtures (the datasets' published sizes: SmolTalk 460K, MMLU auxiliary_train 99.8K,
# GSM8K train 7,473; identity and the spelling tasks as sized in the mixture strings of stages/midtrain.py, sft.py)
MID_CONVERSATIONS = 460_000 + 99_800 + 7_473 + 2_000 + 200_000 + 80_000
SFT_CONVERSATIONS = 460_000 + 3 * 99_800 + 4 * 7_473 + 2_000 + 20_000 + 8_000
GSM8K_TRAIN = 7_473
CHAT_EVAL_GENERATIVE = 1_319 + 164 + 256  # GSM8K test, HumanEval, SpellingBee: problems that generate
CHAT_EVAL_CATEGORICAL = 2_376 + 1_172 + 14_042  # ARC-Easy, ARC-Challenge, MMLU test: one forward each
NVLINK_GPUS = ("H100", "H200", "GH200", "B200", "B100", "A100")  # SXM parts in 8-GPU boxes (PCIe named apart)


def parse_gpus(spec: str) -> tuple[str, int]:
    """'H100:8' -> ('H100', 8): the hardware a dry run plans for instead of this machine's."""
    name, _, count = spec.partition(":")
    if not name.strip() or (count and not count.isdigit()) or (count and not 1 <= int(count) <= 64):
        raise UserError(f"--gpus {spec!r}: expected NAME[:COUNT], e.g. H100:8 (a GPU name as in nvidia-smi, "
                        f"1 to 64 of them)")
    return name.strip(), int(count or 1)


def resolve_pretrain(plan: list[StagePlan], preset: Preset, world: int):
    """The pretrain stage's config and plan exactly as `picochat pretrain` will resolve them from its argv."""
    import torch

    from picochat.stages import pretrain  # lazy: torch (~2 s); only the stages need it

    sp = next((p for p in plan if p.name == "pretrain"), None)
    argv = sp.argv[1:] if sp else ["--preset", preset.name] if preset.name in pretrain.PRESETS else \
        ["--depth", str(preset.depth)]
    parser = argparse.ArgumentParser()
    pretrain.add_cli(parser)
    cfg = pretrain.config_from_cli(parser.parse_args(argv))
    return cfg, pretrain.make_plan(cfg, preset.vocab_size, max(1, world), torch.device("cpu"))


def target_hardware(hw: dict[str, Any], nproc: int, gpus: str | None, preset: Preset) -> dict[str, Any]:
    """What the estimate is for: --gpus, else this machine's GPUs, else this CPU for the tiny preset and 8 x H100
    (the reference the presets are sized for) for the others."""
    from picochat.runtime import PEAK_FLOPS  # lazy: torch (~2 s); only the stages need it

    if gpus:
        name, n, where = *parse_gpus(gpus), "assumed with --gpus"
    elif hw["gpus"]:
        name, n, where = hw["gpu_name"] or "GPU", nproc, "this machine"
    elif preset.data == "synth":
        cores = max(1, hw["cpu_count"])
        return {"name": f"CPU ({cores} cores)", "n": 0, "where": "this machine", "flops": 2.0e10 * cores,
                "cores": cores, "busbw": None}
    else:
        name, n, where = "H100", 8, "the reference (no GPU here)"
    peak = next((v for k, v in PEAK_FLOPS if k.lower() in name.lower()), None)
    known = peak is not None
    link = "PCIe" if "pcie" in name.lower() or not any(k.lower() in name.lower() for k in NVLINK_GPUS) else "NVLink"
    return {"name": name, "n": n, "where": where, "peak": peak or 312e12, "peak_known": known, "link": link,
            "busbw": RING_BUSBW[link] if n > 1 else None, "cores": 16}


def allreduce_seconds(params: int, n: int, busbw: float | None) -> float:
    """One step's gradient all-reduce on a ring of n GPUs: each sends and receives 2(n-1)/n of the fp32 gradient
    bytes (Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations", JPDC 2009; the
    same factor converts NCCL's algorithm bandwidth to its bus bandwidth in github.com/NVIDIA/nccl-tests). Our
    sharded optimizer moves the same bytes as a reduce-scatter of the gradients plus an all-gather of the updated
    weights. Counted as not overlapped with compute, so an upper bound: the optimizer overlaps part of it."""
    if n <= 1 or not busbw:
        return 0.0
    return 2 * (n - 1) / n * 4 * params / busbw


def estimate(preset: Preset, hw: dict[str, Any], nproc: int, price: float | None, plan: list[StagePlan],
             gpus: str | None = None) -> dict[str, Any]:
    """Model size, tokens, FLOPs and steps of pretraining (from the same config resolution the stage uses), and the
    time and dollars of every planned stage on the target hardware, each figure labelled measured, computed or
    assumed."""
    from picochat.model import num_scaling_params  # lazy: torch (~2 s); only the stages need it

    b = _CostBasis.make(preset, hw, nproc, plan, gpus)
    rows = [row for name in b.args for row in _STAGE_COSTS.get(name, lambda b: [])(b)]
    n, total = b.tgt["n"], sum(r["seconds"] for r in rows)
    gpu_count = max(1, n)  # a CPU machine is priced per machine-hour
    for r in rows:
        r["dollars"] = r["seconds"] / 3600 * gpu_count * price if price is not None else None
    ckpt_bytes = b.params * 4 * 3  # fp32 weights + up to 2 optimizer moments per parameter
    data_bytes = (preset.shards + 1) * SHARD_BYTES if preset.data == "download" else 30e6
    n_ckpts = b.cfg.keep_last + sum(1 for s in ("midtrain", "sft", "rl") if s in b.args)
    return {
        "depth": b.cfg.depth, "params": b.params, "scaling_params": num_scaling_params(b.mc), "seq_len": b.cfg.seq_len,
        "total_batch_size": b.batch, "steps": b.steps, "tokens": b.steps * b.batch, "flops_per_token": b.fpt,
        "flops": b.flops, "target": b.tgt, "mfu": b.mfu, "comm_step_s": b.comm, "stages": rows, "total_seconds": total,
        "gpu_hours": total / 3600 * max(1, n), "price": price,
        "est_cost": total / 3600 * gpu_count * price if price is not None else None,
        "disk_bytes": data_bytes + ckpt_bytes * n_ckpts,
    }


@dataclass
class _CostBasis:
    """What every stage's estimate starts from: the target hardware, pretraining's resolved model and batch, the
    compute rate (FLOP/s, with its basis), the all-reduce per step, and each planned stage's flags."""

    preset: Preset
    tgt: dict[str, Any]
    cfg: Any
    mc: Any
    batch: int
    steps: int
    fpt: float
    flops: float
    params: int
    mfu: float
    rate: float
    rate_note: str
    comm: float
    comm_note: str
    args: dict[str, dict[str, str]]

    @classmethod
    def make(cls, preset: Preset, hw: dict[str, Any], nproc: int, plan: list[StagePlan],
             gpus: str | None) -> "_CostBasis":
        from picochat.model import flops_per_token  # lazy: torch (~2 s); only the stages need it

        tgt = target_hardware(hw, nproc, gpus, preset)
        n = tgt["n"]
        cfg, pplan = resolve_pretrain(plan, preset, max(1, n))
        mc = pplan.model_config
        fpt, params, mfu = flops_per_token(mc), mc_params(mc), expected_mfu(cfg.depth)
        if n:
            rate = tgt["peak"] * mfu * n
            rate_note = (f"{mfu:.0%} MFU (measured, README Performance) of {tgt['peak'] / 1e12:.0f} TFLOP/s x {n}"
                         + ("" if tgt["peak_known"] else " (peak assumed: GPU not in runtime.PEAK_FLOPS)"))
        else:
            rate = tgt["flops"]
            rate_note = f"~{rate / 1e9:.0f} GFLOP/s (assumed: 20 per core)"
        comm = allreduce_seconds(params, n, tgt["busbw"])
        comm_note = (f"+ {comm * 1000:.1f} ms/step ring all-reduce of {4 * params / 1e9:.2f} GB over {tgt['link']} "
                     f"at {tgt['busbw'] / 1e9:.0f} GB/s (assumed), not overlapped" if comm
                     else "no communication (1 device)")
        steps, batch = pplan.num_iterations, pplan.total_batch_size
        return cls(preset, tgt, cfg, mc, batch, steps, fpt, fpt * steps * batch, params, mfu, rate, rate_note, comm,
                   comm_note, {sp.name: _argv_dict(sp.argv) for sp in plan})

    @property
    def n(self) -> int:
        return self.tgt["n"]

    def chat_rate(self) -> float:
        return self.rate * (CHAT_MFU_FACTOR if self.n else 1.0)


def _row(stage: str, seconds: float, label: str, basis: str) -> list[dict[str, Any]]:
    return [{"stage": stage, "seconds": seconds, "label": label, "basis": basis}]


def _cost_data(b: _CostBasis) -> list[dict[str, Any]]:
    if b.preset.data == "synth":
        return _row("data", 30.0, "assumed", "generating the synthetic corpus (~30 s)")
    size = (b.preset.shards + 1) * SHARD_BYTES
    return _row("data", size / DOWNLOAD_BPS, "assumed", f"{size / 1e9:.1f} GB of shards at {DOWNLOAD_BPS / 1e6:.0f} "
                                                         f"MB/s (assumed; the rest downloads during the tokenizer)")


def _cost_tokenizer(b: _CostBasis) -> list[dict[str, Any]]:
    shards = b.preset.tokenizer_shards if b.preset.data == "download" else 0.3
    return _row("tokenizer", TOKENIZER_S_PER_SHARD * shards / b.tgt["cores"], "measured",
                f"3.88 s per 3 shards on 16 cores (README), x {shards:g} shards on {b.tgt['cores']} cores")


def _cost_pretrain(b: _CostBasis) -> list[dict[str, Any]]:
    return _row("pretrain", b.flops / b.rate + b.steps * b.comm, "measured+assumed",
                f"{b.flops:.3g} FLOPs (computed) at {b.rate_note}; {b.comm_note}")


def _cost_base_eval(b: _CostBasis) -> list[dict[str, Any]]:
    a = b.args["base_eval"]
    bpb_tokens = 2 * int(a.get("eval-tokens", 40 * 2**19)) if "bpb" in a else 0
    s = bpb_tokens * (b.fpt / 3) / b.rate
    basis = f"bpb: {bpb_tokens:,} tokens forward (computed)"
    if "core" in a:
        ref_fpt = _at_depth(12)[0]
        per_task = int(a["max-per-task"]) if "max-per-task" in a else None
        frac = min(1.0, CORE_TASKS * per_task / CORE_EXAMPLES) if per_task else 1.0
        ratio = b.fpt / ref_fpt
        s += CORE_S_D12 * frac * ratio / max(1, b.n) if b.n else CORE_S_D12 * 50 * frac * ratio
        basis += f"; CORE: 89.6 s at d12 on one H100 (measured), x FLOPs ratio {ratio:.2f} x {frac:.2f}"
    return _row("base_eval", s, "measured+computed", basis)


def _cost_chat_stage(stage: str, conversations: int) -> Callable[[_CostBasis], list[dict[str, Any]]]:
    def cost(b: _CostBasis) -> list[dict[str, Any]]:
        a = b.args[stage]
        if "num-iterations" in a:
            stage_steps = int(a["num-iterations"])
            stage_tokens = stage_steps * b.batch
            basis = f"{stage_steps} steps x {b.batch:,} tokens (computed)"
        else:
            stage_tokens = conversations * TOKENS_PER_CONVERSATION
            stage_steps = max(1, stage_tokens // b.batch)
            basis = f"{conversations:,} conversations x {TOKENS_PER_CONVERSATION} tokens (assumed)"
        return _row(stage, stage_tokens * b.fpt / b.chat_rate() + stage_steps * b.comm, "assumed",
                    f"{basis} at {CHAT_MFU_FACTOR:g} x the pretrain rate (assumed: uncompiled); "
                    f"{'+ the same all-reduce per step' if b.comm else 'no communication'}")
    return cost


def _cost_rl(b: _CostBasis) -> list[dict[str, Any]]:
    a = b.args["rl"]
    per_step = int(a.get("examples-per-step", 16)) * int(a.get("num-samples", 16))
    new_tok = int(a.get("max-new-tokens", 256)) // 2
    rl_steps = int(a["num-iterations"]) if "num-iterations" in a else -(-GSM8K_TRAIN // int(
        a.get("examples-per-step", 16)))
    decode = _decode_rate(b.params, b.n, b.tgt)
    gen = rl_steps * per_step * new_tok / decode
    train = rl_steps * per_step * (new_tok + 150) * b.fpt / b.chat_rate()
    return _row("rl", gen + train + rl_steps * b.comm, "measured+assumed",
                f"{rl_steps} steps x {per_step} samples x ~{new_tok} new tokens (assumed: half the cap) decoded at "
                f"{decode:,.0f} tok/s (d20 at batch 1 measured, scaled by parameters, x8 for the batch: assumed)")


def _cost_chat_eval(b: _CostBasis) -> list[dict[str, Any]]:
    a = b.args["chat_eval"]
    cap = int(a["max-problems"]) if "max-problems" in a else None
    gen_n = min(CHAT_EVAL_GENERATIVE, 3 * cap) if cap else CHAT_EVAL_GENERATIVE
    cat_n = min(CHAT_EVAL_CATEGORICAL, 3 * cap) if cap else CHAT_EVAL_CATEGORICAL
    decode = _decode_rate(b.params, b.n, b.tgt) / 8  # one problem at a time
    s = gen_n * 256 / decode + cat_n * 300 * b.fpt / 3 / b.rate
    return _row("chat_eval", s, "measured+assumed",
                f"{gen_n} generations x ~256 tokens (assumed) at {decode:,.0f} tok/s (d20 at batch 1 measured, scaled "
                f"by parameters) + {cat_n} one-forward questions")


# each planned stage's estimate; rows come out in plan order
_STAGE_COSTS: dict[str, Callable[[_CostBasis], list[dict[str, Any]]]] = {
    "data": _cost_data, "tokenizer": _cost_tokenizer, "pretrain": _cost_pretrain, "base_eval": _cost_base_eval,
    "midtrain": _cost_chat_stage("midtrain", MID_CONVERSATIONS), "sft": _cost_chat_stage("sft", SFT_CONVERSATIONS),
    "rl": _cost_rl, "chat_eval": _cost_chat_eval,
    "report": lambda b: _row("report", 5.0, "assumed", "plots and report.md"),
}


def _argv_dict(argv: list[str]) -> dict[str, str]:
    """A stage's argv as {flag: value} ('' for a switch), the last occurrence winning as in argparse."""
    out: dict[str, str] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            out[a[2:]] = "" if nxt.startswith("--") else nxt
    return out


def _at_depth(depth: int) -> tuple[float, int]:
    """(training FLOPs per token, parameters) of the default model of `depth`: the measured figures' models."""
    from picochat.model import flops_per_token  # lazy: torch (~2 s); only the stages need it

    _, p = resolve_pretrain([], Preset(name=f"d{depth}", what="", depth=depth, data="download"), 1)
    return flops_per_token(p.model_config), mc_params(p.model_config)


def _decode_rate(params: int, n: int, tgt: dict[str, Any]) -> float:
    """Batched decode tokens/s on the target: the measured d20 batch-1 rate scaled by parameters (decode reads every
    weight per token), x 8 for batching (assumed), x GPUs; on a CPU, ~1/20 of one H100 (assumed)."""
    rate = DECODE_TOK_S_D20 * _at_depth(20)[1] / max(params, 1) * 8
    return rate * max(1, n) if n else rate / 20


def expected_mfu(depth: int) -> float:
    """Pretraining MFU to plan with, from the default configs measured on one H200 (README "Performance"): 51% at
    d12 (fp8 MLP and logits), 60% at d20 (fp8); linear in between and held flat outside the measured range; times
    0.955, the H100/H200 ratio measured on the same d12 code (472K against 494K tok/s), since plans are for H100s.
    Communication on several GPUs is added apart (`allreduce_seconds`)."""
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
               hw: dict[str, Any], budget: float | None = None) -> None:
    tgt = est["target"]
    print(f"[speedrun] plan for preset {preset.name}: {preset.what}")
    print(f"  hardware: {hw['gpus']} x {hw['gpu_name']}" if hw["gpus"] else f"  hardware: CPU ({hw['cpu_count']} cores)")
    where = f"{tgt['n']} x {tgt['name']}" if tgt["n"] else tgt["name"]
    print(f"  estimates for: {where}, {tgt['where']}")
    print(f"  model: depth {est['depth']}, {est['params']:,} parameters ({est['scaling_params']:,} scaling params)")
    print(f"  pretrain: {est['steps']:,} steps x {est['total_batch_size']:,} tokens = {est['tokens']:,} tokens, "
          f"{est['flops_per_token']:.3g} FLOPs/token, {est['flops']:.3g} FLOPs")
    unit = "GPU-hour" if tgt["n"] else "machine-hour"
    print(f"  {'stage':<10} {'time':>9} {'$':>10}  basis")
    for r in est["stages"]:
        dollars = f"{r['dollars']:,.2f}" if r["dollars"] is not None else "-"
        print(f"  {r['stage']:<10} {_fmt_time(r['seconds']):>9} {dollars:>10}  [{r['label']}] {r['basis']}")
    total = f"${est['est_cost']:,.2f} at ${price:g}/{unit}" if est["est_cost"] is not None else \
        "add --price $/GPU-hour for dollars"
    print(f"  {'total':<10} {_fmt_time(est['total_seconds']):>9}  {total} ({est['gpu_hours']:.2f} {unit}s)")
    print("  measured = a README Performance figure, scaled as said; computed = exact from the config; assumed = a "
          "round number, not measured (constants at the top of the dry-run section of picochat/tools/speedrun.py)")
    if budget is not None:
        print(f"  budget: ${budget:,.2f}: training stages save a checkpoint and stop before passing it")
    print(f"  disk needed: ~{est['disk_bytes'] / 1e9:.1f} GB (data + checkpoints)")
    print("  stages:")
    for sp in plan:
        prefix = f"launch --nproc-per-node {nproc} " if sp.distributed else ""
        print(f"    {sp.name:<10} picochat {prefix}{' '.join(sp.argv)}")


# ----------------------------------------------------------------------------------------------------------------
# Orchestration


def run(cfg: SpeedrunConfig) -> dict[str, Any]:
    """The whole pipeline: choose the preset, plan and price it, then run each stage as a child process, skipping the
    done ones, resuming the interrupted one, stopping at the first failure or the budget. Returns the summary."""
    from picochat.runtime import picochat_home, run_dir  # lazy: torch (~2 s); only the stages need it

    hw = detect_hardware()
    name, preset = _choose_preset(cfg, hw)
    run_name = cfg.run or preset.name
    check_money(cfg)
    if cfg.gpus and not cfg.dry_run:
        raise UserError(f"--gpus {cfg.gpus}: only for --dry-run (a real run uses this machine's GPUs; --nproc picks "
                        f"how many)")
    nproc = cfg.nproc if cfg.nproc is not None else (parse_gpus(cfg.gpus)[1] if cfg.gpus else max(1, hw["gpus"]))
    plan = build_plan(cfg, preset, run_name, nproc)
    est = estimate(preset, hw, nproc if hw["gpus"] else 0, cfg.price, plan, cfg.gpus)

    home = picochat_home()
    home.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(home).free
    if cfg.dry_run:
        return _dry_run(cfg, preset, name, run_name, plan, est, nproc, hw, home, free)
    if free < est["disk_bytes"]:
        raise UserError(f"not enough disk under {home}: {free / 1e9:.1f} GB free, ~{est['disk_bytes'] / 1e9:.1f} GB "
                        f"needed (see `picochat speedrun --dry-run`); free space or set PICOCHAT_HOME")
    if cfg.until_core is not None and any(sp.name == "pretrain" for sp in plan):
        from picochat.evals import core_eval  # lazy: torch (~2 s)

        # fetched (or refused, in one line) before hours of data and tokenizer work, not when pretraining starts
        core_eval.resolve_bundle(parse_sets(cfg.sets).get("pretrain", {}).get("core-bundle"))
    rdir = run_dir(run_name)
    if not _fresh_or_kept(cfg, rdir):
        return {"aborted": True}
    orch = _Orchestra.open(cfg, preset, name, run_name, nproc, hw, rdir, est)
    t_total = time.time()
    for i, sp in enumerate(plan):
        stopped = orch.run_stage(sp, later=sum(orch.est_cost.get(p.name, 0.0) for p in plan[i + 1:]))
        if stopped is not None:
            return stopped
    if orch.bg is not None:
        _wait_background(orch.bg, "pretraining data download")
    return orch.finish(t_total)


def _choose_preset(cfg: SpeedrunConfig, hw: dict[str, Any]) -> tuple[str, Preset]:
    if cfg.preset is None:
        name, why = choose_preset(hw)
        print(f"[speedrun] preset {name}: {why}")
    else:
        name = cfg.preset
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    return name, PRESETS[name]


def _dry_run(cfg: SpeedrunConfig, preset: Preset, name: str, run_name: str, plan: list[StagePlan],
             est: dict[str, Any], nproc: int, hw: dict[str, Any], home: Path, free: int) -> dict[str, Any]:
    print_plan(preset, plan, est, nproc, cfg.price, hw, cfg.budget)
    print(f"  free disk under {home}: {free / 1e9:.1f} GB")
    if free < est["disk_bytes"]:
        print(f"  WARNING: not enough disk for this run: {free / 1e9:.1f} GB free, ~{est['disk_bytes'] / 1e9:.1f} "
              f"GB needed; a real run would refuse to start")
    return {"dry_run": True, "preset": name, "run": run_name, "estimate": est,
            "stages": [{"name": sp.name, "argv": sp.argv} for sp in plan]}


def _fresh_or_kept(cfg: SpeedrunConfig, rdir: Path) -> bool:
    """--force-restart deletes the run folder (asking first on a terminal, else only with --yes); False when the
    user declined. The folder and its logs/ exist afterwards."""
    if cfg.force_restart and rdir.exists():
        if not cfg.yes:
            if not sys.stdin.isatty():
                raise UserError(f"--force-restart would delete {rdir}; add --yes to confirm non-interactively")
            answer = input(f"delete {rdir} and start over? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("[speedrun] not restarting")
                return False
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "logs").mkdir(exist_ok=True)
    return True


@dataclass
class _Orchestra:
    """One invocation of a speedrun: its state file, money meter, child environment, the background shard
    download, the stage fingerprints of this invocation and the summary rows."""

    cfg: SpeedrunConfig
    preset: Preset
    name: str
    run_name: str
    nproc: int
    rdir: Path
    state: RunState
    money: Money
    est_cost: dict[str, float]
    env: dict[str, str]
    bg: subprocess.Popen | None = None
    fps: dict[str, str] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, cfg: SpeedrunConfig, preset: Preset, name: str, run_name: str, nproc: int, hw: dict[str, Any],
             rdir: Path, est: dict[str, Any]) -> "_Orchestra":
        wait_for_previous_child(rdir / "stage.pid")
        state = RunState(rdir / "speedrun.json")
        state.data.update(preset=name, run=run_name, hardware=hw)
        state.data.setdefault("started", time.time())
        state.save()
        money = Money(state, cfg.price, nproc if hw["gpus"] else 1, cfg.budget, rdir / "budget_stop.json")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return cls(cfg, preset, name, run_name, nproc, rdir, state, money,
                   {r["stage"]: r["seconds"] * money.rate / 3600 for r in est["stages"]}, env)

    def stop_background(self) -> None:
        if self.bg is not None:
            self.bg.terminate()

    def budget_stop(self, stage: str) -> dict[str, Any]:
        return {"run": self.run_name, "budget_stop": stage, "rc": EXIT_BUDGET, "stages": self.summary,
                "spent": self.money.spent()}

    def run_stage(self, sp: StagePlan, later: float) -> dict[str, Any] | None:
        """Skip, (re)run or refuse one stage; None to go on to the next, else what `run` returns."""
        upstream = [self.fps.get(u) or self.state.stage(u).get("fingerprint") for u in UPSTREAM[sp.name]]
        fp = fingerprint({"argv": sp.argv, "upstream": upstream})
        self.fps[sp.name] = fp
        st = self.state.stage(sp.name)
        if st.get("status") == "done" and st.get("fingerprint") == fp:
            print(f"[speedrun] ===== {sp.name}: done already ({st.get('seconds', 0):.0f}s), skipping =====")
            self.summary.append({"stage": sp.name, "status": "skipped", "seconds": st.get("seconds", 0)})
            return None
        if st.get("fingerprint") not in (None, fp) and sp.name in STAGE_OUTPUT:
            old = self.rdir / STAGE_OUTPUT[sp.name]
            if old.exists():
                print(f"[speedrun] {sp.name}: inputs changed since the last run; removing {old}")
                shutil.rmtree(old)
        resumed = st.get("status") == "running" and st.get("fingerprint") == fp
        if sp.name == "pretrain" and self.bg is not None:
            _wait_background(self.bg, "pretraining data download")
            self.bg = None
        why_not = self.money.refuse(sp.name, self.est_cost.get(sp.name, 0.0))
        if why_not:
            self.stop_background()
            print(f"[speedrun] ===== {why_not} =====", flush=True)
            return self.budget_stop(sp.name)
        banner = "resuming" if resumed else "starting"
        print(f"[speedrun] ===== {sp.name}: {banner} ===== picochat {' '.join(sp.argv)}", flush=True)
        st.update(status="running", fingerprint=fp, argv=sp.argv, started=time.time())
        self.state.save()
        t0 = time.time()
        rc = stream_child(stage_command(sp, self.nproc), sp.name, env=self.money.stage_env(self.env, later),
                          log_path=self.rdir / "logs" / f"{sp.name}.log", pid_file=self.rdir / "stage.pid",
                          money=self.money)
        return self.after_stage(sp, st, rc, time.time() - t0)

    def after_stage(self, sp: StagePlan, st: dict[str, Any], rc: int, dt: float) -> dict[str, Any] | None:
        """Record a finished child: done (and start the background download after `data`), stopped for the
        budget, or failed (rerun to resume)."""
        st["seconds"] = st.get("seconds_before", 0) + dt
        self.money.save()
        stopped = self.money.stopped_for_budget()
        if rc != 0 or stopped:
            st["seconds_before"] = st["seconds"]
            if rc != 0:
                st["rc"] = rc
            self.state.save()
            self.stop_background()
        if rc == 0 and stopped:
            print(f"[speedrun] ===== {sp.name}: stopped for the budget at step {stopped.get('step')}: "
                  f"${self.money.spent():,.2f} spent of ${self.cfg.budget:,.2f}; its checkpoint is saved. Re-run with "
                  f"a larger --budget to continue from it. =====", flush=True)
            return self.budget_stop(sp.name)
        if rc != 0:
            print(f"[speedrun] ===== {sp.name}: stopped (exit code {rc}) after {_fmt_time(dt)}. Re-run the same "
                  f"command to continue from its latest checkpoint. =====", flush=True)
            return {"run": self.run_name, "failed_stage": sp.name, "rc": rc, "stages": self.summary}
        st.update(status="done", finished=time.time(), rc=0)
        st.pop("seconds_before", None)
        self.state.save()
        self.summary.append({"stage": sp.name, "status": "ran", "seconds": st["seconds"]})
        print(f"[speedrun] ===== {sp.name}: done in {_fmt_time(dt)} =====", flush=True)
        p = self.preset
        if sp.name == "data" and p.data == "download" and not self.cfg.data_dir and p.shards > p.tokenizer_shards:
            self.start_download()
        return None

    def start_download(self) -> None:
        """The rest of the pretraining shards download while the tokenizer trains."""
        from picochat.runtime import default_data_dir  # lazy: torch (~2 s); only the stages need it

        cmd = [sys.executable, "-m", "picochat", "data", "download", "--shards", str(self.preset.shards),
               "--out", str(default_data_dir("climbmix"))]
        print(f"[speedrun] background: {' '.join(cmd[2:])} (log: {self.rdir / 'logs' / 'download.log'})")
        self.bg = subprocess.Popen(cmd, stdout=open(self.rdir / "logs" / "download.log", "a"),
                                   stderr=subprocess.STDOUT, env=self.env)

    def finish(self, t_total: float) -> dict[str, Any]:
        """The summary table, money, time to the CORE target and what to do next."""
        self.state.data["finished"] = time.time()
        self.money.save()
        total = sum(s["seconds"] for s in self.summary)
        print("[speedrun] ===== summary =====")
        print(f"  {'stage':<10} {'status':<8} {'time':>10}")
        for s in self.summary:
            print(f"  {s['stage']:<10} {s['status']:<8} {_fmt_time(s['seconds']):>10}")
        print(f"  {'total':<10} {'':<8} {_fmt_time(total):>10}  (this invocation: {_fmt_time(time.time() - t_total)})")
        if self.money.rate:
            print(f"  spent: ${self.money.spent():,.2f} at ${self.money.rate:,.2f}/hour (all invocations of this run)")
        target = time_to_core(self.rdir)
        if self.cfg.until_core is not None or target:
            print(f"  {target_line(target) if target else 'time to CORE target: no CORE target record'}")
        report = self.rdir / "report.md"
        if report.exists():
            print(f"[speedrun] report: {report}")
        run_name = self.run_name
        print(f"[speedrun] talk to it: picochat chat --run {run_name}   or   picochat serve --run {run_name}")
        print(f"[speedrun] share it: picochat export --run {run_name} --out {run_name}-chat")
        return {"run": run_name, "preset": self.name, "stages": self.summary, "total_seconds": total,
                "spent": self.money.spent(), **({"time_to_core": target} if target else {})}


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
    parser.add_argument("--until-core", type=float, default=None, metavar="SCORE",
                        help="nanochat's leaderboard protocol: pretraining stops at the first CORE eval reaching "
                             "SCORE (0.2565 = GPT-2) and reports its training time; the pipeline goes on from there")
    parser.add_argument("--nproc", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, time and cost; run nothing")
    parser.add_argument("--price", type=float, default=None,
                        help="$ per GPU-hour (per machine-hour without GPUs): dollars in the dry run, on every step "
                             "line and heartbeat")
    parser.add_argument("--budget", type=float, default=None, metavar="DOLLARS",
                        help="the most this run may cost (all invocations, needs --price): training stages save a "
                             "checkpoint and stop before passing it, the speedrun exits 3; a larger budget resumes")
    parser.add_argument("--gpus", default=None, metavar="NAME:COUNT",
                        help="dry run: plan for these GPUs instead of this machine's, e.g. H100:8")
    parser.add_argument("--force-restart", action="store_true", help="delete the run and start over")
    parser.add_argument("--yes", action="store_true", help="don't ask before --force-restart")


def validate_args(args: argparse.Namespace) -> None:
    """The orchestrator's own flags, one ConfigError line each, before any stage starts (the stages check theirs)."""
    for flag, value, low in (("--max-steps", args.max_steps, 1), ("--nproc", args.nproc, 1),
                             ("--price", args.price, 0)):
        require(value is None or (math.isfinite(value) and value >= low), f"{flag} {value}: must be >= {low}")
    until = getattr(args, "until_core", None)
    require(until is None or (math.isfinite(until) and 0 < until <= 1),
            f"--until-core {until}: a CORE score in (0, 1], e.g. 0.2565 (GPT-2's)")
    if args.data_dir:
        require_dir(args.data_dir, "--data-dir", "pass a shard folder (`picochat data download|prepare` make one), "
                                                 "or drop --data-dir for the preset's data")


def cli_main(args: argparse.Namespace) -> int:
    validate_args(args)
    cfg = SpeedrunConfig(preset=args.preset, run=args.run, rl=args.rl, stages=args.stages, max_steps=args.max_steps,
                         sets=args.sets, force_restart=args.force_restart, yes=args.yes, dry_run=args.dry_run,
                         price=args.price, budget=args.budget, gpus=args.gpus, nproc=args.nproc,
                         data_dir=args.data_dir, until_core=args.until_core)
    result = run(cfg)
    if result.get("failed_stage") or result.get("budget_stop"):
        return int(result.get("rc") or 1)
    return 0

