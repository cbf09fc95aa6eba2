"""Chat evals: categorical letter scoring, generative pass@k, HumanEval through the sandbox, synth, ChatCORE."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from picochat.evals import chat_eval as C
from picochat.conversation import render_for_completion
from picochat.model import GPTConfig, build_model
from picochat.data.tasks import mc_conversation
from picochat.tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    texts = ["Multiple Choice question: What is the capital of France? - Paris=A - Rome=B",
             "Respond only with the letter of the correct answer. A B C D",
             "Natalia sold clips to 48 of her friends in April. #### 72 1 2 3 4 5 6 7 8 9 0",
             "def add(a, b):\n    return a + b\n```python\n```"] * 10
    return Tokenizer.train(texts, vocab_size=400)


MC = [mc_conversation(f"Question number {i}?", ["red", "green", "blue", "yellow"], i % 4) for i in range(8)]


class LetterOracle(torch.nn.Module):
    """Puts a high logit on the right letter at the last prompt position of each known conversation."""

    def __init__(self, tok, convs):
        super().__init__()
        self.config = GPTConfig(sequence_len=512, vocab_size=tok.vocab_size)
        self.vocab = tok.vocab_size
        self.answers = {tuple(render_for_completion(tok, c)): tok.encode(c["answer"])[0] for c in convs}

    def forward(self, idx):
        out = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                if tuple(row[:t + 1]) in self.answers:
                    out[b, t, self.answers[tuple(row[:t + 1])]] = 5.0
        return out


def tiny_gpt(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(GPTConfig(sequence_len=256, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def test_categorical_oracle_and_padding_invariance(tok):
    preds = C.categorical_predictions(LetterOracle(tok, MC), tok, MC, "cpu", batch_tokens=10_000)
    assert preds == [c["answer"] for c in MC]
    model = tiny_gpt(tok.vocab_size)
    convs = MC + [mc_conversation("A much longer question " * 5 + "?", ["a", "b"], 1)]
    one_by_one = [C.categorical_predictions(model, tok, [c], "cpu")[0] for c in convs]
    for bt in (1, 200, 100_000):  # one row per batch, a few, all at once (right padding must not matter)
        assert C.categorical_predictions(model, tok, convs, "cpu", batch_tokens=bt) == one_by_one
    assert all(p in c["letters"] for p, c in zip(one_by_one, convs))


def test_subset_is_deterministic_and_spread():
    assert C.subset(10, None) == list(range(10)) == C.subset(10, 0) == C.subset(10, 50)
    s = C.subset(1000, 20)
    assert s == C.subset(1000, 20) and len(set(s)) == 20 and s == sorted(s)
    assert max(s) > 500  # a shuffled sample, not the head of the file


class ScriptedEngine:
    """Stands in for Engine: replies with scripted text per problem (one per sample)."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.calls = tok, replies, []

    def generate_batch(self, prompt, num_samples=1, max_tokens=256, temperature=0.0, top_k=None, seed=42):
        self.calls.append(dict(num_samples=num_samples, temperature=temperature, seed=seed))
        texts = self.replies[len(self.calls) - 1]
        texts = texts if isinstance(texts, list) else [texts] * num_samples
        seqs = [list(prompt) + self.tok.encode(t) for t in texts[:num_samples]]
        return seqs, [[0] * len(prompt) + [1] * (len(s) - len(prompt)) for s in seqs]


def _gsm8k_task():
    from picochat.data.tasks import extract_final_number

    convs = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"#### {2 * i}"}], "answer": str(2 * i)} for i in range(4)]
    return C.ChatTask("gsm8k", "generative", 0.0, convs, lambda c, r: extract_final_number(r) == c["answer"])


def test_generative_pass_at_1_and_pass_at_k(tok):
    task = _gsm8k_task()
    engine = ScriptedEngine(tok, ["so #### 0", "#### 3", "It is 4. #### 4", "no idea"])
    got = C.generative_results(engine, tok, task, task.problems)
    assert got == [True, False, True, False]
    assert [c["seed"] for c in engine.calls] == [42, 43, 44, 45]  # per-problem seeds: reproducible, not shared
    engine = ScriptedEngine(tok, [["#### 9", "#### 0"], ["#### 1", "#### 5"], ["#### 4", "#### 4"], ["x", "y"]])
    got = C.generative_results(engine, tok, task, task.problems, num_samples=2, temperature=1.0)
    assert got == [True, False, True, False]
    assert all(c["num_samples"] == 2 and c["temperature"] == 1.0 for c in engine.calls)


def test_humaneval_replies_run_in_the_sandbox(shared_data, tok):
    from picochat.data.tasks import HumanEval

    he = HumanEval(task_dir=shared_data / "tasks")
    task = C.ChatTask("humaneval", "generative", 0.0, [he[0], he[2]], he.evaluate)
    rows = [json.loads(line) for line in gzip.open(shared_data / "tasks/humaneval/HumanEval.jsonl.gz", "rt")]
    good = f"Here:\n```python\n{rows[0]['prompt']}{rows[0]['canonical_solution']}\n```"
    bad = f"```python\n{rows[2]['prompt']}    return -1\n```"
    got = C.generative_results(ScriptedEngine(tok, [good, bad]), tok, task, task.problems)
    assert got == [True, False]


def test_synth_tasks_use_the_chat_training_format(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"id": "mc-0000", "kind": "mc", "question": "Where does Bo live?\nA. X\nB. Y\nC. Z\nD. W\n"
             "Answer with the letter.", "choices": ["A", "B", "C", "D"], "answer": 2},
            {"id": "gen-0000", "kind": "gen", "question": "What is 3 + 4?", "answer": "7"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc, gen = C.synth_tasks(path)
    assert (mc.name, mc.kind, mc.baseline) == ("synth_mc", "categorical", 0.25)
    conv = mc.problems[0]
    assert conv["messages"][0]["content"] == rows[0]["question"] and conv["answer"] == "C"
    assert conv["letters"] == ["A", "B", "C", "D"]
    assert (gen.name, gen.kind, gen.baseline) == ("synth_gen", "generative", 0.0)
    assert gen.evaluate(gen.problems[0], "<<3+4=7>>3 + 4 = 7.")
    assert not gen.evaluate(gen.problems[0], "3 + 4 = 8.")
    assert C.last_number("the total is 1,200.0 apples") == "1200"
    with pytest.raises(C.UserError):
        C.synth_tasks(tmp_path / "missing.jsonl")


def test_chatcore_arithmetic_and_labels():
    res = {t: {"centered": 0.5} for t in C.STANDARD_TASKS}
    s = C.chatcore_summary(res)
    assert s["chatcore"] == 0.5 and s["chatcore_label"] == "ChatCORE" and not s["partial"]
    s = C.chatcore_summary({"arc_easy": {"centered": 0.2}, "synth_mc": {"centered": 0.8},
                            "synth_gen": {"centered": 0.5}})
    assert s["chatcore"] == pytest.approx(0.2) and s["chatcore_label"] == "ChatCORE (partial, 1 of 6 tasks)"
    assert s["chatcore_incl_synth"] == pytest.approx(0.5)
    assert C.centered(0.25, 0.25) == 0.0 and C.centered(1.0, 0.25) == 1.0 and C.centered(0.4, 0.0) == 0.4


def _task_dir(tmp_path):
    d = tmp_path / "tasks"
    (d / "arc").mkdir(parents=True)
    (d / "gsm8k").mkdir()
    arc = [{"question": f"Q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(6)]
    (d / "arc/arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    gsm = [{"question": f"What is {i}+1?", "answer": f"<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(3)]
    (d / "gsm8k/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    return d


def test_evaluate_chat_end_to_end_with_real_engine(tmp_path, tok):
    model = tiny_gpt(tok.vocab_size)
    out = C.evaluate_chat(model, tok, ["arc_easy", "gsm8k", "spellingbee"], task_dir=_task_dir(tmp_path),
                          max_problems=3, max_new_tokens=4, device="cpu", verbose=False)
    assert set(out["tasks"]) == {"arc_easy", "gsm8k", "spellingbee"}
    assert out["tasks"]["arc_easy"]["n"] == 3 and out["tasks"]["gsm8k"]["n"] == 3
    assert out["tasks"]["spellingbee"]["n"] == 3
    assert out["chatcore_label"] == "ChatCORE (partial, 3 of 6 tasks)"
    assert "ChatCORE (partial, 3 of 6 tasks)" in C.format_table(out)
    with pytest.raises(C.UserError):
        C.evaluate_chat(model, tok, ["nope"], device="cpu")
    with pytest.raises(C.UserError):
        C.evaluate_chat(model, tok, ["gsm8k"], num_samples=4, temperature=0.0, device="cpu")
