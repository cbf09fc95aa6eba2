"""Hand-written Triton kernels. Only `picochat.attention` calls them (it decides, and falls back loudly); nothing
here runs at import, and CPU-only installs never import triton.

Decode attention over a shared prefix (split-KV, "flash decoding"):
one new query token per row attends to (a) the prompt's keys, stored once and shared by every row, and (b) the
row's own generated keys. Why: with nanochat-style sampling (prefill the prompt once, then decode `num_samples`
rows), copying the prompt cache into every row makes decode read B copies of it each step; at batch 64 with a
512-token prompt that is 4.2 GB per step on a d20 model, 2.6 ms of HBM traffic alone. Here rows are blocked
together over the shared prompt (one read serves BM rows), and each program covers one BN-key block, so a batch-1
step still spreads over many SMs (the generic memory-efficient SDPA kernel runs one CTA per head: 33 us per layer
at batch 1 on an H100, measured). Partial softmax statistics are merged in a second small kernel.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: callers check `available()` first
    triton = None
    tl = None

BN = 64  # keys per program


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _partial_kernel(Q, K, V, M, L, ACC, NPRE, POS,
                        stride_qb, stride_qh, stride_qg, stride_kb, stride_kt, stride_kh,
                        n_rows, G, Hkv, window, scale, split_base, NS,
                        SHARED: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
        pid0 = tl.program_id(0)
        split = tl.program_id(1)
        pid2 = tl.program_id(2)
        npre = tl.load(NPRE)
        pos = tl.load(POS)
        offs_d = tl.arange(0, D)
        offs_n = split * BLOCK_N + tl.arange(0, BLOCK_N)
        if SHARED:  # program = (kv head, key block, block of BM rows r = b * G + g); keys are the prompt's
            h = pid0
            rows = pid2 * BM + tl.arange(0, BM)
            row_ok = rows < n_rows
            b = rows // G
            g = rows % G
            kbase = K + h * stride_kh
            vbase = V + h * stride_kh
            key_pos = offs_n
            key_ok = offs_n < npre
        else:  # program = (row b and kv head h, key block); keys are row b's generated tokens
            b0 = pid0 // Hkv
            h = pid0 % Hkv
            g = tl.arange(0, BM)
            row_ok = g < G
            b = b0 + 0 * g
            kbase = K + b0 * stride_kb + h * stride_kh
            vbase = V + b0 * stride_kb + h * stride_kh
            key_pos = npre + offs_n
            key_ok = key_pos <= pos
        key_ok = key_ok & (pos - key_pos < window)
        q = tl.load(Q + b[:, None] * stride_qb + h * stride_qh + g[:, None] * stride_qg + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        kv_off = offs_n[:, None] * stride_kt + offs_d[None, :]
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
    def _combine_kernel(M, L, ACC, OUT, NS, NSP: tl.constexpr, D: tl.constexpr):
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
    bm_shared = 16 if B * G <= 16 else (32 if B * G <= 32 else 64)
    _partial_kernel[(Hkv, sp, triton.cdiv(B * G, bm_shared))](
        q, kp, vp, m, l_sum, acc, npre, pos, q.stride(0), q.stride(1), q.stride(2), 0, kp.stride(0), kp.stride(1),
        B * G, G, Hkv, win, scale, 0, ns, SHARED=True, BM=bm_shared, BLOCK_N=BN, D=D, num_warps=4)
    _partial_kernel[(B * Hkv, ss, 1)](
        q, ks, vs, m, l_sum, acc, npre, pos, q.stride(0), q.stride(1), q.stride(2), ks.stride(0), ks.stride(1),
        ks.stride(2), B * G, G, Hkv, win, scale, sp, ns, SHARED=False, BM=max(16, triton.next_power_of_2(G)),
        BLOCK_N=BN, D=D, num_warps=4)
    out = torch.empty(B, Hkv, G, D, device=q.device, dtype=q.dtype)
    _combine_kernel[(R,)](m, l_sum, acc, out, ns, NSP=triton.next_power_of_2(ns), D=D, num_warps=4)
    return out
