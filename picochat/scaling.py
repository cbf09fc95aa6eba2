"""The depth dial: every training hyperparameter as a pure function of `depth` (and of the step for schedules).

One knob, as in nanochat (karpathy/nanochat scripts/base_train.py at 92d63d4); each rule cites where it comes from:

| quantity        | rule                                                               | source |
|-----------------|--------------------------------------------------------------------|--------|
| width           | d_model = ceil(64 * depth / head_dim) * head_dim                   | nanochat sweeps: aspect 64, head_dim 128 |
| heads           | n_head = d_model / head_dim                                        | same |
| horizon         | D = ratio * N_scaling, ratio 12                                    | nanochat HEAD (2026-03-24), Kaplan-style N |
| batch (tokens)  | B = 2^round(log2(2^19 * (D / D_ref)^0.383)), D_ref = D(depth 12)   | Power Lines, arXiv 2505.13738 |
| learning rates  | every group x sqrt(B / 2^19) for B >= 2^19, x1 below               | sqrt batch scaling; floor measured |
| Muon WD         | 0.28 * sqrt(B / 2^19) * (D_ref / D), cosine to 0                   | T_epoch framework, arXiv 2405.13698 |
| steps           | D // B                                                             | |
| LR schedule     | linear warmup 40 steps, constant, last 65% linear to 0.05          | nanochat HEAD |
| Muon momentum   | 0.85 -> 0.97 over 400 steps, hold, 0.97 -> 0.90 during warmdown    | nanochat HEAD |

`derive(depth)` returns all of it as one dict (the speedrun's --dry-run prints it).
"""

from __future__ import annotations

import math
from typing import Any

ASPECT_RATIO = 64          # d_model / n_layer
HEAD_DIM = 128
DEFAULT_RATIO = 12.0       # tokens per scaling parameter (nanochat HEAD default since 2026-03-24)
REF_DEPTH = 12             # the depth whose batch is 2^19 tokens
REF_BATCH = 2**19
BATCH_EXPONENT = 0.383     # Power Lines: B_opt ~ D^0.383
MUON_WD_REF = 0.28         # Muon weight decay at the reference depth and batch

# Base learning rates at B = 2^19 and d_model = 768 (nanochat HEAD, scripts/base_train.py).
MATRIX_LR = 0.02
EMBEDDING_LR = 0.3
VALUE_EMBED_LR = 0.15
UNEMBEDDING_LR = 0.008
RESID_LR = 0.005
X0_LR = 0.5
SMEAR_LR = 0.2             # smear gate + smear/backout lambdas; fixed, not batch- or width-scaled (nanochat HEAD)


def model_dims(depth: int, head_dim: int = HEAD_DIM, aspect_ratio: int = ASPECT_RATIO) -> tuple[int, int, int]:
    """(n_layer, d_model, n_head): width = aspect_ratio * depth rounded up to a multiple of head_dim."""
    if depth < 1:
        raise ValueError(f"--depth {depth}: must be >= 1")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"--head-dim {head_dim}: must be an even number >= 2 (RoPE rotates pairs)")
    d_model = math.ceil(aspect_ratio * depth / head_dim) * head_dim
    return depth, d_model, d_model // head_dim


def gpt_config(depth: int, vocab_size: int = 32768, sequence_len: int = 2048, head_dim: int = HEAD_DIM,
               window_pattern: str = "L", value_embeds: bool = True, n_kv_head: int = 0,
               aspect_ratio: int = ASPECT_RATIO, smear: bool = False, backout: bool = False):
    """The GPTConfig of a depth. n_kv_head 0 = as many as query heads (MHA)."""
    from picochat.model import GPTConfig  # lazy: model imports torch (~2 s); scaling stays torch-free

    n_layer, d_model, n_head = model_dims(depth, head_dim, aspect_ratio)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                     n_kv_head=n_kv_head or n_head, n_embd=d_model, window_pattern=window_pattern,
                     value_embeds=value_embeds, smear=smear, backout=backout)


def scaling_params(depth: int, vocab_size: int = 32768, head_dim: int = HEAD_DIM,
                   aspect_ratio: int = ASPECT_RATIO) -> int:
    """Kaplan-style N of a depth: block matrices + lm_head (what the horizon and batch rules are fitted on)."""
    from picochat.model import num_scaling_params  # lazy: model imports torch (~2 s); scaling stays torch-free

    return num_scaling_params(gpt_config(depth, vocab_size, head_dim=head_dim, aspect_ratio=aspect_ratio))


def target_tokens(n_scaling: int, ratio: float = DEFAULT_RATIO) -> int:
    return int(ratio * n_scaling)


def batch_size_tokens(tokens: float, ref_tokens: float) -> int:
    """Power Lines (arXiv 2505.13738): the optimal batch grows as D^0.383; anchored at 2^19 tokens for D_ref."""
    return 2 ** round(math.log2(REF_BATCH * (tokens / ref_tokens) ** BATCH_EXPONENT))


def lr_scale(batch_tokens: int) -> float:
    """Square-root scaling of every learning rate with the batch above 2^19 tokens; below it the LRs stay at their
    2^19 values. Why the floor (measured, d12 at 2^18 tokens x 150 steps, val bpb at step 150, four paired runs on
    one H100): scale 1.0 beat sqrt's 0.707 every time, by 0.007 to 0.04 bpb (1.457 vs 1.466 with the default model;
    README "Performance")."""
    return math.sqrt(max(batch_tokens, REF_BATCH) / REF_BATCH)


def width_scale(d_model: int) -> float:
    """AdamW LRs of embeddings/lm_head scale as 1/sqrt(d_model / 768) (muP-style, nanochat)."""
    return (d_model / 768) ** -0.5


def muon_weight_decay(batch_tokens: int, tokens: float, ref_tokens: float) -> float:
    """T_epoch rule (arXiv 2405.13698): keep lr*wd*steps constant: 0.28 * sqrt(B/2^19) * D_ref / D."""
    return MUON_WD_REF * math.sqrt(batch_tokens / REF_BATCH) * (ref_tokens / tokens)


def num_steps(tokens: float, batch_tokens: int) -> int:
    return max(1, int(tokens // batch_tokens))


def device_batch_size(depth: int, sequence_len: int = 2048, gpu_memory_gb: float = 80.0, fp8: bool = False) -> int:
    """Default micro-batch rows per GPU: 64K tokens per micro-step up to d16, 32K up to d24, 16K beyond, halved per
    halving of memory. Measured on one 80 GB H100 in bf16: d12 x 32 rows = 30.9 GB, d20 x 16 = 46.0 GB, d20 x 32 =
    OOM. With fp8 (which saves fp8 copies of the matmul inputs) twice the rows up to d20, measured on one H200
    (ea778e5, default configs, same machine for d12): d12 x 64 44.4 GB and +1.4% tok/s against x 32 (571.7K vs
    564.0K); d20 x 32 58.5 GB, 186.5K tok/s (x 16: 182.8-185.3K on two other machines). Deeper: not measured."""
    tokens = 65536 if depth <= 16 else (32768 if depth <= 24 else 16384)
    if fp8 and depth <= 20:
        tokens *= 2
    tokens = int(tokens * min(1.0, gpu_memory_gb / 80.0))
    return max(1, tokens // sequence_len)


# ----------------------------------------------------------------------------------------------------------------
# Memory model: estimated peak training memory per GPU (the default micro-batch's fit check, `picochat doctor`)

# Activation bytes per token, layer and model dim, and logit bytes per token and vocab entry, over the static weights,
# grads and optimizer state. Calibrated on one 80 GB H100 in bf16 (commit 41dd2a7): d12 x 32 rows peaked at 30.9 GB,
# d20 x 16 at 46.0 GB, d20 x 32 ran out of memory. An estimate: on out-of-memory, halve the micro-batch.
ACT_BYTES_PER_TOKEN_LAYER_DIM = 42
LOGIT_BYTES_PER_TOKEN_VOCAB = 6
# With fp8 block matmuls (and the fused chunked loss, so no full logits), on one H200 (commit ea778e5): d12 x 32 / x 64
# rows 24.8 / 44.4 GB, d20 x 16 / x 32 35.8 / 58.5 GB, i.e. 26-33 bytes per token, layer and model dim; 36 keeps a
# margin.
ACT_BYTES_FP8 = 36
USABLE_MEMORY_FRACTION = 0.92  # of the GPU's total memory: the CUDA context, allocator slack and fragmentation


def approx_params(depth: int, vocab_size: int = 32768) -> int:
    """Closed-form total parameters of the depth-d model for the memory model: width 64 * depth rounded up to 128,
    12 d^2 per block, embedding + lm_head, value embeddings on every other layer (norms and gates left out)."""
    dim = max(128, (64 * depth + 127) // 128 * 128)
    return 12 * depth * dim * dim + 2 * vocab_size * dim + (depth // 2) * vocab_size * dim


def estimate_memory(depth: int, batch: int, world_size: int = 1, seq_len: int = 2048,
                    vocab_size: int = 32768, fp8: bool = False) -> float:
    """Estimated peak training memory in bytes per GPU for a micro-batch of `batch` sequences: fp32 weights and
    grads, Muon/AdamW state sharded over `world_size` ranks, and activations (`fp8`: with fp8 block matmuls,
    `picochat/ops/fp8.py`)."""
    dim = max(128, (64 * depth + 127) // 128 * 128)
    static = approx_params(depth, vocab_size) * (8 + 8 / max(1, world_size))
    tokens = batch * seq_len
    if fp8:
        return static + tokens * depth * dim * ACT_BYTES_FP8
    return static + tokens * (depth * dim * ACT_BYTES_PER_TOKEN_LAYER_DIM + vocab_size * LOGIT_BYTES_PER_TOKEN_VOCAB)


def recommend_batch(memory_bytes: float, depth: int, world_size: int = 1, seq_len: int = 2048,
                    fp8: bool = False) -> int:
    """Largest power-of-two micro-batch (1..64 rows) whose estimate fits in `memory_bytes`; 0 when even 1 does not."""
    best = 0
    for b in (1, 2, 4, 8, 16, 32, 64):
        if estimate_memory(depth, b, world_size, seq_len, fp8=fp8) <= memory_bytes * USABLE_MEMORY_FRACTION:
            best = b
    return best


# ----------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step


def lr_multiplier(step: int, total: int, warmup: int = 40, warmdown_frac: float = 0.65,
                  final_frac: float = 0.05) -> float:
    """Linear warmup over `warmup` steps, constant, then linear warmdown over the last `warmdown_frac` of training
    to `final_frac`. Step is 0-based; the multiplier is for the update made at that step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    warmdown = int(round(warmdown_frac * total))
    start = total - warmdown
    if warmdown <= 0 or step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / warmdown)
    return 1.0 + (final_frac - 1.0) * progress


def muon_momentum(step: int, total: int, warmdown_frac: float = 0.65, start: float = 0.85, peak: float = 0.97,
                  end: float = 0.90, ramp_steps: int = 400) -> float:
    """0.85 -> 0.97 linearly over the first `ramp_steps`, hold, then 0.97 -> 0.90 during the LR warmdown."""
    m = start + (peak - start) * min(1.0, step / ramp_steps) if ramp_steps > 0 else peak
    warmdown = int(round(warmdown_frac * total))
    wd_start = total - warmdown
    if warmdown > 0 and step >= wd_start:
        progress = min(1.0, (step - wd_start + 1) / warmdown)
        m = min(m, peak) + (end - min(m, peak)) * progress
    return m


def weight_decay_multiplier(step: int, total: int) -> float:
    """Cosine from 1 at step 0 to 0 at the last step (nanochat HEAD schedules Muon WD this way)."""
    if total <= 1:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / (total - 1))))


# ----------------------------------------------------------------------------------------------------------------
# Everything at once


def derive(depth: int, vocab_size: int = 32768, sequence_len: int = 2048, ratio: float = DEFAULT_RATIO,
           head_dim: int = HEAD_DIM, window_pattern: str = "L", value_embeds: bool = True,
           total_batch_size: int = 0, num_iterations: int = 0, aspect_ratio: int = ASPECT_RATIO,
           seq_len: int | None = None, smear: bool = False, backout: bool = False) -> dict[str, Any]:
    """All derived quantities of a depth (plain JSON types). total_batch_size / num_iterations override the rules
    (0 = derive). The reference horizon D_ref always uses depth 12 at the same vocab, ratio and head_dim.
    `seq_len` is an alias of `sequence_len` (the CLI's name)."""
    if seq_len is not None:
        sequence_len = seq_len
    # lazy: torch and the model (which imports torch) cost ~2 s of import; scaling stays torch-free
    import torch

    from picochat.model import GPT, flops_per_token, num_scaling_params

    cfg = gpt_config(depth, vocab_size, sequence_len, head_dim, window_pattern, value_embeds,
                     aspect_ratio=aspect_ratio, smear=smear, backout=backout)
    n_scaling = num_scaling_params(cfg)
    ref = gpt_config(REF_DEPTH, vocab_size, sequence_len, head_dim, window_pattern, value_embeds,
                     aspect_ratio=aspect_ratio)
    ref_tokens = target_tokens(num_scaling_params(ref), ratio)
    tokens = target_tokens(n_scaling, ratio)
    batch = total_batch_size or batch_size_tokens(tokens, ref_tokens)
    steps = num_iterations or num_steps(tokens, batch)
    with torch.device("meta"):  # count parameters without allocating them
        total_params = GPT(cfg).num_params()
    fpt = flops_per_token(cfg)
    return {
        "depth": depth, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
        "n_kv_head": cfg.n_kv_head, "head_dim": cfg.head_dim, "vocab_size": vocab_size,
        "sequence_len": sequence_len, "window_pattern": window_pattern, "value_embeds": value_embeds,
        "params_total": total_params, "params_scaling": n_scaling, "ratio": ratio,
        "tokens": steps * batch, "tokens_target": tokens, "total_batch_size": batch, "num_iterations": steps,
        "flops_per_token": fpt, "train_flops": fpt * steps * batch,
        "lr_scale": lr_scale(batch), "width_scale": width_scale(cfg.n_embd),
        # T_epoch uses the *target* horizon D = ratio * N (a --num-iterations override does not rescale WD,
        # as in nanochat): short experiments at a depth keep that depth's decay.
        "muon_weight_decay": muon_weight_decay(batch, tokens, ref_tokens),
        "device_batch_size": device_batch_size(depth, sequence_len),
    }


# ----------------------------------------------------------------------------------------------------------------
# Chat-stage schedules (midtrain, SFT, RL): pure functions of the step


def warmdown_multiplier(progress: float, warmdown_frac: float) -> float:
    """1.0, then linear to 0 over the last `warmdown_frac` of training (progress in [0, 1])."""
    if warmdown_frac <= 0 or progress < 1.0 - warmdown_frac:
        return 1.0
    return max(0.0, (1.0 - progress) / warmdown_frac)


def chat_lr_multiplier(step: int, total: int, warmdown_frac: float) -> float:
    """Midtraining and SFT: constant, then linear to 0 over the last `warmdown_frac` (nanochat: 0.2 for
    midtraining, 0.5 for SFT). Step is 0-based; the multiplier is for the update made at that step."""
    return warmdown_multiplier(step / total, warmdown_frac)


def rl_lr_multiplier(step: int, total: int) -> float:
    """RL: linear decay from 1 at the first step towards 0 at the last (nanochat's chat_rl)."""
    return 1.0 - step / total
