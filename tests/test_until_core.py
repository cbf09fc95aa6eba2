"""Training until CORE reaches a target (nanochat's time-to-GPT-2 protocol): the cadence, the stop with its
checkpoint, resume after the stop, the time in the leaderboard's terms in the log, the speedrun summary and the
report, and the bad inputs (a score out of range, no bundle) failing before any training."""

import json
import math
import os
import random
from pathlib import Path

import pytest

from picochat import training
from picochat.checkpoint import checkpoints_dir, list_checkpoints, read_meta
from picochat.config import ConfigError, UserError
from picochat.evals import core_eval
from picochat.stages import pretrain
from picochat.stages.pretrain import PretrainConfig, core_cadence, run
from picochat.tools import report, speedrun

pytestmark = pytest.mark.usefixtures("one_thread")

COPA = [{"query": f"Item {i} is", "choices": ["red.", "blue."], "gold": i % 2} for i in range(6)]
LAMBADA = [{"context": "the cat sat on the", "continuation": "mat"}, {"context": "a dog ran to the", "continuation": "park"}]
YAML = """icl_tasks:
- label: copa
  dataset_uri: commonsense_reasoning/copa.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
- label: lambada_openai
  dataset_uri: language_understanding/lambada_openai.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""


def _bundle(root: Path) -> Path:
    for rel, rows in (("commonsense_reasoning/copa.jsonl", COPA), ("language_understanding/lambada_openai.jsonl",
                                                                   LAMBADA)):
        p = root / "eval_data" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "core.yaml").write_text(YAML)
    return root


def _data(tmp_path: Path) -> tuple[Path, Path]:
    from picochat.data.shards import write_shards
    from picochat.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "red", "blue", "item", "is"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) + "." for _ in range(300)]
    write_shards(docs, tmp_path / "data", docs_per_shard=100, row_group=50)
    Tokenizer.train(docs, vocab_size=300).save(tmp_path / "tok")
    return tmp_path / "data", tmp_path / "tok"


def _cfg(run_name, **kw):
    base = dict(data="random", vocab_size=128, depth=2, aspect_ratio=32, head_dim=16, seq_len=32, device_batch_size=2,
                total_batch_size=128, lr_scale=1.0, warmup_steps=2, weight_decay=0.05, eval_tokens=256,
                sample_every=-1, run=run_name, num_iterations=8, eval_every=0, save_every=0, loader_threads=1)
    base.update(kw)
    return PretrainConfig(**base)


def _records(run_name):
    return training.read_metrics(Path(os.environ["PICOCHAT_HOME"]) / "runs" / run_name / "base" / "metrics.jsonl")


def test_cadence_is_five_percent_of_the_run():
    assert [core_cadence(n) for n in (1, 8, 20, 21, 450, 16704)] == [1, 1, 1, 2, 23, 836]


def test_real_core_eval_stops_at_the_target_with_a_checkpoint_and_resumes_past_it(tmp_path, capsys):
    """A real CORE eval of a tiny model on a tiny bundle. Any score reaches -1 (centered accuracy's floor): the
    run saves and stops at the first CORE step; the same command again trains nothing; a higher target continues
    from that checkpoint to the end of the schedule."""
    data, tok = _data(tmp_path)
    bundle = _bundle(tmp_path / "bundle")
    kw = dict(data=str(data), tokenizer=str(tok), core_bundle=str(bundle), core_every=3)
    out = run(_cfg("hit", core_target=-1.0, **kw))
    assert out["step"] == 3 and out["target_reached"]["step"] == 3 and not out["stopped_early"]
    ckpts = list_checkpoints(checkpoints_dir("hit", "base"))
    assert [c.name for c in ckpts] == ["step_000003"]
    assert read_meta(ckpts[-1])["metrics"]["core_target"]["step"] == 3
    rec = next(r for r in _records("hit") if "time_to_target_s" in r)
    assert rec["core_target"] == -1.0 and rec["time_to_target_s"] == out["target_reached"]["train_time_s"] >= 0
    assert rec["hardware"] == "1 x cpu" and rec["core_eval_s"] > 0
    log = capsys.readouterr().out
    assert "[core] target -1 reached at step 3/8" in log and "evals and checkpoints not counted" in log
    assert "of the training time" in log  # the cadence's cost, at every CORE eval

    again = run(_cfg("hit", core_target=-1.0, **kw))
    assert again["step"] == 3 and again["steps_this_run"] == 0
    assert "already reached CORE" in capsys.readouterr().out

    further = run(_cfg("hit", core_target=1.0, **kw))  # unreachable: trains on to the end, evaluating on the way
    assert further["step"] == 8 and further["steps_this_run"] == 5
    assert [r["step"] for r in _records("hit") if "core_seconds" in r] == [3, 6, 8]


def test_scripted_scores_stop_at_the_first_eval_that_passes(tmp_path, monkeypatch):
    """With only --core-target, CORE runs every 5% of the run; the stop is at the first eval >= the target, not
    before (0.20 < 0.25) and not later."""
    scores = iter([0.10, 0.20, 0.26, 0.30, 0.31])
    calls = []

    def fake_core(model, tok, bundle, **kw):
        calls.append(kw.get("max_per_task"))
        return {"core": next(scores), "core_label": "CORE"}

    monkeypatch.setattr(core_eval, "evaluate_core", fake_core)
    bundle = _bundle(tmp_path / "bundle")
    out = run(_cfg("scripted", num_iterations=40, core_target=0.25, core_bundle=str(bundle)))
    assert core_cadence(40) == 2 and out["step"] == 6 and out["core"] == 0.26 and calls == [500, 500, 500]
    assert out["target_reached"] == {"step": 6, "core": 0.26, "train_time_s": out["target_reached"]["train_time_s"]}
    t = report.time_to_core(Path(os.environ["PICOCHAT_HOME"]) / "runs" / "scripted")
    assert t["step"] == 6 and "time to CORE 0.25:" in report.target_line(t) and "reached at step 6" in \
        report.target_line(t)


def test_target_not_reached_is_reported_as_such(tmp_path, monkeypatch):
    monkeypatch.setattr(core_eval, "evaluate_core", lambda *a, **k: {"core": 0.1, "core_label": "CORE"})
    out = run(_cfg("miss", num_iterations=4, core_target=0.9, core_every=2,
                   core_bundle=str(_bundle(tmp_path / "bundle"))))
    assert out["step"] == 4 and out["target_reached"] is None
    t = report.time_to_core(Path(os.environ["PICOCHAT_HOME"]) / "runs" / "miss")
    assert report.target_line(t) == "time to CORE 0.9: not reached (best CORE 0.1000)"


def test_report_card_has_the_time_to_target_line(tmp_path, monkeypatch):
    monkeypatch.setattr(core_eval, "evaluate_core", lambda *a, **k: {"core": 0.3, "core_label": "CORE"})
    run(_cfg("card", num_iterations=4, core_target=0.2565, core_every=2,
             core_bundle=str(_bundle(tmp_path / "bundle"))))
    text = report.build_report("card").read_text()
    assert "Time to CORE 0.2565: " in text and "evals excluded) on 1 x cpu; reached at step 2" in text


def test_bad_targets_and_a_missing_bundle_fail_before_training(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"--core-target 2.0: a CORE score is at most 1"):
        run(_cfg("bad", core_target=2.0))
    with pytest.raises(ConfigError, match="--core-target nan"):
        run(_cfg("bad", core_target=math.nan))
    monkeypatch.setenv("PICOCHAT_EVAL_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")  # nothing listens there
    monkeypatch.setattr(core_eval, "resolve_bundle",
                        lambda bundle=None, url=None, retries=0, _real=core_eval.resolve_bundle: _real(bundle, url, 0))
    with pytest.raises(UserError, match="cannot download the CORE eval bundle.*--bundle DIR"):
        run(_cfg("nobundle", core_target=0.2565))
    assert not list_checkpoints(checkpoints_dir("nobundle", "base"))  # nothing trained, nothing saved


def test_speedrun_until_core_passes_the_target_to_pretraining_only(tmp_path, capsys):
    cfg = speedrun.SpeedrunConfig(preset="tiny", until_core=0.2565)
    plan = {sp.name: sp.argv for sp in speedrun.build_plan(cfg, speedrun.PRESETS["tiny"], "t", 1)}
    assert plan["pretrain"][plan["pretrain"].index("--core-target") + 1] == "0.2565"
    assert all("--core-target" not in a for s, a in plan.items() if s != "pretrain")
    parser = __import__("argparse").ArgumentParser()
    speedrun.add_cli(parser)
    for bad in ("0", "1.5", "nan", "-0.1"):
        with pytest.raises(ConfigError, match=f"--until-core {float(bad)}: a CORE score in"):
            speedrun.validate_args(parser.parse_args(["--until-core", bad]))
    # the bundle is resolved before any stage runs: a bad --set path fails at once, with nothing under the run
    bad = speedrun.SpeedrunConfig(preset="tiny", until_core=0.2, run="u", sets=[f"pretrain.core-bundle={tmp_path}/x"])
    with pytest.raises(UserError, match="no such directory"):
        speedrun.run(bad)
    assert not (Path(os.environ["PICOCHAT_HOME"]) / "runs" / "u").exists()


def test_bench_ignores_the_target():
    assert "core_target" in pretrain.BENCH_SKIP
