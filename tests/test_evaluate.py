"""`picochat eval base|chat` against a real (tiny) checkpoint: outputs, metrics lines, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from picochat import cli
from picochat.checkpoint import checkpoints_dir, save_checkpoint
from picochat.config import to_dict
from picochat.data.shards import write_shards
from picochat.model import GPTConfig, build_model
from picochat.runtime import picochat_home
from picochat.tokenizer import Tokenizer

DOCS = [f"Document {i}: the river flows past the old mill and the children count {i} stones. " * 3
        for i in range(40)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path):
    """A run 'r1' with a base checkpoint at step 10, its tokenizer, data shards, a 2-task bundle, task files."""
    tok = Tokenizer.train(DOCS + ["Multiple Choice question: A B C D #### 12 water flowed"], vocab_size=350)
    tok_dir = tok.save(tmp_path / "tok")
    data = tmp_path / "data"
    write_shards(DOCS, data, docs_per_shard=20, row_group=10)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    meta = {"stage": "base", "run": "r1", "model_config": to_dict(cfg), "tokenizer_dir": str(tok_dir),
            "config": {"data": str(data)}}
    save_checkpoint(checkpoints_dir("r1", "base"), 10, model.state_dict(), None, meta)
    bundle = tmp_path / "bundle"
    (bundle / "eval_data/cr").mkdir(parents=True)
    (bundle / "eval_data/cr/copa.jsonl").write_text("".join(json.dumps(
        {"query": f"Thing {i} happened, therefore", "choices": ["water flowed.", "it rained."], "gold": i % 2}) + "\n"
        for i in range(4)))
    (bundle / "eval_data/cr/lambada.jsonl").write_text("".join(json.dumps(
        {"context": f"The children count {i}", "continuation": "stones"}) + "\n" for i in range(3)))
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n- label: copa\n  dataset_uri: cr/copa.jsonl\n  num_fewshot: [1]\n"
        "  icl_task_type: multiple_choice\n- label: lambada_openai\n  dataset_uri: cr/lambada.jsonl\n"
        "  num_fewshot: [0]\n  icl_task_type: language_modeling\n")
    tasks = tmp_path / "tasks"
    (tasks / "arc").mkdir(parents=True)
    (tasks / "arc/arc_easy_test.jsonl").write_text("".join(json.dumps(
        {"question": f"Q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4}) + "\n" for i in range(4)))
    synth = tmp_path / "eval.jsonl"
    synth.write_text(json.dumps({"id": "gen-0", "kind": "gen", "question": "What is 5 + 7?", "answer": "12"}) + "\n")
    return dict(bundle=bundle, data=data, tasks=tasks, synth=synth)


def _metrics(stage="base"):
    path = picochat_home() / "runs/r1" / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_base_core_writes_results(setup):
    rc = cli.main(["eval", "base", "--run", "r1", "--core", "--bundle", str(setup["bundle"]), "--device", "cpu"])
    assert rc == 0
    edir = picochat_home() / "runs/r1/eval"
    res = json.loads((edir / "base_core.json").read_text())
    core = res["core"]
    assert res["step"] == 10 and set(core["tasks"]) == {"copa", "lambada_openai"}
    assert core["core_label"] == "CORE (partial, 2 of 22 tasks)" and core["partial"]
    assert core["tasks"]["copa"]["n"] == 4 and core["tasks"]["lambada_openai"]["n"] == 3
    assert "hellaswag" in core["missing"]
    import csv

    rows = list(csv.reader((edir / "base_core.csv").read_text().splitlines()))
    assert rows[0][:3] == ["task", "type", "shots"] and rows[1][:4] == ["copa", "MC", "1", "4"]
    assert rows[-1][0] == "CORE (partial, 2 of 22 tasks)"
    line = _metrics()[-1]
    assert line["eval"] == "base" and line["step"] == 10 and line["core"] == core["core"]


def test_eval_base_bpb_and_samples(setup):
    rc = cli.main(["eval", "base", "--run", "r1", "--bpb", "--samples", "--eval-tokens", "1024",
                   "--device-batch-size", "2", "--device", "cpu"])
    assert rc == 0
    edir = picochat_home() / "runs/r1/eval"
    bpb = json.loads((edir / "base_bpb.json").read_text())
    assert math.isfinite(bpb["val_bpb"]) and math.isfinite(bpb["train_bpb"]) and bpb["val_bpb"] > 0
    assert bpb["data"] == str(setup["data"])  # taken from the checkpoint's config
    assert bpb["val_batches"] == bpb["train_batches"] == 1024 // (2 * 64)
    samples = json.loads((edir / "base_samples.json").read_text())["samples"]
    assert len(samples) == 7 and all("completion" in s for s in samples)
    line = _metrics()[-1]
    assert line["val_bpb"] == bpb["val_bpb"] and "core" not in line


def test_eval_chat_on_a_base_checkpoint(setup):
    rc = cli.main(["eval", "chat", "--run", "r1", "--source", "base", "--tasks", "arc_easy,synth",
                   "--task-dir", str(setup["tasks"]), "--synth-eval", str(setup["synth"]), "--max-new-tokens", "4",
                   "--device", "cpu"])
    assert rc == 0
    res = json.loads((picochat_home() / "runs/r1/eval/base_chat.json").read_text())
    assert set(res["tasks"]) == {"arc_easy", "synth_gen"}
    assert res["tasks"]["arc_easy"]["n"] == 4 and res["chatcore_label"] == "ChatCORE (partial, 1 of 6 tasks)"
    assert (picochat_home() / "runs/r1/eval/base_chat.csv").exists()
    assert _metrics()[-1]["eval"] == "chat"


def test_errors_are_user_errors(setup, capsys):
    assert cli.main(["eval", "base", "--run", "r1", "--step", "999", "--core", "--device", "cpu"]) == 2
    assert "--step 999" in capsys.readouterr().err
    assert cli.main(["eval", "chat", "--run", "r1", "--device", "cpu"]) == 2  # no sft checkpoint
    assert "no 'sft' checkpoint" in capsys.readouterr().err
    assert cli.main(["eval", "base", "--run", "r1", "--core", "--bundle", "/nonexistent", "--device", "cpu"]) == 2
    assert cli.main(["eval", "base", "--run", "r1", "--bpb", "--device", "cpu"]) == 2  # 128 x 64 > the data
    assert "lower --device-batch-size" in capsys.readouterr().err


def test_run_dispatch_and_random_init(setup, tmp_path):
    from picochat.evals.evaluate import BaseEvalConfig, run

    tok_dir = tmp_path / "tok"
    out = run(BaseEvalConfig(random_init=True, depth=1, tokenizer=str(tok_dir), core=True,
                             bundle=str(setup["bundle"]), device="cpu"))
    assert out["random_init"] and out["run"] == "random_d1" and out["core"]["n_tasks"] == 2
    with pytest.raises(TypeError):
        run(object())  # type: ignore[arg-type]
