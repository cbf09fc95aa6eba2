"""`serve --engine-process on` (serving/worker.py): the model and its scheduler in a child process, HTTP in this one.
A real uvicorn server on 127.0.0.1, the real `openai` client, a real spawned process: every answer equals the same
server's answer with the replicas in-process, and the failure paths (cancel, full queue, a dead or failing engine
process) end in one clear answer."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from picochat.config import UserError  # noqa: E402
from picochat.serving.serve import ServeConfig, create_app, load_replicas  # noqa: E402
from test_chat_cli import make_tiny_checkpoint  # noqa: E402
from test_serve import ServerThread, SlowEngine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def slow_replicas(cfg: ServeConfig, delay: float) -> tuple[list, str]:
    """An engine process's factory (the child imports this module): the checkpoint's engine, each step slowed."""
    engines, name = load_replicas(cfg)
    return [SlowEngine(e, delay) for e in engines], name


def failing_replicas() -> tuple[list, str]:
    raise UserError("no checkpoint here: train one first (picochat speedrun)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine_process_home"))


def config(ckpt, **kw) -> ServeConfig:
    return ServeConfig(api_key="", checkpoint=str(ckpt), device="cpu", **kw)


@pytest.fixture(scope="module")
def servers(ckpt):
    """The same checkpoint behind two servers: replicas in this process, and in an engine process."""
    local = create_app(config(ckpt, engine_process="off", max_batch=4), model_name="m")
    remote = create_app(config(ckpt, engine_process="on", max_batch=4), model_name="m")
    assert type(remote.state.pool).__name__ == "ProcessPool" and type(local.state.pool).__name__ == "Pool"
    with ServerThread(local) as a, ServerThread(remote) as b:
        b.pool = remote.state.pool
        yield a, b


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def stream_chat(server, content: str, **kw) -> tuple[str, str | None, dict]:
    text, finish, usage = "", None, None
    for ch in client(server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": content}], stream=True,
            stream_options={"include_usage": True}, **kw):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage.model_dump()
    return text, finish, usage


def answer(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    for key in ("id", "created"):
        out.pop(key)
    return out


def same(a, b) -> bool:
    """Equal, floats within 1e-5: the engine process runs torch on its own thread count, so fp32 sums (the
    logprobs) may differ in the last bits; texts and tokens must not."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_every_answer_equals_the_in_process_servers(servers):
    local, remote = servers
    for kw in (dict(max_tokens=20, temperature=0), dict(max_tokens=30, temperature=0, stop=["e"]),
               dict(max_tokens=16, temperature=1.0, seed=7, extra_body={"top_k": 20})):
        assert stream_chat(remote, "hello there", **kw) == stream_chat(local, "hello there", **kw), kw
    bodies = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "what is it"}], "max_tokens": 12,
                                        "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 2}),
              ("/v1/completions", {"prompt": ["the cat", "a dog"], "max_tokens": 10, "temperature": 0.9, "seed": 3,
                                   "n": 2, "logprobs": 2, "echo": True}),
              ("/v1/completions", {"prompt": "the cat", "max_tokens": 0, "echo": True, "logprobs": 1})]
    for path, body in bodies:
        got, want = answer(remote, path, body), answer(local, path, body)
        assert same(got, want), (path, got, want)
        assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"] > 0 or body["max_tokens"] == 0


def test_concurrent_streams_through_the_engine_process_equal_their_solo_runs(servers):
    local, remote = servers
    prompts = [f"tell me about {w}" for w in ("cats", "dogs", "fish", "birds", "trees", "rocks", "rain", "snow")]
    kw = dict(max_tokens=24, temperature=0)
    want = [stream_chat(local, p, **kw) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(lambda p: stream_chat(remote, p, **kw), prompts))
    assert got == want
    h = httpx.get(remote.url + "/health").json()  # the engine process's counters reach the server
    assert h["replicas"] == 1 and h["completed"] >= len(prompts) and h["queued"] == 0


def test_capacity_refusals_are_immediate(servers):
    _, remote = servers
    r = httpx.post(remote.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "n": 5, "max_tokens": 4})
    assert r.status_code == 400 and "--max-batch" in r.text and r.json()["error"]["param"] == "n"


@pytest.fixture(scope="module")
def slow_server(ckpt):
    """One request at a time, 20 ms per step, in an engine process; at most one request waiting."""
    cfg = config(ckpt, engine_process="on", max_queue=1)
    app = create_app(cfg, model_name="slow", factory=(slow_replicas, (cfg, 0.02)))
    with ServerThread(app) as s:
        s.pool = app.state.pool
        yield s


def test_a_client_that_leaves_frees_its_job_in_the_engine_process(slow_server):
    pool = slow_server.pool
    before = dict(pool.stats)
    with httpx.stream("POST", slow_server.url + "/v1/completions", timeout=30,
                      json={"prompt": "the cat", "max_tokens": 100, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the first token arrived: leave
    deadline = time.time() + 20
    while not (pool.stats["cancelled"] > before["cancelled"] and pool.stats["active"] == 0):
        assert time.time() < deadline, f"the engine process did not drop the job: {pool.stats}"
        time.sleep(0.05)
    assert pool.stats["tokens_generated"] - before["tokens_generated"] < 100


def test_a_full_queue_answers_503_at_once(slow_server):
    pool = slow_server.pool
    body = {"prompt": "the cat", "max_tokens": 40, "temperature": 0}
    with ThreadPoolExecutor(2) as ex:
        running = ex.submit(httpx.post, slow_server.url + "/v1/completions", json=body, timeout=30)
        deadline = time.time() + 20
        while pool.stats["active"] < 1:
            assert time.time() < deadline, "the first request never started"
            time.sleep(0.01)
        waiting = ex.submit(httpx.post, slow_server.url + "/v1/completions", json=body, timeout=30)
        while pool.queued() < 1:
            assert time.time() < deadline, "the second request never queued"
            time.sleep(0.01)
        t0 = time.time()
        r = httpx.post(slow_server.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and "--max-queue" in r.text and time.time() - t0 < 2
        assert running.result().status_code == 200 and waiting.result().status_code == 200


def test_a_dead_engine_process_fails_open_requests_then_answers_503(ckpt):
    cfg = config(ckpt, engine_process="on")
    app = create_app(cfg, model_name="doomed", factory=(slow_replicas, (cfg, 0.05)))
    pool = app.state.pool
    with ServerThread(app) as s:
        lines = []

        def read():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                              json={"prompt": "the cat", "max_tokens": 100, "stream": True}) as r:
                lines.extend(r.iter_lines())

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.time() + 20
        while pool.stats["active"] < 1:
            assert time.time() < deadline, "the request never started"
            time.sleep(0.01)
        os.kill(pool.proc.pid, signal.SIGKILL)
        reader.join(20)
        assert not reader.is_alive()
        assert any("engine process stopped" in ln for ln in lines) and "data: [DONE]" in lines
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and "restart the server" in r.text


def test_an_engine_process_that_cannot_load_says_why(ckpt):
    with pytest.raises(UserError, match="no checkpoint here"):
        create_app(config(ckpt, engine_process="on"), factory=(failing_replicas, ()))
