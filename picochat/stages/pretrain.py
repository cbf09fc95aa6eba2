"""`picochat pretrain`: train the base model. One code path for CPU, one GPU and N GPUs (torchrun).

    picochat pretrain --preset tiny                                   # CPU, embedded corpus, minutes
    picochat pretrain --depth 12 --data DIR --tokenizer DIR           # one GPU: accumulation fills the batch
    torchrun --nproc-per-node 8 -m picochat pretrain --depth 20 ...    # N GPUs (or `picochat launch`)

Everything not given is derived from --depth by `scaling.py` (width, heads, batch, LRs, WD, horizon). The loop:
bf16 activations on CUDA (fp32 master weights), torch.compile on CUDA, gradient accumulation, schedules as pure
functions of the step, val bpb every --eval-every steps, samples, checkpoints every --save-every steps and at the end
(before the final eval). `--resume auto` (default) continues the latest checkpoint of the run exactly: weights,
optimizer shards, loader position, RNG and step (bit-exact on CPU fp32). SIGTERM/SIGINT save and exit 0. A NaN/inf
loss stops the run and keeps the last good checkpoint.

`picochat bench pretrain --depth D --steps N` times steady-state steps on random tokens (or real shards).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from picochat import scaling, warmup
from picochat.checkpoint import (checkpoints_dir, load_model_state, load_rank_files, read_meta, save_checkpoint,
                                 update_meta)
from picochat.config import (UserError, add_config_args, check_ranges, check_run_name, config_from_args, require,
                             require_dir, to_dict)
from picochat.data.loader import DataLoader
from picochat.data.shards import check_shards, list_shards
from picochat.evals import core_eval
from picochat.evals.loss_eval import doc_start_batches, evaluate_bpb
from picochat.model import GPTConfig, build_model
from picochat.ops import attention, fp8
from picochat.optim import build_optimizer, set_schedule
from picochat.runtime import (default_data_dir, default_tokenizer_dir, environment_info, gpu_memory, init_runtime,
                              peak_flops, print0, stage_dir, synchronize, teardown)
from picochat.tokenizer import Tokenizer
from picochat.training import (CostMeter, Heartbeat, LossScaler, MetricsLogger, StepTimer, StopFlag, agree_on_step,
                               capture_rng_state, RESUME_HELP, RESUME_MODES, check_finite, find_resume_checkpoint,
                               format_step_line, freeze_gc, lock_stage, loss_scaler, out_of_memory, peak_memory_gb,
                               prepare_model,
                               profile_step, restore_rng_state, should_compile, unfreeze_gc, write_run_header)

PRESETS: dict[str, dict[str, Any]] = {
    # a few-million-parameter model on the embedded corpus; minutes on 2 CPU cores
    # a ~2M-parameter model on the embedded corpus: ~5 minutes on 2 CPU cores (the synth world's facts are learned
    # by ~450 steps of 4K tokens at width 128; measured when the synthetic corpus was designed)
    "tiny": dict(depth=4, aspect_ratio=32, head_dim=32, seq_len=256, device_batch_size=16, total_batch_size=4096,
                 num_iterations=450, eval_every=75, eval_tokens=32768, save_every=75, window_pattern="L",
                 lr_scale=1.0, warmup_steps=20, weight_decay=0.05),
    "d12": dict(depth=12),
    "d20": dict(depth=20),
    "d24": dict(depth=24),
    "d32": dict(depth=32),
}

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "The opposite of hot is",
                  "The planets of the solar system are:", "If yesterday was Friday, then tomorrow will be"]


@dataclass
class PretrainConfig:
    preset: str | None = field(default=None, metadata={"help": "tiny | d12 | d20 | d24 | d32 (flags override)",
                                                       "choices": list(PRESETS)})
    run: str | None = field(default=None, metadata={"help": "run name under PICOCHAT_HOME/runs (default: preset "
                                                            "or d<depth>)"})
    depth: int = field(default=12, metadata={"help": "the one dial: layers; width/heads/batch/LR/horizon derive"})
    data: str | None = field(default=None, metadata={"help": "shard directory (last shard = val), or 'random' "
                                                             "(synthetic tokens; default: PICOCHAT_HOME/data/synth)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory (default: "
                                                                  "PICOCHAT_HOME/tokenizer)"})
    vocab_size: int = field(default=32768, metadata={"help": "vocab for --data random (else the tokenizer's)"})
    head_dim: int = 128
    n_kv_head: int = field(default=0, metadata={"help": "KV heads for GQA (0 = as many as query heads)"})
    aspect_ratio: int = 64
    window_pattern: str = field(default="L", metadata={"help": "per-layer S(hort)/L(ong) attention pattern, "
                                                               "tiled; L = full causal (fastest with cuDNN)"})
    value_embeds: bool = True
    # on by default: d12, 150 x 262,144 tokens, val bpb 1.506 -> 1.471 with both (README "Quality per token")
    smear: bool = field(default=True, metadata={"help": "smear: add a gated previous-token embedding (nanochat)"})
    backout: bool = field(default=True, metadata={"help": "backout: subtract a learned fraction of the mid-depth "
                                                          "residual before the final norm (nanochat)"})
    seq_len: int = 2048
    device_batch_size: int = field(default=0, metadata={"help": "rows per micro-batch per process (0 = by depth)"})
    total_batch_size: int = field(default=0, metadata={"help": "tokens per optimizer step (0 = Power Lines rule)"})
    num_iterations: int = field(default=0, metadata={"help": "optimizer steps (0 = ratio * params / batch)"})
    ratio: float = field(default=scaling.DEFAULT_RATIO, metadata={"help": "tokens per scaling parameter"})
    matrix_lr: float = scaling.MATRIX_LR
    embedding_lr: float = scaling.EMBEDDING_LR
    value_embed_lr: float = scaling.VALUE_EMBED_LR
    unembedding_lr: float = scaling.UNEMBEDDING_LR
    resid_lr: float = scaling.RESID_LR
    x0_lr: float = scaling.X0_LR
    lr_scale: float = field(default=0.0, metadata={"help": "multiplier of every LR (0 = the rule: "
                                                               "sqrt(batch / 2^19), at least 1)"})
    weight_decay: float = field(default=-1.0, metadata={"help": "Muon weight decay (negative = T_epoch rule)"})
    ve_gate_scale: float = field(default=3.0, metadata={"help": "value-embedding gate range: scale * sigmoid(.) "
                                                                   "(3, as nanochat HEAD: measured better than 2)"})
    normuon: bool = field(default=True, metadata={"help": "NorMuon variance reduction in Muon"})
    muon_eq: bool = field(default=False, metadata={"help": "MuonEq: equalise the momentum's row norms before "
                                                          "orthogonalising"})
    muon_plus: bool = field(default=True, metadata={"help": "Muon+: rescale the orthogonalised update to the "
                                                            "norm of an exact polar factor"})
    warmup_steps: int = 40
    warmdown_frac: float = 0.65
    final_lr_frac: float = 0.05
    eval_every: int = field(default=250, metadata={"help": "val bpb every N steps and at the end (0 = end only)"})
    eval_tokens: int = 20 * 524288
    sample_every: int = field(default=0, metadata={"help": "greedy samples every N steps and at the end "
                                                           "(0 = end only, -1 = never)"})
    core_every: int = field(default=0, metadata={"help": "CORE eval every N steps (0 = off, or every 5%% of the run "
                                                         "with --core-target; needs the bundle)"})
    core_bundle: str | None = None
    core_target: float = field(default=0.0, metadata={"help": "save and stop at the first CORE eval that reaches "
                                                             "this score (0.2565 = GPT-2's) and log the training "
                                                             "time it took; 0 = off"})
    save_every: int = field(default=1000, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep_last: int = 2
    resume: str = field(default="auto", metadata={"help": RESUME_HELP})
    stop_at_step: int = field(default=0, metadata={"help": "save and stop after this step (the schedules still "
                                                           "span --num-iterations); 0 = off"})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the model and optimizer "
                                                                 "(default: on CUDA)"})
    fp8: bool | None = field(default=None, metadata={"help": "fp8 matmuls (tensorwise e4m3/e5m2) in the "
                                                              "transformer blocks, sm_89+ GPUs: the MLP below "
                                                              "d20, all block matmuls from d20 (default: on for "
                                                              "d12+ on Hopper/Blackwell when compiled; "
                                                              "picochat/ops/fp8.py)"})
    activation_budget: float = field(default=1.0, metadata={"help": "fraction of the activations the compiled "
                                                                  "model keeps for backward; below 1 the rest is "
                                                                  "recomputed (d20 micro-batch 32: 0.7 -> 47 GB "
                                                                  "instead of 72, -2.5%% tok/s)"})
    seed: int = 1337
    loader_threads: int = 4
    device: str | None = None
    dtype: str | None = None
    wandb: bool = False


def apply_preset(cfg: PretrainConfig) -> PretrainConfig:
    """Fields the user left at their defaults take the preset's values (for programmatic use; the CLI does the same
    through `config_from_args`)."""
    if not cfg.preset:
        return cfg
    if cfg.preset not in PRESETS:
        raise UserError(f"--preset {cfg.preset!r}: expected one of {', '.join(PRESETS)}")
    defaults = PretrainConfig()
    values = asdict(cfg)
    for k, v in PRESETS[cfg.preset].items():
        if values[k] == getattr(defaults, k):
            values[k] = v
    return PretrainConfig(**values)


# ----------------------------------------------------------------------------------------------------------------
# Validation: every flag checked before anything is allocated, loaded or written


PRETRAIN_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "depth": (1, None), "seq_len": (8, None), "vocab_size": (2, None), "head_dim": (2, None), "n_kv_head": (0, None),
    "aspect_ratio": (1, None), "device_batch_size": (0, None), "total_batch_size": (0, None),
    "num_iterations": (0, None), "ratio": (0, None), "matrix_lr": (0, None), "embedding_lr": (0, None),
    "value_embed_lr": (0, None), "unembedding_lr": (0, None), "resid_lr": (0, None), "x0_lr": (0, None),
    "lr_scale": (0, None), "ve_gate_scale": (0, None), "warmup_steps": (0, None), "warmdown_frac": (0, 1),
    "final_lr_frac": (0, 1), "eval_every": (0, None), "eval_tokens": (1, None), "sample_every": (-1, None),
    "core_every": (0, None), "save_every": (0, None), "keep_last": (0, None), "stop_at_step": (0, None),
    "activation_budget": (0, 1), "loader_threads": (1, None),
}


def validate(cfg: PretrainConfig) -> None:
    """Every flag's range and kind, and the combinations that cannot work, as one ConfigError line each."""
    check_ranges(cfg, PRETRAIN_BOUNDS)
    check_run_name(cfg.run or "")
    require(cfg.ratio > 0, f"--ratio {cfg.ratio}: must be > 0 (tokens per scaling parameter)")
    require(cfg.activation_budget > 0,
            f"--activation-budget {cfg.activation_budget}: must be in (0, 1] (1 = keep every activation)")
    require(cfg.head_dim % 2 == 0, f"--head-dim {cfg.head_dim}: must be an even number (RoPE rotates pairs)")
    require(cfg.window_pattern != "" and set(cfg.window_pattern.upper()) <= {"S", "L"},
            f"--window-pattern {cfg.window_pattern!r}: use the letters S (short window) and L (long), e.g. SSSL")
    _, _, n_head = scaling.model_dims(cfg.depth, cfg.head_dim, cfg.aspect_ratio)
    require(not cfg.n_kv_head or n_head % cfg.n_kv_head == 0,
            f"--n-kv-head {cfg.n_kv_head}: must divide the {n_head} query heads of depth {cfg.depth}; use a "
            f"divisor of {n_head}, or 0 for one KV head per query head")
    require(cfg.resume in RESUME_MODES or Path(cfg.resume).is_dir(),
            f"--resume {cfg.resume!r}: expected {', '.join(RESUME_MODES)} or an existing checkpoint directory")
    if cfg.data != "random":
        data = require_dir(_data_dir(cfg), "--data", "create shards with `picochat data synth|download|prepare`, or "
                                                     "pass --data DIR (or --data random for a smoke test)")
        check_shards(sum(list_shards(data), []))
        if cfg.tokenizer:
            require_dir(cfg.tokenizer, "--tokenizer", "pass the folder `picochat tokenizer train --out` wrote")
    require(math.isfinite(cfg.core_target) and -1.0 <= cfg.core_target <= 1.0,
            f"--core-target {cfg.core_target}: a CORE score is at most 1 (GPT-2's is 0.2565); 0 turns the stop off")
    if cfg.core_bundle:
        require_dir(cfg.core_bundle, "--core-bundle", "pass the unpacked CORE eval bundle folder, or drop the flag "
                                                      "to download it")


def check_memory(cfg: PretrainConfig, plan: Plan, device: torch.device, world_size: int) -> None:
    """Refuse a model that cannot train here, before allocating it: by the memory model of `scaling.py` (at least
    the exact weights, gradients and optimizer state) for one sequence per micro-batch, against the GPU's memory
    (CUDA) or the machine's RAM (elsewhere)."""
    limit = gpu_memory(device)
    where = f"the GPU ({torch.cuda.get_device_name(device)})" if limit else "this machine's RAM"
    if limit is None:
        try:
            limit = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):  # no sysconf (Windows): nothing to compare against
            return
    else:
        limit *= scaling.USABLE_MEMORY_FRACTION
    vocab = plan.model_config.vocab_size
    params = int(plan.derived["params_total"])
    need = max(scaling.estimate_memory(cfg.depth, 1, world_size, cfg.seq_len, vocab),
               params * (8 + 8 / max(1, world_size)))
    if need > limit:
        raise UserError(f"--depth {cfg.depth}: a model of {params:,} parameters needs about {need / 1e9:,.0f} GB to "
                        f"train (picochat's memory estimate for one sequence of {cfg.seq_len} tokens per "
                        f"micro-batch), but {where} has {limit / 1e9:,.0f} GB; use a smaller --depth or --seq-len, or "
                        f"more GPUs (optimizer state is sharded across them)")


# ----------------------------------------------------------------------------------------------------------------
# Data: the tokenizing loader, or synthetic tokens


class RandomTokens:
    """Synthetic, learnable token stream with exact state: each row follows a fixed random permutation of the
    vocabulary (next = perm[current]) with 10% uniform noise. Batch c of rank r is a pure function of (seed, global
    index c * world + r), so W processes see exactly the micro-batches one process sees with W-fold accumulation."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", seed: int = 0, stream: int = 0, **_: Any):
        self.V, self.B, self.T = vocab_size, batch_size, seq_len
        self.rank, self.world, self.device = rank, world_size, torch.device(device)
        self.seed = seed + 7919 * stream  # train (0) and val (1) draw different rows from the same chain
        self.perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
        self.count = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.count * self.world + self.rank + 1)
        self.count += 1
        first = torch.randint(0, self.V, (self.B,), generator=g)
        noise = (torch.rand(self.B, self.T, generator=g) < 0.1).numpy().T.copy()
        rnd = torch.randint(0, self.V, (self.B, self.T), generator=g).numpy().T.copy()
        # the chain is sequential in t; numpy per column costs ~5 ms per 32 x 2048 batch where torch ops cost ~28
        # (2-core CI CPU), host time the benchmark's step otherwise shares with kernel launches
        perm = self.perm.numpy()
        cols = np.empty((self.T + 1, self.B), dtype=np.int64)
        cols[0] = cur = first.numpy()
        for t in range(self.T):
            cur = np.where(noise[t], rnd[t], perm[cur])
            cols[t + 1] = cur
        rows = torch.from_numpy(cols.T.copy())
        if self.device.type == "cuda":  # like the real loader: a pageable copy would wait for the GPU to drain
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        else:
            rows = rows.to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def batch_from(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A held batch (a resume's first) in the layout `next_batch` gives: views of one (B, T+1) tensor."""
        rows = torch.cat([x, y[:, -1:]], dim=1).to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "rank": self.rank, "world_size": self.world}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        self.count = state["count"]

    def stats(self) -> dict[str, Any]:
        return {"batches": self.count}

    def close(self) -> None:
        pass


class _CharTokenizer:
    """Stand-in for --data random (no tokenizer): every id is one byte, so bpb = loss / ln 2."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_id = 0

    def token_bytes(self) -> torch.Tensor:
        return torch.ones(self.vocab_size, dtype=torch.int32)

    def encode(self, text, prepend=None, append=None):
        return [min(b, self.vocab_size - 1) for b in text.encode()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _load_tokenizer(cfg: PretrainConfig):
    if cfg.data == "random":
        return _CharTokenizer(cfg.vocab_size), None
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else default_tokenizer_dir()
    if not tok_dir.exists():
        raise UserError(f"--tokenizer {tok_dir}: no tokenizer there; train one with `picochat tokenizer train` "
                        f"(or pass --tokenizer DIR, or --data random for a smoke test)")
    return Tokenizer.load(tok_dir), tok_dir


def _data_dir(cfg: PretrainConfig) -> Path:
    return Path(cfg.data) if cfg.data else default_data_dir("synth")


def make_loader(cfg: PretrainConfig, tok: Any, split: str, batch_size: int, rt: Any, loop: bool):
    if cfg.data == "random":
        return RandomTokens(tok.vocab_size, batch_size, cfg.seq_len, rank=rt.rank, world_size=rt.world_size,
                            device=rt.device, seed=cfg.seed, stream=0 if split == "train" else 1)
    train, val = list_shards(_data_dir(cfg))
    return DataLoader(train if split == "train" else val, tok, batch_size, cfg.seq_len, rank=rt.rank,
                      world_size=rt.world_size, device=rt.device, seed=cfg.seed, threads=cfg.loader_threads,
                      loop=loop)


# ----------------------------------------------------------------------------------------------------------------
# Setup shared by the stage and the benchmark


@dataclass
class Plan:
    model_config: Any
    derived: dict[str, Any]
    device_batch_size: int
    total_batch_size: int
    grad_accum: int
    num_iterations: int
    lr_scale: float
    muon_weight_decay: float


def default_device_batch(depth: int, seq_len: int, world_size: int, memory_bytes: float | None,
                         fp8: bool = False) -> int:
    """The micro-batch when --device-batch-size is not given: the depth rule (`scaling.device_batch_size`, sized
    for 80 GB GPUs; twice the rows with fp8 up to d20), lowered to what the memory estimate
    (`scaling.recommend_batch`) fits on a smaller GPU (a 24 GB card would otherwise run out of memory at d12's 32
    rows). Never raised above the rule: bigger micro-batches were not faster everywhere (bf16 d20 x 32 on an H200:
    150.8K tok/s against 157.6K at 16)."""
    rule = scaling.device_batch_size(depth, seq_len, fp8=fp8)
    if memory_bytes is None:
        return rule
    fit = scaling.recommend_batch(memory_bytes, depth, world_size, seq_len, fp8=fp8)
    if fit == 0:
        raise UserError(f"--depth {depth}: by picochat's memory estimate not even one sequence of {seq_len} tokens "
                        f"fits in {memory_bytes / 1e9:.0f} GB per GPU; use a smaller --depth or --seq-len, more "
                        f"GPUs (optimizer state is sharded across them), or try --device-batch-size 1")
    if fit < rule:
        print0(f"[pretrain] micro-batch {fit} rows: the depth rule's {rule} would not fit in "
               f"{memory_bytes / 1e9:.0f} GB (estimate); the total batch is unchanged (more accumulation steps), "
               f"--device-batch-size overrides")
    return min(rule, fit)


def fp8_planned(flag: bool | None, compile_flag: bool | None, depth: int, device: torch.device) -> bool:
    """Whether `prepare_model` will switch matmuls to fp8 (the micro-batch default depends on it)."""
    return fp8.resolve(flag, depth, device, should_compile(compile_flag, device))


def make_plan(cfg: PretrainConfig, vocab_size: int, world_size: int, device: torch.device,
              resume_micro: int | None = None) -> Plan:
    """Model config, derived hyperparameters and the batch split. `resume_micro`: the micro-batch of the checkpoint
    being resumed; without --device-batch-size it is kept where it is not above the default, so a resumed run reads
    the same batches as an uninterrupted one (e.g. a run from before a default changed, or one that continued with
    a smaller --device-batch-size after running out of memory)."""
    require(cfg.depth >= 1, f"--depth {cfg.depth}: must be >= 1")
    require(cfg.seq_len >= 8, f"--seq-len {cfg.seq_len}: must be >= 8")
    require(0.0 < cfg.activation_budget <= 1.0,
            f"--activation-budget {cfg.activation_budget}: must be in (0, 1] (1 = keep every activation)")
    mc = scaling.gpt_config(cfg.depth, vocab_size, cfg.seq_len, cfg.head_dim, cfg.window_pattern.upper(),
                            cfg.value_embeds, cfg.n_kv_head, cfg.aspect_ratio, smear=cfg.smear, backout=cfg.backout)
    mc.ve_gate_scale = cfg.ve_gate_scale
    mc.validate()
    d = scaling.derive(cfg.depth, vocab_size, cfg.seq_len, cfg.ratio, cfg.head_dim, cfg.window_pattern.upper(),
                       cfg.value_embeds, cfg.total_batch_size, cfg.num_iterations, cfg.aspect_ratio,
                       smear=cfg.smear, backout=cfg.backout)
    total = d["total_batch_size"]
    B = cfg.device_batch_size
    if not B:  # the default: no larger than a resumed checkpoint's, shrunk to divide the total (tiny runs, many GPUs)
        B = default_device_batch(cfg.depth, cfg.seq_len, world_size, gpu_memory(device),
                                 fp8_planned(cfg.fp8, cfg.compile, cfg.depth, device))
        B = max(1, min(B, resume_micro or B, total // (cfg.seq_len * world_size)))
        while B > 1 and total % (B * cfg.seq_len * world_size):
            B -= 1
    per_micro = B * cfg.seq_len * world_size
    if total % per_micro:
        raise UserError(f"--total-batch-size {total}: must be a multiple of device batch x seq len x processes = "
                        f"{B} x {cfg.seq_len} x {world_size} = {per_micro}; change --total-batch-size or "
                        f"--device-batch-size")
    lr_scale = cfg.lr_scale or d["lr_scale"]
    wd = cfg.weight_decay if cfg.weight_decay >= 0 else d["muon_weight_decay"]
    return Plan(mc, d, B, total, total // per_micro, d["num_iterations"], lr_scale, wd)



def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, plan: Plan, compile_step: bool):
    return build_optimizer(model, compile_step=compile_step, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                           value_embed_lr=cfg.value_embed_lr, unembedding_lr=cfg.unembedding_lr,
                           resid_lr=cfg.resid_lr, x0_lr=cfg.x0_lr, lr_scale=plan.lr_scale,
                           width_scale=scaling.width_scale(plan.model_config.n_embd),
                           muon_weight_decay=plan.muon_weight_decay, normuon_beta2=0.9 if cfg.normuon else None,
                           muon_eq=cfg.muon_eq, muon_plus=cfg.muon_plus)


def apply_schedules(opt: Any, cfg: PretrainConfig, step: int, total: int) -> float:
    lrm = scaling.lr_multiplier(step, total, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac)
    set_schedule(opt, lrm, momentum=scaling.muon_momentum(step, total, cfg.warmdown_frac),
                 wd_mult=scaling.weight_decay_multiplier(step, total))
    return lrm


def train_step(cmodel: Any, opt: Any, batch: tuple[torch.Tensor, torch.Tensor], next_batch: Any,
               grad_accum: int, scaler: LossScaler | None = None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step over `grad_accum` micro-batches. Returns (summed detached loss, the next step's first
    batch, fetched while the GPU works). No host sync in here, except fp16's overflow check (`scaler`)."""
    loss_sum = None
    for micro in range(grad_accum):
        x, y = batch
        opt.arm(micro == grad_accum - 1 and scaler is None)  # fp16: gradients are checked before any reduction
        loss = cmodel(x, y)
        part = loss / grad_accum if grad_accum > 1 else loss
        part.backward() if scaler is None else scaler.backward(part)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        batch = next_batch()
    opt.step() if scaler is None else scaler.step(opt)
    cmodel.zero_grad(set_to_none=True)
    assert loss_sum is not None
    return loss_sum, batch


# ----------------------------------------------------------------------------------------------------------------
# Samples and checkpoints


@torch.no_grad()
def greedy_samples(model: Any, tok: Any, prompts: list[str], max_tokens: int = 16) -> list[dict[str, str]]:
    """Greedy continuations with the KV cache (uncompiled model: every call has a new shape)."""
    out = []
    was = model.training
    model.eval()
    dev = model.wte.weight.device
    try:
        for p in prompts:
            ids = tok.encode(p, prepend=tok.bos_id)
            cache = model.kv_cache(1, len(ids) + max_tokens)
            logits = model(torch.tensor([ids], device=dev), kv_cache=cache)[:, -1]
            new = []
            for _ in range(max_tokens):
                nxt = int(logits.argmax(-1))
                if nxt == tok.bos_id:
                    break
                new.append(nxt)
                logits = model(torch.tensor([[nxt]], device=dev), kv_cache=cache)[:, -1]
            out.append({"prompt": p, "completion": tok.decode(new)})
    finally:
        model.train(was)
    return out


def _load_resume(ckpt: Path, model: Any, opt: Any, loader: Any, rt: Any, plan: Plan) -> dict[str, Any]:
    """Restore model, optimizer shard(s), loader and RNG from `ckpt`. Returns the rank state (loop info)."""
    meta = read_meta(ckpt)
    saved_mc = GPTConfig.from_saved(meta.get("model_config", {}))
    if saved_mc != plan.model_config:
        raise UserError(f"{ckpt}: the checkpoint's model ({saved_mc}) differs from this run's "
                        f"({plan.model_config}); use the same flags, a new --run, or --resume wipe")
    state = load_model_state(ckpt, map_location=rt.device)
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()}, strict=True)
    old_world = int(meta.get("world_size", 1))
    if old_world == rt.world_size:
        optim_state, rank_state = load_rank_files(ckpt, rt.rank, map_location=rt.device)
        if optim_state is None or rank_state is None:
            raise UserError(f"{ckpt}: missing optim_rank{rt.rank}.pt or state_rank{rt.rank}.pt; the checkpoint "
                            f"is incomplete; delete it to fall back to the previous one, or --resume wipe")
        opt.load_state_dict(optim_state)
        restore_rng_state(rank_state.get("rng", {}), rt.device)
        old_batch = int(rank_state.get("loop", {}).get("device_batch_size", plan.device_batch_size))
        if old_batch == plan.device_batch_size:
            loader.load_state_dict(rank_state["loader"])
        else:  # e.g. after running out of memory: the weights and optimizer continue exactly, the data cannot
            loader.load_state_dict(rank_state["loader"], strict=False)
            rank_state = dict(rank_state, held_batch=None)
            print0(f"[resume] WARNING: checkpoint written with a micro-batch of {old_batch} rows, resuming with "
                   f"{plan.device_batch_size} (same total batch, {plan.grad_accum} accumulation steps): weights "
                   f"and optimizer state are exact; the data order restarts at the saved stream position, so the "
                   f"loss curve will differ slightly from an uninterrupted run")
    else:
        # Optimizer shards are keyed by parameter name, so all old ranks' files rebuild this rank's shard exactly.
        # The data stream cannot be re-split exactly; it restarts at the saved position (approximate), loudly.
        states = [load_rank_files(ckpt, r, map_location=rt.device) for r in range(old_world)]
        if any(o is None for o, _ in states):
            raise UserError(f"{ckpt}: written by {old_world} processes but some optim_rank*.pt files are missing; "
                            f"resume with {old_world} processes or --resume wipe")
        opt.load_state_dict([o for o, _ in states])
        rank_state = states[min(rt.rank, old_world - 1)][1] or {}
        loader.load_state_dict(rank_state["loader"], strict=False)
        rank_state = dict(rank_state, held_batch=None)
        print0(f"[resume] WARNING: checkpoint written by {old_world} processes, resuming with {rt.world_size}: "
               f"weights and optimizer state are exact (resharded); the data order restarts at the saved stream "
               f"position, so the loss curve will differ slightly from an uninterrupted run")
    return rank_state


def _meta(cfg: PretrainConfig, plan: Plan, tok_dir: Path | None, metrics: dict[str, Any]) -> dict[str, Any]:
    # the micro-batch that ran (the default depends on the GPU's memory), which the chat stages inherit
    return {"stage": "base", "run": cfg.run, "model_config": asdict(plan.model_config),
            "config": dict(to_dict(cfg), device_batch_size=plan.device_batch_size),
            "tokenizer_dir": str(tok_dir) if tok_dir else None, "metrics": metrics, "parent": None,
            "derived": plan.derived, "env": environment_info()}


# ----------------------------------------------------------------------------------------------------------------
# The stage: setup -> fit


@dataclass
class Stage:
    """What the loop works with, fixed once set up. `model` is the module to save and sample from, `cmodel` the one
    to train (compiled or the same)."""
    cfg: PretrainConfig
    plan: Plan
    rt: Any
    tok: Any
    tok_dir: Path | None
    model: Any
    cmodel: Any
    opt: Any
    loader: Any
    metrics: MetricsLogger
    ckpt_root: Path
    info: dict[str, Any]
    token_bytes: torch.Tensor
    peak: float | None
    fpt: float
    wandb_run: Any = None
    lock: Any = None  # training.StageLock on rank 0: this process is the stage's one trainer
    meter: CostMeter | None = None  # dollars and the --budget stop, when `picochat speedrun --price` runs the stage
    scaler: LossScaler | None = None  # fp16 only: dynamic loss scaling
    core_every: int = 0  # CORE cadence in steps: --core-every, or derived from the plan for --core-target


@dataclass
class LoopState:
    """What changes step to step, and what a checkpoint's rank state carries to continue the run exactly."""
    step: int = 0
    start_step: int = 0
    val_bpb: float | None = None
    min_val_bpb: float = math.inf
    train_time: float = 0.0
    last_ckpt: Path | None = None
    last_loss: float = float("nan")
    stopped_early: bool = False
    core: float | None = None           # the latest CORE score
    core_seconds: float = 0.0           # time spent in CORE evals (the cadence's cost)
    target_reached: dict[str, Any] | None = None  # --core-target: step, core, train_time_s when first reached


def run(cfg: PretrainConfig, preset_applied: bool = False) -> dict[str, Any]:
    """Train (or continue training) the base model; returns a JSON-able summary.

    `preset_applied`: the CLI already merged the preset under the explicit flags (so it is not applied twice)."""
    ctx, state, batch = setup(cfg, preset_applied)
    return fit(ctx, state, batch)


def setup(cfg: PretrainConfig, preset_applied: bool = False) -> tuple[Stage, LoopState, Any]:
    """Runtime, tokenizer, plan, model (prepared for training), optimizer, loader, resume, run header and metrics.
    Returns the stage, the loop state (restored when resuming) and the first batch to train on."""
    if not preset_applied:
        cfg = apply_preset(cfg)
    if not cfg.run:
        cfg.run = cfg.preset or f"d{cfg.depth}"
    validate(cfg)
    rt = init_runtime(cfg.device, cfg.dtype, cfg.seed)
    tok, tok_dir = _load_tokenizer(cfg)
    ckpt_root = checkpoints_dir(cfg.run, "base")
    # bad flag combinations fail here, before the lock or any folder exists (the plan is made again once the resumed
    # checkpoint's micro-batch is known)
    check_memory(cfg, make_plan(cfg, tok.vocab_size, rt.world_size, rt.device), rt.device, rt.world_size)
    lock = lock_stage(stage_dir(cfg.run, "base"), cfg.run, "base")  # released by fit, or below on a failed setup
    try:
        return _setup_locked(cfg, rt, tok, tok_dir, ckpt_root, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _setup_locked(cfg: PretrainConfig, rt: Any, tok: Any, tok_dir: Path | None, ckpt_root: Path,
                  lock: Any) -> tuple[Stage, LoopState, Any]:
    marks = {"setup": time.time()}
    ck = find_resume_checkpoint(ckpt_root, cfg.resume)
    resume_micro = None
    if ck is not None:
        resume_micro = int((read_meta(ck).get("config") or {}).get("device_batch_size") or 0) or None
    plan = make_plan(cfg, tok.vocab_size, rt.world_size, rt.device, resume_micro)
    check_memory(cfg, plan, rt.device, rt.world_size)
    _print_plan(cfg, plan, rt)

    model = build_model(plan.model_config, device=rt.device)
    marks["built"] = time.time()
    cmodel, info = prepare_model(model, device=rt.device, dtype=rt.dtype, seq_len=cfg.seq_len, compile=cfg.compile,
                                 fp8=cfg.fp8, activation_budget=cfg.activation_budget,
                                 run_folder=stage_dir(cfg.run, "base"))
    marks["model"] = time.time()
    opt = make_optimizer(model, cfg, plan, compile_step=info["compiled"])
    loader = make_loader(cfg, tok, "train", plan.device_batch_size, rt, loop=True)
    scaler = loss_scaler(rt.dtype)
    state, held = _resume(ck, model, opt, loader, rt, plan, scaler)
    core_every = cfg.core_every or (core_cadence(plan.num_iterations) if cfg.core_target else 0)
    if cfg.core_target:
        core_eval.resolve_bundle(cfg.core_bundle)  # fetched (or refused) now, not after hours of training
        print0(f"[core] stopping at CORE >= {cfg.core_target:g}: CORE every {core_every} steps (500 examples per "
               f"task)")
    if state.step >= plan.num_iterations:
        print0(f"[pretrain] {cfg.run} already trained for {state.step} steps (--num-iterations {plan.num_iterations})")

    sdir = stage_dir(cfg.run, "base")
    write_run_header(sdir, cfg, rt.device, extra={"derived": plan.derived, "resumed_from": str(ck) if ck else None,
                                                  "plan": {"device_batch_size": plan.device_batch_size,
                                                           "grad_accum": plan.grad_accum, "fp8": info["fp8"],
                                                           "fp8_scope": info["fp8_scope"]}})
    metrics = MetricsLogger(sdir / "metrics.jsonl", resume_step=state.start_step if ck is not None else None)
    ctx = Stage(cfg=cfg, plan=plan, rt=rt, tok=tok, tok_dir=tok_dir, model=model, cmodel=cmodel, opt=opt,
                loader=loader, metrics=metrics, ckpt_root=ckpt_root, info=info,
                token_bytes=tok.token_bytes().to(rt.device), peak=peak_flops(rt.device), fpt=model.flops_per_token(),
                wandb_run=_wandb_init(cfg, plan) if cfg.wandb and rt.master else None, lock=lock, scaler=scaler,
                core_every=core_every)
    info["marks"] = {**marks, "loop": time.time()}
    return ctx, state, held if held is not None else loader.next_batch()


def _print_plan(cfg: PretrainConfig, plan: Plan, rt: Any) -> None:
    mc = plan.model_config
    print0(f"[pretrain] run {cfg.run}: {rt.describe()}")
    print0(f"[pretrain] model: depth {mc.n_layer}, d_model {mc.n_embd}, heads {mc.n_head}/{mc.n_kv_head}, "
           f"vocab {mc.vocab_size}, windows {mc.window_pattern}, value embeds {mc.value_embeds}, "
           f"smear {mc.smear}, backout {mc.backout}; "
           f"{plan.derived['params_total']:,} params ({plan.derived['params_scaling']:,} scaling)")
    print0(f"[pretrain] batch {plan.total_batch_size:,} tokens = {plan.device_batch_size} x {cfg.seq_len} x "
           f"{rt.world_size} proc x {plan.grad_accum} accum; {plan.num_iterations:,} steps "
           f"({plan.num_iterations * plan.total_batch_size:,} tokens); lr x{plan.lr_scale:.3f}, "
           f"muon wd {plan.muon_weight_decay:.4f}")


def _resume(ck: Path | None, model: Any, opt: Any, loader: Any, rt: Any, plan: Plan,
            scaler: LossScaler | None = None) -> tuple[LoopState, Any]:
    """The loop state to start from (fresh, or restored with everything else from checkpoint `ck`) and the batch
    the checkpointed run was about to train on, if it kept one."""
    if ck is None:
        return LoopState(), None
    rank_state = _load_resume(ck, model, opt, loader, rt, plan)
    loop = rank_state.get("loop", {})
    step = int(loop.get("step", 0))
    held = rank_state.get("held_batch")
    if held is not None:  # the compiled model specializes on strides: the loader's own layout, or a recompile
        held = loader.batch_from(*held)
    if scaler is not None and loop.get("scaler"):
        scaler.load_state_dict(loop["scaler"])
    reached = loop.get("target_reached") or (read_meta(ck).get("metrics") or {}).get("core_target")
    print0(f"[resume] continuing from {ck} at step {step}")
    return LoopState(step=step, start_step=step, val_bpb=loop.get("val_bpb"),
                     min_val_bpb=loop.get("min_val_bpb", math.inf), train_time=float(loop.get("train_time", 0.0)),
                     last_ckpt=ck, core=loop.get("core"), core_seconds=float(loop.get("core_seconds") or 0.0),
                     target_reached=reached), held


def fit(ctx: Stage, st: LoopState, batch: Any) -> dict[str, Any]:
    """The training loop: optimizer steps until --num-iterations, a SIGTERM/SIGINT or --stop-at-step, with
    checkpoints, evals and samples on their schedules. However it ends, the signal handlers are restored and the
    metrics, loader and wandb run closed. Returns the run's summary."""
    cfg, plan, rt = ctx.cfg, ctx.plan, ctx.rt
    stop = StopFlag.install()
    timer = StepTimer(skip=1)
    first = "running the first step (compiling)" if ctx.info["compiled"] else "running the first step"
    ctx.meter = CostMeter.from_env()
    try:
        with (Heartbeat("pretrain", first, meter=ctx.meter) as hb,
              warmup.CompileWatch(ctx.info["cache"], hb, ctx.info["compiled"]) as watch):
            if target_met(cfg, st):
                print0(f"[pretrain] {cfg.run} already reached CORE {st.target_reached['core']:.4f} >= "
                       f"{cfg.core_target:g} at step {st.step}; nothing to train (--resume wipe starts over)")
            while st.step < plan.num_iterations and not target_met(cfg, st):
                lrm = apply_schedules(ctx.opt, cfg, st.step, plan.num_iterations)
                timer.start()
                loss_sum, batch = train_step(ctx.cmodel, ctx.opt, batch, ctx.loader.next_batch, plan.grad_accum,
                                             ctx.scaler)
                over_budget = ctx.meter is not None and ctx.meter.budget_due()  # every rank stops with the first
                loss, stop_now = agree_on_step(loss_sum, stop.requested or over_budget, rt.device, plan.grad_accum)
                dt = timer.stop()
                st.step += 1
                if timer.n > 1:
                    st.train_time += dt
                check_finite(loss, st.step, st.last_ckpt)
                st.last_loss = loss
                log_step(ctx, st, timer, lrm, dt)
                if st.step == st.start_step + 1:
                    freeze_gc()
                    ctx.info["startup"] = warmup.report_startup(ctx.info, watch, st.step, dt, ctx.metrics)
                hb.beat("training")
                if after_step(ctx, st, hb, batch, stop, stop_now):
                    break
    except torch.OutOfMemoryError as e:
        raise out_of_memory("pretrain", st.step + 1, plan.device_batch_size, cfg.seq_len, plan.total_batch_size,
                            rt.device, st.last_ckpt, cfg.activation_budget) from e
    finally:
        unfreeze_gc()
        stop.restore()
        ctx.metrics.close()
        ctx.loader.close()
        if ctx.wandb_run is not None:
            ctx.wandb_run.finish()
        if ctx.lock is not None:
            ctx.lock.release()
    return summarize(ctx, st, timer)


def log_step(ctx: Stage, st: LoopState, timer: StepTimer, lrm: float, dt: float) -> None:
    """The step line, its metrics record and its wandb point."""
    plan, rt = ctx.plan, ctx.rt
    tok_s = plan.total_batch_size / dt
    mfu = ctx.fpt * tok_s / (ctx.peak * rt.world_size) if ctx.peak else None
    mem = peak_memory_gb(rt.device)
    eta = timer.eta(plan.num_iterations - st.step, dt)
    cost = ctx.meter.text(eta) if ctx.meter is not None else ""
    print0(format_step_line(st.step, plan.num_iterations, st.last_loss, lrm, dt, tok_s, mfu, eta, mem, cost=cost))
    ctx.metrics.log({"step": st.step, "loss": st.last_loss, "lrm": lrm, "dt": dt, "tok_per_s": tok_s, "mfu": mfu,
                     "tokens": st.step * plan.total_batch_size, "peak_mem_gb": mem,
                     **({"loss_scale": ctx.scaler.scale} if ctx.scaler is not None else {})})
    if ctx.wandb_run is not None:
        ctx.wandb_run.log({"step": st.step, "loss": st.last_loss, "lrm": lrm, "tok_per_s": tok_s, "mfu": mfu})


def after_step(ctx: Stage, st: LoopState, hb: Heartbeat, batch: Any, stop: StopFlag, stop_now: bool) -> bool:
    """Checkpoint, eval, CORE and samples where due after a step; True when the run stops here (a signal or
    --stop-at-step). The checkpoint comes before any final eval: an eval crash never loses the weights."""
    cfg, step = ctx.cfg, st.step
    final = step == ctx.plan.num_iterations
    stop_here = stop_now or (cfg.stop_at_step > 0 and step >= cfg.stop_at_step and not final)
    if final or stop_here or (cfg.save_every > 0 and step % cfg.save_every == 0):
        hb.beat("saving a checkpoint")
        t0 = time.monotonic()
        st.last_ckpt = save(ctx, st, batch)
        if ctx.meter is not None:
            ctx.meter.saved(time.monotonic() - t0)
    if final or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
        hb.beat("evaluating val bpb")
        st.val_bpb = evaluate(ctx, step)
        st.min_val_bpb = min(st.min_val_bpb, st.val_bpb)
        ctx.metrics.log({"step": step, "val_bpb": st.val_bpb})
        if ctx.wandb_run is not None:
            ctx.wandb_run.log({"step": step, "val_bpb": st.val_bpb})
        if st.last_ckpt is not None and st.last_ckpt.name == f"step_{step:06d}" and ctx.rt.master:
            update_meta(st.last_ckpt, metrics={"val_bpb": st.val_bpb, "train_loss": st.last_loss})
    core = maybe_core(ctx, st, final)
    maybe_samples(ctx, step, final)
    if core is not None and cfg.core_target and core >= cfg.core_target and st.target_reached is None:
        st.target_reached = {"step": step, "core": core, "train_time_s": round(st.train_time, 3)}
        if st.last_ckpt is None or st.last_ckpt.name != f"step_{step:06d}":
            hb.beat("saving a checkpoint")
            st.last_ckpt = save(ctx, st, batch)
        if ctx.rt.master:  # in the meta too: a checkpoint saved before this eval has it only here (see _resume)
            update_meta(st.last_ckpt, metrics={"core": core, "core_target": st.target_reached})
        _report_target(ctx, st)
        return True
    if stop_here:
        by_budget = stop_now and not stop.requested and ctx.meter is not None and ctx.meter.budget is not None
        if by_budget and final:
            return True  # the budget check fired on the last step: the run is complete, not stopped
        st.stopped_early = True
        if by_budget:
            print0(ctx.meter.record_stop("pretrain", step, st.last_ckpt))
        else:
            why = f"signal {stop.signame}" if stop_now else f"--stop-at-step {cfg.stop_at_step}"
            print0(f"[pretrain] stopping at step {step} ({why}); resume with the same command")
    return stop_here


def evaluate(ctx: Stage, at_step: int) -> float:
    """Val bpb over --eval-tokens of the val split (and, on real data, on document beginnings too)."""
    cfg, rt, tok = ctx.cfg, ctx.rt, ctx.tok
    B = ctx.plan.device_batch_size
    steps = max(1, cfg.eval_tokens // (B * cfg.seq_len * rt.world_size))
    vl = make_loader(cfg, tok, "val", B, rt, loop=False)
    try:
        def batches():
            for i in range(steps):
                try:
                    yield vl.next_batch()
                except StopIteration:
                    return
        t0 = time.time()
        bpb = evaluate_bpb(ctx.cmodel, batches(), ctx.token_bytes)
    finally:
        vl.close()
    extra = ""
    if cfg.data != "random":  # also on document beginnings, the layout crop-packing loaders (nanochat) score
        _, val_shards = list_shards(_data_dir(cfg))
        bpb_crop = evaluate_bpb(ctx.cmodel, doc_start_batches(val_shards, tok, B, cfg.seq_len, cfg.eval_tokens,
                                                              rt.device, rt.rank, rt.world_size), ctx.token_bytes)
        ctx.metrics.log({"step": at_step, "val_bpb_docstart": bpb_crop})
        extra = f", doc-start layout {bpb_crop:.4f}"
    print0(f"[eval] step {at_step}: val bpb {bpb:.4f}{extra} ({steps * B * cfg.seq_len * rt.world_size:,} "
           f"tokens, {time.time() - t0:.1f}s)")
    return bpb


def save(ctx: Stage, st: LoopState, next_batch: Any) -> Path:
    """Checkpoint at `st.step`: weights, optimizer shards, and the rank state (loader, RNG, the batch the next step
    starts with, the loop state) that makes the continuation exact."""
    rt, plan = ctx.rt, ctx.plan
    rank_state = {"loader": ctx.loader.state_dict(), "rng": capture_rng_state(rt.device),
                  "held_batch": (next_batch[0].cpu(), next_batch[1].cpu()),
                  "loop": {"step": st.step, "val_bpb": st.val_bpb, "min_val_bpb": st.min_val_bpb,
                           "train_time": st.train_time, "device_batch_size": plan.device_batch_size,
                           "core": st.core, "core_seconds": st.core_seconds, "target_reached": st.target_reached,
                           "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None}}
    path = save_checkpoint(ctx.ckpt_root, st.step, ctx.model.state_dict() if rt.master else None,
                           ctx.opt.state_dict(),
                           _meta(ctx.cfg, plan, ctx.tok_dir, {"val_bpb": st.val_bpb, "train_loss": st.last_loss}),
                           rank_state=rank_state, keep_last=ctx.cfg.keep_last)
    print0(f"[checkpoint] saved {path}")
    return path


def maybe_samples(ctx: Stage, at_step: int, final: bool) -> None:
    cfg = ctx.cfg
    if cfg.sample_every < 0 or cfg.data == "random":
        return
    if not (final or (cfg.sample_every > 0 and at_step % cfg.sample_every == 0)):
        return
    if ctx.rt.master:
        for s in greedy_samples(ctx.model, ctx.tok, SAMPLE_PROMPTS):
            print0(f"[sample] {s['prompt']!r} -> {s['completion']!r}")
            ctx.metrics.log({"step": at_step, "sample": s})


def core_cadence(num_iterations: int) -> int:
    """CORE every 5% of the run when only --core-target is given: the stop lands within 5% of the horizon of the
    first step that passes, and 20 evals of 500 examples per task stay a few percent of a GPU run (CORE's 52,400
    examples took 89.6 s at d12 on one H100; d24's ~16K steps take hours)."""
    return max(1, math.ceil(num_iterations / 20))


def target_met(cfg: PretrainConfig, st: LoopState) -> bool:
    return bool(cfg.core_target) and st.target_reached is not None and st.target_reached["core"] >= cfg.core_target


def maybe_core(ctx: Stage, st: LoopState, final: bool) -> float | None:
    """CORE (500 examples per task, as nanochat's in-training eval) where due; its score, else None."""
    at_step = st.step
    if ctx.core_every <= 0 or not (final or at_step % ctx.core_every == 0):
        return None
    t0 = time.monotonic()
    bundle = core_eval.resolve_bundle(ctx.cfg.core_bundle)
    res = core_eval.evaluate_core(ctx.model, ctx.tok, bundle, max_per_task=500, device=ctx.rt.device)
    dt = time.monotonic() - t0
    st.core, st.core_seconds = res.get("core"), st.core_seconds + dt
    cost = st.core_seconds / st.train_time if st.train_time > 0 else float("nan")
    print0(f"[core] step {at_step}: {res.get('core_label', 'CORE')} {st.core} ({dt:.1f}s; CORE evals so far "
           f"{st.core_seconds:.1f}s = {cost:.1%} of the training time)")
    ctx.metrics.log({"step": at_step, "core": st.core, "core_seconds": dt})
    return st.core


def _report_target(ctx: Stage, st: LoopState) -> None:
    """The leaderboard's figure (nanochat's time-to-GPT-2): the wall clock of the training steps until CORE reached
    the target; evals and checkpoints are not counted, nor is the first step (compilation), as in `train_time`."""
    hit, rt = st.target_reached, ctx.rt
    assert hit is not None
    gpu = f"{rt.world_size} x {torch.cuda.get_device_name(rt.device)}" if rt.device.type == "cuda" else \
        f"{rt.world_size} x {rt.device.type}"
    rec = {"step": hit["step"], "core_target": ctx.cfg.core_target, "core": hit["core"],
           "time_to_target_s": hit["train_time_s"], "core_eval_s": round(st.core_seconds, 3), "hardware": gpu}
    ctx.metrics.log(rec)
    print0(f"[core] target {ctx.cfg.core_target:g} reached at step {hit['step']}/{ctx.plan.num_iterations}: CORE "
           f"{hit['core']:.4f}; time to target {hit['train_time_s'] / 3600:.3f} h ({hit['train_time_s']:.1f}s) of "
           f"training steps on {gpu} (evals and checkpoints not counted; CORE evals took {st.core_seconds:.1f}s "
           f"more); checkpoint {st.last_ckpt}")


def summarize(ctx: Stage, st: LoopState, timer: StepTimer) -> dict[str, Any]:
    plan, rt = ctx.plan, ctx.rt
    tokens_per_step = plan.total_batch_size
    summary = {
        "run": ctx.cfg.run, "step": st.step, "num_iterations": plan.num_iterations,
        "steps_this_run": st.step - st.start_step, "tokens": st.step * tokens_per_step, "val_bpb": st.val_bpb,
        "min_val_bpb": None if math.isinf(st.min_val_bpb) else st.min_val_bpb, "train_loss": st.last_loss,
        "train_time_s": round(st.train_time, 2),
        "tok_per_s": round(tokens_per_step / timer.mean()) if timer.mean() else None,
        "peak_mem_gb": peak_memory_gb(rt.device), "checkpoint": str(st.last_ckpt) if st.last_ckpt else None,
        "stopped_early": st.stopped_early, "params": plan.derived["params_total"], "fp8": ctx.info["fp8"],
        "fp8_scope": ctx.info["fp8_scope"], "startup": ctx.info.get("startup"),
    }
    if ctx.cfg.core_target:
        summary.update(core=st.core, core_target=ctx.cfg.core_target, target_reached=st.target_reached,
                       core_eval_s=round(st.core_seconds, 2))
    if ctx.scaler is not None:
        summary.update(loss_scale=ctx.scaler.scale, fp16_skipped_steps=ctx.scaler.skipped)
    if summary["tok_per_s"] and ctx.peak:
        summary["mfu"] = ctx.fpt * summary["tok_per_s"] / (ctx.peak * rt.world_size)
    return summary


def _wandb_init(cfg: PretrainConfig, plan: Plan):
    try:
        import wandb  # optional; not installed on the GPU machine
    except ImportError:
        raise UserError("--wandb: the wandb package is not installed; `pip install wandb` or drop --wandb") from None
    return wandb.init(project="picochat", name=f"{cfg.run}-base", config={**to_dict(cfg), **plan.derived})


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, PretrainConfig)


def config_from_cli(args: argparse.Namespace) -> PretrainConfig:
    preset = getattr(args, "preset", None)
    base = PRESETS.get(preset, {}) if isinstance(preset, str) else {}
    return config_from_args(PretrainConfig, args, **base)


def cli_main(args: argparse.Namespace) -> int:
    cfg = config_from_cli(args)
    try:
        summary = run(cfg, preset_applied=True)
    finally:
        teardown()
    print0(json.dumps({"pretrain": summary}, default=str))
    return 0



# ----------------------------------------------------------------------------------------------------------------
# `picochat bench pretrain`: steady-state steps of the training loop; every model, batch and optimizer flag of
# PretrainConfig applies


# Fields only the full run reads (the bench times a fixed number of steps: no evals, samples or checkpoints). The
# seed is left out too: the bench's weights come from seed 0 and its tokens from the config's seed, so its figures
# stay comparable across commits.
BENCH_SKIP = ("run", "num_iterations", "eval_every", "eval_tokens", "sample_every", "core_every", "core_bundle",
              "core_target", "save_every", "keep_last", "resume", "stop_at_step", "wandb", "seed")
# Fields whose bench default differs from the run's (declared below with their own help)
BENCH_DEFAULTS: dict[str, Any] = {"data": "random", "total_batch_size": -1}
BENCH_TOTAL_STEPS = 1000  # the schedules' horizon: long enough that no timed step reaches the warmdown


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after warmup)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile one more step and print its N biggest kernels by time, and "
                             "the time per category (matmul, attention, triton, ...)")
    add_config_args(parser, PretrainConfig, skip=BENCH_SKIP + tuple(BENCH_DEFAULTS))
    parser.add_argument("--data", default=argparse.SUPPRESS,
                        help="'random' tokens, or a shard directory (needs --tokenizer) (default: random)")
    parser.add_argument("--total-batch-size", type=int, default=argparse.SUPPRESS,
                        help="tokens per optimizer step (-1 = one micro-batch per process; 0 = the depth rule) "
                             "(default: -1)")


def bench_config(args: argparse.Namespace) -> PretrainConfig:
    """Defaults, then the bench's own defaults, then the preset, then the flags given."""
    preset = getattr(args, "preset", None)
    base = {**BENCH_DEFAULTS, **(PRESETS.get(preset, {}) if isinstance(preset, str) else {})}
    return config_from_args(PretrainConfig, args, **base)


def bench_main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = bench_config(args)
    check_ranges(cfg, {**PRETRAIN_BOUNDS, "total_batch_size": (-1, None)})  # -1: one micro-batch per process
    rt = init_runtime(cfg.device, cfg.dtype, 0)
    tok, _ = _load_tokenizer(cfg)
    B = cfg.device_batch_size or default_device_batch(cfg.depth, cfg.seq_len, rt.world_size, gpu_memory(rt.device),
                                                      fp8_planned(cfg.fp8, cfg.compile, cfg.depth, rt.device))
    cfg.device_batch_size = B
    if cfg.total_batch_size < 0:
        cfg.total_batch_size = B * cfg.seq_len * rt.world_size
    plan = make_plan(cfg, tok.vocab_size, rt.world_size, rt.device)
    check_memory(cfg, plan, rt.device, rt.world_size)
    model = build_model(plan.model_config, device=rt.device)
    cmodel, info = prepare_model(model, device=rt.device, dtype=rt.dtype, seq_len=cfg.seq_len, compile=cfg.compile,
                                 fp8=cfg.fp8, activation_budget=cfg.activation_budget)
    opt = make_optimizer(model, cfg, plan, compile_step=info["compiled"])
    scaler = loss_scaler(rt.dtype)
    loader = make_loader(cfg, tok, "train", plan.device_batch_size, rt, loop=True)
    batch = loader.next_batch()

    def steps(first: int, n: int) -> torch.Tensor:
        nonlocal batch
        loss = None
        for i in range(first, first + n):
            apply_schedules(opt, cfg, i, BENCH_TOTAL_STEPS)
            loss, batch = train_step(cmodel, opt, batch, loader.next_batch, plan.grad_accum, scaler)
        return loss

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    t0 = time.time()
    first_at = None  # seconds from process start to the end of the first optimizer step
    with (Heartbeat("bench", "compiling and warming up") as hb,
          warmup.CompileWatch(info["cache"], hb, info["compiled"]) as watch):
        loss = None
        if args.warmup:
            loss = steps(0, 1)
            synchronize(rt.device)
            first_at = time.time() - warmup.PROCESS_T0
        if args.warmup > 1:
            loss = steps(1, args.warmup - 1)
            synchronize(rt.device)
    warm_s = time.time() - t0
    print0(f"[bench] warmup {args.warmup} steps: {warm_s:.1f}s"
           + (f" (loss {loss.item():.3f})" if loss is not None else ""))
    info["startup"] = {"first_step_at_s": None if first_at is None else round(first_at, 1), "graphs": watch.graphs,
                       "compile_s": round(watch.compile_s, 1), "cache": (info["cache"] or {}).get("state"),
                       "model_parts": {k: round(v, 2) for k, v in info["prepare_s"].items()}}
    t0 = time.perf_counter()
    loss = steps(args.warmup, args.steps)
    synchronize(rt.device)
    dt = time.perf_counter() - t0
    prof = None
    if args.profile > 0:  # after the timing, so the profiler's overhead never shows in tok/s
        def one_step() -> None:
            nonlocal loss
            loss = steps(args.warmup + args.steps, 1)

        prof = profile_step(one_step, rt.device, top=args.profile)
    loader.close()
    return _bench_result(cfg, args, rt, plan, model, info, dt, warm_s, loss, prof)


def _bench_result(cfg: PretrainConfig, args: argparse.Namespace, rt: Any, plan: Plan, model: Any,
                  info: dict[str, Any], dt: float, warm_s: float, loss: torch.Tensor, prof: Any) -> dict[str, Any]:
    tok_s = args.steps * plan.total_batch_size / dt
    peak = peak_flops(rt.device)
    fpt = model.flops_per_token()
    mc = plan.model_config
    return {
        "depth": cfg.depth, "device": str(rt.device), "gpu": torch.cuda.get_device_name(rt.device)
        if rt.device.type == "cuda" else None, "world_size": rt.world_size, "dtype": str(rt.dtype),
        "compile": info["compiled"], "attention": attention.choose(rt.device, None, cfg.seq_len),
        "window_pattern": mc.window_pattern, "smear": mc.smear, "backout": mc.backout, "seq_len": cfg.seq_len,
        "device_batch_size": plan.device_batch_size, "total_batch_size": plan.total_batch_size,
        "grad_accum": plan.grad_accum, "params": plan.derived["params_total"],
        "flops_per_token": fpt, "steps": args.steps, "step_ms": round(1000 * dt / args.steps, 2),
        "tok_per_s": round(tok_s), "mfu": round(fpt * tok_s / (peak * rt.world_size), 4) if peak else None,
        "peak_mem_gb": round(peak_memory_gb(rt.device), 2) if rt.device.type == "cuda" else None,
        "warmup_s": round(warm_s, 1), "final_loss": round(float(loss.item()) / plan.grad_accum, 4),
        "fused_loss": model.fused_loss, "activation_budget": cfg.activation_budget, "fp8": info["fp8"],
        "fp8_scope": info["fp8_scope"], "data": cfg.data, "startup": info["startup"],
        **({"profile": prof} if prof is not None else {}),
    }
