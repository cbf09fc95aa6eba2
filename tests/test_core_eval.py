"""CORE evaluation: prompt formats, span logic, scoring, batched == one-at-a-time, partial labelling, bundle IO."""

from __future__ import annotations

import json
import threading
import zipfile

import numpy as np
import pytest
import torch

from picochat.evals import core_eval as ce
from picochat.model import GPTConfig, build_model
from picochat.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------------
# A tiny bundle written by the tests: 5 of the 22 CORE tasks, one more listed whose file is missing.

COPA = [  # 2 choices, golds balanced
    {"query": "The man turned on the faucet, therefore", "choices": ["water flowed.", "the door shut."], "gold": 0},
    {"query": "The girl found a bug, therefore", "choices": ["she sang loudly.", "she lost her appetite."], "gold": 1},
    {"query": "The sun rose, therefore", "choices": ["it got bright.", "it got cold at noon."], "gold": 0},
    {"query": "The glass fell, therefore", "choices": ["it was painted.", "it shattered on the floor."], "gold": 1},
]
ARC = [  # 4 choices, each gold position once
    {"query": "Question: What melts ice?", "choices": ["heat", "cold wind", "a rock", "the moon"], "gold": 0},
    {"query": "Question: What do plants need?", "choices": ["plastic", "sunlight", "metal", "noise"], "gold": 1},
    {"query": "Question: What is frozen water?", "choices": ["steam", "oil", "ice", "sand"], "gold": 2},
    {"query": "Question: Which is a planet?", "choices": ["a chair", "a cloud", "a tree", "Mars"], "gold": 3},
]
WINOGRAD = [
    {"context_options": ["Tom thanked Bob because Tom", "Tom thanked Bob because Bob"],
     "continuation": "had helped him.", "gold": 1},
    {"context_options": ["The cup is in the box because the cup", "The cup is in the box because the box"],
     "continuation": "is small.", "gold": 0},
]
LAMBADA = [
    {"context": "She opened the door and saw her old friend", "continuation": "Anna"},
    {"context": "He put the milk back in the", "continuation": "fridge"},
    {"context": "The children played in the", "continuation": "park"},
]
OPERATORS = [
    {"context": "op 1 2 =", "continuation": "3"},
    {"context": "op 2 2 =", "continuation": "4"},
    {"context": "op 3 4 =", "continuation": "7"},
    {"context": "op 5 1 =", "continuation": "6"},
]

YAML = """icl_tasks:
- label: copa
  dataset_uri: commonsense_reasoning/copa.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
- label: arc_easy
  dataset_uri: world_knowledge/arc_easy.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
- label: winograd
  dataset_uri: language_understanding/winograd_wsc.jsonl
  num_fewshot: [0]
  icl_task_type: schema
- label: lambada_openai
  dataset_uri: language_understanding/lambada_openai.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
- label: bigbench_operators
  dataset_uri: symbolic_problem_solving/bigbench_operators.jsonl
  num_fewshot: [2]
  icl_task_type: language_modeling
- label: hellaswag
  dataset_uri: language_understanding/hellaswag.jsonl
  num_fewshot: [10]
  icl_task_type: multiple_choice
"""

CSV = """Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description
copa,commonsense reasoning,multiple choice,0,100,50,,"x"
arc_easy,world knowledge,multiple choice,10,2376,25,,"x"
winograd,language understanding,schema,0,273,50,,"x"
lambada_openai,language understanding,language modeling,0,5153,0,,"x"
bigbench_operators,symbolic problem solving,language modeling,10,210,0,,"x"
hellaswag,language understanding,multiple choice,10,10042,25,,"x"
"""


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def bundle(tmp_path):
    root = tmp_path / "bundle"
    d = root / "eval_data"
    _write_jsonl(d / "commonsense_reasoning/copa.jsonl", COPA)
    _write_jsonl(d / "world_knowledge/arc_easy.jsonl", ARC)
    _write_jsonl(d / "language_understanding/winograd_wsc.jsonl", WINOGRAD)
    _write_jsonl(d / "language_understanding/lambada_openai.jsonl", LAMBADA)
    _write_jsonl(d / "symbolic_problem_solving/bigbench_operators.jsonl", OPERATORS)
    (root / "core.yaml").write_text(YAML)
    (root / "eval_meta_data_v1.csv").write_text(CSV)
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    texts = [json.dumps(r) for r in COPA + ARC + WINOGRAD + LAMBADA + OPERATORS] * 3
    texts += ["The quick brown fox jumps over the lazy dog. Answer: Question: op = 1 2 3 4 5 6 7"] * 5
    return Tokenizer.train(texts, vocab_size=400)


class UniformLM(torch.nn.Module):
    """Every token equally likely everywhere: MC ties go to choice 0, LM greedy never matches."""

    def __init__(self, vocab: int, seq_len: int = 512):
        super().__init__()
        self.config = GPTConfig(sequence_len=seq_len, vocab_size=vocab)
        self.vocab = vocab

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab)


class OracleLM(UniformLM):
    """Knows the gold sequences: along any prefix of one, it puts a high logit on that sequence's next token."""

    def __init__(self, vocab: int, gold_seqs: list[list[int]], seq_len: int = 512):
        super().__init__(vocab, seq_len)
        self.next: dict[tuple[int, ...], int] = {}
        for s in gold_seqs:
            for t in range(1, len(s)):
                self.next[tuple(s[:t])] = s[t]

    def forward(self, idx):
        out = torch.zeros(*idx.shape, self.vocab)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    out[b, t, nxt] = 10.0
        return out


def _gold_sequences(bundle_dir, tok) -> list[list[int]]:
    """Token sequences of the right answers, rendered exactly as the evaluator renders them."""
    golds = []
    for spec in ce.load_task_specs(ce.bundle_yaml(bundle_dir)):
        path = bundle_dir / "eval_data" / spec.dataset_uri
        if not path.exists():
            continue
        rows = ce._shuffled(ce.load_task_rows(path))
        for ex in ce.prepare_task(spec, rows, tok, list(range(len(rows))), None):
            golds.append(ex.seqs[ex.gold].tolist())
    return golds


# ----------------------------------------------------------------------------------------------------------------
# Prompt rendering (golden strings)


def test_render_multiple_choice_golden():
    spec = ce.TaskSpec("arc_easy", "x", "multiple_choice", 2, "\nAnswer: ")
    prompts = ce.render_prompts(spec, ARC[0], [ARC[1], ARC[2]])
    assert prompts[0] == ("Question: What do plants need?\nAnswer: sunlight\n\n"
                          "Question: What is frozen water?\nAnswer: ice\n\n"
                          "Question: What melts ice?\nAnswer: heat")
    assert prompts[3].endswith("Question: What melts ice?\nAnswer: the moon")
    assert len(prompts) == 4
    zero = ce.TaskSpec("copa", "x", "multiple_choice", 0)
    assert ce.render_prompts(zero, COPA[0], []) == ["The man turned on the faucet, therefore water flowed.",
                                                    "The man turned on the faucet, therefore the door shut."]


def test_render_schema_golden():
    spec = ce.TaskSpec("winograd", "x", "schema", 1)
    prompts = ce.render_prompts(spec, WINOGRAD[0], [WINOGRAD[1]])
    assert prompts == [
        "The cup is in the box because the cup is small.\n\nTom thanked Bob because Tom had helped him.",
        "The cup is in the box because the cup is small.\n\nTom thanked Bob because Bob had helped him.",
    ]


def test_render_language_modeling_golden():
    spec = ce.TaskSpec("jeopardy", "x", "language_modeling", 1, "\nAnswer: ")
    item = {"context": "  SCIENCE: This gas is H2O as a vapor ", "continuation": "steam"}
    shot = {"context": "HISTORY: First US president", "continuation": "George Washington"}
    without, with_ = ce.render_prompts(spec, item, [shot])
    assert with_ == ("HISTORY: First US president\nAnswer: George Washington\n\n"
                     "SCIENCE: This gas is H2O as a vapor\nAnswer: steam")
    assert without == ("HISTORY: First US president\nAnswer: George Washington\n\n"
                       "SCIENCE: This gas is H2O as a vapor\nAnswer:")  # trailing delimiter space stripped
    plain = ce.TaskSpec("lambada_openai", "x", "language_modeling", 0)
    assert ce.render_prompts(plain, LAMBADA[0], []) == [LAMBADA[0]["context"],
                                                        LAMBADA[0]["context"] + " Anna"]


def test_fewshot_indices_deterministic_and_exclude_self():
    for n, k in [(5, 4), (100, 10), (3, 10), (1, 3)]:
        for idx in range(n):
            picks = ce.fewshot_indices(n, idx, k)
            assert picks == ce.fewshot_indices(n, idx, k)
            assert idx not in picks and len(set(picks)) == len(picks) == min(k, n - 1)
            assert all(0 <= p < n for p in picks)
    assert ce.fewshot_indices(100, 3, 5) != ce.fewshot_indices(100, 4, 5)


def test_spans_mc_schema_lm(tok):
    bos = tok.bos_id
    mc = ce.TaskSpec("copa", "x", "multiple_choice", 0)
    p = ce.render_prompts(mc, COPA[0], [])
    ex = ce.build_example(mc, [tok.encode(s, prepend=bos) for s in p], 0, None)
    ctx = tok.encode("The man turned on the faucet, therefore", prepend=bos)
    for seq, (a, b) in zip(ex.seqs, ex.spans):
        assert b == len(seq) and a >= len(ctx) - 1 and a < b
        assert seq[:a].tolist() == ex.seqs[0][:a].tolist()  # the scored part starts after the shared prefix
    sc = ce.TaskSpec("winograd", "x", "schema", 0)
    p = ce.render_prompts(sc, WINOGRAD[0], [])
    ex = ce.build_example(sc, [tok.encode(s, prepend=bos) for s in p], 1, None)
    (a0, b0), (a1, b1) = ex.spans
    assert ex.seqs[0][a0:].tolist() == ex.seqs[1][a1:].tolist()  # the shared continuation
    assert tok.decode(ex.seqs[0][a0:].tolist()).strip().endswith("had helped him.")
    lm = ce.TaskSpec("lambada_openai", "x", "language_modeling", 0)
    p = ce.render_prompts(lm, LAMBADA[1], [])
    ex = ce.build_example(lm, [tok.encode(s, prepend=bos) for s in p], 0, None)
    (a, b), = ex.spans
    assert tok.decode(ex.seqs[0][a:b].tolist()) == " fridge"
    # cropping on the left keeps the continuation and the span inside the window
    full = len(ex.seqs[0])
    ex = ce.build_example(lm, [tok.encode(s, prepend=bos) for s in p], 0, full - 2)
    (a2, b2), = ex.spans
    assert len(ex.seqs[0]) == full - 2 and (a2, b2) == (a - 2, b - 2)
    assert tok.decode(ex.seqs[0][a2:b2].tolist()) == " fridge"


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic and labels


def test_centered_accuracy():
    assert ce.centered(0.5, 50) == 0.0
    assert ce.centered(1.0, 25) == 1.0
    assert ce.centered(0.25, 25) == 0.0
    assert ce.centered(0.625, 25) == pytest.approx(0.5)
    assert ce.centered(0.0, 50) == -1.0
    assert ce.centered(0.3, 0) == pytest.approx(0.3)
    assert ce.centered(0.62, 62) == pytest.approx(0.0)


def test_core_label_and_baselines(bundle):
    assert ce.core_label(22) == "CORE"
    assert ce.core_label(18) == "CORE (partial, 18 of 22 tasks)"
    base, source = ce.load_baselines(bundle)
    assert source == "eval_meta_data_v1.csv" and base["copa"] == 50 and base["arc_easy"] == 25
    assert base["bigbench_language_identification"] == 9.1  # built-in v1 covers what the csv lacks
    assert len(ce.CORE_TASKS) == 22


# ----------------------------------------------------------------------------------------------------------------
# End to end on the tiny bundle


def test_oracle_scores_core_one_and_partial_label(bundle, tok):
    model = OracleLM(tok.vocab_size, _gold_sequences(bundle, tok))
    r = ce.evaluate_core(model, tok, bundle, device="cpu")
    assert set(r["tasks"]) == {"copa", "arc_easy", "winograd", "lambada_openai", "bigbench_operators"}
    for label, t in r["tasks"].items():
        assert t["accuracy"] == 1.0 and t["centered"] == 1.0, label
    assert r["core"] == 1.0
    assert r["partial"] and r["n_tasks"] == 5
    assert r["core_label"] == "CORE (partial, 5 of 22 tasks)"
    assert "data file" in r["missing"]["hellaswag"]           # listed, file absent
    assert "not listed" in r["missing"]["squad"]               # not in the yaml at all
    assert len(r["missing"]) == 17
    text = ce.format_table(r)
    assert "CORE (partial, 5 of 22 tasks): 1.0000" in text and "missing hellaswag" in text


class RandomLM(UniformLM):
    """Seeded random logits: a model that guesses. (A perfectly flat model would tie, and float rounding of the
    mean loss, not chance, would pick among the tied choices.)"""

    def __init__(self, vocab: int):
        super().__init__(vocab)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, idx):
        return torch.randn(*idx.shape, self.vocab, generator=self.gen) * 3


def test_guessing_model_scores_about_zero_centered(tmp_path, tok):
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "cold", "warm", "tree", "stone", "river", "cloud", "bread"]
    root = tmp_path / "guess"
    mc2 = [{"query": f"Item {i} is", "choices": list(rng.choice(words, 2, replace=False)),
            "gold": int(rng.integers(2))} for i in range(300)]
    mc4 = [{"query": f"Question {i}:", "choices": list(rng.choice(words, 4, replace=False)),
            "gold": int(rng.integers(4))} for i in range(300)]
    lm = [{"context": f"Count {i}", "continuation": str(rng.choice(words))} for i in range(50)]
    _write_jsonl(root / "eval_data/commonsense_reasoning/copa.jsonl", mc2)
    _write_jsonl(root / "eval_data/world_knowledge/arc_easy.jsonl", mc4)
    _write_jsonl(root / "eval_data/language_understanding/lambada_openai.jsonl", lm)
    (root / "core.yaml").write_text(YAML)
    r = ce.evaluate_core(RandomLM(tok.vocab_size), tok, root, device="cpu")
    assert set(r["tasks"]) == {"copa", "arc_easy", "lambada_openai"}
    assert r["tasks"]["lambada_openai"]["accuracy"] == 0.0
    assert abs(r["tasks"]["arc_easy"]["centered"]) < 0.12 and abs(r["tasks"]["copa"]["centered"]) < 0.15
    assert abs(r["core"]) < 0.08
    assert r["baselines_from"] == "built-in DCLM v1 baselines"  # this bundle has no csv


def test_max_per_task_is_a_prefix_of_the_full_run(bundle, tok):
    model = OracleLM(tok.vocab_size, _gold_sequences(bundle, tok))
    r = ce.evaluate_core(model, tok, bundle, max_per_task=2, device="cpu")
    assert all(t["n"] == 2 for t in r["tasks"].values())
    r1 = ce.evaluate_core(model, tok, bundle, max_per_task=2, device="cpu", tasks=["copa"])
    assert list(r1["tasks"]) == ["copa"] and r1["tasks"]["copa"]["n"] == 2
    with pytest.raises(ce.UserError):
        ce.evaluate_core(model, tok, bundle, device="cpu", tasks=["nope"])


def _random_gpt(vocab: int, seq_len: int = 256) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    with torch.no_grad():  # the init is nearly uniform (zero projections); make the outputs distinct
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def test_batched_equals_one_at_a_time(bundle, tok):
    model = _random_gpt(tok.vocab_size)
    specs = ce.load_task_specs(ce.bundle_yaml(bundle))
    seqs, spans = [], []
    for spec in specs:
        path = bundle / "eval_data" / spec.dataset_uri
        if path.exists():
            rows = ce._shuffled(ce.load_task_rows(path))
            for ex in ce.prepare_task(spec, rows, tok, list(range(len(rows))), 256):
                seqs += ex.seqs
                spans += ex.spans
    ref_loss, ref_ok = ce.score_sequences_reference(model, seqs, spans, "cpu")
    for batch_tokens, fixed in ((64, False), (4096, False), (1000, True)):  # 1 row/batch .. all; padded rows
        loss, ok = ce.score_sequences(model, seqs, spans, "cpu", batch_tokens=batch_tokens, pad_id=tok.bos_id,
                                      fixed_shapes=fixed)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=1e-5)
        assert (ok == ref_ok).all()
    # the lm_head pre-hook (project only scored positions) was used, and equals projecting everything
    assert not getattr(model, "_picochat_no_select", False)
    model._picochat_no_select = True
    loss_full, ok_full = ce.score_sequences(model, seqs, spans, "cpu", batch_tokens=300, pad_id=tok.bos_id)
    del model._picochat_no_select
    np.testing.assert_allclose(loss_full, ref_loss, rtol=1e-4, atol=1e-5)
    assert (ok_full == ref_ok).all()
    a = ce.evaluate_core(model, tok, bundle, device="cpu", batch_tokens=200)
    b = ce.evaluate_core(model, tok, bundle, device="cpu", reference=True)
    assert {k: v["correct"] for k, v in a["tasks"].items()} == {k: v["correct"] for k, v in b["tasks"].items()}
    assert a["core"] == b["core"]


def test_batched_equals_reference_on_real_bundle_sample(shared_data, tok):
    """The real DCLM files (long few-shot prompts, all three types), a few examples per task."""
    model = _random_gpt(tok.vocab_size, seq_len=512)
    bundle = shared_data / "core"
    kw = dict(device="cpu", max_per_task=2, tasks=["arc_easy", "winogrande", "bigbench_operators"])
    a = ce.evaluate_core(model, tok, bundle, batch_tokens=2048, **kw)
    b = ce.evaluate_core(model, tok, bundle, reference=True, **kw)
    assert a["core"] == b["core"]
    assert {k: v["correct"] for k, v in a["tasks"].items()} == {k: v["correct"] for k, v in b["tasks"].items()}


def test_real_bundle_yaml_and_missing_files(shared_data):
    bundle = shared_data / "core"
    specs = ce.load_task_specs(bundle / "core_full22.yaml")
    assert [s.label for s in specs] == [s.label for s in specs if s.label in ce.CORE_TASKS]
    assert {s.label for s in specs} == set(ce.CORE_TASKS)
    arc = next(s for s in specs if s.label == "arc_easy")
    assert (arc.num_fewshot, arc.task_type, arc.delimiter) == (10, "multiple_choice", "\nAnswer: ")
    assert next(s for s in specs if s.label == "copa").delimiter == " "
    base, source = ce.load_baselines(bundle)
    assert source == "eval_meta_data_v1.csv"
    for label in ce.CORE_TASKS:
        assert base[label] == ce.CORE_BASELINES_V1[label], label
    missing = [s.label for s in specs if not (bundle / "eval_data" / s.dataset_uri).exists()]
    assert sorted(missing) == ["coqa", "hellaswag", "hellaswag_zeroshot", "squad"]


def test_yaml_fallback_parser_matches_pyyaml(shared_data):
    yaml = pytest.importorskip("yaml")
    for name in ("core.yaml", "core_full22.yaml"):
        text = (shared_data / "core" / name).read_text()
        assert ce._parse_icl_yaml(text) == yaml.safe_load(text)["icl_tasks"]
    assert ce._parse_icl_yaml(YAML) == yaml.safe_load(YAML)["icl_tasks"]


def test_unpack_bundle_and_resolve(tmp_path, bundle, monkeypatch):
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in bundle.rglob("*"):
            if p.is_file():
                zf.write(p, "eval_bundle/" + str(p.relative_to(bundle)))
    dest = tmp_path / "home" / "eval_bundle"
    ce._unpack_bundle(archive, dest)
    assert (dest / "core.yaml").exists() and (dest / "eval_data/commonsense_reasoning/copa.jsonl").exists()
    assert not list(dest.parent.glob(".eval_bundle.*"))  # temp dir cleaned up
    with pytest.raises(ce.UserError):
        ce.resolve_bundle(tmp_path / "nope")
    assert ce.resolve_bundle(bundle) == bundle
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ce.UserError):
        ce._unpack_bundle(bad, tmp_path / "x")


def test_compare_with_reference_reports_agreement(bundle, tok):
    check = ce.compare_with_reference(_random_gpt(tok.vocab_size), tok, bundle, max_per_task=3, device="cpu",
                                      batch_tokens=256)
    assert check["examples"] == 3 + 3 + 2 + 3 + 3 and check["decisions_differ"] == 0
    assert check["max_abs_loss_diff"] < 1e-4
    assert set(check["tasks"]) == {"copa", "arc_easy", "winograd", "lambada_openai", "bigbench_operators"}


def test_split_across_ranks_equals_single_process(bundle, tok, monkeypatch):
    """Two ranks each score their stride of every task; summing their counts (what the all-reduce does) gives the
    one-process numbers. The collective is simulated in-process: real ranks cost a torch import per process."""
    import torch.distributed as dist

    import picochat.runtime as runtime

    model = _random_gpt(tok.vocab_size)
    single = ce.evaluate_core(model, tok, bundle, device="cpu", batch_tokens=256)
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(runtime, "get_world_size", lambda: 2)

    def rank0_reduce(t, *a, **k):
        sent.append(t.clone())  # rank 0's share, before the sum

    def rank1_reduce(t, *a, **k):
        t += sent.pop(0)

    monkeypatch.setattr(runtime, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "all_reduce", rank0_reduce)
    ce.evaluate_core(model, tok, bundle, device="cpu", batch_tokens=256)
    n0 = [int(t[1]) for t in sent]
    monkeypatch.setattr(runtime, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "all_reduce", rank1_reduce)
    both = ce.evaluate_core(model, tok, bundle, device="cpu", batch_tokens=256)
    assert not sent and both["world_size"] == 2
    for (label, t), k in zip(single["tasks"].items(), n0):
        assert (both["tasks"][label]["n"], both["tasks"][label]["correct"]) == (t["n"], t["correct"]), label
        assert k == (t["n"] + 1) // 2  # rank 0 took examples 0, 2, 4, ...
    assert both["core"] == pytest.approx(single["core"])


def test_bundle_download_from_local_http_server(tmp_path, bundle, monkeypatch):
    import functools
    import http.server

    serve = tmp_path / "www"
    serve.mkdir()
    with zipfile.ZipFile(serve / "eval_bundle.zip", "w") as zf:
        for p in bundle.rglob("*"):
            if p.is_file():
                zf.write(p, "eval_bundle/" + str(p.relative_to(bundle)))
    (serve / "broken.zip").write_text("<html>not found</html>")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(serve))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ce.UserError, match="--bundle DIR"):
            ce.resolve_bundle(None, url=f"{base}/broken.zip", retries=0)
        path = ce.resolve_bundle(None, url=f"{base}/eval_bundle.zip")
        assert (path / "core.yaml").exists() and path == ce.resolve_bundle()  # cached: no URL needed now
        assert {s.label for s in ce.load_task_specs(ce.bundle_yaml(path))} >= {"copa", "winograd"}
    finally:
        server.shutdown()
