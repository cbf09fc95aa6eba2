"""Where the code runs: device, compute dtype, distributed init/teardown, rank-0 printing, seeding, paths.

This is the only module that knows about torchrun's environment. Everything else asks it.
- device: CUDA if present, else MPS, else CPU; override with PICOCHAT_DEVICE=cpu|cuda|mps.
- compute dtype: bf16 on CUDA sm80+, fp16 (with loss scaling, `training.LossScaler`) on sm70-sm7x (V100, T4: no
  bf16), fp32 elsewhere (CPU, MPS, older GPUs); override with PICOCHAT_DTYPE=bfloat16|float16|float32.
- distributed: when torchrun's RANK/WORLD_SIZE/LOCAL_RANK are set, NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from picochat.config import ConfigError, check_run_name

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------------------------
# Paths


def picochat_home() -> Path:
    """Root of everything picochat writes: PICOCHAT_HOME, default ~/.cache/picochat."""
    return Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat")).expanduser()


def run_dir(run: str) -> Path:
    """Directory of one named run: runs/<run>/{base,mid,sft,rl,eval}/..."""
    return picochat_home() / "runs" / check_run_name(run)


def stage_dir(run: str, stage: str) -> Path:
    return run_dir(run) / stage


def default_tokenizer_dir() -> Path:
    return picochat_home() / "tokenizer"


def default_data_dir(name: str = "synth") -> Path:
    return picochat_home() / "data" / name


# ----------------------------------------------------------------------------------------------------------------
# Rank helpers (valid before and after init)


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's env (0, 0, 1 when not launched by torchrun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else dist_env()[0]


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else dist_env()[2]


def is_rank0() -> bool:
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only, flushed (logs are streamed through pipes by launchers)."""
    if is_rank0():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Device and dtype


def detect_device(override: str | None = None) -> torch.device:
    """The device to run on: `override` (--device), else PICOCHAT_DEVICE, else the best available. A device that
    is unknown or not present is a ConfigError naming where it came from (no torch error later)."""
    name = override or os.environ.get("PICOCHAT_DEVICE") or ""
    where = f"--device {name}" if override else f"PICOCHAT_DEVICE={name}"
    if not name:
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{where}: unknown device; expected one of cpu, cuda, mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{where}: CUDA is not available here (torch.cuda.is_available() is False); run "
                          f"`picochat doctor` to see why, or use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError(f"{where}: Apple MPS is not available here; use --device cpu (or cuda on a GPU machine)")
    if name == "cuda":
        return torch.device("cuda", dist_env()[1] % max(1, torch.cuda.device_count()))
    return torch.device(name)


def compute_dtype(device: torch.device, override: str | None = None) -> torch.dtype:
    """--dtype, else PICOCHAT_DTYPE, else by the hardware (`default_dtype`)."""
    name = override or os.environ.get("PICOCHAT_DTYPE")
    if name:
        if name not in _DTYPES:
            where = f"--dtype {name}" if override else f"PICOCHAT_DTYPE={name}"
            raise ConfigError(f"{where}: unknown dtype; expected one of {', '.join(sorted(set(_DTYPES)))}")
        return _DTYPES[name]
    return default_dtype(device.type, torch.cuda.get_device_capability(device) if device.type == "cuda" else None)


def default_dtype(device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype:
    """bf16 on CUDA sm80+ (tensor cores, no loss scaling); fp16 on sm70-sm7x (V100, T4: fp16 tensor cores but no
    bf16), trained with dynamic loss scaling (`training.LossScaler`); fp32 elsewhere: CPU, MPS (untested in
    reduced precision) and GPUs before sm70 (no tensor cores; fp16 arithmetic there is often slower than fp32)."""
    if device_type == "cuda" and capability is not None:
        if capability[0] >= 8:
            return torch.bfloat16
        if capability[0] == 7:
            return torch.float16
    return torch.float32


def accum_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of evaluation sums: float64, except on MPS, which has none (float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def fused_loss_switch() -> bool:
    """PICOCHAT_FUSED_LOSS=0 trains with plain logits + F.cross_entropy instead of the chunked fused loss."""
    return os.environ.get("PICOCHAT_FUSED_LOSS", "1") != "0"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Dense bf16 peak FLOP/s per GPU, for MFU. Matched by substring of the device name; unknown -> None (MFU not shown).
PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("B100", 1750e12), ("A100", 312e12), ("A10G", 125e12), ("L40S", 362e12), ("L4", 121e12),
    ("RTX 5090", 209.5e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A6000", 155e12), ("V100", 125e12),
]


# HBM/GDDR bandwidth, bytes/s, from the vendors' datasheets (SXM parts unless named): the decode roofline.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12), ("B200", 8.0e12),
    ("B100", 8.0e12), ("A100", 2.0e12), ("A10G", 0.6e12), ("L40S", 0.864e12), ("L4", 0.3e12),
    ("RTX 5090", 1.79e12), ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12), ("A6000", 0.768e12), ("V100", 0.9e12),
]


def _by_gpu_name(table: list[tuple[str, float]], device: torch.device) -> float | None:
    """The first entry of `table` whose key is a substring of the CUDA device's name; None elsewhere/unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in table if key in name), None)


def peak_bandwidth(device: torch.device) -> float | None:
    return _by_gpu_name(PEAK_BANDWIDTH, device)


def peak_flops(device: torch.device) -> float | None:
    return _by_gpu_name(PEAK_FLOPS, device)


# ----------------------------------------------------------------------------------------------------------------
# Seeding and init


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is a dependency, but seeding should never be the thing that fails
        pass


@dataclass
class Runtime:
    """What a stage needs to know about where it runs."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"device={self.device} dtype={dt} rank={self.rank}/{self.world_size}"


def init_runtime(device: str | None = None, dtype: str | None = None, seed: int = 1337) -> Runtime:
    """Pick the device and dtype, join the torchrun process group if launched by torchrun, and seed.

    Safe to call twice (a stage called from the speedrun orchestrator in the same process).
    """
    rank, local_rank, world_size = dist_env()
    dev = detect_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=int(os.environ.get("PICOCHAT_DIST_TIMEOUT", 1800)))
        kwargs: dict[str, Any] = dict(backend=backend, timeout=timeout)
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    seed_everything(seed)
    return Runtime(device=dev, dtype=compute_dtype(dev, dtype), rank=rank, local_rank=local_rank,
                   world_size=world_size)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Provenance (run headers, report)


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_memory(device: torch.device) -> float | None:
    """Total memory of a CUDA device in bytes; None elsewhere."""
    return float(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None


def environment_info(device: torch.device | None = None) -> dict[str, Any]:
    """Versions and hardware, for run headers and the report card."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_path": str(Path(torch.__file__).parent),
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "hostname": os.uname().nodename if hasattr(os, "uname") else None,
        "cpu_count": os.cpu_count(),
        "world_size": get_world_size(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info
