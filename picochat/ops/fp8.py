"""fp8 training matmuls for the transformer blocks, applied from outside the model (`convert(model)`).

Each converted Linear computes y = x W^T with both operands cast to float8 e4m3 under one dynamic scale per tensor
("tensorwise": amax / 448), and in backward casts the incoming gradient to e5m2 (wider range, amax / 57344) for
dx = dy W and dW = dy^T x. The products run on the fp8 tensor cores through `torch._scaled_mm` and accumulate in
fp32. Why tensorwise: nanochat measured it +17% tok/s at d26 on 8xH100 against bf16, and rowwise scaling a loss
(with its own Float8Linear, karpathy/nanochat e569b59); modded-nanogpt runs its MLP in fp8 too. Measured here on one H200 (README
"Performance"): a whole d20 step is 15% faster (181.1K tok/s, 59.4% bf16-equivalent MFU, against 157.6K) and needs
21% less memory (35.0 GB against 44.4). At d12 all six matmuls in fp8 are *slower* (1.5%, 527.8K against 535.6K on
one machine: the 768-wide attention projections are too small for their casts to pay, as nanochat also found at
d12), but the MLP alone in fp8 is faster: 562.1K against 543.0K in bf16 (+3.5%, same machine, the default d12
config of 8 micro-batches x 32 rows) with 24.0 GB peak against 29.8. Hence `scope`. Why the 1.6-1.8x faster GEMMs
give only 15%: the compiled kernels that compute amax reductions, casts and transposes take ~6.5 of the 43.8 ms of
kernel time of a 4-layer d20-width step (several of them also do norm or ReLU^2 work the bf16 step has too), and the
lm_head, attention and the other elementwise work stay as they were. Tried and dropped (d20 width, 4 layers, fwd+bwd
of 32K tokens): q, k, v as one fp8 matmul over the concatenated weights (x cast once) was 3% *slower* (46.1 ms
against 44.8) than three; fp8 in the MLP only was the same speed (44.7) as all six; bf16 was 48.4. A Triton
transpose for the dW operands (3.6 TB/s alone, 10x torch's copy) left the 4-layer step the same (45.5 ms against
45.0): the compiler's fused cast-and-transpose kernels were not the waste they looked like in the profile. The
forward saves the fp8 copy of x for backward, half the bytes of the bf16 activation (so fp8 runs default to twice
the micro-batch rows, `scaling.device_batch_size`). Delayed scaling (each cast using the previous call's amax, so
no amax pass has to finish before a cast) was measured and dropped: +0.3% for the whole step at d12 (573.2K against
571.7K tok/s) and at d20 (183.4K against 182.8K), same machine each; the compiler already fuses the amax reductions
into the producers' passes.

The lm_head's logits in the training loss are an fp8 GEMM too (the chunked fused loss, `loss.py`; its gradient
products stay bf16, as do eval and sampling logits): +1.3% tok/s for the whole d12 default step (569.5K against
562.4K, same machine) at the same quality (below).

Default: on for d12+ on Hopper/Blackwell when compiled (`resolve`), off elsewhere; `--fp8` / `--no-fp8` decide
explicitly. Either way `scope(depth)` picks the matmuls: the MLP below d20, all six block projections from d20.
Quality per token, measured on the issue's d12 benchmark (150 x 262,144 tokens, val shard, seed 1337, H200): val
bpb at step 150 1.4567 with the MLP in fp8, 1.4569 with the MLP and the lm_head logits, 1.4572 with all six, 1.4565
in bf16 (seed-to-seed spread in bf16: 1.444-1.457).

What stays in bf16/fp32: the lm_head's gradients, embeddings, the small gates, the attention projections below d20
(`scope`), and any Linear whose dimensions are not multiples of 16 (the fp8 GEMM's constraint). Parameters stay
fp32 master weights, so checkpoints are the same as without fp8 and later stages load them as usual. Needs an fp8
tensor-core GPU (sm_89+: RTX 4090, H100, B200) for speed; `torch._scaled_mm` also runs on CPU, which the tests use.
"""

from __future__ import annotations

import torch

from picochat.model import GPT, Linear

E4M3, E4M3_MAX = torch.float8_e4m3fn, 448.0
E5M2, E5M2_MAX = torch.float8_e5m2, 57344.0


def quantize(x: torch.Tensor, dtype: torch.dtype, fmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (fp8 tensor, fp32 dequantisation scale) with x ~= q * scale; one scale for the whole tensor."""
    amax = x.detach().abs().amax().float().clamp_min(1e-12)
    q = (x.float() * (fmax / amax)).clamp(-fmax, fmax).to(dtype)
    return q, amax / fmax


def quantize_logits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The e4m3 cast of both operands of the training loss's logits GEMM; `convert` hands it to the loss as
    `model.logits_quantizer`."""
    return quantize(x, E4M3, E4M3_MAX)


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major (the layout `_scaled_mm` wants for its second operand)."""
    return t.t().contiguous().t()


class _Fp8Matmul(torch.autograd.Function):
    """x (M, K) in the compute dtype, w (N, K) fp32 master weight -> x @ w^T in x's dtype; fp8 both ways."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize(x, E4M3, E4M3_MAX)
        wq, ws = quantize(w, E4M3, E4M3_MAX)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.out_dtype = x.dtype
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xq, xs, wq, ws = ctx.saved_tensors
        gq, gs = quantize(dy, E5M2, E5M2_MAX)
        dx = torch._scaled_mm(gq, _col_major(wq), scale_a=gs, scale_b=ws, out_dtype=ctx.out_dtype)
        dw = torch._scaled_mm(gq.t().contiguous(), _col_major(xq), scale_a=gs, scale_b=xs, out_dtype=torch.float32)
        return dx, dw


class Float8Linear(Linear):
    """A `model.Linear` whose matmul runs in fp8 (same parameters and state_dict; see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] % 16:  # the fp8 GEMM needs every dimension divisible by 16 (e.g. single-token decoding)
            return super().forward(x)
        return _Fp8Matmul.apply(x2, self.weight).view(*shape[:-1], self.out_features)


def eligible(lin: torch.nn.Module) -> bool:
    return type(lin) is Linear and lin.in_features % 16 == 0 and lin.out_features % 16 == 0


SCOPES = ("mlp", "all")
FP8_MIN_DEPTH = 12  # the default turns fp8 on from here (for the MLP; see `scope`)
FP8_ALL_DEPTH = 20  # and for the attention projections too from here


def scope(depth: int) -> str:
    """Which block matmuls run in fp8 at this depth: "mlp" (c_fc, c_proj of the MLP) below d20, "all" six from d20.
    Measured on one H200 (README "Performance"): at d12 fp8 in the MLP only is +3.5% tok/s over bf16 (562.1K
    against 543.0K, same machine) while all six is 1.5% *slower* (the 768-wide attention projections are too small
    for their casts to pay); at d20 width the two were the same speed (44.7 against 44.8 ms per 4-layer step) and the
    full d20 default was measured with all six."""
    return "all" if depth >= FP8_ALL_DEPTH else "mlp"


def convert(model: GPT, which: str = "all") -> int:
    """Switch block projections of `model` to fp8 in place: `which` = "all" (attention q/k/v/out and MLP in/out) or
    "mlp" (MLP in/out only), plus the lm_head's logits in the fused training loss (`loss.py`; its two gradient
    products stay in the compute dtype, and plain lm_head calls, as in eval and sampling, too). Returns how many
    matmuls were switched. Embeddings and gates are left alone."""
    if which not in SCOPES:
        raise ValueError(f"fp8 scope {which!r}: use one of {SCOPES}")
    n = 0
    for block in model.blocks:
        lins = [block.mlp.c_fc, block.mlp.c_proj]
        if which == "all":
            lins += [block.attn.c_q, block.attn.c_k, block.attn.c_v, block.attn.c_proj]
        for lin in lins:
            if eligible(lin):
                lin.__class__ = Float8Linear
                n += 1
    model.logits_quantizer = quantize_logits
    return n + 1


def pays_off(capability: tuple[int, int], depth: int) -> bool:
    """Whether fp8 is the default: datacenter/consumer Hopper or Blackwell (sm_90, sm_100, sm_120) and a model wide
    enough for the faster GEMMs to outweigh the casts (d12+ with `scope`'s split: README "Performance"; nanochat:
    +17% at d26). Below d12 nothing is measured, so fp8 stays opt-in there, as on Ada (sm_89)."""
    return capability[0] in (9, 10, 12) and depth >= FP8_MIN_DEPTH


def resolve(flag: bool | None, depth: int, device: torch.device, compiled: bool) -> bool:
    """--fp8 / --no-fp8 / neither: explicit wins (an fp8 request on a GPU without fp8 cores is refused by the
    caller); by default fp8 is on where `pays_off` and the model is compiled (eager casts cost more than they
    save)."""
    if flag is not None:
        return flag
    if device.type != "cuda" or not compiled or not supported(device)[0]:
        return False
    return pays_off(torch.cuda.get_device_capability(device), depth)


def supported(device: torch.device) -> tuple[bool, str]:
    """(ok, why not): fp8 tensor cores are sm_89+ (Ada, Hopper, Blackwell)."""
    if device.type != "cuda":
        return False, f"device {device.type} has no fp8 tensor cores"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; fp8 needs sm_89 or newer"
    return True, ""
