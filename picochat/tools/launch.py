"""`picochat launch`: run a stage under torch's elastic launcher (torchrun), on one node or many, libuv or not.

    picochat launch --nproc-per-node 8 pretrain --preset d20
    picochat launch --nproc-per-node auto --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 pretrain ...
    picochat launch --nproc-per-node 2 --module tests.dist_probe OUT.json      # any module, `python -m` style

What it adds over a bare `torchrun`:
- `auto` process count (visible GPUs, 1 on CPU) and a single-node rendezvous on an OS-assigned free port;
- multi-node via the c10d rendezvous (node rank 0 hosts the store; all nodes pass the same endpoint and id);
- worker environment: OMP threads per process, NCCL async error handling, unbuffered output, fault handler;
- torch builds without libuv (custom source builds, some wheels): probed at start. When libuv is missing (or
  `--libuv off` / USE_LIBUV=0), every TCPStore that torchrun or the workers create is forced to the classic
  backend: USE_LIBUV=0 for the env:// store and the static-rendezvous store, `use_libuv=0` in the rendezvous
  config, and `TCPStore(use_libuv=False)` for the c10d rendezvous and agent stores (those ignore the env var in
  recent torch), in the launcher and, through a tiny bootstrap (`python -m picochat.tools.launch _worker ...`), in
  every worker.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from picochat import cli
from picochat.config import UserError
from picochat.tools.doctor import probe_libuv

DEFAULT_RDZV_PORT = 29400
# Modules that bind `TCPStore` by name at import time; re-pointing their names covers every store torchrun makes.
_STORE_MODULES = (
    "torch.distributed.distributed_c10d",
    "torch.distributed.rendezvous",
    "torch.distributed.elastic.utils.distributed",
    "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend",
    "torch.distributed.elastic.rendezvous.dynamic_rendezvous",
    "torch.distributed.elastic.rendezvous.static_tcp_rendezvous",
)
_LIBUV_ARG_INDEX = 8  # TCPStore(host, port, world_size, is_master, timeout, wait_for_workers, multi_tenant, fd, use_libuv)


@dataclass
class LaunchPlan:
    """Everything needed to start torchrun: its options, the worker's arguments, the worker env additions.

    The worker's arguments are handed to torchrun programmatically, never through its argument parser: argparse
    would otherwise read a stage flag such as `--run` as an abbreviation of torchrun's own `--run-path`.
    """

    torchrun_args: list[str]  # launcher options, ending with `-m MODULE`
    script_args: list[str]
    env: dict[str, str]
    libuv: bool
    nproc_per_node: int
    nnodes: str
    notes: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return self.torchrun_args + self.script_args

    def command_line(self) -> str:
        """A shell line with the same effect (`--` keeps torchrun's parser away from the worker's flags)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (f"{env} {sys.executable} -m torch.distributed.run {shlex.join(self.torchrun_args)} -- "
                f"{shlex.join(self.script_args)}").strip()


# ----------------------------------------------------------------------------------------------------------------
# libuv


def libuv_available() -> tuple[bool, str]:
    """(available, why) from a real TCPStore probe (see doctor.probe_libuv)."""
    p = probe_libuv()
    return bool(p.get("available")), p.get("error") or "libuv TCPStore works"


def _store_accepts_use_libuv(store_cls: Any) -> bool:
    # look through the MRO: a wrapping subclass (ours, a shim) has no pybind signature in its docstring
    return any("use_libuv" in (getattr(c.__dict__.get("__init__"), "__doc__", None) or "")
               for c in getattr(store_cls, "__mro__", (store_cls,)))


@contextlib.contextmanager
def no_libuv_stores() -> Iterator[None]:
    """Within the block, every `TCPStore(...)` made by torch.distributed uses the classic (non-libuv) backend.

    torch creates stores in several places and only some of them read USE_LIBUV; a subclass that pins
    use_libuv=False, installed under every module-level name that refers to TCPStore, covers them all.
    """
    os.environ["USE_LIBUV"] = "0"
    import torch.distributed as dist

    for name in _STORE_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # a module that does not exist in this torch version binds nothing to patch
            pass
    base = dist.TCPStore
    if not _store_accepts_use_libuv(base):  # torch < 2.2 has no libuv backend at all: nothing to do
        yield
        return

    class TCPStoreNoLibuv(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if len(args) > _LIBUV_ARG_INDEX:
                args = args[:_LIBUV_ARG_INDEX] + (False,) + args[_LIBUV_ARG_INDEX + 1:]
            else:
                kwargs["use_libuv"] = False
            super().__init__(*args, **kwargs)

    patched = []
    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "") or ""
        if (name.startswith("torch.distributed") or name == "torch._C._distributed_c10d") and \
                getattr(mod, "TCPStore", None) is base:
            setattr(mod, "TCPStore", TCPStoreNoLibuv)
            patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            setattr(mod, "TCPStore", base)


# ----------------------------------------------------------------------------------------------------------------
# Planning (pure: tested without starting anything)


def resolve_nproc(value: str) -> int:
    """'auto' -> visible CUDA GPUs (CUDA_VISIBLE_DEVICES respected), or 1 without CUDA; else a positive int."""
    if value == "auto":
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--nproc-per-node {value!r}: use a positive number of processes or 'auto'")
    return n


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])  # the folder that holds the picochat package


def worker_env(base: dict[str, str], nproc: int, use_cuda: bool, libuv: bool) -> dict[str, str]:
    """The variables `picochat launch` adds for the workers (only those not already set, except USE_LIBUV)."""
    add: dict[str, str] = {}

    def default(k: str, v: str) -> None:
        if k not in base:
            add[k] = v

    # One OpenMP thread per GPU process (the GPU does the work; more threads only contend). On CPU the cores are
    # the work, so they are split between the processes instead.
    default("OMP_NUM_THREADS", "1" if use_cuda else str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    default("PYTHONUNBUFFERED", "1")        # logs are streamed through pipes (Modal, SLURM): no block buffering
    default("PYTHONFAULTHANDLER", "1")      # a hung or crashed rank prints its Python stack
    default("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a failed collective aborts the job instead of hanging it
    default("PICOCHAT_DIST_TIMEOUT", "1800")  # process-group timeout: rank-0-only work (eval, saves) fits in it
    if not libuv:
        add["USE_LIBUV"] = "0"
    root = _package_root()
    paths = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:  # workers import the same picochat as the launcher, whatever their cwd
        add["PYTHONPATH"] = os.pathsep.join(paths + [root])
    return add


def _launch_target(args: argparse.Namespace) -> list[str]:
    """The workers' `python -m` command, [module, *args]: --module as given, else `picochat <stage> ...`."""
    rest = list(args.stage_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.module:
        return [args.module] + rest
    if not rest:
        raise UserError("picochat launch: name the stage to run, e.g. `picochat launch --nproc-per-node 8 "
                        "pretrain --preset d20` (or --module pkg.mod for any module)")
    stage = rest[0]
    if stage not in cli.COMMANDS:
        raise UserError(f"picochat launch {stage}: unknown command; one of {', '.join(cli.COMMANDS)}")
    if stage in ("launch", "speedrun"):
        raise UserError(f"picochat launch {stage}: {stage} starts `picochat launch` for its own stages; "
                        f"run `picochat {stage} ...` directly")
    return ["picochat"] + rest


def _max_nodes(nnodes: str) -> int:
    """The largest node count of --nnodes N or MIN:MAX; UserError unless every count is >= 1."""
    try:
        max_nodes = int(nnodes.split(":")[-1])
        if max_nodes < 1 or (":" in nnodes and int(nnodes.split(":")[0]) < 1):
            raise ValueError
    except ValueError:
        raise UserError(f"--nnodes {nnodes!r}: use a number of nodes (2) or an elastic range (1:4)") from None
    return max_nodes


def _resolve_libuv(choice: str, env: dict[str, str]) -> tuple[bool, list[str]]:
    """(use libuv, notes for the user) for --libuv on/off/auto."""
    # libuv: "auto" trusts an explicit USE_LIBUV=0 from the user, else probes the real TCPStore
    if choice == "on":
        return True, []
    if choice == "off" or env.get("USE_LIBUV") == "0":
        return False, []
    libuv, why = libuv_available()
    if not libuv:
        return False, [f"this torch has no libuv TCPStore ({why}); using the classic store everywhere"]
    return True, []


def _static_rdzv_args(args: argparse.Namespace, max_nodes: int) -> list[str]:
    """torchrun options of the static rendezvous: a fixed node rank and the node-rank-0 host as master."""
    if not args.master_addr and not args.rdzv_endpoint and max_nodes > 1:
        raise UserError("--rdzv-backend static with several nodes needs --master-addr (the node-rank-0 host)")
    host, port = _split_endpoint(args.rdzv_endpoint or f"{args.master_addr or '127.0.0.1'}:"
                                 f"{args.master_port or DEFAULT_RDZV_PORT}", "--rdzv-endpoint")
    node_rank = 0 if args.node_rank is None else args.node_rank
    return ["--rdzv-backend=static", f"--node-rank={node_rank}", f"--master-addr={host}", f"--master-port={port}"]


def _c10d_rdzv_args(args: argparse.Namespace, nnodes: str, max_nodes: int, env: dict[str, str]
                    ) -> tuple[list[str], dict[str, str]]:
    """(torchrun options, rendezvous config) of the c10d rendezvous: the shared endpoint, or a private one."""
    conf: dict[str, str] = {}
    if max_nodes > 1 or args.rdzv_endpoint:
        if not args.rdzv_endpoint:
            raise UserError(f"--nnodes {nnodes}: multi-node needs --rdzv-endpoint HOST:PORT (the same on every "
                            f"node, usually the first node's address, e.g. node0:{DEFAULT_RDZV_PORT})")
        host, port = _split_endpoint(args.rdzv_endpoint, "--rdzv-endpoint")
        endpoint = f"{host}:{port}"
        if args.node_rank is not None:  # the node-rank-0 agent hosts the rendezvous store, the others join
            conf["is_host"] = "1" if args.node_rank == 0 else "0"
        rdzv_id = args.rdzv_id or env.get("SLURM_JOB_ID") or "picochat"
    else:
        # One node: a private rendezvous on 127.0.0.1. Port 0 lets the OS pick a free port atomically (no
        # race with other jobs on the box); --master-port pins one.
        endpoint = f"127.0.0.1:{args.master_port or 0}"
        conf["is_host"] = "1"
        rdzv_id = args.rdzv_id or f"picochat-{uuid.uuid4().hex[:8]}"
    return ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}"], conf


def _rdzv_args(args: argparse.Namespace, nnodes: str, max_nodes: int, env: dict[str, str], libuv: bool
               ) -> list[str]:
    """torchrun's rendezvous options for --rdzv-backend, with the classic store pinned when libuv is off."""
    if args.rdzv_backend == "static":
        ta, conf = _static_rdzv_args(args, max_nodes), {}
    else:
        ta, conf = _c10d_rdzv_args(args, nnodes, max_nodes, env)
    if not libuv:
        conf["use_libuv"] = "0"  # older torch reads it in the c10d rendezvous backend
    if conf and args.rdzv_backend != "static":
        ta.append("--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in conf.items()))
    return ta


def _worker_command(target: list[str], libuv: bool) -> tuple[list[str], list[str]]:
    """(torchrun's `-m MODULE`, the worker's arguments) for the target command."""
    # Workers: `python -m picochat <stage> ...`, or through the no-libuv bootstrap when libuv is off.
    module, *module_args = target
    if libuv:
        return ["-m", module], module_args
    return ["-m", "picochat.tools.launch"], ["_worker", module] + module_args


def plan_launch(args: argparse.Namespace, env: dict[str, str] | None = None) -> LaunchPlan:
    """Turn parsed `picochat launch` arguments into torchrun arguments + worker env, validating them."""
    env = dict(os.environ if env is None else env)
    target = _launch_target(args)
    nproc = resolve_nproc(str(args.nproc_per_node))
    nnodes = str(args.nnodes)
    max_nodes = _max_nodes(nnodes)
    libuv, notes = _resolve_libuv(args.libuv, env)

    ta = [f"--nproc-per-node={nproc}", f"--nnodes={nnodes}", f"--max-restarts={args.max_restarts}"]
    ta += _rdzv_args(args, nnodes, max_nodes, env, libuv)
    if args.log_dir:
        ta.append(f"--log-dir={args.log_dir}")
    module_opts, script_args = _worker_command(target, libuv)
    ta += module_opts
    import torch

    use_cuda = torch.cuda.is_available() and env.get("PICOCHAT_DEVICE", "cuda") != "cpu"
    return LaunchPlan(torchrun_args=ta, script_args=script_args, env=worker_env(env, nproc, use_cuda, libuv), libuv=libuv,
                      nproc_per_node=nproc, nnodes=nnodes, notes=notes)


def _split_endpoint(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(DEFAULT_RDZV_PORT)
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"{flag} {value!r}: expected HOST:PORT, e.g. node0:{DEFAULT_RDZV_PORT}")
    return host, int(port)


# ----------------------------------------------------------------------------------------------------------------
# Running


def execute(plan: LaunchPlan) -> int:
    """Run torchrun in this process (its agent forwards SIGTERM/SIGINT to the workers). Returns an exit code."""
    os.environ.update(plan.env)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    config = parse_args(plan.torchrun_args)
    config.training_script_args = list(plan.script_args)
    ctx = contextlib.nullcontext() if plan.libuv else no_libuv_stores()
    try:
        with ctx:
            run(config)
    except SignalException as e:  # the agent has already stopped the workers (they checkpoint on SIGTERM)
        signum = int(getattr(e, "sigval", 15))
        print(f"[launch] stopped by signal {signum}; workers were asked to checkpoint and exit", file=sys.stderr,
              flush=True)
        return 128 + signum
    except ChildFailedError as e:
        print(f"[launch] a worker failed:\n{e.format_msg()}", file=sys.stderr, flush=True)
        return 1
    return 0


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # a stage flag (`--log`) must never be taken for a prefix of ours (`--log-dir`)
    parser.add_argument("--nproc-per-node", "-n", default="auto",
                        help="processes (GPUs) per node, or 'auto' = all visible GPUs, 1 on CPU (default: auto)")
    parser.add_argument("--nnodes", default="1", help="number of nodes, or MIN:MAX for elastic (default: 1)")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="this node's rank (0 hosts the rendezvous; e.g. $SLURM_NODEID, $SKYPILOT_NODE_RANK)")
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node; same on "
                        f"every node; default port {DEFAULT_RDZV_PORT})")
    parser.add_argument("--rdzv-id", default=None, help="job id shared by all nodes (default: $SLURM_JOB_ID or 'picochat')")
    parser.add_argument("--rdzv-backend", choices=["c10d", "static"], default="c10d",
                        help="c10d (elastic, default) or static (fixed --node-rank, --master-addr/--master-port)")
    parser.add_argument("--master-addr", default=None, help="static rendezvous: the node-rank-0 host")
    parser.add_argument("--master-port", type=int, default=None,
                        help="single node: pin the rendezvous port (default: a free one); static: its port")
    parser.add_argument("--max-restarts", type=int, default=0, help="restart all workers this many times on a "
                        "failure (stages resume from their last checkpoint)")
    parser.add_argument("--libuv", choices=["auto", "on", "off"], default="auto",
                        help="TCPStore backend: auto = probe this torch (default), off = classic store everywhere")
    parser.add_argument("--log-dir", default=None, help="torchrun's per-worker log directory")
    parser.add_argument("--module", "-m", default=None, help="run `python -m MODULE args` instead of a picochat stage")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, metavar="STAGE ...", help="the stage and its arguments")


def parse_launch_args(argv: list[str]) -> argparse.Namespace:
    """Parse `picochat launch` arguments (without the leading 'launch'); used by tests of the templates."""
    p = argparse.ArgumentParser(prog="picochat launch", allow_abbrev=False)
    add_cli(p)
    return p.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """The launcher's numeric and path flags, one ConfigError line each (the stage checks its own flags)."""
    from picochat.config import require, require_dir

    require(args.master_port is None or 1 <= args.master_port <= 65535,
            f"--master-port {args.master_port}: must be a TCP port in 1..65535")
    require(args.node_rank is None or args.node_rank >= 0, f"--node-rank {args.node_rank}: must be >= 0")
    require(args.max_restarts >= 0, f"--max-restarts {args.max_restarts}: must be >= 0")
    if args.log_dir:
        require_dir(args.log_dir, "--log-dir", "pass a folder for the worker logs (created if missing)",
                    must_exist=False)


def cli_main(args: argparse.Namespace) -> int:
    validate_args(args)
    plan = plan_launch(args)
    for n in plan.notes:
        print(f"[launch] {n}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(plan.command_line())
        return 0
    print(f"[launch] {plan.nproc_per_node} process(es) x {plan.nnodes} node(s), libuv "
          f"{'on' if plan.libuv else 'off'}: torchrun {shlex.join(plan.argv)}", file=sys.stderr, flush=True)
    return execute(plan)


# ----------------------------------------------------------------------------------------------------------------
# Worker bootstrap: `python -m picochat.tools.launch _worker MODULE args...` = `python -m MODULE args...` with the
# classic TCPStore pinned (the env:// store and the agent-store clients are created inside the worker).


def _worker_main(argv: list[str]) -> None:
    import runpy

    if not argv:
        raise SystemExit("usage: python -m picochat.tools.launch _worker MODULE [ARGS...]")
    module, *rest = argv
    sys.argv = [module] + rest
    with no_libuv_stores():
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        _worker_main(sys.argv[2:])
    else:
        sys.exit(cli.main(["launch"] + sys.argv[1:]))
