"""Escape attempts against the OS sandbox, one small hostile program each.

Each program tries one thing and prints ESCAPED (with what it got) only if it worked; the test asserts the marker is
absent and, where the attack aims at the host (files, processes, sockets), checks the host side too. The classes
follow the probe that found the Python-level guard wanting, plus a few more."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from picochat import sandbox
from picochat.sandbox import run_python

pytestmark = pytest.mark.skipif(sandbox.sandbox_status()["kind"] != "bwrap",
                                reason=f"no OS sandbox here: {sandbox.sandbox_status()['reason']}")

SECRET = "s3cr3t-" + uuid.uuid4().hex


def _try(body: str) -> str:
    """Wrap an attempt: any exception means it was blocked; ESCAPED is printed only when the body finishes."""
    return ("import os, sys\ntry:\n" + "".join("    " + ln + "\n" for ln in body.strip().splitlines())
            + "except BaseException as e:\n    print('blocked:', type(e).__name__, e)\n")


def _run(code: str, **kw):
    r = run_python(code, **kw)
    assert "ESCAPED" not in r.stdout, r
    assert SECRET not in r.stdout + r.stderr, r
    return r


# --- secrets of the parent: environment and files --------------------------------------------------------------

@pytest.fixture
def secrets(monkeypatch, tmp_path):
    """API keys in the parent's environment, and secret files where the parent keeps data."""
    for key in ("OPENAI_API_KEY", "HF_TOKEN", "PICOCHAT_API_KEY", "MODAL_TOKEN_SECRET"):
        monkeypatch.setenv(key, SECRET)
    home = Path(os.environ["PICOCHAT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    files = [home / "secret.txt", tmp_path / "secret.txt", Path(__file__).resolve().parent / f".secret-{uuid.uuid4().hex}"]
    for f in files:
        f.write_text(SECRET)
    yield [str(f) for f in files]
    files[2].unlink()


ENV_READS = {
    "os.environ": "v = [k for k in os.environ if 'KEY' in k or 'TOKEN' in k or 'SECRET' in k]\nassert v, 'none'\n"
                  "print('ESCAPED', v)",
    "/proc/<ppid>/environ via open": "d = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
                                     "assert b'KEY' in d, 'no keys'\nprint('ESCAPED', d)",
    "/proc/<ppid>/environ via io.FileIO": "import io\nd = io.FileIO(f'/proc/{os.getppid()}/environ').read()\n"
                                          "assert b'KEY' in d, 'no keys'\nprint('ESCAPED', d)",
    "every /proc/*/environ": "hits = []\nfor p in os.listdir('/proc'):\n    try:\n"
                             "        d = open(f'/proc/{p}/environ', 'rb').read()\n    except OSError:\n        continue\n"
                             "    if b'API_KEY' in d:\n        hits.append(d)\nassert hits, 'none'\nprint('ESCAPED', hits)",
    "/proc/self/environ": "d = open('/proc/self/environ', 'rb').read()\nassert b'KEY' in d, 'no keys'\n"
                          "print('ESCAPED', d)",
}


@pytest.mark.parametrize("name", list(ENV_READS))
def test_parent_environment_is_invisible(secrets, name):
    _run(_try(ENV_READS[name]))


READS = {
    "open": "d = open(path).read()",
    "io.FileIO": "import io\nd = io.FileIO(path).read().decode()",
    "os.open": "d = os.read(os.open(path, os.O_RDONLY), 1 << 20).decode()",
    "pathlib": "import pathlib\nd = pathlib.Path(path).read_text()",
    "symlink then open": "os.symlink(path, 'link')\nd = open('link').read()",
    "sqlite3 attach": "import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute('attach database ? as x', (path,))\n"
                      "d = str(c.execute('select * from x.sqlite_master').fetchall())",
}


@pytest.mark.parametrize("how", list(READS))
def test_secret_files_outside_are_invisible(secrets, how):
    """Files in PICOCHAT_HOME, the host /tmp, the repository, /etc/shadow, the home directory: one program tries
    them all with one method and reports each path it could read."""
    paths = secrets + ["/etc/shadow", os.path.expanduser("~/.bashrc"),
                       os.path.expanduser("~/.ssh/id_rsa")]
    attempt = "".join("    " + ln + "\n" for ln in READS[how].splitlines())
    code = (f"import os\nfor path in {paths!r}:\n  try:\n" + attempt.replace("\n    ", "\n    ")
            + "    print('ESCAPED', path, d[:40])\n  except Exception as e:\n    print('blocked:', path, type(e).__name__)\n"
            + "  if os.path.lexists('link'):\n    os.remove('link')\n")
    r = _run(code)
    assert r.stdout.count("blocked:") == len(paths), r


def test_host_tree_is_not_mounted():
    """Only /usr, the Python installation, its own /tmp and a minimal /etc, /dev, /proc are there."""
    repo = str(Path(__file__).resolve().parent.parent)
    probes = [repo, os.environ["PICOCHAT_HOME"], "/home", "/var", "/srv", "/opt", "/etc/ssh", "/etc/shadow",
              os.path.expanduser("~/.ssh"), os.path.expanduser("~/.cache"), "/sys", "/run", "/mnt"]
    r = _run(_try(f"seen = [p for p in {probes!r} if os.path.exists(p)]\nassert seen, 'nothing'\nprint('ESCAPED', seen)"))
    assert "blocked" in r.stdout


# --- writes outside the temp dir ----------------------------------------------------------------------------------

WRITES = {
    "open": "open({t!r}, 'w').write('x')",
    "io.FileIO": "import io\nio.FileIO({t!r}, 'w').write(b'x')",
    "os.open": "os.write(os.open({t!r}, os.O_CREAT | os.O_WRONLY), b'x')",
    "sqlite3": "import sqlite3\nc = sqlite3.connect({t!r})\nc.execute('create table t(a)')\nc.commit()",
    "readline history": "import readline\nreadline.add_history('x')\nreadline.write_history_file({t!r})",
    "os.rename": "open('x', 'w').write('x')\nos.rename('x', {t!r})",
    "shutil.copy": "import shutil\nopen('x', 'w').write('x')\nshutil.copy('x', {t!r})",
    "shutil.rmtree victim": "import shutil\nshutil.rmtree({d!r})\nassert not os.path.exists({d!r})",
    "os.remove victim": "os.remove({v!r})",
    "relative ../": "open('../../' + {t!r}.lstrip('/'), 'w').write('x')",
    "into the python install": "import sysconfig\np = sysconfig.get_paths()['purelib'] + '/evil.pth'\n"
                               "open(p, 'w').write('x')\nos.remove(p)",
    "into /usr": "open('/usr/evil', 'w').write('x')",
    "remount read-write (ctypes mount)": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                         "rc = libc.mount(None, b'/usr', None, 32 | 4096 | 1 << 5, None)\n"
                                         "assert rc == 0, ctypes.get_errno()\nopen('/usr/evil', 'w')",
}


@pytest.mark.parametrize("name", list(WRITES))
def test_writes_outside_the_temp_dir_fail(tmp_path, name):
    victim_dir = tmp_path / "victims"
    victim_dir.mkdir()
    victim = victim_dir / "keep.txt"
    victim.write_text("keep")
    target = tmp_path / "new.txt"
    body = WRITES[name].format(t=str(target), d=str(victim_dir), v=str(victim))
    _run(_try(body + "\nprint('ESCAPED')"))
    assert victim.read_text() == "keep" and not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victims"]
    assert not Path("/usr/evil").exists()


# --- processes: survivors, signals to the parent, fork bombs ---------------------------------------------------------

def _host_pids_named(comm: str) -> list[int]:
    """Host processes whose name (comm, 15 chars) is `comm`: how the tests find the sandbox's processes."""
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if Path(f"/proc/{p}/comm").read_text().strip() == comm:
                    found.append(int(p))
            except OSError:
                pass
    return found


_SET_COMM = "import ctypes\nctypes.CDLL(None).prctl(15, {name!r}.encode(), 0, 0, 0)\n"


def _run_watching(code: str, comm: str, **kw):
    """Run `code` while watching the host for processes named `comm`; (result, max seen at once)."""
    seen = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen[0] = max(seen[0], len(_host_pids_named(comm)))
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    try:
        r = _run(code, **kw)
    finally:
        done.set()
        t.join()
    return r, seen[0]


def _gone(comm: str, wait_s: float = 3.0) -> bool:
    deadline = time.time() + wait_s
    while _host_pids_named(comm):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("then", ["loops until the timeout", "exits at once"])
def test_setsid_grandchild_does_not_survive(then):
    comm = "pcs" + uuid.uuid4().hex[:10]
    code = ("import os, posix, time\n"
            "if posix.fork() == 0:\n    os.setsid()\n    if posix.fork() == 0:\n"
            "        " + _SET_COMM.format(name=comm).replace("\n", "\n        ") + "time.sleep(60)\n"
            "    os._exit(0)\n"
            "time.sleep(0.5)\n"
            + ("while True:\n    pass\n" if then == "loops until the timeout" else "print('bye')\n"))
    r, seen = _run_watching(code, comm, timeout_s=1.5)
    assert seen >= 1, "the grandchild never started: the test proves nothing"
    assert _gone(comm), "a daemonised grandchild outlived the sandbox"
    assert r.timed_out == (then == "loops until the timeout")


KILLS = {
    "kill(getppid(), 9)": "os.kill(os.getppid(), 9)",
    "posix.kill(getppid(), 9)": "import posix\nposix.kill(os.getppid(), 9)",
    "kill(real parent pid, 9)": "os.kill({host_pid}, 9)",
    "killpg(real parent pgid, 9)": "os.killpg({host_pgid}, 9)",
    "kill(-1, 9)": "os.kill(-1, 9)",
    "ctypes kill(real parent)": "import ctypes\nctypes.CDLL(None).kill({host_pid}, 9)",
    "pidfd_open(real parent)": "os.pidfd_open({host_pid})",
}


@pytest.mark.parametrize("name", list(KILLS))
def test_cannot_signal_the_parent(name):
    """The caller stays alive (this test process is the real parent) and the program itself carries on."""
    code = _try(KILLS[name].format(host_pid=os.getpid(), host_pgid=os.getpgid(0))) + "print('caller alive')\n"
    r = _run(code)
    assert "caller alive" in r.stdout and r.ok, r
    os.kill(os.getpid(), 0)  # we are still here


def test_cannot_see_or_trace_host_processes():
    host = os.getpid()
    r = _run(_try(f"pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\nprint('pids', pids)\n"
                  f"cmd = open('/proc/{host}/cmdline').read()\nassert 'pytest' in cmd, cmd\nprint('ESCAPED', cmd)"))
    pids = [int(x) for x in r.stdout.split("[", 1)[1].split("]")[0].split(",") if x.strip()]
    assert max(pids) <= 10, pids  # its own namespace: bwrap's init and itself


def test_fork_bomb_is_bounded_and_killed():
    status = sandbox.sandbox_status()
    if "timeout only" in status["reason"]:
        pytest.skip("no process-count limit for root without a writable pids cgroup (only the timeout binds)")
    comm = "pcb" + uuid.uuid4().hex[:10]
    code = (_SET_COMM.format(name=comm) + "import os, time\nt0 = time.time()\n"
            "while time.time() - t0 < 0.8:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
            "print('procs', sum(p.isdigit() for p in os.listdir('/proc')), flush=True)\n"
            "while True:\n    time.sleep(1)\n")
    start = time.time()
    r, seen = _run_watching(code, comm, timeout_s=2.0)
    assert r.timed_out and time.time() - start < 12
    assert 1 <= seen <= sandbox.PIDS_LIMIT, seen
    assert _gone(comm), "fork bomb processes outlived the sandbox"


# --- network -----------------------------------------------------------------------------------------------------

NET = {
    "raw _socket": "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))",
    "socket.create_connection": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
    "urllib": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
    "IPv6 loopback": "import socket\nsocket.create_connection(('::1', {port}), timeout=2)",
    "outside host (DNS + connect)": "import socket\nsocket.create_connection(('example.com', 80), timeout=2)",
    "raw IP address outside": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)",
    "ctypes socket + connect": ("import ctypes, socket, struct\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"
                                "addr = struct.pack('<HH4s8x', 2, socket.htons({port}), bytes([127, 0, 0, 1]))\n"
                                "assert libc.connect(fd, addr, 16) == 0, 'refused'"),
}


@pytest.mark.parametrize("name", list(NET))
def test_no_network(name):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        _run(_try(NET[name].format(port=port) + "\nprint('ESCAPED')"), timeout_s=5)
        with pytest.raises(OSError):
            server.accept()  # nothing reached the host's loopback
    finally:
        server.close()


def test_host_unix_sockets_are_invisible(tmp_path):
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(0.2)
    try:
        _run(_try(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\nprint('ESCAPED')"))
        with pytest.raises(OSError):
            server.accept()
    finally:
        server.close()


# --- undoing guards, privileges, the terminal ------------------------------------------------------------------------

PRIVS = {
    "clear sys.meta_path then ctypes": ("sys.meta_path[:] = [m for m in sys.meta_path if 'Blocker' not in type(m).__name__]\n"
                                        "import ctypes\nlibc = ctypes.CDLL(None)\n"
                                        "fd = libc.open(b'/usr/.escaped', 0o101, 0o644)\nassert fd >= 0, 'open failed'"),
    "root or capabilities": ("caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]\n"
                             "assert os.getuid() == 0 or int(caps, 16) != 0, (os.getuid(), caps)"),
    "setuid(0)": "os.setuid(0)",
    "new user namespace (unshare)": "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) == 0, 'denied'",
    "chroot": "os.chroot('/tmp')",
    "raise rlimits back": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    "TIOCSTI into a terminal": ("import fcntl, termios\nfd = os.open('/dev/tty', os.O_RDWR)\n"
                                "fcntl.ioctl(fd, termios.TIOCSTI, b'x')"),
    "ptrace attach to bwrap's init": "import ctypes\nassert ctypes.CDLL(None).ptrace(16, 1, 0, 0) == 0, 'denied'",
    "ptrace attach to the real parent": "import ctypes\nassert ctypes.CDLL(None).ptrace(16, {host_pid}, 0, 0) == 0, 'denied'",
    "keyctl (kernel keyrings)": "import ctypes\nassert ctypes.CDLL(None).syscall(250, 0, -3, 0, 0, 0) >= 0, 'denied'",
    "x32 ABI syscall (filter bypass)": "import ctypes\nassert ctypes.CDLL(None).syscall(0x40000000 | 39) > 0, 'denied'",
    "mknod a disk device": "os.mknod('/tmp/sda', 0o600 | 0o060000, os.makedev(8, 0))\nopen('/tmp/sda', 'rb').read(512)",
    "write /proc/sysrq-trigger": "open('/proc/sysrq-trigger', 'w').write('h')",
}


@pytest.mark.parametrize("name", list(PRIVS))
def test_no_privileges_to_escalate(name):
    import platform

    if "syscall(" in PRIVS[name] and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 syscall numbers")
    r = _run(_try(PRIVS[name].format(host_pid=os.getpid()) + "\nprint('ESCAPED')"))
    assert "blocked" in r.stdout or not r.ok, r
    assert not Path("/usr/.escaped").exists()


# --- resources -----------------------------------------------------------------------------------------------------

def test_memory_hog_leaves_the_parent_fine():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for code in ("x = bytearray(4 * 1024**3)", "a = []\nwhile True:\n    a.append(bytearray(10**7))",
                 "import numpy\nx = numpy.ones(10**9)"):
        r = _run(code, memory_mb=256, timeout_s=5)
        assert not r.ok and ("MemoryError" in r.stderr or r.returncode in (-9, 137)), r
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_huge_output_is_capped():
    start = time.time()
    r = _run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout_s=5)
    assert len(r.stdout) < 70_000 and r.stdout.endswith("[output truncated]")
    assert not r.ok and time.time() - start < 10  # stopped by the file-size limit, not the timeout


@pytest.mark.parametrize("where", ["/tmp (one file)", "/tmp (many files)", "/dev/shm"])
def test_huge_files_are_capped(where):
    if not sandbox._probed().get("size_cap"):
        pytest.skip("bwrap older than 0.7.0 cannot cap a tmpfs's size (RLIMIT_FSIZE still caps each file)")
    body = {
        "/tmp (one file)": "f = open('/tmp/big', 'wb')\nfor _ in range(200):\n    f.write(b'x' * 2**20)\nf.flush()",
        "/tmp (many files)": "for i in range(20):\n    with open(f'/tmp/big{i}', 'wb') as f:\n"
                             "        for _ in range(15):\n            f.write(b'x' * 2**20)",
        "/dev/shm": "with open('/dev/shm/big', 'wb') as f:\n    for _ in range(100):\n        f.write(b'x' * 2**20)",
    }[where]
    r = _run(_try(body + "\nprint('ESCAPED')"), timeout_s=10)
    assert "blocked" in r.stdout and ("No space" in r.stdout or "File too large" in r.stdout), r
