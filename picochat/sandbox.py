"""Run untrusted Python (model-written HumanEval solutions, the chat python tool) in a separate, limited process.

Layers, outermost first:
- a fresh `python -I` process (isolated mode: no user site, no PYTHON* env) in its own session/process group, with
  a scrubbed environment, its working directory a fresh temp dir that is deleted afterwards;
- stdin/stdout/stderr are files, not pipes (no deadlocks; output size capped by RLIMIT_FSIZE and truncation);
- a wall-clock timeout after which the whole process group is SIGKILLed;
- kernel rlimits set by a guard prelude before any untrusted line runs: address space (memory hogs get MemoryError),
  CPU seconds, file size, open files, no core dumps, and RLIMIT_NPROC=0 (no new processes or threads; the kernel
  ignores it for root, which is why the prelude also blocks the Python routes below);
- the guard prelude denies process creation (fork, exec, spawn, system, subprocess, multiprocessing, ctypes),
  signals to other processes, sockets, and any write, delete, rename or mkdir outside the temp dir.

This is defence in depth for code written by a small model, not a security boundary against an adversary who knows
CPython internals: the Python-level guards can be undone from inside the interpreter. The kernel limits, the
process-group kill and the throwaway directory still hold. Use a container or VM for hostile code.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MAX_OUTPUT_BYTES = 64 * 1024      # kept per stream in the result
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file (or stdout) the code may write


@dataclass
class SandboxResult:
    ok: bool              # exited 0 within the time limit
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    error: str | None     # short reason when not ok: "timeout", "killed by signal 9", last stderr line, ...


# The guard prelude: runs first in the child, then executes the untrusted file as __main__.
# argv: work_dir memory_mb cpu_seconds file_size_limit code_path
_GUARD = r'''
import sys, os, io, _io, builtins, posix, resource, socket, _socket, importlib, importlib.abc

def _setup():
    work = os.path.realpath(sys.argv[1])
    mem_mb, cpu_s, fsize = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    code_path = sys.argv[5]
    allow_reads = len(sys.argv) <= 6 or sys.argv[6] == "1"
    with open(code_path, encoding="utf-8") as f:
        source = f.read()

    def limit(which, value):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
    if mem_mb > 0:
        limit(resource.RLIMIT_AS, mem_mb * 1024 * 1024)
    limit(resource.RLIMIT_CPU, cpu_s)
    limit(resource.RLIMIT_FSIZE, fsize)
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NOFILE, 64)
    limit(resource.RLIMIT_NPROC, 0)

    def deny(what):
        def denied(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is not allowed")
        return denied

    # processes, signals, identity
    for name in ("fork", "forkpty", "vfork", "system", "popen", "execv", "execve", "execl", "execle", "execlp",
                 "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid", "setpgid",
                 "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "chroot", "pidfd_open",
                 "register_at_fork"):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, deny(f"os.{name}"))

    # writes outside the work dir
    def inside(path):
        if isinstance(path, int):
            return True  # an fd the code already holds (only obtainable through the guarded calls)
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return p == work or p.startswith(work + os.sep)

    # without reads, only the work dir and the Python installation itself (imports) can be opened
    import sysconfig
    py_roots = {os.path.realpath(p) for k, p in sysconfig.get_paths().items()
                if k in ("stdlib", "platstdlib", "purelib", "platlib") and p}
    def readable(path):
        if inside(path):
            return True
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(p.startswith(r + os.sep) for r in py_roots)

    real_open = _io.open
    def guarded_open(file, mode="r", *args, **kwargs):
        if not allow_reads and not readable(file):
            raise PermissionError(f"sandbox: reading {file!r} outside the sandbox directory is not allowed")
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing {file!r} outside the sandbox directory is not allowed")
        return real_open(file, mode, *args, **kwargs)
    builtins.open = io.open = _io.open = guarded_open

    real_fileio = _io.FileIO
    class FileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not inside(file):
                raise PermissionError(f"sandbox: writing {file!r} outside the sandbox directory is not allowed")
            super().__init__(file, mode, *args, **kwargs)
    io.FileIO = _io.FileIO = FileIO

    real_os_open = posix.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def guarded_os_open(path, flags, *args, **kwargs):
        if not allow_reads and (kwargs.get("dir_fd") is not None or not readable(path)):
            raise PermissionError(f"sandbox: reading {path!r} outside the sandbox directory is not allowed")
        if (flags & write_flags) and (kwargs.get("dir_fd") is not None or not inside(path)):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
        return real_os_open(path, flags, *args, **kwargs)
    os.open = posix.open = guarded_os_open

    def path_guard(name, nargs):
        real = getattr(posix, name)
        def guarded(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(f"sandbox: os.{name} with dir_fd is not allowed")
            for p in args[:nargs]:
                if not inside(p):
                    raise PermissionError(f"sandbox: os.{name}({p!r}) outside the sandbox directory is not allowed")
            return real(*args, **kwargs)
        return guarded
    for name, nargs in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("rename", 2), ("replace", 2),
                        ("link", 2), ("symlink", 2), ("chmod", 1), ("chown", 1), ("lchown", 1), ("truncate", 1),
                        ("utime", 1), ("mkfifo", 1), ("mknod", 1)):
        if hasattr(posix, name):
            g = path_guard(name, nargs)
            setattr(posix, name, g)
            setattr(os, name, g)

    # network
    class NoSocket:
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network access is not allowed")
    socket.socket = _socket.socket = socket.SocketType = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr"):
        for mod in (socket, _socket):
            if hasattr(mod, name):
                setattr(mod, name, deny(f"socket.{name}"))

    # modules that reach around the guards
    blocked = {"ctypes", "_ctypes", "cffi", "subprocess", "_posixsubprocess", "multiprocessing",
               "_multiprocessing", "resource", "pty", "ssl", "_ssl", "signal", "_signal", "faulthandler"}
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"sandbox: import of {name} is not allowed")
            return None
    for name in list(sys.modules):
        if name.split(".")[0] in blocked:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())
    importlib.reload = deny("importlib.reload")

    os.chdir(work)
    sys.argv = ["main.py"]
    sys.path = [p for p in sys.path if p and os.path.realpath(p) != os.path.dirname(os.path.realpath(__file__))]
    main = type(sys)("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    return compile(source, "main.py", "exec"), main.__dict__

_code, _globals = _setup()
del _setup
exec(_code, _globals)
'''


def _scrubbed_env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _read_capped(path: Path, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256, stdin: str | None = None,
               timeout: float | None = None, max_output_bytes: int = MAX_OUTPUT_BYTES,
               allow_reads: bool = True) -> SandboxResult:
    """Run `code` as a fresh limited Python process in a throwaway directory. Never raises for bad code.

    `timeout` is an alias of `timeout_s`. `memory_mb` <= 0 disables the address-space limit. With
    `allow_reads=False` the code's own open()/os.open() calls cannot read outside its directory either (the chat
    tool); imports still work because the interpreter loads modules through its internal FileIO.
    """
    if timeout is not None:
        timeout_s = timeout
    root = Path(tempfile.mkdtemp(prefix="picochat-sandbox-"))
    proc = None
    try:
        work = root / "work"
        work.mkdir()
        (root / "guard.py").write_text(_GUARD)
        (root / "main.py").write_text(code, encoding="utf-8")
        (root / "stdin").write_text(stdin or "", encoding="utf-8")
        cpu_s = max(1, int(timeout_s) + 1)
        cmd = [sys.executable, "-I", "-B", str(root / "guard.py"), str(work), str(int(memory_mb)), str(cpu_s),
               str(FILE_SIZE_LIMIT), str(root / "main.py"), "1" if allow_reads else "0"]
        timed_out = False
        with open(root / "stdin", "rb") as fin, open(root / "stdout", "wb") as fout, \
                open(root / "stderr", "wb") as ferr:
            try:
                proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=work,
                                        env=_scrubbed_env(str(work)), start_new_session=True, close_fds=True)
            except OSError as e:
                return SandboxResult(False, "", "", None, False, f"could not start python: {e}")
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)
        out, out_cut = _read_capped(root / "stdout", max_output_bytes)
        err, err_cut = _read_capped(root / "stderr", max_output_bytes)
        rc = proc.returncode
        error = None
        if timed_out:
            error = f"timeout after {timeout_s:g} s"
        elif rc is not None and rc < 0:
            sig = -rc
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            error = {"SIGXCPU": "cpu time limit", "SIGXFSZ": "output/file size limit"}.get(name, f"killed by {name}")
        elif rc != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            error = lines[-1][:300] if lines else f"exit code {rc}"
        if out_cut:
            out += "\n[output truncated]"
        if err_cut:
            err += "\n[output truncated]"
        return SandboxResult(ok=(rc == 0 and not timed_out), stdout=out, stderr=err, returncode=rc,
                             timed_out=timed_out, error=error)
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
        shutil.rmtree(root, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it may have left children behind) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


_EXPR_RUNNER = r'''
import ast as _ast
_src = {src!r}
_tree = _ast.parse(_src, mode="exec")
_last = _tree.body.pop() if _tree.body and isinstance(_tree.body[-1], _ast.Expr) else None
exec(compile(_tree, "<tool>", "exec"))
if _last is not None:
    _v = eval(compile(_ast.Expression(_last.value), "<tool>", "eval"))
    if _v is not None:
        print(repr(_v))
'''

_ARITH = re.compile(r"[\d\s.,+\-*/%()]+")


def run_expression(expr: str, timeout_s: float = 2.0, max_chars: int = 500) -> str | None:
    """The chat python tool: run one expression or short snippet; its printed output, else the repr of the last
    expression's value; None on any error, timeout or empty result.

    Thousands separators in plain arithmetic ("1,200 * 3") are dropped, as models write numbers that way.
    """
    expr = expr.strip()
    if not expr or len(expr) > 10_000:
        return None
    if _ARITH.fullmatch(expr):
        expr = expr.replace(",", "")
    result = run_python(_EXPR_RUNNER.format(src=expr), timeout_s=timeout_s, memory_mb=256, allow_reads=False)
    if not result.ok:
        return None
    out = result.stdout.strip()
    return out[:max_chars] if out else None


def _selftest() -> int:  # `python -m picochat.sandbox`: quick manual check
    t = time.time()
    print(run_python("print(sum(range(10)))"), f"{time.time() - t:.3f}s")
    print(run_expression("12/60"), run_expression("'strawberry'.count('r')"))
    return 0


if __name__ == "__main__":
    sys.exit(_selftest())
