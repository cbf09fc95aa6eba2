"""Continuous batching for `picochat serve`: one scheduler thread per model replica decodes the rows of every
admitted request together and admits new requests between decode steps.

A replica keeps a row cache: keys/values (n_layer, R, T, Hkv, D) with a position per row, so rows of different
lengths share one decode step (RoPE, the cache write and the causal mask read the row's own position; attention is
SDPA with a boolean mask per row). Live rows occupy slots [0, live): a finished row's slot is taken by the last
live row, so a step runs over contiguous rows and only the positions the longest row has reached.

One scheduler iteration:
1. admission, FIFO: the oldest queued job is taken when its rows fit this replica (rows <= --max-batch,
   rows x positions <= --batch-tokens); otherwise it waits, and the jobs behind it wait too. Jobs whose client left
   are dropped from the queue and from the batch.
2. prefill: up to --prefill-chunk prompt tokens, oldest admitted job first, each prompt into its own batch-1
   cache, so a long prompt takes several iterations and running streams still get a step after each chunk; fresh
   prompts of one length go through one forward together. A finished prefill samples each row's first token and
   copies the prompt's keys/values into the rows' slots. The forward is the decode step's pieces
   (`prefill_rows`) with PICOCHAT_PIECE_PREFILL=1, else the model's own forward.
3. decode: one step over the rows that have a token to feed. Each row samples with its own request's
   temperature, top-k, top-p and seed (on CUDA every row of the step in one Gumbel-max launch, `gumbel_draw`;
   elsewhere each request's rows together from its seeded generator) and reports its own logprobs; stop strings
   and max tokens end rows one by one. A python tool call runs in the engine's tool pool: its row sits out the
   steps until the result is forced in, while the others decode.

On CUDA a decode step replays a CUDA graph captured per (rows, positions) bucket (RowCache.step), with the
engine's compiled pieces recompiled once for a dynamic batch; padding rows of a bucket write a scratch slot. While
nothing else needs the scheduler, steps are chained (`Replica.run`): the next step is launched from the drawn
tokens on the device before the host reads them, so the host's emitting overlaps the GPU's next step.

A lone request on a CUDA replica with the fused batch-1 kernels runs on `Engine.generate` instead (the batch-1
fast path), so one user keeps single-stream speed. When a second request is admitted, the lone one joins the batch
(`Replica.join_solo`): its prompt and the tokens it has emitted are prefilled as one more prompt, and it goes on
from its next token, keyed as `generate` would key it. Otherwise the lone stream would take a step of its own
beside every batch step and keep the batch from chaining, for as long as it runs. Engines that are
not a picochat `Engine` over a `GPT` (stubs in tests, wrappers) run one request at a time through their
`generate`, as before.

Jobs are duck-typed (serve.Job): `prompt`, `params`, `cancelled`, `start`, `take`, `close_choice`, `wrap_up`,
`send`, so this module does not import the server.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from picochat.config import UserError
from picochat.engine import (CACHE_BUCKET, Engine, _attn_post_mlp, _attn_pre, _GPTDecoder, _lm_head,
                             device_ints, gumbel_draw, gumbel_key, gumbel_sampling,
                             sample_next_token)
from picochat.model import KVCache, rms_norm
from picochat.ops import attention


class Rejected(Exception):
    """A request this server refuses before queueing it: (HTTP status, message, parameter, code)."""

    def __init__(self, status: int, message: str, param: str | None, code: str):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def cuda_graphs(engine: Engine) -> bool:
    """Whether this engine's steps are replayed from CUDA graphs (its decoder's setting, on CUDA)."""
    return engine.device.type == "cuda" and engine.decoder.cuda_graph


def batchable(engine: Any) -> bool:
    """Whether rows of different requests can share this engine's decode steps (a KV-cached picochat GPT)."""
    return isinstance(engine, Engine) and isinstance(engine.decoder, _GPTDecoder)


def kv_bytes_per_token(engine: Engine) -> int:
    c = engine.model.config
    esize = torch.empty((), dtype=engine.model.compute_dtype).element_size()
    return c.n_layer * 2 * c.n_kv_head * c.head_dim * esize


def default_batch_tokens(engine: Any, max_rows: int) -> int:
    """KV-cache positions per replica when --batch-tokens is 0: on CUDA, 70% of the memory free after loading;
    elsewhere max rows x context (the cache only grows to what the live rows need)."""
    if not batchable(engine):
        return 0
    ctx = engine.max_context
    if engine.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(engine.device)
        return max(ctx, int(free * 0.7) // kv_bytes_per_token(engine))
    return max_rows * ctx


def default_prefill_chunk(engine: Any) -> int:
    """Prompt tokens per scheduler iteration when --prefill-chunk is 0: 4096 on CUDA (a d20 forward of 4096
    tokens is milliseconds, so several fresh prompts go in one batch), 512 elsewhere (seconds on a CPU)."""
    dev = getattr(engine, "device", None)
    return 4096 if isinstance(dev, torch.device) and dev.type == "cuda" else 512


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def check_capacity(job: Any, max_rows: int, batch_tokens: int, context: int) -> None:
    """Raise Rejected for a job no replica of a batching pool could ever hold: more rows than --max-batch, or more
    cache positions than --batch-tokens."""
    n, need = job.params.n, _round_up(need_positions(job), CACHE_BUCKET)
    if n > max_rows:
        raise Rejected(400, f"n={n} rows exceed this server's {max_rows} rows per replica (--max-batch)",
                       "n", "capacity_exceeded")
    if n * min(need, context) > batch_tokens:
        raise Rejected(400, f"{n} row(s) of {need_positions(job)} tokens (prompt + max_tokens) exceed this "
                            f"server's KV cache of {batch_tokens} tokens per replica (--batch-tokens): "
                            f"lower max_tokens or n", "max_tokens", "capacity_exceeded")


def need_positions(job: Any) -> int:
    """Cache positions one row of `job` writes: the prompt and every generated token but the last."""
    return len(job.prompt) + max(job.params.max_tokens, 1) - 1


# ----------------------------------------------------------------------------------------------------------------
# The row cache and the batched decode step


def row_pieces(engine: Engine) -> tuple:
    """The decode step's pieces for rows (attention's pre-part, post-part + MLP, head), with the model's head sizes
    bound. Where the engine compiles its own (CUDA) they are compiled once more, with a dynamic batch dimension:
    the engine's are specialised per batch size, and rows come in any number; one compile per size would stall
    the streams of a busy server for seconds each time a new size appears. `decoder.rows_plain` keeps the plain
    ones for a fallback."""
    dec = engine.decoder
    if getattr(dec, "rows_pieces", None) is None:
        c = engine.model.config
        H, Hkv, D, scale = c.n_head, c.n_kv_head, c.head_dim, c.ve_gate_scale

        def pre(x, x0, lam_r, lam_0, wq, wk, wv, ve, gate_w, cos, sin):  # head sizes stay constants, not symbols
            return _attn_pre(x, x0, lam_r, lam_0, wq, wk, wv, ve, gate_w, cos, sin, H, Hkv, D, scale)

        def post(x, y, wo, wfc, wproj):  # own code objects: compiled apart from the engine's specialised copies
            return _attn_post_mlp(x, y, wo, wfc, wproj)

        def head(x, w, vocab_size, softcap):
            return _lm_head(x, w, vocab_size, softcap)

        dec.rows_plain = (pre, post, head)
        dec.rows_pieces = dec.rows_plain
        if dec._pre is not _attn_pre:
            dec.rows_pieces = tuple(torch.compile(f, fullgraph=True, dynamic=True) for f in dec.rows_plain)
    return dec.rows_pieces


class RowCache:
    """k/v (n_layer, R + 1, T, Hkv, D), the smear's previous embedding per row (R + 1, 1, d), and each row's
    position (host ints: the number of tokens the row has in the cache). Slot R is scratch: the padding rows of a
    captured step write there (one row beyond --batch-tokens). Grown on demand; freed when no row is live, unless
    graphed (its graphs hold its buffers' addresses: a graphed cache is allocated at --max-batch rows and kept).

    On CUDA (with the engine's CUDA graphs on) a step is replayed from a CUDA graph captured per (rows, positions)
    bucket over static input buffers: at batch 64 an eager step is kernel-launch bound (hundreds of small kernels
    per token), the graph launches them in one call. The engine's torch.compile'd pieces run inside it."""

    ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
    T_BUCKET = 128  # attention reads the bucket's positions: finer buckets read less padding, cost more graphs

    def __init__(self, engine: Engine, rows: int, positions: int):
        m = engine.model
        c = m.config
        dev, dt = m.wte.weight.device, m.compute_dtype
        shape = (c.n_layer, rows + 1, positions, c.n_kv_head, c.head_dim)
        self.engine = engine
        self.k = torch.zeros(shape, dtype=dt, device=dev)
        self.v = torch.zeros(shape, dtype=dt, device=dev)
        self.prev = torch.zeros(rows + 1, 1, c.n_embd, dtype=dt, device=dev)
        self.graphed = cuda_graphs(engine)
        self.pieces = row_pieces(engine)
        self.inputs = torch.zeros(3, rows, dtype=torch.long, device=dev)  # token, position, slot per padded row
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.captured: list[float] = []  # seconds of each capture (the scheduler moves them into Pool.timing)
        self.pool = torch.cuda.graph_pool_handle() if self.graphed else None

    @property
    def rows(self) -> int:
        return self.k.shape[1] - 1

    @property
    def positions(self) -> int:
        return self.k.shape[2]

    def copy_rows(self, other: "RowCache", n: int, t: int) -> None:
        self.k[:, :n, :t] = other.k[:, :n, :t]
        self.v[:, :n, :t] = other.v[:, :n, :t]
        self.prev[:n] = other.prev[:n]

    def swap(self, i: int, j: int, t: int) -> None:
        idx, rev = device_ints([i, j], self.k.device), device_ints([j, i], self.k.device)
        self.k[:, idx, :t] = self.k[:, rev, :t]  # the right side is gathered (a copy) before the write
        self.v[:, idx, :t] = self.v[:, rev, :t]
        self.prev[idx] = self.prev[rev]

    def step(self, toks: list[int] | torch.Tensor, poss: list[int], t: int,
             slots: list[int] | None = None) -> torch.Tensor:
        """One token per row for slots [0, n) (see decode_rows); fp32 logits (n, V), valid until the next step.
        toks: host ints, or a device tensor (a chained step feeds the tokens just drawn without reading them);
        slots: each row's write slot, j for row j unless it is `rows` (the scratch slot: a row being dropped)."""
        n = len(poss)
        dev = self.k.device
        slots = list(range(n)) if slots is None else slots
        on_device = isinstance(toks, torch.Tensor)
        if not self.graphed:
            inp = torch.tensor([[0] * n if on_device else toks, poss, slots], dtype=torch.long, device=dev)
            tok = toks[:, None] if on_device else inp[0, :, None]
            return decode_rows(self.engine, self, tok, inp[1], inp[2], t)
        nb = min(self.rows, next((b for b in self.ROW_BUCKETS if b >= n), _round_up(n, 16)))
        tb = min(self.positions, _round_up(t, self.T_BUCKET))
        key = (nb, tb)
        if key not in self.graphs:
            try:
                t0 = time.perf_counter()
                self.graphs[key] = self._capture(nb, tb)
                self.captured.append(time.perf_counter() - t0)
            except Exception as e:  # compiled pieces first, then the graph itself: fall back one level per failure
                torch.cuda.synchronize(dev)
                self.graphs = {}
                if self.pieces is not self.engine.decoder.rows_plain:
                    warnings.warn(f"[serve] batched decode: the compiled step failed ({type(e).__name__}: {e}); "
                                  f"using plain kernels in the CUDA graph")
                    self.pieces = self.engine.decoder.rows_pieces = self.engine.decoder.rows_plain
                else:
                    warnings.warn(f"[serve] batched decode: CUDA graph capture failed ({type(e).__name__}: {e}); "
                                  f"decoding these rows eagerly")
                    self.graphed = False
                return self.step(toks, poss, t, slots)
        pad = nb - n  # padding rows feed token 0 at position 0 into the scratch slot
        host = torch.tensor([([0] * n if on_device else toks) + [0] * pad, poss + [0] * pad,
                             slots + [self.rows] * pad], dtype=torch.long)
        self.inputs[:, :nb].copy_(host, non_blocking=True)
        if on_device:
            self.inputs[0, :n].copy_(toks)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]

    def _capture(self, nb: int, tb: int) -> tuple[Any, torch.Tensor]:
        """A graph of decode_rows over the first nb input rows and tb positions. While it is captured (and in the
        warm-up runs before) every row writes the scratch slot, so live rows are not touched."""
        self.inputs[:, :nb] = 0
        self.inputs[2, :nb] = self.rows
        tok, pos, slot = self.inputs[0, :nb, None], self.inputs[1, :nb], self.inputs[2, :nb]
        return self.engine.decoder._graph(lambda: decode_rows(self.engine, self, tok, pos, slot, tb), self.pool)


@torch.no_grad()
def _layer_pre(engine: Engine, pre, i: int, ids: torch.Tensor, x: torch.Tensor, x0: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """Layer i's attention pre-part (`row_pieces`' pre) for tokens `ids`: its value embeddings, gate and q/k/v
    weights (fused where the decoder fused them) gathered from the model. Returns (x, q, k, v)."""
    m, dec = engine.model, engine.decoder
    a = m.blocks[i].attn
    ve = m.value_embeds[str(i)](ids) if str(i) in m.value_embeds else None
    gate_w = a.ve_gate.weight if a.ve_gate is not None else None
    wq, wk, wv = dec.qkv[i] if dec.qkv else (a.c_q.weight, a.c_k.weight, a.c_v.weight)
    return pre(x, x0, m.resid_lambdas[i], m.x0_lambdas[i], wq, wk, wv, ve, gate_w, cos, sin)


def decode_rows(engine: Engine, cache: RowCache, tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                t: int) -> torch.Tensor:
    """One token per row: tok (n, 1) at positions pos (n,), row j writing cache slot slot[j] and attending to the
    keys of slot j at positions <= pos[j] (and inside the layer's window; slot[j] == j but for padding rows).
    Writes the cache; returns fp32 logits (n, V). The same math as the engine's decode step
    (`_GPTDecoder._step`), with per-row positions, and the same (compiled, on CUDA) pieces."""
    m = engine.model
    pre, post, head = cache.pieces
    c = m.config
    dt = m.compute_dtype
    n = tok.shape[0]
    H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
    cos = m.cos[0].index_select(0, pos).unsqueeze(1).to(dt)  # (n, 1, 1, D/2): each row's own position
    sin = m.sin[0].index_select(0, pos).unsqueeze(1).to(dt)
    x = rms_norm(m.wte(tok).to(dt))
    if m.smear_gate is not None:
        e = x
        gate = m.smear_lambda.to(dt) * torch.sigmoid(F.linear(e[..., : m.smear_gate.in_features],
                                                               m.smear_gate.weight.to(dt)))
        x = e + gate * cache.prev.index_select(0, slot)
        cache.prev.index_copy_(0, slot, e)
    x0 = x_mid = x
    kpos = torch.arange(t, device=pos.device)
    causal = kpos[None, :] <= pos[:, None]  # (n, t)
    for i, block in enumerate(m.blocks):
        a = block.attn
        x, q, k, v = _layer_pre(engine, pre, i, tok, x, x0, cos, sin)
        cache.k[i].index_put_((slot, pos), k[:, 0].to(cache.k.dtype))
        cache.v[i].index_put_((slot, pos), v[:, 0].to(cache.v.dtype))
        w = m.window_sizes[i]
        mask = causal if w is None else causal & (pos[:, None] - kpos[None, :] < w)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k[i, :n, :t].transpose(1, 2).to(dt),
                                           cache.v[i, :n, :t].transpose(1, 2).to(dt), attn_mask=mask[:, None, None],
                                           enable_gqa=Hkv != H)
        x = post(x, y.transpose(1, 2).reshape(n, 1, H * D), a.c_proj.weight, block.mlp.c_fc.weight,
                 block.mlp.c_proj.weight)
        if i == c.n_layer // 2:
            x_mid = x
    if m.backout_lambda is not None:
        x = x - m.backout_lambda.to(dt) * x_mid
    return head(x, m.lm_head.weight, c.vocab_size, c.softcap)


PIECE_PREFILL_ENV = "PICOCHAT_PIECE_PREFILL"  # "1": prefill through `prefill_rows`; unset or "0": the model's forward


def piece_prefill(env: dict | None = None) -> bool:
    """Whether a replica prefills through `prefill_rows` (PICOCHAT_PIECE_PREFILL=1). Off by default: on an H100
    (`bench serve --depth 20`, f69e3a2) it cut the 64-client level's prefill from 0.70 to 0.59 s but raised the
    32-client level's from 0.24 to 0.30 s, with no consistent change in tokens/s; uncompiled (off CUDA) the pieces
    are the forward's own ops."""
    flag = (os.environ if env is None else env).get(PIECE_PREFILL_ENV, "")
    if flag not in ("", "0", "1"):
        raise UserError(f"{PIECE_PREFILL_ENV}={flag!r}: use 1 (prefill through the decode step's pieces) or 0 "
                        f"(the model's forward)")
    return flag == "1"


def prefill_rows(engine: Engine, cache: KVCache, ids: torch.Tensor, last: int) -> torch.Tensor:
    """Prompts ids (B, T), continuing `cache` from cache.pos, through the decode step's pieces (`row_pieces`): the
    math of `GPT.forward` with a KV cache. Compiled (CUDA), the pieces are a handful of launches per layer where
    the eager forward has about forty; uncompiled they are the same ops. Why: prompts arrive a few at a time, and
    the eager forward of a few prompts is bound by the host: on an H100 at 64 clients (d20, 512-token prompts) the
    server's 24 prefill forwards took 0.44 s, with the eager forward's Python lines the replica thread's largest
    share. Measured, it did not pay consistently, so it is off unless PICOCHAT_PIECE_PREFILL=1 (`piece_prefill`).
    Returns fp32 logits (B, V) of position `last`."""
    m = engine.model
    pre, post, head = row_pieces(engine)
    c, dt = m.config, m.compute_dtype
    B, T = ids.shape
    t0 = cache.pos
    cos, sin = m.cos[:, t0:t0 + T].to(dt), m.sin[:, t0:t0 + T].to(dt)
    x = rms_norm(m.wte(ids).to(dt))
    if m.smear_gate is not None:
        x = m.smear(x, cache)
    x0 = x_mid = x
    for i, block in enumerate(m.blocks):
        a = block.attn
        x, q, k, v = _layer_pre(engine, pre, i, ids, x, x0, cos, sin)
        k, v = cache.insert(i, k, v)
        y = attention.cached_attention(q, k, v, q_offset=t0, window=m.window_sizes[i])
        x = post(x, y.reshape(B, T, -1), a.c_proj.weight, block.mlp.c_fc.weight, block.mlp.c_proj.weight)
        if i == c.n_layer // 2:
            x_mid = x
    cache.pos += T
    if m.backout_lambda is not None:
        x = x - m.backout_lambda.to(dt) * x_mid
    return head(x[:, last:last + 1], m.lm_head.weight, c.vocab_size, c.softcap)


# ----------------------------------------------------------------------------------------------------------------
# The pool (one FIFO queue) and the replicas


class Pool:
    """Replicas, one scheduler thread each, fed from one FIFO queue of jobs (the oldest first)."""

    def __init__(self, engines: list, strings, max_rows: int = 64, batch_tokens: int = 0, max_queue: int = 256,
                 prefill_chunk: int = 0, solo: bool | None = None, chain: bool | None = None):
        self.engines, self.strings = engines, strings  # strings: tokenizer -> the token-text cache jobs share
        self.chain = chain
        self.max_rows, self.max_queue = max_rows, max_queue
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(engines[0])
        self.batch_tokens = batch_tokens or default_batch_tokens(engines[0], max_rows)
        self.waiting: collections.deque = collections.deque()
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0, "tokens_generated": 0,
                      "active": 0, "rows": 0}
        # where the scheduler threads' time goes (seconds, host wall clock; GPU time shows where the host waits for
        # it, in `draw`): `bench serve` reports it per level. Diagnostics, updated without the lock: with several
        # replicas an increment can be lost
        self.timing = {"iterations": 0, "steps": 0, "chained": 0, "step_rows": 0, "prefills": 0, "prefill_s": 0.0,
                       "step_s": 0.0, "draw_s": 0.0, "emit_s": 0.0, "captures": 0, "capture_s": 0.0, "joined": 0}
        self.closed = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self.replicas = [Replica(self, e, solo) for e in engines]
        self.threads = [threading.Thread(target=r.loop, name=f"picochat-replica-{i}", daemon=True)
                        for i, r in enumerate(self.replicas)]
        for t in self.threads:
            t.start()

    def queued(self) -> int:
        return len(self.waiting)

    def check(self, job: Any) -> None:
        """Refuse a job no replica could ever hold (more rows or cache positions than one replica has)."""
        if batchable(self.engines[0]):
            check_capacity(job, self.max_rows, self.batch_tokens, self.engines[0].max_context)

    def submit(self, jobs: list, loop, events) -> None:
        """Queue the jobs of one HTTP request (all or none); their events all go to `events`. Raises Rejected."""
        for job in jobs:
            self.check(job)
        with self._wake:
            if self.max_queue and len(self.waiting) + len(jobs) > self.max_queue:
                for job in [j for j in self.waiting if j.cancelled.is_set()]:  # make room first
                    self.waiting.remove(job)
                    self._end(job, "cancelled", locked=True)
            if self.max_queue and len(self.waiting) + len(jobs) > self.max_queue:
                raise Rejected(503, f"the server is busy: {len(self.waiting)} requests are queued (--max-queue "
                                    f"{self.max_queue}); retry shortly", None, "server_overloaded")
            self.stats["requests"] += 1
            for job in jobs:
                job.loop, job.events = loop, events
                self.waiting.append(job)
            self._wake.notify_all()

    def close(self) -> None:
        with self._wake:
            self.closed = True
            self._wake.notify_all()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _end(self, job: Any, why: str, locked: bool = False) -> None:
        """A queued job that never ran: its client left."""
        if locked:
            self.stats["cancelled"] += 1
        else:
            self.count("cancelled")
        job.send(("end", why))

    def take(self, fits, block: bool) -> Any:
        """The oldest queued job if `fits(job)`, else None (it stays first). Waits a little for one when `block`."""
        with self._wake:
            while True:
                while self.waiting and self.waiting[0].cancelled.is_set():
                    self._end(self.waiting.popleft(), "cancelled", locked=True)
                if self.waiting and fits(self.waiting[0]):
                    job = self.waiting.popleft()
                    self.stats["active"] += 1
                    if self.waiting:
                        self._wake.notify_all()  # another replica may fit the next one
                    return job
                if not block or self.closed:
                    return None
                self._wake.wait(0.25)
                block = False  # one wait, then back to the caller's loop (it checks `closed`)


@dataclass
class _Row:
    """One choice of a job, decoding in a slot of the row cache."""

    job: Any
    index: int                      # the choice within its job
    pos: int                        # tokens in the cache
    next: int | None = None         # the token to feed at the next step; None while it waits for a tool
    taken: int = 0                  # tokens emitted (sampled or forced): max_tokens counts them
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    forced: collections.deque = field(default_factory=collections.deque)
    tool: Any = None                # the running tool call's future
    stash: torch.Tensor | None = None  # logits (V,) held while the tool runs


@dataclass(eq=False)
class _Prefill:
    job: Any
    cache: Any = None               # a model KVCache holding the prompt, allocated when its prefill starts
    row: int = 0                    # the prompt's row in it (prompts prefilled together share one)
    done: int = 0                   # prompt tokens already in it
    logits: torch.Tensor | None = None
    tokens: list[int] | None = None  # what to prefill: the job's prompt, or (a joining lone job) it + its output
    taken: int = 0                  # tokens the job already emitted (a joining lone job)

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = self.job.prompt


class Replica:
    """One engine's scheduler (see the module docstring)."""

    def __init__(self, pool: Pool, engine: Any, solo: bool | None):
        self.pool, self.engine = pool, engine
        self.batched = batchable(engine)
        # the engine's own batch-1 path for a lone request: where it is faster (the fused CUDA kernels), or always
        # for engines that cannot batch
        self.solo_ok = (not self.batched) or (solo if solo is not None else bool(engine.decoder.fused))
        self.cache: RowCache | None = None
        self.graphs_on = self.batched and cuda_graphs(engine)
        self.pinned = self.batched and engine.device.type == "cuda"
        # chained steps (`run`) on CUDA, where the host's work can overlap the GPU's; `Pool(chain=)` overrides
        self.chain = self.batched and (pool.chain if pool.chain is not None else self.pinned)
        self.host_tokens = torch.empty(pool.max_rows + 1, dtype=torch.long, pin_memory=self.pinned)
        self.rows: list[_Row] = []
        self.prefills: list[_Prefill] = []
        self.solo: tuple[Any, Any] | None = None  # (job, generator) on Engine.generate
        self.solo_tokens: list[int] = []  # what the lone job emitted so far, while it can still join the batch
        self.solo_plain = True  # no forced token, tool call or logprobs so far: it can join the batch
        self.gens: dict[int, torch.Generator] = {}
        self.strings = None
        # the Gumbel-max sampler's zeroed scratch (2, rows), one per replica: its launches run on this thread only
        self.gumbel = self.batched and gumbel_sampling(engine.device)
        self.scratch = torch.zeros(2, pool.max_rows, dtype=torch.long, device=engine.device) if self.gumbel else None
        self.piece_prefill = self.batched and piece_prefill()

    # -- admission ------------------------------------------------------------------------------------------------

    def reserved(self) -> tuple[int, int]:
        """(rows, longest row's positions) of the live and prefilling jobs, and of a lone job that would join them."""
        jobs = [p.job for p in self.prefills] + ([self.solo[0]] if self.solo is not None and self.solo_plain else [])
        rows = len(self.rows) + sum(j.params.n for j in jobs)
        t = max([need_positions(r.job) for r in self.rows] + [need_positions(j) for j in jobs] + [0])
        return rows, t

    def fits(self, job: Any) -> bool:
        if not self.batched:
            return self.solo is None
        rows, t = self.reserved()
        rows += job.params.n
        t = min(self.engine.max_context, _round_up(max(t, need_positions(job)), CACHE_BUCKET))
        return rows <= self.pool.max_rows and rows * t <= self.pool.batch_tokens

    def idle(self) -> bool:
        return not self.rows and not self.prefills and self.solo is None

    def admit(self) -> None:
        while True:
            job = self.pool.take(self.fits, block=self.idle())
            if job is None:
                return
            try:
                self.start(job)
            except Exception as e:
                self.fail(job, e)

    def start(self, job: Any) -> None:
        e = self.engine
        if self.strings is None:
            self.strings = self.pool.strings(e.tokenizer)
        job.start(e, self.strings)
        p = job.params
        if p.max_tokens <= 0:  # echo only: the prompt was the whole answer
            self.finish(job)
            return
        alone = self.idle() and self.pool.queued() == 0 and p.n == 1
        if not self.batched or (self.solo_ok and alone):
            scored = p.logprobs is not None
            gen = e.generate(job.prompt, num_samples=p.n, max_tokens=p.max_tokens, temperature=p.temperature,
                             top_k=p.top_k, top_p=p.top_p, seed=p.seed, **({"logprobs": p.logprobs} if scored else {}))
            self.solo, self.solo_tokens, self.solo_plain = (job, gen), [], self.batched and not scored
            return
        self.join_solo()
        self.seed(job)
        self.prefills.append(_Prefill(job))

    def seed(self, job: Any) -> None:
        """The batched job's own generator (its sampling rows off CUDA draw from it), seeded by the request."""
        g = torch.Generator(device=self.engine.device)
        g.manual_seed(job.params.seed)
        self.gens[id(job)] = g

    def join_solo(self) -> None:
        """The lone job on Engine.generate, if any and if it can, into the batch ahead of the newer jobs: its prompt
        and emitted tokens are prefilled again (one forward), and its next token is drawn as its row's `taken`-th,
        the key `generate` would have used. A job that forced tokens, called a tool or scores its tokens stays on
        `generate` until it ends."""
        if self.solo is None or not self.solo_plain:
            return
        job, gen = self.solo
        self.solo = None
        if hasattr(gen, "close"):
            gen.close()
        self.seed(job)
        self.prefills.insert(0, _Prefill(job, tokens=job.prompt + self.solo_tokens, taken=len(self.solo_tokens)))
        self.pool.timing["joined"] += 1

    # -- ending jobs ----------------------------------------------------------------------------------------------

    def drop(self, job: Any) -> None:
        """Forget a job's rows and state (its slots are compacted)."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].job is job:
                self.remove_slot(i)
        self.prefills = [p for p in self.prefills if p.job is not job]
        self.gens.pop(id(job), None)
        if self.solo is not None and self.solo[0] is job:
            gen = self.solo[1]
            self.solo = None
            if hasattr(gen, "close"):
                gen.close()

    def finish(self, job: Any) -> None:
        self.drop(job)
        job.wrap_up()
        self.pool.count("completed")
        self.pool.count("active", -1)
        job.send(("end", "done"))

    def fail(self, job: Any, e: Exception) -> None:
        try:
            self.drop(job)
        finally:
            self._failed(job, e)

    def _failed(self, job: Any, e: Exception) -> None:
        self.pool.count("errors")
        self.pool.count("active", -1)
        job.send(("error", f"{type(e).__name__}: {e}"))

    def cancel(self, job: Any) -> None:
        self.drop(job)
        self.pool.count("cancelled")
        self.pool.count("active", -1)
        job.send(("end", "cancelled"))

    def jobs(self) -> list:
        seen: dict[int, Any] = {}
        for j in [r.job for r in self.rows] + [p.job for p in self.prefills] + ([self.solo[0]] if self.solo else []):
            seen.setdefault(id(j), j)
        return list(seen.values())

    # -- slots ----------------------------------------------------------------------------------------------------

    def live_positions(self) -> int:
        return max((r.pos for r in self.rows), default=0) + 1

    def remove_slot(self, i: int) -> None:
        last = len(self.rows) - 1
        if i != last:
            self.cache.swap(i, last, min(self.cache.positions, self.live_positions()))
            self.rows[i] = self.rows[last]
        self.rows.pop()
        self.pool.count("rows", -1)
        if not self.rows and not self.prefills and not self.cache.graphed:
            self.cache = None  # nothing live: give the memory back (a graphed cache is kept: its graphs with it)

    def ensure(self, rows: int, positions: int) -> None:
        """Room for `rows` rows of `positions` positions, keeping the live rows."""
        c = self.cache
        if c is not None and c.rows >= rows and c.positions >= positions:
            return
        ctx = self.engine.max_context
        t = min(ctx, _round_up(max(positions, c.positions if c else 0), CACHE_BUCKET))
        r = max(rows, c.rows if c else 0)
        # amortised growth where it fits; on CUDA straight to --max-batch rows: each new cache recaptures its graphs
        grown = self.pool.max_rows if self.graphs_on else min(self.pool.max_rows, max(r, 2 * (c.rows if c else 0), 8))
        if (grown + 1) * t <= self.pool.batch_tokens:  # + the scratch slot
            r = grown
        new = RowCache(self.engine, r, t)
        if c is not None and self.rows:
            new.copy_rows(c, len(self.rows), min(c.positions, t))
        self.cache = new

    def partition(self) -> int:
        """Move the rows with a token to feed to slots [0, n); returns n."""
        n = 0
        t = min(self.cache.positions, self.live_positions())
        for i, r in enumerate(self.rows):
            if r.next is not None:
                if i != n:
                    self.cache.swap(i, n, t)
                    self.rows[i], self.rows[n] = self.rows[n], self.rows[i]
                n += 1
        return n

    # -- the loop -------------------------------------------------------------------------------------------------

    def loop(self) -> None:
        dev = getattr(self.engine, "device", None)
        if isinstance(dev, torch.device) and dev.type == "cuda":
            torch.cuda.set_device(dev)
        with torch.no_grad():
            while not self.pool.closed:
                try:
                    self.iteration()
                except Exception as e:  # a failed step: every job in it gets the error; the replica goes on
                    if self.chain:  # chained steps are the newest path: later steps run unchained, loudly
                        warnings.warn(f"[serve] a decode step failed ({type(e).__name__}: {e}); decoding without "
                                      f"chained steps from now on")
                        self.chain = False
                    jobs = self.jobs()
                    self.pool.count("rows", -len(self.rows))
                    self.rows, self.prefills, self.cache, self.solo, self.gens = [], [], None, None, {}
                    for job in jobs:
                        self._failed(job, e)

    def iteration(self) -> None:
        self.pool.timing["iterations"] += 1
        for job in self.jobs():
            if job.cancelled.is_set():  # the client left: its rows are freed before this step
                self.cancel(job)
        self.admit()
        if self.prefills:
            t0 = time.perf_counter()
            self.prefill()
            self.pool.timing["prefill_s"] += time.perf_counter() - t0
        if self.solo is not None:
            self.solo_step()
        if self.rows and not self.decode() and not self.prefills and self.solo is None:
            time.sleep(0.002)  # every live row waits for its tool: nothing to compute until one returns

    def prefill(self) -> None:
        """Up to --prefill-chunk prompt tokens, oldest job first; a finished prompt becomes live rows. Fresh
        prompts of the oldest one's length go through one forward together (64 users arriving at once are 64
        prompts of about one length; one at a time, the last would wait for 63 launch-bound forwards)."""
        budget = self.pool.prefill_chunk
        m = self.engine.model
        while budget > 0 and self.prefills:
            p = self.prefills[0]
            L = len(p.tokens)
            if p.cache is None and L <= budget:
                group = [q for q in self.prefills if q.cache is None and len(q.tokens) == L][:budget // L]
                budget -= L * len(group)
                self.prefill_together(group)
                continue
            try:
                if p.cache is None:  # longer than the budget: in chunks, alone
                    p.cache = m.kv_cache(1, _round_up(L, CACHE_BUCKET))
                n = min(budget, L - p.done)
                ids = torch.tensor([p.tokens[p.done:p.done + n]], dtype=torch.long, device=self.engine.device)
                p.logits = self.forward(ids, p.cache)
                p.done += n
                budget -= n
                if p.done < L:
                    return
                self.prefills.pop(0)
                self.place(p)
            except Exception as e:
                self.fail(p.job, e)

    def prefill_together(self, group: list[_Prefill]) -> None:
        """Whole prompts of one length in one batched forward, each then placed into its rows."""
        m = self.engine.model
        L = len(group[0].tokens)
        try:
            cache = m.kv_cache(len(group), _round_up(L, CACHE_BUCKET))
            ids = torch.tensor([q.tokens for q in group], dtype=torch.long, device=self.engine.device)
            logits = self.forward(ids, cache)
        except Exception as e:
            for q in group:
                self.fail(q.job, e)
            return
        for g, q in enumerate(group):
            q.cache, q.row, q.done, q.logits = cache, g, L, logits[g:g + 1]
            self.prefills.remove(q)
            try:
                self.place(q)
            except Exception as e:
                self.fail(q.job, e)

    def forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Prompt tokens (B, T) into `cache`; the last position's logits (B, V). Through `prefill_rows`; should its
        compiled pieces fail, through the model's own forward from then on, loudly."""
        self.pool.timing["prefills"] += 1
        if self.piece_prefill:
            pos = cache.pos
            prev = cache.prev_embed.clone() if pos > 0 else None  # the smear of a later chunk reads it
            try:
                return prefill_rows(self.engine, cache, ids, ids.shape[1] - 1)
            except torch.OutOfMemoryError:  # not the pieces' fault: the job fails, the path stays
                cache.pos = pos
                raise
            except Exception as e:
                warnings.warn(f"[serve] prefill through the decode step's pieces failed ({type(e).__name__}: {e}); "
                              f"prefilling with the model's forward from now on (slower)")
                self.piece_prefill = False
                cache.pos = pos
                if prev is not None:
                    cache.prev_embed.copy_(prev)
        last = device_ints([ids.shape[1] - 1], ids.device)
        return self.engine.model(ids, kv_cache=cache, logits_at=last)[:, 0]

    def place(self, p: _Prefill) -> None:
        """A prefilled job's rows into slots, each with its first token sampled from the prompt's last logits."""
        job, P, n = p.job, len(p.tokens), p.job.params.n
        self.ensure(len(self.rows) + n, max([need_positions(r.job) for r in self.rows] + [need_positions(job)]))
        base = len(self.rows)
        c = self.cache
        c.k[:, base:base + n, :P] = p.cache.k[:, p.row:p.row + 1, :P]
        c.v[:, base:base + n, :P] = p.cache.v[:, p.row:p.row + 1, :P]
        c.prev[base:base + n] = p.cache.prev_embed[p.row].view(1, 1, -1)
        new = [_Row(job, i, P, taken=p.taken) for i in range(n)]
        self.rows.extend(new)
        self.pool.count("rows", n)
        self.choose(new, p.logits.expand(n, -1))

    def decode(self) -> bool:
        """One step over the rows with a token to feed (more, chained, while nothing else needs the scheduler);
        False when there was nothing to do."""
        resolved = [r for r in self.rows if r.next is None and r.tool is not None and r.tool.done()]
        n = self.partition()
        ready: list[_Row] = self.rows[:n]
        logits = self.step(ready) if n else None
        waiting = [j for j, r in enumerate(ready) if r.tool is not None and not r.tool.done()]
        if not resolved and not waiting:
            if n:
                self.run(ready, logits)  # the common step: every row's logits in order, no gather
            return bool(n)
        for j in waiting:
            ready[j].stash = logits[j].clone()  # its tool still runs: it waits, the others go on
        items = [(r, logits[j]) for j, r in enumerate(ready) if j not in waiting]
        items += [(r, r.stash) for r in resolved]
        for r in resolved:
            r.stash = None
        if items:
            self.choose([r for r, _ in items], torch.stack([lg for _, lg in items]))
        return True

    def step(self, ready: list[_Row], toks: torch.Tensor | None = None, spare: frozenset = frozenset()) -> torch.Tensor:
        """The row cache's step for slots [0, len(ready)); each row's position advances. toks: the device tokens
        of a chained step (else each row's `next`); rows in `spare` (ids) are ending: they write the scratch slot.
        Timed into Pool.timing."""
        c = self.cache
        poss = [0 if id(r) in spare else r.pos for r in ready]
        slots = [c.rows if id(r) in spare else j for j, r in enumerate(ready)]
        t = min(c.positions, max(poss) + 1)
        t0 = time.perf_counter()
        logits = c.step([r.next for r in ready] if toks is None else toks, poss, t, slots)
        timing = self.pool.timing
        timing["step_s"] += time.perf_counter() - t0
        timing["steps"] += 1
        timing["step_rows"] += len(ready)
        if c.captured:
            timing["captures"] += len(c.captured)
            timing["capture_s"] += sum(c.captured)
            c.captured.clear()
        for r in ready:
            r.pos += 1
            r.next = None
        return logits

    def run(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Draw and emit every live row's token from `logits`. While nothing else needs the scheduler (`steady`),
        the next step is launched from the drawn tokens on the device before the host reads them, so emitting
        this step's tokens overlaps the GPU's next step (as `Engine.generate` does at batch 1); a row that ends
        meanwhile wastes one row of that step."""
        self.take_tool_results(rows)  # none in a chained step: a row whose tool starts leaves the chain below
        while True:
            t0 = time.perf_counter()
            toks = self.draw(rows, logits)
            host = self.host_tokens[:len(rows)]
            host.copy_(toks, non_blocking=self.pinned)
            ready = torch.cuda.Event() if self.pinned else None
            if ready is not None:
                ready.record()
            t1 = time.perf_counter()
            nxt = None
            if self.steady(rows):  # rows at their last token write the scratch slot: no position is left for them
                spare = frozenset(id(r) for r in rows if r.taken + 1 >= r.job.params.max_tokens)
                nxt = self.step(rows, toks, spare)
                self.pool.timing["chained"] += 1
            t2 = time.perf_counter()
            if ready is not None:
                ready.synchronize()
            self.pool.timing["draw_s"] += (t1 - t0) + (time.perf_counter() - t2)
            order = {id(r): j for j, r in enumerate(rows)}
            self.emit(rows, host.tolist(), logits)
            if nxt is None or not self.rows:
                return
            rows = list(self.rows)  # the survivors, in their (compacted) slot order; each was fed its token
            for r in rows:
                r.next = None
            idx = [order[id(r)] for r in rows]
            logits = nxt[:len(rows)] if idx == list(range(len(rows))) else nxt[device_ints(idx, nxt.device)]
            tools = [j for j, r in enumerate(rows) if r.tool is not None]
            if tools:  # a tool call began at this token: its row waits with these logits, the others take theirs
                for j in tools:
                    rows[j].stash = logits[j].clone()
                rest = [j for j in range(len(rows)) if j not in tools]
                if rest:
                    self.choose([rows[j] for j in rest], logits[device_ints(rest, logits.device)])
                return

    def steady(self, rows: list[_Row]) -> bool:
        """Whether the next step can be launched before this one's tokens are read: chaining is on, every live
        row is in it, none is forced, calls tools or asks for logprobs (their scores read this step's logits,
        which a graphed next step overwrites), no client left, nothing waits to be admitted or prefilled, and
        some row goes on."""
        if not self.chain or len(rows) != len(self.rows) or self.prefills or self.solo is not None:
            return False
        try:  # read without the lock (at worst one step more or less is chained); a cancelled head is skipped
            head = next((j for j in list(itertools.islice(self.pool.waiting, 4)) if not j.cancelled.is_set()), None)
        except (IndexError, RuntimeError):  # another thread changed the queue meanwhile
            head = None
        if self.pool.closed or (head is not None and self.fits(head)):
            return False
        for r in rows:
            if r.forced or r.tool is not None or r.job.params.logprobs is not None or r.job.cancelled.is_set():
                return False
        return any(r.taken + 1 < r.job.params.max_tokens for r in rows)

    def choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample (or force) one token per row from its logits (len(rows), V), emit it, run the state machine."""
        self.take_tool_results(rows)
        t0 = time.perf_counter()
        col = self.draw(rows, logits).tolist()
        self.pool.timing["draw_s"] += time.perf_counter() - t0
        self.emit(rows, col, logits)

    def take_tool_results(self, rows: list[_Row]) -> None:
        """A finished tool call's output is forced, from this token on, into its row."""
        e = self.engine
        for r in rows:
            if r.tool is not None and r.tool.done():
                result = r.tool.result()
                r.tool = None
                if result is not None:
                    r.forced.extend([e.output_start, *e.tokenizer.encode(str(result)), e.output_end])

    def emit(self, rows: list[_Row], col: list[int], logits: torch.Tensor) -> None:
        """Each row's drawn token (or its next forced one) into its job: stream deltas, stops, tool calls, ended
        rows and jobs."""
        t1 = time.perf_counter()
        sampled = [True] * len(rows)
        for j, r in enumerate(rows):
            if r.forced:
                col[j], sampled[j] = r.forced.popleft(), False
        lps = self.scores(rows, logits, col)
        deltas: dict[int, list] = {}
        ended = []
        for j, r in enumerate(rows):
            job, tok = r.job, col[j]
            r.taken += 1
            d = job.take(r.index, tok, sampled[j], lps[j])
            if d is not None:
                deltas.setdefault(id(job), [job, []])[1].append(d)
            if job.choices[r.index].finish is None and r.taken >= job.params.max_tokens:
                deltas.setdefault(id(job), [job, []])[1].append(job.close_choice(r.index))
            if job.choices[r.index].finish is not None:
                ended.append(r)
                continue
            r.next = tok
            if sampled[j]:
                self.track_tool(r, tok)
        self.pool.count("tokens_generated", len(rows))
        post([(job, ("delta", ds)) for job, ds in deltas.values()])
        for r in ended:
            i = next((i for i, x in enumerate(self.rows) if x is r), None)
            if i is not None:
                self.remove_slot(i)
        for job in {id(r.job): r.job for r in ended}.values():
            if all(c.finish is not None for c in job.choices):
                self.finish(job)
        self.pool.timing["emit_s"] += time.perf_counter() - t1

    def draw(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """One token per row: argmax for greedy rows; on CUDA the sampling rows of every job in one Gumbel-max
        draw (`gumbel_rows`); elsewhere each sampling job's rows drawn together from its generator (`sample`)."""
        dev = logits.device
        greedy = [j for j, r in enumerate(rows) if r.job.params.temperature <= 0]
        if len(greedy) == len(rows):
            return logits.argmax(dim=-1)
        toks = torch.empty(len(rows), dtype=torch.long, device=dev)
        if greedy:
            g = device_ints(greedy, dev)
            toks[g] = logits[g].argmax(dim=-1)
        groups: dict[int, list[int]] = {}
        for j, r in enumerate(rows):
            if r.job.params.temperature > 0:
                groups.setdefault(id(r.job), []).append(j)
        fast: list[list[int]] = []
        for js in groups.values():
            js.sort(key=lambda j: rows[j].index)  # a job's rows draw together, in choice order
            if self.gumbel:
                fast.append(js)
            else:
                self.sample(rows, js, logits, toks)
        if fast:
            try:
                self.gumbel_rows(rows, fast, logits, toks)
            except Exception as e:  # the kernel failed on this GPU: each job's own sampler from now on, loudly
                warnings.warn(f"[serve] the one-launch sampler failed ({type(e).__name__}: {e}); sampling each "
                              f"request on its own (slower)")
                self.gumbel = False
                for js in fast:
                    self.sample(rows, js, logits, toks)
        return toks

    def gumbel_rows(self, rows: list[_Row], groups: list[list[int]], logits: torch.Tensor,
                    toks: torch.Tensor) -> None:
        """The sampling rows of every job in one `gumbel_draw`, each job keyed by (seed, step) and its rows
        numbered as `Engine.generate` numbers them, so a seeded request draws the same tokens whatever else is in
        the batch (an n > 1 job's rows are keyed by its first row's step, so they agree with `generate` only while
        they stay in step). One launch instead of one per job: with per-job draws, `draw` took 34.7 ms of each
        38.3 ms step at 60 rows (d20, H100, `bench serve` at 64 clients)."""
        js = [j for g in groups for j in g]
        cols: list[list] = [[], [], [], [], []]  # temperature, key, noise row, top-k, top-p
        for g in groups:
            p = rows[g[0]].job.params
            key = gumbel_key(p.seed, rows[g[0]].taken)
            for i in range(len(g)):
                for c, v in zip(cols, (p.temperature, key, i, p.top_k or 0, p.top_p or 1.0)):
                    c.append(v)
        if js == list(range(len(rows))):
            toks.copy_(gumbel_draw(logits, *cols, scratch=self.scratch))  # every row, in order: no gather
            return
        idx = device_ints(js, toks.device)
        toks[idx] = gumbel_draw(logits[idx], *cols, scratch=self.scratch)

    def scores(self, rows: list[_Row], logits: torch.Tensor, col: list[int]) -> list[Any]:
        """(logprob of the emitted token, top-K (id, logprob)) for the rows whose request asked; None elsewhere."""
        lps: list[Any] = [None] * len(rows)
        scored = [j for j, r in enumerate(rows) if r.job.params.logprobs is not None]
        if not scored:
            return lps
        dev = logits.device
        idx = device_ints(scored, dev)
        lp = torch.log_softmax(logits[idx].float(), dim=-1)
        chosen = lp.gather(1, torch.tensor([col[j] for j in scored], device=dev)[:, None])[:, 0].tolist()
        k = min(max(rows[j].job.params.logprobs for j in scored), lp.size(-1))
        top_lp, top_ids = torch.topk(lp, k, dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        for a, j in enumerate(scored):
            kj = rows[j].job.params.logprobs
            lps[j] = (chosen[a], list(zip(top_ids[a][:kj], top_lp[a][:kj])))
        return lps

    def track_tool(self, r: _Row, tok: int) -> None:
        """The python tool's state machine for a sampled token; a finished call runs in the engine's tool pool."""
        e = self.engine
        code = e.python_state(r, tok)
        if code is not None:
            r.tool = e._tool_pool.submit(e._safe_tool, e.tokenizer.decode(code))

    def sample(self, rows: list[_Row], js: list[int], logits: torch.Tensor, toks: torch.Tensor) -> None:
        """Tokens for one job's rows `js` into `toks`: softmax (top-k, top-p) + multinomial from the job's
        generator."""
        job = rows[js[0]].job
        p = job.params
        idx = torch.tensor(js, device=toks.device)
        toks[idx] = sample_next_token(logits[idx], self.gens[id(job)], p.temperature, p.top_k, p.top_p)

    def solo_step(self) -> None:
        """One step of the lone request on the engine's own generate."""
        job, gen = self.solo
        try:
            item = next(gen, None)
            if item is None:
                self.finish(job)
                return
            col, mask, *lps = item
            if self.solo_plain:  # a forced token or a tool call (its state lives in `generate`) keeps it here
                self.solo_plain = mask[0] == 1 and col[0] != self.engine.python_start
                self.solo_tokens.append(col[0])
            deltas = []
            for i, (t, m) in enumerate(zip(col, mask)):
                if job.choices[i].finish is None:
                    d = job.take(i, t, m == 1, lps[0][i] if lps else None)
                    self.pool.count("tokens_generated")
                    if d is not None:
                        deltas.append(d)
            if deltas:
                job.send(("delta", deltas))
            if all(c.finish is not None for c in job.choices):
                self.finish(job)
        except Exception as e:
            self.fail(job, e)


_posted: dict[Any, list[tuple[Any, tuple]]] = {}  # per event loop: events waiting for its scheduled `_drain`
_posted_lock = threading.Lock()


def post(messages: list[tuple[Any, tuple]]) -> None:
    """Each job's event, with at most one wake-up per event loop pending: 64 streams at hundreds of steps a second
    would otherwise be tens of thousands of cross-thread wake-ups a second. While a loop has not yet drained what
    an earlier step posted, a later step's events join that batch instead of writing to the loop's wake-up socket
    again: the write gives the interpreter's lock to the loop's thread, which a replica thread then waits to get
    back (on the 2-core CPU machine, under cProfile, a replica's 824 wake-up writes at 64 clients averaged 0.47 ms
    each; there, 15% of posts joined a pending batch; on a GPU, with shorter steps, not yet measured). Order per job
    is kept: one queue per loop, drained in order, and `Job.send`'s own wake-ups run after a drain scheduled before
    them. Jobs without a loop use `send`."""
    by_loop: dict[Any, list[tuple[Any, tuple]]] = {}
    for job, item in messages:
        if getattr(job, "loop", None) is None or getattr(job, "events", None) is None:
            job.send(item)
        else:
            by_loop.setdefault(job.loop, []).append((job, item))
    for loop, items in by_loop.items():
        with _posted_lock:
            waiting = _posted.get(loop)
            if waiting is not None and not loop.is_closed():  # a drain is scheduled, not yet run: it takes these
                waiting.extend(items)
                continue
            _posted[loop] = (waiting or []) + items
        try:
            loop.call_soon_threadsafe(_drain, loop)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            with _posted_lock:
                gone = _posted.pop(loop, [])
            for job, _ in gone:
                job.cancelled.set()


def _drain(loop: Any) -> None:
    """On `loop`: every event posted for it since its last drain, into each job's queue, in order."""
    with _posted_lock:
        items = _posted.pop(loop, [])
    for job, item in items:
        job.events.put_nowait(item)


def wait_idle(pool: Pool, timeout: float = 10.0) -> bool:
    """Until no job is queued or running (tests, benchmarks)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pool.queued() == 0 and pool.stats["active"] == 0:
            return True
        time.sleep(0.01)
    return False
