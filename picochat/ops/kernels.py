"""Hand-written Triton kernels. `picochat.ops.attention` (decode attention), `picochat.engine` (the batch-1 step and
the sampler), `picochat.ops.loss` (the training loss's softcapped cross-entropy, through the `picochat::softcap_ce`
custom op) and `picochat.ops.rope` (RoPE + QK-norm in training, custom ops `picochat::rope_norm[_backward]`) call
them, each deciding and falling back loudly; nothing here runs at import, and CPU-only installs never import
triton.

Training loss epilogue (`softcap_ce`): for each chunk of lm_head logits, the loss per row and its gradient
(softmax - onehot) * (1 - tanh^2) in one kernel that reads the bf16 logits twice and writes the gradient once.
Compiled from torch ops the same math was ~10 passes over fp32 logits: 35 ms of a 265 ms d12 step on an H200,
9.5 ms now; d12 went from 494K to 542K tok/s (README "Performance").

RoPE + QK-norm (`rope_norm_fwd` / `rope_norm_bwd`): blocks of (token, head) rows; forward rotates and normalises
a row in registers and keeps its rstd, backward inverts both from the saved output (why and timings: `rope.py`).

Decode attention over a shared prefix (split-KV, "flash decoding"):
one new query token per row attends to (a) the prompt's keys, stored once and shared by every row, and (b) the
row's own generated keys. Why: with nanochat-style sampling (prefill the prompt once, then decode `num_samples`
rows), copying the prompt cache into every row makes decode read B copies of it each step; at batch 64 with a
512-token prompt that is 4.2 GB per step on a d20 model, 2.6 ms of HBM traffic alone. Here rows are blocked
together over the shared prompt (one read serves BM rows), and each program covers one BN-key block, so a batch-1
step still spreads over many SMs (the generic memory-efficient SDPA kernel runs one CTA per head: 33 us per layer
at batch 1 on an H100, measured). Partial softmax statistics are merged in a second small kernel.

Batch-1 decode (`gemv`, `qkv_post`): one token through a d20 model reads ~0.9 GB of bf16 weights in ~90 matrix-
vector products, and everything between them is a handful of elements. With cuBLAS GEMVs and separate norm,
RoPE and cache-write kernels a step was ~300 launches and 1.07 ms of kernel time on an H100 (profile in the README),
of which only 0.59 ms was the GEMVs themselves. Here each GEMV carries its neighbours with it: the residual mix
and the RMSNorm of its input (the norm is a per-row scalar, so it is applied to the dot products afterwards), and
ReLU², the residual add or the logit softcap on its output; q/k RoPE + QK-norm, the value-embedding gate and the
KV-cache writes are one small kernel. A layer is then 8 launches instead of ~15, chained with programmatic
dependent launch (`pdl`). Measured on an H100 (d20, 512-token prompt, README "Performance"): batch-1 decode went from
855 tok/s (cuBLAS + compiled pieces) to 1,414-1,516 tok/s; GEMVs run at ~1.8 TB/s against cuBLAS's ~1.5.
At 22e5653, on an H200, same machine before/after: 1,586.5 -> 1,810.8-1,837.3 tok/s (0.630 -> 0.544 ms per token),
from two changes. The sampler spreads each row over 32 programs merged by one 64-bit atomic max; it was one program
looping over 32K logits on one SM, 24.5 us per token. And the down projections get a pinned GEMV config: the
autotuner times with the matrix hot in L2 and picked one that is 40% slower when the weights stream from HBM.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: callers check `available()` first
    triton = None
    tl = None
try:  # grid dependency control (triton >= 3.3); without it the kernels are launched the ordinary way
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

BN = 64  # keys per program
SAMPLE_BLOCK = 1024  # logits per sampler program


def available() -> bool:
    return triton is not None


_pdl_cache: dict[int, bool] = {}


def pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper+): each kernel of the batch-1 decode chain may start while its
    predecessor finishes. A kernel then only touches memory nobody writes (the weights, the prompt cache) before
    `gdc_wait()`, which returns once the predecessor grid has completed; all stores come after it. Off under the
    Triton interpreter and with PICOCHAT_PDL=0."""
    if (device.type != "cuda" or gdc_wait is None or os.environ.get("TRITON_INTERPRET") == "1"
            or os.environ.get("PICOCHAT_PDL") == "0"):
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _pdl_cache:
        _pdl_cache[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _pdl_cache[idx]


if triton is not None:

    @triton.jit
    def _partial_kernel(Q, K, V, K2, V2, M, L, ACC, NPRE, POS,
                        stride_qb, stride_qh, stride_qg, stride_kb, stride_kt, stride_kh, stride_k2t, stride_k2h,
                        n_rows, G, Hkv, window, scale, split_base, NS, SP,
                        SHARED: tl.constexpr, BOTH: tl.constexpr, PDL: tl.constexpr, BM: tl.constexpr,
                        BLOCK_N: tl.constexpr, D: tl.constexpr):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        pid0 = tl.program_id(0)
        split = tl.program_id(1)
        pid2 = tl.program_id(2)
        npre = tl.load(NPRE)
        pos = tl.load(POS)
        offs_d = tl.arange(0, D)
        if BOTH:  # batch 1, one launch: splits < SP cover the prompt (K, V), the rest the row's own keys (K2, V2)
            h = pid0
            g = tl.arange(0, BM)
            row_ok = g < G
            b = 0 * g
            if split < SP:
                offs_n = split * BLOCK_N + tl.arange(0, BLOCK_N)
                kv_off = offs_n[:, None] * stride_kt + h * stride_kh + offs_d[None, :]
                kbase = K
                vbase = V
                key_pos = offs_n + 0 * npre  # int64 in both branches
                key_ok = offs_n < npre
            else:
                offs_n = (split - SP) * BLOCK_N + tl.arange(0, BLOCK_N)
                kv_off = offs_n[:, None] * stride_k2t + h * stride_k2h + offs_d[None, :]
                kbase = K2
                vbase = V2
                key_pos = npre + offs_n
                key_ok = key_pos <= pos
        elif SHARED:  # program = (kv head, key block, block of BM rows r = b * G + g); keys are the prompt's
            h = pid0
            rows = pid2 * BM + tl.arange(0, BM)
            row_ok = rows < n_rows
            b = rows // G
            g = rows % G
            offs_n = split * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_off = offs_n[:, None] * stride_kt + h * stride_kh + offs_d[None, :]
            kbase = K
            vbase = V
            key_pos = offs_n
            key_ok = offs_n < npre
        else:  # program = (row b and kv head h, key block); keys are row b's generated tokens
            b0 = pid0 // Hkv
            h = pid0 % Hkv
            g = tl.arange(0, BM)
            row_ok = g < G
            b = b0 + 0 * g
            offs_n = split * BLOCK_N + tl.arange(0, BLOCK_N)
            kv_off = offs_n[:, None] * stride_kt + b0 * stride_kb + h * stride_kh + offs_d[None, :]
            kbase = K
            vbase = V
            key_pos = npre + offs_n
            key_ok = key_pos <= pos
        key_ok = key_ok & (pos - key_pos < window)
        q = tl.load(Q + b[:, None] * stride_qb + h * stride_qh + g[:, None] * stride_qg + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k = tl.load(kbase + kv_off, mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp(s - m_safe[:, None])
        l_sum = tl.sum(p, 1)
        v = tl.load(vbase + kv_off, mask=key_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v)
        slot = ((b * Hkv + h) * G + g) * NS + split_base + split
        tl.store(M + slot, m, mask=row_ok)
        tl.store(L + slot, l_sum, mask=row_ok)
        tl.store(ACC + slot[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _combine_kernel(M, L, ACC, OUT, NS, NSP: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        r = tl.program_id(0)
        offs = tl.arange(0, NSP)
        ok = offs < NS
        offs_d = tl.arange(0, D)
        m = tl.load(M + r * NS + offs, mask=ok, other=float("-inf"))
        l_sum = tl.load(L + r * NS + offs, mask=ok, other=0.0)
        mx = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
        denom = tl.sum(w * l_sum, 0)
        acc = tl.load(ACC + (r * NS + offs)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * acc, 0) / denom
        tl.store(OUT + r * D + offs_d, out.to(OUT.dtype.element_ty))


    # the interpreter (CPU correctness runs) would time every config: give it one
    _GEMV_CONFIGS = ([triton.Config(dict(BLOCK_N=16, BLOCK_K=64))] if os.environ.get("TRITON_INTERPRET") == "1" else
                     [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w)
                      for bn in (4, 8, 16, 32) for bk in (256, 512, 1024, 2048) for w in (4, 8)
                      if bn * bk <= 1024 * w * 4])  # the (BN, BK) fp32 accumulator stays in registers

    @triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "MIX", "NORM", "ACT", "ADD_RES", "SOFTCAP"])
    @triton.jit
    def _gemv_kernel(X, X0, LAM_R, LAM_0, W, OUT, RES, XOUT, N, eps, softcap, K: tl.constexpr,
                     MIX: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, ADD_RES: tl.constexpr,
                     SOFTCAP: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """OUT[n] = epilogue(sum_k W[n, k] * prologue(x)[k]) for one row x; W is (N, K) row-major.
        prologue: MIX -> x = lam_r * x + lam_0 * x0 (program 0 also stores it to XOUT: the new residual);
                  NORM -> the dot products are scaled by rsqrt(mean(x^2) + eps) (= rms_norm(x) @ W.T).
        epilogue: ACT 1 -> relu(.)^2; ADD_RES -> + RES[n]; SOFTCAP -> softcap * tanh(. / softcap).
        The first weight tile is requested before waiting on the previous kernel (PDL), and each next tile
        before using the current one."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        offs = tl.arange(0, BLOCK_K)
        w = tl.load(W + rows[:, None] * K + offs[None, :], mask=row_ok[:, None] & (offs < K)[None, :], other=0.0)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        if MIX:
            lam_r = tl.load(LAM_R).to(tl.float32)
            lam_0 = tl.load(LAM_0).to(tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs
            k_ok = offs_k < K
            nxt = offs_k + BLOCK_K
            w_next = tl.load(W + rows[:, None] * K + nxt[None, :], mask=row_ok[:, None] & (nxt < K)[None, :],
                             other=0.0)
            x = tl.load(X + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            if MIX:
                x = lam_r * x + lam_0 * tl.load(X0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                x = x.to(XOUT.dtype.element_ty)  # the residual stream's dtype, as the unfused path rounds it
                tl.store(XOUT + offs_k, x, mask=k_ok & (pid == 0))
                x = x.to(tl.float32)
            if NORM:
                ss += x * x
            acc += w.to(tl.float32) * x[None, :]
            w = w_next
        out = tl.sum(acc, 1)
        if NORM:
            out = out * tl.rsqrt(tl.sum(ss, 0) / K + eps)
        if ACT == 1:
            out = tl.maximum(out, 0.0)
            out = out * out
        if ADD_RES:
            out += tl.load(RES + rows, mask=row_ok, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = out / softcap  # tanh(z) = 2 * sigmoid(2z) - 1
            out = softcap * (2.0 * tl.sigmoid(2.0 * z) - 1.0)
        tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _embed_kernel(WTE, TOK, PREV, SG, SL, X, n_embd, smear_in, eps, SMEAR: tl.constexpr, NE: tl.constexpr,
                      PDL: tl.constexpr):
        """x = rms_norm(wte[tok]); with SMEAR: x += lambda * sigmoid(W_s . x[:smear_in]) * prev, prev = the normed
        embedding (GPT.smear for one decode token)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        offs = tl.arange(0, NE)
        ok = offs < n_embd
        tok = tl.load(TOK)
        e = tl.load(WTE + tok * n_embd + offs, mask=ok, other=0.0).to(tl.float32)
        e = e * tl.rsqrt(tl.sum(e * e, 0) / n_embd + eps)
        e = e.to(X.dtype.element_ty).to(tl.float32)
        x = e
        if SMEAR:
            sw = tl.load(SG + offs, mask=offs < smear_in, other=0.0).to(tl.float32)  # W_s over e[:smear_in]
            gate = tl.load(SL).to(tl.float32) * tl.sigmoid(tl.sum(e * sw, 0))
            x = e + gate * tl.load(PREV + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(PREV + offs, e.to(PREV.dtype.element_ty), mask=ok)
        tl.store(X + offs, x.to(X.dtype.element_ty), mask=ok)

    @triton.jit
    def _qkv_post_kernel(QKV, XR, GW, VE, TOK, COS, SIN, POS, NPRE, QOUT, KC, VC, stride_ct, H, Hkv, n_embd,
                         gate_in, gate_scale, eps, HAS_VE: tl.constexpr, D: tl.constexpr, NE: tl.constexpr,
                         GIN: tl.constexpr, PDL: tl.constexpr):
        """One program per head of the fused q|k|v row: q and k heads get RoPE then RMSNorm (q to QOUT, k into the
        cache KC at position pos - npre); v heads add the gated value embedding and go into the cache VC."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        j = tl.program_id(0)
        pos = tl.load(POS)
        sidx = pos - tl.load(NPRE)
        half: tl.constexpr = D // 2
        offs = tl.arange(0, half)
        if j < H + Hkv:
            x1 = tl.load(QKV + j * D + offs).to(tl.float32)
            x2 = tl.load(QKV + j * D + half + offs).to(tl.float32)
            c = tl.load(COS + pos * half + offs)
            s = tl.load(SIN + pos * half + offs)
            y1 = x1 * c + x2 * s
            y2 = x2 * c - x1 * s
            r = tl.rsqrt((tl.sum(y1 * y1, 0) + tl.sum(y2 * y2, 0)) / D + eps)
            if j < H:
                dst = QOUT + j * D
            else:
                dst = KC + sidx * stride_ct + (j - H) * D
            tl.store(dst + offs, (y1 * r).to(dst.dtype.element_ty))
            tl.store(dst + half + offs, (y2 * r).to(dst.dtype.element_ty))
        else:
            hv = j - H - Hkv
            offs_d = tl.arange(0, D)
            v = tl.load(QKV + j * D + offs_d).to(tl.float32)
            if HAS_VE:  # gate = scale * sigmoid(W_g . rms_norm(x)[:gate_in]) for this kv head
                offs_e = tl.arange(0, NE)
                xr = tl.load(XR + offs_e, mask=offs_e < n_embd, other=0.0).to(tl.float32)
                rx = tl.rsqrt(tl.sum(xr * xr, 0) / n_embd + eps)
                offs_g = tl.arange(0, GIN)
                xg = tl.load(XR + offs_g, mask=offs_g < gate_in, other=0.0).to(tl.float32) * rx
                wg = tl.load(GW + hv * gate_in + offs_g, mask=offs_g < gate_in, other=0.0).to(tl.float32)
                gate = gate_scale * tl.sigmoid(tl.sum(xg * wg, 0))
                tok = tl.load(TOK)
                v += gate * tl.load(VE + tok * (Hkv * D) + hv * D + offs_d).to(tl.float32)
            tl.store(VC + sidx * stride_ct + hv * D + offs_d, v.to(VC.dtype.element_ty))


    @triton.jit
    def _sample_kernel(LOGITS, OUT, BEST, COUNT, PARAMS, stride_row, inv_temp, seed, V, noise_stride,
                       NPROG: tl.constexpr,
                       GREEDY: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
        """argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T) (the Gumbel-max trick); the plain
        argmax when GREEDY. Program (row, j) takes the j-th BLOCK of the row's vocabulary and folds its best
        (score, index) into BEST[row] with one 64-bit atomic max: the score's bits made order-preserving in the
        high half, the index inverted in the low half, so equal scores keep the lowest index. The last program of
        a row to finish (COUNT) writes OUT[row] and resets BEST and COUNT for the next launch. Why not one program
        per row: at batch 1 that loops over 32K logits on one SM, 24.5 us per token of a 610 us d20 step on an
        H200 (measured); spread over NPROG SMs it is one block's latency. PER_ROW: each row's seed, its row
        number for the noise and its 1/T come from PARAMS (3, B) int32 (the last as float32 bits), so the rows of
        many requests draw in one launch exactly as each would alone."""
        row = tl.program_id(0)
        pid = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < V
        score = tl.load(LOGITS + row * stride_row + offs, mask=ok, other=0.0).to(tl.float32)
        if not GREEDY:
            s, r, it = seed, row, inv_temp
            if PER_ROW:
                nrows = tl.num_programs(0)
                s = tl.load(PARAMS + row)
                r = tl.load(PARAMS + nrows + row)
                it = tl.load(PARAMS + 2 * nrows + row).to(tl.float32, bitcast=True)
            u = tl.rand(s, r * noise_stride + offs)  # noise_stride >= V: a row's noise is its own
            u = tl.minimum(tl.maximum(u, 1e-12), 1.0 - 1e-7)
            score = score * it - tl.log(-tl.log(u))
        score = tl.where(ok, score, -float("inf"))
        m = tl.max(score, 0)
        idx = pid * BLOCK + tl.argmax(score, 0)
        bits = m.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(bits < 0, -bits - 1, bits + 2147483648)  # float order as an integer in [0, 2^32)
        packed = key * 2147483648 + (2147483647 - idx.to(tl.int64))
        tl.atomic_max(BEST + row, packed)
        done = tl.atomic_add(COUNT + row, 1)
        if done == NPROG - 1:
            best = tl.atomic_xchg(BEST + row, 0)
            tl.atomic_xchg(COUNT + row, 0)
            tl.store(OUT + row, 2147483647 - (best % 2147483648))


if triton is not None:

    @triton.jit
    def _softcap_ce_kernel(Z, TGT, LOSS, G, stride_z, stride_g, V, softcap, BLOCK: tl.constexpr):
        """One row of softcapped cross-entropy: loss = lse(c) - c[t] with c = softcap * tanh(z / softcap), and
        dloss/dz = (softmax(c) - onehot(t)) * (1 - tanh^2) written to G (0 for t = -1). Two passes over z: the
        softcap bounds c by +-softcap, so exp(c - softcap) never overflows and pass 1 needs no running max."""
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(TGT + row)
        zrow = Z + row * stride_z
        offs = tl.arange(0, BLOCK)
        inv = 1.0 / softcap
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            ok = cols < V
            z = tl.load(zrow + cols, mask=ok, other=0.0).to(tl.float32)
            th = 2.0 * tl.sigmoid(2.0 * inv * z) - 1.0  # tanh
            acc += tl.where(ok, tl.exp(softcap * th - softcap), 0.0)
        lse = softcap + tl.log(tl.sum(acc, 0))
        valid = t >= 0
        zt = tl.load(zrow + tl.where(valid, t, 0)).to(tl.float32)
        ct = softcap * (2.0 * tl.sigmoid(2.0 * inv * zt) - 1.0)
        tl.store(LOSS + row, tl.where(valid, lse - ct, 0.0))
        grow = G + row * stride_g
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            ok = cols < V
            z = tl.load(zrow + cols, mask=ok, other=0.0).to(tl.float32)
            th = 2.0 * tl.sigmoid(2.0 * inv * z) - 1.0
            p = tl.exp(softcap * th - lse)
            p = tl.where(cols == t, p - 1.0, p)
            g = tl.where(valid, p * (1.0 - th * th), 0.0)
            tl.store(grow + cols, g.to(G.dtype.element_ty), mask=ok)


    @triton.jit
    def _rope_rows(P, COS, SIN, n_rows, T, H, sb, st, sh, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
        """Program's BLOCK_R rows r = (b, t, h) of a (B, T, H, 2 * HALF) tensor P with strides (sb, st, sh, 1):
        (rows, row mask, the two halves of each row and the rows' cos/sin, all fp32)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = rows < n_rows
        h = rows % H
        t = (rows // H) % T
        b = rows // (H * T)
        j = tl.arange(0, HALF)
        src = P + (b.to(tl.int64) * sb + t.to(tl.int64) * st + h.to(tl.int64) * sh)[:, None] + j[None, :]
        p1 = tl.load(src, mask=ok[:, None], other=0.0).to(tl.float32)
        p2 = tl.load(src + HALF, mask=ok[:, None], other=0.0).to(tl.float32)
        c = tl.load(COS + t[:, None] * HALF + j[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.load(SIN + t[:, None] * HALF + j[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        return rows, ok, p1, p2, c, s

    @triton.jit
    def _rope_norm_fwd_kernel(X, COS, SIN, Y, RSTD, n_rows, T, H, sxb, sxt, sxh, eps, HALF: tl.constexpr,
                              BLOCK_R: tl.constexpr):
        """BLOCK_R rows (b, t, h) of x (B, T, H, 2 * HALF), any strides with the last dim contiguous: r = rope(x),
        y = r * rstd with rstd = rsqrt(mean(r^2) + eps), y contiguous; rstd (fp32, one per row) kept for backward."""
        rows, ok, x1, x2, c, s = _rope_rows(X, COS, SIN, n_rows, T, H, sxb, sxt, sxh, HALF, BLOCK_R)
        j = tl.arange(0, HALF)
        r1 = x1 * c + x2 * s
        r2 = x2 * c - x1 * s
        rstd = tl.rsqrt((tl.sum(r1 * r1, 1) + tl.sum(r2 * r2, 1)) / (2 * HALF) + eps)
        dst = Y + rows.to(tl.int64)[:, None] * (2 * HALF) + j[None, :]
        tl.store(dst, (r1 * rstd[:, None]).to(Y.dtype.element_ty), mask=ok[:, None])
        tl.store(dst + HALF, (r2 * rstd[:, None]).to(Y.dtype.element_ty), mask=ok[:, None])
        tl.store(RSTD + rows, rstd, mask=ok)

    @triton.jit
    def _rope_norm_bwd_kernel(DY, Y, RSTD, COS, SIN, DX, n_rows, T, H, sdb, sdt, sdh, HALF: tl.constexpr,
                              BLOCK_R: tl.constexpr):
        """dx for y = rms_norm(rope(x)) from the saved y and rstd: dr = rstd * (dy - y * mean(dy * y)) (RMSNorm's
        backward), dx = rope^-1(dr) (the transposed rotation). dy any strides (cuDNN's dq layout), dx contiguous."""
        rows, ok, dy1, dy2, c, s = _rope_rows(DY, COS, SIN, n_rows, T, H, sdb, sdt, sdh, HALF, BLOCK_R)
        j = tl.arange(0, HALF)
        own = rows.to(tl.int64)[:, None] * (2 * HALF) + j[None, :]
        y1 = tl.load(Y + own, mask=ok[:, None], other=0.0).to(tl.float32)
        y2 = tl.load(Y + own + HALF, mask=ok[:, None], other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=ok, other=0.0)
        dot = (tl.sum(dy1 * y1, 1) + tl.sum(dy2 * y2, 1)) / (2 * HALF)
        dr1 = (dy1 - y1 * dot[:, None]) * rstd[:, None]
        dr2 = (dy2 - y2 * dot[:, None]) * rstd[:, None]
        tl.store(DX + own, (dr1 * c - dr2 * s).to(DX.dtype.element_ty), mask=ok[:, None])
        tl.store(DX + own + HALF, (dr1 * s + dr2 * c).to(DX.dtype.element_ty), mask=ok[:, None])


def softcap_ce(z: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits z (N, V) (bf16/fp16/fp32, last dim contiguous), targets (N,) int (-1 = ignored) ->
    (per-row loss (N,) fp32, d loss_row / d z (N, V) in z's dtype) of softcap * tanh(z / softcap) cross-entropy.
    The training loss's epilogue (`loss._FusedLinearCE`): it replaces ~10 elementwise passes over the fp32 logits
    with one kernel that reads z twice and writes the gradient once. softcap must be in (0, 60]."""
    N, V = z.shape
    assert z.stride(1) == 1 and 0.0 < softcap <= 60.0
    loss = torch.empty(N, device=z.device, dtype=torch.float32)
    g = torch.empty_like(z)
    if N:
        _softcap_ce_kernel[(N,)](z, targets.contiguous(), loss, g, z.stride(0), g.stride(0), V, float(softcap),
                                 BLOCK=2048, num_warps=8)
    return loss, g


ROPE_ROWS = 32  # rows (token, head) per program of the RoPE + QK-norm kernels


def rope_norm_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, H, D) (last dim contiguous), cos/sin (T, D/2) -> (rms_norm(rope(x)) contiguous in x's dtype,
    rstd (B, T, H) fp32)."""
    B, T, H, D = x.shape
    assert x.stride(3) == 1 and cos.is_contiguous() and sin.is_contiguous() and cos.shape == (T, D // 2)
    y = torch.empty(B, T, H, D, device=x.device, dtype=x.dtype)
    rstd = torch.empty(B, T, H, device=x.device, dtype=torch.float32)
    n = B * T * H
    if n:
        _rope_norm_fwd_kernel[(triton.cdiv(n, ROPE_ROWS),)](x, cos, sin, y, rstd, n, T, H, x.stride(0), x.stride(1),
                                                           x.stride(2), eps, HALF=D // 2, BLOCK_R=ROPE_ROWS)
    return y, rstd


def rope_norm_bwd(dy: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> torch.Tensor:
    """The gradient of `rope_norm_fwd` w.r.t. x, from dy (any strides, last dim contiguous) and the saved y, rstd."""
    B, T, H, D = y.shape
    assert dy.stride(3) == 1 and y.is_contiguous() and rstd.is_contiguous()
    dx = torch.empty_like(y)
    n = B * T * H
    if n:
        _rope_norm_bwd_kernel[(triton.cdiv(n, ROPE_ROWS),)](dy, y, rstd, cos, sin, dx, n, T, H, dy.stride(0),
                                                           dy.stride(1), dy.stride(2), HALF=D // 2,
                                                           BLOCK_R=ROPE_ROWS)
    return dx


def gemv(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None, n: int | None = None,
         mix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, norm_eps: float | None = None,
         relu2: bool = False, residual: torch.Tensor | None = None, softcap: float | None = None
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One row x (K,) times w (N, K) -> (N,) (the first `n` rows of w), with the fusions of `_gemv_kernel`:
    mix = (x0, lam_r, lam_0) first forms x = lam_r * x + lam_0 * x0 (returned as the second value), norm_eps
    applies RMSNorm to x, then relu2 / residual / softcap on the output. Pure: writes only fresh tensors."""
    K = x.shape[-1]
    N = w.shape[0] if n is None else n
    assert w.is_contiguous() and w.shape[1] == K and x.is_contiguous()
    out = torch.empty(N, device=x.device, dtype=out_dtype or x.dtype)
    xout = torch.empty_like(x) if mix is not None else None
    x0, lam_r, lam_0 = mix if mix is not None else (x, x, x)
    use_pdl = pdl(x.device)
    args = (x, x0, lam_r, lam_0, w, out, residual if residual is not None else out, xout if xout is not None else out,
            N, norm_eps or 0.0, softcap or 1.0)
    kw = dict(K=K, MIX=mix is not None, NORM=norm_eps is not None, ACT=int(relu2), ADD_RES=residual is not None,
              SOFTCAP=softcap is not None, PDL=use_pdl, launch_pdl=use_pdl)
    if K >= 4 * N and K >= 4096:
        # Down projections (few long rows): one row per program. The autotuner times each config alone, with the
        # matrix hot in L2 between repeats, and picks BLOCK_N=16 here; in the decode chain the weights come from
        # HBM. Swept on an H200 with 20 distinct d20 matrices (1280 x 5120) back to back in a CUDA graph:
        # 4.14 us per GEMV for (1, 2048, 4 warps) against 5.81 for the autotuner's pick.
        _gemv_kernel.fn[(N,)](*args, BLOCK_N=1, BLOCK_K=2048, num_warps=4, **kw)
    else:
        _gemv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **kw)
    return out, xout


def qkv_post(qkv: torch.Tensor, x: torch.Tensor, tok: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             pos: torch.Tensor, npre: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, H: int, Hkv: int, D: int,
             eps: float, gate_w: torch.Tensor | None = None, ve: torch.Tensor | None = None,
             gate_scale: float = 0.0) -> torch.Tensor:
    """The fused q|k|v row (H+2Hkv)*D of one token -> q (H, D) returned; k and v written into the row's caches
    kc/vc (S, Hkv, D) at index pos - npre. cos/sin: (positions, D/2) fp32 tables. x: the (pre-norm) residual,
    for the value-embedding gate; ve: the value-embedding table (V, Hkv*D) or None."""
    assert kc.stride() == vc.stride() and kc.stride(-1) == 1 and kc.stride(-2) == D
    q = torch.empty(H, D, device=qkv.device, dtype=qkv.dtype)
    has_ve = ve is not None
    gin = gate_w.shape[1] if has_ve else 1
    use_pdl = pdl(qkv.device)
    _qkv_post_kernel[(H + 2 * Hkv,)](
        qkv, x, gate_w if has_ve else qkv, ve if has_ve else qkv, tok, cos, sin, pos, npre, q, kc, vc, kc.stride(0),
        H, Hkv, x.shape[-1], gin, gate_scale, eps, HAS_VE=has_ve, D=D, NE=triton.next_power_of_2(x.shape[-1]),
        GIN=max(16, triton.next_power_of_2(gin)), PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return q


def embed(wte: torch.Tensor, tok: torch.Tensor, eps: float, prev: torch.Tensor | None = None,
          smear_w: torch.Tensor | None = None, smear_lambda: torch.Tensor | None = None) -> torch.Tensor:
    """The decode step's input for one token: rms_norm(wte[tok]) (n_embd,), smeared with `prev` (the previous
    token's normed embedding, updated in place) when smear_w (1, smear_in) / smear_lambda are given."""
    d = wte.shape[1]
    x = torch.empty(d, device=wte.device, dtype=wte.dtype)
    smear = smear_w is not None
    use_pdl = pdl(wte.device)
    _embed_kernel[(1,)](wte, tok, prev if smear else x, smear_w if smear else x, smear_lambda if smear else x, x, d,
                        smear_w.shape[1] if smear else 0, eps, SMEAR=smear, NE=triton.next_power_of_2(d),
                        PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return x


def sample(logits: torch.Tensor, temperature: float, seed: int, out: torch.Tensor | None = None,
           scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (B,) int64 from logits (B, V) at `temperature` (<= 0: greedy), without top-k/top-p, in one
    launch; rows draw independently, reproducibly from `seed` (vary it per step). `out`: where to write them.
    `scratch`: a zeroed (2, B) int64 tensor that the kernel leaves zeroed again, so a caller sampling every step
    allocates it once (one per stream: two launches sharing it at the same time would mix their rows)."""
    B, V = logits.shape
    assert logits.stride(1) == 1
    if out is None:
        out = torch.empty(B, device=logits.device, dtype=torch.long)
    if scratch is None:
        scratch = torch.zeros(2, B, device=logits.device, dtype=torch.long)
    assert out.shape == (B,) and out.dtype == torch.long and out.is_contiguous()
    assert scratch.shape == (2, B) and scratch.dtype == torch.long and scratch.is_contiguous()
    greedy = temperature <= 0.0
    nprog = triton.cdiv(V, SAMPLE_BLOCK)
    _sample_kernel[(B, nprog)](logits, out, scratch[0], scratch[1], out, logits.stride(0),
                               1.0 / temperature if not greedy else 1.0, int(seed) & 0x7FFFFFFF, V, V, NPROG=nprog,
                               GREEDY=greedy, PER_ROW=False, BLOCK=SAMPLE_BLOCK, num_warps=4)
    return out


def sample_params(temperatures: list[float], seeds: list[int], noise_rows: list[int]) -> torch.Tensor:
    """The host side of `sample_rows`' PARAMS: (3, B) int32 of seeds, noise rows and 1/T as float32 bits, for one
    H2D copy. Temperatures must be > 0 (greedy rows take an argmax instead)."""
    p = torch.empty(3, len(seeds), dtype=torch.int32)
    p[0] = torch.tensor([int(s) & 0x7FFFFFFF for s in seeds], dtype=torch.int32)
    p[1] = torch.tensor(noise_rows, dtype=torch.int32)
    p[2] = torch.tensor([1.0 / t for t in temperatures], dtype=torch.float32).view(torch.int32)
    return p


def sample_rows(logits: torch.Tensor, params: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor,
                noise_stride: int = 0) -> torch.Tensor:
    """`sample` with each row's own seed, noise row and temperature (`sample_params`, on the logits' device): row
    j draws what `sample(logits[j:j+1] ...)` would as row noise_rows[j] of a launch with seeds[j] at its
    temperature, so a server draws the rows of all its requests in one launch. scratch: (2, >= B) zeroed int64.
    noise_stride (default V): the noise offset between noise rows; columns that are a row's sorted candidates
    pass the vocabulary size, so the noise does not depend on how many columns this launch has."""
    B, V = logits.shape
    assert logits.stride(1) == 1 and params.shape == (3, B) and params.dtype == torch.int32
    assert out.shape == (B,) and out.dtype == torch.long and out.is_contiguous()
    assert scratch.shape[0] == 2 and scratch.shape[1] >= B and scratch.dtype == torch.long and scratch.is_contiguous()
    nprog = triton.cdiv(V, SAMPLE_BLOCK)
    _sample_kernel[(B, nprog)](logits, out, scratch[0], scratch[1], params, logits.stride(0), 1.0, 0, V,
                               max(noise_stride, V), NPROG=nprog, GREEDY=False, PER_ROW=True, BLOCK=SAMPLE_BLOCK,
                               num_warps=4)
    return out


def supports(q: torch.Tensor) -> bool:
    """The kernel's constraints: CUDA, triton present, a power-of-two head dim >= 16, fp16/bf16."""
    D = q.shape[-1]
    return (triton is not None and q.is_cuda and D >= 16 and D & (D - 1) == 0
            and q.dtype in (torch.bfloat16, torch.float16))


def decode_attention(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor,
                     npre: torch.Tensor, pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q (B, Hkv, G, D); prompt keys kp/vp (P, Hkv, D) shared by all rows; generated keys ks/vs (B, S, Hkv, D);
    npre, pos: 1-element int64 device tensors (prompt length; the query's absolute position, whose own k/v is
    already in ks at pos - npre). Returns (B, Hkv, G, D). No host sync, so it can live in a CUDA graph."""
    B, Hkv, G, D = q.shape
    P, S = kp.shape[0], ks.shape[1]
    assert kp.stride(-1) == 1 and ks.stride(-1) == 1 and q.stride(-1) == 1
    assert kp.stride() == vp.stride() and ks.stride() == vs.stride()
    sp, ss = triton.cdiv(P, BN), triton.cdiv(S, BN)
    ns = sp + ss
    R = B * Hkv * G
    m = torch.empty(R * ns, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty(R * ns, D, device=q.device, dtype=torch.float32)
    win = (1 << 30) if window is None else int(window)
    scale = 1.0 / math.sqrt(D)
    use_pdl = pdl(q.device)
    if B == 1:  # one launch over prompt and own keys: at batch 1 each launch is a few microseconds of latency
        _partial_kernel[(Hkv, ns, 1)](
            q, kp, vp, ks, vs, m, l_sum, acc, npre, pos, q.stride(0), q.stride(1), q.stride(2), 0, kp.stride(0),
            kp.stride(1), ks.stride(1), ks.stride(2), G, G, Hkv, win, scale, 0, ns, sp, SHARED=False, BOTH=True,
            PDL=use_pdl, BM=max(16, triton.next_power_of_2(G)), BLOCK_N=BN, D=D, num_warps=4, launch_pdl=use_pdl)
    else:
        bm_shared = 16 if B * G <= 16 else (32 if B * G <= 32 else 64)
        _partial_kernel[(Hkv, sp, triton.cdiv(B * G, bm_shared))](
            q, kp, vp, kp, vp, m, l_sum, acc, npre, pos, q.stride(0), q.stride(1), q.stride(2), 0, kp.stride(0),
            kp.stride(1), 0, 0, B * G, G, Hkv, win, scale, 0, ns, sp, SHARED=True, BOTH=False, PDL=False,
            BM=bm_shared, BLOCK_N=BN, D=D, num_warps=4)
        _partial_kernel[(B * Hkv, ss, 1)](
            q, ks, vs, ks, vs, m, l_sum, acc, npre, pos, q.stride(0), q.stride(1), q.stride(2), ks.stride(0),
            ks.stride(1), ks.stride(2), 0, 0, B * G, G, Hkv, win, scale, sp, ns, sp, SHARED=False, BOTH=False,
            PDL=False, BM=max(16, triton.next_power_of_2(G)), BLOCK_N=BN, D=D, num_warps=4)
    out = torch.empty(B, Hkv, G, D, device=q.device, dtype=q.dtype)
    _combine_kernel[(R,)](m, l_sum, acc, out, ns, NSP=triton.next_power_of_2(ns), D=D, PDL=use_pdl and B == 1,
                          num_warps=4, launch_pdl=use_pdl and B == 1)
    return out
