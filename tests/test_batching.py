"""Continuous batching in `picochat serve` (serving/batcher.py): a real uvicorn server on 127.0.0.1 with tiny models,
driven by the real `openai` client. Requests on one replica decode together and each behaves as it would alone."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import torch  # noqa: E402

from picochat.config import UserError  # noqa: E402
from picochat.engine import Engine, load_engine, prepare_model  # noqa: E402
from picochat.model import GPTConfig, build_model  # noqa: E402
from picochat.serving import batcher  # noqa: E402
from picochat.serving import serve  # noqa: E402
from picochat.serving.serve import ServeConfig, create_app  # noqa: E402
from test_chat_cli import make_tiny_checkpoint  # noqa: E402
from test_serve import ServerThread  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("batch_home"))
    return load_engine(checkpoint=str(ckpt), device="cpu")[0]


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(ServeConfig(api_key="", max_batch=32), engines=[engine], model_name="batch")
    for rep in app.state.pool.replicas:  # chained steps, as on CUDA (test_serve.py's server runs them unchained)
        rep.chain = True
    with ServerThread(app) as s:
        s.pool = app.state.pool
        yield s


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat_stream(server, content: str, **kw) -> tuple[str, str | None]:
    text, finish = "", None
    for ch in client(server).chat.completions.create(model="x", messages=[{"role": "user", "content": content}],
                                                     stream=True, **kw):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    return text, finish


def wait_for(cond, what: str, timeout: float = 10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.01)


def slow_down(monkeypatch, seconds: float = 0.01) -> None:
    """Each batched decode step takes at least `seconds`, as a step of a real model costs about the same at batch 1
    and 16: the tiny model's own step is too cheap to show batching under the HTTP overhead of 16 streams."""
    real = batcher.decode_rows

    def slow(*a, **k):
        time.sleep(seconds)
        return real(*a, **k)

    monkeypatch.setattr(batcher, "decode_rows", slow)


@pytest.fixture
def slow_steps(monkeypatch):
    """Long enough generations to act on mid-stream."""
    slow_down(monkeypatch)


def test_sixteen_streams_decode_together_and_match_their_solo_runs(server, monkeypatch):
    prompts = [f"client {i}: " + "tell me more " * (i % 5) for i in range(16)]  # rows of different lengths
    kw = dict(max_tokens=32, temperature=0)
    solo = [chat_stream(server, p, **kw) for p in prompts]
    slow_down(monkeypatch, 0.005)
    t0 = time.perf_counter()
    for p in prompts[:2]:
        chat_stream(server, p, **kw)
    one = (time.perf_counter() - t0) / 2
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda p: chat_stream(server, p, **kw), prompts))
    both = time.perf_counter() - t0
    assert together == solo  # greedy: the same text alone or in a batch
    assert all(f == "length" and t for t, f in together)
    assert both < 8 * one, f"16 streams took {both:.3f} s, one takes {one:.3f} s"
    h = httpx.get(server.url + "/health").json()
    assert h["active"] == 0 and h["rows"] == 0 and h["errors"] == 0 and h["queued"] == 0


def test_mixed_sampling_and_stops_per_row(server):
    c = client(server)
    msgs = [[{"role": "user", "content": f"row {i}"}] for i in range(6)]
    full = [c.chat.completions.create(model="x", messages=m, max_tokens=16, temperature=0).choices[0].message.content
            for m in msgs[:2]]
    reqs = [
        dict(messages=msgs[0], max_tokens=16, temperature=0, stop=[full[0][5:7]]),   # greedy with a stop string
        dict(messages=msgs[1], max_tokens=16, temperature=0, stop=["\x00never"]),    # greedy, stop never met
        dict(messages=msgs[2], max_tokens=12, temperature=1.0, top_p=0.9, seed=3),
        dict(messages=msgs[3], max_tokens=9, temperature=0.7, extra_body={"top_k": 5}, seed=4, n=2),
        dict(messages=msgs[4], max_tokens=5, temperature=1.5, seed=5),
        dict(messages=msgs[5], max_tokens=14, temperature=1.0, extra_body={"top_k": 1}, seed=6),  # top-1 sampling is greedy
    ]

    def run(r):
        out = c.chat.completions.create(model="x", **r)
        return [(ch.message.content, ch.finish_reason) for ch in out.choices], out.usage.completion_tokens

    alone = [run(r) for r in reqs]
    with ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(run, reqs))
    assert together == alone  # each row keeps its own parameters and seed whatever else is decoding
    (text0, fin0), = together[0][0]
    assert text0 == full[0][:full[0].find(full[0][5:7])] and fin0 == "stop"
    assert together[1][0] == [(full[1], "length")]
    assert together[1][1] == 16 and together[5][1] == 14
    greedy = c.chat.completions.create(model="x", messages=msgs[5], max_tokens=14, temperature=0)
    assert together[5][0][0][0] == greedy.choices[0].message.content
    assert len({t for t, _ in together[3][0]}) == 2  # n=2: independent samples


def test_logprobs_per_row_equal_the_solo_run(server):
    c = client(server)
    prompts = [list(range(40, 40 + k)) for k in (3, 9, 17, 30)]

    def run(p):
        r = c.completions.create(model="x", prompt=p, max_tokens=10, temperature=0, logprobs=3)
        lp = r.choices[0].logprobs
        return r.choices[0].text, lp.tokens, lp.token_logprobs, [sorted(d) for d in lp.top_logprobs]

    alone = [run(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(run, prompts))
    for a, b in zip(alone, together):
        assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
        assert b[2] == pytest.approx(a[2], abs=1e-4)


def test_cancelled_stream_frees_its_row_and_the_others_finish(server, slow_steps):
    base = httpx.get(server.url + "/health").json()
    results = {}

    def run(i):
        results[i] = chat_stream(server, f"long {i}", max_tokens=120, temperature=0.5, seed=i,
                                 stream_options={"include_usage": True})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    body = {"messages": [{"role": "user", "content": "leaver"}], "max_tokens": 120, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen >= 5:
                break  # closes the connection mid-stream
    wait_for(lambda: httpx.get(server.url + "/health").json()["cancelled"] > base["cancelled"],
             "the disconnected request was not cancelled")
    h = httpx.get(server.url + "/health").json()
    assert h["rows"] <= 3, h  # its row is gone while the others still decode
    assert any(t.is_alive() for t in threads), "the other streams ended before the cancellation was seen"
    for t in threads:
        t.join(30)
    assert [results[i][1] for i in range(3)] == ["length"] * 3 and all(results[i][0] for i in range(3))
    wait_for(lambda: httpx.get(server.url + "/health").json()["rows"] == 0, "rows left after the requests ended")


def bigram_engine(tok, program: dict[int, int], tool) -> Engine:
    """A GPT whose blocks are the identity (zero output projections), so its greedy next token depends only on
    the current one: `program` maps token -> next token through the lm_head."""
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=64)
    model = build_model(cfg)
    with torch.no_grad():
        model.wte.weight.normal_()
        model.lm_head.weight.zero_()
        for src, dst in program.items():
            model.lm_head.weight[dst] += 5.0 * model.wte.weight[src] / model.wte.weight[src].norm()
    return Engine(prepare_model(model), tok, tool=tool)


@pytest.mark.parametrize("chain", [False, True])
def test_tool_call_in_one_row_while_others_decode(engine, chain):
    tok = engine.tokenizer
    sp = tok.special_tokens
    a, b, c_, d, e = 50, 51, 52, 60, 61
    program = {a: sp["<|python_start|>"], sp["<|python_start|>"]: b, b: sp["<|python_end|>"],
               sp["<|python_end|>"]: c_, sp["<|output_end|>"]: c_, c_: c_, d: e, e: d}
    started, release, calls = threading.Event(), threading.Event(), []

    def tool(expr):
        calls.append(expr)
        started.set()
        assert release.wait(20)
        return "42"

    app = create_app(ServeConfig(api_key=""), engines=[bigram_engine(tok, program, tool)], model_name="tool")
    for rep in app.state.pool.replicas:
        rep.chain = chain
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("tool", c.completions.create(
            model="x", prompt=[a], max_tokens=12, temperature=0)))
        t.start()
        assert started.wait(20)
        # the tool is still running: another request decodes and finishes meanwhile
        other = c.completions.create(model="x", prompt=[d], max_tokens=20, temperature=0)
        assert not release.is_set() and t.is_alive()
        assert other.choices[0].text == (tok.decode([e]) + tok.decode([d])) * 10
        release.set()
        t.join(20)
    text = out["tool"].choices[0].text
    assert calls == [tok.decode([b])]
    assert text == (f"<|python_start|>{tok.decode([b])}<|python_end|><|output_start|>42<|output_end|>"
                    + tok.decode([c_]) * (12 - 5 - len(tok.encode("42"))))
    assert app.state.pool.stats["tokens_generated"] == 12 + 20


def test_full_queue_is_a_503_and_oversized_requests_a_400(engine, slow_steps):
    app = create_app(ServeConfig(api_key="", max_batch=1, max_queue=1), engines=[engine], model_name="q")
    with ServerThread(app) as s:
        body = {"prompt": "hello", "max_tokens": 60}
        first = threading.Thread(target=lambda: httpx.post(s.url + "/v1/completions", json=body, timeout=30))
        first.start()
        wait_for(lambda: app.state.pool.stats["active"] == 1, "the first request did not start")
        second = threading.Thread(target=lambda: httpx.post(s.url + "/v1/completions", json=body, timeout=30))
        second.start()
        wait_for(lambda: app.state.pool.queued() == 1, "the second request was not queued")
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded", r.text
        r = httpx.post(s.url + "/v1/completions", json={**body, "n": 2}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        first.join(30)
        second.join(30)
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    with pytest.raises(UserError, match="--batch-tokens"):
        create_app(ServeConfig(batch_tokens=10), engines=[engine])


def test_lone_stream_on_the_engine_path_then_joins_the_batch(server, engine, slow_steps, monkeypatch):
    """With the batch-1 path on (CUDA's fused kernels), a lone request runs on Engine.generate; when a second one
    is admitted, the first joins the batch mid-stream (its prompt and output prefilled again) instead of stepping
    beside it. Both give their greedy text, and the first's text does not restart or repeat."""
    kw = dict(max_tokens=40, temperature=0)
    want = [chat_stream(server, p, **kw) for p in ("first", "second")]
    replica = server.pool.replicas[0]
    real = engine.generate
    emitted = []

    def slow_generate(*a, **k):
        for item in real(*a, **k):
            time.sleep(0.01)
            emitted.append(item[0][0])
            yield item

    monkeypatch.setattr(engine, "generate", slow_generate)
    replica.solo_ok = True
    joined = server.pool.timing["joined"]
    try:
        with ThreadPoolExecutor(2) as ex:
            f1 = ex.submit(chat_stream, server, "first", **kw)
            wait_for(lambda: len(emitted) >= 3, "the lone request did not take the engine path")
            f2 = ex.submit(chat_stream, server, "second", **kw)
            got = [f1.result(), f2.result()]
    finally:
        replica.solo_ok = False
    assert got == want
    assert server.pool.timing["joined"] == joined + 1
    assert 3 <= len(emitted) < 40  # the engine path stopped mid-stream: the batch emitted the rest
    assert replica.solo is None and not replica.rows


def test_a_lone_stream_joins_the_batch_unless_its_state_lives_in_generate(engine):
    """Admission counts the row a joining lone job will take; it joins ahead of the newer job with its prompt and
    output. A lone job that scores its tokens, whose output began a python call or holds a forced token stays on
    `generate` (the tool state machine lives there) and the newer job decodes beside it."""
    pool = batcher.Pool([engine], serve.TokenStrings, max_rows=8, solo=True)
    pool.close()  # its scheduler thread stops: the replica is driven by hand below
    for t in pool.threads:
        t.join(5)
    rep = pool.replicas[0]
    loop = asyncio.new_event_loop()  # never run: the events only queue

    def job(**kw):
        p = serve.Params(messages=[], max_tokens=8, temperature=0.0, top_k=None, top_p=None, n=1, seed=0, stop=[],
                         stream=False, include_usage=False, **kw)
        return serve.Job(prompt=[engine.bos, 5, 6], params=p, loop=loop, events=asyncio.Queue())

    def reset():
        rep.solo, rep.prefills, rep.gens = None, [], {}

    try:
        first = job()
        rep.start(first)
        assert rep.solo is not None and rep.solo_plain
        rep.solo = (first, iter([([7], [1])]))
        rep.solo_step()  # one token emitted on the engine path
        assert rep.solo_tokens == [7] and rep.reserved() == (1, batcher.need_positions(first))
        second = job()
        rep.start(second)
        assert rep.solo is None and [p.job for p in rep.prefills] == [first, second]
        assert rep.prefills[0].tokens == [engine.bos, 5, 6, 7] and rep.prefills[0].taken == 1
        reset()

        for lone, out in ((job(logprobs=0), []), (job(), [([engine.python_start], [1])]), (job(), [([9], [0])])):
            rep.start(lone)
            if out:
                rep.solo = (lone, iter(out))
                rep.solo_step()
            assert not rep.solo_plain and rep.reserved() == (0, 0)
            rep.start(job())
            assert rep.solo is not None and rep.solo[0] is lone and len(rep.prefills) == 1
            reset()
    finally:
        loop.close()


def test_bench_serve_splits_a_level_over_client_processes_and_merges_their_figures():
    from picochat.serving.serve import _level_result, client_processes

    # one process per 16 streams, at most a quarter of the cores, never none
    assert [client_processes(n, cpus=16) for n in (1, 8, 16, 17, 32, 64, 200)] == [1, 1, 1, 2, 2, 4, 4]
    assert client_processes(64, cpus=2) == 1 and client_processes(64, cpus=8) == 2
    a = {"start": 100.0, "end": 101.5, "streams": [(0.010, 128, 100), (0.030, 128, 128)]}
    b = {"start": 100.2, "end": 102.0, "streams": [(0.020, 64, 64), (0.040, 128, 120)]}
    r = _level_result([a, b])
    assert r["clients"] == 4 and r["tokens"] == 448 and r["chunks"] == 412 and r["client_processes"] == 2
    assert r["wall_s"] == 2.0 and r["tokens_per_s"] == 224.0  # from the first start to the last end
    assert r["ttft_p50_ms"] == 30.0 and r["ttft_p99_ms"] == 40.0  # over every stream of both processes


def test_bench_serve_runs_in_seconds(engine, tmp_path, capsys):
    from picochat import cli

    t0 = time.time()
    rc = cli.main(["bench", "serve", "--depth", "1", "--vocab-size", "320", "--prompt-tokens", "16",
                   "--new-tokens", "6", "--clients", "1,4", "--device", "cpu", "--top-k", "0"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and time.time() - t0 < 30
    import json

    res = json.loads(out[-1])
    assert res["bench"] == "serve" and [r["clients"] for r in res["results"]] == [1, 4]
    assert res["top_k"] == 0  # sampled as `bench infer` samples, not with the server's default top-k
    for r in res["results"]:
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert 0 < r["chunks"] <= r["tokens"]  # a chunk carries one token's text or more
        sv = r["server"]  # the scheduler's own breakdown of the level
        assert sv["steps"] > 0 and sv["rows_per_step"] >= 1 and 0 < sv["busy"] <= 1.5 and sv["chained"] == 0
    assert cli.main(["bench", "serve", "--clients", "1,x"]) == 2  # one line, before any model is built
    assert "--clients '1,x'" in capsys.readouterr().err


def test_bench_serve_with_the_engine_process(capsys):
    """The GPU default: the model built by a factory in a spawned child; the figures come back through the pipe."""
    import json

    from picochat import cli

    rc = cli.main(["bench", "serve", "--depth", "1", "--vocab-size", "320", "--prompt-tokens", "16",
                   "--new-tokens", "6", "--clients", "2", "--device", "cpu", "--top-k", "0", "--engine-process", "on"])
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert rc == 0 and "engine process" in res["model"] and res["device"] == "cpu"
    r = res["results"][0]
    assert r["tokens"] > 0 and r["server"]["steps"] > 0  # the child's scheduler counters reached the bench


def test_padding_rows_write_only_the_scratch_slot(engine):
    """A captured step runs a bucket of rows; its padding rows (slot = scratch) must leave live slots untouched."""
    cache = batcher.RowCache(engine, 4, 64)
    cache.k.normal_()
    cache.v.normal_()
    cache.prev.normal_()
    before = [x.clone() for x in (cache.k, cache.v, cache.prev)]
    tok = torch.tensor([[3], [4], [0], [0]])
    pos = torch.tensor([5, 7, 0, 0])
    slot = torch.tensor([0, 1, cache.rows, cache.rows])
    batcher.decode_rows(engine, cache, tok, pos, slot, 8)
    for new, old in zip((cache.k, cache.v, cache.prev), before):
        assert torch.equal(new[:, 2:4] if new.dim() == 5 else new[2:4], old[:, 2:4] if old.dim() == 5 else old[2:4])
    assert not torch.equal(cache.k[:, 0, 5], before[0][:, 0, 5])  # the live rows did write their positions
    assert torch.equal(cache.k[:, 0, 6:], before[0][:, 0, 6:])


def test_stream_events_queued_while_busy_are_merged_per_choice():
    async def go():
        q = asyncio.Queue()
        for item in [("delta", [(0, "a", None, [1]), (1, "x", None, [])]), ("delta", [(0, "b", None, [2])]),
                     ("delta", [(0, "", "stop", [])]), ("end", "done")]:
            q.put_nowait(item)
        return [d async for d in serve._deltas([object()], q)]

    assert asyncio.run(go()) == [(0, "ab", "stop", [1, 2]), (1, "x", None, [])]


@pytest.mark.parametrize("piece", [False, True])
def test_same_length_prompts_prefilled_together_match_their_solo_runs(server, slow_steps, monkeypatch, piece):
    """Fresh prompts of one length share one batched prefill forward (the model's, or with PICOCHAT_PIECE_PREFILL=1
    the step pieces'); each stream must still equal its solo run."""
    for rep in server.pool.replicas:
        monkeypatch.setattr(rep, "piece_prefill", piece)
    sizes = []
    real = batcher.Replica.prefill_together

    def spy(self, group):
        sizes.append(len(group))
        return real(self, group)

    monkeypatch.setattr(batcher.Replica, "prefill_together", spy)
    c = client(server)
    prompts = [list(range(60 + 7 * i, 60 + 7 * i + 12)) for i in range(6)]

    def run(p):
        return c.completions.create(model="x", prompt=p, max_tokens=8, temperature=0).choices[0].text

    alone = [run(p) for p in prompts]
    sizes.clear()
    with ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(run, prompts))
    assert together == alone
    assert sum(sizes) == len(prompts) and max(sizes) > 1  # at least two prompts went through one forward


class _ReplayGraph:
    """Stands in for a CUDA graph on CPU: replay reruns the captured function over the same static buffers and
    writes its static output, which is what a replay does on GPU. Lets the bucketing, padding and scratch-slot
    logic of RowCache.step run against the eager step."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


def test_padded_graph_steps_equal_eager_steps(engine, monkeypatch):
    def fake_graph(fn, pool=None):
        out = fn()  # the warm-up run: every row writes the scratch slot
        return _ReplayGraph(fn, out), out

    monkeypatch.setattr(engine.decoder, "_graph", fake_graph, raising=False)
    torch.manual_seed(0)
    graphed, eager = batcher.RowCache(engine, 8, 256), batcher.RowCache(engine, 8, 256)
    for t in (graphed.k, graphed.v, graphed.prev):
        t.normal_()
    for a, b in ((eager.k, graphed.k), (eager.v, graphed.v), (eager.prev, graphed.prev)):
        a.copy_(b)
    graphed.graphed = True
    # row counts that pad (3 -> 4, 5 -> 8) and positions that cross a T_BUCKET boundary; every other step takes
    # its tokens as a device tensor (a chained step), and from 3 rows up row 1 is being dropped (scratch slot)
    for i, (n, base) in enumerate(((3, 40), (5, 41), (1, 130), (8, 131), (6, 132))):
        toks = [(7 * j + base) % 200 for j in range(n)]
        poss = [base + j for j in range(n)]
        slots = list(range(n))
        if n >= 3:
            poss[1], slots[1] = 0, graphed.rows
        t = max(poss) + 1
        want = eager.step(toks, poss, t, slots)
        got = graphed.step(torch.tensor(toks) if i % 2 else toks, poss, t, slots)
        assert got.shape == want.shape == (n, want.shape[1])
        assert torch.allclose(got, want, atol=1e-5)
        live = slice(0, graphed.rows)  # every live slot as the eager step left it; only the scratch slot differs
        for a, b in ((graphed.k, eager.k), (graphed.v, eager.v)):
            assert torch.allclose(a[:, live], b[:, live], atol=1e-5)
        assert torch.allclose(graphed.prev[live], eager.prev[live], atol=1e-5)
    assert sorted(graphed.graphs) == [(1, 256), (4, 128), (8, 128), (8, 256)]


def test_failed_one_launch_sampler_falls_back_loudly(engine):
    """Where the one-launch Gumbel-max draw fails (here: no Triton on the CPU), the step still samples every row,
    from each request's own generator, with a warning, and the replica stays on the per-request sampler."""
    from types import SimpleNamespace

    from picochat.serving.serve import TokenStrings

    pool = batcher.Pool([engine], TokenStrings, max_rows=4)
    try:
        rep = pool.replicas[0]
        rep.gumbel, rep.scratch = True, torch.zeros(2, 4, dtype=torch.long)
        jobs = [SimpleNamespace(params=SimpleNamespace(temperature=1.0, top_k=k, top_p=None, seed=s, logprobs=None))
                for s, k in ((1, None), (2, 5))]
        for j in jobs:
            rep.gens[id(j)] = torch.Generator().manual_seed(j.params.seed)
        rows = [batcher._Row(j, 0, 3) for j in jobs]
        V = engine.model.config.vocab_size
        logits = torch.randn(2, V)
        with pytest.warns(UserWarning, match="one-launch sampler failed"):
            toks = rep.draw(rows, logits).tolist()
        assert rep.gumbel is False and len(toks) == 2 and all(0 <= t < V for t in toks)
        assert toks[1] in logits[1].topk(5).indices.tolist()  # the fallback keeps the request's top-k
    finally:
        pool.close()


def test_chained_steps_equal_unchained_steps(engine, monkeypatch):
    """Steps launched from the device tokens before the host reads them (as on CUDA) give every greedy row the
    text unchained steps give, while rows of different max_tokens end mid-chain (their slots compacted under a
    launched step) and a request arrives mid-stream."""
    slow_down(monkeypatch, 0.003)
    texts = {}
    for chain in (False, True):
        app = create_app(ServeConfig(api_key="", max_batch=8), engines=[engine], model_name="chain")
        pool = app.state.pool
        for rep in pool.replicas:
            rep.chain = chain
        with ServerThread(app) as s:
            c = client(s)

            def one(i):
                if i == 5:
                    time.sleep(0.05)  # arrives while the others decode
                r = c.completions.create(model="chain", prompt=f"row {i}: " + "so " * i, max_tokens=6 + 5 * i,
                                         temperature=0)
                return r.choices[0].text, r.choices[0].finish_reason

            with ThreadPoolExecutor(6) as ex:
                texts[chain] = list(ex.map(one, range(6)))
            assert pool.stats["rows"] == 0 and pool.stats["errors"] == 0
            chained = pool.timing["chained"]
        assert (chained > 10) if chain else chained == 0
    assert texts[True] == texts[False]
    assert all(t for t, _ in texts[True])


def test_a_failed_chained_step_fails_its_jobs_and_unchains_the_replica(engine, monkeypatch):
    """A step that raises fails the jobs in it with a clear error; the replica goes on, unchained, and serves the
    next request."""
    app = create_app(ServeConfig(api_key="", max_batch=4), engines=[engine], model_name="fail")
    rep = app.state.pool.replicas[0]
    rep.chain = True
    real = batcher.Replica.emit
    calls = {"n": 0}

    def flaky(self, rows, col, logits):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in step 3")
        return real(self, rows, col, logits)

    monkeypatch.setattr(batcher.Replica, "emit", flaky)
    with ServerThread(app) as s:
        c = client(s)
        with pytest.warns(UserWarning, match="without chained steps"):
            with pytest.raises(openai.InternalServerError, match="boom in step 3"):
                c.completions.create(model="fail", prompt="hello", max_tokens=8, temperature=0)
            assert rep.chain is False
        r = c.completions.create(model="fail", prompt="hello", max_tokens=8, temperature=0)
        assert r.choices[0].text and app.state.pool.stats["errors"] == 1


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_prefill_through_the_step_pieces_equals_the_model_forward(pattern):
    """`prefill_rows` (the server's prefill) against `GPT.forward` with a KV cache: the last position's logits,
    the cache's keys, values and smear state, for whole prompts and for a prompt in two chunks; every feature on
    (value embeddings, smear, backout, GQA, a window shorter than the prompt)."""
    from test_model import _live

    cfg = GPTConfig(sequence_len=512, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                    window_pattern=pattern, smear=True, backout=True)  # S: a 128-token window
    torch.manual_seed(0)
    m = _live(build_model(cfg))
    with torch.no_grad():
        m.backout_lambda.fill_(0.3)
    eng = Engine(m, serve._BenchTokenizer(300), cuda_graph=False, compile=False)
    ids = torch.randint(0, 300, (3, 160))
    with torch.no_grad():
        for cuts in ([160], [100, 60]):
            ref, got = m.kv_cache(3, 256), m.kv_cache(3, 256)
            t = 0
            for n in cuts:
                want = m(ids[:, t:t + n], kv_cache=ref)[:, -1]
                out = batcher.prefill_rows(eng, got, ids[:, t:t + n], n - 1)
                assert torch.allclose(out, want, atol=1e-4), (cuts, (out - want).abs().max())
                t += n
            assert got.pos == ref.pos == 160
            for a, b in ((got.k, ref.k), (got.v, ref.v), (got.prev_embed, ref.prev_embed)):
                assert torch.allclose(a, b, atol=1e-5)


def test_failed_piece_prefill_falls_back_to_the_model_forward_loudly(engine):
    """Should the step pieces fail on a prompt (a compile error on some GPU), the replica warns once, prefills with
    the model's forward from then on and returns what the forward returns, the cache at the same position."""
    pool = batcher.Pool([engine], None, max_rows=4)
    try:
        rep = pool.replicas[0]
        rep.piece_prefill = True  # as with PICOCHAT_PIECE_PREFILL=1
        m = engine.model
        ids = torch.randint(0, m.config.vocab_size, (2, 20))
        with torch.no_grad():
            ref = m.kv_cache(2, 32)
            want = m(ids, kv_cache=ref)[:, -1]
            cache = m.kv_cache(2, 32)
            real = batcher.prefill_rows

            def broken(*a):
                real(*a)  # writes the cache and moves its position, then fails
                raise RuntimeError("no kernel image for this GPU")

            batcher.prefill_rows = broken
            try:
                with pytest.warns(UserWarning, match="prefill through the decode step's pieces failed"):
                    got = rep.forward(ids, cache)
            finally:
                batcher.prefill_rows = real
        assert rep.piece_prefill is False and cache.pos == 20
        assert torch.allclose(got, want, atol=1e-5)
    finally:
        pool.close()


def test_piece_prefill_switch():
    """Off by default; the env turns it on or off; a bad value is one clear error naming the variable."""
    assert batcher.piece_prefill({}) is False
    assert batcher.piece_prefill({"PICOCHAT_PIECE_PREFILL": "0"}) is False
    assert batcher.piece_prefill({"PICOCHAT_PIECE_PREFILL": "1"}) is True
    with pytest.raises(UserError, match="PICOCHAT_PIECE_PREFILL='yes'"):
        batcher.piece_prefill({"PICOCHAT_PIECE_PREFILL": "yes"})


def test_post_wakes_a_loop_once_while_its_drain_is_pending_and_keeps_each_jobs_order():
    from types import SimpleNamespace

    loop = asyncio.new_event_loop()
    wakeups = []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda cb, *a: (wakeups.append(cb), real(cb, *a))[1]
    a, b = (SimpleNamespace(loop=loop, events=asyncio.Queue(), cancelled=threading.Event()) for _ in range(2))
    batcher.post([(a, ("delta", 1)), (b, ("delta", 1))])
    batcher.post([(a, ("delta", 2))])  # the loop has not drained yet: no second wake-up
    batcher.post([(b, ("delta", 2)), (a, ("end", "done"))])
    assert len(wakeups) == 1
    loop.run_until_complete(asyncio.sleep(0))  # the one drain runs
    assert [a.events.get_nowait() for _ in range(3)] == [("delta", 1), ("delta", 2), ("end", "done")]
    assert [b.events.get_nowait() for _ in range(2)] == [("delta", 1), ("delta", 2)]
    batcher.post([(a, ("delta", 3))])  # drained: the next post wakes the loop again
    assert len(wakeups) == 2
    loop.run_until_complete(asyncio.sleep(0))
    assert a.events.get_nowait() == ("delta", 3) and a.events.empty()
    loop.close()
    batcher.post([(a, ("delta", 4))])  # the loop is gone: nobody listens, the job is cancelled
    assert a.cancelled.is_set() and not b.cancelled.is_set() and loop not in batcher._posted
