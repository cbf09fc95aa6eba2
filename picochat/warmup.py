"""Start-up cost: a compile cache that outlives the process, regional compilation, and saying what warm-up does.

torch.compile's first step is most of a restart (README "Start-up"): Dynamo traces the model, Inductor lowers it and
Triton builds every kernel. Three things cut or explain it:

- `use_compile_cache`: Inductor's caches (FX graphs, AOTAutograd, autotuning) and Triton's kernels go under
  `PICOCHAT_HOME/cache/compile/<key>`, not a per-user folder in /tmp that a new machine never has, so a restart
  with a persistent PICOCHAT_HOME starts warm. (The Modal launcher already points TORCHINDUCTOR_CACHE_DIR at a
  keyed folder on its volume; a folder set like that is respected.) The key names torch, Triton, CUDA, the GPU and
  Python, so an upgrade or another GPU starts a fresh folder instead of loading stale artifacts. It also lets
  AOTAutograd's cache keep the training graph, which holds torch.autograd.Functions (`cache_autograd_functions`).
- `compile_blocks` (PICOCHAT_COMPILE_SCOPE=blocks): compile one transformer block and reuse it for every layer
  (Dynamo reuses a graph across module instances when parameters are graph inputs), plus the head, instead of one
  graph of the whole model whose size grows with depth.
- `load_artifacts` / `save_artifacts`: after its first step a process that loaded none saves what it compiled
  (torch.compiler's cache artifacts) into the run's folder, keyed like the cache; a later process of the run loads
  them before compiling, unless the compile cache in use already holds them (a marker). A resume on a new machine
  whose run folder came along (a volume, a synced bucket) but whose PICOCHAT_HOME cache did not starts warm.
- `CompileWatch`: counts compiled graphs and their seconds through Dynamo's compile callbacks, and Inductor's cache
  hits, misses and bypasses from torch's counters; names them in the heartbeat ("compiling graph 3 (compile cache
  warm: 2 hits, 0 misses)") and gives the start-up breakdown printed after the first step. A warm folder says only
  that files exist: the hits say whether they served this run (a d12 resume on an H100 missed: its first batch
  had other strides than the cold run's, docs/LOG.md).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from picochat import PROCESS_T0
from picochat.files import atomic_write_bytes
from picochat.runtime import is_rank0, picochat_home, print0

CACHE_ENV = "PICOCHAT_COMPILE_CACHE"   # "off": leave torch's own cache folders alone
SCOPE_ENV = "PICOCHAT_COMPILE_SCOPE"   # "model" (default) | "blocks"


# ----------------------------------------------------------------------------------------------------------------
# The compile cache under PICOCHAT_HOME


def compile_cache_key(device: torch.device) -> str:
    """One folder name per software and hardware combination whose compiled artifacts can be shared.

    Inductor's own keys already hash the graph, its config and the torch version, but Triton kernels built for one GPU
    architecture (or one CUDA) fail or mislead on another, and folders of dead versions should be easy to delete."""
    parts = [f"torch{torch.__version__.split('+')[0]}"]
    try:
        import triton
        parts.append(f"triton{triton.__version__}")
    except ImportError:
        pass
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        parts += [f"cuda{torch.version.cuda}", f"sm{major}{minor}", torch.cuda.get_device_name(device)]
    else:
        parts.append(device.type)
    parts.append("py" + ".".join(platform.python_version_tuple()[:2]))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def cache_entries(folder: Path) -> int:
    """Files under the cache folder (0 when absent): the 'warm' or 'cold' of the messages."""
    if not folder.is_dir():
        return 0
    return sum(len(files) for _, _, files in os.walk(folder))


def use_compile_cache(device: torch.device, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Point Inductor and Triton at `PICOCHAT_HOME/cache/compile/<key>` (before the first compile) and describe it.

    A TORCHINDUCTOR_CACHE_DIR set by the user wins, as does PICOCHAT_COMPILE_CACHE=off. Returns {"dir", "state"
    ("warm" | "cold" | "user" | "off"), "entries"}."""
    env = os.environ if env is None else env
    if env.get(CACHE_ENV, "").lower() in ("off", "0", "no"):
        return {"dir": None, "state": "off", "entries": 0}
    cache_autograd_functions(env)
    folder = picochat_home() / "cache" / "compile" / compile_cache_key(device)
    user = env.get("TORCHINDUCTOR_CACHE_DIR")
    if user and Path(user) != folder:  # set outside picochat (a second stage in this process set it to `folder`)
        return {"dir": user, "state": "user", "entries": cache_entries(Path(user))}
    n = cache_entries(folder)
    folder.mkdir(parents=True, exist_ok=True)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    env.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return {"dir": str(folder), "state": "warm" if n else "cold", "entries": n}


AUTOGRAD_FN_ENV = "TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD"  # torch's own switch; set, it wins


def cache_autograd_functions(env: Mapping[str, str]) -> bool:
    """Let AOTAutograd's cache keep graphs that hold a torch.autograd.Function. Returns whether it is on.

    The training graph holds two (the fused loss, the fp8 matmul), and by default AOTAutograd bypasses its cache for
    such a graph: a warm start then hits Inductor's cache for the compiled kernels but re-traces and re-partitions
    forward + backward first. On the CPU machine (tiny preset, whole-model compile) that kept the training graph's
    warm compile at 6.6 s; cached, 2.9 s (on an H100, a d12 resume whose training graph hit both caches compiled it
    in 7.1 s, 39.6 s cold). torch leaves it off because code a Function runs outside what Dynamo traces would not be
    in the key; Dynamo traces both of ours whole (forward and backward become subgraphs of the keyed graph), and a
    code change that alters them changes the key."""
    from torch._functorch import config as functorch_config

    if not hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
        return False
    if env.get(AUTOGRAD_FN_ENV) is None:
        functorch_config.autograd_cache_allow_custom_autograd_functions = True
    return bool(functorch_config.autograd_cache_allow_custom_autograd_functions)


def describe_cache(cache: dict[str, Any]) -> str:
    if cache["state"] == "off":
        return f"compile cache: torch's default folders ({CACHE_ENV}=off)"
    how = {"warm": f"warm, {cache['entries']} files", "cold": "cold, empty",
           "user": f"TORCHINDUCTOR_CACHE_DIR, {cache['entries']} files"}[cache["state"]]
    return f"compile cache: {cache['dir']} ({how})"


# ----------------------------------------------------------------------------------------------------------------
# Compile artifacts kept with the run


def artifacts_file(folder: str | Path, device: torch.device) -> Path:
    return Path(folder) / "compile" / f"{compile_cache_key(device)}.bin"


def _count(info: Any) -> int:
    return sum(len(v) for v in getattr(info, "artifacts", {}).values())


def load_artifacts(folder: str | Path, device: torch.device) -> dict[str, Any]:
    """Before the first compile: hand the artifacts an earlier process of this run saved (same key) to torch's
    caches. A damaged or foreign file costs a warning and a cold compile, never the run. {"folder", "file",
    "loaded" (artifacts handed over), "in_cache" (skipped: the cache in use already holds this very file's)}."""
    path = artifacts_file(folder, device)
    out = {"folder": str(folder), "file": str(path), "loaded": 0, "in_cache": False}
    if not path.is_file() or not hasattr(torch.compiler, "load_cache_artifacts"):
        return out
    mark = _marker(path)
    if mark is not None and mark.is_file() and mark.read_text() == _stamp(path):
        out["in_cache"] = True  # written or loaded into this cache before: loading again costs seconds for nothing
        return out
    try:
        out["loaded"] = _count(torch.compiler.load_cache_artifacts(path.read_bytes()))
    except Exception as e:
        print0(f"[compile] ignoring the saved compile artifacts {path} ({type(e).__name__}: {e}); compiling anew")
        return out
    _write_marker(path)
    return out


def _marker(path: Path) -> Path | None:
    """Where the compile cache in use notes that it holds the artifacts of file `path` (None: no cache folder set).
    Why: loading a d12 run's 127 artifacts (74 MB) into a cache that already held them took 7.0 s of a warm
    resume's start (H100, docs/LOG.md)."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not folder:
        return None
    return Path(folder) / "picochat-artifacts" / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _write_marker(path: Path) -> None:
    mark = _marker(path)
    if mark is None:
        return
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(mark, _stamp(path).encode())
    except OSError:  # only a shortcut for the next start: without it that start loads the file again
        pass


def save_artifacts(folder: str | Path, device: torch.device) -> dict[str, Any] | None:
    """What this process compiled so far, as one file in the run's folder (written atomically; rank 0 only).
    None when there is nothing to save or this torch cannot."""
    if not is_rank0() or not hasattr(torch.compiler, "save_cache_artifacts"):
        return None
    try:
        got = torch.compiler.save_cache_artifacts()
        if got is None:
            return None
        data, info = got
        path = artifacts_file(folder, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        _write_marker(path)
    except Exception as e:  # a full disk or a torch quirk must not stop training: the next start compiles anew
        print0(f"[compile] could not save the compile artifacts ({type(e).__name__}: {e}); training goes on")
        return None
    return {"file": str(path), "bytes": len(data), "artifacts": _count(info)}


# ----------------------------------------------------------------------------------------------------------------
# Regional compilation


def compile_scope(env: dict[str, str] | None = None) -> str:
    scope = (os.environ if env is None else env).get(SCOPE_ENV, "model") or "model"
    if scope not in ("model", "blocks"):
        from picochat.config import UserError
        raise UserError(f"{SCOPE_ENV}={scope!r}: must be 'model' (one graph of the whole model) or 'blocks' "
                        f"(one graph per distinct block, reused across layers)")
    return scope


def compile_blocks(model: torch.nn.Module, **compile_kw: Any) -> torch.nn.Module:
    """Compile every block in place (`Module.compile`: same parameters, same state_dict keys) and the loss head;
    embeddings, smear and backout stay eager. Blocks differ only in window size and value embeddings, so Dynamo
    compiles a few graphs, not one per layer. Returns the model itself: the module to call for training."""
    for key in ("recompile_limit", "cache_size_limit"):  # one graph per distinct block kind, more than 8 at depth
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
    for block in model.blocks:
        block.compile(dynamic=False, **compile_kw)
    model.head = torch.compile(model.head, dynamic=False, **compile_kw)
    return model


# ----------------------------------------------------------------------------------------------------------------
# What warm-up is doing


# torch's counters (torch._dynamo.utils.counters) of Inductor's FX graph cache and AOTAutograd's cache, per outcome
_CACHE_COUNTERS = {"hits": (("inductor", "fxgraph_cache_hit"),), "misses": (("inductor", "fxgraph_cache_miss"),),
                   "bypassed": (("inductor", "fxgraph_cache_bypass"), ("aot_autograd", "autograd_cache_bypass"))}


def cache_counts() -> dict[str, int]:
    """Inductor's compiled-graph cache outcomes so far in this process ({} where torch has no such counters): a
    graph whose compiled code was loaded (hits), compiled anew (misses), or could not be cached at all
    (bypassed)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {k: sum(counters[group][name] for group, name in keys) for k, keys in _CACHE_COUNTERS.items()}


class CompileWatch:
    """Count Dynamo compilations and their wall time while the block runs, and the compile cache's hits, misses and
    bypasses among them; keep a heartbeat's text current.

    Dynamo's start/end callbacks (torch._dynamo.callback) fire around every graph it compiles, including the
    backward and optimizer graphs compiled lazily. Where this torch has no such hook, the watch only times."""

    def __init__(self, cache: dict[str, Any] | None = None, heartbeat: Any = None, compiled: bool = True):
        self.cache, self.heartbeat, self.compiled = cache or {"state": "off"}, heartbeat, compiled
        self.graphs, self.compile_s, self._t = 0, 0.0, 0.0
        self._handler = None
        self._base: dict[str, int] | None = None  # the counters when the watch began

    def counts(self) -> dict[str, int]:
        """The cache outcomes since the watch began ({} before it began, or where torch has no counters)."""
        if self._base is None:
            return {}
        return {k: v - self._base.get(k, 0) for k, v in cache_counts().items()}

    def _start(self, *args: Any) -> None:
        self.graphs += 1
        self._t = time.perf_counter()
        if self.heartbeat is not None:  # the next heartbeat line says it; no extra line now
            c = self.counts()
            so_far = f": {c['hits']} hits, {c['misses']} misses so far" if c and self.graphs > 1 else ""
            self.heartbeat.what = f"compiling graph {self.graphs} (compile cache {self.cache['state']}{so_far})"

    def _end(self, *args: Any) -> None:
        self.compile_s += time.perf_counter() - self._t

    def __enter__(self) -> "CompileWatch":
        if not self.compiled:  # an eager stage: importing Dynamo to watch it cost an eager SFT start seconds
            return self
        self._base = cache_counts()
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:
            return self
        self._handler = callback_handler
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handler is not None:
            self._handler.remove_start_callback(self._start)
            self._handler.remove_end_callback(self._end)


def startup_breakdown(marks: dict[str, float], watch: CompileWatch | None, first_step_s: float,
                      now: float | None = None, parts: dict[str, float] | None = None) -> dict[str, Any]:
    """Seconds from process start to the end of the first step (`now`; default: the 'loop' mark + the step), by
    phase. `marks` holds time.time() stamps: 'setup' (imports and runtime done), 'model' (model built or loaded,
    and prepared in pretraining), optionally 'built' (pretraining: plan made and model built, before it is
    prepared) and 'loop' (optimizer, data, resume and run header done; chat stages prepare the model here). `parts`:
    prepare_model's own seconds by part. "before_s" is the rest up to the first step (an eval before it, say), so
    the parts add up to the total."""
    t_end = marks["loop"] + first_step_s if now is None else now
    out: dict[str, Any] = {"start_s": marks["setup"] - PROCESS_T0, "model_s": marks["model"] - marks["setup"],
                           "setup_s": marks["loop"] - marks["model"], "before_s": t_end - first_step_s - marks["loop"],
                           "first_step_s": first_step_s, "total_s": t_end - PROCESS_T0}
    split = ({"plan + build": marks["built"] - marks["setup"]} if "built" in marks else {}) | (parts or {})
    if split:
        out["model_parts"] = {k: round(v, 2) for k, v in split.items()}
    if watch is not None:
        out.update(graphs=watch.graphs, compile_s=watch.compile_s, cache=watch.cache["state"])
        if watch.graphs:
            out.update({f"cache_{k}": v for k, v in watch.counts().items()})
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def format_breakdown(b: dict[str, Any]) -> str:
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in b.get("model_parts", {}).items() if v >= 0.05)
    text = (f"[startup] first step done {b['total_s']:.1f}s after start: imports/runtime {b['start_s']:.1f}s, "
            f"model {b['model_s']:.1f}s{f' ({parts})' if parts else ''}, optimizer/data/resume {b['setup_s']:.1f}s, "
            + (f"before the first step {b['before_s']:.1f}s, " if b.get("before_s", 0) >= 0.05 else "")
            + f"first step {b['first_step_s']:.1f}s")
    if b.get("graphs"):
        text += f" (of which Dynamo+Inductor compiled {b['graphs']} graphs in {b['compile_s']:.1f}s, cache {b['cache']}"
        if "cache_hits" in b:
            text += f": {b['cache_hits']} hits, {b['cache_misses']} misses, {b['cache_bypassed']} bypassed"
        text += ")"
    return text


def report_startup(info: dict[str, Any], watch: CompileWatch, step: int, first_step_s: float, metrics: Any,
                   now: float | None = None) -> dict[str, Any]:
    """After a process's first step: the breakdown (`info` is prepare_model's, with "marks"), printed on rank 0 and
    logged as a `startup` record at `step`. The compile figures only where the model was compiled; the compile
    artifacts are saved where none were loaded (save_artifacts)."""
    # prepare_model's parts belong to the model phase where it ran there (pretraining marks 'built' before it);
    # chat stages prepare the model in their setup phase
    parts = info.get("prepare_s") if "built" in info["marks"] else None
    b = startup_breakdown(info["marks"], watch if info["compiled"] else None, first_step_s, now, parts)
    print0(format_breakdown(b))
    art = info.get("artifacts")
    # a start that loaded the run's artifacts compiled from them: writing the same file again on every resume would
    # only add seconds of serialization and I/O to each start
    if info["compiled"] and art is not None and not art["loaded"] and not art.get("in_cache"):
        saved = save_artifacts(art["folder"], info["device"])
        if saved is not None:
            b["artifacts_saved"] = saved["artifacts"]
            print0(f"[compile] saved {saved['artifacts']} compile artifacts ({saved['bytes'] / 2**20:.1f} MB) to "
                   f"{saved['file']}: a later start of this run loads them")
    metrics.log({"step": step, "startup": b})
    return b
