"""`POST /v1/completions` and logprobs on both endpoints: a real server on 127.0.0.1, the real `openai` client, and
every log-probability checked against the model's own forward pass."""

import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from picochat.conversation import render_for_completion  # noqa: E402
from picochat.engine import load_engine  # noqa: E402
from picochat.serving.serve import MAX_LOGPROBS, ServeConfig, TokenStrings, create_app  # noqa: E402
from test_chat_cli import make_tiny_checkpoint  # noqa: E402
from test_serve import ServerThread  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Hello there, how are you"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return load_engine(checkpoint=str(make_tiny_checkpoint(tmp_path_factory.mktemp("cmpl_home"))), device="cpu")[0]


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(ServeConfig(api_key=""), engines=[engine], model_name="tiny")) as s:
        yield s


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def forward_logprobs(engine, ids):
    """(T, V) log-probabilities of the next token at each position: the model's own forward, fp32."""
    with torch.no_grad():
        return torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), dim=-1)


def test_echo_scores_equal_the_forward_pass_for_text_and_token_ids(server, engine):
    tok = engine.tokenizer
    ids = tok.encode(PROMPT)
    c = client(server)
    # text: the server reads <|bos|> + the text, and reports one entry per token of the text
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    (ch,) = r.choices
    lp = forward_logprobs(engine, [tok.bos_id, *ids])
    want = [lp[j, t].item() for j, t in enumerate(ids)]
    assert ch.text == PROMPT and ch.finish_reason == "length"
    assert ch.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert "".join(ch.logprobs.tokens) == PROMPT
    assert ch.logprobs.text_offset == [len(tok.decode(ids[:j])) for j in range(len(ids))]
    for j, top in enumerate(ch.logprobs.top_logprobs):  # the 2 best plus the token itself
        best = lp[j].topk(2)
        assert sorted(top.values(), reverse=True)[:2] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert top[ch.logprobs.tokens[j]] == pytest.approx(want[j], abs=1e-4)
    assert r.usage.prompt_tokens == len(ids) + 1 and r.usage.completion_tokens == 0

    # token ids, batched, the way lm-eval's local-completions scores a continuation: ids without and with <|bos|>,
    # max_tokens 1, temperature 0; it reads len(prompt) + 1 entries and sums token_logprobs[ctxlen:-1]
    r2 = c.completions.create(model="tiny", prompt=[ids, [tok.bos_id, *ids]], max_tokens=1, temperature=0,
                              echo=True, logprobs=1, seed=1234)
    a, b = sorted(r2.choices, key=lambda x: x.index)
    assert [a.index, b.index] == [0, 1]
    assert len(a.logprobs.token_logprobs) == len(ids) + 1 and len(b.logprobs.token_logprobs) == len(ids) + 2
    assert a.logprobs.token_logprobs[:-1] == pytest.approx(want, abs=1e-4)  # same <|bos|> conditioning as text
    assert b.logprobs.token_logprobs[0] is None and b.logprobs.top_logprobs[0] is None  # <|bos|>: nothing before
    assert b.logprobs.token_logprobs[1:-1] == pytest.approx(want, abs=1e-4)
    assert a.text.startswith(PROMPT) and b.text == "<|bos|>" + a.text  # token ids echo specials by name
    # the one generated token: greedy, and its logprob is the forward's at the last position
    gen = lp[-1].argmax().item()
    assert a.logprobs.tokens[-1] == TokenStrings(tok)(gen)[0]
    assert a.logprobs.token_logprobs[-1] == pytest.approx(lp[-1, gen].item(), abs=1e-4)
    assert a.logprobs.token_logprobs[-1] == max(a.logprobs.top_logprobs[-1].values())  # lm-eval's is_greedy
    assert r2.usage.prompt_tokens == 2 * (len(ids) + 1) and r2.usage.completion_tokens == 2


def test_greedy_completion_is_the_engine_continuation_and_its_logprobs_the_forward(server, engine):
    tok = engine.tokenizer
    prompt = [tok.bos_id, *tok.encode(PROMPT)]
    seq, _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0)
    new = seq[0][len(prompt):]
    r = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    (ch,) = r.choices
    assert ch.text == tok.decode(new) and ch.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == len(prompt) + 12
    # decode-step logprobs (the engine's incremental path) against one forward over prompt + completion
    lp = forward_logprobs(engine, seq[0])
    want = [lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(new)]
    assert ch.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert ch.logprobs.text_offset[0] == 0 and all(len(d) == 1 for d in ch.logprobs.top_logprobs)  # logprobs=0
    # with echo the prompt comes first and the offsets go on past it
    e = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, echo=True)
    assert e.choices[0].text == PROMPT + ch.text and e.choices[0].logprobs is None


def test_logprobs_leave_the_engine_tokens_bit_identical(engine):
    tok = engine.tokenizer
    prompt = [tok.bos_id, *tok.encode(PROMPT)]
    kw = dict(num_samples=3, max_tokens=10, temperature=1.0, top_k=20, seed=7)
    plain = list(engine.generate(prompt, **kw))
    scored = list(engine.generate(prompt, **kw, logprobs=4))
    assert [s[:2] for s in scored] == plain
    step = scored[0][2]
    assert len(step) == 3 and all(len(top) == 4 for _, top in step)
    lp = forward_logprobs(engine, prompt)[-1]
    for row, (chosen, top) in enumerate(step):
        assert chosen == pytest.approx(lp[plain[0][0][row]].item(), abs=1e-4)  # the raw distribution, not top-k's
        assert [t for t, _ in top] == lp.topk(4).indices.tolist()


def test_batch_prompts_n_and_seed_are_reproducible(server):
    c = client(server)
    kw = dict(model="tiny", max_tokens=8, temperature=1.0, top_p=0.9, seed=11, n=2)
    r = c.completions.create(prompt=["The sky", "Picochat is"], **kw)
    again = c.completions.create(prompt=["The sky", "Picochat is"], **kw)
    texts = {ch.index: ch.text for ch in r.choices}
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts == {ch.index: ch.text for ch in again.choices}
    assert texts[0] != texts[1]  # two samples of one prompt differ
    alone = c.completions.create(prompt="Picochat is", **kw)  # prompt 1 of the batch = that prompt alone
    assert [ch.text for ch in sorted(alone.choices, key=lambda x: x.index)] == [texts[2], texts[3]]
    assert r.usage.completion_tokens == 4 * 8


def test_stop_string_cuts_the_text(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = full[5:8]
    assert stop and full.index(stop) >= 1
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_stream_concatenates_to_the_non_streamed_answer(server):
    c = client(server)
    kw = dict(model="tiny", prompt=[PROMPT, "The sky"], max_tokens=10, temperature=0, echo=True, logprobs=2)
    whole = {ch.index: ch for ch in c.completions.create(**kw).choices}
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "text_completion" for ch in chunks)
    for i, ch in whole.items():
        mine = [x.choices[0] for x in chunks if x.choices and x.choices[0].index == i]
        assert "".join(x.text for x in mine) == ch.text
        assert sum((x.logprobs.tokens for x in mine if x.logprobs), []) == ch.logprobs.tokens
        assert sum((x.logprobs.token_logprobs for x in mine if x.logprobs), []) == ch.logprobs.token_logprobs
        assert sum((x.logprobs.text_offset for x in mine if x.logprobs), []) == ch.logprobs.text_offset
        assert [x.finish_reason for x in mine if x.finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_logprobs_equal_the_forward_over_the_rendered_conversation(server, engine):
    tok = engine.tokenizer
    msgs = [{"role": "user", "content": "Hello there"}]
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    prompt = render_for_completion(tok, {"messages": msgs})
    seq, _ = engine.generate_batch(prompt, max_tokens=6, temperature=0.0)
    new = seq[0][len(prompt):]
    lp = forward_logprobs(engine, seq[0])
    assert [x.token for x in content] == [TokenStrings(tok)(t)[0] for t in new]
    assert [x.logprob for x in content] == pytest.approx([lp[len(prompt) - 1 + j, t].item()
                                                           for j, t in enumerate(new)], abs=1e-4)
    assert bytes(sum((x.bytes for x in content), [])).decode("utf-8", "replace") == r.choices[0].message.content
    for x in content:  # greedy: the token is the best alternative
        assert len(x.top_logprobs) == 3 and x.top_logprobs[0].token == x.token
        assert x.top_logprobs[0].logprob == pytest.approx(x.logprob)
    # streamed: the same entries, spread over the chunks
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                            logprobs=True, top_logprobs=3))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert [(x.token, x.logprob) for x in streamed] == [(x.token, x.logprob) for x in content]
    # logprobs off: no field, as before
    assert c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2).choices[0].logprobs is None


def test_partial_utf8_tokens_use_the_bytes_prefix(server, engine):
    tok = engine.tokenizer
    s = TokenStrings(tok)
    assert s(tok.mergeable_ranks[b"\xf0"]) == ("bytes:\\xf0", [0xF0])  # the first byte of a 4-byte character
    assert s(tok.mergeable_ranks[b"a"]) == ("a", [97])
    assert s(tok.bos_id) == ("<|bos|>", None)
    emoji = "Hi 🙂 日本"
    r = client(server).completions.create(model="tiny", prompt=emoji, max_tokens=0, echo=True, logprobs=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == emoji
    assert any(t.startswith("bytes:") for t in lp.tokens)  # the tiny vocabulary splits these characters
    ids = tok.encode(emoji)
    assert bytes(b for t in ids for b in s(t)[1]) == emoji.encode()
    assert all(0 <= o <= len(emoji) for o in lp.text_offset) and lp.text_offset == sorted(lp.text_offset)


BAD = [  # (endpoint, extra fields, the parameter the 400 must name)
    ("completions", {"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ("completions", {"logprobs": 100}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"max_tokens": -1}, "max_tokens"),
    ("completions", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [[]]}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {"prompt": ["a", [1]]}, "prompt"),
    ("completions", {"prompt": [True, 1]}, "prompt"),
    ("completions", {"prompt": {"text": "a"}}, "prompt"),
    ("completions", {"prompt": [[1, 10**6]]}, "prompt"),
    ("completions", {"prompt": [-1]}, "prompt"),
    ("completions", {"prompt": None}, "prompt"),
    ("completions", {"prompt": ["a"] * 1000}, "prompt"),
    ("completions", {"prompt": [5] * 600}, "prompt"),  # longer than the context
    ("completions", {"echo": "yes"}, "echo"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ("completions", {"stop": ["a"] * 17}, "stop"),
    ("completions", {"n": 0}, "n"),
    ("chat/completions", {"top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
    ("chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("chat/completions", {"logprobs": 1}, "logprobs"),
    ("chat/completions", {"echo": True}, "echo"),
]


@pytest.mark.parametrize("endpoint,extra,param", BAD)
def test_bad_values_are_a_400_naming_the_parameter(server, endpoint, extra, param):
    body = {"model": "tiny", "max_tokens": 2, **({"prompt": "Hi"} if endpoint == "completions" else
                                                 {"messages": [{"role": "user", "content": "Hi"}]}), **extra}
    r = httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and "\n" not in err["message"]


def test_openai_client_sees_bad_request_and_the_server_goes_on(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        c.completions.create(model="tiny", prompt="Hi", logprobs=100)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        c.completions.create(model="tiny", prompt=[[1, 2, 10**6]])
    assert c.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices[0].finish_reason == "length"
    assert json.loads(httpx.get(server.url + "/health").text)["errors"] == 0


def test_odd_but_valid_prompts(server, engine):
    c = client(server)
    # an empty text is <|bos|> alone: nothing to echo, and sampling starts a document
    r = c.completions.create(model="tiny", prompt="", max_tokens=3, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and lp.text_offset[0] == 0 and r.usage.prompt_tokens == 1
    # <|bos|> alone as token ids, scored only: one null entry
    r = c.completions.create(model="tiny", prompt=[engine.bos], max_tokens=0, echo=True, logprobs=1)
    assert r.choices[0].logprobs.token_logprobs == [None] and r.choices[0].text == "<|bos|>"
    # a lone surrogate (valid JSON, not encodable UTF-8) is read as U+FFFD, as the tokenizer does everywhere
    body = '{"prompt": "a\\ud800b", "max_tokens": 0, "echo": true, "logprobs": 0}'
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "a\ufffdb"
    # a prompt that fills the context exactly may be scored, not continued
    full = [engine.bos] + [5] * (engine.max_context - 1)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": full, "max_tokens": 0, "echo": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == engine.max_context
    for prompt, max_tokens in ((full, 1), (full[1:] + [5], 0)):  # no room to generate; no room for the <|bos|>
        r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "echo": True})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
