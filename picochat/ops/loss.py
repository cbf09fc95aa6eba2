"""The training loss: lm_head + logit softcap + cross-entropy in row chunks, gradients made in the forward.

`model.GPT.forward` calls `fused_linear_cross_entropy` for a scalar training loss (a model built with
`fused_loss=False`, PICOCHAT_FUSED_LOSS=0, uses plain logits + F.cross_entropy; the two agree, tested). An optional
`quantize` callable, handed over by a low-precision transform, makes the logits GEMM a scaled one; this module knows
no particular format. Each chunk's epilogue is the custom op `picochat::softcap_ce`: one Triton kernel on CUDA
(`kernels.softcap_ce`), the torch definition elsewhere, so the model itself stays unaware of where it runs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _softcap_ce_torch(z: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of `softcap_ce` (and its CPU path): per-row loss (fp32) and d loss_row / d z in z's dtype."""
    t = torch.tanh(z.float() / softcap)
    c = softcap * t
    valid = targets != -1
    tc = targets.clamp_min(0).unsqueeze(1)
    loss = torch.where(valid, torch.logsumexp(c, dim=-1) - c.gather(1, tc).squeeze(1), 0.0)
    # d loss_i / d c = softmax(c_i) - onehot(t_i) on valid rows; through the softcap: * (1 - tanh^2)
    g = torch.softmax(c, dim=-1)
    g.scatter_add_(1, tc, torch.full_like(loss, -1.0).unsqueeze(1))
    g = g * (1.0 - t * t) * valid.unsqueeze(1).to(g.dtype)
    return loss, g.to(z.dtype)


@torch.library.custom_op("picochat::softcap_ce", mutates_args=())
def softcap_ce(z: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row softcapped cross-entropy and its gradient for logits z (N, V): one Triton kernel on CUDA
    (`kernels.softcap_ce`; PICOCHAT_CE_KERNEL=0 turns it off), `_softcap_ce_torch` elsewhere. A custom op, so
    torch.compile calls it as one opaque node instead of tracing into it."""
    if z.is_cuda and 0.0 < softcap <= 60.0 and os.environ.get("PICOCHAT_CE_KERNEL", "1") != "0":
        if _HAS_TRITON:
            from picochat.ops import kernels  # lazy: it imports triton (~1 s), used only on CUDA

            return kernels.softcap_ce(z, targets, softcap)
        _warn_no_triton()
    return _softcap_ce_torch(z, targets, softcap)


@functools.cache
def _warn_no_triton() -> None:  # cached: warns once per process
    warnings.warn("[loss] triton is not installed: the training loss runs its softcapped cross-entropy as eager "
                  "torch ops instead of one kernel, several times slower (the kernel saved ~25 ms per 131K-token "
                  "d12 step on an H200); pip install triton, or PICOCHAT_CE_KERNEL=0 to silence this")


@softcap_ce.register_fake
def _(z: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    return z.new_empty(z.shape[0], dtype=torch.float32), torch.empty_like(z)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32: one cuBLAS call for bf16/fp16 inputs on CUDA (torch >= 2.8's
    out_dtype), else the product cast up."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: no out_dtype
            pass
    return (a @ b).float()


class _FusedLinearCE(torch.autograd.Function):
    """loss = CE(softcap(x @ W[:V].T), targets), computed in row chunks; the gradients are made in the forward.

    Why: the (B*T, V) fp32 logits and their gradient are the largest tensors of a training step (8.6 GB each at
    d20, micro-batch 32 x 2048, V = 32K). Computing each chunk's logits, loss and d(loss)/d(logits) at once and
    folding them into dx and dW right away keeps only one chunk alive, with the same matmul FLOPs as autograd. The
    chunk's epilogue (softcap, logsumexp, softmax gradient) is one kernel on CUDA (`softcap_ce`): compiled from
    torch ops it was ~10 elementwise passes over fp32 logits, 35 ms of a 265 ms d12 step (H200 profile, README).
    The backward then only scales the stored gradients by the incoming (scalar) gradient. Only for a scalar loss
    (reduction mean/sum); per-token losses use the plain path.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, softcap: float, reduction: str, chunk: int,
                quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None):
        w = weight[:vocab_size].to(x.dtype)
        n = x.shape[0]
        scaled = quantize is not None and x.shape[1] % 16 == 0 and vocab_size % 16 == 0  # the scaled GEMM's shapes
        if scaled:  # logits only; both gradient products below stay in the compute dtype
            xq, xs = quantize(x)
            wq, ws = quantize(weight[:vocab_size])
        count = (targets != -1).sum()
        dx = torch.empty_like(x)
        dw = None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            xc = x[lo:hi]
            if scaled and (hi - lo) % 16 == 0:
                z = torch._scaled_mm(xq[lo:hi], wq.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype)
            else:
                z = xc @ w.t()
            loss_rows, g = softcap_ce(z, targets[lo:hi], softcap)
            total = total + loss_rows.sum()
            dx[lo:hi] = g @ w
            part = _mm_f32(g.t(), xc)
            dw = part if dw is None else dw + part
        if weight.shape[0] > vocab_size:  # the padded vocab rows get no gradient
            dw = torch.nn.functional.pad(dw, (0, 0, 0, weight.shape[0] - vocab_size))
        scale = 1.0 / count.to(torch.float32) if reduction == "mean" else torch.ones((), device=x.device)
        ctx.save_for_backward(dx, dw, scale)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw, scale = ctx.saved_tensors
        s = grad_out * scale
        return (dx * s.to(dx.dtype)), (dw * s).to(dw.dtype), None, None, None, None, None, None


def default_chunk_logits(device: torch.device) -> int:
    """Logits per chunk. CUDA: 2^29 (1 GB of bf16 logits plus 1 GB of their gradient alive at once); each chunk
    adds its (V, d) fp32 weight gradient into the running sum, so fewer chunks mean fewer passes over it: 16K rows
    instead of 4K measured +0.7% tok/s for the whole d12 default step (546.6K against 543.0K, one H200, same
    machine) for +0.75 GB peak. Elsewhere 2^27: the CPU path keeps several fp32 copies of a chunk."""
    return 1 << 29 if device.type == "cuda" else 1 << 27


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                               softcap: float, reduction: str = "mean", chunk: int = 0,
                               quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
                               ) -> torch.Tensor:
    """x (N, d) in compute dtype, weight (V_padded, d) fp32 master, targets (N,) with -1 = ignore.

    quantize: None, or a tensor -> (low-precision tensor, fp32 dequantisation scale) map (the fp8 transform hands
    its e4m3 one over as `model.logits_quantizer`); then the logits come from a scaled GEMM (`torch._scaled_mm`) of
    the quantized x and W, while the gradients do not."""
    if chunk <= 0:  # at least 1024 rows
        chunk = max(1024, default_chunk_logits(x.device) // max(1, vocab_size))
    return _FusedLinearCE.apply(x, weight, targets, vocab_size, softcap, reduction, chunk, quantize)
