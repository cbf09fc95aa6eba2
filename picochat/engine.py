"""The generation engine: static KV cache, prefill then decode, sampling, and the python tool state machine.

One `Engine(model, tokenizer)` serves every caller (chat CLI, web server, evals, RL). Contract:

    for token_column, mask_column in engine.generate(prompt, num_samples=B, ...):   # one step, one token per row
        ...
    sequences, masks = engine.generate_batch(prompt, num_samples=B, ...)              # prompt + completion

How it is fast (an eager 20-layer decode is launch-bound at ~15 ms/token, as nanochat's is):
- Prefill runs the model's own forward over the prompt once (batch 1) into a prompt cache that every row shares;
  each row caches only the tokens it generates. Sampling many rows from one prompt (RL, pass@k, `n`) therefore
  reads the prompt's keys/values once per step instead of once per row (attention.decode_attention, a Triton
  split-KV kernel on CUDA). Cache capacities are rounded up to multiples of 256 so a few shapes cover all requests.
- The one-token decode step is a functional copy of `GPT.forward` that reads the prompt length and position from
  device tensors (no Python ints, fixed shapes) and advances the position itself. On CUDA it is captured once per
  slot (batch, prompt capacity, generation capacity) in a CUDA graph, with torch.compile'd pieces inside for kernel
  fusion, and so is the prefill (the prompt padded to the slot's capacity). On CPU both run eagerly.
- At batch 1 (latency-bound: ~0.9 GB of weights per token on d20) the step is instead a chain of fused Triton
  kernels, 8 per layer, launched with programmatic dependent launch (kernels.py says why and measures);
  sampling without top-k/top-p is one Gumbel-max launch spread over the vocabulary (32 programs per row at 32K)
  that writes the next input token in place.
- The host never waits for the GPU more than it must: the next step is launched before the sampled tokens of this
  step are read back (a pinned copy + event), so the Python state machine overlaps the GPU work.

Rows are independent (the first token is sampled per row, not broadcast), sampling is reproducible from `seed`, and
forced tool-output tokens carry mask 0.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from picochat import scaling, warmup
from picochat.checkpoint import find_run_with_stage, load_model
from picochat.model import GPT, GPTConfig, KVCache, apply_rotary, build_model, rms_norm
from picochat.ops import attention
from picochat.runtime import compute_dtype, detect_device, peak_bandwidth, synchronize
from picochat.sandbox import run_expression, unavailable_message

CACHE_BUCKET = 256  # decode caches are allocated in multiples of this many positions


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Temperature 0 is greedy; top-k then top-p (nucleus) restrict the
    candidates; rows draw independently from the seeded generator."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    idx = None
    if top_k is not None and 0 < top_k < logits.size(-1):
        logits, idx = torch.topk(logits, top_k, dim=-1)  # sorted, descending
    if top_p is not None and 0.0 < top_p < 1.0:
        if idx is None:
            logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(logits, dim=-1)
        # drop a candidate when the mass before it already reaches top_p (the top one always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
    return idx.gather(-1, choice[:, None]).squeeze(-1) if idx is not None else choice


# ----------------------------------------------------------------------------------------------------------------
# Text helpers


class StreamDecoder:
    """Token ids in, text out, never emitting half of a multi-byte UTF-8 character.

    Tokens are byte sequences that can split a character; an incremental UTF-8 decoder holds the incomplete tail
    until the rest arrives (or `flush()` at the end replaces it with U+FFFD). Special tokens become their names
    unless `skip_special`.
    """

    def __init__(self, tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._special = set(tokenizer.special_tokens.values())
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if token in self._special:
            if self.skip_special:
                return ""
            name = next(k for k, v in self.tokenizer.special_tokens.items() if v == token)
            return self._dec.decode(b"", final=True) + name
        return self._dec.decode(self.tokenizer.id_to_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def tokens_to_parts(tokenizer, ids: Iterable[int]) -> list[dict[str, str]]:
    """Generated assistant tokens -> conversation parts (text / python / python_output), as conversation.py renders.

    A trailing `<|assistant_end|>` and anything after it is ignored; an unterminated python block stays a python part.
    """
    sp = tokenizer.special_tokens
    kinds = {sp["<|python_start|>"]: "python", sp["<|output_start|>"]: "python_output"}
    ends = {sp["<|python_end|>"], sp["<|output_end|>"]}
    stop = {sp["<|assistant_end|>"], sp["<|bos|>"]}
    parts: list[dict[str, str]] = []
    kind, buf = "text", []

    def close() -> None:
        text = tokenizer.decode(buf)
        if text or kind != "text":
            parts.append({"type": kind, "text": text})

    for t in ids:
        if t in stop:
            break
        if t in kinds:
            close()
            kind, buf = kinds[t], []
        elif t in ends:
            close()
            kind, buf = "text", []
        elif t not in sp.values():
            buf.append(t)
    close()
    return parts


def parts_to_text(parts: list[dict[str, str]]) -> str:
    """Readable text of assistant parts: a tool call shows as `<<expr=result>>` (the GSM8K calculator notation)."""
    out = []
    for i, p in enumerate(parts):
        if p["type"] == "text":
            out.append(p["text"])
        elif p["type"] == "python":
            has_out = i + 1 < len(parts) and parts[i + 1]["type"] == "python_output"
            out.append(f"<<{p['text']}" + ("=" if has_out else ">>"))
        else:
            out.append(f"{p['text']}>>")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Decoders: how one step of the model is run


@dataclass
class _Slot:
    """Static buffers for one (batch, prompt capacity, generation capacity) shape and the CUDA graphs using them.

    The prompt's keys/values are stored once (`prefix`, a batch-1 model KVCache) and shared by every row; each row
    has its own cache for the tokens it generates (`ks`/`vs`). Decode attention reads both (attention.py)."""

    prefix: KVCache            # (L, 1, P_cap, Hkv, D): filled by the prefill
    ks: torch.Tensor           # (L, B, S_cap, Hkv, D): generated tokens, index = position - npre
    vs: torch.Tensor
    tok: torch.Tensor          # (B, 1) int64: the tokens fed at this step
    pos: torch.Tensor          # (1,) int64: their absolute position
    npre: torch.Tensor         # (1,) int64: prompt length
    prev_embed: torch.Tensor   # (B, 1, d): normed embedding of each row's previous token (the smear's input)
    logits: torch.Tensor | None = None
    graph: Any = None
    prefill_ids: torch.Tensor | None = None   # (1, P_cap) int64, the padded prompt
    prefill_last: torch.Tensor | None = None  # (1,) int64, index of the prompt's last token
    prefill_logits: torch.Tensor | None = None
    prefill_graph: Any = None


def _bucket(n: int, cap: int) -> int:
    return min(cap, max(1, math.ceil(n / CACHE_BUCKET)) * CACHE_BUCKET)


class _GPTDecoder:
    """Prefill with `GPT.forward` (captured in a CUDA graph per prompt bucket on GPU), decode with a functional,
    CUDA-graph-friendly copy of the forward over static caches."""

    def __init__(self, model: GPT, cuda_graph: bool, compile: bool):
        self.model = model
        c = model.config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.device = model.wte.weight.device
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.max_len = model.rotary_len
        self.slots: collections.OrderedDict[tuple[int, int, int], _Slot] = collections.OrderedDict()
        self.max_slots = 2 if self.device.type == "cuda" else 1
        self.slot: _Slot | None = None
        self.qkv = _fuse_qkv(model)
        self.fused = self.cuda_graph and self._fusable()
        if self.fused:
            self._one = torch.ones(1, device=self.device)
        self._pre, self._post, self._head = _attn_pre, _attn_post_mlp, _lm_head
        if compile and self.device.type == "cuda":
            # the keyed Inductor/Triton cache under PICOCHAT_HOME, as training uses: a restarted server or chat
            # finds these pieces (and the batcher's) compiled where only PICOCHAT_HOME survives the machine
            warmup.use_compile_cache(self.device)
            try:
                kw = dict(fullgraph=True, dynamic=False)
                # one specialisation per (batch size, with/without value embeds): raise dynamo's default limit of 8
                from torch import _dynamo

                _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
                self._pre = torch.compile(_attn_pre, **kw)
                self._post = torch.compile(_attn_post_mlp, **kw)
                self._head = torch.compile(_lm_head, **kw)
            except Exception as e:  # torch.compile missing or broken: the graph alone is still most of the win
                warnings.warn(f"[engine] torch.compile unavailable ({e}); decoding without it")

    @property
    def mode(self) -> str:
        """How steps run: eager | cuda-graph, plus +fused-b1 (batch-1 Triton chain) and +compile."""
        return (("cuda-graph" if self.cuda_graph else "eager") + ("+fused-b1" if self.fused else "")
                + ("+compile" if self._pre is not _attn_pre else ""))

    # -- the decode step ------------------------------------------------------------------------------------------

    def _embed(self, s: _Slot) -> torch.Tensor:
        """The normed token embeddings (B, 1, d) of this step, smeared with the previous token's (GPT.smear)."""
        m = self.model
        dt = m.compute_dtype
        x = rms_norm(m.wte(s.tok).to(dt))
        if m.smear_gate is not None:
            e = x
            gate = m.smear_lambda.to(dt) * torch.sigmoid(F.linear(e[..., : m.smear_gate.in_features],
                                                                   m.smear_gate.weight.to(dt)))
            x = e + gate * s.prev_embed
            s.prev_embed.copy_(e)
        return x

    def _fusable(self) -> bool:
        """Whether batch-1 steps can use the fused Triton kernels (kernels.gemv / qkv_post): an inference-only bf16
        or fp16 model on CUDA (fused q|k|v), triton present, and not switched off with PICOCHAT_FUSED_DECODE=0."""
        m = self.model
        dt = m.compute_dtype
        return (self.qkv is not None and _fused_kernels_on() and dt in (torch.bfloat16, torch.float16)
                and self.head_dim % 32 == 0
                and self.head_dim & (self.head_dim - 1) == 0
                and all(p.dtype == dt and p.is_contiguous() for p in m.parameters()))

    def _step(self, s: _Slot) -> torch.Tensor:
        """One token per row at position `s.pos`: writes the cache, advances `s.pos`, returns fp32 logits (B, V)."""
        if self.fused and s.tok.shape[0] == 1:
            return self._step_fused(s)
        m = self.model
        dt = m.compute_dtype
        idx = s.tok
        cos = m.cos.index_select(1, s.pos).to(dt)
        sin = m.sin.index_select(1, s.pos).to(dt)
        sidx = s.pos - s.npre  # where this token goes in the rows' own caches
        x = self._embed(s)
        x0 = x
        x_mid = x
        B, H, Hkv, D = idx.shape[0], self.n_head, self.n_kv_head, self.head_dim
        for i, block in enumerate(m.blocks):
            a = block.attn
            ve = m.value_embeds[str(i)](idx) if str(i) in m.value_embeds else None
            gate_w = a.ve_gate.weight if a.ve_gate is not None else None
            wq, wk, wv = self.qkv[i] if self.qkv else (a.c_q.weight, a.c_k.weight, a.c_v.weight)
            x, q, k, v = self._pre(x, x0, m.resid_lambdas[i], m.x0_lambdas[i], wq, wk, wv, ve, gate_w, cos, sin,
                                   H, Hkv, D, m.config.ve_gate_scale)
            s.ks[i].index_copy_(1, sidx, k)
            s.vs[i].index_copy_(1, sidx, v)
            # GQA without repeating anything: a KV head's G query heads are G query rows of the kernel
            y = attention.decode_attention(q.view(B, Hkv, H // Hkv, D), s.prefix.k[i, 0], s.prefix.v[i, 0],
                                           s.ks[i], s.vs[i], s.npre, s.pos, m.window_sizes[i])
            x = self._post(x, y.reshape(B, 1, H * D), a.c_proj.weight, block.mlp.c_fc.weight, block.mlp.c_proj.weight)
            if i == m.config.n_layer // 2:
                x_mid = x
        s.pos.add_(1)
        if m.backout_lambda is not None:
            x = x - m.backout_lambda.to(dt) * x_mid
        return self._head(x, m.lm_head.weight, m.config.vocab_size, m.config.softcap)

    def _step_fused(self, s: _Slot) -> torch.Tensor:
        """`_step` for one row with the fused kernels (same math; see kernels.py for why): per layer one GEMV for
        mix + norm + q|k|v, one kernel for RoPE/QK-norm/value embeds/cache writes, decode attention, and three
        GEMVs carrying the residual adds, the MLP's norm and ReLU²."""
        kernels = _kernels()
        m = self.model
        eps = torch.finfo(m.compute_dtype).eps  # what F.rms_norm uses for this dtype in the unfused path
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        cos, sin = m.cos.view(-1, D // 2), m.sin.view(-1, D // 2)
        if m.smear_gate is not None:
            x = kernels.embed(m.wte.weight, s.tok, eps, s.prev_embed.view(-1), m.smear_gate.weight, m.smear_lambda)
        else:
            x = kernels.embed(m.wte.weight, s.tok, eps)
        x0 = x_mid = x
        for i, block in enumerate(m.blocks):
            a = block.attn
            qkv, x = kernels.gemv(x, self.qkv[i][0], mix=(x0, m.resid_lambdas[i:i + 1], m.x0_lambdas[i:i + 1]),
                                  norm_eps=eps)
            ve = m.value_embeds[str(i)].weight if str(i) in m.value_embeds else None
            q = kernels.qkv_post(qkv, x, s.tok, cos, sin, s.pos, s.npre, s.ks[i, 0], s.vs[i, 0], H, Hkv, D, eps,
                                 a.ve_gate.weight if ve is not None else None, ve, m.config.ve_gate_scale)
            y = attention.decode_attention(q.view(1, Hkv, H // Hkv, D), s.prefix.k[i, 0], s.prefix.v[i, 0],
                                           s.ks[i], s.vs[i], s.npre, s.pos, m.window_sizes[i])
            x, _ = kernels.gemv(y.view(-1), a.c_proj.weight, residual=x)
            h, _ = kernels.gemv(x, block.mlp.c_fc.weight, norm_eps=eps, relu2=True)
            x, _ = kernels.gemv(h, block.mlp.c_proj.weight, residual=x)
            if i == m.config.n_layer // 2:
                x_mid = x
        s.pos.add_(1)
        # backout (x - lambda * x_mid) is the head GEMV's residual mix with weights (1, -lambda)
        mix = (x_mid, self._one, -m.backout_lambda) if m.backout_lambda is not None else None
        logits, _ = kernels.gemv(x, m.lm_head.weight, n=m.config.vocab_size, out_dtype=torch.float32, mix=mix,
                                 norm_eps=eps, softcap=m.config.softcap)
        return logits.view(1, -1)

    def _prefill_forward(self, s: _Slot, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The prompt (padded or not) through `GPT.forward` into `s.prefix`; logits (1, V) at index `last`."""
        m = self.model
        s.prefix.reset()
        logits = m(ids, kv_cache=s.prefix, logits_at=last)
        if m.smear_gate is not None:  # the last real prompt token's embedding (the prompt may be padded)
            s.prev_embed.copy_(rms_norm(m.wte(ids.index_select(1, last)).to(m.compute_dtype)).expand_as(s.prev_embed))
        return logits.view(1, -1)

    # -- slots and graphs -----------------------------------------------------------------------------------------

    def _get_slot(self, batch: int, p_cap: int, s_cap: int) -> _Slot:
        key = (batch, p_cap, s_cap)
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        while len(self.slots) >= self.max_slots:
            self.slots.popitem(last=False)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        c = self.model.config
        dt = self.model.compute_dtype
        shape = (c.n_layer, batch, s_cap, c.n_kv_head, c.head_dim)
        s = _Slot(prefix=self.model.kv_cache(1, p_cap, dtype=dt, device=self.device),
                  ks=torch.zeros(shape, dtype=dt, device=self.device), vs=torch.zeros(shape, dtype=dt, device=self.device),
                  tok=torch.zeros(batch, 1, dtype=torch.long, device=self.device),
                  pos=torch.zeros(1, dtype=torch.long, device=self.device),
                  npre=torch.zeros(1, dtype=torch.long, device=self.device),
                  prev_embed=torch.zeros(batch, 1, c.n_embd, dtype=dt, device=self.device))
        if self.cuda_graph:
            self._capture(s)
        self.slots[key] = s
        return s

    def _graph(self, fn: Callable[[], torch.Tensor], pool: Any = None) -> tuple[Any, torch.Tensor]:
        """Warm up `fn` (compiles, cuBLAS handles) on a side stream, then capture it into a CUDA graph (in memory
        `pool` when given, shared with the other graphs captured there)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other replicas (threads) may use their GPUs while this one captures
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"), torch.no_grad():
            out = fn()
        return graph, out

    def _capture(self, s: _Slot) -> None:
        """Capture the slot's decode step and its (padded, full-capacity) prefill. Scratch positions are used:
        the graphs are captured before any real data is written."""
        try:
            p_cap = s.prefix.max_len
            # scratch position 0 (no prompt): set outside the captured function, or every replay would reset it
            s.npre.zero_()
            s.pos.zero_()
            s.graph, s.logits = self._graph(lambda: self._step(s))
            s.prefill_ids = torch.zeros(1, p_cap, dtype=torch.long, device=self.device)
            s.prefill_last = torch.zeros(1, dtype=torch.long, device=self.device)
            s.prefill_graph, s.prefill_logits = self._graph(
                lambda: self._prefill_forward(s, s.prefill_ids, s.prefill_last))
        except Exception as e:
            s.graph = s.prefill_graph = None
            if self.fused:  # the fused batch-1 kernels failed: retry with the general step
                warnings.warn(f"[engine] fused batch-1 decode failed to capture ({type(e).__name__}: {e}); "
                              f"using the general decode step")
                torch.cuda.synchronize(self.device)
                self.fused = False
                return self._capture(s)
            if self._pre is not _attn_pre:  # the compiled pieces failed: retry with plain kernels in the graph
                warnings.warn(f"[engine] compiled decode failed to capture ({type(e).__name__}: {e}); "
                              f"using the CUDA graph without torch.compile")
                torch.cuda.synchronize(self.device)
                self._pre, self._post, self._head = _attn_pre, _attn_post_mlp, _lm_head
                return self._capture(s)
            warnings.warn(f"[engine] CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
            torch.cuda.synchronize(self.device)
            self.cuda_graph = False

    # -- public ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompt: list[int], batch: int, need: int) -> torch.Tensor:
        """Run the prompt once into the shared prompt cache; returns last-position logits (batch, V).
        `need` = positions the whole generation spans (prompt + fed tokens)."""
        n = len(prompt)
        s = self._get_slot(batch, _bucket(n, self.max_len), _bucket(max(1, need - n), self.max_len))
        if s.prefill_graph is not None:
            # padded to the slot's capacity: positions >= n only write cache entries that decode never reads
            s.prefill_ids.zero_()
            s.prefill_ids[0, :n].copy_(torch.tensor(prompt, dtype=torch.long), non_blocking=True)
            s.prefill_last.fill_(n - 1)
            s.prefill_graph.replay()
            logits = s.prefill_logits
        else:
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            logits = self._prefill_forward(s, ids, torch.tensor([n - 1], device=self.device))
        s.npre.fill_(n)
        s.pos.fill_(n)
        self.slot = s
        return logits.expand(batch, -1)

    def token_buffer(self, batch: int) -> torch.Tensor | None:
        """The current slot's input-token buffer (batch,), for a sampler to write the next tokens into directly."""
        s = self.slot
        return s.tok.view(-1) if s is not None and s.tok.shape[0] == batch else None

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) on the device; returns logits (B, V) for the next position."""
        s = self.slot
        assert s is not None, "prefill() first"
        if tokens.data_ptr() != s.tok.data_ptr():  # the engine's sampler may write straight into s.tok
            s.tok.copy_(tokens.view(-1, 1))
        if s.graph is not None:
            s.graph.replay()
            return s.logits
        return self._step(s)


def _fuse_qkv(model: GPT) -> list[tuple[torch.Tensor, None, None]] | None:
    """For an inference-only model (bf16, no grads: `prepare_model`), re-point each layer's c_q/c_k/c_v weights
    into one contiguous (q|k|v) tensor so decode runs one GEMV per layer instead of three (no extra memory: the
    parameters become views of it). Training models (RL decodes with one) are left alone."""
    if model.wte.weight.device.type != "cuda" or any(p.requires_grad for p in model.parameters()):
        return None
    fused = []
    with torch.no_grad():
        for block in model.blocks:
            a = block.attn
            ws = (a.c_q.weight, a.c_k.weight, a.c_v.weight)
            base = ws[0].data._base
            if base is not None and all(t.data._base is base for t in ws) and base.shape[0] == sum(
                    t.shape[0] for t in ws):  # fused by an earlier engine on this model: share it
                fused.append((base, None, None))
                continue
            w = torch.cat([t.data for t in ws])
            lo = 0
            for t in ws:
                t.data = w[lo:lo + t.shape[0]]
                lo += t.shape[0]
            fused.append((w, None, None))
    return fused


def _attn_pre(x, x0, lam_r, lam_0, wq, wk, wv, ve, gate_w, cos, sin, H: int, Hkv: int, D: int, ve_scale: float):
    """Residual mix, pre-norm, q/k/v projections (wk = wv = None: wq is the fused q|k|v weight), value embeds,
    RoPE and QK-norm for one decode token per row."""
    dt = x.dtype
    x = lam_r.to(dt) * x + lam_0.to(dt) * x0
    h = rms_norm(x)
    B, T, _ = h.shape
    if wk is None:
        q, k, v = F.linear(h, wq.to(dt)).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
    else:
        q = F.linear(h, wq.to(dt)).view(B, T, H, D)
        k = F.linear(h, wk.to(dt)).view(B, T, Hkv, D)
        v = F.linear(h, wv.to(dt)).view(B, T, Hkv, D)
    if ve is not None:
        gate = ve_scale * torch.sigmoid(F.linear(h[..., : gate_w.shape[1]], gate_w.to(dt)))
        v = v + gate.unsqueeze(-1) * ve.to(dt).view(B, T, Hkv, D)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return x, rms_norm(q), rms_norm(k), v


def _attn_post_mlp(x, y, wo, wfc, wproj):
    dt = x.dtype
    x = x + F.linear(y, wo.to(dt))
    h = F.linear(rms_norm(x), wfc.to(dt))
    return x + F.linear(F.relu(h).square(), wproj.to(dt))


def _lm_head(x, w, vocab_size: int, softcap: float):
    logits = F.linear(rms_norm(x), w.to(x.dtype))[:, -1, :vocab_size].float()
    return softcap * torch.tanh(logits / softcap)


class _GenericDecoder:
    """Any `model(idx) -> logits (B, T, V)` without a cache (stub models in tests, foreign models): re-runs the
    whole sequence each step. Correct, not fast."""

    mode = "no-cache"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.max_len = int(getattr(model, "max_len", 1 << 30))
        self.seqs: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self, prompt: list[int], batch: int, need: int) -> torch.Tensor:
        self.seqs = torch.tensor([prompt] * batch, dtype=torch.long, device=self.device)
        return self.model(self.seqs[:1])[:, -1].float().expand(batch, -1)

    def token_buffer(self, batch: int) -> None:
        return None

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seqs = torch.cat([self.seqs, tokens.view(-1, 1)], dim=1)
        return self.model(self.seqs)[:, -1].float()


# ----------------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Row:
    """Per-row state of the tool state machine."""

    done: bool = False
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    forced: collections.deque = field(default_factory=collections.deque)


def _kernels():
    """picochat.ops.kernels, imported on first use (it imports triton)."""
    from picochat.ops import kernels  # lazy: it imports triton (~1 s), used only on CUDA

    return kernels


def untruncated(top_k: int | None, top_p: float | None) -> bool:
    """No top-k or top-p: the draw is from the whole softmax, which the Gumbel-max kernel samples."""
    return top_k is None and (top_p is None or top_p >= 1.0)


def gumbel_sampling(device: torch.device) -> bool:
    """Whether sampling on `device` uses the one-launch Gumbel-max kernel (`gumbel_key`, `gumbel_draw`): on CUDA
    with the fused kernels on."""
    return device.type == "cuda" and _fused_kernels_on()


def gumbel_key(seed: int, step: int) -> int:
    """The Gumbel-max sampler's key for a request's `step`-th token: `Engine.generate` and the server's batcher use
    the same, so a seeded request draws the same tokens on either path."""
    return seed * 1_000_003 + step


def host_buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor to copy to `device`: pinned for a CUDA device, since only a pinned source lets a
    non_blocking copy return without waiting for the stream (from pageable memory the driver may first wait for
    the work queued before it, which undoes chained steps). torch's caching host allocator reuses the block once
    the copy that read it is done."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 values (indices) on `device` without waiting for its stream: `torch.tensor(values, device=cuda)`
    copies synchronously, which in the server's chained steps would wait for the step already in flight."""
    host = torch.tensor(values, dtype=torch.long, pin_memory=device.type == "cuda")  # see host_buffer
    return host.to(device, non_blocking=True)


def gumbel_draw(logits: torch.Tensor, temperatures: list[float], keys: list[int], noise_rows: list[int],
                top_ks: list[int], top_ps: list[float], scratch: torch.Tensor) -> torch.Tensor:
    """One token per row of logits (B, V) on CUDA, each row at its own temperature (> 0), top-k (0: off) and top-p
    (1: off), drawn by the Gumbel-max kernel from its own (key, noise row): the argmax of logits / T + Gumbel
    noise over a row's candidates is a draw from the softmax over them. The candidates are what
    `sample_next_token` keeps: the top-k by logit, then the shortest prefix of those holding top_p of the mass.
    Untruncated rows draw over the vocabulary in id order (as `Engine.generate` draws them), truncated ones over
    their sorted candidates, so a row's draw does not depend on the other rows. No host sync."""
    B, V = logits.shape
    kern = _kernels()
    ks = [t if 0 < t < V else V for t in top_ks]
    ps = [p if 0.0 < p < 1.0 else 1.0 for p in top_ps]
    host = host_buffer((5, B), torch.int32, logits.device)
    host[:3] = kern.sample_params(temperatures, keys, noise_rows)
    host[3] = torch.tensor(ks, dtype=torch.int32)
    host[4] = torch.tensor(ps, dtype=torch.float32).view(torch.int32)
    params = host.to(logits.device, non_blocking=True)
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    cut = [j for j in range(B) if ks[j] < V or ps[j] < 1.0]
    if not cut:
        return kern.sample_rows(logits.contiguous(), params[:3], out, scratch)
    whole = [j for j in range(B) if ks[j] == V and ps[j] == 1.0]
    if whole:  # the untruncated rows draw in id order, then the truncated ones below
        w = device_ints(whole, logits.device)
        out[w] = kern.sample_rows(logits[w].contiguous(), params[:, w][:3].contiguous(),
                                  torch.empty(len(whole), dtype=torch.long, device=logits.device), scratch)
    c = device_ints(cut, logits.device) if whole else None
    sub, prm = (logits, params) if c is None else (logits[c], params[:, c].contiguous())
    width = max(ks[j] if ps[j] == 1.0 else V for j in cut)
    vals, ids = torch.topk(sub.float(), width, dim=-1)  # sorted, descending
    drop = torch.arange(width, device=logits.device)[None, :] >= prm[3, :, None]
    if any(ps[j] < 1.0 for j in cut):
        inv_t = prm[2].view(torch.float32)[:, None]
        probs = torch.softmax((vals * inv_t).masked_fill(drop, float("-inf")), dim=-1)
        drop |= (torch.cumsum(probs, dim=-1) - probs) >= prm[4].view(torch.float32)[:, None]
    choice = kern.sample_rows(vals.masked_fill(drop, float("-inf")), prm[:3].contiguous(),
                              torch.empty(len(cut), dtype=torch.long, device=logits.device), scratch, noise_stride=V)
    tok = ids.gather(1, choice[:, None])[:, 0]
    if c is None:
        return tok
    out[c] = tok
    return out


def _fused_kernels_on() -> bool:
    """The engine's Triton fast paths (batch-1 step, sampler): triton present and PICOCHAT_FUSED_DECODE != 0."""
    return os.environ.get("PICOCHAT_FUSED_DECODE", "1") != "0" and _kernels().available()


_tool_off_said = False


def _default_tool(expr: str) -> str | None:
    """The python tool; without an OS sandbox it is off, and says so once (the model then sees no output)."""
    global _tool_off_said
    off = unavailable_message()
    if off:
        if not _tool_off_said:
            print(f"[engine] python tool off: {off}", file=sys.stderr)
            _tool_off_said = True
        return None
    return run_expression(expr)


class Engine:
    """KV-cache generation with sampling and the python tool. Not thread-safe: one caller at a time per engine
    (the server gives each model replica its own engine and worker thread)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, cuda_graph: bool = True, compile: bool | None = None,
                 tool: Callable[[str], str | None] | None = None, tool_workers: int = 4):
        model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: decode with the module itself
        self.model, self.tokenizer = model, tokenizer
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        if compile is None:
            compile = os.environ.get("PICOCHAT_ENGINE_COMPILE", "1") != "0"
        if isinstance(model, GPT):
            self.decoder: _GPTDecoder | _GenericDecoder = _GPTDecoder(model, cuda_graph=cuda_graph, compile=compile)
        else:
            self.decoder = _GenericDecoder(model, self.device)
        self.tool = tool or _default_tool
        self._tool_pool = ThreadPoolExecutor(max_workers=tool_workers, thread_name_prefix="picochat-tool")
        sp = tokenizer.special_tokens
        self.bos = sp["<|bos|>"]
        self.assistant_end = sp["<|assistant_end|>"]
        self.python_start, self.python_end = sp["<|python_start|>"], sp["<|python_end|>"]
        self.output_start, self.output_end = sp["<|output_start|>"], sp["<|output_end|>"]

    @property
    def mode(self) -> str:
        return self.decoder.mode

    @property
    def max_context(self) -> int:
        """Most positions a prompt + completion may span (the RoPE table of the model)."""
        return self.decoder.max_len

    def _run_tools(self, calls: list[tuple[_Row, list[int]]]) -> None:
        """Run this step's tool calls (in parallel when several rows call at once) and queue their forced output."""
        exprs = [self.tokenizer.decode(toks) for _, toks in calls]
        results = list(self._tool_pool.map(self._safe_tool, exprs))
        for (row, _), result in zip(calls, results):
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])

    def _safe_tool(self, expr: str) -> str | None:
        try:
            return self.tool(expr)
        except Exception as e:  # a broken tool must not kill generation; the model just sees no output
            warnings.warn(f"[engine] python tool failed: {type(e).__name__}: {e}")
            return None

    def python_state(self, row: Any, tok: int) -> list[int] | None:
        """The python tool's state machine for one sampled token of a row (fields `in_python`, `python_tokens`):
        the code's tokens when this token closes a non-empty call, else None. Shared with the server's batcher."""
        if tok == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif tok == self.python_end and row.in_python:
            row.in_python = False
            return row.python_tokens or None
        elif row.in_python:
            row.python_tokens.append(tok)
        return None

    def _budget(self, prompt_tokens: Iterable[int], num_samples: int, max_tokens: int) -> tuple[list[int], int]:
        """The prompt as ints and the steps `generate` may take (<= 0: none), or a ValueError saying what is wrong."""
        prompt = [int(t) for t in prompt_tokens]
        if not prompt:
            raise ValueError("generate: prompt_tokens is empty (start it with <|bos|>)")
        if num_samples < 1:
            raise ValueError(f"generate: num_samples {num_samples} must be >= 1")
        room = self.max_context - len(prompt) + 1  # the last sampled token is never fed back
        if room < 1:
            raise ValueError(f"generate: prompt of {len(prompt)} tokens exceeds the model's context "
                             f"({self.max_context})")
        return prompt, min(max_tokens, room)

    @torch.no_grad()
    def generate(self, prompt_tokens: list[int], num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 42,
                 stop: Iterable[int] | None = None, *, ignore_eos: bool = False, logprobs: int | None = None
                 ) -> Iterator[tuple]:
        """Yield (token_column, mask_column) per step: one token per row; mask 1 = sampled, 0 = forced tool output.

        A row completes on `<|assistant_end|>`, `<|bos|>` or a token in `stop` (that token is yielded); generation
        ends when every row has completed or after `max_tokens` steps. Completed rows keep receiving (ignored)
        tokens until then. `ignore_eos` (benchmarks) never completes a row.

        `logprobs=K` (K >= 0) adds a third item per step, one `(logprob, [(id, logprob)] * K)` per row: the
        log-probability of the row's token and the K most likely tokens, from the raw distribution (log_softmax
        of the fp32 softcapped logits, before temperature, top-k or top-p). Without it nothing extra is computed.
        """
        prompt, max_tokens = self._budget(prompt_tokens, num_samples, max_tokens)
        if max_tokens <= 0:
            return
        terminal = {self.assistant_end, self.bos, *(int(t) for t in (stop or ()))}
        B = num_samples
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # per thread: a server replica's worker thread drives its own GPU
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        rows = [_Row() for _ in range(B)]
        pinned = dev.type == "cuda"
        host = torch.empty(B, dtype=torch.long, pin_memory=pinned)
        logits = self.decoder.prefill(prompt, B, len(prompt) + max_tokens - 1)
        # on CUDA: one Gumbel-max kernel per step instead of softmax + multinomial (~5 launches); with top-k/top-p
        # the same draw over each row's candidates (`gumbel_draw`, as the server's batcher draws)
        fast = gumbel_sampling(dev)
        truncated = fast and temperature > 0 and not untruncated(top_k, top_p)
        scratch = torch.zeros(2, B, dtype=torch.long, device=dev) if fast else None  # the sampler's, reused
        if logprobs is not None:  # host buffers the scores are copied into with this step's tokens
            k = min(int(logprobs), logits.size(-1))
            lp_host = torch.empty(B, 1 + k, dtype=torch.float32, pin_memory=pinned)
            ids_host = torch.empty(B, k, dtype=torch.long, pin_memory=pinned)
        for step in range(max_tokens):
            if truncated:
                col_dev = gumbel_draw(logits, [temperature] * B, [gumbel_key(seed, step)] * B, list(range(B)),
                                      [top_k or 0] * B, [top_p or 1.0] * B, scratch)
            elif fast:
                col_dev = _kernels().sample(logits, temperature, gumbel_key(seed, step),
                                            out=self.decoder.token_buffer(B), scratch=scratch)
            else:
                col_dev = sample_next_token(logits, gen, temperature, top_k, top_p)
            mask = [1] * B
            forced = [(i, r.forced.popleft()) for i, r in enumerate(rows) if r.forced and not r.done]
            if forced:
                rows_idx = torch.tensor([i for i, _ in forced], device=dev)
                col_dev = col_dev.index_put((rows_idx,), torch.tensor([t for _, t in forced], device=dev))
                for i, _ in forced:
                    mask[i] = 0
            if logprobs is not None:
                # before the next step is launched: on CUDA it overwrites `logits` in place (the graph's buffer)
                lp = torch.log_softmax(logits.float(), dim=-1)
                top_lp, top_ids = torch.topk(lp, k, dim=-1)
                lp_host.copy_(torch.cat([lp.gather(1, col_dev.view(-1, 1)), top_lp], dim=1), non_blocking=pinned)
                ids_host.copy_(top_ids, non_blocking=pinned)
            host.copy_(col_dev, non_blocking=pinned)
            ready = torch.cuda.Event() if pinned else None
            if ready is not None:
                ready.record()
            if step + 1 < max_tokens:  # launch the next step now; the host reads this one while the GPU works
                logits = self.decoder.step(col_dev)
            if ready is not None:
                ready.synchronize()
            col = host.tolist()
            calls = []
            for i, (row, tok) in enumerate(zip(rows, col)):
                if row.done or mask[i] == 0:
                    continue  # forced tokens never trigger the state machine
                if tok in terminal and not ignore_eos:
                    row.done = True
                elif (code := self.python_state(row, tok)) is not None:
                    calls.append((row, code))
            if calls:
                self._run_tools(calls)
            if logprobs is None:
                yield col, mask
            else:
                vals, ids = lp_host.tolist(), ids_host.tolist()
                yield col, mask, [(v[0], list(zip(i, v[1:]))) for v, i in zip(vals, ids)]
            if all(r.done for r in rows):
                return

    @torch.no_grad()
    def score(self, tokens: list[int], top: int = 0) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each of tokens[1:]: its log-probability given the tokens before it and the `top` most likely tokens
        there, from one forward over `tokens` (the same raw distribution as `generate(logprobs=...)`)."""
        ids = torch.tensor([[int(t) for t in tokens]], dtype=torch.long, device=self.device)
        if ids.shape[1] > self.max_context:
            raise ValueError(f"score: {ids.shape[1]} tokens exceed the model's context ({self.max_context})")
        if ids.shape[1] < 2:
            return []
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # per thread, as in generate
        lp = torch.log_softmax(self.model(ids)[0, :-1].float(), dim=-1)
        chosen = lp.gather(1, ids[0, 1:, None])[:, 0].tolist()
        k = min(int(top), lp.size(-1))
        top_lp, top_ids = torch.topk(lp, k, dim=-1)
        return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top_ids.tolist(), top_lp.tolist())]

    def generate_batch(self, prompt_tokens: list[int], num_samples: int = 1, max_tokens: int = 256,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int = 42, stop: Iterable[int] | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Non-streaming: (sequences, masks), each prompt + completion per row, terminal token dropped.

        masks: 0 for prompt and forced tokens, 1 for sampled ones."""
        prompt = [int(t) for t in prompt_tokens]
        terminal = {self.assistant_end, self.bos, *(int(t) for t in (stop or ()))}
        seqs = [list(prompt) for _ in range(num_samples)]
        masks = [[0] * len(prompt) for _ in range(num_samples)]
        done = [False] * num_samples
        for col, mcol in self.generate(prompt, num_samples, max_tokens, temperature, top_k, top_p, seed, stop):
            for i, (tok, m) in enumerate(zip(col, mcol)):
                if done[i]:
                    continue
                if m == 1 and tok in terminal:
                    done[i] = True
                    continue
                seqs[i].append(tok)
                masks[i].append(m)
            if all(done):
                break
        return seqs, masks


# ----------------------------------------------------------------------------------------------------------------
# Loading for inference (chat CLI, server, bench)


def prepare_model(model: GPT) -> GPT:
    """Inference-only models on CUDA keep their weights in the compute dtype (bf16): half the bytes per decode step,
    and no per-step cast of fp32 master weights. Casting is exact w.r.t. what the forward computes anyway."""
    if next(model.parameters()).device.type == "cuda" and model.compute_dtype != torch.float32:
        model.to(model.compute_dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def load_engine(source: str = "sft", run: str | None = None, checkpoint: str | None = None,
                device: str | torch.device | None = None, **engine_kw: Any) -> tuple[Engine, dict]:
    """Load the latest `source` checkpoint of `run` (or an explicit checkpoint dir) as an inference Engine."""
    dev = device if isinstance(device, torch.device) else detect_device(device)
    if checkpoint is None:
        _, ckpt = find_run_with_stage(source, run)
    else:
        ckpt = Path(checkpoint)
    model, tok, meta = load_model(ckpt, dev, compute_dtype(dev))
    meta = dict(meta, checkpoint_dir=str(ckpt))
    return Engine(prepare_model(model), tok, **engine_kw), meta


# ----------------------------------------------------------------------------------------------------------------
# `picochat bench infer`


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory to benchmark")
    parser.add_argument("--source", default=None, choices=["base", "mid", "sft", "rl"],
                        help="benchmark the latest checkpoint of this stage (with --run)")
    parser.add_argument("--run", default=None, help="run name for --source")
    parser.add_argument("--depth", type=int, default=20, help="random-init model depth (without --checkpoint)")
    parser.add_argument("--random-init", action="store_true", help="benchmark a random-weight model of --depth")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab of the random-init model")
    parser.add_argument("--window-pattern", default="L", help="window pattern of the random-init model")
    parser.add_argument("--smear", action=argparse.BooleanOptionalAction, default=True,
                        help="random-init model with smear (the pretraining default)")
    parser.add_argument("--backout", action=argparse.BooleanOptionalAction, default=True,
                        help="random-init model with backout (the pretraining default)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8,64", help="comma-separated decode batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per batch size (median kept)")
    parser.add_argument("--no-compile", action="store_true", help="CUDA graph without torch.compile'd kernels")
    parser.add_argument("--no-cuda-graph", action="store_true", help="eager decode (to measure the graph's gain)")
    parser.add_argument("--device", default=None, help="cpu | cuda | mps (default: auto)")


def _config_for_depth(depth: int, vocab_size: int, window_pattern: str):
    """nanochat's depth dial: width 64 x depth, 128-dim heads. Prefer picochat.scaling's when it exists."""
    # the scaling module owns the dial where it offers one; else the plain rule
    fn = getattr(scaling, "model_config", None) or getattr(scaling, "config_for_depth", None)
    if fn is not None:
        cfg = fn(depth)
        if isinstance(cfg, GPTConfig):
            cfg.vocab_size, cfg.window_pattern = vocab_size, window_pattern
            return cfg
    n_embd = depth * 64
    n_head = max(1, n_embd // 128)
    return GPTConfig(sequence_len=2048, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                     n_embd=n_embd, window_pattern=window_pattern)


def bench_main(args: argparse.Namespace) -> dict:
    dev = detect_device(args.device)
    kw = dict(cuda_graph=not args.no_cuda_graph, compile=not args.no_compile)
    if args.checkpoint or args.source:
        engine, meta = load_engine(args.source or "sft", args.run, args.checkpoint, dev, **kw)
        model, what = engine.model, meta["checkpoint_dir"]
    else:
        cfg = _config_for_depth(args.depth, args.vocab_size, args.window_pattern)
        cfg.smear, cfg.backout = args.smear, args.backout
        model = build_model(cfg, device=dev).set_compute_dtype(compute_dtype(dev))

        class _BenchTok:  # a random-init model has no tokenizer; the engine only needs the special ids
            special_tokens = {n: cfg.vocab_size - 9 + i for i, n in enumerate(
                ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"])}

        engine, what = Engine(prepare_model(model), _BenchTok(), **kw), f"random-init depth {args.depth}"
    cfg = model.config
    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    n_prompt = min(args.prompt_tokens, engine.max_context - args.new_tokens)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size - 16, (n_prompt,), generator=g).tolist()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"[bench infer] {what}: {model.num_params() / 1e6:.1f}M params, {weight_bytes / 1e9:.2f} GB weights, "
          f"prompt {n_prompt}, {args.new_tokens} new tokens, device {dev}, decode mode {engine.mode}", flush=True)

    def one(batch: int, new_tokens: int) -> tuple[float, list[float]]:
        """(ttft_s, [time of each later step])"""
        synchronize(dev)
        t0 = time.perf_counter()
        times = []
        for _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=1.0, seed=1,
                                 ignore_eos=True):
            times.append(time.perf_counter())
        synchronize(dev)
        times[-1] = time.perf_counter()
        return times[0] - t0, [b - a for a, b in zip(times, times[1:])]

    results = []
    for batch in batch_sizes:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        one(batch, min(8, args.new_tokens))  # warm-up: allocates the cache, compiles and captures the graph
        runs = [one(batch, args.new_tokens) for _ in range(max(1, args.repeats))]
        ttft = sorted(r[0] for r in runs)[len(runs) // 2]
        step_s = sorted(sum(r[1]) / max(1, len(r[1])) for r in runs)[len(runs) // 2]
        row = {"batch": batch, "ttft_ms": round(ttft * 1e3, 3), "per_token_ms": round(step_s * 1e3, 4),
               "tokens_per_s": round(batch / step_s, 1) if step_s > 0 else None}
        if dev.type == "cuda":
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        print(f"[bench infer] batch {batch:4d}: TTFT {row['ttft_ms']:.2f} ms, {row['per_token_ms']:.3f} ms/token, "
              f"{row['tokens_per_s']:,} tok/s" + (f", peak {row['peak_mem_gb']} GB" if "peak_mem_gb" in row else ""),
              flush=True)
        results.append(row)
    out: dict[str, Any] = {"model": what, "params": model.num_params(), "smear": cfg.smear, "backout": cfg.backout,
                           "device": str(dev),
                           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                           "dtype": str(model.compute_dtype).replace("torch.", ""), "mode": engine.mode,
                           "prompt_tokens": n_prompt, "new_tokens": args.new_tokens, "results": results}
    bw = peak_bandwidth(dev)
    per_token = decode_bytes_per_token(model, n_prompt + args.new_tokens // 2)
    out["bytes_per_token_batch1"] = per_token
    if bw:  # the batch-1 roofline: every matrix and the cache read once per token
        out["bw_ceiling_tok_s_batch1"] = round(bw / per_token, 1)
        for row in results:
            if row["batch"] == 1 and row["tokens_per_s"]:
                out["mbu_batch1"] = round(row["tokens_per_s"] * per_token / bw, 4)
    return out


def decode_bytes_per_token(model: Any, context: int) -> int:
    """Bytes one batch-1 decode step must read: every weight matrix except the embedding tables (a token reads one
    row of those), plus the KV cache over `context` positions, in the compute dtype."""
    c = model.config
    esize = torch.empty((), dtype=model.compute_dtype).element_size()
    mats = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and not n.startswith(("wte.", "value_embeds.")))
    rows = c.n_embd + len(model.value_embeds) * c.n_kv_head * c.head_dim
    kv = c.n_layer * 2 * c.n_kv_head * c.head_dim * context
    return (mats + rows + kv) * esize
