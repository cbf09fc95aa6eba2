"""The attention shim: one place decides which kernel runs causal attention, and says so.

Layout everywhere is (B, T, H, D). Backends:
- "sdpa": torch SDPA. On CUDA the cuDNN backend is preferred for full causal attention (measured on H100 here:
  ~430 TFLOP/s fwd+bwd vs ~230 for the FA2 backend); on CPU/MPS it is the math/efficient kernel.
- sliding windows: an explicit boolean mask with SDPA (correct everywhere, the fallback).
PICOCHAT_ATTN=sdpa|math forces a choice (tests use it to compare paths numerically).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

_announced = False


def backend_name(device: torch.device | None = None) -> str:
    forced = os.environ.get("PICOCHAT_ATTN")
    if forced:
        return forced
    if device is not None and device.type == "cuda":
        return "sdpa-cudnn"
    return "sdpa"


def _announce(device: torch.device) -> None:
    global _announced
    if not _announced:
        _announced = True
        from picochat.runtime import print0

        print0(f"[attention] backend: {backend_name(device)}")


def _sdpa(q, k, v, is_causal=False, mask=None, enable_gqa=False):
    # (B, T, H, D) -> (B, H, T, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kw = dict(attn_mask=mask, is_causal=is_causal)
    if enable_gqa:
        kw["enable_gqa"] = True
    if os.environ.get("PICOCHAT_ATTN") == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            y = F.scaled_dot_product_attention(q, k, v, **kw)
    elif q.device.type == "cuda" and mask is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH], set_priority=True):
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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Training / full-sequence causal attention, optionally with a sliding window."""
    _announce(q.device)
    gqa = k.shape[2] != q.shape[2]
    T = q.shape[1]
    if window is None or window >= T:
        return _sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    return _sdpa(q, k, v, mask=window_mask(T, T, 0, window, q.device), enable_gqa=gqa)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                     window: int | None = None) -> torch.Tensor:
    """Attention of new queries (absolute positions q_offset..) against the whole cache prefix k/v."""
    gqa = k.shape[2] != q.shape[2]
    Tq, Tk = q.shape[1], k.shape[1]
    if q_offset == 0 and Tq == Tk and window is None:
        return _sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == 1 and (window is None or window >= Tk):
        return _sdpa(q, k, v, enable_gqa=gqa)
    return _sdpa(q, k, v, mask=window_mask(Tq, Tk, q_offset, window, q.device), enable_gqa=gqa)


def warn_slow_path(message: str) -> None:
    warnings.warn(f"[attention] {message}", stacklevel=2)
