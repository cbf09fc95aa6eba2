"""The sandbox: runs code, and blocks outside writes, network, fork bombs, infinite loops and memory hogs."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time

import pytest

from picochat.sandbox import run_expression, run_python


def test_runs_code_and_captures_output():
    r = run_python("import sys\nprint(sum(range(10)))\nprint('warn', file=sys.stderr)")
    assert r.ok and r.returncode == 0 and r.stdout == "45\n" and "warn" in r.stderr and r.error is None
    r = run_python("print(input().upper())", stdin="hello")
    assert r.ok and r.stdout.strip() == "HELLO"


def test_exception_is_a_failure_with_reason():
    r = run_python("1/0")
    assert not r.ok and r.returncode == 1 and "ZeroDivisionError" in r.error
    r = run_python("import sys; sys.exit(3)")
    assert not r.ok and r.returncode == 3


def test_writes_inside_its_dir_work_outside_are_blocked(tmp_path):
    r = run_python("import os\nopen('a.txt', 'w').write('hi')\nos.mkdir('d')\nos.rename('a.txt', 'd/b.txt')\n"
                   "print(open('d/b.txt').read(), os.getcwd())")
    assert r.ok, r.stderr
    assert r.stdout.startswith("hi ")
    sandbox_cwd = r.stdout.split()[1]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    attempts = [
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        f"open({str(victim)!r}, 'a').write('x')",
        f"import pathlib; pathlib.Path({str(tmp_path / 'p.txt')!r}).write_text('x')",
        f"import os; os.remove({str(victim)!r})",
        f"import os; os.mkdir({str(tmp_path / 'dir')!r})",
        f"import os; os.open({str(tmp_path / 'fd.txt')!r}, os.O_CREAT | os.O_WRONLY)",
        f"import os; os.rename({str(victim)!r}, 'stolen.txt')",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        "open('../escape.txt', 'w').write('x')",
        f"import io; io.FileIO({str(tmp_path / 'fio.txt')!r}, 'w')",
    ]
    for code in attempts:
        r = run_python(code)
        assert not r.ok and "PermissionError" in r.stderr, (code, r)
    assert victim.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    import os

    assert not os.path.exists(sandbox_cwd)  # the temp dir is gone afterwards


def test_network_is_blocked():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    connected = []

    def accept():
        try:
            conn, _ = server.accept()
            connected.append(conn)
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        for code in (f"import socket; socket.create_connection(('127.0.0.1', {port}))",
                     f"import socket; s = socket.socket(); s.connect(('127.0.0.1', {port}))",
                     f"import _socket; _socket.socket().connect(('127.0.0.1', {port}))",
                     f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/')"):
            r = run_python(code)
            assert not r.ok and "not allowed" in r.stderr, (code, r)
    finally:
        t.join()
        server.close()
    assert not connected


def test_fork_bomb_and_process_creation_are_blocked():
    start = time.time()
    for code in ("import os\nwhile True:\n    os.fork()",
                 "import subprocess; subprocess.run(['echo', 'hi'])",
                 "import os; os.system('echo hi')",
                 "import multiprocessing; multiprocessing.Process(target=print).start()",
                 "import ctypes; ctypes.CDLL(None).fork()",
                 "import os; os.kill(os.getppid(), 9)",
                 "import pty; pty.fork()"):
        r = run_python(code, timeout_s=3)
        assert not r.ok and not r.timed_out, (code, r)
        assert "not allowed" in r.stderr, (code, r.stderr)
    assert time.time() - start < 20


def test_infinite_loop_times_out_and_is_killed():
    start = time.time()
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and not r.ok and "timeout" in r.error
    assert time.time() - start < 8


def test_memory_hog_is_stopped():
    r = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout
    r = run_python("a = []\nwhile True:\n    a.append(' ' * 10**7)", memory_mb=256, timeout_s=5)
    assert not r.ok and not r.timed_out and "MemoryError" in r.stderr


def test_output_is_capped():
    r = run_python("print('x' * 5_000_000)")
    assert r.ok and len(r.stdout) < 70_000 and r.stdout.endswith("[output truncated]")


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("PICOCHAT_TEST_SECRET", "hunter2")
    r = run_python("import os; print(sorted(os.environ))")
    assert r.ok and "PICOCHAT_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout


def _humaneval_program(row: dict, solution: str) -> str:
    return f"{row['prompt']}{solution}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"


def test_humaneval_canonical_passes_wrong_fails(shared_data):
    with gzip.open(shared_data / "tasks" / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    for row in (rows[0], rows[2], rows[10]):
        good = run_python(_humaneval_program(row, row["canonical_solution"]))
        assert good.ok, (row["task_id"], good)
        bad = run_python(_humaneval_program(row, "    return None\n"))
        assert not bad.ok and "AssertionError" in bad.stderr, (row["task_id"], bad)


def test_run_expression_tool():
    assert run_expression("12/60") == "0.2"
    assert run_expression("'strawberry'.count('r')") == "3"
    assert run_expression("1,200 * 3") == "3600"
    assert run_expression("x = 3\nx * 2") == "6"
    assert run_expression("print('hi')") == "hi"
    assert run_expression("1/0") is None
    assert run_expression("import os; os.system('echo pwned')") is None
    assert run_expression("while True: pass", timeout_s=1.0) is None
    assert run_expression("") is None
    assert run_expression("x = 1") is None  # nothing printed, no value


@pytest.mark.parametrize("code", ["import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
                                  "import importlib, os; importlib.reload(os)"])
def test_guards_cannot_be_lifted_the_obvious_way(code):
    r = run_python(code)
    assert not r.ok and "not allowed" in r.stderr


def test_chat_tool_cannot_read_files_outside_its_directory():
    from picochat.sandbox import run_expression, run_python

    assert run_expression('open("/etc/hostname").read()') is None
    assert run_expression("import os; os.open('/etc/hostname', os.O_RDONLY)") is None
    # the tool still computes, imports included
    assert run_expression("import math; math.sqrt(16)") == "4.0"
    assert run_expression("'strawberry'.count('r')") == "3"
    # HumanEval-style code keeps read access (its default)
    assert run_python('print(len(open("/etc/hostname").read()) > 0)').stdout.strip() == "True"
