"""The embedded synthetic world: determinism, file formats, the held-out property, idempotence."""

import argparse
import ast
import json
import operator
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from picochat.data import synth
from picochat.config import UserError
from picochat.data.synth import SynthConfig, generate, load_chat, load_eval

SMALL = dict(n_entities=24, n_docs=600, docs_per_shard=200, n_chat_train=400, n_chat_val=40, n_eval=60)


def small(out: Path, **kw) -> SynthConfig:
    return SynthConfig(out=out, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(small(out))
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _docs(d: Path, shards: list[str]) -> list[str]:
    return [t for s in shards for t in pq.read_table(d / s).column("text").to_pylist()]


def _safe_eval(expr: str):
    """Evaluate the tool calls the data teaches: integer arithmetic and 'word'.count('c'), nothing else."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, str)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](ev(n.left), ev(n.right))
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "count"
                and len(n.args) == 1):
            return ev(n.func.value).count(ev(n.args[0]))
        raise AssertionError(f"unexpected tool expression {expr!r}")

    return ev(ast.parse(expr, mode="eval").body)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, world_dir):
    generate(small(tmp_path / "a"))
    assert _files(tmp_path / "a") == _files(world_dir)  # manifest included: no timestamps, no paths
    generate(small(tmp_path / "b", seed=7))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] != b[name], name


def test_parquet_shards_row_groups_and_val_shard(tmp_path):
    cfg = SynthConfig(out=tmp_path, n_entities=24, n_docs=2 * 2048 + 100, docs_per_shard=2048, n_chat_train=10,
                      n_chat_val=5, n_eval=8)
    summary = generate(cfg)
    shards = sorted(p.name for p in tmp_path.glob("shard_*.parquet"))
    assert shards == summary["shards"] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert summary["val_shard"] == shards[-1]
    rows = []
    for name in shards:
        f = pq.ParquetFile(tmp_path / name)
        assert f.schema_arrow.names == ["text"] and str(f.schema_arrow.field("text").type) == "string"
        groups = [f.metadata.row_group(i) for i in range(f.num_row_groups)]
        assert all(g.num_rows <= 1024 for g in groups)
        assert all(g.column(0).compression == "ZSTD" for g in groups)
        rows.append(f.metadata.num_rows)
    assert rows == [2048, 2048, 100]
    assert summary["counts"]["val_docs"] == 100 and summary["counts"]["train_docs"] == 4096
    docs = _docs(tmp_path, shards)
    assert all(isinstance(d, str) and d.strip() for d in docs)


def test_chat_schema_and_tool_calls_are_correct(world_dir):
    kinds = Counter()
    for name in ("chat_train.jsonl", "chat_val.jsonl"):
        convs = load_chat(world_dir / name)
        assert len(convs) == SMALL["n_chat_train" if "train" in name else "n_chat_val"]
        for conv in convs:
            msgs = conv["messages"]
            assert len(msgs) % 2 == 0 and len(msgs) >= 2
            for i, m in enumerate(msgs):
                assert set(m) == {"role", "content"}
                assert m["role"] == ("user" if i % 2 == 0 else "assistant")
                if m["role"] == "user":
                    assert isinstance(m["content"], str) and m["content"].strip()
                    continue
                content = m["content"]
                if isinstance(content, str):
                    assert content.strip()
                    kinds["text"] += 1
                    continue
                assert isinstance(content, list) and content
                for j, part in enumerate(content):
                    assert set(part) == {"type", "text"} and part["type"] in ("text", "python", "python_output")
                    assert isinstance(part["text"], str) and part["text"]
                    if part["type"] == "python":
                        # every tool call is answered by its true output, which the engine would force
                        out = content[j + 1]
                        assert out["type"] == "python_output"
                        assert str(_safe_eval(part["text"])) == out["text"]
                        kinds["python"] += 1
                    if part["type"] == "python_output":
                        assert content[j - 1]["type"] == "python"
                assert content[-1]["type"] == "text"  # the assistant always finishes in words
    assert kinds["python"] > 20 and kinds["text"] > 20


def test_chat_covers_every_skill(world_dir):
    users = [m["content"] for c in load_chat(world_dir / "chat_train.jsonl") for m in c["messages"]
             if m["role"] == "user"]
    assert any(u.endswith(synth.MC_SUFFIX) for u in users)
    assert any(re.match(r"(What is|Calculate|How much is|Please compute) \d+", u) for u in users)
    assert any("spell" in u.lower() for u in users) and any("letter" in u for u in users)
    assert any(u in ("Who are you?", "What is your name?", "What are you?", "Tell me about yourself.",
                     "Introduce yourself.", "Do you have a name?", "What should I call you?", "Who made you?",
                     "Who trained you?", "Where do you come from?", "Hello!", "Hi there.", "Good morning!", "Hey.",
                     "Thank you!", "Thanks a lot.", "Thanks.") for u in users)
    answers = [m["content"] for c in load_chat(world_dir / "chat_train.jsonl") for m in c["messages"]
               if m["role"] == "assistant" and isinstance(m["content"], str)]
    assert any("picochat" in a for a in answers)


def test_eval_schema_and_uniform_letters(world_dir):
    items = load_eval(world_dir / "eval.jsonl")
    assert len(items) == SMALL["n_eval"]
    assert len({it["id"] for it in items}) == len(items)
    mc = [it for it in items if it["kind"] == "mc"]
    gen = [it for it in items if it["kind"] == "gen"]
    n_facts = json.loads((world_dir / "manifest.json").read_text())["counts"]["facts"]
    assert len(mc) == min(round(SMALL["n_eval"] * 0.67), n_facts // 3)  # at most a third of the facts held out
    assert len(gen) == len(items) - len(mc) > 0
    for it in mc:
        lines = it["question"].split("\n")
        assert it["choices"] == ["A", "B", "C", "D"] and 0 <= it["answer"] < 4
        assert lines[-1] == synth.MC_SUFFIX and [ln[:3] for ln in lines[1:5]] == ["A. ", "B. ", "C. ", "D. "]
        assert len({ln[3:] for ln in lines[1:5]}) == 4  # four distinct options
    counts = Counter(it["answer"] for it in mc)
    assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1  # chance is 25%
    for it in gen:
        a, op, b = re.search(r"(\d+) (\+|-|\*|plus|minus|times) (\d+)", it["question"]).groups()
        op = {"plus": "+", "minus": "-", "times": "*"}.get(op, op)
        assert str(_safe_eval(f"{a}{op}{b}")) == it["answer"]


def test_chat_mc_letters_uniform(tmp_path):
    generate(small(tmp_path, n_chat_train=2000))
    letters = [m["content"] for c in load_chat(tmp_path / "chat_train.jsonl") for m in c["messages"]
               if m["role"] == "assistant" and m["content"] in ("A", "B", "C", "D")]
    counts = Counter(letters)
    assert len(letters) > 300 and max(counts.values()) - min(counts.values()) <= 4


def test_eval_is_held_out_from_chat_but_stated_in_pretraining(world_dir):
    chat = load_chat(world_dir / "chat_train.jsonl") + load_chat(world_dir / "chat_val.jsonl")
    user_texts = {m["content"] for c in chat for m in c["messages"] if m["role"] == "user"}
    stems = {u.split("\n")[0] for u in user_texts}
    tool_calls = {p["text"] for c in chat for m in c["messages"] if isinstance(m["content"], list)
                  for p in m["content"] if p["type"] == "python"}
    items = load_eval(world_dir / "eval.jsonl")
    for it in items:
        assert it["question"] not in user_texts
        if it["kind"] == "mc":
            assert it["question"].split("\n")[0] not in stems  # not even with other options
        else:
            a, op, b = re.search(r"(\d+) (\+|-|\*|plus|minus|times) (\d+)", it["question"]).groups()
            assert f"{a}{ {'plus': '+', 'minus': '-', 'times': '*'}.get(op, op)}{b}" not in tool_calls

    # every held-out fact is stated in the training shards, in one of its paraphrases
    cfg = small(world_dir)
    world = synth.build_world(cfg.seed, cfg.n_entities, cfg.n_lands)
    _, held = synth.split_facts(world, cfg.seed, sum(it["kind"] == "mc" for it in items))
    manifest = json.loads((world_dir / "manifest.json").read_text())
    train_text = "\n".join(_docs(world_dir, manifest["shards"][:-1]))
    for f in held:
        e, attr = world.entities[f.entity], world.attribute(f)
        statements = [synth._fill(t, e, world.value(f)) for t in attr.statements]
        assert sum(train_text.count(s) for s in statements) >= 2, statements


def test_manifest_and_idempotence(tmp_path):
    cfg = small(tmp_path)
    first = generate(cfg)
    assert first["skipped"] is False
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == cfg.seed and manifest["version"] == synth.GENERATOR_VERSION
    assert manifest["counts"]["docs"] == cfg.n_docs and manifest["counts"]["eval"] == cfg.n_eval
    assert set(manifest["files"]) == {p.name for p in tmp_path.iterdir()} - {"manifest.json"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    second = generate(cfg)
    assert second["skipped"] is True
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes

    # a damaged file is noticed and rewritten; a changed config regenerates
    (tmp_path / "eval.jsonl").write_text("{}\n")
    assert generate(cfg)["skipped"] is False
    assert json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])["kind"] == "mc"
    assert generate(small(tmp_path, n_eval=20))["skipped"] is False
    assert generate(cfg, force=True)["skipped"] is False
    assert not list(tmp_path.glob(".*part*"))  # no temp files left behind


def test_fewer_shards_remove_stale_ones_and_foreign_dirs_are_refused(tmp_path):
    generate(small(tmp_path, n_docs=1000))
    assert len(list(tmp_path.glob("shard_*.parquet"))) == 5
    summary = generate(small(tmp_path, n_docs=400))
    assert sorted(p.name for p in tmp_path.glob("shard_*.parquet")) == summary["shards"]
    assert summary["val_shard"] == "shard_00001.parquet"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard_00000.parquet").write_bytes(b"not ours")
    with pytest.raises(UserError, match="did not write"):
        generate(small(foreign))
    assert (foreign / "shard_00000.parquet").read_bytes() == b"not ours"


def test_bad_config_and_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="--n-docs"):
        generate(small(tmp_path, n_docs=100, docs_per_shard=100))
    with pytest.raises(UserError, match="--n-entities"):
        generate(small(tmp_path, n_entities=3))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        load_chat(bad)
    with pytest.raises(UserError, match="no such file"):
        load_eval(tmp_path / "missing.jsonl")
    bad.write_text('{"id": 1, "kind": "mc", "question": "q", "choices": ["A", "B"], "answer": 5}\n')
    with pytest.raises(UserError, match="item 1"):
        load_eval(bad)


def test_cli_flags_and_default_out(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    parser = argparse.ArgumentParser()
    synth.add_synth_args(parser)
    args = parser.parse_args(["--n-entities", "24", "--n-docs", "300", "--docs-per-shard", "100",
                              "--n-chat-train", "20", "--n-chat-val", "5", "--n-eval", "10", "--seed", "3"])
    assert synth.synth_main(args) == 0
    out = tmp_path / "home" / "data" / "synth"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["counts"]["shards"] == 3
    assert "3 shards" in capsys.readouterr().out
    assert synth.synth_main(args) == 0 and "up to date" in capsys.readouterr().out


def test_mc_letter_parsing():
    assert synth.mc_letter("B") == 1 and synth.mc_letter(" c.") == 2 and synth.mc_letter("D) lake") == 3
    assert synth.mc_letter("Because") is None and synth.mc_letter("") is None


def test_default_world_is_fast_and_sized_for_a_tiny_model(tmp_path):
    t0 = time.time()
    summary = generate(SynthConfig(out=tmp_path))
    assert time.time() - t0 < 15
    c = summary["counts"]
    assert 5e6 <= c["doc_chars"] <= 20e6
    assert 100 <= c["entities"] <= 300 and c["eval_mc"] >= 100 and c["eval_gen"] >= 50
