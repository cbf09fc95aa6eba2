"""The report card reads the metrics the stages actually write (names drift otherwise: tok/s went missing once)."""

import pytest

from picochat.stages.pretrain import PretrainConfig, run
from picochat.tools.report import build_report, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_of_a_real_pretraining_run_has_its_throughput_and_loss():
    out = run(PretrainConfig(data="random", vocab_size=128, depth=2, aspect_ratio=32, head_dim=16, seq_len=32,
                             device_batch_size=2, total_batch_size=64, run="card", num_iterations=4, eval_every=2,
                             eval_tokens=128, sample_every=-1, save_every=0))
    path = build_report("card")
    text = path.read_text()
    recs = read_jsonl(path.parent / "base" / "metrics.jsonl")
    tok = sorted(r["tok_per_s"] for r in recs if "tok_per_s" in r)
    assert len(tok) == 4
    row = next(line for line in text.splitlines() if line.startswith("| median tokens/s |"))
    assert float(row.split("|")[2].strip().replace(",", "")) == pytest.approx(tok[len(tok) // 2], rel=1e-3)
    assert f"| final train loss | {out['train_loss']:.4f} |" in text
    assert "| final val bpb |" in text
