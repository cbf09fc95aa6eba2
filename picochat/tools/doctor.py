"""`picochat doctor`: what this machine is, what picochat will do on it, and what to change.

Probes (each one guarded, so a broken piece of the stack shows up as a finding instead of a traceback):
- torch: version, where it was imported from (custom builds live outside site-packages), CUDA/cuDNN/NCCL versions;
- GPUs: name, memory, compute capability (sm_XY), bf16/fp8 support, and whether the installed torch ships kernels
  for that architecture (`torch.cuda.get_arch_list()`; e.g. an sm_120 card with a torch built without sm_120);
- attention: the backend the attention shim will use on this device;
- torch.distributed: gloo/NCCL, and whether TCPStore has libuv (a real probe: libuv-less builds raise on it);
- disk: free space under PICOCHAT_HOME;
- the NVIDIA driver's CUDA version against torch's (libcuda, else `nvidia-smi`: it works when torch cannot use the
  driver), GPUs that `nvidia-smi` lists but torch does not see, a C compiler and Python headers for Triton,
  `/dev/shm` for NCCL between several GPUs, Apple MPS.
Then recommendations: preset, `--nproc-per-node`, device batch size per depth, window pattern, fp8.

Findings that block training here are `problems` (each names its fix; the CLI then exits 1), the rest `warnings`.
`--bench` also times a few steps of the recommended preset's model (`picochat bench pretrain`'s code) and, with
several GPUs, an all-reduce across them, and predicts every preset's pipeline time and cost on this machine.

`run() -> dict` is the API for other modules; the CLI prints it as text or `--json`. It runs in about a second on
a CPU-only box (importing torch is most of it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from picochat.sandbox import sandbox_status
from picochat.scaling import recommend_batch

# Known compute capabilities -> marketing generation (for the human-readable line only).
_ARCH_NAMES = {7: "Volta/Turing", 8: "Ampere/Ada", 9: "Hopper", 10: "Blackwell (datacenter)",
               11: "Blackwell (Thor)", 12: "Blackwell (consumer/RTX Pro)"}

_DEPTHS = (12, 20, 24, 32)


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (tested without a GPU)


def sm_name(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def _parse_arch(arch: str) -> tuple[str, int, int, bool] | None:
    """'sm_90a' -> ('sm', 9, 0, True); 'compute_120' -> ('compute', 12, 0, False). None if unparseable."""
    kind, _, rest = arch.partition("_")
    if kind not in ("sm", "compute"):
        return None
    specific = rest.endswith(("a", "f"))
    digits = rest.rstrip("af")
    if not digits.isdigit() or len(digits) < 2:
        return None
    return kind, int(digits[:-1]), int(digits[-1]), specific


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool | None:
    """Can a torch built for `arch_list` run kernels on a GPU of `capability`?

    CUDA rules: a cubin for sm_XY runs on sm_XZ with Z >= Y (same major); PTX (compute_XY) is JIT-compiled for any
    newer GPU; arch-specific targets (sm_90a, sm_100a) run only on exactly that GPU. None when torch reports no
    list (CPU build, or a build that does not say).
    """
    if not arch_list:
        return None
    major, minor = capability
    for a in arch_list:
        parsed = _parse_arch(a)
        if parsed is None:
            continue
        kind, amaj, amin, specific = parsed
        if kind == "sm":
            if specific and (amaj, amin) == (major, minor):
                return True
            if not specific and amaj == major and amin <= minor:
                return True
        elif (amaj, amin) <= (major, minor):
            return True
    return False


def fp8_supported(capability: tuple[int, int]) -> bool:
    """fp8 tensor cores exist from Ada (sm_89) and Hopper (sm_90) on."""
    return capability >= (8, 9)


def fp8_recommended(capability: tuple[int, int], depth: int) -> bool:
    """fp8 pays off on Hopper/Blackwell from d12 up (the rule lives in fp8.py, where it also makes fp8 pretrain's
    default)."""
    # imported here, not at the top: the doctor reports a broken torch as a finding, so its module imports no torch
    from picochat.ops.fp8 import pays_off

    return pays_off(capability, depth)


def torch_path_warning(torch_dir: str, env: dict[str, str] | None = None,
                       site_dirs: list[str] | None = None) -> str | None:
    """A warning when torch was imported from somewhere unexpected, else None.

    With PICOCHAT_EXPECT_TORCH_PATH or TORCH_LOCAL_PATH set (a custom build), torch must come from under it.
    Without them, torch is expected in this interpreter's site-packages; anything else (a PYTHONPATH entry, a
    source tree) is reported so a stale or shadowing build does not go unnoticed.
    """
    env = os.environ if env is None else env
    here = os.path.realpath(torch_dir)
    expected = env.get("PICOCHAT_EXPECT_TORCH_PATH") or env.get("TORCH_LOCAL_PATH")
    if expected:
        want = os.path.realpath(os.path.expanduser(expected))
        if here != want and not here.startswith(want.rstrip(os.sep) + os.sep):
            var = "PICOCHAT_EXPECT_TORCH_PATH" if env.get("PICOCHAT_EXPECT_TORCH_PATH") else "TORCH_LOCAL_PATH"
            return (f"torch was imported from {here}, not from {want} ({var}); put the custom build first on "
                    f"PYTHONPATH or install it into this environment (`pip install -e {want}` / "
                    f"`pip install --no-deps {want}`)")
        return None
    dirs = site_dirs if site_dirs is not None else _site_dirs()
    for d in dirs:
        d = os.path.realpath(d)
        if here.startswith(d.rstrip(os.sep) + os.sep):
            return None
    return (f"torch was imported from {here}, outside this interpreter's site-packages ({', '.join(dirs) or '?'}); "
            f"if that is your custom build, set PICOCHAT_EXPECT_TORCH_PATH to its directory to confirm it")


def _site_dirs() -> list[str]:
    dirs: list[str] = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # some virtualenv flavours lack it
        pass
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            dirs.append(p)
    return sorted(set(dirs))


# ----------------------------------------------------------------------------------------------------------------
# Checks that decide whether training can run here (pure: the probes below feed them)

SHM_MIN_BYTES = 1 << 30  # NCCL's shared-memory transport needs more than Docker's 64 MB default between GPUs


def _version_tuple(v: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", v or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_findings(torch_cuda: str | None, driver_cuda: tuple[int, int] | None, smi_gpus: int,
                  cuda_available: bool, visible: str | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) from torch's CUDA version, the driver's highest supported CUDA version (None: no
    driver found), the GPUs `nvidia-smi` lists and whether torch can use CUDA. `visible`: CUDA_VISIBLE_DEVICES."""
    problems: list[str] = []
    warnings: list[str] = []
    built = _version_tuple(torch_cuda)
    if built and driver_cuda:
        need, have = f"{built[0]}.{built[1]}", f"{driver_cuda[0]}.{driver_cuda[1]}"
        if driver_cuda[0] < built[0]:
            problems.append(f"the NVIDIA driver supports CUDA up to {have} but this torch is built for CUDA {need}: "
                            f"update the driver to one whose `nvidia-smi` shows 'CUDA Version: {need}' or newer, "
                            f"or install a torch built for CUDA {driver_cuda[0]}.x (pip install torch --index-url "
                            f"https://download.pytorch.org/whl/cu{driver_cuda[0]}{driver_cuda[1]})")
        elif driver_cuda < built:
            warnings.append(f"the NVIDIA driver supports CUDA up to {have}, this torch is built for CUDA {need}: it "
                            f"runs through CUDA minor-version compatibility, but kernels compiled at run time "
                            f"(PTX) may fail; a driver for CUDA {need} or newer avoids that")
    hidden = visible is not None and visible.strip() in ("", "-1")
    if smi_gpus and not cuda_available and not hidden and not problems:
        if built is None:
            problems.append(f"nvidia-smi lists {smi_gpus} GPU(s) but this torch is a CPU-only build: install a "
                            f"CUDA build (pip install torch --index-url https://download.pytorch.org/whl/cu128, "
                            f"or the CUDA version `nvidia-smi` shows)")
        else:
            problems.append(f"nvidia-smi lists {smi_gpus} GPU(s) but torch cannot use them "
                            f"(torch.cuda.is_available() is False): check the driver with `nvidia-smi`, "
                            f"CUDA_VISIBLE_DEVICES, and that a container was started with GPU access (--gpus all)")
    return problems, warnings


def compiler_findings(cuda_available: bool, triton_version: str | None, compiles: bool, cc: str | None,
                      python_h: bool) -> list[str]:
    """Problems that stop torch.compile on CUDA: Triton builds a small C launcher at first use, with a C compiler
    and this Python's headers. `compiles`: whether training compiles here (on CUDA by default)."""
    if not (cuda_available and compiles):
        return []
    if triton_version is None:
        return ["torch.compile on CUDA needs Triton, which is not installed: pip install triton (Linux CUDA "
                "wheels of torch bring it), or train without compiling (PICOCHAT_COMPILE=0, much slower)"]
    problems = []
    if not cc:
        problems.append("no C compiler (cc, gcc or clang on PATH, or $CC): Triton builds its kernel launcher with "
                        "one at first use; install one (Debian/Ubuntu: apt install build-essential) or set CC")
    if not python_h:
        v = f"{sys.version_info[0]}.{sys.version_info[1]}"
        problems.append(f"no Python.h for this Python ({sysconfig.get_paths().get('include')}): Triton compiles its "
                        f"kernel launcher against it; install the headers (Debian/Ubuntu: apt install "
                        f"python{v}-dev), or use a Python that ships them (uv, pyenv, conda)")
    return problems


def shm_warning(n_gpus: int, shm_bytes: int | None) -> str | None:
    """NCCL between GPUs of one host exchanges through /dev/shm; containers often get 64 MB of it."""
    if n_gpus < 2 or shm_bytes is None or shm_bytes >= SHM_MIN_BYTES:
        return None
    return (f"/dev/shm is {shm_bytes / 2**20:.0f} MB: NCCL across {n_gpus} GPUs can fail with 'unhandled system "
            f"error' or a bus error when it fills; start the container with --shm-size=16g or --ipc=host")


# ----------------------------------------------------------------------------------------------------------------
# Probes of the machine below torch (each returns None when there is nothing to find)


def probe_driver_cuda() -> tuple[int, int] | None:
    """The highest CUDA version the installed NVIDIA driver supports: libcuda's cuDriverGetVersion, else the
    'CUDA Version' of `nvidia-smi`. Works when torch cannot use the driver (that is when it matters)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0:
                return v.value // 1000, v.value % 1000 // 10
        except AttributeError:
            pass
    out = _nvidia_smi([])
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def probe_smi_gpus() -> int:
    """GPUs `nvidia-smi -L` lists (0 without nvidia-smi)."""
    out = _nvidia_smi(["-L"])
    return sum(1 for line in (out or "").splitlines() if line.startswith("GPU "))


def _nvidia_smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def probe_cc() -> str | None:
    """The C compiler Triton would use: $CC, else cc, gcc or clang on PATH (Triton's own order)."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def probe_python_h() -> bool:
    include = sysconfig.get_paths().get("include")
    return bool(include) and os.path.exists(os.path.join(include, "Python.h"))


def probe_shm() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").total
    except OSError:
        return None


def probe_mps(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Probes


def probe_libuv() -> dict[str, Any]:
    """Does this torch's TCPStore have the libuv backend? Creates (and drops) a localhost store on a free port."""
    try:
        import torch.distributed as dist
    except Exception as e:  # pragma: no cover - torch without distributed
        return {"available": False, "error": f"torch.distributed unavailable: {e}"}
    if not dist.is_available():
        return {"available": False, "error": "torch.distributed is not available in this build"}
    import datetime

    try:
        store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=5),
                              wait_for_workers=False, use_libuv=True)
    except TypeError:  # torch < 2.2: no use_libuv argument, so no libuv backend either
        return {"available": False, "error": "this torch's TCPStore has no use_libuv option"}
    except Exception as e:  # libuv-less builds: "use_libuv was requested but PyTorch was build without libuv support"
        return {"available": False, "error": str(e).splitlines()[0][:200]}
    # Older builds silently fell back; the attribute says what the store really uses (name changed across versions).
    used = getattr(store, "libuvBackend", getattr(store, "libuv_backend", True))
    del store
    return {"available": bool(used), "error": None if used else "TCPStore fell back to the non-libuv backend"}


def _versions(torch) -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__, "torch_path": str(Path(torch.__file__).resolve().parent),
                           "python": sys.version.split()[0], "python_path": sys.executable,
                           "cuda": torch.version.cuda, "cudnn": None, "nccl": None,
                           "hip": getattr(torch.version, "hip", None)}
    try:
        v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if v:
            out["cudnn"] = f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else str(v)
    except Exception:
        pass
    try:
        if torch.cuda.is_available():
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:
        pass
    try:
        import triton  # noqa: F401  (only to report it; torch.compile needs it on GPU)

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    return out


def _gpus(torch, arch_list: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    gpus: list[dict[str, Any]] = []
    warnings: list[str] = []
    if not torch.cuda.is_available():
        return gpus, warnings
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cap = (p.major, p.minor)
        ok = arch_supported(cap, arch_list)
        g = {"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
             "capability": f"{cap[0]}.{cap[1]}", "sm": sm_name(cap), "generation": _ARCH_NAMES.get(cap[0], "?"),
             "multiprocessors": p.multi_processor_count, "bf16": cap >= (8, 0), "fp8": fp8_supported(cap),
             "torch_has_kernels": ok}
        if ok is False:
            warnings.append(f"GPU {i} ({p.name}) is {sm_name(cap)} but this torch was built for "
                            f"{' '.join(arch_list)}: kernels will fail with 'no kernel image is available'. "
                            f"Install a torch whose CUDA build lists {sm_name(cap)} (for sm_120: torch >= 2.7 "
                            f"cu128 or newer wheels) or build it with TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")
        gpus.append(g)
    if gpus:  # the definitive check: run one tiny kernel
        try:
            x = torch.ones(8, device="cuda")
            (x * 2).sum().item()
        except Exception as e:
            warnings.append(f"a trivial CUDA kernel failed on GPU 0: {str(e).splitlines()[0][:200]}")
            gpus[0]["kernel_test"] = "failed"
        else:
            gpus[0]["kernel_test"] = "ok"
    return gpus, warnings


def _disk() -> dict[str, Any]:
    from picochat.runtime import picochat_home

    home = picochat_home()
    probe = home
    while not probe.exists() and probe != probe.parent:  # the home may not exist yet: measure where it will be
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"picochat_home": str(home), "exists": home.exists(), "free_gb": round(usage.free / 2**30, 1),
            "total_gb": round(usage.total / 2**30, 1)}


def _recommend(gpus: list[dict[str, Any]], attention: str, disk: dict[str, Any], libuv: dict[str, Any],
               cpu_count: int, mps: bool = False) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    notes: list[str] = []
    n = len(gpus)
    if n == 0 and mps:
        rec.update(preset="tiny", nproc_per_node=1, window_pattern="L", fp8=False, device_batch_size={},
                   device="mps")
        notes.append("Apple GPU (MPS): run the tiny preset (`picochat speedrun --preset tiny`); picochat picks "
                     "mps by default here, but mps is untested: if a stage fails on it, PICOCHAT_DEVICE=cpu runs "
                     "the same pipeline on the CPU")
    elif n == 0:
        rec.update(preset="tiny", nproc_per_node=1, window_pattern="L", fp8=False, device_batch_size={})
        notes.append("no CUDA GPU: run the tiny preset (`picochat speedrun --preset tiny`); it trains on the "
                     "embedded corpus in minutes on a CPU")
        if cpu_count and cpu_count > 1:
            notes.append(f"{cpu_count} CPU cores: a single process uses them all; "
                         "`picochat launch --nproc-per-node 2` on CPU only helps to test distributed code")
    else:
        mem = min(g["memory_gb"] for g in gpus) * 2**30
        cap = min(tuple(int(c) for c in g["capability"].split(".")) for g in gpus)
        batches = {f"d{d}": recommend_batch(mem, d, world_size=n, fp8=fp8_recommended(cap, d)) for d in _DEPTHS}
        if n >= 8 and mem >= 70 * 2**30:
            preset = "d20"
            notes.append("8 big GPUs: d20 is the $100-class run; d24 reaches GPT-2 grade; d32 takes about a day")
        else:
            preset = "d12"
            notes.append(f"{n} GPU(s) with {mem / 2**30:.0f} GB: d12 is the practical size; bigger presets run too "
                         f"(gradient accumulation fills the batch) but take about {8 / n:.0f}x longer than on 8 GPUs")
        depth = int(preset[1:])
        rec.update(preset=preset, nproc_per_node=n, device_batch_size=batches,
                   fp8=fp8_recommended(cap, depth), fp8_supported=fp8_supported(cap))
        if not all(g["bf16"] for g in gpus):
            notes.append("a GPU below sm_80 has no bf16: training falls back to fp32/fp16 and is much slower")
        # Sliding windows only pay off with an FA3-class windowed kernel; with SDPA/cuDNN/Flex full attention is as
        # fast or faster at T=2048 (measured on H100), so full-context layers are the default recommendation.
        rec["window_pattern"] = "SSSL" if ("fa3" in attention or "flash3" in attention) else "L"
        notes.append(f"use `picochat launch --nproc-per-node {n} <stage> ...` (or `--nproc-per-node auto`)")
        if batches.get(f"d{depth}", 0) == 0:
            notes.append(f"d{depth} does not fit even one sequence per GPU by the estimate; use a smaller depth")
        else:
            notes.append(f"device batch size for d{depth}: --device-batch-size {batches[f'd{depth}']} "
                         f"(estimate; halve it on out-of-memory, the total batch stays the same)")
        if rec["fp8"]:
            notes.append(f"fp8 pays off here for d{depth}, so pretrain uses it by default (`--no-fp8` turns it "
                         f"off): measured on an H200, +3.5% tok/s at d12 (MLP matmuls only) and +14% at d20 (all "
                         f"block matmuls), with less memory; nanochat +17% at d26; the same val bpb as bf16 on the "
                         f"d12 quality benchmark")
        elif rec.get("fp8_supported"):
            notes.append("fp8 (`pretrain --fp8`) is supported; it is the default on Hopper/Blackwell from d12 up, "
                         "and not measured on this GPU generation, so here it stays opt-in")
    if not libuv.get("available"):
        notes.append("torch.distributed has no libuv TCPStore here: `picochat launch` detects this and uses the "
                     "classic store (USE_LIBUV=0 plus use_libuv=False everywhere); plain torchrun may fail")
    if disk.get("free_gb") is not None and disk["free_gb"] < 50 and n:
        notes.append(f"only {disk['free_gb']} GB free under PICOCHAT_HOME: the d20+ presets need roughly 30-100 GB "
                     f"for data shards and checkpoints")
    rec["notes"] = notes
    return rec


def _probe_cuda(torch: Any, report: dict[str, Any], problems: list[str], warnings: list[str]) -> list[dict]:
    """The GPUs, the architectures this torch has kernels for, and the driver against torch's CUDA."""
    try:
        arch_list = list(torch.cuda.get_arch_list()) if torch.cuda.is_available() else []
    except Exception:
        arch_list = []
    report["cuda_available"] = torch.cuda.is_available()
    report["cuda_arch_list"] = arch_list
    try:
        gpus, gw = _gpus(torch, arch_list)
    except Exception as e:
        gpus, gw = [], [f"probing the GPUs failed: {e}"]
    problems.extend(gw)  # a GPU without kernels for its architecture, or a failing trivial kernel: nothing trains on it
    report["gpus"] = gpus
    report["driver_cuda"] = _dotted(probe_driver_cuda())
    p, w = cuda_findings(torch.version.cuda, _version_tuple(report["driver_cuda"]), probe_smi_gpus(),
                         report["cuda_available"], os.environ.get("CUDA_VISIBLE_DEVICES"))
    problems.extend(p)
    warnings.extend(w)
    return gpus


def _probe_toolchain(torch: Any, report: dict[str, Any], gpus: list[dict], problems: list[str],
                     warnings: list[str]) -> None:
    """A C compiler and Python.h for Triton, /dev/shm for NCCL in containers, Apple MPS."""
    report["c_compiler"] = probe_cc()
    report["python_h"] = probe_python_h()
    try:
        from picochat.training import should_compile

        compiles = should_compile(None, torch.device("cuda"))
    except Exception:
        compiles = True
    problems.extend(compiler_findings(bool(gpus), report["versions"].get("triton"), compiles, report["c_compiler"],
                                      report["python_h"]))
    report["shm_bytes"] = probe_shm()
    w = shm_warning(len(gpus), report["shm_bytes"])
    if w:
        warnings.append(w)
    report["mps"] = probe_mps(torch) if not gpus else False


def _probe_runtime(torch: Any, report: dict[str, Any], gpus: list[dict]) -> None:
    """What picochat would use here: attention backend, compute dtype, distributed backends, free disk."""
    device = torch.device("cuda", 0) if gpus else torch.device("cpu")
    try:
        from picochat.ops.attention import backend_name

        report["attention_backend"] = backend_name(device)
    except Exception as e:
        report["attention_backend"] = f"unknown ({e})"
    try:
        from picochat.runtime import compute_dtype

        report["compute_dtype"] = str(compute_dtype(device)).replace("torch.", "")
    except Exception as e:
        report["compute_dtype"] = f"unknown ({e})"
    dist_info: dict[str, Any] = {"available": torch.distributed.is_available()}
    if dist_info["available"]:
        dist_info["gloo"] = torch.distributed.is_gloo_available()
        dist_info["nccl"] = torch.distributed.is_nccl_available()
    dist_info["libuv"] = probe_libuv()
    report["distributed"] = dist_info
    try:
        report["disk"] = _disk()
    except Exception as e:
        report["disk"] = {"error": str(e)}


def run() -> dict[str, Any]:
    """Probe everything; return a JSON-able report with `warnings` and `recommendations`."""
    import torch

    warnings: list[str] = []
    problems: list[str] = []
    report: dict[str, Any] = {"versions": _versions(torch)}
    w = torch_path_warning(report["versions"]["torch_path"])
    if w:
        warnings.append(w)
    gpus = _probe_cuda(torch, report, problems, warnings)
    _probe_toolchain(torch, report, gpus, problems, warnings)
    _probe_runtime(torch, report, gpus)
    report["sandbox"] = sandbox_status()
    if report["sandbox"]["kind"] == "none":
        warnings.append(f"python tool and HumanEval are off: {report['sandbox']['reason']}; to enable them, "
                        f"{report['sandbox']['how_to_enable']}")
    elif report["sandbox"]["kind"] == "trusted":
        warnings.append(report["sandbox"]["reason"])
    report["cpu_count"] = os.cpu_count()
    report["env"] = {k: os.environ[k] for k in ("PICOCHAT_HOME", "PICOCHAT_DEVICE", "PICOCHAT_DTYPE", "PICOCHAT_ATTN",
                                                 "CUDA_VISIBLE_DEVICES", "USE_LIBUV", "PYTHONPATH",
                                                 "PICOCHAT_EXPECT_TORCH_PATH", "TORCH_LOCAL_PATH")
                     if k in os.environ}
    report["recommendations"] = _recommend(gpus, report["attention_backend"], report["disk"],
                                           report["distributed"]["libuv"], os.cpu_count() or 1, mps=report["mps"])
    report["warnings"] = warnings
    report["problems"] = problems
    return report


def _dotted(v: tuple[int, int] | None) -> str | None:
    return f"{v[0]}.{v[1]}" if v else None


# ----------------------------------------------------------------------------------------------------------------
# --bench: this machine's measured speed, and what each preset would take here

PRICE_GPU_HOUR = 2.50  # $ per GPU-hour when --price is not given (the README's planning price for an H100)
# The rest of the pipeline (midtrain, SFT, evaluations, report; no RL) as a fraction of the pretraining time.
# tiny: measured, `./run.sh` on 2 CPU cores at 1eb2a8d (pretrain 7.0 of 14.3 min, docs/LOG.md); the other presets:
# assumed, until their stages are timed end to end.
REST_MEASURED = {"tiny": 14.3 / 7.0 - 1}
REST_ASSUMED = 0.25
ALLREDUCE_BYTES = 256 * 2**20  # big enough to be bandwidth-bound; gradients scale from it


def bench_model(preset: str, steps: int, warmup: int) -> dict[str, Any]:
    """`picochat bench pretrain --preset P --steps N --warmup W`: the preset's model at its default micro-batch
    (one micro-batch per step), on the device picochat picks here."""
    from picochat.stages import pretrain  # lazy: the probes above must run even when this import would fail

    parser = argparse.ArgumentParser()
    pretrain.add_bench_args(parser)
    return pretrain.bench_main(parser.parse_args(["--preset", preset, "--steps", str(steps),
                                                  "--warmup", str(warmup)]))


def _allreduce_worker(rank: int, world: int, backend: str, nbytes: int, iters: int, tmp: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        dist.all_reduce(x)  # the first call sets up the communicator
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        sync()
        t = torch.tensor([(time.perf_counter() - t0) / iters], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rank == 0:
            Path(tmp, "seconds").write_text(repr(float(t.item())))
    finally:
        dist.destroy_process_group()


def measure_allreduce(nproc: int, nbytes: int = ALLREDUCE_BYTES, backend: str = "nccl", iters: int = 5,
                      timeout_s: float = 300.0) -> dict[str, Any]:
    """Seconds per all-reduce of `nbytes` of fp32 across `nproc` local processes (one per GPU with nccl; gloo on
    CPU), each its own process as in training."""
    import multiprocessing

    with tempfile.TemporaryDirectory() as tmp:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_allreduce_worker, args=(r, nproc, backend, nbytes, iters, tmp))
                 for r in range(nproc)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        result = Path(tmp, "seconds")
        if any(p.exitcode != 0 for p in procs) or not result.exists():
            raise RuntimeError(f"the {backend} all-reduce across {nproc} processes failed (exit codes "
                               f"{[p.exitcode for p in procs]})")
        seconds = float(result.read_text())
    return {"ranks": nproc, "backend": backend, "bytes": nbytes, "seconds": seconds,
            "bytes_per_s": nbytes / seconds}


def predict(bench: dict[str, Any], n_gpus: int, price: float, allreduce: dict[str, Any] | None = None,
            batches: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Every speedrun preset's pipeline time and cost on this machine, from the measured throughput.

    Pretraining: the preset's tokens and FLOPs per token (speedrun's own plan), at the FLOP/s measured by the bench;
    on GPUs scaled by speedrun's planned MFU from the bench's depth to the preset's (bigger models use a GPU
    better), times the GPUs; with several, one all-reduce of fp32 gradients per optimizer step at the measured
    bandwidth, not overlapped with compute (an upper bound). The rest of the pipeline: REST_MEASURED / REST_ASSUMED.
    `batches`: the doctor's micro-batch per depth, 0 where a preset does not fit."""
    from picochat.config import UserError
    from picochat.model import flops_per_token
    from picochat.tools import speedrun

    world = max(1, n_gpus)
    achieved = bench["tok_per_s"] * bench["flops_per_token"]  # FLOP/s of one process, measured
    out: list[dict[str, Any]] = []
    for name, preset in speedrun.PRESETS.items():
        try:
            plan = speedrun.build_plan(speedrun.SpeedrunConfig(preset=name), preset, name, world)
            cfg, pplan = speedrun.resolve_pretrain(plan, preset, world)
        except UserError as e:  # e.g. tiny's fixed batch does not split over 8 GPUs
            out.append({"preset": name, "unavailable": str(e)})
            continue
        tokens = pplan.num_iterations * pplan.total_batch_size
        fpt = flops_per_token(pplan.model_config)
        scale = speedrun.expected_mfu(cfg.depth) / speedrun.expected_mfu(bench["depth"]) if n_gpus else 1.0
        compute_s = tokens * fpt / (achieved * scale * world)
        comm_s = 0.0
        if allreduce and world > 1:
            comm_s = pplan.num_iterations * pplan.derived["params_total"] * 4 / allreduce["bytes_per_s"]
        pretrain_s = compute_s + comm_s
        rest = REST_MEASURED.get(name, REST_ASSUMED)
        total_s = pretrain_s * (1 + rest)
        billed_hours = total_s / 3600 * world
        out.append({"preset": name, "depth": cfg.depth, "pretrain_tokens": tokens, "flops_per_token": fpt,
                    "pretrain_seconds": pretrain_s, "communication_seconds": comm_s, "total_seconds": total_s,
                    "rest_of_pipeline": rest, "rest_measured": name in REST_MEASURED,
                    "cost": billed_hours * price, "fits": (batches or {}).get(f"d{cfg.depth}", 1) != 0})
    return out


def run_bench(report: dict[str, Any], steps: int = 0, price: float | None = None) -> dict[str, Any]:
    """Measure here (the recommended preset's model; an all-reduce when there are several GPUs), then predict."""
    rec = report["recommendations"]
    n = len(report["gpus"])
    steps = steps or (10 if n else 3)
    warmup = 3 if n else 1
    # a d20 model with an empty compile cache was still compiling after 150 s on an H100: say so before the wait
    print(f"[doctor] timing {steps} training steps of the {rec['preset']} preset's model here; the model is compiled "
          f"first, which takes minutes on a GPU when the compile cache is empty", flush=True)
    measured = bench_model(rec["preset"], steps, warmup)
    allreduce = measure_allreduce(n) if n > 1 else None
    if price is None:
        price = PRICE_GPU_HOUR if n else 0.0
    return {"measured": measured, "allreduce": allreduce, "price": price,
            "price_unit": "GPU-hour" if n else "hour",
            "predictions": predict(measured, n, price, allreduce, rec.get("device_batch_size"))}


def _fmt_duration(s: float) -> str:
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h"), (2 * 31557600, 86400, "days")):
        if s < limit:
            return f"{s / div:.0f} {unit}" if unit == "s" else f"{s / div:.1f} {unit}"
    return f"{s / 31557600:.1f} years"


def format_bench(b: dict[str, Any]) -> str:
    m = b["measured"]
    where = m["gpu"] or m["device"]
    lines = ["bench (measured here)",
             f"  depth {m['depth']} model on {where}: {m['steps']} steps x {m['total_batch_size']:,} tokens, "
             f"{m['tok_per_s']:,} tok/s, {m['tok_per_s'] * m['flops_per_token'] / 1e9:,.1f} GFLOP/s"
             + (f", MFU {m['mfu']:.1%}" if m.get("mfu") else "")]
    a = b.get("allreduce")
    if a:
        lines.append(f"  all-reduce across {a['ranks']} GPUs: {a['bytes'] / 2**20:.0f} MB in "
                     f"{a['seconds'] * 1e3:.1f} ms ({a['bytes_per_s'] / 1e9:.1f} GB/s)")
    lines.append(f"predicted on this machine, at ${b['price']:.2f}/{b['price_unit']} (--price)")
    lines.append(f"  {'preset':<7} {'pretrain tokens':>16} {'pretrain':>11} {'pipeline':>11} {'cost':>11}")
    for p in b["predictions"]:
        if "unavailable" in p:
            lines.append(f"  {p['preset']:<7} not with this many GPUs: {p['unavailable']}")
            continue
        note = "" if p["fits"] else "  (does not fit this GPU's memory)"
        lines.append(f"  {p['preset']:<7} {p['pretrain_tokens']:>16,} {_fmt_duration(p['pretrain_seconds']):>11} "
                     f"{_fmt_duration(p['total_seconds']):>11} {'$' + format(p['cost'], ',.2f'):>11}{note}")
    lines.append("  pretrain: the measured FLOP/s times each preset's FLOPs" +
                 (", scaled by the planned MFU per depth" if m["device"].startswith("cuda") else "") +
                 ("; plus one unoverlapped gradient all-reduce per step" if a else "") +
                 f". Pipeline = pretrain + midtrain, SFT and evals: +{REST_MEASURED['tiny']:.0%} for tiny "
                 f"(measured), +{REST_ASSUMED:.0%} for the others (assumed); RL not included")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def format_report(r: dict[str, Any]) -> str:
    v = r["versions"]
    lines = ["picochat doctor",
             f"  python    {v['python']} ({v['python_path']})",
             f"  torch     {v['torch']} from {v['torch_path']}",
             f"  cuda      {v['cuda'] or '-'}   cudnn {v['cudnn'] or '-'}   nccl {v['nccl'] or '-'}   "
             f"triton {v.get('triton') or '-'}"]
    if r["cuda_arch_list"]:
        lines.append(f"  kernels   {' '.join(r['cuda_arch_list'])}")
    if not r["gpus"]:
        lines.append("  gpus      none (CPU only)")
    for g in r["gpus"]:
        kern = {True: "ok", False: "MISSING", None: "?"}[g["torch_has_kernels"]]
        lines.append(f"  gpu {g['index']}     {g['name']}, {g['memory_gb']} GB, {g['sm']} ({g['generation']}), "
                     f"bf16 {'yes' if g['bf16'] else 'no'}, fp8 {'yes' if g['fp8'] else 'no'}, torch kernels {kern}")
    if r.get("driver_cuda") or r["gpus"]:
        lines.append(f"  driver    supports CUDA {r.get('driver_cuda') or '?'}   C compiler {r.get('c_compiler') or 'none'}"
                     f"   Python.h {'yes' if r.get('python_h') else 'no'}")
    if r.get("mps"):
        lines.append("  mps       Apple GPU available (untested with picochat)")
    if r.get("shm_bytes") and len(r["gpus"]) > 1:
        lines.append(f"  /dev/shm  {r['shm_bytes'] / 2**30:.1f} GB")
    lines.append(f"  attention {r['attention_backend']}   compute dtype {r['compute_dtype']}")
    d = r["distributed"]
    uv = d["libuv"]
    lines.append(f"  dist      gloo {'yes' if d.get('gloo') else 'no'}, nccl {'yes' if d.get('nccl') else 'no'}, "
                 f"libuv {'yes' if uv.get('available') else 'no' + (' (' + uv['error'] + ')' if uv.get('error') else '')}")
    disk = r["disk"]
    if "free_gb" in disk:
        lines.append(f"  disk      {disk['free_gb']} GB free of {disk['total_gb']} GB under {disk['picochat_home']}")
    sb = r.get("sandbox") or {}
    if sb:
        lines.append(f"  sandbox   {sb['kind']}: {sb['reason']}")
    rec = r["recommendations"]
    lines.append("recommendations")
    lines.append(f"  preset {rec['preset']}, --nproc-per-node {rec['nproc_per_node']}, "
                 f"--window-pattern {rec['window_pattern']}, fp8 {'on' if rec['fp8'] else 'off'}")
    if rec.get("device_batch_size"):
        lines.append("  device batch size (est.): " +
                     ", ".join(f"{k} {v if v else 'does not fit'}" for k, v in rec["device_batch_size"].items()))
    lines += [f"  - {n}" for n in rec["notes"]]
    if r["warnings"]:
        lines.append("warnings")
        lines += [f"  ! {w}" for w in r["warnings"]]
    if r.get("problems"):
        lines.append("problems: training cannot run here until these are fixed")
        lines += [f"  X {p}" for p in r["problems"]]
    return "\n".join(lines)


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--bench", action="store_true",
                        help="also time a few training steps of the recommended preset's model (and an all-reduce "
                             "across several GPUs) and predict every preset's pipeline time and cost here; the "
                             "model compiles first (minutes on a GPU with an empty compile cache)")
    parser.add_argument("--bench-steps", type=int, default=0, metavar="N",
                        help="timed steps of --bench (default: 10 on GPUs, 3 on a CPU)")
    parser.add_argument("--price", type=float, default=None,
                        help=f"$ per GPU-hour (per hour on a CPU) for --bench's costs (default: {PRICE_GPU_HOUR} "
                             f"with GPUs, 0 without)")


def cli_main(args: argparse.Namespace) -> int:
    from picochat.config import UserError

    if args.bench_steps < 0:
        raise UserError(f"--bench-steps {args.bench_steps}: must be >= 1 (or 0 for the default)")
    if args.price is not None and args.price < 0:
        raise UserError(f"--price {args.price}: must be >= 0 ($ per GPU-hour)")
    r = run()
    if args.bench:
        if r["problems"]:
            r["bench"] = {"skipped": "the problems above stop training here; fix them, then rerun --bench"}
        else:
            # the bench's progress lines go to stderr, so that --json stays one JSON document on stdout
            with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
                try:
                    r["bench"] = run_bench(r, args.bench_steps, args.price)
                except Exception as e:
                    if isinstance(e, UserError):
                        raise
                    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                    r["problems"].append(f"a few training steps of the {r['recommendations']['preset']} model "
                                         f"failed here: {msg}")
                    r["bench"] = {"failed": msg}
    if args.json:
        print(json.dumps(r, indent=2, default=str))
    else:
        print(format_report(r))
        if r.get("bench", {}).get("predictions"):
            print(format_bench(r["bench"]))
        elif r.get("bench"):
            print(f"bench: {r['bench'].get('skipped') or 'failed: ' + r['bench']['failed']}")
    return 1 if r["problems"] else 0
