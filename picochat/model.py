"""The GPT: a small decoder-only transformer. It does not know where it runs.

Architecture (each choice measured by nanochat/modded-nanogpt; see README "Model"):
- token embedding -> RMSNorm -> n_layer x [pre-norm attention, pre-norm ReLU^2 MLP] -> RMSNorm -> untied lm_head
- RoPE (base 100k), QK-norm, parameter-free RMSNorm, no biases, optional GQA, optional sliding windows per layer
- value embeddings on alternating layers (ResFormer, arXiv 2410.17897) and per-layer residual scalars
- optional smear (gated previous-token embedding) and backout (subtract part of the mid-depth residual)
- logits soft-capped at 15 in fp32; vocab padded to a multiple of 64 (tensor cores, sharded optimizers)

Build it on the meta device, move it with `to_empty`, then call `init_weights()`: `__init__` values are not the init.
Compile, dtype policy, low-precision matmuls and distribution are applied from outside (`training.prepare_model`,
`engine.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.config import from_dict, require
from picochat.ops import attention
from picochat.ops.loss import fused_linear_cross_entropy
from picochat.ops.rope import apply_rotary, rope_norm  # noqa: F401 (apply_rotary: engine imports it from here)


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"   # tiled over layers; S = short window, L = full context; the last layer is always L
    value_embeds: bool = True   # ResFormer value embeddings on alternating layers
    softcap: float = 15.0
    rope_base: float = 100_000.0
    # nanochat HEAD (smear and backout in nanochat/gpt.py): both measured as val-loss gains there
    smear: bool = False         # x_t += lambda * sigmoid(W_s x_t[:24]) * x_{t-1} on the normed embeddings
    backout: bool = False       # before the final norm: x -= lambda * (residual after block n_layer // 2)
    ve_gate_scale: float = 2.0  # value-embedding gate = scale * sigmoid(W_g x[:12]); nanochat HEAD uses 3

    @classmethod
    def from_saved(cls, d: dict) -> "GPTConfig":
        """Rebuild a saved config (checkpoint meta). A feature flag missing from it predates the feature, so it is
        off whatever today's default is; other missing keys take the defaults, unknown keys are ignored."""
        return from_dict(cls, {"smear": False, "backout": False, **d})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return ((self.vocab_size + 63) // 64) * 64

    def validate(self) -> None:
        require(self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        require(self.n_head % self.n_kv_head == 0,
                f"n_head {self.n_head} must be divisible by n_kv_head {self.n_kv_head} (GQA groups)")
        require(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        require(set(self.window_pattern.upper()) <= {"S", "L"} and self.window_pattern != "",
                f"window_pattern {self.window_pattern!r}: use letters S (short window) and L (long)")

    def window_sizes(self) -> list[int | None]:
        """Per-layer attention window (None = full causal). S is a quarter of the context, rounded up to 128."""
        short = max(128, math.ceil(self.sequence_len / 4 / 128) * 128)
        short = min(short, self.sequence_len)
        pat = self.window_pattern.upper()
        out: list[int | None] = [short if pat[i % len(pat)] == "S" else None for i in range(self.n_layer)]
        out[-1] = None
        return [None if (w is not None and w >= self.sequence_len) else w for w in out]

    def has_value_embed(self, layer: int) -> bool:
        # alternating layers, always including the last one
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2


SMEAR_CHANNELS = 24  # the smear gate reads this many leading channels of the current token's normed embedding


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """Bias-free Linear whose fp32 master weight is cast to the activation dtype in forward (no autocast)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:  # GPT.init_weights is the init; skipping torch's saves work on meta builds
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Embedding(nn.Embedding):
    """nn.Embedding without torch's own init (GPT.init_weights does it; on the meta device torch's normal_ would
    pull in the whole compiler stack just to do nothing)."""

    def reset_parameters(self) -> None:
        pass


class KVCache:
    """Static preallocated cache: k/v of shape (n_layer, B, max_len, n_kv_head, head_dim); rows share a position.

    `pos` is the number of tokens already in the cache. Layers insert as the forward pass goes; the model advances
    `pos` after the last layer. `prev_embed` (B, n_embd) is the normed, pre-smear token embedding of the last token
    inserted (the smear's x_{t-1} for the next call; meaningless while pos == 0).
    """

    def __init__(self, batch_size: int, max_len: int, n_layer: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, n_embd: int = 0):
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.prev_embed = torch.zeros(batch_size, n_embd, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.pos = 0

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0, t1 = self.pos, self.pos + k.shape[1]
        if t1 > self.max_len:
            raise RuntimeError(f"KV cache overflow: {t1} tokens > max_len {self.max_len}")
        self.k[layer, :, t0:t1] = k
        self.v[layer, :, t0:t1] = v
        return self.k[layer, :, :t1], self.v[layer, :, :t1]

    def copy_from(self, other: "KVCache") -> None:
        """Broadcast a (batch 1) prefilled cache into every row of this one."""
        n = other.pos
        self.k[:, :, :n] = other.k[:, :, :n]
        self.v[:, :, :n] = other.v[:, :, :n]
        self.prev_embed.copy_(other.prev_embed.expand_as(self.prev_embed))
        self.pos = n


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d = config.n_embd
        self.c_q = Linear(d, self.n_head * self.head_dim)
        self.c_k = Linear(d, self.n_kv_head * self.head_dim)
        self.c_v = Linear(d, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, d)
        self.ve_gate = Linear(min(12, d), self.n_kv_head) if config.has_value_embed(layer) else None
        self.ve_gate_scale = config.ve_gate_scale

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                window: int | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            assert self.ve_gate is not None
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B,T,Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = rope_norm(q, cos, sin), rope_norm(k, cos, sin)  # RoPE, then QK-norm
        if kv_cache is None:
            y = attention.causal_attention(q, k, v, window=window)
        else:
            q_offset = kv_cache.pos
            k, v = kv_cache.insert(self.layer, k, v)
            y = attention.cached_attention(q, k, v, q_offset=q_offset, window=window)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, x0, resid_lambda, x0_lambda, ve, cos, sin, window, kv_cache):
        # the residual mix belongs to the block so a compiled block (warmup.compile_blocks) fuses it in
        x = resid_lambda.to(x.dtype) * x + x0_lambda.to(x.dtype) * x0
        x = x + self.attn(rms_norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, fused_loss: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        V, d = config.padded_vocab_size, config.n_embd
        kv_dim = config.n_kv_head * config.head_dim
        self.wte = Embedding(V, d)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.value_embeds = nn.ModuleDict({str(i): Embedding(V, kv_dim) for i in range(config.n_layer)
                                           if config.has_value_embed(i)})
        self.lm_head = Linear(d, V)
        # per-layer residual scalars: x <- resid_lambda * x + x0_lambda * x0 before each block
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # smear and backout live outside `blocks.` on purpose: the optimizer sends 2-D block params to Muon
        self.smear_gate = Linear(min(SMEAR_CHANNELS, d), 1) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.window_sizes = config.window_sizes()
        self.rotary_len = config.sequence_len * 4
        self.register_buffer("cos", torch.empty(1, self.rotary_len, 1, config.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(1, self.rotary_len, 1, config.head_dim // 2), persistent=False)
        self.compute_dtype = torch.float32  # set from outside (set_compute_dtype); embeddings are cast to it
        # Training loss through the chunked fused lm_head + softcap + CE (never materialises the (B*T, V) logits);
        # numerically the same as the plain path (tested). Chosen by the caller (PICOCHAT_FUSED_LOSS, read by
        # `training.prepare_model`).
        self.fused_loss = fused_loss
        # None, or x -> (quantized x, scale) for the training loss's logits GEMM, set by a low-precision transform
        # from outside (`ops.loss.fused_linear_cross_entropy`); plain lm_head calls (eval, sampling) never use it.
        self.logits_quantizer = None

    # ------------------------------------------------------------------------------------------------------------
    # Init

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation lives here (values follow nanochat HEAD, nanochat/gpt.py init_weights).

        | param                 | init                                          |
        | wte                   | N(0, 0.8)                                     |
        | value embeds          | U(+-sqrt(3/d))                                |
        | c_q, c_k, c_v         | U(+-sqrt(3/d_in)) (std 1/sqrt(d_in))          |
        | mlp c_fc              | 0.4 x the above                               |
        | c_proj (attn and mlp) | zeros: each block starts as identity          |
        | lm_head               | N(0, 0.001)                                   |
        | ve_gate               | U(0, 0.02) (gate ~1.0 at start)               |
        | resid / x0 lambdas    | linearly 1.15 -> 1.05 / 0.20 -> 0.05 by layer |
        | smear gate / lambda   | U(0, 0.02) / 0 (smear starts off)             |
        | backout lambda        | 0.2                                           |
        """
        d, L = self.config.n_embd, self.config.n_layer
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8)
        bound = math.sqrt(3.0 / d)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                b = math.sqrt(3.0 / lin.in_features)
                nn.init.uniform_(lin.weight, -b, b)
            b = 0.4 * math.sqrt(3.0 / block.mlp.c_fc.in_features)
            nn.init.uniform_(block.mlp.c_fc.weight, -b, b)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        frac = torch.linspace(0.0, 1.0, L) if L > 1 else torch.zeros(1)
        self.resid_lambdas.copy_(1.15 - 0.10 * frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        if self.smear_gate is not None:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()
        if self.backout_lambda is not None:
            self.backout_lambda.fill_(0.2)
        self.init_rotary()

    @torch.no_grad()
    def init_rotary(self) -> None:
        """(Re)compute the RoPE tables; they are buffers, not saved in checkpoints."""
        hd = self.config.head_dim
        device = self.wte.weight.device
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        self.cos = freqs.cos()[None, :, None, :]
        self.sin = freqs.sin()[None, :, None, :]

    def set_compute_dtype(self, dtype: torch.dtype) -> "GPT":
        """Activations (and the matmuls) run in `dtype`; parameters stay fp32 master weights."""
        self.compute_dtype = dtype
        return self

    # ------------------------------------------------------------------------------------------------------------
    # Forward

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean", logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab) in fp32, or the loss when targets are given (ignore_index -1).
        `logits_at` (1-D positions along T): logits of those positions only, (B, len, vocab); a prefill that needs
        the last position's skips the head's work and the fp32 logits of every other one."""
        B, T = idx.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        if t0 + T > self.rotary_len:
            raise ValueError(f"sequence of {t0 + T} tokens exceeds the rotary table ({self.rotary_len})")
        cos = self.cos[:, t0:t0 + T].to(self.compute_dtype)
        sin = self.sin[:, t0:t0 + T].to(self.compute_dtype)
        x = rms_norm(self.wte(idx).to(self.compute_dtype))
        if self.smear_gate is not None:
            x = self.smear(x, kv_cache)
        x0 = x
        x_mid = None
        for i, block in enumerate(self.blocks):
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, cos, sin, self.window_sizes[i], kv_cache)
            if i == self.config.n_layer // 2:
                x_mid = x
        if kv_cache is not None:
            kv_cache.pos += T
        if self.backout_lambda is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        if logits_at is not None:
            if targets is not None:
                raise ValueError("GPT.forward: logits_at selects logits for inference; pass it without targets")
            x = x.index_select(1, logits_at)
        return self.head(x, targets, loss_reduction)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None, loss_reduction: str = "mean") -> torch.Tensor:
        """Final norm, then logits (B, T, vocab) in fp32, or the loss when targets are given."""
        x = rms_norm(x)
        if targets is not None and loss_reduction in ("mean", "sum") and self.fused_loss and torch.is_grad_enabled():
            return fused_linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                              self.config.vocab_size, self.config.softcap, loss_reduction,
                                              quantize=self.logits_quantizer)
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def smear(self, e: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """e: normed embeddings (B, T, d). e_t + lambda * sigmoid(W_s e_t[:24]) * e_{t-1}; the first token of a
        sequence gets nothing. With a cache, e_{-1} of this chunk is the cache's prev_embed (then updated)."""
        gate = self.smear_lambda.to(e.dtype) * torch.sigmoid(self.smear_gate(e[..., : self.smear_gate.in_features]))
        if kv_cache is None or kv_cache.pos == 0:
            out = torch.cat([e[:, :1], e[:, 1:] + gate[:, 1:] * e[:, :-1]], dim=1)
        else:
            prev = torch.cat([kv_cache.prev_embed.unsqueeze(1).to(e.dtype), e[:, :-1]], dim=1)
            out = e + gate * prev
        if kv_cache is not None:
            kv_cache.prev_embed.copy_(e[:, -1])
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Accounting (from shapes, so it stays right whatever Linear subclass a transform swaps in)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """Kaplan-style N: transformer matrices + lm_head (no embeddings, no scalars). Used by the depth dial."""
        return num_scaling_params(self.config)

    def flops_per_token(self) -> float:
        return flops_per_token(self.config)

    def kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> KVCache:
        c = self.config
        return KVCache(batch_size, max_len, c.n_layer, c.n_kv_head, c.head_dim, dtype or self.compute_dtype,
                       device or self.wte.weight.device, n_embd=c.n_embd)


def num_scaling_params(c: GPTConfig) -> int:
    d, hd = c.n_embd, c.head_dim
    attn = d * (c.n_head * hd) * 2 + d * (c.n_kv_head * hd) * 2
    mlp = 2 * d * 4 * d
    return c.n_layer * (attn + mlp) + d * c.padded_vocab_size


def flops_per_token(c: GPTConfig) -> float:
    """Training FLOPs per token (fwd+bwd = 3x fwd): 6 x matmul weights + attention scores/values over the window.

    Embedding lookups count zero; attention counts 12 * H * hd * min(window, T) per layer (QK^T and AV, fwd+bwd,
    averaged over causal positions as nanochat does, i.e. the full-window upper bound).
    """
    matmul = num_scaling_params(c)
    attn = 0
    for w in c.window_sizes():
        span = c.sequence_len if w is None else min(w, c.sequence_len)
        attn += 12 * c.n_head * c.head_dim * span
    return 6.0 * matmul + attn


def build_model(config: GPTConfig, device: torch.device | str = "cpu", fused_loss: bool = True) -> GPT:
    """Construct on the meta device, materialise on `device`, and initialise."""
    with torch.device("meta"):
        model = GPT(config, fused_loss=fused_loss)
    # materialise uninitialised storage on `device` (like Module.to_empty, but with plain torch.empty: to_empty's
    # empty_like goes through torch._refs and imports sympy/fx, ~2 s of CPU per process for nothing)
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.init_weights()
    return model
