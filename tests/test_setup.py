"""run.sh: the quick start sets up a project virtual environment and installs nothing outside it.

The script runs for real (bash, in a copy of the repository's run.sh); the interpreter, pip and uv are stand-ins that
record what they were asked to do, so these tests take seconds and never touch the network. The real installs run in
CI, which does the quick start once with the Debian system Python (PEP 668) in `.ci/run`.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# One stand-in serves as the base interpreter, the venv's interpreter (copied to VENV/bin/python) and uv. It appends
# {"exe", "args"} to $FAKE_LOG for every call; FAKE_VERSION, FAKE_NO_VENV and FAKE_FAIL (comma list of arguments
# that make an install fail) steer it. "torch" counts as installed once a pip/uv install of it succeeded into that venv.
FAKE = r'''#!{python}
import json, os, shutil, sys
from pathlib import Path

exe = os.path.abspath(sys.argv[0])
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"exe": exe, "args": args}) + "\n")
version = tuple(int(x) for x in os.environ.get("FAKE_VERSION", "3.11").split("."))


def venv_of(python):
    return Path(python).parent.parent


def make_venv(d):
    (Path(d) / "bin").mkdir(parents=True)
    shutil.copy(os.environ["FAKE_PY"], Path(d) / "bin" / "python")


def install(venv, pkgs):
    bad = set(os.environ.get("FAKE_FAIL", "").split(",")) & set(pkgs)
    if bad:
        print("ERROR: No matching distribution found for " + bad.pop(), file=sys.stderr)
        sys.exit(1)
    if any(p.startswith("torch") for p in pkgs):
        (venv / "torch-installed").touch()


if os.path.basename(exe) == "uv":
    if args[:1] == ["venv"]:
        make_venv(args[-1])
    elif args[:2] == ["pip", "install"]:
        install(venv_of(args[args.index("--python") + 1]), args)
    sys.exit(0)
if args[:1] == ["-c"]:
    code = args[1]
    if "import torch" in code:
        sys.exit(0 if (venv_of(exe) / "torch-installed").exists() else 1)
    if "print(" in code:
        print("%d.%d" % version)
    if "sys.exit(sys.version_info" in code:
        sys.exit(version < (3, 10))
    sys.exit(0)
if args[:2] == ["-m", "venv"]:
    if os.environ.get("FAKE_NO_VENV"):
        (Path(args[2]) / "bin").mkdir(parents=True)  # Debian leaves a half-made venv behind
        print("The virtual environment was not created successfully because ensurepip is not available.")
        sys.exit(1)
    make_venv(args[2])
    sys.exit(0)
if args[:3] == ["-m", "pip", "install"]:
    install(venv_of(exe), args)
sys.exit(0)
'''


@pytest.fixture
def sandbox(tmp_path):
    """A copy of run.sh in an empty repository folder, a stand-in python3, and a PATH without a real uv."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "run.sh", repo / "run.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE.replace("{python}", sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_LOG": str(log), "FAKE_PY": str(fake),
           "PICOCHAT_INSTALLER": "pip"}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        log.write_text("")
        return subprocess.run(["bash", str(repo / "run.sh"), *args], env={**env, **extra}, capture_output=True,
                              text=True, timeout=60)

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()]

    return SimpleSandbox(repo, bin_dir, fake, run, calls)


class SimpleSandbox:
    def __init__(self, repo, bin_dir, fake, run, calls):
        self.repo, self.bin, self.fake, self.run, self.calls = repo, bin_dir, fake, run, calls

    @property
    def venv_python(self) -> str:
        return str(self.repo / ".venv" / "bin" / "python")

    def installs(self) -> list[list[str]]:
        return [c["args"][3:] for c in self.calls() if c["args"][:3] == ["-m", "pip", "install"]]


def _last_line(p: subprocess.CompletedProcess) -> str:
    return p.stderr.strip().splitlines()[-1]


def test_first_run_creates_the_venv_and_installs_into_it_then_reuses_it(sandbox):
    p = sandbox.run("setup")
    assert p.returncode == 0, p.stderr
    calls = sandbox.calls()
    assert ["-m", "venv", ".venv"] in [c["args"] for c in calls if c["exe"] == str(sandbox.fake)]
    # nothing is installed with the system interpreter (PEP 668 refuses it); everything goes into the venv
    assert not [c for c in calls if c["exe"] == str(sandbox.fake) and "pip" in c["args"]]
    assert all(c["exe"] == sandbox.venv_python for c in calls if "install" in c["args"])
    assert sandbox.installs() == [["-q", "torch==2.13.0"], ["-q", "-e", ".[serve,report]"]]
    assert "source .venv/bin/activate" in p.stdout

    p = sandbox.run("setup")
    assert p.returncode == 0, p.stderr
    assert not [c for c in sandbox.calls() if c["args"][:2] == ["-m", "venv"]]  # reused
    assert sandbox.installs() == [["-q", "-e", ".[serve,report]"]]  # torch is there now: not installed again


def test_commands_forward_their_arguments_to_the_venv(sandbox):
    assert sandbox.run("--max-steps", "3").returncode == 0
    runs = [c for c in sandbox.calls() if c["args"][:2] == ["-m", "picochat"]]
    assert runs == [{"exe": sandbox.venv_python, "args": ["-m", "picochat", "speedrun", "--preset", "tiny",
                                                            "--max-steps", "3"]}]
    assert sandbox.run().returncode == 0
    assert [c["args"] for c in sandbox.calls() if "picochat" in c["args"]][-1][-2:] == ["--preset", "tiny"]
    assert sandbox.run("speedrun", "--rl").returncode == 0
    assert [c["args"] for c in sandbox.calls() if "picochat" in c["args"]][-1][-1] == "--rl"
    p = sandbox.run("test", "-k", "doctor")
    assert p.returncode == 0, p.stderr
    assert sandbox.installs()[-1] == ["-q", "-e", ".[test]"]
    assert {"exe": sandbox.venv_python, "args": ["-m", "pytest", "-k", "doctor"]} in sandbox.calls()
    p = sandbox.run("bogus")
    assert p.returncode == 2 and "usage" in p.stderr


def test_missing_venv_module_stops_with_the_package_to_install_and_leaves_no_half_venv(sandbox):
    p = sandbox.run("setup", FAKE_NO_VENV="1")
    assert p.returncode == 1
    assert "apt install python3-venv" in _last_line(p)
    assert not (sandbox.repo / ".venv").exists()
    assert sandbox.installs() == []


def test_python_too_old_or_missing(sandbox):
    p = sandbox.run("setup", FAKE_VERSION="3.9")
    assert p.returncode == 1 and "Python 3.9" in _last_line(p) and "3.10 or newer" in _last_line(p)
    assert not (sandbox.repo / ".venv").exists()
    p = sandbox.run("setup", PYTHON=str(sandbox.bin / "python9"))
    assert p.returncode == 1 and "not found" in _last_line(p) and "PYTHON=" in _last_line(p)


def test_a_broken_venv_is_named_and_left_alone(sandbox):
    venv = sandbox.repo / ".venv"
    (venv / "lib").mkdir(parents=True)
    (venv / "lib" / "keep").write_text("x")
    p = sandbox.run("setup")
    assert p.returncode == 1 and "rm -rf .venv" in _last_line(p)
    assert (venv / "lib" / "keep").read_text() == "x"
    assert not [c for c in sandbox.calls() if "install" in c["args"]]


def test_install_failures_stop_the_script(sandbox):
    # the pinned torch is not available (another platform): the unpinned fallback is tried, as before venvs
    p = sandbox.run("setup", FAKE_FAIL="torch==2.13.0")
    assert p.returncode == 0, p.stderr
    assert sandbox.installs()[:2] == [["-q", "torch==2.13.0"], ["-q", "torch"]]
    (sandbox.repo / ".venv" / "torch-installed").unlink()
    p = sandbox.run("setup", FAKE_FAIL="torch==2.13.0,torch")
    assert p.returncode != 0 and "installing torch" in _last_line(p)
    p = sandbox.run("test", FAKE_FAIL=".[test]")
    assert p.returncode != 0 and "installing picochat" in _last_line(p)
    assert not [c for c in sandbox.calls() if "pytest" in c["args"]]  # no test run on a half-installed venv


def test_uv_on_path_makes_and_fills_the_venv(sandbox):
    uv = sandbox.bin / "uv"
    shutil.copy(sandbox.fake, uv)
    p = sandbox.run("setup", PICOCHAT_INSTALLER="")
    assert p.returncode == 0, p.stderr
    uv_calls = [c["args"] for c in sandbox.calls() if c["exe"] == str(uv)]
    assert uv_calls[0] == ["venv", "-q", "--python", "python3", ".venv"]
    assert ["pip", "install", "-q", "--python", ".venv/bin/python", "torch==2.13.0"] in uv_calls
    assert ["pip", "install", "-q", "--python", ".venv/bin/python", "-e", ".[serve,report]"] in uv_calls
    assert sandbox.installs() == []  # no pip
    # PICOCHAT_INSTALLER=pip wins over uv on PATH (uv does not read pip's configuration: local indexes, constraints)
    p = sandbox.run("setup", PICOCHAT_INSTALLER="pip")
    assert p.returncode == 0 and not [c for c in sandbox.calls() if c["exe"] == str(uv)]
    assert sandbox.installs() == [["-q", "-e", ".[serve,report]"]]
    p = sandbox.run("setup", PICOCHAT_INSTALLER="conda")
    assert p.returncode == 1 and "expected pip or uv" in _last_line(p)


def test_an_activated_virtual_environment_is_used_as_it_is(sandbox, tmp_path):
    mine = tmp_path / "mine"
    (mine / "bin").mkdir(parents=True)
    shutil.copy(sandbox.fake, mine / "bin" / "python")
    p = sandbox.run("setup", VIRTUAL_ENV=str(mine))
    assert p.returncode == 0, p.stderr
    assert not (sandbox.repo / ".venv").exists()
    assert {c["exe"] for c in sandbox.calls() if "install" in c["args"]} == {str(mine / "bin" / "python")}


def test_pyproject_is_a_valid_project_for_pip_and_uv():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    spec = SpecifierSet(project["requires-python"])
    assert "3.10" in spec and "3.9" not in spec and f"{sys.version_info[0]}.{sys.version_info[1]}" in spec
    reqs = [Requirement(r) for r in project["dependencies"]]
    assert "torch" in {r.name for r in reqs}
    for extra, deps in project["optional-dependencies"].items():
        assert deps and all(Requirement(d) for d in deps), extra
    assert {"serve", "report", "test"} <= set(project["optional-dependencies"])  # the extras run.sh installs
    assert project["scripts"]["picochat"] == "picochat.cli:main"  # what `uv run picochat` runs
