"""The sandbox: runs legitimate Python (threads, asyncio, pools, sqlite3, numpy...), reports failures, times out,
caps memory and output; refuses to run anything without an OS sandbox unless the machine is declared trusted.

Escape attempts live in test_sandbox_attacks.py."""

from __future__ import annotations

import gzip
import json
import os
import time

import pytest

from picochat import sandbox
from picochat.sandbox import run_expression, run_python

needs_bwrap = pytest.mark.skipif(sandbox.sandbox_status()["kind"] != "bwrap",
                                 reason=f"no OS sandbox here: {sandbox.sandbox_status()['reason']}")


@pytest.fixture
def no_os_sandbox(monkeypatch):
    """Simulate a machine where bwrap cannot run (macOS, a container without user namespaces)."""
    monkeypatch.setattr(sandbox, "_probe_cache", {"available": False, "bwrap": None, "version": "",
                                                  "reason": "bubblewrap (bwrap) is not installed"})
    monkeypatch.delenv(sandbox.SANDBOX_ENV, raising=False)


def test_refuses_without_an_os_sandbox(no_os_sandbox, tmp_path):
    """Always runs: no OS sandbox and no opt-in -> nothing executes, and one line says why and how to enable it."""
    marker = tmp_path / "ran"
    r = run_python(f"open({str(marker)!r}, 'w').write('x')")
    assert not r.ok and r.returncode is None and not r.timed_out
    assert "\n" not in r.error
    assert "bubblewrap (bwrap) is not installed" in r.error and "apt-get install bubblewrap" in r.error
    assert f"{sandbox.SANDBOX_ENV}={sandbox.TRUSTED_OPT_IN}" in r.error
    assert not marker.exists()
    assert run_expression("1+1") is None
    s = sandbox.sandbox_status()
    assert s["kind"] == "none" and s["available"] is False and "bwrap" in s["reason"] and s["how_to_enable"]
    assert sandbox.unavailable_message() == r.error


def test_probe_reports_forbidden_user_namespaces(tmp_path, monkeypatch):
    """Always runs: a bwrap that cannot create namespaces (a Docker-default container) is detected by actually
    running it, and the python tool is off with the reason."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'bubblewrap 0.8.0'; exit 0; }\n"
                    "echo 'bwrap: Creating new namespace failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv(sandbox.SANDBOX_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_probe_cache", None)
    s = sandbox.sandbox_status()
    assert s["kind"] == "none" and not s["available"]
    assert "Creating new namespace failed" in s["reason"] and "user namespaces are forbidden" in s["reason"]
    r = run_python("print(1)")
    assert not r.ok and "Creating new namespace failed" in r.error and "\n" not in r.error


def test_trusted_opt_in_runs_unsandboxed_with_a_warning(no_os_sandbox, monkeypatch, capsys):
    monkeypatch.setenv(sandbox.SANDBOX_ENV, sandbox.TRUSTED_OPT_IN)
    monkeypatch.setattr(sandbox, "_warned_trusted", False)
    s = sandbox.sandbox_status()
    assert s["kind"] == "trusted" and s["available"] and "UNSANDBOXED" in s["reason"]
    assert sandbox.unavailable_message() is None
    r = run_python("import threading; t = threading.Thread(target=print, args=(6 * 7,)); t.start(); t.join()")
    assert r.ok and r.stdout == "42\n", r
    assert "WITHOUT an OS sandbox" in capsys.readouterr().err
    r = run_python("while True: pass", timeout_s=0.5)
    assert r.timed_out and not r.ok
    r = run_python("x = bytearray(2 * 1024**3)", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr


@needs_bwrap
def test_status_reports_bwrap():
    s = sandbox.sandbox_status()
    assert s["kind"] == "bwrap" and s["available"] and "bubblewrap" in s["reason"] and s["how_to_enable"] == ""
    assert sandbox.unavailable_message() is None


@needs_bwrap
def test_runs_code_and_captures_output():
    r = run_python("import sys\nprint(sum(range(10)))\nprint('warn', file=sys.stderr)")
    assert r.ok and r.returncode == 0 and r.stdout == "45\n" and "warn" in r.stderr and r.error is None
    r = run_python("print(input().upper())", stdin="hello")
    assert r.ok and r.stdout.strip() == "HELLO"
    r = run_python("print(__name__, __file__)")
    assert r.ok and r.stdout.split()[0] == "__main__"


@needs_bwrap
def test_exception_is_a_failure_with_reason():
    r = run_python("1/0")
    assert not r.ok and r.returncode == 1 and "ZeroDivisionError" in r.error
    r = run_python("import sys; sys.exit(3)")
    assert not r.ok and r.returncode == 3
    r = run_python("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert not r.ok and r.returncode == -15 and r.error == "killed by SIGTERM"


LEGIT = {
    "threading": ("import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(16)]\n"
                  "[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sorted(out) == list(range(16)))", "True"),
    "thread pool (32 workers)": ("from concurrent.futures import ThreadPoolExecutor\n"
                                 "with ThreadPoolExecutor(32) as ex:\n    print(sum(ex.map(lambda x: x * x, range(100))))",
                                 "328350"),
    "process pool": ("from concurrent.futures import ProcessPoolExecutor\ndef sq(x):\n    return x * x\n"
                     "if __name__ == '__main__':\n    with ProcessPoolExecutor(2) as ex:\n"
                     "        print(sum(ex.map(sq, range(10))))", "285"),
    "multiprocessing queue": ("import multiprocessing as mp\ndef f(q):\n    q.put(42)\nif __name__ == '__main__':\n"
                              "    q = mp.Queue(); p = mp.Process(target=f, args=(q,)); p.start()\n"
                              "    print(q.get(timeout=5)); p.join()", "42"),
    "asyncio": ("import asyncio\nasync def f(i):\n    await asyncio.sleep(0.01)\n    return i\nasync def main():\n"
                "    print(sum(await asyncio.gather(*(f(i) for i in range(10)))))\nasyncio.run(main())", "45"),
    "logging": ("import logging\nlogging.basicConfig(level=logging.INFO, filename='log.txt')\n"
                "logging.getLogger('x').info('hello')\nprint('hello' in open('log.txt').read())", "True"),
    "queue": ("import queue, threading\nq = queue.Queue()\nthreading.Thread(target=lambda: q.put(5)).start()\n"
              "print(q.get(timeout=2))", "5"),
    "sqlite3 in its temp dir": ("import os, sqlite3\nc = sqlite3.connect(os.path.join(os.environ['TMPDIR'], 'x.db'))\n"
                                "c.execute('create table t(a)'); c.execute('insert into t values (1)'); c.commit()\n"
                                "print(c.execute('select a from t').fetchall())", "[(1,)]"),
    "files, dirs, rename, shutil in cwd": ("import os, shutil\nopen('a.txt', 'w').write('hi')\nos.mkdir('d')\n"
                                           "os.rename('a.txt', 'd/b.txt')\nshutil.copytree('d', 'e')\n"
                                           "print(open('e/b.txt').read())", "hi"),
    "tempfile": ("import tempfile\nwith tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\nprint('ok')", "ok"),
    "subprocess (contained)": ("import subprocess, sys\n"
                               "print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True,"
                               " text=True).stdout.strip())", "7"),
    "socketpair / local loopback server": (
        "import socket\na, b = socket.socketpair(); a.sendall(b'x'); print(b.recv(1) == b'x')\n"
        "s = socket.create_server(('127.0.0.1', 0)); c = socket.create_connection(s.getsockname())\n"
        "conn, _ = s.accept(); c.sendall(b'y'); print(conn.recv(1) == b'y')", "True\nTrue"),
    "ctypes (allowed, contained)": ("import ctypes\nprint(ctypes.CDLL(None).getpid() > 0)", "True"),
    "import local module written to cwd": ("open('helper.py', 'w').write('X = 5')\nimport helper\nprint(helper.X)",
                                           "5"),
}


@needs_bwrap
@pytest.mark.parametrize("name", list(LEGIT))
def test_legitimate_programs_work(name):
    code, expected = LEGIT[name]
    r = run_python(code, timeout_s=10)
    assert r.ok, (name, r)
    assert r.stdout.strip() == expected, (name, r)


@needs_bwrap
def test_numpy_works_when_installed():
    pytest.importorskip("numpy")
    r = run_python("import numpy as np\nprint(int(np.arange(10).sum()), np.linalg.inv(2 * np.eye(3)).trace())",
                   timeout_s=10)
    assert r.ok and r.stdout.split() == ["45", "1.5"], r


@needs_bwrap
def test_files_do_not_persist_between_runs():
    r = run_python("import os; open('keep.txt', 'w').write('x'); print(os.getcwd())")
    assert r.ok and r.stdout.strip() == "/tmp"
    r = run_python("import os; print(os.path.exists('keep.txt'), os.listdir('.'))")
    assert r.ok and r.stdout.strip() == "False []"


@needs_bwrap
def test_infinite_loop_times_out_and_is_killed():
    start = time.time()
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and not r.ok and "timeout" in r.error
    assert time.time() - start < 8


@needs_bwrap
def test_memory_hog_is_stopped():
    r = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout
    r = run_python("a = []\nwhile True:\n    a.append(' ' * 10**7)", memory_mb=256, timeout_s=5)
    assert not r.ok and not r.timed_out and "MemoryError" in r.stderr


@needs_bwrap
def test_output_is_capped():
    r = run_python("print('x' * 5_000_000)")
    assert r.ok and len(r.stdout) < 70_000 and r.stdout.endswith("[output truncated]")


@needs_bwrap
def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("PICOCHAT_TEST_SECRET", "hunter2")
    r = run_python("import os; print(sorted(os.environ))")
    assert r.ok and "PICOCHAT_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout
    assert "PICOCHAT_HOME" not in r.stdout


def _humaneval_program(row: dict, solution: str) -> str:
    return f"{row['prompt']}{solution}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"


@needs_bwrap
def test_humaneval_canonical_passes_wrong_fails(shared_data):
    with gzip.open(shared_data / "tasks" / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    for row in (rows[0], rows[2], rows[10]):
        good = run_python(_humaneval_program(row, row["canonical_solution"]))
        assert good.ok, (row["task_id"], good)
        bad = run_python(_humaneval_program(row, "    return None\n"))
        assert not bad.ok and "AssertionError" in bad.stderr, (row["task_id"], bad)


@needs_bwrap
def test_humaneval_style_answer_using_threads_scores():
    """Right answers that use the stdlib's concurrency helpers count as right (the old guard refused them)."""
    prog = ("from concurrent.futures import ThreadPoolExecutor\nimport threading, queue, logging, asyncio\n"
            "def squares(xs):\n    with ThreadPoolExecutor(4) as ex:\n        return list(ex.map(lambda x: x * x, xs))\n"
            "def check(f):\n    assert f([1, 2, 3]) == [1, 4, 9]\ncheck(squares)\n")
    assert run_python(prog).ok


@needs_bwrap
def test_run_expression_tool():
    assert run_expression("12/60") == "0.2"
    assert run_expression("'strawberry'.count('r')") == "3"
    assert run_expression("1,200 * 3") == "3600"
    assert run_expression("x = 3\nx * 2") == "6"
    assert run_expression("print('hi')") == "hi"
    assert run_expression("import math; math.sqrt(16)") == "4.0"
    assert run_expression("1/0") is None
    assert run_expression("while True: pass", timeout_s=1.0) is None
    assert run_expression("") is None
    assert run_expression("x = 1") is None  # nothing printed, no value
    # no host files to read: only the Python installation and its own temp dir exist
    assert run_expression('open("/etc/hostname").read()') is None
    assert run_expression("import os; sorted(os.listdir('/etc'))") in ("['group', 'hosts', 'ld.so.cache', 'passwd']",
                                                                         "['group', 'hosts', 'passwd']")


def test_installers_provide_bubblewrap():
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    assert "bubblewrap" in (repo / "run.sh").read_text()
    assert '"bubblewrap"' in (repo / "launch" / "modal_app.py").read_text()


def test_without_an_os_sandbox_humaneval_is_skipped_and_the_tool_says_why_once(monkeypatch, capsys):
    from picochat import engine, sandbox
    from picochat.evals import chat_eval

    monkeypatch.delenv(sandbox.SANDBOX_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_probed", lambda refresh=False: {"available": False, "reason": "bwrap not found"})
    monkeypatch.setattr(engine, "_tool_off_said", False)
    assert chat_eval.load_tasks(["humaneval"]) == []
    assert engine._default_tool("1+1") is None and engine._default_tool("2+2") is None
    err = capsys.readouterr().err
    assert "humaneval skipped: python sandbox unavailable: bwrap not found" in err
    assert err.count("python tool off") == 1
