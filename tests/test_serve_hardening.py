"""`picochat serve` against hostile requests: a real uvicorn server on 127.0.0.1, raw sockets where a client library
would tidy the request up, and the real `openai` client for what must keep working afterwards."""

import argparse
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from picochat.config import UserError, config_from_args  # noqa: E402
from picochat.engine import load_engine  # noqa: E402
from picochat.serving import serve  # noqa: E402
from picochat.serving.serve import ServeConfig, create_app, max_body_bytes  # noqa: E402
from test_chat_cli import make_tiny_checkpoint  # noqa: E402
from test_serve import MSG, ServerThread, SlowEngine  # noqa: E402

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
LIMIT = max_body_bytes(ServeConfig())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve_hardening_home"))


@pytest.fixture(scope="module")
def server(ckpt):
    """Open (no key), bound to 127.0.0.1, one slow replica: long generations to walk away from."""
    engine = SlowEngine(load_engine(checkpoint=str(ckpt), device="cpu")[0], delay=0.05)
    with ServerThread(create_app(ServeConfig(api_key=""), engines=[engine], model_name="picochat-h")) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(ckpt):
    engine = load_engine(checkpoint=str(ckpt), device="cpu")[0]
    cfg = ServeConfig(api_key="sekret", allow_host=["chat.example"])
    with ServerThread(create_app(cfg, engines=[engine], model_name="picochat-keyed")) as s:
        yield s


def health(server, key=None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server.url + "/health", headers=headers).json()


def assert_error(r, status: int | tuple, param="any") -> dict:
    """An OpenAI-shaped error with a one-line message."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


def still_serves(server, key=None):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="x", messages=MSG, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2 and r.choices[0].message.content


def raw_http(port: int, head: str, chunks=(), timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    """Send exactly these bytes, read until the server closes: (status, headers, body)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode())
        for c in chunks:
            s.sendall(c)
        while True:
            part = s.recv(65536)
            if not part:
                break
            data += part
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# ----------------------------------------------------------------------------------------------------------------
# Body size: refused while reading


def test_oversize_content_length_is_refused_before_the_body_is_sent(server):
    port = server.port
    before = time.monotonic()
    # 300 MB announced, not one byte of it sent: the answer can only come from the header
    status, headers, body = raw_http(port, f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                           f"Content-Type: application/json\r\nContent-Length: 300000000\r\n\r\n")
    assert status == 413 and headers["connection"] == "close"
    err = json.loads(body)["error"]
    assert err["code"] == "request_too_large" and str(LIMIT) in err["message"]
    assert time.monotonic() - before < 10
    still_serves(server)


def test_chunked_body_is_cut_off_at_the_limit(server):
    port = server.port
    piece = b"x" * 65536
    n_full, rest = divmod(LIMIT + 1, len(piece))
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * n_full + [b"%x\r\n%s\r\n" % (rest, b"x" * rest)]
    # one byte over the limit and no terminating chunk: a server that waited for the whole body would hang here
    status, headers, body = raw_http(port, f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                           f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                                     chunks)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_too_large"
    still_serves(server)


def test_a_legit_body_at_the_character_limit_is_not_refused_for_size(server):
    # 4 x 7,900 emoji = 31,600 characters (limit 32,000) is 12 bytes each as json.dumps escapes them by default
    emoji = "\U0001F600" * 7900
    msgs = [{"role": role, "content": emoji} for role in ("system", "user", "assistant", "user")]
    body = json.dumps({"messages": msgs, "max_tokens": 2})
    assert len(body) > 4 * 32000 + 65536  # over the old, byte-based limit
    r = httpx.post(server.url + CHAT, content=body, headers=JSON, timeout=60)
    # past the body limit and the validation; the tiny model's context is what refuses it
    assert assert_error(r, 400)["code"] == "context_length_exceeded"


# ----------------------------------------------------------------------------------------------------------------
# JSON: malformed or too deep -> 400


@pytest.mark.parametrize("body", [
    b"",                                                      # empty
    b"  \n ",                                                 # only whitespace
    b'{"messages": [',                                        # truncated
    b"[" * 100_000,                                           # nested past the interpreter's recursion limit
    b'{"messages": ' + b"[" * 40 + b"]" * 40 + b"}",          # nested past MAX_JSON_DEPTH, well-formed
    b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",  # over int digit limit
    b"[]", b'"messages"', b"null", b"42",                     # valid JSON, not an object
])
def test_malformed_or_deep_json_is_400(server, body):
    r = httpx.post(server.url + CHAT, content=body, headers=JSON)
    assert assert_error(r, 400, None)["code"] == "invalid_json"


def test_depth_limit_leaves_real_requests_alone(server):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]  # content parts: depth 5
    r = httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------------------------------------------
# Content-Type: only application/json (what a cross-site form cannot send without a CORS preflight)


@pytest.mark.parametrize("ctype", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/jsonx", None])
def test_post_body_must_be_json(server, ctype):
    before = health(server)["requests"]
    headers = {"Content-Type": ctype} if ctype else {}
    r = httpx.post(server.url + CHAT, content=json.dumps({"messages": MSG, "max_tokens": 2}), headers=headers)
    assert assert_error(r, 415)["code"] == "unsupported_media_type"
    assert health(server)["requests"] == before  # refused before any generation was queued


def test_json_with_charset_is_accepted(server):
    r = httpx.post(server.url + CHAT, content=json.dumps({"messages": MSG, "max_tokens": 2}),
                   headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ----------------------------------------------------------------------------------------------------------------
# Host header: DNS rebinding


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example:{port}", "0.0.0.0:{port}", "192.168.1.10", ""])
@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("POST", CHAT)])
def test_foreign_host_is_refused_on_loopback(server, host, method, path):
    host = host.format(port=server.port)
    r = httpx.request(method, server.url + path, headers={"Host": host, **JSON},
                      content=json.dumps({"messages": MSG, "max_tokens": 2}) if method == "POST" else None)
    err = assert_error(r, 421)
    assert err["code"] == "host_not_allowed" and "--allow-host" in err["message"]


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST.", "127.0.0.2",
                                  "localhost"])
def test_loopback_names_are_served(server, host):
    r = httpx.get(server.url + "/", headers={"Host": host.format(port=server.port)})
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


def test_allow_host_adds_names(keyed_server):
    url, auth = keyed_server.url, {"Authorization": "Bearer sekret"}
    named = {"Host": f"chat.example:{keyed_server.port}", **auth}
    assert httpx.get(url + "/v1/models", headers=named).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Host": "127.0.0.1", **auth}).status_code == 200
    assert_error(httpx.get(url + "/v1/models", headers={"Host": "other.example", **auth}), 421)


def test_allowed_hosts_policy():
    assert serve.allowed_hosts(ServeConfig(host="0.0.0.0")) is None  # reached by any name: --api-key guards it
    assert serve.allowed_hosts(ServeConfig(host="127.0.0.1", allow_host=["*"])) is None
    assert "::1" in serve.allowed_hosts(ServeConfig(host="::1"))
    assert serve.allowed_hosts(ServeConfig(host="0.0.0.0", allow_host=["Chat.Example."])) >= {"chat.example"}
    for bad in ["http://chat.example", "", "a b", "user@host", "host/path"]:
        with pytest.raises(UserError, match="--allow-host"):
            serve.allowed_hosts(ServeConfig(allow_host=[bad]))


def test_allow_host_flag_is_repeatable():
    parser = argparse.ArgumentParser()
    serve.add_cli(parser)
    cfg = config_from_args(ServeConfig, parser.parse_args(["--allow-host", "a.example", "--allow-host", "b", "c"]))
    assert cfg.allow_host == ["a.example", "b", "c"]
    assert config_from_args(ServeConfig, parser.parse_args([])).allow_host == []


def test_bad_allow_host_is_one_line_before_loading_a_model(capsys):
    from picochat import cli

    assert cli.main(["serve", "--allow-host", "http://chat.example/"]) == 2  # no checkpoint exists: never reached
    err = capsys.readouterr().err.strip()
    assert "--allow-host 'http://chat.example/'" in err and "\n" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------
# /health with a key set


def test_health_without_the_key_says_only_alive(keyed_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(keyed_server.url + "/health", headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    full = health(keyed_server, key="sekret")
    assert full["model"] == "picochat-keyed" and full["auth"] is True and "queued" in full
    assert httpx.get(keyed_server.url + "/").status_code == 200  # the page stays open; it asks for the key


def test_keyed_server_guards_apply_after_auth(keyed_server):
    url = keyed_server.url
    assert_error(httpx.post(url + CHAT, json={"messages": MSG}), 401)
    auth = {"Authorization": "Bearer sekret"}
    assert_error(httpx.post(url + CHAT, content=b'{"messages": [', headers={**auth, **JSON}), 400)
    assert_error(httpx.post(url + CHAT, content=b"{}", headers={**auth, "Content-Type": "text/plain"}), 415)
    still_serves(keyed_server, key="sekret")


# ----------------------------------------------------------------------------------------------------------------
# A non-streaming request whose client left is cancelled, running or queued


def test_non_streaming_disconnect_cancels_running_and_queued(server):
    before = health(server)
    errors = []

    def leave_early():
        try:
            httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 300}, timeout=1.0)
            errors.append("the request finished before the client left")
        except httpx.TimeoutException:
            pass  # closing the connection is the disconnect

    clients = [threading.Thread(target=leave_early) for _ in range(2)]  # one replica: one runs, one queues
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    assert not errors
    deadline = time.time() + 10
    while True:
        h = health(server)
        if h["active"] == 0 and h["cancelled"] - before["cancelled"] == 2:
            break
        assert time.time() < deadline, f"generation still running after the clients left: {h}"
        time.sleep(0.05)
    # ~1 s of 50 ms steps ran before the first client left; an uncancelled run would go on for ~6 s more
    assert h["tokens_generated"] - before["tokens_generated"] < 60
    assert h["errors"] == before["errors"]
    still_serves(server)


# ----------------------------------------------------------------------------------------------------------------
# OpenAI parameters: unsupported ones are named, not ignored


@pytest.mark.parametrize("name,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"), ("response_format", {"type": "json_object"}), ("frequency_penalty", 0.5),
    ("presence_penalty", -1), ("logit_bias", {"50": 10}), ("functions", [{"name": "f"}]), ("audio", {}),
    ("modalities", ["audio"]), ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "low"),
    ("web_search_options", {}), ("echo", True), ("best_of", 2), ("suffix", "x"), ("store", True),
])
def test_unsupported_parameter_is_named(server, name, value):
    r = httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 2, name: value})
    err = assert_error(r, 400, name)
    assert err["code"] == "unsupported_parameter" and f"'{name}'" in err["message"]


def test_openai_client_gets_unsupported_parameter_as_bad_request(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(model="x", messages=MSG, max_tokens=2, response_format={"type": "json_object"})


def test_supported_and_neutral_parameters_still_work(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    r = c.chat.completions.create(
        model="anything", messages=MSG, max_completion_tokens=3, temperature=0.5, top_p=0.9, n=2, seed=1,
        stop=["zzz"], user="u-1", frequency_penalty=0, presence_penalty=0.0, logprobs=False, store=False,
        response_format={"type": "text"}, extra_body={"top_k": 5, "logit_bias": None})
    assert len(r.choices) == 2 and all(ch.finish_reason == "length" for ch in r.choices)
    assert r.usage.completion_tokens == 6
    chunks = list(c.chat.completions.create(model="x", messages=MSG, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3


# ----------------------------------------------------------------------------------------------------------------
# A barrage of hostile bodies: each a clean 4xx, the server keeps serving


BAD_PARAMS = [  # each merged into an otherwise valid request
    ("max_tokens", 10**9), ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", "8"),
    ("max_tokens", True), ("max_completion_tokens", 10**30), ("temperature", -1), ("temperature", 2.5),
    ("temperature", "hot"), ("temperature", [1]), ("top_p", 0), ("top_p", 1.5), ("top_k", -5), ("n", 0), ("n", -3),
    ("n", 9), ("n", "2"), ("seed", "x"), ("seed", 2**70), ("seed", 1.5), ("stop", 5), ("stop", ["a"] * 5),
    ("stop", [""]), ("stop", [None]), ("stream", "yes"), ("stream", 1), ("stream_options", "yes"),
    ("stream_options", {"include_usage": "y"}), ("model", 5), ("user", {"id": 1}),
]
BAD_MESSAGES = [
    [{"role": r, "content": "hi"} for _ in range(2500) for r in ("user", "assistant")] + MSG,  # 5,001 messages
    [{"role": "user", "content": "x"}] * 12_000,  # many, still under the body limit
    [], {}, "hi", None, [None], ["hi"], [{"content": "hi"}], [{"role": "user"}], [{"role": "user", "content": None}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": "tool", "content": "hi"}],
    [{"role": "user", "content": "x" * 9000}], [{"role": ["user"], "content": "hi"}],
]


def test_hostile_barrage_gets_4xx_and_server_stays_up(server):
    before = health(server)
    bodies = [{"messages": MSG, name: value} for name, value in BAD_PARAMS] + [{"messages": m} for m in BAD_MESSAGES]
    for body in bodies:
        r = httpx.post(server.url + CHAT, content=json.dumps(body), headers=JSON, timeout=60)
        assert 400 <= r.status_code < 500, (str(body)[:200], r.status_code, r.text[:300])
        assert r.json()["error"]["message"]
    # malformed HTTP itself is uvicorn's to refuse; it must not take the server down either
    for head in (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: abc\r\n\r\n",
                 f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: -5\r\n\r\n",
                 "GARBAGE\r\n\r\n"):
        status, _, _ = raw_http(server.port, head)
        assert 400 <= status < 500
    after = health(server)
    assert after["errors"] == before["errors"] and after["requests"] == before["requests"]  # none reached a replica
    still_serves(server)
    assert httpx.get(server.url + "/").status_code == 200  # and the page still loads
