"""A tiny distributed job for launcher tests: join the process group, all_reduce, write what happened.

    python -m tests.dist_probe OUT_DIR [--sleep S] [--device cpu|cuda]

Each rank writes OUT_DIR/rank<R>.json with its rank, world size, the all_reduce result (sum of rank+1 over all
ranks), whether the TCPStore in use is libuv-backed, and the USE_LIBUV it saw. Uses picochat.runtime, so it
exercises the same init path as the real stages (env:// -> gloo on CPU, NCCL with --device cuda).
"""

import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    sleep = float(argv[argv.index("--sleep") + 1]) if "--sleep" in argv else 0.0
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    import torch
    import torch.distributed as dist

    from picochat.runtime import init_runtime, teardown

    rt = init_runtime(device=device)
    if not dist.is_initialized():  # the runtime skips a one-process group; the probe still wants the env:// store
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")
    t = torch.tensor([float(rt.rank + 1)], device=rt.device)
    dist.all_reduce(t)
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):  # PrefixStore wraps the TCPStore
        store = store.underlying_store
    info = {"rank": rt.rank, "world_size": rt.world_size, "sum": t.item(), "pid": os.getpid(),
            "store": type(store).__name__, "libuv": getattr(store, "libuvBackend", None),
            "use_libuv_env": os.environ.get("USE_LIBUV"), "omp": os.environ.get("OMP_NUM_THREADS"),
            "device": str(rt.device), "backend": dist.get_backend()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rt.rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, out / f"rank{rt.rank}.json")
    time.sleep(sleep)
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
