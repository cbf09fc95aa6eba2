"""Tasks: real-data loaders (shared data), GSM8K tool-call parsing, generators, mixture determinism/oversampling."""

import json
from collections import Counter

import pytest

from picochat.config import UserError
from picochat.conversation import validate
from picochat.data.tasks import (ARC, GSM8K, MMLU, HumanEval, Identity, JSONLConversations, ListTask, SimpleSpelling,
                            SpellingBee, TaskMixture, TaskSequence, extract_final_number, gsm8k_parts, parse_mixture,
                            render_mc)


def test_gsm8k_annotations_on_real_lines(shared_data):
    task = GSM8K("train", task_dir=shared_data / "tasks")
    assert len(task) == 7473
    raw = json.loads((shared_data / "tasks/gsm8k/train.jsonl").read_text().splitlines()[0])
    conv = task[0]
    validate(conv, "gsm8k train 0", require_assistant_last=True)
    parts = conv["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output",
                                          "text"]
    assert parts[1] == {"type": "python", "text": "48/2"} and parts[2] == {"type": "python_output", "text": "24"}
    assert parts[4]["text"] == "48+24" and parts[5]["text"] == "72"
    assert parts[-1]["text"].endswith("#### 72") and conv["answer"] == "72"
    # text parts + outputs reassemble the original solution minus the annotation markup
    rebuilt = "".join(p["text"] if p["type"] != "python" else "" for p in parts)
    assert rebuilt.replace("2472", "24").replace("7272", "72") != raw["answer"]  # sanity: markup really removed
    assert "<<" not in "".join(p["text"] for p in parts)
    # every real solution parses to well-formed parts and a numeric answer
    for i in range(0, len(task), 97):
        c = task[i]
        validate(c, f"gsm8k {i}")
        assert c["answer"] is not None and task.evaluate(c, f"blah #### {c['answer']}")
        assert not task.evaluate(c, "#### 123456789")
    test = GSM8K("test", task_dir=shared_data / "tasks")
    assert len(test) == 1319


def test_gsm8k_parts_edge_cases():
    assert gsm8k_parts("no tools\n#### 3") == [{"type": "text", "text": "no tools\n#### 3"}]
    p = gsm8k_parts("a <<2*3=6>>6 and <<bad>> #### 1,000")
    assert p[1] == {"type": "python", "text": "2*3"} and {"type": "text", "text": "<<bad>>"} in p
    assert extract_final_number("x #### 1,000") == "1000" and extract_final_number("#### -2.50") == "-2.5"
    assert extract_final_number("no answer") is None


def test_mc_loaders_on_real_data(shared_data):
    mmlu = MMLU("test", task_dir=shared_data / "tasks")
    assert len(mmlu) == 14042 and mmlu.eval_type == "categorical"
    c = mmlu[0]
    validate(c, "mmlu 0")
    assert c["letters"] == ["A", "B", "C", "D"] and c["messages"][1]["content"] == c["answer"]
    assert mmlu.evaluate(c, c["answer"]) and not mmlu.evaluate(c, "Z")
    assert len(MMLU("dev", task_dir=shared_data / "tasks")) == 285
    for subset, n in (("easy", 2376), ("challenge", 1172)):
        arc = ARC(subset, "test", task_dir=shared_data / "tasks")
        assert len(arc) == n
        assert "=A" in arc[5]["messages"][0]["content"]
    he = HumanEval(task_dir=shared_data / "tasks")
    assert len(he) == 164 and "def " in he[0]["prompt"]


def test_missing_task_file_is_a_clear_error(tmp_path, monkeypatch):
    import picochat.data.tasks as tasks

    monkeypatch.setattr(tasks, "DOWNLOADS", {})  # hermetic: never reach the network
    with pytest.raises(UserError, match="--task-dir"):
        GSM8K("train", task_dir=tmp_path)


def test_render_mc_layout():
    s = render_mc("Capital of France?", ["A", "B"], ["Paris", "Rome"])
    assert s.splitlines() == ["Multiple Choice question: Capital of France?", "- Paris=A", "- Rome=B", "",
                              "Respond only with the letter of the correct answer."]


def test_generators_are_deterministic_and_valid():
    bee = SpellingBee(size=50)
    assert bee[7] == SpellingBee(size=50)[7]
    assert bee[7] != SpellingBee(size=50, split="test")[7]
    for c in bee:
        validate(c, "bee", require_assistant_last=True)
        parts = c["messages"][1]["content"]
        code = next(p["text"] for p in parts if p["type"] == "python")
        out = next(p["text"] for p in parts if p["type"] == "python_output")
        assert str(eval(code)) == out == c["answer"]  # the tool call really computes the answer
        assert bee.evaluate(c, parts[-1]["text"])
    sp = SimpleSpelling(size=5, words=["hello"])
    assert sp[0]["messages"][1]["content"] == "hello: h,e,l,l,o"
    ident = Identity(size=30)
    assert all("picochat" in " ".join(m["content"] for m in c["messages"][1::2]) or
               "ChatGPT" in c["messages"][0]["content"] for c in ident)


def test_jsonl_conversations_validation_names_line(tmp_path, shared_data):
    p = tmp_path / "mine.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError, match="mine.jsonl line 3"):
        JSONLConversations(p)
    p.write_text(json.dumps(good) + "\n")
    assert len(JSONLConversations(p)) == 1
    coffee = JSONLConversations(shared_data / "chat/taskmaster4_coffee.jsonl")
    assert len(coffee) == 1952


def test_mixture_determinism_and_oversampling():
    a = ListTask([{"id": f"a{i}"} for i in range(10)], name="a")
    b = ListTask([{"id": f"b{i}"} for i in range(4)], name="b")
    m1 = TaskMixture([a, b], weights=[1, 3], seed=1)
    m2 = TaskMixture([a, b], weights=[1, 3], seed=1)
    ids1 = [x["id"] for x in m1]
    assert ids1 == [x["id"] for x in m2]
    assert ids1 != [x["id"] for x in TaskMixture([a, b], weights=[1, 3], seed=2)]
    counts = Counter(ids1)
    assert len(m1) == 22 and all(counts[f"b{i}"] == 3 for i in range(4)) and all(counts[f"a{i}"] == 1
                                                                                 for i in range(10))
    half = TaskMixture([a], weights=[0.5])
    assert sorted(x["id"] for x in half) == [f"a{i}" for i in range(5)]
    assert len(TaskMixture([a, b], counts=[None, 9])) == 19
    seq = TaskSequence([a, b])
    assert [x["id"] for x in seq] == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(4)]
    sliced = ListTask([{"id": i} for i in range(10)], start=2, stop=9, step=3)
    assert [x["id"] for x in sliced] == [2, 5, 8]


def test_parse_mixture(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}]}) + "\n")
    m = parse_mixture("identity@20,spelling_bee*2@10,simple_spelling:test@5", data_files=[str(p)])
    assert m.sizes == [20, 20, 5, 1]
    assert [x for x in m] == [x for x in parse_mixture("identity@20,spelling_bee*2@10,simple_spelling:test@5",
                                                        data_files=[str(p)])]
    with pytest.raises(UserError, match="unknown task"):
        parse_mixture("nope")
    with pytest.raises(UserError, match="expected name"):
        parse_mixture("gsm8k**2")


def test_humaneval_scoring_runs_in_the_sandbox(shared_data):
    he = HumanEval(task_dir=shared_data / "tasks")
    conv = he[0]
    assert he.evaluate(conv, conv["messages"][1]["content"])  # the canonical solution passes its tests
    assert not he.evaluate(conv, "```python\ndef nothing():\n    pass\n```")


def test_synth_tasks_read_the_synth_formats(tmp_path):
    from picochat.data import synth
    from picochat.data.tasks import SynthChatMC, SynthMC, synth_arithmetic

    cfg = synth.SynthConfig(out=tmp_path, n_entities=12, n_lands=4, n_docs=40, docs_per_shard=20, n_chat_train=300,
                            n_chat_val=100, n_eval=30)
    synth.generate(cfg)
    mc = SynthMC(tmp_path / "eval.jsonl")
    c = mc[0]
    assert c["letters"] == ["A", "B", "C", "D"] and "\nA. " in c["messages"][0]["content"]
    assert mc.evaluate(c, c["answer"])
    val = SynthChatMC("val", directory=tmp_path)
    assert len(val) > 5 and all(x["answer"] in "ABCD" for x in val)
    train = synth_arithmetic("train", tmp_path)
    t = train[0]
    assert train.evaluate(t, f"so {t['answer']}.") and not train.evaluate(t, "no idea")
    test = synth_arithmetic("test", tmp_path)
    assert len(test) >= 1 and test.evaluate(test[0], test[0]["answer"])


def test_missing_synth_sets_name_the_file_and_the_way_out(tmp_path):
    from picochat.data.tasks import synth_arithmetic

    with pytest.raises(UserError, match=r"chat_train.jsonl: the synthetic chat set is missing; run `picochat data "
                                        r"synth` first \(or pass --task gsm8k or jsonl:PATH\)"):
        synth_arithmetic("train", tmp_path)
    with pytest.raises(UserError, match="eval.jsonl: the synthetic eval set is missing"):
        synth_arithmetic("test", tmp_path)
