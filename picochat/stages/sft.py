"""`picochat sft`: supervised fine-tuning on conversations with a masked loss.

- Starts from the run's mid checkpoint when there is one, else its base checkpoint (`--source` picks another).
- Inherits the model config, sequence length, batch sizes and learning rates of the source checkpoint unless a flag
  overrides them; `--load-optimizer` warm-starts the optimizer from the source's state (same world size).
- Batches: BOS-aligned best-fit packing with padding. Each row of `max_seq_len + 1` tokens takes whole rendered
  conversations, largest that fits first, from a buffer; the rest is padding with target -1. A conversation is never
  cropped: longer ones were already cut to whole turns (or dropped, counted) by `conversation.render`, so every
  conversation fits an empty row and every row holds at least one trained token.
- Loss: targets are -1 outside the assistant's own tokens (see conversation.py); the step's loss is the sum over
  all trained tokens of all micro-batches and ranks divided by their count, so short and long answers weigh the
  same per token whatever the packing.
- Resume (`--resume auto`): the checkpoint holds the model, each rank's optimizer state, its loader cursor + buffer,
  its RNG state and the step, so a resumed run continues exactly as if it had never stopped.

This module also holds the machinery midtrain.py and rl.py share (source loading, inheritance, packing, the loop).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from picochat import checkpoint as ckpt_mod
from picochat.config import UserError, add_config_args, config_from_args, require, to_dict
from picochat.conversation import RenderStats, render
from picochat.runtime import init_runtime, print0, stage_dir, teardown
from picochat.data.tasks import SynthMC, Task, TaskMixture, parse_mixture

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ChatTrainConfig:
    """Flags shared by midtrain and sft (each stage subclasses it with its own defaults)."""

    run: str = field(default="", metadata={"help": "run name (default: the run that holds the source checkpoint)"})
    source: str = field(default="auto", metadata={"help": "checkpoint to start from: auto | base | mid | sft | a "
                                                          "checkpoint directory"})
    resume: str = field(default="auto", metadata={"help": "auto (continue this stage if it has a checkpoint) | never"})
    mixture: str = field(default="auto", metadata={"help": "training tasks, e.g. 'smoltalk,gsm8k*2,identity@1000' "
                                                           "(auto: synth set for synth-trained bases, else the "
                                                           "nanochat mixture)"})
    val_mixture: str = field(default="auto", metadata={"help": "validation tasks (same syntax)"})
    data_file: list[str] = field(default_factory=list, metadata={"help": "extra JSONL files of conversations"})
    task_dir: str = field(default="", metadata={"help": "task data directory (default PICOCHAT_HOME/tasks)"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the training mixture"})
    num_iterations: int = field(default=0, metadata={"help": "optimizer steps (0: from num_epochs)"})
    max_seq_len: int = field(default=0, metadata={"help": "row length in tokens (0: inherit from the source)"})
    device_batch_size: int = field(default=0, metadata={"help": "rows per micro-batch (0: inherit)"})
    total_batch_size: int = field(default=0, metadata={"help": "tokens per optimizer step (0: inherit)"})
    matrix_lr: float = field(default=0.0, metadata={"help": "Muon LR of matrices (0: inherit)"})
    embedding_lr: float = field(default=0.0, metadata={"help": "AdamW LR of embeddings (0: inherit)"})
    unembedding_lr: float = field(default=0.0, metadata={"help": "AdamW LR of the lm head (0: inherit)"})
    lr_scale: float = field(default=0.0, metadata={"help": "multiplier of every LR (0: the source's, or "
                                                           "sqrt(batch / 2^19) when --total-batch-size is set)"})
    init_lr_frac: float = field(default=0.8, metadata={"help": "multiplier on the inherited learning rates"})
    warmdown_frac: float = field(default=0.5, metadata={"help": "last fraction of training that decays LR to 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    load_optimizer: bool = field(default=False, metadata={"help": "warm-start the optimizer from the source"})
    eval_every: int = field(default=100, metadata={"help": "val loss + chat eval every N steps (0: only at end)"})
    eval_batches: int = field(default=20, metadata={"help": "micro-batches of validation per val loss"})
    chat_eval_items: int = field(default=256, metadata={"help": "categorical questions per chat eval"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints to keep"})
    buffer_size: int = field(default=100, metadata={"help": "conversations the best-fit packer chooses from"})
    seed: int = field(default=42, metadata={"help": "mixture shuffle and RNG seed"})
    device: str = field(default="", metadata={"help": "cpu | cuda | mps (default: best available)"})
    dtype: str = field(default="", metadata={"help": "compute dtype (default: bf16 on CUDA, fp32 elsewhere)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (variable shapes: off)"})


@dataclass
class SFTConfig(ChatTrainConfig):
    pass


STAGE = "sft"

# The nanochat mixtures (nanochat.md 6.1-6.3), with our task names.
FULL_SFT_MIXTURE = "smoltalk,mmlu:auxiliary_train*3,gsm8k*4,identity@2000,simple_spelling@20000,spelling_bee@8000"
FULL_MID_MIXTURE = "smoltalk,mmlu:auxiliary_train,gsm8k,identity@2000,simple_spelling@200000,spelling_bee@80000"
FULL_VAL_MIXTURE = "smoltalk:test,mmlu:test@5200,gsm8k:test@420"
SYNTH_MIXTURE = "synth,identity@200,spelling_bee@200"
SYNTH_VAL_MIXTURE = "synth:val"


# ----------------------------------------------------------------------------------------------------------------
# Source checkpoint and inheritance


def resolve_source(source: str, run: str, order: Sequence[str]) -> tuple[str, Path]:
    """(run name, checkpoint dir) of the checkpoint a stage starts from.

    `source` is a stage name, a checkpoint directory, or "auto" (the first of `order` that the run has)."""
    if source not in ("auto", *ckpt_mod.STAGES):
        p = Path(source).expanduser()
        if (p / "meta.json").exists():
            meta = ckpt_mod.read_meta(p)
            return run or meta.get("run") or p.parent.parent.parent.name, p
        latest = ckpt_mod.latest_checkpoint(p / "checkpoints") or ckpt_mod.latest_checkpoint(p)
        if latest is None:
            raise UserError(f"--source {source!r}: not a stage name ({', '.join(ckpt_mod.STAGES)}) and not a "
                            f"checkpoint directory")
        return run or ckpt_mod.read_meta(latest).get("run") or "default", latest
    stages = list(order) if source == "auto" else [source]
    last_error: UserError | None = None
    for stage in stages:
        try:
            return ckpt_mod.find_run_with_stage(stage, run or None)
        except UserError as e:
            last_error = e
    assert last_error is not None
    raise last_error


def _src_value(meta: dict, keys: Sequence[str], default: Any = None) -> Any:
    """A hyperparameter of the source checkpoint: what a chat stage inherited, else the source's resolved config
    (pretrain names some fields differently), else what pretraining derived from its depth, else `default`.
    Zero and empty mean "not set" (that is how the configs spell "derive it")."""
    for section in ("inherited", "config", "derived"):
        d = meta.get(section) or {}
        for k in keys:
            v = d.get(k)
            if v not in (None, 0, 0.0, ""):
                return v
    return default


def inherit(cfg: ChatTrainConfig, meta: dict, world_size: int) -> dict[str, Any]:
    """Resolved shape and learning rates: explicit flags win, then the source checkpoint, then defaults."""
    from picochat import scaling

    mc = meta.get("model_config") or {}
    seq = cfg.max_seq_len or int(_src_value(meta, ("max_seq_len", "seq_len"), mc.get("sequence_len", 2048)))
    seq = min(seq, int(mc.get("sequence_len", seq)) * 4)  # the rotary table covers 4x the trained context
    tbs = cfg.total_batch_size or int(_src_value(meta, ("total_batch_size",), 0) or 0)
    dbs = cfg.device_batch_size or int(_src_value(meta, ("device_batch_size",), 0) or max(1, 65536 // seq))
    if not cfg.device_batch_size and mc.get("n_layer"):
        # chat stages train in bf16: fp8 pretraining's doubled micro-batch (d20 x 32: 58.5 GB) would need 72 GB here
        dbs = min(dbs, scaling.device_batch_size(int(mc["n_layer"]), seq))
    if not tbs:
        tbs = dbs * seq * world_size
    if not cfg.device_batch_size:
        # an inherited micro-batch may not divide the batch on this many ranks (or at this length): shrink it
        while dbs > 1 and (tbs % (dbs * seq * world_size) or dbs * seq * world_size > tbs):
            dbs -= 1
    per_step = dbs * seq * world_size
    if tbs % per_step:
        raise UserError(f"--total-batch-size {tbs} must be a multiple of device_batch_size x max_seq_len x ranks "
                        f"= {dbs} x {seq} x {world_size} = {per_step}")
    # Learning rates: the source's base values (before its batch/width scaling, which build_optimizer re-applies for
    # this stage's batch) times init_lr_frac; an explicit flag is taken as is.
    lrs = {}
    for name, default in (("matrix_lr", scaling.MATRIX_LR), ("embedding_lr", scaling.EMBEDDING_LR),
                          ("unembedding_lr", scaling.UNEMBEDDING_LR), ("value_embed_lr", scaling.VALUE_EMBED_LR),
                          ("resid_lr", scaling.RESID_LR), ("x0_lr", scaling.X0_LR)):
        explicit = getattr(cfg, name, 0.0)
        lrs[name] = explicit if explicit else float(_src_value(meta, (name,), default)) * cfg.init_lr_frac
    # an explicit --lr-scale of the source pretraining is kept; otherwise the sqrt(batch) rule for this batch
    if getattr(cfg, "lr_scale", 0.0):
        scale = float(cfg.lr_scale)
    elif cfg.total_batch_size:  # a new batch size: the sqrt(batch) rule for it
        scale = scaling.lr_scale(tbs)
    else:  # the source's own scale (an explicit --lr-scale of pretraining is kept), else the rule
        scale = float((meta.get("inherited") or {}).get("lr_scale") or (meta.get("config") or {}).get("lr_scale")
                      or scaling.lr_scale(tbs))
    return {"max_seq_len": seq, "device_batch_size": dbs, "total_batch_size": tbs, "grad_accum": tbs // per_step,
            "n_embd": int(mc.get("n_embd", 768)), "lr_scale": scale,
            "synth": is_synth_run(meta), **lrs}


def is_synth_run(meta: dict) -> bool:
    """Whether the source was pretrained on the embedded synthetic corpus (so the synth chat set matches it)."""
    inherited = meta.get("inherited") or {}
    if "synth" in inherited:
        return bool(inherited["synth"])
    cfg = meta.get("config") or {}
    data = cfg.get("data", cfg.get("data_dir"))
    if data is None:
        return False
    return not data or "synth" in str(data)  # pretrain's default data (empty) is the synthetic corpus


def build_mixtures(cfg: ChatTrainConfig, meta: dict, full_train: str, full_val: str) -> tuple[Task, Task, str]:
    synth = is_synth_run(meta)
    train_spec = cfg.mixture if cfg.mixture != "auto" else (SYNTH_MIXTURE if synth else full_train)
    val_spec = cfg.val_mixture if cfg.val_mixture != "auto" else (SYNTH_VAL_MIXTURE if synth else full_val)
    words = synth_words() if synth else None
    train = parse_mixture(train_spec, cfg.task_dir or None, cfg.data_file, words=words, seed=cfg.seed)
    val = parse_mixture(val_spec, cfg.task_dir or None, (), words=words, seed=cfg.seed + 1)
    return train, val, train_spec


def synth_words() -> list[str] | None:
    """Words of the synthetic world for the spelling generators (so they spell words the base model has seen)."""
    try:
        from picochat.data import synth

        return list(getattr(synth, "WORDS", [])) or None
    except ImportError:
        return None


def chat_eval_tasks(cfg: ChatTrainConfig, meta: dict, stage: str) -> list[Task]:
    """Small categorical tasks for the periodic chat eval. Synth runs: the held-out facts of eval.jsonl (known
    only from pretraining) and the multiple-choice turns of chat_val.jsonl; other runs: ARC-Easy test."""
    from picochat.data.tasks import ARC, SynthChatMC

    makers = [SynthMC, lambda: SynthChatMC("val")] if is_synth_run(meta) else \
        [lambda: ARC("easy", "test", task_dir=cfg.task_dir or None)]
    out = []
    for make in makers:
        try:
            out.append(make())
        except UserError as e:
            print0(f"[{stage}] a chat eval task is unavailable, skipping it: {e}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Packing


class ChatPacker:
    """Rows of rendered conversations, rank-strided over a task, with exact state for resume.

    - `crop=False` (SFT): best-fit with padding. Conversations are rendered with `max_tokens = row_len`, so each fits
      an empty row; a row takes the largest buffered conversation that fits until none does, then pads with BOS and
      target -1.
    - `crop=True` (midtraining): best-fit like pretraining. Every row starts at a conversation's BOS; when nothing
      fits the remainder, the shortest buffered conversation is cropped to fill it exactly (its tail is discarded).
    - `use_mask=False` trains on every token (midtraining's choice); otherwise the render mask decides.

    State: `cursor` (conversations taken by this rank so far) and the task indices in the buffer. The buffer is
    re-rendered from those indices on resume, so the state is a few integers per rank.
    """

    def __init__(self, task: Task, tokenizer, row_len: int, rows: int, rank: int = 0, world: int = 1,
                 buffer_size: int = 100, crop: bool = False, use_mask: bool = True):
        if len(task) == 0:
            raise UserError(f"{task.name}: the mixture is empty")
        self.task, self.tok = task, tokenizer
        self.row_len, self.rows = row_len, rows  # row_len = T + 1 tokens (inputs + shifted targets)
        self.rank, self.world = rank, world
        self.buffer_size, self.crop, self.use_mask = buffer_size, crop, use_mask
        self.cursor = 0
        self.buffer: list[tuple[int, list[int], list[int]]] = []  # (task index, ids, mask)
        self.stats = RenderStats()
        self.bos = tokenizer.bos_id

    @property
    def epoch(self) -> float:
        """Fraction of the task consumed (all ranks together)."""
        return self.cursor * self.world / len(self.task)

    def _next_index(self) -> int:
        i = (self.rank + self.cursor * self.world) % len(self.task)
        self.cursor += 1
        return i

    def _render(self, index: int, stats: RenderStats | None) -> tuple[list[int], list[int]]:
        conv = self.task[index]
        limit = None if self.crop else self.row_len
        return render(self.tok, conv, max_tokens=limit, stats=stats, where=f"{self.task.name}[{index}]")

    def _fill(self) -> None:
        guard = 0
        while len(self.buffer) < self.buffer_size:
            idx = self._next_index()
            ids, mask = self._render(idx, self.stats)
            if ids:
                self.buffer.append((idx, ids, mask))
                guard = 0
            else:
                guard += 1
                if guard > 10 * len(self.task) + 1000:
                    raise UserError(f"{self.task.name}: no conversation fits a row of {self.row_len} tokens; "
                                    f"raise --max-seq-len")

    def _row(self) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < self.row_len:
            self._fill()
            room = self.row_len - len(ids)
            best = -1
            for j, (_, c_ids, _) in enumerate(self.buffer):
                if len(c_ids) <= room and (best < 0 or len(c_ids) > len(self.buffer[best][1])):
                    best = j
            if best >= 0:
                _, c_ids, c_mask = self.buffer.pop(best)
                ids += c_ids
                mask += c_mask
            elif self.crop:
                j = min(range(len(self.buffer)), key=lambda k: len(self.buffer[k][1]))
                _, c_ids, c_mask = self.buffer.pop(j)
                ids += c_ids[:room]
                mask += c_mask[:room]
            else:
                ids += [self.bos] * room
                mask += [0] * room
        return ids, mask

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (rows, row_len - 1) on the CPU; targets -1 where not trained."""
        batch_ids, batch_tgt = [], []
        for _ in range(self.rows):
            ids, mask = self._row()
            x = torch.tensor(ids, dtype=torch.long)
            m = torch.tensor(mask, dtype=torch.bool)
            y = x[1:].clone()
            if self.use_mask:
                y[~m[1:]] = -1
            batch_ids.append(x[:-1])
            batch_tgt.append(y)
        return torch.stack(batch_ids), torch.stack(batch_tgt)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "buffer": [i for i, _, _ in self.buffer], "stats": self.stats.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self.buffer = []
        for i in state["buffer"]:
            ids, mask = self._render(i, None)
            self.buffer.append((i, ids, mask))
        for k, v in state.get("stats", {}).items():
            setattr(self.stats, k, v)


def estimate_rows(task: Task, tokenizer, row_len: int, crop: bool, sample: int = 2000) -> float:
    """Packed rows per conversation, measured by packing a fixed sample of the task (deterministic)."""
    n = min(len(task), sample)
    sub = _Head(task, n)
    packer = ChatPacker(sub, tokenizer, row_len, rows=1, buffer_size=min(100, n), crop=crop)
    rows = 0
    while packer.cursor < n:
        packer._row()
        rows += 1
    return max(rows, 1) / n


class _Head(Task):
    def __init__(self, task: Task, n: int):
        super().__init__()
        self.inner, self.n, self.name = task, n, task.name

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return self.inner[index]


# ----------------------------------------------------------------------------------------------------------------
# Optimizer


def build_optimizer(model: torch.nn.Module, shape: dict[str, Any], weight_decay: float):
    """The pretraining optimizer (Muon for block matrices, AdamW for the rest) at the inherited learning rates,
    scaled for this stage's batch and the model width exactly as pretraining scales them."""
    from picochat import optim, scaling

    return optim.build_optimizer(
        model, matrix_lr=shape["matrix_lr"], embedding_lr=shape["embedding_lr"],
        value_embed_lr=shape["value_embed_lr"], unembedding_lr=shape["unembedding_lr"], resid_lr=shape["resid_lr"],
        x0_lr=shape["x0_lr"], lr_scale=shape["lr_scale"],
        width_scale=scaling.width_scale(shape["n_embd"]), muon_weight_decay=weight_decay)


def load_optimizer_shards(ckpt: Path) -> list[dict[str, Any]]:
    """Every rank's optimizer file of a checkpoint; the optimizer picks this rank's shard out of them, so a warm
    start or resume works across a different number of GPUs."""
    files = sorted(Path(ckpt).glob("optim_rank*.pt"), key=lambda p: int(p.stem[len("optim_rank"):]))
    if not files:
        raise UserError(f"{ckpt}: no optimizer state saved (optim_rank*.pt); drop --load-optimizer or resume with "
                        f"--resume never")
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


def set_lr(opt, multiplier: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * multiplier


def warmdown_multiplier(progress: float, warmdown_frac: float) -> float:
    """1.0, then linear to 0 over the last `warmdown_frac` of training (progress in [0, 1])."""
    if warmdown_frac <= 0 or progress < 1.0 - warmdown_frac:
        return 1.0
    return max(0.0, (1.0 - progress) / warmdown_frac)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation helpers


@torch.no_grad()
def val_loss(model: torch.nn.Module, packer: ChatPacker, batches: int, device: torch.device) -> float:
    """Mean loss per trained token over `batches` micro-batches (all ranks)."""
    was = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for _ in range(batches):
        x, y = packer.next_batch()
        x, y = x.to(device), y.to(device)
        loss = model(x, y, loss_reduction="sum")
        total[0] += loss.double()
        total[1] += (y >= 0).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train(was)
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def categorical_accuracy(model: torch.nn.Module, tokenizer, task: Task, max_items: int, device: torch.device,
                         batch_size: int = 16) -> float:
    """Accuracy on a categorical task: one forward per batch, argmax over the answer letters' logits right after
    `<|assistant_start|>` (no sampling). Items are rank-strided; the result is reduced over ranks."""
    from picochat.conversation import render_for_completion
    from picochat.runtime import get_rank, get_world_size

    was = model.training
    model.eval()
    rank, world = get_rank(), get_world_size()
    n = min(len(task), max_items)
    idxs = list(range(rank, n, world))
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for b in range(0, len(idxs), batch_size):
        convs = [task[i] for i in idxs[b:b + batch_size]]
        prompts = [render_for_completion(tokenizer, c) for c in convs]
        T = max(len(p) for p in prompts)
        x = torch.full((len(prompts), T), tokenizer.bos_id, dtype=torch.long)
        for r, p in enumerate(prompts):
            x[r, :len(p)] = torch.tensor(p)
        logits = model(x.to(device))
        for r, (p, c) in enumerate(zip(prompts, convs)):
            letter_ids = [tokenizer.encode(L)[0] for L in c["letters"]]
            scores = logits[r, len(p) - 1, letter_ids]
            pred = c["letters"][int(scores.argmax())]
            correct[0] += float(pred == c["answer"])
            correct[1] += 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
    model.train(was)
    return float(correct[0] / correct[1].clamp(min=1))


# ----------------------------------------------------------------------------------------------------------------
# The shared loop (midtrain, sft)


def train_chat_stage(stage: str, cfg: ChatTrainConfig, *, source_order: Sequence[str], full_train: str,
                     full_val: str, crop: bool, use_mask: bool,
                     schedule: Callable[[float, ChatTrainConfig], float]) -> dict[str, Any]:
    """Run one packed, supervised chat stage end to end (load, inherit, train, eval, checkpoint, resume)."""
    from picochat import training

    rt = init_runtime(cfg.device or None, cfg.dtype or None, seed=cfg.seed)
    try:
        return _train_chat_stage(stage, cfg, rt, source_order, full_train, full_val, crop, use_mask, schedule,
                                 training)
    finally:
        teardown()


def _train_chat_stage(stage, cfg, rt, source_order, full_train, full_val, crop, use_mask, schedule, training):
    require(cfg.resume in ("auto", "never") or Path(cfg.resume).exists(),
            f"--resume {cfg.resume!r}: expected auto, never or a checkpoint directory")
    run, src_ckpt = resolve_source(cfg.source, cfg.run, source_order)
    out_dir = stage_dir(run, stage)
    ckpt_root = out_dir / "checkpoints"
    resume_from = training.find_resume_checkpoint(ckpt_root, cfg.resume)
    model_ckpt = resume_from or src_ckpt
    model, tok, meta = ckpt_mod.load_model(model_ckpt, device=rt.device, dtype=rt.dtype)
    src_meta = ckpt_mod.read_meta(src_ckpt)
    model.train()
    shape = inherit(cfg, src_meta, rt.world_size) if resume_from is None else meta["inherited"]
    T, B, accum = shape["max_seq_len"], shape["device_batch_size"], shape["grad_accum"]

    train_task, val_task, train_spec = build_mixtures(cfg, src_meta, full_train, full_val)
    packer = ChatPacker(train_task, tok, T + 1, B, rt.rank, rt.world_size, cfg.buffer_size, crop, use_mask)
    rows_per_conv = estimate_rows(train_task, tok, T + 1, crop)
    rows_per_step = B * accum * rt.world_size
    num_steps = cfg.num_iterations or max(1, math.ceil(len(train_task) * cfg.num_epochs * rows_per_conv / rows_per_step))
    eval_tasks = chat_eval_tasks(cfg, src_meta, stage)

    opt = build_optimizer(model, shape, cfg.weight_decay)
    step = 0
    if resume_from is not None:
        _, rank_state = ckpt_mod.load_rank_files(resume_from, map_location="cpu")
        if rank_state is None or int(meta.get("world_size", 1)) != rt.world_size:
            raise UserError(f"{resume_from}: saved by {meta.get('world_size')} ranks, now {rt.world_size}; the "
                            f"loader state is per rank, so resume with the same number of ranks or --resume never")
        opt.load_state_dict(load_optimizer_shards(resume_from))
        packer.load_state_dict(rank_state["loader"])
        training.restore_rng_state(rank_state["rng"], rt.device)
        step = int(meta["step"])
        num_steps = int(meta["num_steps"]) if not cfg.num_iterations else num_steps
        print0(f"[{stage}] resuming from {resume_from} at step {step}/{num_steps}")
    elif cfg.load_optimizer:
        opt.load_state_dict(load_optimizer_shards(src_ckpt))
        for group in opt.param_groups:  # the warm start keeps moments, not the source's learning rates
            group["lr"] = group["initial_lr"]
        print0(f"[{stage}] optimizer state warm-started from {src_ckpt}")

    resolved = {**to_dict(cfg), "run": run, "source_checkpoint": str(src_ckpt), "mixture": train_spec}
    training.write_run_header(out_dir, resolved, rt.device, extra={"stage": stage, "inherited": shape,
                                                                   "num_steps": num_steps})
    metrics = training.MetricsLogger(out_dir / "metrics.jsonl", resume_step=step if resume_from else None)
    stop = training.StopFlag.install()
    print0(f"[{stage}] run {run} from {src_ckpt} | {rt.describe()} | {train_task.describe() if isinstance(train_task, TaskMixture) else train_task.name}")
    print0(f"[{stage}] seq {T} x batch {B} x accum {accum} x ranks {rt.world_size} = {shape['total_batch_size']:,} "
           f"tokens/step | {num_steps} steps | lrs matrix {shape['matrix_lr']:.4g} emb {shape['embedding_lr']:.4g} "
           f"unemb {shape['unembedding_lr']:.4g} (x lr_scale {shape['lr_scale']:.3g}) | loss on {'assistant tokens' if use_mask else 'all tokens'}")

    base_meta = {"stage": stage, "run": run, "model_config": meta["model_config"], "tokenizer_dir":
                 meta["tokenizer_dir"], "config": resolved, "inherited": shape, "parent": str(src_ckpt),
                 "num_steps": num_steps}
    last_ckpt: Path | None = resume_from

    def save(at_step: int, extra_metrics: dict) -> Path:
        state = {"loader": packer.state_dict(), "rng": training.capture_rng_state(rt.device)}
        return ckpt_mod.save_checkpoint(ckpt_root, at_step, model.state_dict() if rt.master else None,
                                        opt.state_dict(), {**base_meta, "metrics": extra_metrics}, state,
                                        keep_last=cfg.keep_last)

    def evaluate(at_step: int) -> dict:
        vp = ChatPacker(val_task, tok, T + 1, B, rt.rank, rt.world_size, cfg.buffer_size, crop, use_mask)
        out = {"step": at_step, "val_loss": val_loss(model, vp, cfg.eval_batches, rt.device)}
        for i, task in enumerate(eval_tasks):
            acc = categorical_accuracy(model, tok, task, cfg.chat_eval_items, rt.device)
            out[f"acc/{task.name}"] = acc
            if i == 0:
                out["chat_acc"] = acc
        print0(f"[{stage}] eval step {at_step}: " + " | ".join(f"{k} {v:.4f}" for k, v in out.items()
                                                              if k != "step"))
        metrics.log(out)
        return out

    if resume_from is not None and step >= num_steps:
        print0(f"[{stage}] {run} is already trained for {step}/{num_steps} steps ({resume_from}); "
               f"use --resume never to train it again")
        metrics.close()
        stop.restore()
        return {"stage": stage, "run": run, "step": step, "checkpoint": str(resume_from), "num_steps": num_steps,
                **{k: v for k, v in (meta.get("metrics") or {}).items() if k != "step"}}
    timer = training.StepTimer(skip=1)
    last_eval: dict = {}
    final_metrics: dict = {}
    t_start = time.time()
    tokens_per_step = shape["total_batch_size"]
    try:
        with training.Heartbeat(stage, "training") as hb:
            while step < num_steps:
                if cfg.eval_every and step % cfg.eval_every == 0 and (resume_from is None or step > int(meta["step"])):
                    last_eval = evaluate(step)
                timer.start()
                progress = step / num_steps
                lrm = schedule(progress, cfg)
                set_lr(opt, lrm)
                batches = [packer.next_batch() for _ in range(accum)]
                n_tok = torch.tensor(float(sum(int((y >= 0).sum()) for _, y in batches)), device=rt.device)
                if rt.distributed:
                    dist.all_reduce(n_tok)
                denom = n_tok.clamp(min=1.0)
                loss_sum = torch.zeros((), device=rt.device)
                for i, (x, y) in enumerate(batches):
                    x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                    loss = model(x, y, loss_reduction="sum") / denom
                    opt.arm(i == accum - 1)  # lets the last backward start the gradient reductions early
                    # the optimizer averages gradients over ranks; scale so the step is the global per-token mean
                    (loss * rt.world_size).backward()
                    loss_sum += loss.detach()
                opt.step()
                model.zero_grad(set_to_none=True)
                step += 1
                loss_val, stop_now = training.agree_on_step(loss_sum * rt.world_size, stop.requested, rt.device)
                training.check_finite(loss_val, step, last_ckpt)
                dt = timer.stop()
                hb.beat()
                extra = f"epoch {packer.epoch:.3f} | trained {int(n_tok)} tok"
                print0(training.format_step_line(step, num_steps, loss_val, lrm, dt, tokens_per_step / max(dt, 1e-9),
                                                 eta_s=timer.eta(num_steps - step, dt), extra=extra))
                metrics.log({"step": step, "loss": loss_val, "lrm": lrm, "dt": dt, "epoch": packer.epoch,
                             "trained_tokens": int(n_tok)})
                if stop_now:
                    last_ckpt = save(step, last_eval)
                    print0(f"[{stage}] stopped by {stop.signame or 'signal'} at step {step}; checkpoint {last_ckpt}")
                    metrics.close()
                    stop.restore()
                    return {"stage": stage, "run": run, "step": step, "stopped": True, "checkpoint": str(last_ckpt)}
                if cfg.save_every and step % cfg.save_every == 0 and step < num_steps:
                    last_ckpt = save(step, last_eval)
            final_metrics = evaluate(step)
            last_ckpt = save(step, final_metrics)
    except torch.OutOfMemoryError as e:
        raise training.out_of_memory(stage, step + 1, B, T, tokens_per_step, rt.device, last_ckpt) from e
    stop.restore()
    metrics.close()
    s = packer.stats
    print0(f"[{stage}] done: {step} steps in {training.format_duration(time.time() - t_start)} | "
           f"rank0 render stats: {s.summary()} | checkpoint {last_ckpt}")
    return {"stage": stage, "run": run, "step": step, "checkpoint": str(last_ckpt), "num_steps": num_steps,
            "render": s.as_dict(), **{k: v for k, v in final_metrics.items() if k != "step"}}


def sft_schedule(progress: float, cfg: ChatTrainConfig) -> float:
    return warmdown_multiplier(progress, cfg.warmdown_frac)


def run(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune the run's mid (else base) checkpoint into `runs/<run>/sft/`."""
    return train_chat_stage(STAGE, cfg, source_order=("mid", "base"), full_train=FULL_SFT_MIXTURE,
                            full_val=FULL_VAL_MIXTURE, crop=False, use_mask=True, schedule=sft_schedule)


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, SFTConfig)


def cli_main(args: argparse.Namespace) -> int:
    cfg = config_from_args(SFTConfig, args)
    run(cfg)
    return 0
