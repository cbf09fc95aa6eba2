"""Every bad input on the command line gets one line: exit 2, one non-empty stderr line naming the flag or file
(and the way out), no traceback, and nothing written under PICOCHAT_HOME.

The table runs `picochat <command> <flags>` in-process through `cli.main` (a subprocess per case would cost 2-3 s
of torch import each); a few cases run as a real subprocess to check the process's exit code and stderr as a user
sees them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picochat import cli

REPO = Path(__file__).resolve().parent.parent

# (command line with {placeholders}, text the one error line must contain). Placeholders are filled by `paths`.
CASES: list[tuple[str, str]] = [
    # argparse itself: wrong types, unknown flags, missing arguments, bad choices
    ("pretrain --depth x", "--depth"),
    ("pretrain --no-such-flag", "--no-such-flag"),
    ("pretrain --preset d99", "--preset"),
    ("data prepare", "INPUT"),
    ("eval", "KIND"),
    # device, dtype, run name
    ("pretrain --data random --device tpu", "--device tpu"),
    ("pretrain --data random --dtype float7", "--dtype float7"),
    ("pretrain --data random --run ../x", "--run '../x'"),
    ("pretrain --data random --run .hidden", "--run '.hidden'"),
    ("pretrain --data random --run a\\b", "--run"),
    ("sft --run ../x", "--run '../x'"),
    ("chat --run ../../etc", "--run"),
    ("export --out {tmp}/e --run a/b", "--run 'a/b'"),
    ("report --run ../x", "--run '../x'"),
    ("speedrun --preset tiny --run ../x --dry-run", "--run '../x'"),
    # pretrain: every numeric range, non-finite floats, impossible combinations
    ("pretrain --data random --device-batch-size -1", "--device-batch-size -1"),
    ("pretrain --data random --num-iterations -5", "--num-iterations -5"),
    ("pretrain --data random --depth 0", "--depth 0"),
    ("pretrain --data random --seq-len 0", "--seq-len 0"),
    ("pretrain --data random --total-batch-size -4096", "--total-batch-size -4096"),
    ("pretrain --data random --matrix-lr -0.1", "--matrix-lr -0.1"),
    ("pretrain --data random --embedding-lr nan", "--embedding-lr nan"),
    ("pretrain --data random --ratio inf", "--ratio inf"),
    ("pretrain --data random --ratio 0", "--ratio 0"),
    ("pretrain --data random --warmdown-frac 1.5", "--warmdown-frac 1.5"),
    ("pretrain --data random --final-lr-frac -0.1", "--final-lr-frac -0.1"),
    ("pretrain --data random --activation-budget 0", "--activation-budget 0"),
    ("pretrain --data random --warmup-steps -1", "--warmup-steps -1"),
    ("pretrain --data random --eval-tokens 0", "--eval-tokens 0"),
    ("pretrain --data random --save-every -1", "--save-every -1"),
    ("pretrain --data random --keep-last -1", "--keep-last -1"),
    ("pretrain --data random --loader-threads 0", "--loader-threads 0"),
    ("pretrain --data random --sample-every -2", "--sample-every -2"),
    ("pretrain --data random --head-dim 7", "--head-dim 7"),
    ("pretrain --data random --aspect-ratio 0", "--aspect-ratio 0"),
    ("pretrain --data random --window-pattern SXL", "--window-pattern"),
    ("pretrain --data random --depth 4 --aspect-ratio 32 --head-dim 32 --n-kv-head 3", "--n-kv-head 3"),
    ("pretrain --data random --depth 2 --seq-len 64 --device-batch-size 3 --total-batch-size 256",
     "--total-batch-size 256"),
    ("pretrain --data random --depth 1000", "--depth 1000"),
    # pretrain: paths of the wrong kind, bad shards
    ("pretrain --data {file}", "--data {file}"),
    ("pretrain --data {tmp}/missing", "--data {tmp}/missing"),
    ("pretrain --data {no_text}", "no 'text' column"),
    ("pretrain --data {int_text}", "not strings"),
    ("pretrain --data {null_text}", "null documents"),
    ("pretrain --data {garbage}", "not a readable parquet shard"),
    ("pretrain --data {single}", "only one shard"),
    ("pretrain --data random --resume {file}", "--resume"),
    ("pretrain --data {good} --tokenizer {file}", "--tokenizer {file}"),
    ("pretrain --data random --core-bundle {file}", "--core-bundle"),
    # midtrain / sft / rl
    ("sft --num-iterations -5", "--num-iterations -5"),
    ("sft --device-batch-size -1", "--device-batch-size -1"),
    ("sft --warmdown-frac 2", "--warmdown-frac 2.0"),
    ("sft --init-lr-frac inf", "--init-lr-frac inf"),
    ("sft --num-epochs 0", "--num-epochs 0.0"),
    ("sft --max-seq-len 4", "--max-seq-len 4"),
    ("sft --buffer-size 0", "--buffer-size 0"),
    ("sft --source {file}", "--source {file}"),
    ("sft --data-file {tmp}/none.jsonl", "--data-file"),
    ("sft --task-dir {file}", "--task-dir"),
    ("sft --resume {file}", "--resume"),
    ("midtrain --weight-decay -1", "--weight-decay -1.0"),
    ("midtrain --device tpu", "--device tpu"),
    ("rl --num-samples 1", "--num-samples 1"),
    ("rl --device-batch-size 0", "--device-batch-size 0"),
    ("rl --temperature -1", "--temperature -1.0"),
    ("rl --task jsonl:{tmp}/none.jsonl", "--task jsonl:"),
    # data
    ("data prepare {file} --out {file}", "--out {file}"),
    ("data prepare {file} --out {tmp}/o --docs-per-shard 0", "--docs-per-shard 0"),
    ("data prepare {file} --out {tmp}/o --val-docs 0", "--val-docs 0"),
    ("data prepare {tmp}/missing.txt --out {tmp}/o", "{tmp}/missing.txt"),
    ("data download --shards 1 --workers 0 --out {tmp}/d", "--workers 0"),
    ("data download --shards 1 --retries -1 --out {tmp}/d", "--retries -1"),
    ("data download --shards 1 --out {file}", "--out {file}"),
    ("data download --shards 0 --out {tmp}/d", "--shards 0"),
    ("data synth --out {file}", "--out {file}"),
    ("data synth --out {file}/sub", "{file}/sub: Not a directory; check that path"),  # an OSError: one line too
    ("tokenizer train --data {good} --out {file}/tok", "{file}/tok"),
    ("data synth --n-docs -1 --out {tmp}/s", "--n-docs -1"),
    ("data synth --docs-per-shard 0 --out {tmp}/s", "--docs-per-shard 0"),
    ("data synth --eval-mc-fraction 2 --out {tmp}/s", "--eval-mc-fraction 2.0"),
    # tokenizer
    ("tokenizer train --vocab-size 10 --data {tmp}", "--vocab-size 10"),
    ("tokenizer train --data {file}", "--data {file}"),
    ("tokenizer train --data {no_text} --out {tmp}/tok", "no 'text' column"),
    ("tokenizer train --data {tmp}/sh_garbage --out {file}", "--out {file}"),
    ("tokenizer train --max-chars 0", "--max-chars 0"),
    ("tokenizer eval --tokenizer {file}", "--tokenizer {file}"),
    ("tokenizer eval --tokenizer {tmp}/missing", "--tokenizer {tmp}/missing"),
    # chat, export, eval
    ("chat --checkpoint {file}", "--checkpoint {file}"),
    ("chat --checkpoint {tmp}", "no meta.json"),
    ("chat --checkpoint {tmp}/missing", "--checkpoint {tmp}/missing"),
    ("chat --top-p 0", "--top-p 0.0"),
    ("chat --top-p 1.5", "--top-p 1.5"),
    ("chat --temperature -1", "--temperature -1.0"),
    ("chat --max-tokens 0", "--max-tokens 0"),
    ("chat --top-k -1", "--top-k -1"),
    ("chat --device tpu", "--device tpu"),
    ("export --out {tmp}/e --checkpoint {file}", "--checkpoint {file}"),
    ("export --out {file} --force --checkpoint {ckpt}", "--out {file}"),
    ("export --out {ckpt_parent} --force --checkpoint {ckpt}", "overlaps the checkpoint"),
    ("export --out {ckpt}/inner --checkpoint {ckpt}", "overlaps the checkpoint"),
    ("eval chat --tasks foo", "--tasks"),
    ("eval chat --tasks ,", "--tasks"),
    ("eval chat --checkpoint {file}", "--checkpoint {file}"),
    ("eval chat --num-samples 0", "--num-samples 0"),
    ("eval chat --max-new-tokens 0", "--max-new-tokens 0"),
    ("eval chat --num-samples 4 --temperature 0", "--num-samples 4 with --temperature 0.0"),
    ("chat --seed x", "--seed"),
    ("eval chat --synth-eval {tmp}/none.jsonl", "--synth-eval"),
    ("eval base --eval-tokens 0", "--eval-tokens 0"),
    ("eval base --step -1", "--step -1"),
    ("eval base --bundle {file}", "--bundle {file}"),
    ("eval base --data {file}", "--data {file}"),
    # speedrun, report, launch, bench
    ("speedrun --preset tiny --max-steps -1 --dry-run", "--max-steps -1"),
    ("speedrun --preset tiny --nproc 0 --dry-run", "--nproc 0"),
    ("speedrun --preset tiny --price -1 --dry-run", "--price -1.0"),
    ("speedrun --preset tiny --data-dir {file} --dry-run", "--data-dir {file}"),
    ("speedrun --preset tiny --stages foo --dry-run", "--stages"),
    ("speedrun --preset tiny --set bogus --dry-run", "--set"),
    ("report --price -3", "--price -3.0"),
    ("report --run nosuch", "--run 'nosuch'"),
    ("launch --master-port 99999 --dry-run pretrain", "--master-port 99999"),
    ("launch --max-restarts -1 --dry-run pretrain", "--max-restarts -1"),
    ("launch --log-dir {file} --dry-run pretrain", "--log-dir {file}"),
    ("launch --nproc-per-node 0 --dry-run pretrain", "--nproc-per-node"),
    ("bench pretrain --steps 0", "--steps 0"),
    ("bench pretrain --depth 1000", "--depth 1000"),
    ("bench pretrain --data random --matrix-lr -1", "--matrix-lr -1.0"),
    ("bench infer --random-init --depth 2 --prompt-tokens -1", "--prompt-tokens -1"),
    ("bench infer --batch-sizes 1,x", "--batch-sizes"),
    ("bench tokenizer --shards a-b", "--shards"),
    ("bench loader --seconds nan", "--seconds nan"),
]


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture
def paths(tmp_path):
    """The files and folders the cases point at: a plain file, shard folders broken in each way, a checkpoint."""
    tmp = tmp_path / "inputs"
    tmp.mkdir()
    (tmp / "afile.txt").write_text("one document\n")
    for i in range(2):
        _write(tmp / "sh_no_text" / f"shard_{i:05d}.parquet", pa.table({"body": ["a", "b"]}))
        _write(tmp / "sh_int_text" / f"shard_{i:05d}.parquet", pa.table({"text": [1, 2]}))
        _write(tmp / "sh_null_text" / f"shard_{i:05d}.parquet", pa.table({"text": ["a", None]}))
        _write(tmp / "sh_good" / f"shard_{i:05d}.parquet", pa.table({"text": ["a", "b"]}))
        (tmp / "sh_garbage").mkdir(exist_ok=True)
        (tmp / "sh_garbage" / f"shard_{i:05d}.parquet").write_bytes(b"not parquet")
    _write(tmp / "sh_single" / "shard_00000.parquet", pa.table({"text": ["a", "b"]}))
    ckpt = tmp / "run" / "step_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    return {"tmp": str(tmp), "file": str(tmp / "afile.txt"), "no_text": str(tmp / "sh_no_text"),
            "int_text": str(tmp / "sh_int_text"), "null_text": str(tmp / "sh_null_text"),
            "garbage": str(tmp / "sh_garbage"), "good": str(tmp / "sh_good"), "single": str(tmp / "sh_single"), "ckpt": str(ckpt),
            "ckpt_parent": str(ckpt.parent)}


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse exits itself
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("line,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line(line, expect, paths, capsys, tmp_path):
    argv = [a.format(**paths) for a in line.split()]
    home = Path(os.environ["PICOCHAT_HOME"])
    before = {k: _tree(Path(v)) for k, v in paths.items() if Path(v).is_dir()}
    rc, out, err = _run_main(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    assert expect.format(**paths) in lines[0], lines[0]
    assert not (home / "runs").exists(), _tree(home)  # no run folder, header or checkpoint was started
    for k, v in paths.items():  # and no input was changed or deleted (export --force, data prepare --out)
        if k in before:
            assert _tree(Path(v)) == before[k], k


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu(capsys):
    rc, _, err = _run_main(["pretrain", "--data", "random", "--device", "cuda"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--device cuda" in err and "--device cpu" in err


def test_environment_switches_are_named(capsys, monkeypatch):
    monkeypatch.setenv("PICOCHAT_DEVICE", "tpu")
    rc, _, err = _run_main(["pretrain", "--data", "random"], capsys)
    assert rc == 2 and "PICOCHAT_DEVICE=tpu" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("PICOCHAT_DEVICE", "cpu")
    monkeypatch.setenv("PICOCHAT_DTYPE", "float7")
    rc, _, err = _run_main(["pretrain", "--data", "random"], capsys)
    assert rc == 2 and "PICOCHAT_DTYPE=float7" in err and len(err.strip().splitlines()) == 1


def test_picochat_home_that_is_a_file(capsys, monkeypatch, tmp_path):
    f = tmp_path / "home_file"
    f.write_text("x")
    monkeypatch.setenv("PICOCHAT_HOME", str(f))
    rc, _, err = _run_main(["pretrain", "--data", "random"], capsys)
    assert rc == 2 and "PICOCHAT_HOME" in err and len(err.strip().splitlines()) == 1
    assert f.read_text() == "x"


def test_depth_estimate_names_the_memory(capsys):
    rc, _, err = _run_main(["pretrain", "--data", "random", "--depth", "1000"], capsys)
    assert rc == 2
    assert "parameters" in err and "GB" in err and "--depth" in err


def test_defaults_and_presets_pass_validation():
    """The checks refuse nothing that worked: every preset and every command's defaults are valid."""
    from picochat.evals import evaluate
    from picochat.serving import chat_cli
    from picochat.stages import chat, pretrain
    from picochat.stages.midtrain import MidtrainConfig
    from picochat.stages.rl import RLConfig
    from picochat.stages.sft import SFTConfig

    for preset in pretrain.PRESETS:
        cfg = pretrain.apply_preset(pretrain.PretrainConfig(preset=preset, run=preset, data="random"))
        pretrain.validate(cfg)
    for cls in (MidtrainConfig, SFTConfig, RLConfig):
        chat.validate_stage(cls())
    chat_cli.validate(chat_cli.ChatConfig())
    evaluate.validate_base(evaluate.BaseEvalConfig())
    evaluate.validate_chat(evaluate.ChatEvalConfig())


@pytest.mark.parametrize("argv,expect", [
    (["pretrain", "--data", "random", "--num-iterations", "-5"], "--num-iterations -5"),
    (["chat", "--checkpoint", "{file}"], "--checkpoint"),
    (["pretrain", "--depth", "x"], "--depth"),
])
def test_as_a_process(argv, expect, paths, tmp_path):
    """What a user sees: the process exits 2 with one stderr line, not 0 and not a traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PICOCHAT_HOME=str(tmp_path / "home"))
    p = subprocess.run([sys.executable, "-m", "picochat", *[a.format(**paths) for a in argv]], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and expect in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "home" / "runs").exists()
