"""`picochat serve`: a web chat page and an OpenAI-compatible API in one process.

    picochat serve [--host 127.0.0.1 --port 8000] [--run NAME] [--source sft] [--api-key KEY] [--devices N]

Routes: `GET /` (the chat page, no CDN assets), `POST /v1/chat/completions` and `POST /v1/completions` (stream or
not), `GET /v1/models`, `GET /health`. Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1",
api_key=KEY or "none")`.

`/v1/completions` is the legacy API with no chat template, for base models and eval harnesses: `prompt` as text, texts,
token ids or lists of them; `echo` with `max_tokens` 0 scores a prompt. The model reads every prompt after <|bos|>,
as it was trained (the server adds it unless token ids start with it); the echoed text and logprob arrays cover only
what the client sent. `logprobs` on both endpoints are the model's raw distribution: log_softmax of the fp32
softcapped logits, before temperature, top-k or top-p, as OpenAI reports them; prompt tokens come from one forward
over the prompt, generated ones from the decode step that sampled them. Special tokens appear by name in completions'
text; a completion's logprobs include the end-of-text token that stopped it (chat's do not: it is not content).

Every request passes one guard (`_Guard`) before routing, so a hostile one costs little: a Host header this server was
not addressed by is refused while it is bound to loopback (DNS rebinding: a page on evil.example re-resolves its name
to 127.0.0.1 and its requests then carry `Host: evil.example`; `--allow-host` adds names); POST bodies must be
`application/json` (a cross-site form can only send text/plain, urlencoded or multipart without a CORS preflight);
a body over the limit is refused by its Content-Length before it is read, and a chunked one as soon as it passes the
limit; the API key is checked. JSON that is malformed or nested deeper than MAX_JSON_DEPTH is a 400, and so is an
OpenAI parameter this server does not implement (CHAT_PARAMS), so no client believes it got what it asked for.

Concurrency: one model replica per device (`--devices N`), each driven by its own scheduler thread
(`batcher.py`): requests wait in one FIFO queue, and a replica admits the oldest between two decode steps when its
rows fit (`--max-batch`, `--batch-tokens`), so the requests on a replica decode together (continuous batching); a
full queue (`--max-queue`) answers 503. The asyncio event loop only parses, validates and relays text, so it never
blocks on the model. A request whose client disconnects is cancelled: queued, it is skipped; running, its rows are
freed before the next step.

FastAPI and uvicorn are an optional extra (`pip install 'picochat[serve]'`) and are imported only here, inside
functions.
"""

# No `from __future__ import annotations`: FastAPI resolves the handlers' `Request` annotations at runtime, and
# Request is imported inside create_app (fastapi is optional), so the annotations must be real objects.

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from picochat.config import UserError, add_config_args, config_from_args
from picochat.conversation import render_for_completion, validate

WEB_DIR = Path(__file__).resolve().parent / "web"


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it: set --api-key)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    run: str | None = field(default=None, metadata={"help": "run to serve (default: newest run with --source)"})
    source: str = field(default="sft", metadata={"help": "stage checkpoint to serve",
                                                 "choices": ["base", "mid", "sft", "rl"]})
    checkpoint: str | None = field(default=None, metadata={"help": "explicit checkpoint directory"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on /v1 "
                                                                "(default: env PICOCHAT_API_KEY; unset = open)"})
    devices: int = field(default=1, metadata={"help": "model replicas, one per GPU (0 = every GPU)"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda | mps (default: auto)"})
    temperature: float = field(default=0.8, metadata={"help": "default temperature when a request sets none"})
    top_k: int = field(default=50, metadata={"help": "default top-k (requests may pass top_k; 0 = off)"})
    default_max_tokens: int = field(default=512, metadata={"help": "max_tokens when a request sets none"})
    max_tokens_limit: int = field(default=4096, metadata={"help": "largest max_tokens a request may ask"})
    max_messages: int = field(default=500, metadata={"help": "most messages per request"})
    max_message_chars: int = field(default=8000, metadata={"help": "most characters per message"})
    max_total_chars: int = field(default=32000, metadata={"help": "most characters per request"})
    max_n: int = field(default=8, metadata={"help": "most choices (n) per request"})
    max_batch: int = field(default=64, metadata={"help": "most rows (choices) one replica decodes together"})
    batch_tokens: int = field(default=0, metadata={
        "help": "KV-cache positions per replica, rows x longest row (0 = 70 percent of free GPU memory; "
                "max-batch x context off GPU); a request that does not fit waits"})
    max_queue: int = field(default=256, metadata={"help": "most requests waiting; beyond it a 503 (0 = no limit)"})
    prefill_chunk: int = field(default=0, metadata={
        "help": "prompt tokens prefilled between two decode steps (bounds the stall a new prompt causes; "
                "0 = 4096 on CUDA, 512 elsewhere)"})
    model_name: str | None = field(default=None, metadata={"help": "model id shown by /v1/models"})
    engine_process: str = field(default="auto", metadata={
        "help": "run the model and its scheduler in a child process, apart from HTTP, so the two do not share one "
                "interpreter lock (auto = on CUDA)", "choices": ["auto", "on", "off"]})
    allow_host: list[str] = field(default_factory=list, metadata={
        "help": "host name clients may address besides localhost/127.0.0.1/[::1] and --host (repeatable; '*' = "
                "any). Checked while bound to loopback, or whenever set"})


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, ServeConfig, skip=("allow_host",))
    # "extend" so that `--allow-host a --allow-host b` and `--allow-host a b` both mean both; SUPPRESS keeps an unset
    # flag out of the namespace, so the dataclass default applies
    parser.add_argument("--allow-host", dest="allow_host", action="extend", nargs="+", default=argparse.SUPPRESS,
                        metavar="NAME", help=_field_help(ServeConfig, "allow_host"))


def _field_help(cls: type, name: str) -> str:
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def _require_server_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"picochat serve needs FastAPI and uvicorn ({e.name} is missing); install them with "
                        f"`pip install 'picochat[serve]'` (or `pip install fastapi uvicorn`)") from None


# ----------------------------------------------------------------------------------------------------------------
# Requests


class APIError(Exception):
    """An OpenAI-style error: HTTP status + {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# The request parameters /v1/chat/completions implements (parse_request reads each one). A parameter outside this set
# and NEUTRAL_PARAMS is refused with a 400 naming it rather than ignored: a client asking for tools or a JSON mode
# must not receive plain text as if it had been honoured. Implementing one means adding its name here.
CHAT_PARAMS = frozenset({"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                         "n", "seed", "stop", "stream", "stream_options", "user", "logprobs", "top_logprobs"})

# Parameters accepted only at the values that ask for what this server does anyway; SDK wrappers send some of them
# by default. Any other value is refused like an unknown parameter. A null value anywhere means "not given".
NEUTRAL_PARAMS: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "tools": ([],),
    "parallel_tool_calls": (True, False), "store": (False,), "response_format": ({"type": "text"},),
}

# The same two lists for /v1/completions (parse_completion reads each one). `best_of` 1 and an empty `suffix` are
# what the server does anyway.
COMPLETION_PARAMS = frozenset({"prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
                               "stream", "stream_options", "user", "echo", "logprobs"})
COMPLETION_NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "best_of": (1,), "suffix": ("",),
}

# Most alternatives per position a request may ask for (`logprobs` on /v1/completions, `top_logprobs` on chat): 20
# is chat's documented maximum (the legacy completions API says 5; harnesses ask for 1).
MAX_LOGPROBS = 20
# Most prompts in one /v1/completions request (each becomes its own job; the body size limit also applies).
MAX_PROMPTS = 128
# Most stop strings on /v1/completions: OpenAI allows 4, but eval harnesses send every task's stop sequences.
MAX_COMPLETION_STOPS = 16

# Deepest JSON nesting a request may use. A chat request needs 5 (body > messages > message > content parts >
# part); the rest is slack. Deeper bodies are refused before anything walks them.
MAX_JSON_DEPTH = 32


def check_params(body: dict, supported: frozenset[str], neutral: dict[str, tuple] = NEUTRAL_PARAMS) -> None:
    """Raise a 400 naming the first parameter of `body` that is neither supported nor at a neutral value."""
    for name, value in body.items():
        if value is None or name in supported:
            continue
        ok = neutral.get(name, ())
        if any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in ok):
            continue
        accepted = f" (accepted only as {' or '.join(json.dumps(v) for v in ok)})" if ok else ""
        raise APIError(400, f"parameter '{name}' is not supported by this server{accepted}", name,
                       "unsupported_parameter")


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, walked without recursion (a scalar is 0, `[]` is 1)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:  # one level past the limit is enough to refuse
                stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """The request body as JSON, or a one-line 400: malformed, not UTF-8, NaN/Infinity, too deep."""
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object", None, "invalid_json")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # the C decoder stops at the interpreter's recursion limit
        body, depth = None, MAX_JSON_DEPTH + 1
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        msg = "a number has too many digits" if "digits" in str(e) else " ".join(str(e).split())
        raise APIError(400, f"malformed JSON body: {msg}", None, "invalid_json") from None
    else:
        depth = _json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"JSON body nested deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
    return body


@dataclass
class Params:
    messages: list[dict[str, Any]]  # chat only
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    n: int
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # alternatives per position; None = no logprobs at all
    echo: bool = False  # completions: the prompt (and its logprobs) starts each choice


def _num(body: dict, name: str, kind: type, lo: float, hi: float, default: Any) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", name,
                       "invalid_type")
    if not lo <= v <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name, "invalid_value")
    return kind(v)


def parse_request(body: Any, cfg: ServeConfig) -> Params:
    """Validate a /v1/chat/completions body against the limits; raise APIError (4xx) naming the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    check_params(body, CHAT_PARAMS)
    for name in ("model", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise APIError(400, f"'{name}' must be a string", name, "invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", "messages", "invalid_value")
    if len(messages) > cfg.max_messages:
        raise APIError(400, f"too many messages: {len(messages)} > {cfg.max_messages}", "messages",
                       "too_many_messages")
    total = 0
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_value")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {role!r} is not supported (use system, user or assistant)",
                           f"messages[{i}].role", "invalid_role")
        if isinstance(content, list):  # OpenAI content parts: text only
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content", "invalid_value")
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content",
                           "invalid_value")
        if len(content) > cfg.max_message_chars:
            raise APIError(400, f"messages[{i}].content has {len(content)} characters > {cfg.max_message_chars}",
                           f"messages[{i}].content", "message_too_long")
        total += len(content)
        clean.append({"role": role, "content": content})
    if total > cfg.max_total_chars:
        raise APIError(400, f"messages total {total} characters > {cfg.max_total_chars}", "messages",
                       "request_too_long")
    if clean[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", "messages", "invalid_value")
    try:
        validate({"messages": clean}, where="messages")
    except UserError as e:
        raise APIError(400, str(e), "messages", "invalid_value") from None
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", int, 1, cfg.max_tokens_limit, cfg.default_max_tokens)
    logprobs = body.get("logprobs")
    if not isinstance(logprobs, (bool, type(None))):
        raise APIError(400, "'logprobs' must be a boolean", "logprobs", "invalid_type")
    top = _num(body, "top_logprobs", int, 0, MAX_LOGPROBS, None)
    if top is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return _sampling(body, cfg, messages=clean, max_tokens=max_tokens, max_stops=4,
                     logprobs=(top or 0) if logprobs else None)


def _sampling(body: dict, cfg: ServeConfig, max_stops: int, **fields) -> Params:
    """The parameters both endpoints share (stop, stream, sampling, n, seed), checked, into Params with `fields`."""
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= max_stops and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a non-empty string or an array of at most {max_stops}", "stop",
                       "invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), (bool, type(None))):
        raise APIError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options",
                       "invalid_type")
    top_k = _num(body, "top_k", int, 0, 1000, cfg.top_k)
    top_p = _num(body, "top_p", float, 0.0, 1.0, 1.0)
    if top_p <= 0:
        raise APIError(400, "'top_p' must be > 0", "top_p", "invalid_value")
    seed = _num(body, "seed", int, -(2**63), 2**63 - 1, None)
    return Params(temperature=_num(body, "temperature", float, 0.0, 2.0, cfg.temperature),
                  top_k=top_k or None, top_p=top_p if top_p < 1.0 else None, n=_num(body, "n", int, 1, cfg.max_n, 1),
                  seed=(seed if seed is not None else secrets.randbits(31)) % (2**63), stop=stop, stream=stream,
                  include_usage=bool(opts.get("include_usage")), **fields)


@dataclass
class Prompt:
    """One /v1/completions prompt: the tokens the model reads and how many of them the client did not send."""

    tokens: list[int]
    added: int  # 1 when the server put <|bos|> in front, else 0


_PROMPT_SHAPES = "a string, an array of strings, an array of token ids, or an array of token-id arrays"


def parse_prompts(value: Any, tok, cfg: ServeConfig) -> list[Prompt]:
    """`prompt` in any of OpenAI's four shapes -> Prompts, each read after <|bos|> as base models were trained (and
    CORE scores them): text is tokenized as plain text (special-token names stay text) behind a <|bos|> the server
    adds; token ids are used as given, behind an added <|bos|> unless they already start with it."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, f"'prompt' must be {_PROMPT_SHAPES}, and not empty", "prompt", "invalid_value")
    if len(value) > MAX_PROMPTS:
        raise APIError(400, f"too many prompts: {len(value)} > {MAX_PROMPTS}", "prompt", "invalid_value")
    texts = [v for v in value if isinstance(v, str)]
    if texts and len(texts) != len(value):
        raise APIError(400, f"'prompt' must be {_PROMPT_SHAPES}, not a mix", "prompt", "invalid_value")
    if sum(map(len, texts)) > cfg.max_total_chars:
        raise APIError(400, f"prompts total {sum(map(len, texts))} characters > {cfg.max_total_chars}", "prompt",
                       "request_too_long")
    bos, vocab = tok.bos_id, tok.vocab_size
    out = []
    for i, v in enumerate(value):
        if isinstance(v, str):
            out.append(Prompt([bos, *tok.encode(v)], 1))
            continue
        if not (isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)):
            raise APIError(400, f"prompt[{i}] must be a non-empty array of token ids ('prompt' must be "
                                f"{_PROMPT_SHAPES})", "prompt", "invalid_value")
        bad = next((t for t in v if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt[{i}] has token id {bad}, outside this model's vocabulary (0..{vocab - 1})",
                           "prompt", "invalid_value")
        out.append(Prompt(list(v), 0) if v[0] == bos else Prompt([bos, *v], 1))
    return out


def parse_completion(body: Any, cfg: ServeConfig, tok) -> tuple[list[Prompt], Params]:
    """Validate a /v1/completions body; raise APIError (4xx) naming the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    check_params(body, COMPLETION_PARAMS, COMPLETION_NEUTRAL)
    for name in ("model", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise APIError(400, f"'{name}' must be a string", name, "invalid_type")
    echo = body.get("echo", False)
    if not isinstance(echo, (bool, type(None))):
        raise APIError(400, "'echo' must be a boolean", "echo", "invalid_type")
    max_tokens = _num(body, "max_tokens", int, 0, cfg.max_tokens_limit, 16)  # OpenAI's default
    if max_tokens == 0 and not echo:
        raise APIError(400, "'max_tokens' 0 asks for nothing: use it with 'echo': true to score the prompt",
                       "max_tokens", "invalid_value")
    prompts = parse_prompts(body.get("prompt"), tok, cfg)
    p = _sampling(body, cfg, messages=[], max_tokens=max_tokens, max_stops=MAX_COMPLETION_STOPS,
                  logprobs=_num(body, "logprobs", int, 0, MAX_LOGPROBS, None), echo=bool(echo))
    return prompts, p


# ----------------------------------------------------------------------------------------------------------------
# Text per choice: UTF-8 safe, tool calls readable, stop strings honoured (text that may start one is held back)


class TokenStrings:
    """A token id as the API shows it: (string, UTF-8 bytes or None). A token that is not whole UTF-8 on its own
    (byte-level BPE splits characters) is written as OpenAI's API writes it: `bytes:` then the bytes, printable ASCII
    as itself and any other byte as `\\xNN` (b" \\xf0" -> "bytes: \\xf0"); `bytes` holds the real ones. A special
    token is its name, with no bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.names = {v: k for k, v in tokenizer.special_tokens.items()}
        self.cache: dict[int, tuple[str, list[int] | None]] = {}

    def __call__(self, token: int) -> tuple[str, list[int] | None]:
        got = self.cache.get(token)
        if got is None:
            if token in self.names:
                got = (self.names[token], None)
            else:
                b = self.tokenizer.id_to_bytes(token)
                try:
                    got = (b.decode("utf-8"), list(b))
                except UnicodeDecodeError:
                    got = ("bytes:" + "".join(chr(x) if 32 <= x < 127 and x != 92 else f"\\x{x:02x}" for x in b),
                           list(b))
            self.cache[token] = got
        return got


def _finite(lp: float) -> float:
    # OpenAI's "very unlikely" value; JSON has no -Infinity
    return lp if lp > -9999.0 else -9999.0


# One logprob entry, the same for both endpoints (each writes its own shape from it):
# (token string, bytes, logprob or None, [(string, bytes, logprob)] or None, text offset)
Entry = tuple[str, "list[int] | None", "float | None", "list[tuple[str, list[int] | None, float]] | None", int]


class ChoiceText:
    """The text of one choice, token by token. `raw` (completions: no chat template) writes special tokens by name
    and tool calls as their tokens; otherwise specials are dropped and a tool call reads `<<expr=result>>`.
    `entries` collects the logprob entries when the request asked for them."""

    def __init__(self, tokenizer, stop: list[str], raw: bool = False, strings: TokenStrings | None = None):
        from picochat.engine import StreamDecoder  # lazy: the engine imports torch (~2 s); --help starts without it

        self.dec = StreamDecoder(tokenizer, skip_special=not raw)
        sp = tokenizer.special_tokens
        self.marks = {} if raw else {sp["<|python_start|>"]: "<<", sp["<|python_end|>"]: "=",
                                     sp["<|output_end|>"]: ">>"}
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""
        self.text = ""  # everything emitted
        self.finish: str | None = None
        self.tokens = 0
        self.strings = strings
        self.entries: list[Entry] = []

    def offset(self) -> int:
        """Where the next token's text starts in `text` (held-back text counts: it precedes the next token)."""
        return len(self.text) + len(self.pending)

    def push(self, token: int) -> str:
        t = self.dec.push(token)
        if token in self.marks:
            t = self.dec.flush() + self.marks[token]
        return self._emit(t, final=False)

    def end(self) -> str:
        return self._emit(self.dec.flush(), final=True)

    def echo(self, tokens: list[int], scores: list | None) -> tuple[str, list[Entry]]:
        """The prompt as the choice's first text, never matched against stop strings; with logprobs (`scores`: one
        per token, None where nothing conditions it) its entries too."""
        text, entries = "", []
        for j, t in enumerate(tokens):
            off = len(self.text) + len(text)
            text += self.dec.push(t)
            if scores is not None:
                entries.append(self.entry(t, *(scores[j] or (None, None)), off))
        self.text += text
        return text, entries

    def entry(self, token: int, lp: float | None, top: list | None, offset: int) -> Entry:
        s, b = self.strings(token)
        e = (s, b, None if lp is None else _finite(lp),
             None if top is None else [(*self.strings(t), _finite(v)) for t, v in top], offset)
        self.entries.append(e)
        return e

    def _emit(self, t: str, final: bool) -> str:
        self.pending += t
        for s in self.stop:
            j = self.pending.find(s)
            if j >= 0:
                out, self.pending = self.pending[:j], ""
                self.finish = "stop"
                self.text += out
                return out
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += out
        return out


# ----------------------------------------------------------------------------------------------------------------
# Replicas, the FIFO queue, and jobs


@dataclass
class Job:
    """One generation request: a prompt and its parameters, answered as choices `index0 .. index0 + n - 1`.

    Each endpoint builds its jobs in one function (chat_job, completion_jobs); the worker only reads these fields.
    Events go to `events` on `loop`, which the jobs of one HTTP request share: ("delta", [(index, text, finish,
    entries)]), then one ("end", why) or ("error", message) per job."""

    prompt: list[int]
    params: Params
    index0: int = 0
    raw: bool = False  # completions: no chat template, specials by name (ChoiceText)
    echo_from: int = 0  # with echo: the prompt tokens from here on are the client's (before: the server's <|bos|>)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    choices: list[ChoiceText] = field(default_factory=list)
    terminal: set[int] = field(default_factory=set)

    def send(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    # The scheduler (batcher.py) drives a job through these: start, one take per token of each choice, wrap_up.

    def start(self, engine, strings: TokenStrings) -> None:
        """Open the choices; with echo, send the prompt (and, with logprobs, its scores from one forward)."""
        p = self.params
        self.terminal = {engine.assistant_end, engine.bos}
        self.choices = [ChoiceText(engine.tokenizer, p.stop, raw=self.raw, strings=strings) for _ in range(p.n)]
        if p.echo:
            scores = None
            if p.logprobs is not None:  # one forward over the prompt; its first token has nothing before it
                scores = [None, *engine.score(self.prompt, p.logprobs)][self.echo_from:]
            echoed = [c.echo(self.prompt[self.echo_from:], scores) for c in self.choices]
            self.send(("delta", [(self.index0 + i, text, None, entries) for i, (text, entries) in enumerate(echoed)]))

    def take(self, i: int, token: int, sampled: bool, lp: tuple | None) -> tuple | None:
        """Choice i's next token (`sampled` False: forced tool output; `lp`: (logprob, top) when scored): the
        delta to send, if any. A sampled end-of-text token finishes the choice."""
        c = self.choices[i]
        c.tokens += 1
        off, before = c.offset(), len(c.entries)
        if sampled and token in self.terminal:
            c.finish = "stop"
            text = c.end()
            if lp is not None and self.raw:  # the end-of-text token belongs to a completion's likelihood
                c.entry(token, *lp, off)
        else:
            text = c.push(token)
            if lp is not None:
                c.entry(token, *lp, off)
        if text or c.finish or len(c.entries) > before:
            return (self.index0 + i, text, c.finish, c.entries[before:])
        return None

    def close_choice(self, i: int) -> tuple:
        """Choice i ran out of max_tokens: its held-back text and finish "length"."""
        c = self.choices[i]
        c.finish = "length"
        return (self.index0 + i, c.end(), "length", [])

    def wrap_up(self) -> None:
        """Finish every choice still open (max_tokens reached) and send their last text."""
        tail = [self.close_choice(i) for i, c in enumerate(self.choices) if c.finish is None]
        if tail:
            self.send(("delta", tail))


# ----------------------------------------------------------------------------------------------------------------
# The guard in front of every route


def max_body_bytes(cfg: ServeConfig) -> int:
    """Largest body a valid request can need: a character may take 12 bytes as an escaped surrogate pair (what
    `json.dumps` writes by default for an emoji), plus each message's keys and quotes, plus the other parameters."""
    return 12 * cfg.max_total_chars + 64 * cfg.max_messages + 65536


def host_name(value: str) -> str:
    """A Host header or host flag as a bare lower-case name: "[::1]:8000" -> "::1", "LocalHost.:80" -> "localhost"."""
    v = value.strip().lower()
    if v.startswith("["):
        v = v[1:v.find("]")] if "]" in v else v[1:]
    elif v.count(":") == 1:  # name:port; a bare IPv6 address has several colons
        v = v.split(":")[0]
    return v.rstrip(".")


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(cfg: ServeConfig) -> frozenset[str] | None:
    """Host names requests may address, or None for any: bound to all interfaces with no --allow-host, the server
    is reached by whatever name the operator gave it, and --api-key is the protection there."""
    for h in cfg.allow_host:
        if not h.strip() or any(c in h for c in "/ \t@?#"):
            raise UserError(f"--allow-host {h!r}: give a bare host name such as chat.example.com (no scheme, path, "
                            f"user or spaces), or '*' for any")
    extra = {host_name(h) for h in cfg.allow_host}
    if "*" in extra or not (_is_loopback(host_name(cfg.host)) or extra):
        return None
    return frozenset({"localhost", "127.0.0.1", "::1", host_name(cfg.host)} | extra)


def authorized(api_key: str | None, headers) -> bool:
    given = headers.get("authorization", "")
    return not api_key or secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode())


class _BodyTooLarge(APIError):
    def __init__(self, limit: int, size: int | None = None):
        got = f"request body of {size} bytes" if size is not None else "request body"
        super().__init__(413, f"{got} is over this server's limit of {limit} bytes", None, "request_too_large")


class _Guard:
    """ASGI middleware run before routing: Host, API key, Content-Type and body size, each refused with one JSON
    error line and `Connection: close` (so the server does not go on reading a body it refused)."""

    def __init__(self, app, hosts: frozenset[str] | None, api_key: str | None, max_body: int):
        self.app, self.hosts, self.api_key, self.max_body = app, hosts, api_key, max_body

    def check(self, scope, headers) -> None:
        host = headers.get("host")
        # No Host at all is an HTTP/1.0 client, never a browser, so it cannot be a rebinding page
        if self.hosts is not None and host is not None:
            name = host_name(host)
            if name not in self.hosts and not _is_loopback(name):
                raise APIError(421, f"Host {host!r} is not served here: this server answers to "
                                    f"{', '.join(sorted(self.hosts))}; start it with --allow-host {name} to add it",
                               None, "host_not_allowed")
        if scope["path"].startswith("/v1/") and not authorized(self.api_key, headers):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", type="authentication_error")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise APIError(415, f"request body must be sent as 'Content-Type: application/json', "
                                    f"not {ctype or 'none'!r}", None, "unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                raise _BodyTooLarge(self.max_body, int(length))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        try:
            self.check(scope, Headers(scope=scope))
        except APIError as e:
            return await error_response(e, close=True)(scope, receive, send)
        seen = 0

        async def capped_receive():
            # counted as chunks arrive, so a chunked body without Content-Length is stopped at the limit too
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        await self.app(scope, capped_receive, send)


def error_response(e: APIError, close: bool = False):
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if close or e.status == 413:
        headers["Connection"] = "close"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _until_disconnect(receive, jobs: list[Job], events: asyncio.Queue) -> None:
    """Wait for the client to go away (the body is already read, so the next message is the disconnect), then stop
    its jobs: queued, the worker skips them; running, generation stops at the next token."""
    while (await receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.cancelled.set()
    events.put_nowait(("end", "disconnected"))


class _GenerationFailed(Exception):
    pass


class _Disconnected(Exception):
    pass


async def _deltas(jobs: list[Job], events: asyncio.Queue):
    """(index, text, finish, entries) as the jobs of one request report them, until every job has ended. What has
    queued up since the last wake-up is merged per choice first: a server that falls behind its decode steps sends
    one chunk for several tokens instead of one per token, so streaming cost stays bounded under load."""
    ended = 0
    while ended < len(jobs):
        merged: dict[int, tuple] = {}
        stop: Exception | None = None
        item = await events.get()
        while True:
            kind, data = item
            if kind == "delta":
                for i, text, finish, entries in data:
                    _, t0, f0, e0 = merged.get(i, (i, "", None, []))
                    merged[i] = (i, t0 + text, finish or f0, e0 + list(entries))
            elif kind == "error":
                stop = _GenerationFailed(data)
            elif data == "disconnected":
                stop = _Disconnected()
            else:
                ended += 1
            if stop is not None or ended == len(jobs) or events.empty():
                break
            item = events.get_nowait()
        for d in merged.values():
            yield d
        if stop is not None:
            raise stop


async def _finish(jobs: list[Job], events: asyncio.Queue, receive) -> bool:
    """Wait for every job of a non-streaming request (the worker leaves the results in job.choices); False when the
    client left first."""
    watcher = asyncio.create_task(_until_disconnect(receive, jobs, events))
    try:
        async for _ in _deltas(jobs, events):
            pass
    except _GenerationFailed as e:
        raise APIError(500, f"generation failed: {e}", None, None, type="server_error") from None
    except _Disconnected:
        return False
    finally:
        watcher.cancel()
        for job in jobs:
            job.cancelled.set()  # no-op when finished; stops the workers if this handler was cancelled
    return True


def usage(jobs: list[Job]) -> dict[str, int]:
    """Token counts: the prompt as the model read it (with the <|bos|> it starts with), every generated token."""
    prompt = sum(len(j.prompt) for j in jobs)
    done = sum(c.tokens for j in jobs for c in j.choices)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def chat_logprobs(entries: list[Entry]) -> dict[str, Any]:
    """Entries in chat's shape: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    return {"content": [{"token": s, "logprob": lp, "bytes": b,
                         "top_logprobs": [{"token": ts, "logprob": tlp, "bytes": tb} for ts, tb, tlp in top or ()]}
                        for s, b, lp, top, _ in entries], "refusal": None}


def completion_logprobs(entries: list[Entry]) -> dict[str, list]:
    """Entries in the legacy completions' shape: parallel arrays; each top_logprobs dict also holds the token itself
    (so up to N + 1 keys), null where nothing conditions the token."""
    tops = []
    for s, _, lp, top, _ in entries:
        d = None
        if top is not None:
            d = {ts: tlp for ts, _, tlp in top}
            d.setdefault(s, lp)
        tops.append(d)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[2] for e in entries], "top_logprobs": tops,
            "text_offset": [e[4] for e in entries]}


async def _sse(jobs: list[Job], events: asyncio.Queue, chunk, choice, first: list[dict], include_usage: bool):
    """Server-sent events for one request: `first` choices, then one chunk per choice delta (`choice` shapes it),
    usage when asked, `[DONE]`. Leaving early (the client disconnected) cancels the jobs."""
    try:
        if first:
            yield chunk(first)
        try:
            async for d in _deltas(jobs, events):
                yield chunk([choice(*d)])
        except _GenerationFailed as e:
            yield "data: " + json.dumps({"error": {"message": f"generation failed: {e}", "type": "server_error",
                                                   "param": None, "code": None}}) + "\n\n"
        else:
            if include_usage:
                yield chunk([], usage=usage(jobs))
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancelled.set()


def _chunker(obj: str, cid: str, created: int, model: str):
    def chunk(choices: list[dict], **extra) -> str:
        return "data: " + json.dumps({"id": cid, "object": obj, "created": created, "model": model,
                                      "choices": choices, **extra}) + "\n\n"

    return chunk


# ----------------------------------------------------------------------------------------------------------------
# Request -> jobs, one function per endpoint


def chat_job(body: Any, cfg: ServeConfig, tok, context: int) -> Job:
    """A /v1/chat/completions body as one Job: the conversation rendered up to the assistant's turn."""
    p = parse_request(body, cfg)
    prompt = render_for_completion(tok, {"messages": p.messages}, where="messages")
    if len(prompt) >= context:
        raise APIError(400, f"the conversation is {len(prompt)} tokens; this model's context is {context}",
                       "messages", "context_length_exceeded")
    p.max_tokens = min(p.max_tokens, context - len(prompt) + 1)
    return Job(prompt=prompt, params=p)


def completion_jobs(body: Any, cfg: ServeConfig, tok, context: int) -> list[Job]:
    """A /v1/completions body as one Job per prompt (choices prompt * n + j, as OpenAI numbers them), no template."""
    prompts, p = parse_completion(body, cfg, tok)
    jobs = []
    for i, pr in enumerate(prompts):
        n = len(pr.tokens)
        if n > context or (n == context and p.max_tokens > 0):
            raise APIError(400, f"prompt[{i}] is {n} tokens (with <|bos|>); this model's context is {context}"
                                + (" (with max_tokens 0 and echo it may fill it)" if n <= context else ""),
                           "prompt", "context_length_exceeded")
        q = replace(p, max_tokens=min(p.max_tokens, context - n + 1))
        jobs.append(Job(prompt=pr.tokens, params=q, index0=i * p.n, raw=True, echo_from=pr.added))
    return jobs


# ----------------------------------------------------------------------------------------------------------------
# The app


def engine_process_on(cfg: ServeConfig) -> bool:
    """--engine-process: on, off, or auto (on where the model runs on CUDA)."""
    if cfg.engine_process != "auto":
        return cfg.engine_process == "on"
    from picochat.runtime import detect_device  # lazy: it imports torch

    return detect_device(cfg.device).type == "cuda"


def _check_batch_tokens(cfg: ServeConfig, context: int) -> None:
    if cfg.batch_tokens and cfg.batch_tokens < context:
        raise UserError(f"--batch-tokens {cfg.batch_tokens} is less than this model's context ({context}): one "
                        f"full-length request would never fit; give at least {context} (or 0 for automatic)")


def _make_pool(cfg: ServeConfig, engines: list | None, factory: tuple | None):
    """(pool, tokenizer, context, replicas, model name): the replicas in this process (`engines` given, or
    --engine-process off), else in a child process that builds them with `factory` = (function, args), by default
    loading the checkpoint (serving/worker.py)."""
    from picochat.serving.batcher import Pool  # lazy: it imports torch (~2 s); --help starts without it

    kw = dict(max_rows=cfg.max_batch, batch_tokens=cfg.batch_tokens, max_queue=cfg.max_queue,
              prefill_chunk=cfg.prefill_chunk)
    if engines is None and (factory is not None or engine_process_on(cfg)):
        from picochat.serving.worker import ProcessPool

        pool = ProcessPool(*(factory or (load_replicas, (cfg,))), Job, TokenStrings, **kw)
        try:
            _check_batch_tokens(cfg, pool.context)
        except UserError:
            pool.close()
            raise
        return pool, pool.tokenizer, pool.context, len(pool.replicas), pool.model_name
    name = None
    if engines is None:
        engines, name = load_replicas(cfg)
    _check_batch_tokens(cfg, engines[0].max_context)
    pool = Pool(engines, TokenStrings, **kw)
    return pool, engines[0].tokenizer, engines[0].max_context, len(engines), name


def create_app(cfg: ServeConfig, engines: list | None = None, model_name: str | None = None,
               factory: tuple | None = None):
    """Build the FastAPI app. `engines` (one per replica, served in this process) are loaded from the checkpoint
    when not given; `factory` = (function, args) builds them in a child process instead (see _make_pool)."""
    _require_server_deps()
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse

    hosts = allowed_hosts(cfg)  # a bad --allow-host is reported before the model loads
    for name, low in (("max_batch", 1), ("batch_tokens", 0), ("max_queue", 0), ("prefill_chunk", 0)):
        if getattr(cfg, name) < low:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= {low}")
    from picochat.serving.batcher import Rejected  # lazy: it imports torch (~2 s); --help starts without it

    pool, tok, context, replicas, loaded_name = _make_pool(cfg, engines, factory)
    model_name = cfg.model_name or model_name or loaded_name or "picochat"
    api_key = cfg.api_key if cfg.api_key is not None else (os.environ.get("PICOCHAT_API_KEY") or None)

    def submit(jobs: list[Job], events: asyncio.Queue) -> None:
        try:
            pool.submit(jobs, asyncio.get_running_loop(), events)
        except Rejected as e:
            raise APIError(e.status, e.message, e.param, e.code,
                           type="server_error" if e.status >= 500 else "invalid_request_error") from None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()  # the replica threads stop at their next iteration

    app = FastAPI(title="picochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.pool = pool
    app.add_middleware(_Guard, hosts=hosts, api_key=api_key, max_body=max_body_bytes(cfg))

    _add_error_handlers(app)

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    async def health(request: Request):
        if not authorized(api_key, request.headers):  # alive, and nothing about the model or load to strangers
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, "replicas": replicas, "queued": pool.queued(),
                "auth": bool(api_key), "context": context, **pool.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "picochat"}]}

    _add_completion_routes(app, cfg, tok, context, model_name, submit)
    return app


def _add_error_handlers(app) -> None:
    """Every error leaves as one OpenAI-style JSON object: ours, Starlette's (404, 405) and anything unexpected."""
    from fastapi import Request
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return error_response(APIError(e.status_code, str(e.detail), None, code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}", None, None, type="server_error"))


def _add_completion_routes(app, cfg: ServeConfig, tok, context: int, model_name: str, submit) -> None:
    """`/v1/chat/completions` and `/v1/completions`: parse into jobs, submit them to the replicas' pool, then stream
    server-sent events or wait for the whole answer (499 when the client left)."""
    from fastapi import Request
    from fastapi.responses import Response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        job = chat_job(parse_json(await request.body()), cfg, tok, context)  # the guard caps the body as it arrives
        jobs, p, events = [job], job.params, asyncio.Queue()
        submit(jobs, events)
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        scored = p.logprobs is not None
        if p.stream:
            def choice(i: int, text: str, finish: str | None, entries: list) -> dict:
                c = {"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish}
                if scored:
                    c["logprobs"] = chat_logprobs(entries)
                return c

            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(p.n)]
            return _event_stream(_sse(jobs, events, _chunker("chat.completion.chunk", cid, created, model_name),
                                      choice, first, p.include_usage))
        if not await _finish(jobs, events, request.receive):
            return Response(status_code=499)  # nobody is left to read it
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish, "logprobs": chat_logprobs(c.entries) if scored else None}
                            for i, c in enumerate(job.choices)],
                "usage": usage(jobs)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        jobs = completion_jobs(parse_json(await request.body()), cfg, tok, context)
        p, events = jobs[0].params, asyncio.Queue()
        submit(jobs, events)
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        scored = p.logprobs is not None
        if p.stream:
            def choice(i: int, text: str, finish: str | None, entries: list) -> dict:
                return {"index": i, "text": text, "logprobs": completion_logprobs(entries) if scored else None,
                        "finish_reason": finish}

            return _event_stream(_sse(jobs, events, _chunker("text_completion", cid, created, model_name),
                                      choice, [], p.include_usage))
        if not await _finish(jobs, events, request.receive):
            return Response(status_code=499)
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": j.index0 + i, "text": c.text, "finish_reason": c.finish,
                             "logprobs": completion_logprobs(c.entries) if scored else None}
                            for j in jobs for i, c in enumerate(j.choices)],
                "usage": usage(jobs)}


def _event_stream(gen):
    from fastapi.responses import StreamingResponse

    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def load_replicas(cfg: ServeConfig) -> tuple[list, str]:
    """One Engine per device: cuda:0..N-1 (N = --devices, 0 = all), or N copies on CPU/MPS."""
    import torch

    # lazy: the engine and runtime import torch (~2 s); --help starts without it
    from picochat.engine import load_engine
    from picochat.runtime import detect_device

    dev = detect_device(cfg.device)
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        n = count if cfg.devices == 0 else cfg.devices
        if not 1 <= n <= count:
            raise UserError(f"--devices {cfg.devices}: this machine has {count} GPU(s)")
        devices = [torch.device("cuda", i) for i in range(n)]
    else:
        devices = [dev] * max(1, cfg.devices)
    engines, meta = [], {}
    for d in devices:
        engine, meta = load_engine(cfg.source, cfg.run, cfg.checkpoint, d)
        engines.append(engine)
    name = f"picochat-{meta.get('run') or 'model'}-{meta.get('stage') or cfg.source}"
    print(f"[serve] {len(engines)} replica(s) of {meta.get('checkpoint_dir')} on {', '.join(map(str, devices))} "
          f"(decode: {engines[0].mode})", flush=True)
    return engines, name


def cli_main(args: argparse.Namespace) -> int:
    _require_server_deps()
    import uvicorn

    cfg = config_from_args(ServeConfig, args)
    app = create_app(cfg)
    auth = "API key required on /v1" if (cfg.api_key or os.environ.get("PICOCHAT_API_KEY")) else "no API key"
    print(f"[serve] http://{cfg.host}:{cfg.port}/  (OpenAI base_url http://{cfg.host}:{cfg.port}/v1, {auth})",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# `picochat bench serve`: a real server on 127.0.0.1 and N concurrent streaming clients


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory to serve")
    parser.add_argument("--source", default=None, choices=["base", "mid", "sft", "rl"],
                        help="serve the latest checkpoint of this stage (with --run)")
    parser.add_argument("--run", default=None, help="run name for --source")
    parser.add_argument("--depth", type=int, default=20, help="random-init model depth (without --checkpoint)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab of the random-init model")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of every request")
    parser.add_argument("--new-tokens", type=int, default=128, help="max_tokens of every request")
    parser.add_argument("--clients", default="1,8,32,64", help="comma-separated numbers of concurrent streams")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the requests")
    parser.add_argument("--top-k", type=int, default=None,
                        help="top_k of the requests (0: off, as `bench infer` samples; default: the server's own)")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    parser.add_argument("--prefill-chunk", type=int, default=0, help="the server's --prefill-chunk (0: its default)")
    parser.add_argument("--device", default=None, help="cpu | cuda | mps (default: auto)")
    parser.add_argument("--engine-process", default="auto", choices=["auto", "on", "off"],
                        help="the server's --engine-process (auto = on CUDA)")


class _BenchTokenizer:
    """What the server needs of a tokenizer, for a random-init model that has none: the special ids at the top of
    the vocabulary, every other id one printable byte."""

    def __init__(self, vocab_size: int):
        from picochat.tokenizer import SPECIAL_TOKENS

        self.vocab_size = vocab_size
        self.special_tokens = {n: vocab_size - len(SPECIAL_TOKENS) + i for i, n in enumerate(SPECIAL_TOKENS)}
        self.bos_id = self.special_tokens["<|bos|>"]

    def id_to_bytes(self, idx: int) -> bytes:
        return bytes([97 + idx % 26])

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.id_to_bytes(i) for i in ids if i not in self.special_tokens.values()).decode()

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text if "a" <= c <= "z"]


def _bench_engines(opts: dict) -> tuple[list, str]:
    """`_bench_engine` as an engine process's factory: ([engine], what)."""
    engine, what = _bench_engine(argparse.Namespace(**opts))
    return [engine], what


def _bench_engine(args: argparse.Namespace):
    from picochat.engine import Engine, _config_for_depth, load_engine, prepare_model
    from picochat.model import build_model
    from picochat.runtime import compute_dtype, detect_device

    dev = detect_device(args.device)
    if args.checkpoint or args.source:
        engine, meta = load_engine(args.source or "sft", args.run, args.checkpoint, dev)
        return engine, meta["checkpoint_dir"]
    cfg = _config_for_depth(args.depth, args.vocab_size, "L")
    model = build_model(cfg, device=dev).set_compute_dtype(compute_dtype(dev))
    return Engine(prepare_model(model), _BenchTokenizer(cfg.vocab_size)), f"random-init depth {args.depth}"


async def _bench_streams(url: str, prompts: list[list[int]], new_tokens: int, temperature: float,
                         top_k: int | None = None) -> dict:
    """Every prompt as one streaming /v1/completions request, all at once: each stream's (time to first token,
    tokens, text chunks), and the wall-clock (time.time) start and end of the lot."""
    import httpx

    async def one(client, prompt: list[int]) -> tuple[float, int, int]:
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": temperature, "stream": True,
                "stream_options": {"include_usage": True}, **({} if top_k is None else {"top_k": top_k})}
        t0 = time.perf_counter()
        ttft, tokens, chunks = None, 0, 0
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise UserError(f"bench serve: the server answered {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if any(c.get("text") for c in chunk.get("choices", [])):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return (ttft if ttft is not None else time.perf_counter() - t0), tokens, chunks

    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.time()
        got = await asyncio.gather(*(one(client, p) for p in prompts))
        return {"start": start, "end": time.time(), "streams": got}


def _level_result(parts: list[dict]) -> dict:
    """One level's figures from its client processes' `_bench_streams`: tokens/s over the wall time from the first
    start to the last end, p50/p99 time to first token over every stream."""
    streams = [st for p in parts for st in p["streams"]]
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    ttfts = sorted(t for t, _, _ in streams)
    tokens = sum(n for _, n, _ in streams)

    def pct(q: float) -> float:
        return round(ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1e3, 2)

    return {"clients": len(streams), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": pct(0.5), "ttft_p99_ms": pct(0.99),
            "chunks": sum(c for _, _, c in streams), "client_processes": len(parts)}


def client_processes(streams: int, cpus: int | None = None) -> int:
    """Client processes for a level of `streams`: one per 16, at most a quarter of the cores (the server needs
    the rest). One process parsed about 9,000 chunks a second with 70% of a core on the 2-core CPU machine
    (0.72 s of CPU for 6,600 chunks in 2.4 s), so at 20,000 tokens/s a single client would measure itself."""
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    return max(1, min(-(-streams // 16), cpus // 4))


def _timing_delta(before: dict, after: dict, wall: float) -> dict:
    """The scheduler's time over one bench level (Pool.timing after - before): decode steps (those chained:
    launched before the previous step's tokens were read), and per step the host time launching it (step),
    sampling and waiting for the GPU (draw) and emitting tokens (emit); seconds of prefill (and its forwards: one
    per group of prompts that arrived together) and of graph captures; lone streams that joined the batch;
    busy = the share of the level's wall time inside those."""
    d = {k: after[k] - before[k] for k in before}
    steps = max(d["steps"], 1)
    busy = d["prefill_s"] + d["step_s"] + d["draw_s"] + d["emit_s"]
    return {"steps": d["steps"], "chained": d["chained"], "rows_per_step": round(d["step_rows"] / steps, 1),
            "step_ms": round(d["step_s"] / steps * 1e3, 2), "draw_ms": round(d["draw_s"] / steps * 1e3, 2),
            "emit_ms": round(d["emit_s"] / steps * 1e3, 2), "prefill_s": round(d["prefill_s"], 3),
            "prefills": d["prefills"], "captures": d["captures"], "capture_s": round(d["capture_s"], 3),
            "joined": d.get("joined", 0),
            "busy": round(busy / max(wall, 1e-9), 3)}


def _bench_client(url: str, prompts: list[list[int]], new_tokens: int, temperature: float, top_k: int | None,
                  start_at: float) -> dict:
    """One client process's share of a level, started at the wall-clock time `start_at` with the others."""
    time.sleep(max(0.0, start_at - time.time()))
    return asyncio.run(_bench_streams(url, prompts, new_tokens, temperature, top_k))


def bench_main(args: argparse.Namespace) -> dict:
    """Start `picochat serve` in this process on a free 127.0.0.1 port, then drive each --clients level from
    client processes of their own (`client_processes`; as real clients are: 64 streams parsed in the server's
    process would compete with it for the interpreter)."""
    import concurrent.futures
    import multiprocessing
    import random
    import socket

    _require_server_deps()
    import uvicorn

    from picochat.config import require

    require(all(c.strip().isdigit() and int(c) > 0 for c in str(args.clients).split(",")),
            f"--clients {args.clients!r}: expected positive numbers separated by commas, e.g. 1,8,32,64")
    require(args.max_batch >= 1, f"--max-batch {args.max_batch}: must be >= 1")
    require(args.prefill_chunk >= 0, f"--prefill-chunk {args.prefill_chunk}: must be >= 0 (0: the default)")
    require(0.0 <= args.temperature <= 2.0, f"--temperature {args.temperature}: must be between 0 and 2")
    require(args.top_k is None or 0 <= args.top_k <= 1000, f"--top-k {args.top_k}: must be between 0 (off) and 1000")
    levels = [int(c) for c in str(args.clients).split(",")]
    # requests ask for at most the model's context; completion_jobs clamps max_tokens to it
    cfg = ServeConfig(api_key="", max_batch=args.max_batch, max_tokens_limit=max(args.new_tokens, 1),
                      max_total_chars=10**9, max_queue=0, prefill_chunk=args.prefill_chunk,
                      engine_process=args.engine_process, device=args.device)
    if engine_process_on(cfg):
        opts = {k: getattr(args, k) for k in ("device", "checkpoint", "source", "run", "depth", "vocab_size")}
        app = create_app(cfg, model_name="bench", factory=(_bench_engines, (opts,)))
        pool = app.state.pool
        context, device, mode, tok, what = (pool.context, pool.info["device"], pool.info["mode"], pool.tokenizer,
                                            pool.model_name + ", engine process")
    else:
        engine, what = _bench_engine(args)
        app = create_app(cfg, engines=[engine], model_name="bench")
        context, device, mode, tok = engine.max_context, str(engine.device), engine.mode, engine.tokenizer
    n_prompt = max(1, min(args.prompt_tokens, context - args.new_tokens))
    new_tokens = min(args.new_tokens, context - n_prompt)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        require(thread.is_alive() and time.time() < deadline, "bench serve: the server did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    specials = set(tok.special_tokens.values())
    ids = [i for i in range(min(tok.vocab_size, 4096)) if i not in specials]
    print(f"[bench serve] {what} on {device} ({mode}): prompt {n_prompt} tokens, {new_tokens} new, "
          f"clients {levels}", flush=True)
    results = []
    clients = concurrent.futures.ProcessPoolExecutor(client_processes(max(levels)),
                                                     mp_context=multiprocessing.get_context("spawn"))

    def level(streams: int, tokens: int) -> dict:
        prompts = [[rng.choice(ids) for _ in range(n_prompt)] for _ in range(streams)]
        k = client_processes(streams)
        before = dict(app.state.pool.timing)
        start_at = time.time() + (0.5 if k > 1 else 0.0)  # every process has its share before any starts
        parts = [clients.submit(_bench_client, url, prompts[i::k], tokens, args.temperature, args.top_k, start_at)
                 for i in range(k)]
        row = _level_result([f.result() for f in parts])
        return {**row, "server": _timing_delta(before, app.state.pool.timing, row["wall_s"])}

    try:
        # warm-up, untimed: every level once in full, largest first: allocations, compiled kernels and the CUDA
        # graphs of the row counts and cache lengths each reaches, which a long-running server captures once each
        # (on an H100, one capture took 0.53 s of a 1.5 s 64-client level; a smaller level met one when only the
        # largest was warmed up). Each timed level's `captures` says whether one was still new
        level(1, min(4, new_tokens))
        for c in sorted(set(levels), reverse=True):
            level(c, new_tokens)
        for c in levels:
            row = level(c, new_tokens)
            sv = row["server"]
            print(f"[bench serve] {c:3d} clients: {row['tokens_per_s']:,.1f} tok/s, TTFT p50 {row['ttft_p50_ms']} ms, "
                  f"p99 {row['ttft_p99_ms']} ms, {row['tokens'] / max(row['chunks'], 1):.1f} tokens per chunk; "
                  f"scheduler: {sv['steps']} steps ({sv['chained']} chained) of {sv['rows_per_step']} rows, per "
                  f"step: launch {sv['step_ms']} ms, draw {sv['draw_ms']} ms, emit {sv['emit_ms']} ms; prefill "
                  f"{sv['prefill_s']} s in {sv['prefills']} forwards, {sv['captures']} graph captures "
                  f"{sv['capture_s']} s, {sv['joined']} lone streams joined, busy {sv['busy']:.0%}", flush=True)
            results.append(row)
    finally:
        clients.shutdown()
        server.should_exit = True
        thread.join(30)
    return {"model": what, "device": device, "mode": mode, "prompt_tokens": n_prompt,
            "new_tokens": new_tokens, "temperature": args.temperature,
            "top_k": cfg.top_k if args.top_k is None else args.top_k, "max_batch": args.max_batch,
            "prefill_chunk": app.state.pool.prefill_chunk,
            "results": results}
