"""`picochat rl`: on-policy policy gradient on problems with a numeric answer, with the python tool active.

Per step (nanochat's scripts/chat_rl.py, same recipe, plus resume and a stop-token fix):
- `examples_per_step` prompts (rank-strided over the training problems, in order, wrapping), `num_samples`
  completions each, sampled by the engine with tool use active (a python call's output is forced into the stream
  with mask 0), seeds derived from (seed, step, problem, sub-batch) so a resumed run samples the same tokens.
- reward 1.0 when the reply's final number equals the answer, else 0; advantage = reward - mean reward of the
  prompt's group (no std division, no KL, no clipping: strictly on-policy, one update per batch).
- loss = -sum_t logp_t * A / (number of sampled tokens in the step, all ranks): token-level normalisation; prompt
  tokens and forced tool-output tokens carry no gradient. A completion that stopped by itself also trains its
  `<|assistant_end|>`, so the policy is rewarded for stopping after a right answer.
- every `eval_every` steps: mean reward and pass@1..k on held-out problems (k samples each at the training
  temperature); checkpoints hold model, optimizer, RNG and step (the problem cursor is the step), so `--resume auto`
  continues exactly.

Tasks: `gsm8k` (GSM8K train; eval on GSM8K test), `synth` (the synthetic world's arithmetic: chat-train tool-use
questions; eval on the held-out `gen` items of eval.jsonl), or `jsonl:PATH` (rows {"messages", "answer"}, the
last 10% held out).
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from picochat import scaling
from picochat.config import UserError, add_config_args, check_ranges, config_from_args, require
from picochat.conversation import render_for_completion
from picochat.data.tasks import GSM8K, NumberAnswerTask, Task, synth_arithmetic
from picochat.engine import Engine
from picochat.runtime import Runtime, accum_dtype, print0
from picochat.stages.chat import ChatStageConfig, Stage, StepOut, inherit, is_synth_run, open_stage, train_loop

STAGE = "rl"


@dataclass
class RLConfig(ChatStageConfig):
    source: str = field(default="sft", metadata={"help": "checkpoint to start from: sft | mid | base | a directory"})
    task: str = field(default="auto", metadata={"help": "auto | synth | gsm8k | jsonl:PATH (auto: synth for "
                                                        "synth-trained bases, else gsm8k)"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the training problems"})
    examples_per_step: int = field(default=16, metadata={"help": "prompts per step (all ranks together)"})
    num_samples: int = field(default=16, metadata={"help": "completions per prompt (the group)"})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens sampled per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sample among the top k tokens (0: all)"})
    device_batch_size: int = field(default=8, metadata={"help": "sequences per sampling / training micro-batch"})
    lr_scale: float = field(default=0.0, metadata={"help": "multiplier of every LR (0: the source's)"})
    init_lr_frac: float = field(default=0.05, metadata={"help": "multiplier on the inherited learning rates"})
    eval_every: int = field(default=60, metadata={"help": "held-out reward and pass@k every N steps"})
    eval_examples: int = field(default=400, metadata={"help": "held-out problems per eval"})
    pass_k: int = field(default=8, metadata={"help": "samples per held-out problem (pass@1..k)"})
    save_every: int = field(default=60, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    seed: int = field(default=42, metadata={"help": "sampling seed"})


# ----------------------------------------------------------------------------------------------------------------
# Tasks


def build_tasks(cfg: RLConfig, meta: dict) -> tuple[Task, Task, str]:
    kind = cfg.task if cfg.task != "auto" else ("synth" if is_synth_run(meta) else "gsm8k")
    if kind == "synth":
        return synth_arithmetic("train"), synth_arithmetic("test"), kind
    if kind == "gsm8k":
        return GSM8K("train", task_dir=cfg.task_dir or None), GSM8K("test", task_dir=cfg.task_dir or None), kind
    if kind.startswith("jsonl:"):
        full = NumberAnswerTask.from_jsonl(kind[len("jsonl:"):])
        n_test = max(1, len(full) // 10)
        if len(full) < 2:
            raise UserError(f"--task {kind}: need at least 2 problems (the last 10% are held out)")
        train = NumberAnswerTask(full.rows[:-n_test], name=full.name + ":train")
        test = NumberAnswerTask(full.rows[-n_test:], name=full.name + ":test")
        return train, test, kind
    raise UserError(f"--task {cfg.task!r}: expected auto, synth, gsm8k or jsonl:PATH")


def _seed(*parts: int) -> int:
    """A sampling seed from integers, stable across processes and Python versions (no hash randomisation)."""
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------------------------
# Rollouts


@torch.no_grad()
def sample_group(engine, tokenizer, task: Task, conv: dict, num_samples: int, cfg: RLConfig, seed: int
                 ) -> tuple[list[list[int]], list[list[int]], list[float], int]:
    """`num_samples` completions of one problem: (sequences, masks, rewards, prompt length).

    Sequences are prompt + completion; masks are 1 on sampled tokens only. Sampling runs in sub-batches of
    `device_batch_size`, each with its own seed."""
    prompt = render_for_completion(tokenizer, conv)
    seqs, masks, rewards = [], [], []
    end = tokenizer.encode_special("<|assistant_end|>")
    for sub, lo in enumerate(range(0, num_samples, cfg.device_batch_size)):
        n = min(cfg.device_batch_size, num_samples - lo)
        s_seqs, s_masks = engine.generate_batch(prompt, num_samples=n, max_tokens=cfg.max_new_tokens,
                                                temperature=cfg.temperature, top_k=cfg.top_k or None,
                                                seed=_seed(seed, sub))
        for s, m in zip(s_seqs, s_masks):
            completion = s[len(prompt):]
            rewards.append(task.reward(conv, tokenizer.decode(completion)))
            if len(completion) < cfg.max_new_tokens:  # it stopped by itself: train the stop token too
                s, m = s + [end], m + [1]
            seqs.append(s)
            masks.append(m)
    return seqs, masks, rewards, len(prompt)


LEN_BUCKET = 256  # a compiled model's update rows are padded to a multiple of this many positions (below)


def update_shape(seqs: list[list[int]], rows: int, max_len: int) -> tuple[int, int]:
    """The (rows, positions) a compiled policy update runs at: sampled lengths change every step and the last
    micro-batch may be short, and a model compiled with dynamic=False compiles a graph per new shape (tens of
    seconds on a GPU each, and past Dynamo's recompile limit it falls back to eager). Padding the micro-batch to
    `rows` and the length to a multiple of LEN_BUCKET (capped at the context) bounds them to a few; padded
    positions have no target, and causal attention keeps them out of the real ones."""
    T = max(len(s) for s in seqs) - 1
    return max(rows, len(seqs)), max(T, min(-(-T // LEN_BUCKET) * LEN_BUCKET, max_len))


def _policy_loss(model, seqs: list[list[int]], masks: list[list[int]], advantages: list[float], denom: float,
                 device: torch.device, pad: int, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """-sum(logp * A) over sampled tokens of a micro-batch, divided by the step's sampled-token count. `shape`:
    (rows, positions) to pad to (update_shape); padding rows and positions carry no target."""
    B, T = shape or (len(seqs), max(len(s) for s in seqs) - 1)
    advantages = list(advantages) + [0.0] * (B - len(seqs))
    x = torch.full((B, T), pad, dtype=torch.long)
    y = torch.full((B, T), -1, dtype=torch.long)
    for r, (s, m) in enumerate(zip(seqs, masks)):
        ids = torch.tensor(s)
        x[r, :len(s) - 1] = ids[:-1]
        tgt = ids[1:].clone()
        tgt[torch.tensor(m[1:]) == 0] = -1
        y[r, :len(s) - 1] = tgt
    x, y = x.to(device), y.to(device)
    logits = model(x)
    logp = -F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1,
                            reduction="none").view(y.shape)
    adv = torch.tensor(advantages, dtype=torch.float32, device=device).unsqueeze(1)
    return -(logp * adv * (y >= 0)).sum() / denom


@torch.no_grad()
def evaluate_pass_k(engine, tokenizer, task: Task, cfg: RLConfig, n: int, k: int, seed: int, rank: int,
                    world: int, device: torch.device) -> dict[str, float]:
    """Mean reward and pass@1..k over the first `n` held-out problems (rank-strided, reduced over ranks)."""
    n = min(n, len(task))
    hits = torch.zeros(k + 2, dtype=accum_dtype(device), device=device)  # pass@1..k, mean reward, count
    for i in range(rank, n, world):
        conv = task[i]
        _, _, rewards, _ = sample_group(engine, tokenizer, task, conv, k, cfg, _seed(seed, 10**9 + i))
        for j in range(k):
            hits[j] += float(any(r > 0 for r in rewards[:j + 1]))
        hits[k] += sum(rewards) / len(rewards)
        hits[k + 1] += 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(hits)
    cnt = float(hits[k + 1].clamp(min=1))
    out = {f"pass@{j + 1}": float(hits[j]) / cnt for j in range(k)}
    out["eval_reward"] = float(hits[k]) / cnt
    return out


# ----------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class RLJob:
    """The problems a run trains and evaluates on, and the sampler (filled by the setup)."""

    cfg: RLConfig
    train: Task | None = None
    test: Task | None = None
    kind: str = ""
    engine: Engine | None = None


def run(cfg: RLConfig) -> dict[str, Any]:
    """Policy-gradient the run's sft checkpoint into `runs/<run>/rl/`."""
    source, order = ("auto", ("sft", "mid", "base")) if cfg.source == "sft" else (cfg.source, (cfg.source,))
    job = RLJob(cfg)
    # RL has no packed rows: the shape's batch fields are placeholders, only the learning rates matter (one rank)
    shape_of = partial(_rl_shape, cfg)
    with open_stage(STAGE, cfg, source=source, source_order=order, shape_of=shape_of,
                    setup=partial(_setup_rl, job), check=partial(_check, cfg)) as st:
        print0(f"[rl] run {st.run} from {st.src_ckpt} | {st.rt.describe()} | task {job.kind}: {len(job.train)} "
               f"train, {len(job.test)} held-out | {st.num_steps} steps x {cfg.examples_per_step} prompts x "
               f"{cfg.num_samples} samples | lrs matrix {st.shape['matrix_lr']:.3g} emb "
               f"{st.shape['embedding_lr']:.3g}")
        done = st.already_trained()
        if done is not None:
            return done
        final = train_loop(st, step_fn=partial(_rl_step, job), evaluate=partial(_rl_eval, job),
                           lr_at=scaling.rl_lr_multiplier, doing="sampling and training",
                           oom_shape=(cfg.device_batch_size, None, None))
        if final is not None:
            print0(f"[rl] done: {st.step} steps | " + " | ".join(f"{k} {v:.4f}" for k, v in final.items()
                                                               if k != "step"))
        return st.result(final)


def _rl_shape(cfg: RLConfig, meta: dict, world_size: int) -> dict[str, Any]:
    return inherit(cfg, meta, 1, max_seq_len=0, device_batch_size=1, total_batch_size=0)


def _check(cfg: RLConfig, rt: Runtime) -> None:
    check_ranges(cfg, {"examples_per_step": (1, None), "max_new_tokens": (1, None), "temperature": (0, None),
                       "top_k": (0, None), "device_batch_size": (1, None), "eval_examples": (0, None),
                       "pass_k": (1, None)})
    require(cfg.examples_per_step % rt.world_size == 0,
            f"--examples-per-step {cfg.examples_per_step} must be divisible by the number of ranks {rt.world_size}")
    require(cfg.num_samples >= 2, f"--num-samples {cfg.num_samples}: a group needs at least 2 samples")
    if cfg.task.startswith("jsonl:"):
        require(Path(cfg.task[len("jsonl:"):]).is_file(),
                f"--task {cfg.task}: no such file; pass jsonl:PATH of a JSONL file of problems, or auto, synth, gsm8k")


def _setup_rl(job: RLJob, st: Stage) -> tuple[int, dict[str, Any]]:
    cfg = job.cfg
    job.train, job.test, job.kind = build_tasks(cfg, st.src_meta)
    job.engine = Engine(st.model, st.tok, compile=False)  # weights change every step: no decode graphs to rebuild
    num_steps = cfg.num_iterations or max(1, int(len(job.train) * cfg.num_epochs) // cfg.examples_per_step)
    return num_steps, {"task": job.kind}


def _rollouts(job: RLJob, st: Stage) -> tuple[list[list[int]], list[list[int]], list[float], list[float]]:
    """This rank's prompts of the step, `num_samples` completions each: sequences, masks, advantages, rewards."""
    cfg, rt = job.cfg, st.rt
    seqs, masks, advs, rewards = [], [], [], []
    for j in range(cfg.examples_per_step // rt.world_size):
        idx = (st.step * cfg.examples_per_step + rt.rank + j * rt.world_size) % len(job.train)
        conv = job.train[idx]
        g_seqs, g_masks, g_rewards, _ = sample_group(job.engine, st.tok, job.train, conv, cfg.num_samples, cfg,
                                                     _seed(cfg.seed, st.step, idx))
        mean = sum(g_rewards) / len(g_rewards)
        seqs += g_seqs
        masks += g_masks
        advs += [r - mean for r in g_rewards]
        rewards += g_rewards
    return seqs, masks, advs, rewards


def _rl_step(job: RLJob, st: Stage) -> StepOut:
    """Rollouts, then one policy-gradient update, token-level normalised over the whole step."""
    cfg, rt = job.cfg, st.rt
    st.model.eval()  # no dropout exists, but keeps any future train-only behaviour out of the rollouts
    seqs, masks, advs, rewards = _rollouts(job, st)
    st.model.train()
    n_tok = torch.tensor([float(sum(sum(m[1:]) for m in masks)), float(sum(rewards)), float(len(rewards)),
                          float(sum(len(s) for s in seqs))], device=rt.device)
    if rt.distributed:
        dist.all_reduce(n_tok)
    denom = float(n_tok[0].clamp(min=1.0))
    loss_sum = torch.zeros((), device=rt.device)
    n_micro = (len(seqs) + cfg.device_batch_size - 1) // cfg.device_batch_size
    for b in range(n_micro):
        sl = slice(b * cfg.device_batch_size, (b + 1) * cfg.device_batch_size)
        # no skipping of zero-advantage micro-batches: every rank must run the same backward passes, so the
        # optimizer's gradient reductions (launched from backward hooks) happen in the same order everywhere
        shape = (update_shape(seqs[sl], cfg.device_batch_size, st.model.config.sequence_len)
                 if st.info["compiled"] else None)
        loss = _policy_loss(st.train_model, seqs[sl], masks[sl], advs[sl], denom, rt.device, st.tok.bos_id, shape)
        st.arm(b == n_micro - 1)
        st.backward(loss * rt.world_size)  # the optimizer averages gradients over ranks
        loss_sum += loss.detach()
    _ensure_grads(st.model)
    mean_reward, mean_len = float(n_tok[1] / n_tok[2]), float(n_tok[3] / n_tok[2])
    return StepOut(loss_sum, float(n_tok[3]), f"reward {mean_reward:.3f} | len {mean_len:.0f}",
                   {"reward": mean_reward, "seq_len": mean_len})


def _rl_eval(job: RLJob, st: Stage, at_step: int) -> dict[str, float]:
    cfg = job.cfg
    st.model.eval()
    out = evaluate_pass_k(job.engine, st.tok, job.test, cfg, cfg.eval_examples, cfg.pass_k, cfg.seed, st.rt.rank,
                          st.rt.world_size, st.rt.device)
    st.model.train()
    return out


def _ensure_grads(model: torch.nn.Module) -> None:
    """Give every parameter a gradient (zeros where the step had none) so every rank's optimizer runs the same
    collectives, even when one rank's groups all had zero advantage."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, RLConfig)


def cli_main(args: argparse.Namespace) -> int:
    run(config_from_args(RLConfig, args))
    return 0
