"""The attention shim: one place decides which kernel runs causal attention, and says so.

Layout everywhere is (B, T, H, D). `choose()` is the only decision point:

| case                                   | backend   | why |
|----------------------------------------|-----------|-----|
| full causal, CUDA                      | `sdpa`    | PyTorch's SDPA priority: on sm90/sm100 with torch >= 2.9 that is the cuDNN kernel (about twice FA2's fwd+bwd throughput on H100: ~430 against ~230 TFLOP/s); elsewhere (Ampere, Ada, sm_120) flash/efficient, which ship with every build. No context manager in the traced graph, so torch.compile sees plain SDPA |
| sliding window, CUDA                   | `flex`    | FlexAttention (compiled Triton), block mask built once per (T, window) |
| anything on CPU / MPS                  | `sdpa` / `mask` | plain SDPA; windows via an explicit boolean mask |

`PICOCHAT_ATTN=sdpa|cudnn|flash|math|flex|mask` forces a backend (`cudnn`/`flash` pin SDPA's kernel priority) (tests compare the paths numerically with it).
The first use of each (backend, case) prints one `[attention]` line on rank 0.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from picochat.runtime import print0

BACKENDS = ("sdpa", "cudnn", "flash", "math", "flex", "mask")
_announced: set[tuple[str, str]] = set()
_block_masks: dict[tuple[int, int, str], Any] = {}
_flex_fn: Any = None
_forced_seen: str | None = None


def _forced() -> str | None:
    """PICOCHAT_ATTN, read live in eager code; inside a torch.compile trace the last value read eagerly is used
    (`prepare()` reads it before compiling), so tracing touches neither os.environ nor print."""
    global _forced_seen
    if torch.compiler.is_compiling():
        return _forced_seen
    name = os.environ.get("PICOCHAT_ATTN", "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"PICOCHAT_ATTN={name!r}: expected one of {', '.join(BACKENDS)}")
    _forced_seen = name
    return name


def choose(device: torch.device, window: int | None, seq_len: int) -> str:
    """The backend for training/prefill attention over `seq_len` tokens with an optional sliding window."""
    forced = _forced()
    windowed = window is not None and window < seq_len
    if forced:
        if forced in ("cudnn", "flash") and device.type != "cuda":
            return "sdpa"
        if forced in ("cudnn", "flash", "sdpa", "math") and windowed:
            return "mask" if forced != "math" else "math"
        return forced
    if device.type == "cuda":
        return "flex" if windowed else "sdpa"
    return "mask" if windowed else "sdpa"


def backend_name(device: torch.device | None = None) -> str:
    """The backend full causal attention uses on `device` (for doctor/bench reports)."""
    return choose(device or torch.device("cpu"), None, 1)


def _announce(name: str, window: int | None) -> None:
    if torch.compiler.is_compiling():  # a print inside a trace would break the graph; prepare() announced it
        return
    key = (name, "window" if window is not None else "causal")
    if key in _announced:
        return
    _announced.add(key)
    what = f"sliding window {window}" if window is not None else "full causal"
    detail = ""
    if name == "sdpa" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        detail = f" (sm{major}{minor}: {'cuDNN' if major in (9, 10) else 'flash/efficient'} by SDPA priority)"
    print0(f"[attention] {what}: {name}{detail}" + (" (forced by PICOCHAT_ATTN)" if _forced() else ""))


# ----------------------------------------------------------------------------------------------------------------
# Kernels


def _sdpa(q, k, v, is_causal=False, mask=None, enable_gqa=False, backend: str = "sdpa"):
    """SDPA on (B, T, H, D) inputs; `backend` picks the kernel priority."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kw: dict[str, Any] = dict(attn_mask=mask, is_causal=is_causal)
    if enable_gqa:
        kw["enable_gqa"] = True
    if backend in ("math", "cudnn", "flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = {"math": [SDPBackend.MATH],
                 "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                           SDPBackend.MATH],
                 "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}[backend]
        with sdpa_kernel(order, set_priority=backend != "math"):
            y = F.scaled_dot_product_attention(q, k, v, **kw)
    else:
        y = F.scaled_dot_product_attention(q, k, v, **kw)
    return y.transpose(1, 2)


def window_mask(tq: int, tk: int, q_offset: int, window: int | None, device) -> torch.Tensor:
    """Boolean (tq, tk) mask: query i (absolute position q_offset+i) sees keys j with j <= pos and pos-j < window."""
    qpos = torch.arange(tq, device=device)[:, None] + q_offset
    kpos = torch.arange(tk, device=device)[None, :]
    m = kpos <= qpos
    if window is not None:
        m = m & (qpos - kpos < window)
    return m


def block_mask(seq_len: int, window: int, device: torch.device) -> Any:
    """FlexAttention block mask for causal attention with a sliding window, built once per (T, window, device)."""
    key = (seq_len, window, str(device))
    bm = _block_masks.get(key)
    if bm is None:
        from torch.nn.attention.flex_attention import create_block_mask

        def sliding_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        bm = create_block_mask(sliding_causal, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
        _block_masks[key] = bm
    return bm


def prepare(window_sizes: list[int | None], seq_len: int, device: torch.device) -> None:
    """Call before torch.compile traces a model: decide and announce each layer kind's backend, and build the
    block masks it will need, so the traced graph has no prints, env reads or mask construction in it."""
    for w in sorted(set(window_sizes), key=lambda x: (x is None, x or 0)):
        win = w if (w is not None and w < seq_len) else None
        name = choose(device, win, seq_len)
        _announce(name, win)
        if name == "flex":
            block_mask(seq_len, win if win is not None else seq_len, device)
            _get_flex(device)


def _get_flex(device: torch.device) -> Any:
    global _flex_fn
    if _flex_fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        # compiled on CUDA: eager flex is a slow reference implementation. Inside a compiled model this nests fine.
        _flex_fn = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    return _flex_fn


def _flex(q, k, v, window: int, enable_gqa: bool):
    bm = block_mask(q.shape[1], window, q.device)
    y = _get_flex(q.device)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, enable_gqa=enable_gqa)
    return y.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Entry points used by the model


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Training / full-sequence causal attention, optionally with a sliding window."""
    gqa = k.shape[2] != q.shape[2]
    T = q.shape[1]
    if window is not None and window >= T:
        window = None
    name = choose(q.device, window, T)
    _announce(name, window)
    if window is None:
        if name in ("flex", "mask"):  # forced: still full causal, through the forced kernel family
            if name == "flex":
                return _flex(q, k, v, T, gqa)
            return _sdpa(q, k, v, mask=window_mask(T, T, 0, None, q.device), enable_gqa=gqa)
        return _sdpa(q, k, v, is_causal=True, enable_gqa=gqa, backend=name)
    if name == "flex":
        return _flex(q, k, v, window, gqa)
    return _sdpa(q, k, v, mask=window_mask(T, T, 0, window, q.device), enable_gqa=gqa,
                 backend="math" if name == "math" else "sdpa")


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                     window: int | None = None) -> torch.Tensor:
    """Attention of new queries (absolute positions q_offset..) against the whole cache prefix k/v (inference)."""
    gqa = k.shape[2] != q.shape[2]
    Tq, Tk = q.shape[1], k.shape[1]
    # every key within the window: no mask needed, so a prefill takes the unmasked causal kernel
    if window is not None and window >= Tk:
        window = None
    if q_offset == 0 and Tq == Tk and window is None:
        return _sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == 1 and (window is None or window >= Tk):
        return _sdpa(q, k, v, enable_gqa=gqa)
    return _sdpa(q, k, v, mask=window_mask(Tq, Tk, q_offset, window, q.device), enable_gqa=gqa)


def decode_attention(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor,
                     npre: torch.Tensor, pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """One decode query per row against a prompt cache shared by all rows plus each row's generated cache.

    q (B, Hkv, G, D) (G query heads per KV head); kp/vp (P, Hkv, D): the prompt, valid below `npre`; ks/vs
    (B, S, Hkv, D): generated tokens, index j at absolute position npre + j, valid up to `pos` (the query's
    position, whose k/v is already written). npre/pos are 1-element device tensors so a CUDA graph can replay
    this for any prompt length. On CUDA: the split-KV Triton kernel (picochat.ops.kernels); otherwise (or with
    PICOCHAT_ATTN=math) the SDPA reference below, which says so once on CUDA.
    """
    from picochat.ops import kernels  # lazy: it imports triton (~1 s), used only on CUDA

    forced = _forced()
    if forced != "math" and kernels.supports(q):
        if ("decode", "triton") not in _announced and not torch.compiler.is_compiling():
            _announced.add(("decode", "triton"))
            print0("[attention] decode: Triton split-KV kernel over the shared prompt cache")
        return kernels.decode_attention(q, kp, vp, ks, vs, npre, pos, window)
    if q.is_cuda and ("decode", "sdpa") not in _announced:
        _announced.add(("decode", "sdpa"))
        why = "forced by PICOCHAT_ATTN" if forced == "math" else "triton missing or unsupported head dim/dtype"
        warnings.warn(f"[attention] decode: SDPA reference path ({why}); slower than the Triton kernel")
    return decode_attention_reference(q, kp, vp, ks, vs, npre, pos, window)


def decode_attention_reference(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, ks: torch.Tensor,
                               vs: torch.Tensor, npre: torch.Tensor, pos: torch.Tensor,
                               window: int | None = None) -> torch.Tensor:
    """`decode_attention` with plain SDPA over the prompt broadcast to every row (the definition; CPU path)."""
    B, Hkv, G, D = q.shape
    P, S = kp.shape[0], ks.shape[1]
    k = torch.cat([kp.unsqueeze(0).expand(B, P, Hkv, D), ks], dim=1).transpose(1, 2)
    v = torch.cat([vp.unsqueeze(0).expand(B, P, Hkv, D), vs], dim=1).transpose(1, 2)
    jp = torch.arange(P, device=q.device)
    kpos = torch.cat([jp, npre + torch.arange(S, device=q.device)])
    ok = (kpos <= pos) & torch.cat([jp < npre, torch.ones(S, dtype=torch.bool, device=q.device)])
    if window is not None:
        ok = ok & (pos - kpos < window)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=ok.view(1, 1, 1, -1))


def warn_slow_path(message: str) -> None:
    warnings.warn(f"[attention] {message}", stacklevel=2)
