"""Rotary position embeddings (RoPE) and the QK-norm that follows them: y = rms_norm(rope(x)) for q and k.

`rope_norm` is what the model calls. In training on CUDA it is one Triton kernel each way (`kernels.rope_norm_fwd`
/ `rope_norm_bwd`, as the custom ops `picochat::rope_norm` and `picochat::rope_norm_backward`, so torch.compile
calls them as opaque nodes); everywhere else, and with PICOCHAT_ROPE_KERNEL=0, the torch ops below.

Why: compiled from torch ops, RoPE + QK-norm of q and k were four kernels per layer, 1.34 ms per layer of the
131K-token d12 micro-batch (64 x 2048) on an H200: 64 ms of an 872 ms step, 7% (profile of
`picochat bench pretrain --depth 12 --steps 3 --warmup 2 --total-batch-size 0 --profile 80`). The two kernels
here, in a profile of the new code (same command), take 0.10 ms (forward) and 0.14 ms (backward) per tensor, 0.48 ms
per layer for q and k, at ~4 TB/s. End to end (95ef36b, one H200, same machine, against PICOCHAT_ROPE_KERNEL=0):
d12 610.5K against 588.8K tok/s (+3.7%), d20 197.6K against 190.9K (+3.5%), and peak memory 4.5 / 6.3 GB lower.
The backward works from the saved output y and the per-row rstd
(dr = rstd * (dy - y * mean(dy * y)), then the inverse rotation), so it keeps nothing that attention does not
keep already.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (1, T, 1, D/2). Rotates (first half, second half) pairs."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def rope_norm_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The definition: RMSNorm (no weight, eps = the dtype's epsilon, as F.rms_norm's default) of rope(x)."""
    y = apply_rotary(x, cos, sin)
    return F.rms_norm(y, (y.size(-1),))


@torch.library.custom_op("picochat::rope_norm", mutates_args=())
def _rope_norm_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    from picochat.ops import kernels  # lazy: it imports triton (~1 s), used only on CUDA

    return kernels.rope_norm_fwd(x, cos, sin, eps)


@_rope_norm_op.register_fake
def _(x, cos, sin, eps):
    B, T, H, D = x.shape
    return x.new_empty(B, T, H, D), x.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("picochat::rope_norm_backward", mutates_args=())
def _rope_norm_backward_op(dy: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> torch.Tensor:
    from picochat.ops import kernels  # lazy: it imports triton (~1 s), used only on CUDA

    return kernels.rope_norm_bwd(dy, y, rstd, cos, sin)


@_rope_norm_backward_op.register_fake
def _(dy, y, rstd, cos, sin):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output) -> None:
    _, cos, sin, _ = inputs
    y, rstd = output
    ctx.save_for_backward(y, rstd, cos, sin)


def _backward(ctx, dy, drstd):
    y, rstd, cos, sin = ctx.saved_tensors
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    return _rope_norm_backward_op(dy, y, rstd, cos, sin), None, None, None


_rope_norm_op.register_autograd(_backward, setup_context=_setup_context)


def fused_available(x: torch.Tensor) -> bool:
    """Whether `rope_norm` takes the kernel path for x (CUDA, Triton, not turned off by PICOCHAT_ROPE_KERNEL=0)."""
    if not x.is_cuda or os.environ.get("PICOCHAT_ROPE_KERNEL", "1") == "0":
        return False
    if not _HAS_TRITON:
        _warn_no_triton()
        return False
    return True


@functools.cache
def _warn_no_triton() -> None:  # cached: warns once per process
    warnings.warn("[rope] triton is not installed: RoPE + QK-norm run as torch ops instead of one kernel each "
                  "way (~0.9 ms more per layer of a d12 micro-batch on an H200); pip install triton, or "
                  "PICOCHAT_ROPE_KERNEL=0 to silence this")


def rope_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rms_norm(rope(x)) for x (B, T, H, D) and cos/sin (1, T, 1, D/2) in x's dtype. The fused kernels serve
    training (grad enabled) on CUDA; inference and other devices use the torch ops, whose numerics the decode
    kernels and KV-cache tests are pinned to."""
    if torch.is_grad_enabled() and x.requires_grad and fused_available(x):
        T, half = x.shape[1], x.shape[-1] // 2
        y, _ = _rope_norm_op(x, cos.reshape(T, half).contiguous(), sin.reshape(T, half).contiguous(),
                             torch.finfo(x.dtype).eps)
        return y
    return rope_norm_torch(x, cos, sin)
