"""`picochat rl`: on-policy policy gradient on problems with a numeric answer, with the python tool active.

Per step (nanochat.md 6.4, same recipe, plus resume and a stop-token fix):
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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from picochat import checkpoint as ckpt_mod
from picochat.config import UserError, add_config_args, config_from_args, require, to_dict
from picochat.conversation import render_for_completion
from picochat.runtime import init_runtime, print0, stage_dir, teardown
from picochat.stages.sft import build_optimizer, inherit, is_synth_run, load_optimizer_shards, resolve_source, set_lr
from picochat.data.tasks import GSM8K, NumberAnswerTask, Task, synth_arithmetic

STAGE = "rl"


@dataclass
class RLConfig:
    run: str = field(default="", metadata={"help": "run name (default: the run that holds the source checkpoint)"})
    source: str = field(default="sft", metadata={"help": "checkpoint to start from: sft | mid | base | a directory"})
    resume: str = field(default="auto", metadata={"help": "auto (continue this stage if it has a checkpoint) | never"})
    task: str = field(default="auto", metadata={"help": "auto | synth | gsm8k | jsonl:PATH (auto: synth for "
                                                        "synth-trained bases, else gsm8k)"})
    task_dir: str = field(default="", metadata={"help": "task data directory (default PICOCHAT_HOME/tasks)"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the training problems"})
    num_iterations: int = field(default=0, metadata={"help": "optimizer steps (0: from num_epochs)"})
    examples_per_step: int = field(default=16, metadata={"help": "prompts per step (all ranks together)"})
    num_samples: int = field(default=16, metadata={"help": "completions per prompt (the group)"})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens sampled per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sample among the top k tokens (0: all)"})
    device_batch_size: int = field(default=8, metadata={"help": "sequences per sampling / training micro-batch"})
    matrix_lr: float = field(default=0.0, metadata={"help": "Muon LR (0: inherit x init_lr_frac)"})
    embedding_lr: float = field(default=0.0, metadata={"help": "embedding LR (0: inherit x init_lr_frac)"})
    unembedding_lr: float = field(default=0.0, metadata={"help": "lm head LR (0: inherit x init_lr_frac)"})
    lr_scale: float = field(default=0.0, metadata={"help": "multiplier of every LR (0: the source's)"})
    init_lr_frac: float = field(default=0.05, metadata={"help": "multiplier on the inherited learning rates"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    load_optimizer: bool = field(default=False, metadata={"help": "warm-start the optimizer from the source"})
    eval_every: int = field(default=60, metadata={"help": "held-out reward and pass@k every N steps"})
    eval_examples: int = field(default=400, metadata={"help": "held-out problems per eval"})
    pass_k: int = field(default=8, metadata={"help": "samples per held-out problem (pass@1..k)"})
    save_every: int = field(default=60, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints to keep"})
    seed: int = field(default=42, metadata={"help": "sampling seed"})
    device: str = field(default="", metadata={"help": "cpu | cuda | mps (default: best available)"})
    dtype: str = field(default="", metadata={"help": "compute dtype (default: bf16 on CUDA, fp32 elsewhere)"})


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


def _policy_loss(model, seqs: list[list[int]], masks: list[list[int]], advantages: list[float], denom: float,
                 device: torch.device, pad: int) -> torch.Tensor:
    """-sum(logp * A) over sampled tokens of a micro-batch, divided by the step's sampled-token count."""
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
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
    hits = torch.zeros(k + 2, dtype=torch.float64, device=device)  # pass@1..k, mean reward, count
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


def run(cfg: RLConfig) -> dict[str, Any]:
    """Policy-gradient the run's sft checkpoint into `runs/<run>/rl/`."""
    rt = init_runtime(cfg.device or None, cfg.dtype or None, seed=cfg.seed)
    try:
        return _run(cfg, rt)
    finally:
        teardown()


def _run(cfg: RLConfig, rt) -> dict[str, Any]:
    from picochat import training
    from picochat.engine import Engine

    require(cfg.examples_per_step % rt.world_size == 0,
            f"--examples-per-step {cfg.examples_per_step} must be divisible by the number of ranks {rt.world_size}")
    require(cfg.num_samples >= 2, f"--num-samples {cfg.num_samples}: a group needs at least 2 samples")
    order = ("sft", "mid", "base") if cfg.source == "sft" else (cfg.source,)
    run_name, src_ckpt = resolve_source("auto" if cfg.source == "sft" else cfg.source, cfg.run, order)
    out_dir = stage_dir(run_name, STAGE)
    ckpt_root = out_dir / "checkpoints"
    resume_from = training.find_resume_checkpoint(ckpt_root, cfg.resume)
    model, tok, meta = ckpt_mod.load_model(resume_from or src_ckpt, device=rt.device, dtype=rt.dtype)
    src_meta = ckpt_mod.read_meta(src_ckpt)
    model.train()
    train_task, test_task, kind = build_tasks(cfg, src_meta)
    per_rank = cfg.examples_per_step // rt.world_size
    num_steps = cfg.num_iterations or max(1, int(len(train_task) * cfg.num_epochs) // cfg.examples_per_step)
    shape = inherit(_LRView(cfg), src_meta, 1) if resume_from is None else meta["inherited"]
    opt = build_optimizer(model, shape, cfg.weight_decay)
    step = 0
    if resume_from is not None:
        _, rank_state = ckpt_mod.load_rank_files(resume_from, map_location="cpu")
        if rank_state is None:
            raise UserError(f"{resume_from}: no state file for rank {rt.rank}; use --resume never")
        opt.load_state_dict(load_optimizer_shards(resume_from))
        training.restore_rng_state(rank_state["rng"], rt.device)
        step = int(meta["step"])
        num_steps = int(meta["num_steps"]) if not cfg.num_iterations else num_steps
        print0(f"[rl] resuming from {resume_from} at step {step}/{num_steps}")
    elif cfg.load_optimizer:
        opt.load_state_dict(load_optimizer_shards(src_ckpt))
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"]

    resolved = {**to_dict(cfg), "run": run_name, "source_checkpoint": str(src_ckpt), "task": kind}
    training.write_run_header(out_dir, resolved, rt.device, extra={"stage": STAGE, "inherited": shape,
                                                                   "num_steps": num_steps})
    metrics = training.MetricsLogger(out_dir / "metrics.jsonl", resume_step=step if resume_from else None)
    stop = training.StopFlag.install()
    engine = Engine(model, tok, compile=False)  # weights change every step: no compiled decode graphs to rebuild
    print0(f"[rl] run {run_name} from {src_ckpt} | {rt.describe()} | task {kind}: {len(train_task)} train, "
           f"{len(test_task)} held-out | {num_steps} steps x {cfg.examples_per_step} prompts x {cfg.num_samples} "
           f"samples | lrs matrix {shape['matrix_lr']:.3g} emb {shape['embedding_lr']:.3g}")
    base_meta = {"stage": STAGE, "run": run_name, "model_config": meta["model_config"],
                 "tokenizer_dir": meta["tokenizer_dir"], "config": resolved, "inherited": shape,
                 "parent": str(src_ckpt), "num_steps": num_steps}
    last_ckpt: Path | None = resume_from
    last_eval: dict = {}

    def save(at_step: int, m: dict) -> Path:
        state = {"rng": training.capture_rng_state(rt.device), "step": at_step}
        return ckpt_mod.save_checkpoint(ckpt_root, at_step, model.state_dict() if rt.master else None,
                                        opt.state_dict(), {**base_meta, "metrics": m}, state, keep_last=cfg.keep_last)

    def evaluate(at_step: int) -> dict:
        model.eval()
        out = {"step": at_step, **evaluate_pass_k(engine, tok, test_task, cfg, cfg.eval_examples, cfg.pass_k,
                                                  cfg.seed, rt.rank, rt.world_size, rt.device)}
        model.train()
        print0(f"[rl] eval step {at_step}: " + " | ".join(f"{k} {v:.4f}" for k, v in out.items() if k != "step"))
        metrics.log(out)
        return out

    if resume_from is not None and step >= num_steps:
        print0(f"[rl] {run_name} is already trained for {step}/{num_steps} steps ({resume_from}); "
               f"use --resume never to train it again")
        metrics.close()
        stop.restore()
        return {"stage": STAGE, "run": run_name, "step": step, "checkpoint": str(resume_from),
                "num_steps": num_steps, **{k: v for k, v in (meta.get("metrics") or {}).items() if k != "step"}}
    timer = training.StepTimer(skip=0)
    try:
        with training.Heartbeat(STAGE, "sampling and training") as hb:
            while step < num_steps:
                if cfg.eval_every and step % cfg.eval_every == 0 and (resume_from is None or step > int(meta["step"])):
                    last_eval = evaluate(step)
                timer.start()
                lrm = 1.0 - step / num_steps  # linear decay to 0
                set_lr(opt, lrm)
                # --- rollouts (eval mode: no dropout exists, but keeps any future train-only behaviour out) ---
                model.eval()
                seqs, masks, advs, rewards = [], [], [], []
                for j in range(per_rank):
                    idx = (step * cfg.examples_per_step + rt.rank + j * rt.world_size) % len(train_task)
                    conv = train_task[idx]
                    g_seqs, g_masks, g_rewards, _ = sample_group(engine, tok, train_task, conv, cfg.num_samples, cfg,
                                                                 _seed(cfg.seed, step, idx))
                    mean = sum(g_rewards) / len(g_rewards)
                    seqs += g_seqs
                    masks += g_masks
                    advs += [r - mean for r in g_rewards]
                    rewards += g_rewards
                model.train()
                # --- one policy-gradient update, token-level normalised over the whole step ---
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
                    loss = _policy_loss(model, seqs[sl], masks[sl], advs[sl], denom, rt.device, tok.bos_id)
                    opt.arm(b == n_micro - 1)
                    (loss * rt.world_size).backward()  # the optimizer averages gradients over ranks
                    loss_sum += loss.detach()
                _ensure_grads(model)
                opt.step()
                model.zero_grad(set_to_none=True)
                step += 1
                loss_val, stop_now = training.agree_on_step(loss_sum * rt.world_size, stop.requested, rt.device)
                training.check_finite(loss_val, step, last_ckpt)
                dt = timer.stop()
                hb.beat()
                mean_reward = float(n_tok[1] / n_tok[2])
                mean_len = float(n_tok[3] / n_tok[2])
                print0(training.format_step_line(step, num_steps, loss_val, lrm, dt, float(n_tok[3]) / max(dt, 1e-9),
                                                 eta_s=timer.eta(num_steps - step, dt),
                                                 extra=f"reward {mean_reward:.3f} | len {mean_len:.0f}"))
                metrics.log({"step": step, "loss": loss_val, "reward": mean_reward, "seq_len": mean_len, "lrm": lrm,
                             "dt": dt})
                if stop_now:
                    last_ckpt = save(step, last_eval)
                    print0(f"[rl] stopped by {stop.signame or 'signal'} at step {step}; checkpoint {last_ckpt}")
                    stop.restore()
                    metrics.close()
                    return {"stage": STAGE, "run": run_name, "step": step, "stopped": True,
                            "checkpoint": str(last_ckpt)}
                if cfg.save_every and step % cfg.save_every == 0 and step < num_steps:
                    last_ckpt = save(step, last_eval)
            final = evaluate(step)
            last_ckpt = save(step, final)
    except torch.OutOfMemoryError as e:
        raise training.out_of_memory(STAGE, step + 1, cfg.device_batch_size, None, None, rt.device,
                                     last_ckpt) from e
    stop.restore()
    metrics.close()
    print0(f"[rl] done: {step} steps | " + " | ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "step"))
    return {"stage": STAGE, "run": run_name, "step": step, "checkpoint": str(last_ckpt), "num_steps": num_steps,
            **{k: v for k, v in final.items() if k != "step"}}


def _ensure_grads(model: torch.nn.Module) -> None:
    """Give every parameter a gradient (zeros where the step had none) so every rank's optimizer runs the same
    collectives, even when one rank's groups all had zero advantage."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


class _LRView:
    """RLConfig seen through the fields `sft.inherit` reads (RL has no packing: batch fields are placeholders)."""

    def __init__(self, cfg: RLConfig):
        self.max_seq_len, self.device_batch_size, self.total_batch_size = 0, 1, 0
        self.matrix_lr, self.embedding_lr, self.unembedding_lr = cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr
        self.init_lr_frac, self.lr_scale = cfg.init_lr_frac, cfg.lr_scale


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, RLConfig)


def cli_main(args: argparse.Namespace) -> int:
    run(config_from_args(RLConfig, args))
    return 0
