"""SLURM and SkyPilot templates: syntax, expected keys, and the `picochat launch` command lines they really produce.

The scripts are executed with stub `srun`/`scontrol`/`python` on PATH that record their arguments instead of
running anything; the recorded arguments must parse and plan as valid `picochat launch` invocations.
"""

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from picochat.tools.launch import parse_launch_args, plan_launch

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "launch" / "slurm.sbatch"
SKY = REPO / "launch" / "skypilot.yaml"

# python stub: records argv (one line per call, NUL-separated) with the node rank it saw
PY_STUB = '#!/usr/bin/env bash\n{ printf "%s\\0" "${SLURM_NODEID:-${SKYPILOT_NODE_RANK:-x}}" "$@"; echo; } >> "$RECORD"\n'
# srun stub: drop srun's own options, then run the command once per node with SLURM_NODEID set
SRUN_STUB = '''#!/usr/bin/env bash
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
'''
SCONTROL_STUB = '#!/usr/bin/env bash\nprintf "gpu-node-017\\ngpu-node-018\\n"\n'


def _stubs(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, text in (("python", PY_STUB), ("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (d / name).write_text(text)
        (d / name).chmod(stat.S_IRWXU)
    return d


def _records(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for line in path.read_text().splitlines():
        parts = line.split("\0")[:-1]
        out.append((parts[0], parts[1:]))
    return out


def _check_launch(argv: list[str]):
    assert argv[:3] == ["-m", "picochat", "launch"], argv
    args = parse_launch_args(argv[3:])
    plan = plan_launch(args, env={})
    return args, plan


def _env(tmp_path, **extra):
    env = {"PATH": f"{_stubs(tmp_path)}:/usr/bin:/bin", "HOME": str(tmp_path), "RECORD": str(tmp_path / "rec")}
    env.update(extra)
    return env


def test_sbatch_syntax_and_directives():
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    for d in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--signal=TERM@", "--requeue"):
        assert f"#SBATCH {d}" in text


def test_sbatch_starts_one_launch_per_node_with_rendezvous_on_the_first_host(tmp_path):
    env = _env(tmp_path, SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[017-018]",
               SLURM_GPUS_ON_NODE="8")
    r = subprocess.run(["bash", str(SBATCH), "pretrain", "--preset", "d20", "--run", "d20"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    recs = [(rank, a) for rank, a in _records(tmp_path / "rec") if "launch" in a]
    assert [rank for rank, _ in recs] == ["0", "1"]
    for rank, argv in recs:
        args, plan = _check_launch(argv)
        assert args.node_rank == int(rank) and args.nnodes == "2" and args.rdzv_id == "4242"
        assert args.rdzv_endpoint == "gpu-node-017:29400" and args.nproc_per_node == "8"
        assert args.stage_args == ["pretrain", "--preset", "d20", "--run", "d20"]
        assert "--rdzv-endpoint=gpu-node-017:29400" in plan.torchrun_args
        assert any(a.startswith(f"--rdzv-conf=is_host={1 if rank == '0' else 0}") for a in plan.torchrun_args)


def test_sbatch_speedrun_is_single_node(tmp_path):
    env = _env(tmp_path, SLURM_NNODES="1", SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1")
    r = subprocess.run(["bash", str(SBATCH), "speedrun", "--preset", "d20"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert _records(tmp_path / "rec")[-1][1] == ["-m", "picochat", "speedrun", "--preset", "d20"]
    env = _env(tmp_path, SLURM_NNODES="2", SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n[1-2]")
    r = subprocess.run(["bash", str(SBATCH), "speedrun"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--nodes 1" in r.stderr


def test_skypilot_yaml(tmp_path):
    yaml = pytest.importorskip("yaml")
    d = yaml.safe_load(SKY.read_text())
    assert d["num_nodes"] >= 1 and ":" in d["resources"]["accelerators"]
    assert "/picochat" in d["file_mounts"] and "pip install" in d["setup"] and "-e" in d["setup"]
    for var in ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_GPUS_PER_NODE"):
        assert var in d["run"]
    # run the `run` script as node 1 of 2 with the stub python
    run = tmp_path / "run.sh"
    run.write_text(d["run"])
    env = _env(tmp_path, SKYPILOT_NODE_IPS="10.0.0.5\n10.0.0.6", SKYPILOT_NODE_RANK="1", SKYPILOT_NUM_NODES="2",
               SKYPILOT_NUM_GPUS_PER_NODE="8", **{k: str(v) for k, v in d["envs"].items()})
    r = subprocess.run(["bash", str(run)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rank, argv = _records(tmp_path / "rec")[-1]
    args, plan = _check_launch(argv)
    assert args.node_rank == 1 and args.nnodes == "2" and args.rdzv_endpoint == "10.0.0.5:29400"
    assert args.stage_args == d["envs"]["STAGE"].split() and plan.nproc_per_node == 8
