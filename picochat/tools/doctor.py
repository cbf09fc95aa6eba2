"""`picochat doctor`: what this machine is, what picochat will do on it, and what to change.

Probes (each one guarded, so a broken piece of the stack shows up as a finding instead of a traceback):
- torch: version, where it was imported from (custom builds live outside site-packages), CUDA/cuDNN/NCCL versions;
- GPUs: name, memory, compute capability (sm_XY), bf16/fp8 support, and whether the installed torch ships kernels
  for that architecture (`torch.cuda.get_arch_list()`; e.g. an sm_120 card with a torch built without sm_120);
- attention: the backend the attention shim will use on this device;
- torch.distributed: gloo/NCCL, and whether TCPStore has libuv (a real probe: libuv-less builds raise on it);
- disk: free space under PICOCHAT_HOME.
Then recommendations: preset, `--nproc-per-node`, device batch size per depth, window pattern, fp8.

`run() -> dict` is the API for other modules; the CLI prints it as text or `--json`. It runs in about a second on
a CPU-only box (importing torch is most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import sys
import sysconfig
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
               cpu_count: int) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    notes: list[str] = []
    n = len(gpus)
    if n == 0:
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


def run() -> dict[str, Any]:
    """Probe everything; return a JSON-able report with `warnings` and `recommendations`."""
    import torch

    warnings: list[str] = []
    report: dict[str, Any] = {"versions": _versions(torch)}
    w = torch_path_warning(report["versions"]["torch_path"])
    if w:
        warnings.append(w)
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
    warnings += gw
    report["gpus"] = gpus
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
                                           dist_info["libuv"], os.cpu_count() or 1)
    report["warnings"] = warnings
    return report


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
    return "\n".join(lines)


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cli_main(args: argparse.Namespace) -> int:
    r = run()
    if args.json:
        print(json.dumps(r, indent=2, default=str))
    else:
        print(format_report(r))
    return 0
