"""Golden trajectories: the per-step losses of 20 steps of `pretrain --preset tiny` and 10 steps of SFT from it,
on CPU in fp32 with fixed seeds, asserted bit-exact against `tests/golden/trajectories.json`.

A behaviour-preserving change (a refactor, a move) keeps these green. A change that moves the numerics on purpose
regenerates the file (`PICOCHAT_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py`) and says in its commit why,
with measured evidence that the new trajectory is no worse.

The runs happen in a child process whose CPU math is pinned (PINNED): torch picks its vectorized kernels and MKL its
code path by the CPU, so the same commit gave other last bits on an AVX2 AMD machine than on the AVX-512 machine
that recorded the file. With SIMD dispatch capped and MKL in its reproducible mode, the trajectory is a property of
the code, not of the machine CI lands on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

from picochat.data import synth
from picochat import training
from picochat.stages.pretrain import PretrainConfig, run as pretrain_run
from picochat.stages.sft import SFTConfig, run as sft_run
from picochat.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "golden" / "trajectories.json"
# set before torch loads: no CPU-specific SIMD kernels in torch, MKL's reproducible code path, one thread
PINNED = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41",
          "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _losses(home: Path, stage: str) -> list[float]:
    recs = training.read_metrics(home / "runs" / "golden" / stage / "metrics.jsonl")
    by_step = {r["step"]: r["loss"] for r in recs if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def _trajectories(home: Path) -> dict[str, list[float]]:
    scfg = synth.SynthConfig(seed=1337, n_entities=12, n_lands=4, n_docs=400, docs_per_shard=200,
                             n_chat_train=400, n_chat_val=100, n_eval=20)
    synth.generate(scfg)
    data = synth.out_dir(scfg)
    docs = [t for p in sorted(data.glob("shard_*.parquet"))[:-1] for t in pq.read_table(p).column("text").to_pylist()]
    chats = [json.dumps(c) for c in synth.load_chat(data / "chat_train.jsonl")[:100]]
    tok_dir = home / "golden_tok"
    Tokenizer.train(docs + chats, vocab_size=320).save(tok_dir)
    # the tiny preset, cut to 20 steps and a 1K-token batch so the test takes seconds
    pretrain_run(PretrainConfig(preset="tiny", run="golden", data=str(data), tokenizer=str(tok_dir), device="cpu",
                                dtype="float32", compile=False, num_iterations=20, total_batch_size=1024,
                                device_batch_size=2, seq_len=256, eval_every=0, eval_tokens=2048, sample_every=-1,
                                save_every=0, loader_threads=1))
    sft_run(SFTConfig(run="golden", source="base", device="cpu", dtype="float32", num_iterations=10, eval_every=0,
                      eval_batches=1, chat_eval_items=8, device_batch_size=2, total_batch_size=512,
                      buffer_size=20, mixture="synth", val_mixture="synth:val"))
    return {"pretrain": _losses(home, "base"), "sft": _losses(home, "sft")}


def test_golden_trajectories_are_bit_exact():
    env = {**os.environ, **PINNED, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["pretrain"]) == 20 and len(got["sft"]) == 10
    if os.environ.get("PICOCHAT_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, "pinned": PINNED, **got}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got["pretrain"] == want["pretrain"], "pretrain trajectory moved (see this file's docstring)"
    assert got["sft"] == want["sft"], "SFT trajectory moved (see this file's docstring)"


if __name__ == "__main__":  # the child process of the test, under PINNED and the test's PICOCHAT_HOME
    torch.set_num_threads(1)
    print(json.dumps(_trajectories(Path(os.environ["PICOCHAT_HOME"]))))
