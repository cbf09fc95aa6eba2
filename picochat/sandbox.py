"""Run untrusted Python (model-written HumanEval solutions, the chat python tool) inside an OS sandbox.

The boundary is the kernel, through bubblewrap (`bwrap`, the sandbox under Flatpak), not Python-level patches: a
guard written in Python can be undone from inside the interpreter it guards, so the program gets a full, unpatched
Python and a world that holds nothing worth reaching:

- file system: `/usr` (and the `/bin`, `/lib*` links into it), the base Python installation (prefix,
  site-packages; never a venv) at the same paths, all read-only; a one-user `/etc/passwd`; a fresh, size-capped tmpfs at `/tmp`
  (its cwd and HOME) and at `/dev/shm`; a minimal `/dev`; everything else read-only and empty. No home directory,
  no repository, no `PICOCHAT_HOME`, no host `/etc`, no host `/tmp`.
- namespaces: user (uid/gid 65534, every capability dropped, no nested user namespaces), pid (own `/proc`; the
  parent is bwrap's init, which ignores signals from inside), network (only an unconnected loopback), ipc, uts,
  cgroup. A new session (no TIOCSTI into the caller's terminal).
- environment: cleared, then PATH/HOME/TMPDIR/LANG only; bwrap itself also starts with a scrubbed environment,
  since its init's `/proc/1/environ` is readable from inside.
- lifetime: `--die-with-parent` plus the pid namespace: killing bwrap kills its init, and the kernel then kills
  every process of the namespace, daemonised or not.
- system calls: a seccomp filter denies ptrace, cross-process memory access, keyrings, eBPF, perf, userfaultfd,
  io_uring, mount/namespace calls, modules, kexec, reboot (x86-64 and arm64).
- resources: rlimits set before the program's first line (address space, CPU seconds, file size, open files, no
  core dumps); processes and threads by a pids cgroup when one is writable (root) and RLIMIT_NPROC otherwise;
  output truncated; a wall-clock timeout.

Where no OS sandbox works (bwrap missing, user namespaces forbidden, macOS), `run_python` refuses with a one-line
reason, unless the machine is declared trusted with PICOCHAT_SANDBOX=none-trusted: then the program runs as a plain
rlimited subprocess, with a loud warning. `sandbox_status()` says which of these applies.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MAX_OUTPUT_BYTES = 64 * 1024          # kept per stream in the result
FILE_SIZE_LIMIT = 16 * 1024 * 1024    # RLIMIT_FSIZE: largest file (or stdout) the code may write
TMP_SIZE_LIMIT = 64 * 1024 * 1024     # the sandbox's /tmp tmpfs (RAM-backed), all files together
SHM_SIZE_LIMIT = 16 * 1024 * 1024     # its /dev/shm (multiprocessing semaphores and shared memory)
PIDS_LIMIT = 128                      # processes + threads of one sandbox (bwrap's own two included)
OPEN_FILES_LIMIT = 256
SANDBOX_UID = 65534                   # "nobody": no capabilities inside its user namespace

SANDBOX_ENV = "PICOCHAT_SANDBOX"
TRUSTED_OPT_IN = "none-trusted"
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) "
                "where user namespaces are allowed")
HOW_TO_ENABLE = (f"{INSTALL_HINT}, or on a trusted machine only set {SANDBOX_ENV}={TRUSTED_OPT_IN} to run "
                 "model-written code unsandboxed")

_IN = "/sandbox"  # read-only mount of the per-run input dir (prelude + program) inside the sandbox
_TMP = "/tmp"


@dataclass
class SandboxResult:
    ok: bool              # exited 0 within the time limit
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    error: str | None     # short reason when not ok: "timeout", "killed by SIGKILL", last stderr line, ...


# Runs first in the child, then executes the program as __main__. Only resource limits: the OS sandbox is the
# boundary, and legitimate programs (threads, asyncio, subprocess, ctypes) must behave as under plain python.
# argv: memory_mb cpu_seconds file_size open_files nproc (0 = leave) code_path
_PRELUDE = r'''
import os, resource, sys

def _setup():
    mem_mb, cpu_s, fsize, nofile, nproc = (int(a) for a in sys.argv[1:6])
    code_path = sys.argv[6]
    def limit(which, value):
        try:
            resource.setrlimit(which, (value, value))  # soft = hard: the program cannot raise them again
        except (ValueError, OSError):
            pass
    if mem_mb > 0:
        limit(resource.RLIMIT_AS, mem_mb * 1024 * 1024)
    limit(resource.RLIMIT_CPU, cpu_s)
    limit(resource.RLIMIT_FSIZE, fsize)
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NOFILE, nofile)
    if nproc > 0:
        limit(resource.RLIMIT_NPROC, nproc)
    with open(code_path, encoding="utf-8") as f:
        source = f.read()
    sys.argv = ["main.py"]
    sys.path[0] = os.getcwd()  # as `python main.py` run in its work dir (not the prelude's dir)
    main = type(sys)("__main__")
    main.__dict__["__builtins__"] = __builtins__
    main.__file__ = os.path.join(os.getcwd(), "main.py")
    sys.modules["__main__"] = main
    return compile(source, "main.py", "exec"), main.__dict__

_code, _globals = _setup()
del _setup
exec(_code, _globals)
'''

_PASSWD = f"nobody:x:{SANDBOX_UID}:{SANDBOX_UID}:nobody:{_TMP}:/usr/sbin/nologin\n"
_GROUP = f"nogroup:x:{SANDBOX_UID}:\n"
_HOSTS = "127.0.0.1 localhost\n::1 localhost\n"


def _child_env(home: str) -> dict[str, str]:
    # one BLAS/OpenMP thread and two malloc arenas: under RLIMIT_AS, per-thread buffers and 64 MiB arena
    # reservations would otherwise exhaust the address space of ordinary numpy or threaded programs
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}


# ---------------------------------------------------------------------------------------------------------------
# which sandbox: probed once per process by running the real thing


_status_lock = threading.Lock()
_probe_cache: dict | None = None
_warned_trusted = False


def _bwrap_version(bwrap: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g or 0) for g in m.groups()) if m else ()


def _probe() -> dict:
    """Find bwrap and run a trivial program through the exact production path; the verdict is cached."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return {"available": False, "reason": "bubblewrap (bwrap) is not installed", "bwrap": None, "version": ""}
    version = _bwrap_version(bwrap)
    if version and version < (0, 5, 0):
        return {"available": False, "bwrap": bwrap, "version": ".".join(map(str, version)),
                "reason": f"bwrap {'.'.join(map(str, version))} is too old (0.5.0 or newer is needed)"}
    info = {"available": True, "reason": "", "bwrap": bwrap, "version": ".".join(map(str, version)),
            "size_cap": version >= (0, 7, 0), "disable_userns": version >= (0, 8, 0)}
    info["pids_cgroup"] = _pids_cgroup_base()
    for _ in range(2):
        r = _run_bwrap(info, "import sys; sys.stdout.write('ok')", timeout_s=15.0, memory_mb=0, stdin=None,
                       max_output_bytes=1024)
        if (r.ok and r.stdout == "ok") or not info["pids_cgroup"]:
            break
        info["pids_cgroup"] = None  # the cgroup launcher failed, not necessarily bwrap: try without it
    if not (r.ok and r.stdout == "ok"):
        lines = [ln.strip() for ln in (r.stderr or "").splitlines() if ln.strip()]
        why = lines[0] if lines else (r.error or "unknown error")
        hint = ""
        if "namespace" in why.lower() or "permission" in why.lower() or "proc" in why.lower():
            hint = " (user namespaces are forbidden here: a container without them, or a sysctl restriction)"
        info.update(available=False, reason=f"bwrap cannot start a sandbox: {why[:200]}{hint}")
    return info


def _probed(refresh: bool = False) -> dict:
    global _probe_cache
    with _status_lock:
        if _probe_cache is None or refresh:
            _probe_cache = _probe()
        return _probe_cache


def sandbox_status(refresh: bool = False) -> dict:
    """Which sandbox `run_python` will use, for `picochat doctor` and for refusing early.

    kind: "bwrap" (OS sandbox), "trusted" (no OS sandbox, unsandboxed by the PICOCHAT_SANDBOX=none-trusted opt-in),
    or "none" (no OS sandbox: run_python refuses). available: whether run_python runs code at all.
    """
    p = _probed(refresh)
    if p["available"]:
        limits = "pids cgroup" if p.get("pids_cgroup") else ("RLIMIT_NPROC" if os.geteuid() != 0 else "timeout only")
        return {"kind": "bwrap", "available": True,
                "reason": f"bubblewrap {p['version']} ({p['bwrap']}); process limit: {limits}",
                "how_to_enable": ""}
    if os.environ.get(SANDBOX_ENV, "").strip() == TRUSTED_OPT_IN:
        return {"kind": "trusted", "available": True,
                "reason": f"UNSANDBOXED ({SANDBOX_ENV}={TRUSTED_OPT_IN}): {p['reason']}; model-written code runs "
                          "with this user's rights, limited only by rlimits and a timeout",
                "how_to_enable": INSTALL_HINT}
    return {"kind": "none", "available": False, "reason": p["reason"], "how_to_enable": HOW_TO_ENABLE}


def unavailable_message() -> str | None:
    """One line for the python tool / HumanEval when no sandbox will run code; None when one will."""
    s = sandbox_status()
    if s["available"]:
        return None
    return f"python sandbox unavailable: {s['reason']}; to enable it, {s['how_to_enable']}"


# ---------------------------------------------------------------------------------------------------------------
# pids cgroup (the process-count bound that also holds for root, which RLIMIT_NPROC exempts)


def _pids_cgroup_base() -> str | None:
    """A cgroup directory with the pids controller in which this process may create children, else None."""
    if os.geteuid() != 0:
        return None  # unprivileged callers get RLIMIT_NPROC, which binds them
    try:
        cgroups = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in mounts:
        parts = line.split()
        if " - " not in line:
            continue
        fstype, _, opts = line.split(" - ", 1)[1].split()[:3]
        root, mnt = parts[3], parts[4]
        for cg in cgroups:
            hid, ctrls, path = cg.split(":", 2)
            if fstype == "cgroup" and "pids" in ctrls.split(",") and "pids" in opts.split(","):
                candidates.append((mnt, root, path, False))
            elif fstype == "cgroup2" and hid == "0":
                candidates.append((mnt, root, path, True))
    for mnt, root, path, v2 in candidates:
        rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
        base = os.path.normpath(os.path.join(mnt, rel))
        try:
            if v2 and "pids" not in Path(base, "cgroup.subtree_control").read_text().split():
                continue
            probe = tempfile.mkdtemp(prefix="picochat-sandbox-probe-", dir=base)
            ok = os.path.exists(os.path.join(probe, "pids.max"))
            os.rmdir(probe)
            if ok:
                return base
        except OSError:
            continue
    return None


class _PidsCgroup:
    _ids = itertools.count()

    def __init__(self, base: str, limit: int):
        self.path = os.path.join(base, f"picochat-sandbox-{os.getpid()}-{next(self._ids)}")
        os.mkdir(self.path)
        with open(os.path.join(self.path, "pids.max"), "w") as f:
            f.write(str(limit))

    def wrap(self, argv: list[str]) -> list[str]:
        # the launcher moves itself into the cgroup, then becomes bwrap: every process of the sandbox is born inside
        # it (no preexec_fn, which is unsafe in threaded callers such as the server)
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(self.path, "cgroup.procs"), *argv]

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in Path(self.path, "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def remove(self, wait_s: float = 3.0) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:  # still populated: dying processes not yet reaped
                if time.monotonic() > deadline:
                    return
                self.kill_all()
                time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------
# the bwrap command line


def _interpreter() -> str:
    """The Python installation's own interpreter, which the sandbox runs: from a virtual environment, its base (a
    venv's bin/python points there). The venv itself -- often inside the checkout, as run.sh makes it -- is then
    never mounted, and model-written code sees the standard library and the base install's packages only."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _python_mounts() -> list[tuple[str, str]]:
    """(host source, sandbox destination) pairs that make the base interpreter work inside: its prefixes, its
    directory and its stdlib/site-packages dirs, each at its own path and at its resolved path (pyenv/conda live
    outside /usr)."""
    paths = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(_interpreter())}
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix,
            "installed_platbase": sys.base_exec_prefix}
    paths |= {p for k, p in sysconfig.get_paths(vars=base).items()
              if k in ("stdlib", "platstdlib", "purelib", "platlib") and p}
    pairs: set[tuple[str, str]] = set()
    for p in paths:
        if not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        for dest in {os.path.abspath(p), real}:
            if dest == "/usr" or dest.startswith("/usr/") or dest == "/":
                continue  # /usr is bound whole
            pairs.add((real, dest))
    chosen: list[tuple[str, str]] = []
    for src, dest in sorted(pairs, key=lambda sd: (sd[1].count("/"), sd[1])):
        covered = any(dest.startswith(d + "/") and src == s + dest[len(d):] for s, d in chosen)
        if not covered:
            chosen.append((src, dest))
    return chosen


# A deny-list seccomp filter (classic BPF, as the kernel takes it) for the kernel interfaces a Python program never
# needs and that serve as escape or snooping routes: ptrace and cross-process memory access (bwrap's init is
# visible inside), keyrings, eBPF, perf, userfaultfd, io_uring, mounts and namespaces, modules, kexec, reboot, swap.
# Denied calls return EPERM. Syscall numbers per architecture; elsewhere no filter is loaded (the namespaces and
# dropped capabilities still hold).
_DENY_SYSCALLS = {
    # AUDIT_ARCH_X86_64
    0xC000003E: (101, 310, 311, 250, 248, 249, 321, 298, 323, 425, 426, 427, 165, 166, 155, 308, 246, 320, 175,
                 313, 176, 169, 167, 168, 163, 172, 173, 304),
    # AUDIT_ARCH_AARCH64 (the generic table)
    0xC00000B7: (117, 270, 271, 219, 217, 218, 280, 241, 282, 425, 426, 427, 40, 39, 41, 268, 104, 294, 105, 273,
                 106, 142, 224, 225, 89, 265),
}
_X32_SYSCALL_BIT = 0x40000000


def _seccomp_filter() -> bytes | None:
    import platform
    import struct

    arch = {"x86_64": 0xC000003E, "amd64": 0xC000003E, "aarch64": 0xC00000B7, "arm64": 0xC00000B7}.get(
        platform.machine().lower())
    if arch is None:
        return None
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    nrs = _DENY_SYSCALLS[arch]
    prog = [(ld_abs, 0, 0, 4),                               # A = seccomp_data.arch
            (jeq, 1, 0, arch),                               # native ABI: go on; else (i386, x32 tricks) deny all
            (ret, 0, 0, deny),
            (ld_abs, 0, 0, 0)]                               # A = seccomp_data.nr
    if arch == 0xC000003E:
        prog.append((jge, len(nrs) + 1, 0, _X32_SYSCALL_BIT))  # the x32 ABI: deny
    for i, nr in enumerate(nrs):
        prog.append((jeq, len(nrs) - i, 0, nr))              # a listed syscall: jump to deny
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


def _bwrap_argv(info: dict, in_dir: str, cmd: list[str], seccomp_fd: int | None = None) -> list[str]:
    a = [info["bwrap"], "--unshare-all", "--unshare-user"]  # --unshare-all only *tries* the user namespace
    if info.get("disable_userns"):
        a += ["--disable-userns"]
    a += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
          "--die-with-parent", "--new-session",
          "--cap-drop", "ALL",  # run by root, bwrap would otherwise keep every capability inside
          "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = "/" + name
        if os.path.islink(host):
            a += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            a += ["--ro-bind", host, host]
    for src, dest in _python_mounts():
        a += ["--ro-bind", src, dest]
    a += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for name in ("passwd", "group", "hosts"):
        a += ["--ro-bind", os.path.join(in_dir, name), f"/etc/{name}"]
    a += ["--proc", "/proc", "--dev", "/dev"]
    for dest, size in ((_TMP, TMP_SIZE_LIMIT), ("/dev/shm", SHM_SIZE_LIMIT)):
        a += ["--perms", "1777"]
        if info.get("size_cap"):
            a += ["--size", str(size)]
        a += ["--tmpfs", dest]
    a += ["--ro-bind", in_dir, _IN,
          # the root and /dev are tmpfs too: read-only, so nothing but the capped mounts above takes writes
          "--remount-ro", "/dev", "--remount-ro", "/",
          "--chdir", _TMP, "--clearenv"]
    if seccomp_fd is not None:
        a += ["--seccomp", str(seccomp_fd)]
    for k, v in _child_env(_TMP).items():
        a += ["--setenv", k, v]
    return a + ["--", *cmd]


def _nproc_limit() -> int:
    """RLIMIT_NPROC for inside the sandbox: root is exempt from it anyway (the pids cgroup binds root). For other
    users, kernels from 5.14 count it per user namespace, i.e. only the sandbox's own processes; older ones count
    all of the user's processes, where a low limit would break threads, so leave it there."""
    if os.geteuid() == 0:
        return 0
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return PIDS_LIMIT if m and (int(m.group(1)), int(m.group(2))) >= (5, 14) else 0


# ---------------------------------------------------------------------------------------------------------------
# running


def _read_capped(path: Path, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def _refused(msg: str) -> SandboxResult:
    return SandboxResult(ok=False, stdout="", stderr=msg + "\n", returncode=None, timed_out=False, error=msg)


def _execute(argv: list[str], root: Path, cwd: str, env: dict, timeout_s: float, max_output_bytes: int,
             under_bwrap: bool, cgroup: _PidsCgroup | None, pass_fds: tuple[int, ...] = ()) -> SandboxResult:
    timed_out = False
    with open(root / "stdin", "rb") as fin, open(root / "stdout", "wb") as fout, open(root / "stderr", "wb") as ferr:
        try:
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=env,
                                    start_new_session=True, close_fds=True, pass_fds=pass_fds)
        except OSError as e:
            return _refused(f"could not start the sandbox: {e}")
        try:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            _kill(proc, cgroup, under_bwrap)
    out, out_cut = _read_capped(root / "stdout", max_output_bytes)
    err, err_cut = _read_capped(root / "stderr", max_output_bytes)
    rc = proc.returncode
    if under_bwrap and rc is not None and rc > 128 and (rc - 128) in signal.Signals._value2member_map_:
        rc = -(rc - 128)  # bwrap reports "killed by signal n" as 128+n; keep subprocess's convention
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


def _kill(proc: subprocess.Popen, cgroup: _PidsCgroup | None, under_bwrap: bool) -> None:
    """End everything the run started, also after a normal exit (a program may leave background processes).

    Under bwrap, killing bwrap kills its init (--die-with-parent) and with it the whole pid namespace; the pids
    cgroup, when there is one, is swept as well. Without bwrap, the child's process group is killed (processes
    that called setsid escape that: one reason the unsandboxed mode is for trusted machines only)."""
    running = proc.poll() is None
    if running or not under_bwrap:  # bwrap's pid, once reaped, may be reused: leave it alone then
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if running:
        try:
            proc.kill()
        except (ProcessLookupError, PermissionError):
            pass
    if cgroup is not None:
        cgroup.kill_all()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _prepare(root: Path, code: str, stdin: str | None) -> None:
    in_dir = root / "in"
    in_dir.mkdir()
    (in_dir / "prelude.py").write_text(_PRELUDE)
    (in_dir / "main.py").write_text(code, encoding="utf-8")
    (in_dir / "passwd").write_text(_PASSWD)
    (in_dir / "group").write_text(_GROUP)
    (in_dir / "hosts").write_text(_HOSTS)
    for p in in_dir.iterdir():
        p.chmod(0o444)  # readable by the sandbox's uid
    in_dir.chmod(0o755)
    root.chmod(0o755)
    (root / "stdin").write_text(stdin or "", encoding="utf-8")


def _run_bwrap(info: dict, code: str, *, timeout_s: float, memory_mb: int, stdin: str | None,
               max_output_bytes: int) -> SandboxResult:
    root = Path(tempfile.mkdtemp(prefix="picochat-sandbox-"))
    cgroup = None
    seccomp_fd = None
    try:
        _prepare(root, code, stdin)
        bpf = _seccomp_filter()
        if bpf is not None:
            (root / "seccomp.bpf").write_bytes(bpf)
            seccomp_fd = os.open(root / "seccomp.bpf", os.O_RDONLY)
        cpu_s = max(1, int(timeout_s) + 1)
        cmd = [_interpreter(), "-I", "-B", f"{_IN}/prelude.py", str(int(memory_mb)), str(cpu_s),
               str(FILE_SIZE_LIMIT), str(OPEN_FILES_LIMIT), str(_nproc_limit()), f"{_IN}/main.py"]
        argv = _bwrap_argv(info, str(root / "in"), cmd, seccomp_fd)
        if info.get("pids_cgroup"):
            try:
                cgroup = _PidsCgroup(info["pids_cgroup"], PIDS_LIMIT)
                argv = cgroup.wrap(argv)
            except OSError:
                cgroup = None
        # bwrap's own environment is visible inside through /proc/1/environ: give it nothing worth reading
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        return _execute(argv, root, str(root), env, timeout_s, max_output_bytes, True, cgroup,
                        () if seccomp_fd is None else (seccomp_fd,))
    finally:
        if seccomp_fd is not None:
            os.close(seccomp_fd)
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(root, ignore_errors=True)


def _run_trusted(code: str, *, timeout_s: float, memory_mb: int, stdin: str | None,
                 max_output_bytes: int) -> SandboxResult:
    """The unsandboxed path for declared-trusted machines: a fresh `python -I` with rlimits, a scrubbed env and a
    throwaway work dir, its process group killed at the end. It confines nothing."""
    global _warned_trusted
    if not _warned_trusted:
        _warned_trusted = True
        print(f"WARNING: {SANDBOX_ENV}={TRUSTED_OPT_IN}: model-written code runs WITHOUT an OS sandbox, with this "
              "user's rights (files, network, processes). Only do this on a machine you trust and no one else can "
              "reach.", file=sys.stderr, flush=True)
    root = Path(tempfile.mkdtemp(prefix="picochat-sandbox-"))
    try:
        _prepare(root, code, stdin)
        work = root / "work"
        work.mkdir()
        cpu_s = max(1, int(timeout_s) + 1)
        cmd = [sys.executable, "-I", "-B", str(root / "in" / "prelude.py"), str(int(memory_mb)), str(cpu_s),
               str(FILE_SIZE_LIMIT), str(OPEN_FILES_LIMIT), "0", str(root / "in" / "main.py")]
        return _execute(cmd, root, str(work), _child_env(str(work)), timeout_s, max_output_bytes, False, None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256, stdin: str | None = None,
               timeout: float | None = None, max_output_bytes: int = MAX_OUTPUT_BYTES,
               allow_reads: bool = True) -> SandboxResult:
    """Run `code` as a fresh Python program in the OS sandbox (see the module docstring). Never raises for bad code.

    `timeout` is an alias of `timeout_s`. `memory_mb` <= 0 disables the address-space limit. `allow_reads` is kept
    for callers: the sandbox shows the program no host files beyond the Python installation either way.
    Without an OS sandbox (and without the trusted opt-in) nothing runs: ok=False, `error` says why and how to
    enable one.
    """
    del allow_reads
    if timeout is not None:
        timeout_s = timeout
    status = sandbox_status()
    if status["kind"] == "none":
        return _refused(unavailable_message() or "python sandbox unavailable")
    kwargs = dict(timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin, max_output_bytes=max_output_bytes)
    if status["kind"] == "trusted":
        return _run_trusted(code, **kwargs)
    return _run_bwrap(_probed(), code, **kwargs)


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
    expression's value; None on any error, timeout or empty result, and when no sandbox is available
    (`unavailable_message()` says why).

    Thousands separators in plain arithmetic ("1,200 * 3") are dropped, as models write numbers that way.
    """
    expr = expr.strip()
    if not expr or len(expr) > 10_000:
        return None
    if _ARITH.fullmatch(expr):
        expr = expr.replace(",", "")
    result = run_python(_EXPR_RUNNER.format(src=expr), timeout_s=timeout_s, memory_mb=256)
    if not result.ok:
        return None
    out = result.stdout.strip()
    return out[:max_chars] if out else None


def _selftest() -> int:  # `python -m picochat.sandbox`: which sandbox, and a quick run
    s = sandbox_status()
    print(f"sandbox: {s['kind']} ({'available' if s['available'] else 'unavailable'}): {s['reason']}")
    if s["how_to_enable"]:
        print(f"  to enable: {s['how_to_enable']}")
    t = time.time()
    print(run_python("print(sum(range(10)))"), f"{time.time() - t:.3f}s")
    print(run_expression("12/60"), run_expression("'strawberry'.count('r')"))
    return 0 if s["available"] else 1


if __name__ == "__main__":
    sys.exit(_selftest())
