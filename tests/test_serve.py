"""`picochat serve`: a real uvicorn server on 127.0.0.1 with a tiny checkpoint, driven by the real `openai` client."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from picochat.engine import load_engine  # noqa: E402
from picochat.serving.serve import ServeConfig, create_app  # noqa: E402
from test_chat_cli import make_tiny_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a daemon thread of this process (no torch re-import, so it starts in well under a second)."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


class SlowEngine:
    """Delegates to an Engine, sleeping each step: a long generation to disconnect from."""

    def __init__(self, engine, delay=0.02):
        self._engine, self._delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *a, **k):
        for item in self._engine.generate(*a, **k):
            time.sleep(self._delay)
            yield item


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve_home"))


@pytest.fixture(scope="module")
def server(ckpt):
    engines = [load_engine(checkpoint=str(ckpt), device="cpu")[0] for _ in range(2)]
    app = create_app(ServeConfig(api_key=""), engines=engines, model_name="picochat-test")
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def locked_server(ckpt):
    engine = SlowEngine(load_engine(checkpoint=str(ckpt), device="cpu")[0])
    app = create_app(ServeConfig(api_key="sekret"), engines=[engine], model_name="picochat-locked")
    with ServerThread(app) as s:
        yield s


def client(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


MSG = [{"role": "user", "content": "Hello there"}]


def test_openai_client_non_stream_and_stream(server):
    c = client(server)
    r = c.chat.completions.create(model="picochat-test", messages=MSG, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text
    assert r.choices[0].finish_reason == "length"  # the tiny model never emits <|assistant_end|>
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    # streaming: same greedy text, chunk by chunk, with usage at the end when asked
    chunks = list(c.chat.completions.create(model="picochat-test", messages=MSG, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 8
    # models endpoint
    assert [m.id for m in c.models.list().data] == ["picochat-test"]


def test_n_seed_and_stop(server):
    c = client(server)
    kw = dict(model="x", messages=MSG, max_tokens=10, temperature=1.0, top_p=0.9, seed=5, n=3)
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]  # seeded
    assert len({ch.message.content for ch in a.choices}) > 1  # rows are independent samples
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
    full = c.chat.completions.create(model="x", messages=MSG, max_tokens=12, temperature=0).choices[0].message.content
    stop = full[4:6]
    r = c.chat.completions.create(model="x", messages=MSG, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_twenty_concurrent_streams(server):
    def one(i):
        stream = client(server).chat.completions.create(
            model="x", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=6, temperature=0.7,
            seed=i, stream=True)
        text, finish = "", None
        for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                finish = ch.choices[0].finish_reason or finish
        return text, finish

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert all(text and finish == "length" for text, finish in results)
    health = httpx.get(server.url + "/health").json()
    assert health["replicas"] == 2 and health["active"] == 0 and health["errors"] == 0


@pytest.mark.parametrize("body,param", [
    ('{"messages": [', None),                                                                   # malformed JSON
    ("[1, 2]", None),                                                                           # not an object
    (json.dumps({"model": "x"}), "messages"),                                                   # no messages
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), "messages[0].role"),      # unknown role
    (json.dumps({"messages": [{"role": "user", "content": "x" * 8001}]}), "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}] * 501}), "messages"),
    (json.dumps({"messages": MSG, "max_tokens": 100000}), "max_tokens"),
    (json.dumps({"messages": MSG, "temperature": "hot"}), "temperature"),
    (json.dumps({"messages": MSG, "n": 99}), "n"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}), "messages"),
])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    ok = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_unknown_route_and_openai_error_type(server):
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="x", messages=MSG, max_tokens=0)


def test_api_key_enforced(locked_server):
    url = locked_server.url
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(locked_server, key="wrong").chat.completions.create(model="x", messages=MSG, max_tokens=2)
    r = client(locked_server, key="sekret").chat.completions.create(model="x", messages=MSG, max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert httpx.get(url + "/health").status_code == 200  # health and the page stay open
    assert httpx.get(url + "/").status_code == 200


def test_disconnect_stops_generation(locked_server):
    url, auth = locked_server.url, {"Authorization": "Bearer sekret"}
    before = httpx.get(url + "/health", headers=auth).json()  # with a key set, /health details need the key
    body = {"messages": MSG, "max_tokens": 300, "stream": True}  # ~6 s at 20 ms/step if nobody stopped it
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=30) as r:
        assert r.status_code == 200
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data:")
            if lines >= 4:
                break  # leaving the block closes the connection mid-stream
    deadline = time.time() + 5
    while True:
        h = httpx.get(url + "/health", headers=auth).json()
        if h["active"] == 0 and h["cancelled"] > before["cancelled"]:
            break
        assert time.time() < deadline, f"generation still running after disconnect: {h}"
        time.sleep(0.05)
    assert h["tokens_generated"] - before["tokens_generated"] < 150
    # and the server still answers
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}, headers=auth)
    assert r.status_code == 200


def test_missing_server_dependency_is_a_user_error(monkeypatch):
    import builtins

    from picochat.serving import serve
    from picochat.config import UserError

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "uvicorn":
            raise ImportError("No module named 'uvicorn'", name="uvicorn")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UserError, match="pip install"):
        serve._require_server_deps()
