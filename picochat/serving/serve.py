"""`picochat serve`: a web chat page and an OpenAI-compatible API in one process.

    picochat serve [--host 127.0.0.1 --port 8000] [--run NAME] [--source sft] [--api-key KEY] [--devices N]

Routes: `GET /` (the chat page, no CDN assets), `POST /v1/chat/completions` (stream or not), `GET /v1/models`,
`GET /health`. Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY or "none")`.

Concurrency: one model replica per device (`--devices N`), each driven by its own worker thread; requests wait in one
FIFO queue and the first free replica takes the oldest. The asyncio event loop only parses, validates and relays
text, so it never blocks on the model. A request whose client disconnects is cancelled: queued, it is skipped;
running, its generation stops at the next token.

FastAPI and uvicorn are an optional extra (`pip install 'picochat[serve]'`) and are imported only here, inside
functions.
"""

# No `from __future__ import annotations`: FastAPI resolves the handlers' `Request` annotations at runtime, and
# Request is imported inside create_app (fastapi is optional), so the annotations must be real objects.

import argparse
import asyncio
import contextlib
import json
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
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
    model_name: str | None = field(default=None, metadata={"help": "model id shown by /v1/models"})


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, ServeConfig)


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


@dataclass
class Params:
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    n: int
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool


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
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or an array of at most 4", "stop", "invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    top_k = _num(body, "top_k", int, 0, 1000, cfg.top_k)
    top_p = _num(body, "top_p", float, 0.0, 1.0, 1.0)
    if top_p <= 0:
        raise APIError(400, "'top_p' must be > 0", "top_p", "invalid_value")
    seed = _num(body, "seed", int, -(2**63), 2**63 - 1, None)
    return Params(messages=clean, max_tokens=max_tokens, temperature=_num(body, "temperature", float, 0.0, 2.0,
                                                                           cfg.temperature),
                  top_k=top_k or None, top_p=top_p if top_p < 1.0 else None, n=_num(body, "n", int, 1, cfg.max_n, 1),
                  seed=(seed if seed is not None else secrets.randbits(31)) % (2**63), stop=stop, stream=stream,
                  include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")))


# ----------------------------------------------------------------------------------------------------------------
# Text per choice: UTF-8 safe, tool calls readable, stop strings honoured (text that may start one is held back)


class ChoiceText:
    def __init__(self, tokenizer, stop: list[str]):
        from picochat.engine import StreamDecoder  # lazy: the engine imports torch (~2 s); --help starts without it

        self.dec = StreamDecoder(tokenizer)
        sp = tokenizer.special_tokens
        self.marks = {sp["<|python_start|>"]: "<<", sp["<|python_end|>"]: "=", sp["<|output_end|>"]: ">>"}
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""
        self.text = ""  # everything emitted
        self.finish: str | None = None
        self.tokens = 0

    def push(self, token: int) -> str:
        t = self.dec.push(token)
        if token in self.marks:
            t = self.dec.flush() + self.marks[token]
        return self._emit(t, final=False)

    def end(self) -> str:
        return self._emit(self.dec.flush(), final=True)

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
    prompt: list[int]
    params: Params
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    choices: list[ChoiceText] = field(default_factory=list)

    def send(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            self.cancelled.set()


class Pool:
    """Replicas with one worker thread each, fed from one FIFO queue (fair: oldest request first)."""

    def __init__(self, engines: list):
        self.engines = engines
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "tokens_generated": 0,
                      "active": 0}
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._worker, args=(e,), name=f"picochat-replica-{i}", daemon=True)
                        for i, e in enumerate(engines)]
        for t in self.threads:
            t.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            self.stats["requests"] += 1
        self.jobs.put(job)

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _worker(self, engine) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():  # the client left while queued
                self._count("cancelled")
                job.send(("end", "cancelled"))
                continue
            self._count("active")
            try:
                self._run(engine, job)
            except Exception as e:  # report to this client, keep serving the others
                self._count("errors")
                job.send(("error", f"{type(e).__name__}: {e}"))
            finally:
                self._count("active", -1)

    def _run(self, engine, job: Job) -> None:
        p = job.params
        tok = engine.tokenizer
        job.choices = [ChoiceText(tok, p.stop) for _ in range(p.n)]
        terminal = {engine.assistant_end, engine.bos}
        gen = engine.generate(job.prompt, num_samples=p.n, max_tokens=p.max_tokens, temperature=p.temperature,
                              top_k=p.top_k, top_p=p.top_p, seed=p.seed)
        steps = 0
        try:
            for col, mask in gen:
                if job.cancelled.is_set():
                    self._count("cancelled")
                    job.send(("end", "cancelled"))
                    return
                steps += 1
                deltas = []
                for i, (t, m) in enumerate(zip(col, mask)):
                    c = job.choices[i]
                    if c.finish is not None:
                        continue
                    c.tokens += 1
                    if m == 1 and t in terminal:
                        c.finish = "stop"
                        text = c.end()
                    else:
                        text = c.push(t)
                    if text or c.finish:
                        deltas.append((i, text, c.finish))
                self._count("tokens_generated", p.n)
                if deltas:
                    job.send(("delta", deltas))
                if all(c.finish for c in job.choices):
                    break
        finally:
            gen.close()
        tail = []
        for i, c in enumerate(job.choices):
            if c.finish is None:
                c.finish = "length"
                tail.append((i, c.end(), "length"))
        if tail:
            job.send(("delta", tail))
        self._count("completed")
        job.send(("end", "done"))


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(cfg: ServeConfig, engines: list | None = None, model_name: str | None = None):
    """Build the FastAPI app. `engines` (one per replica) are loaded from the checkpoint when not given."""
    _require_server_deps()
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if engines is None:
        engines, model_name = load_replicas(cfg)
    model_name = cfg.model_name or model_name or "picochat"
    api_key = cfg.api_key if cfg.api_key is not None else (os.environ.get("PICOCHAT_API_KEY") or None)
    pool = Pool(engines)
    tok = engines[0].tokenizer
    context = engines[0].max_context
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()  # let the replica threads finish their current job and exit

    app = FastAPI(title="picochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.pool = pool

    def error(e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error(APIError(e.status_code, str(e.detail), None, "not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error(APIError(500, f"internal error: {type(e).__name__}", None, None, type="server_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      None, "invalid_api_key", type="authentication_error"))
        return await call_next(request)

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "replicas": len(engines), "queued": pool.jobs.qsize(),
                "auth": bool(api_key), "context": context, **pool.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "picochat"}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        raw = await request.body()
        if len(raw) > 4 * cfg.max_total_chars + 65536:
            raise APIError(413, f"request body of {len(raw)} bytes is too large", None, "request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", None, "invalid_json") from None
        p = parse_request(body, cfg)
        prompt = render_for_completion(tok, {"messages": p.messages}, where="messages")
        if len(prompt) >= context:
            raise APIError(400, f"the conversation is {len(prompt)} tokens; this model's context is {context}",
                           "messages", "context_length_exceeded")
        p.max_tokens = min(p.max_tokens, context - len(prompt) + 1)
        loop = asyncio.get_running_loop()
        job = Job(prompt=prompt, params=p, loop=loop, events=asyncio.Queue())
        pool.submit(job)
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def usage() -> dict[str, int]:
            done = sum(c.tokens for c in job.choices)
            return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done}

        if p.stream:
            return StreamingResponse(_stream(job, cid, created, model_name, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                try:
                    kind, data = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "error":
                    raise APIError(500, f"generation failed: {data}", None, None, type="server_error")
                if kind == "end":
                    break
        finally:
            job.cancelled.set()  # no-op when finished; stops the worker if this handler was cancelled
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish, "logprobs": None} for i, c in enumerate(job.choices)],
                "usage": usage()}

    return app


async def _stream(job: Job, cid: str, created: int, model: str, usage):
    def chunk(choices: list[dict], **extra) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                      "model": model, "choices": choices, **extra}) + "\n\n"

    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(job.params.n)])
        while True:
            kind, data = await job.events.get()
            if kind == "delta":
                for i, text, finish in data:
                    delta = {"content": text} if text else {}
                    yield chunk([{"index": i, "delta": delta, "finish_reason": finish}])
            elif kind == "error":
                yield "data: " + json.dumps({"error": {"message": f"generation failed: {data}",
                                                       "type": "server_error", "param": None, "code": None}}) + "\n\n"
                break
            else:
                if job.params.include_usage:
                    yield chunk([], usage=usage())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client disconnected (this generator was cancelled) or the stream ended


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
