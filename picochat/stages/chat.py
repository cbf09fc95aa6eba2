"""What midtrain, SFT and RL share: one config base, the source checkpoint and what a stage inherits from it, the
packer and loop of the packed stages (midtrain, SFT), and one stage opener and step loop for all three.

- `ChatStageConfig`: the flags every chat stage has; `ChatTrainConfig` (midtrain, SFT) and `RLConfig` derive from
  it, a stage's own default redeclares the field.
- `open_stage`: runtime, source and resume checkpoints, the inherited shape and learning rates, optimizer, run
  header, metrics and the stop flag; its one `finally` restores the signal handlers, closes the metrics and tears
  the process group down, whether the stage returns, stops on a signal or fails.
- `train_loop`: eval, LR schedule, one step (the stage's), the loss every rank agrees on, step line, metrics,
  checkpoints, stop at a step boundary, and the out-of-memory message naming the flag to change.
- `train_packed`: midtrain and SFT on top of both (they differ in mixture, cropping, loss mask and schedule).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from picochat import checkpoint as ckpt_mod
from picochat import optim, scaling, training, warmup
from picochat.config import UserError, check_ranges, check_run_name, require, require_dir, to_dict
from picochat.conversation import RenderStats, render, render_for_completion
from picochat.data import synth
from picochat.data.tasks import ARC, SynthChatMC, SynthMC, Task, TaskMixture, parse_mixture
from picochat.runtime import (Runtime, accum_dtype, get_rank, get_world_size, init_runtime, print0, stage_dir,
                              teardown)

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ChatStageConfig:
    """Flags every chat stage (midtrain, sft, rl) has; a stage redeclares a field to change its default or help."""

    run: str = field(default="", metadata={"help": "run name (default: the run that holds the source checkpoint)"})
    source: str = field(default="auto", metadata={"help": "checkpoint to start from: auto | base | mid | sft | a "
                                                          "checkpoint directory"})
    resume: str = field(default="auto", metadata={"help": training.RESUME_HELP})
    task_dir: str = field(default="", metadata={"help": "task data directory (default PICOCHAT_HOME/tasks)"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the training mixture"})
    num_iterations: int = field(default=0, metadata={"help": "optimizer steps (0: from num_epochs)"})
    device_batch_size: int = field(default=0, metadata={"help": "rows per micro-batch (0: inherit)"})
    matrix_lr: float = field(default=0.0, metadata={"help": "Muon LR of matrices (0: inherit x init_lr_frac)"})
    embedding_lr: float = field(default=0.0, metadata={"help": "AdamW LR of embeddings (0: inherit x init_lr_frac)"})
    unembedding_lr: float = field(default=0.0, metadata={"help": "AdamW LR of the lm head (0: inherit x "
                                                                 "init_lr_frac)"})
    lr_scale: float = field(default=0.0, metadata={"help": "multiplier of every LR (0: the source's, or "
                                                           "sqrt(batch / 2^19) when --total-batch-size is set)"})
    init_lr_frac: float = field(default=0.8, metadata={"help": "multiplier on the inherited learning rates"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    load_optimizer: bool = field(default=False, metadata={"help": "warm-start the optimizer from the source"})
    eval_every: int = field(default=100, metadata={"help": "val loss + chat eval every N steps (0: only at end)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints to keep"})
    seed: int = field(default=42, metadata={"help": "mixture shuffle and RNG seed"})
    device: str = field(default="", metadata={"help": "cpu | cuda | mps (default: best available)"})
    dtype: str = field(default="", metadata={"help": "compute dtype (default: bf16 on CUDA sm80+, fp16 on sm70-sm7x, fp32 elsewhere)"})


@dataclass
class ChatTrainConfig(ChatStageConfig):
    """Flags of the packed stages, midtrain and sft (each subclasses it with its own defaults)."""

    mixture: str = field(default="auto", metadata={"help": "training tasks, e.g. 'smoltalk,gsm8k*2,identity@1000' "
                                                           "(auto: synth set for synth-trained bases, else the "
                                                           "nanochat mixture)"})
    val_mixture: str = field(default="auto", metadata={"help": "validation tasks (same syntax)"})
    data_file: list[str] = field(default_factory=list, metadata={"help": "extra JSONL files of conversations"})
    max_seq_len: int = field(default=0, metadata={"help": "row length in tokens (0: inherit from the source)"})
    total_batch_size: int = field(default=0, metadata={"help": "tokens per optimizer step (0: inherit)"})
    warmdown_frac: float = field(default=0.5, metadata={"help": "last fraction of training that decays LR to 0"})
    eval_batches: int = field(default=20, metadata={"help": "micro-batches of validation per val loss"})
    chat_eval_items: int = field(default=256, metadata={"help": "categorical questions per chat eval"})
    buffer_size: int = field(default=100, metadata={"help": "conversations the best-fit packer chooses from"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (variable shapes: off)"})


# The ranges of the shared flags; a stage's own flags are checked by its `check` (RL) or `validate_stage`.
STAGE_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "num_epochs": (0, None), "num_iterations": (0, None), "device_batch_size": (0, None), "matrix_lr": (0, None),
    "embedding_lr": (0, None), "unembedding_lr": (0, None), "lr_scale": (0, None), "init_lr_frac": (0, None),
    "weight_decay": (0, None), "eval_every": (0, None), "save_every": (0, None), "keep_last": (0, None),
}
PACKED_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "max_seq_len": (0, None), "total_batch_size": (0, None), "warmdown_frac": (0, 1), "eval_batches": (1, None),
    "chat_eval_items": (0, None), "buffer_size": (1, None),
}


def validate_stage(cfg: ChatStageConfig) -> None:
    """The flags of a chat stage, checked before anything is loaded: ranges, names and paths, one line each."""
    packed = isinstance(cfg, ChatTrainConfig)
    check_ranges(cfg, {**STAGE_BOUNDS, **(PACKED_BOUNDS if packed else {})})
    require(cfg.num_epochs > 0 or cfg.num_iterations > 0,
            f"--num-epochs {cfg.num_epochs}: must be > 0 (or set --num-iterations)")
    if cfg.run:
        check_run_name(cfg.run)
    require(cfg.resume in training.RESUME_MODES or Path(cfg.resume).is_dir(),
            f"--resume {cfg.resume!r}: expected {', '.join(training.RESUME_MODES)} or a checkpoint directory")
    if cfg.source not in ("auto", *ckpt_mod.STAGES):
        require_dir(cfg.source, "--source", f"pass a stage name ({', '.join(ckpt_mod.STAGES)}) or a checkpoint "
                                            f"directory")
    if cfg.task_dir:
        require_dir(cfg.task_dir, "--task-dir", "pass a folder (task files are downloaded into it if missing)",
                    must_exist=False)
    if packed:
        require(cfg.max_seq_len == 0 or cfg.max_seq_len >= 8,
                f"--max-seq-len {cfg.max_seq_len}: must be >= 8 (or 0 to inherit the source's)")
        for f in cfg.data_file:
            require(Path(f).is_file(), f"--data-file {f}: no such file; pass a JSONL file of conversations")


# The validation mixture of nanochat's scripts/mid_train.py and scripts/chat_sft.py, and the synthetic world's
# sets, with our task names.
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
        latest = ckpt_mod.newest_loadable(latest.parent)  # past a damaged newest one, with a warning
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


def inherit(cfg: ChatStageConfig, meta: dict, world_size: int, *, max_seq_len: int | None = None,
            device_batch_size: int | None = None, total_batch_size: int | None = None) -> dict[str, Any]:
    """Resolved shape and learning rates: explicit flags win, then the source checkpoint, then defaults.

    The keyword arguments stand in for the config's batch flags (RL has none: its batch is not packed rows)."""
    cfg_seq = getattr(cfg, "max_seq_len", 0) if max_seq_len is None else max_seq_len
    cfg_dbs = cfg.device_batch_size if device_batch_size is None else device_batch_size
    cfg_tbs = getattr(cfg, "total_batch_size", 0) if total_batch_size is None else total_batch_size
    mc = meta.get("model_config") or {}
    seq = cfg_seq or int(_src_value(meta, ("max_seq_len", "seq_len"), mc.get("sequence_len", 2048)))
    seq = min(seq, int(mc.get("sequence_len", seq)) * 4)  # the rotary table covers 4x the trained context
    tbs = cfg_tbs or int(_src_value(meta, ("total_batch_size",), 0) or 0)
    dbs = cfg_dbs or int(_src_value(meta, ("device_batch_size",), 0) or max(1, 65536 // seq))
    if not cfg_dbs and mc.get("n_layer"):
        # chat stages train in bf16: fp8 pretraining's doubled micro-batch (d20 x 32: 58.5 GB) would need 72 GB here
        dbs = min(dbs, scaling.device_batch_size(int(mc["n_layer"]), seq))
    if not tbs:
        tbs = dbs * seq * world_size
    if not cfg_dbs:
        # an inherited micro-batch may not divide the batch on this many ranks (or at this length): shrink it
        while dbs > 1 and (tbs % (dbs * seq * world_size) or dbs * seq * world_size > tbs):
            dbs -= 1
    per_step = dbs * seq * world_size
    if tbs % per_step:
        raise UserError(f"--total-batch-size {tbs} must be a multiple of device_batch_size x max_seq_len x ranks "
                        f"= {dbs} x {seq} x {world_size} = {per_step}")
    return {"max_seq_len": seq, "device_batch_size": dbs, "total_batch_size": tbs, "grad_accum": tbs // per_step,
            "n_embd": int(mc.get("n_embd", 768)), "lr_scale": _inherit_lr_scale(cfg, meta, cfg_tbs, tbs),
            "synth": is_synth_run(meta), **_inherit_lrs(cfg, meta)}


def _inherit_lrs(cfg: ChatStageConfig, meta: dict) -> dict[str, float]:
    """The source's base learning rates (before its batch/width scaling, which build_optimizer re-applies for this
    stage's batch) times init_lr_frac; an explicit flag is taken as is."""
    lrs = {}
    for name, default in (("matrix_lr", scaling.MATRIX_LR), ("embedding_lr", scaling.EMBEDDING_LR),
                          ("unembedding_lr", scaling.UNEMBEDDING_LR), ("value_embed_lr", scaling.VALUE_EMBED_LR),
                          ("resid_lr", scaling.RESID_LR), ("x0_lr", scaling.X0_LR)):
        explicit = getattr(cfg, name, 0.0)
        lrs[name] = explicit if explicit else float(_src_value(meta, (name,), default)) * cfg.init_lr_frac
    return lrs


def _inherit_lr_scale(cfg: ChatStageConfig, meta: dict, cfg_tbs: int, tbs: int) -> float:
    if cfg.lr_scale:
        return float(cfg.lr_scale)
    if cfg_tbs:  # a new batch size: the sqrt(batch) rule for it
        return scaling.lr_scale(tbs)
    # the source's own scale (an explicit --lr-scale of pretraining is kept), else the rule
    return float((meta.get("inherited") or {}).get("lr_scale") or (meta.get("config") or {}).get("lr_scale")
                 or scaling.lr_scale(tbs))


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
    synth_run = is_synth_run(meta)
    train_spec = cfg.mixture if cfg.mixture != "auto" else (SYNTH_MIXTURE if synth_run else full_train)
    val_spec = cfg.val_mixture if cfg.val_mixture != "auto" else (SYNTH_VAL_MIXTURE if synth_run else full_val)
    words = synth_words() if synth_run else None
    train = parse_mixture(train_spec, cfg.task_dir or None, cfg.data_file, words=words, seed=cfg.seed)
    val = parse_mixture(val_spec, cfg.task_dir or None, (), words=words, seed=cfg.seed + 1)
    return train, val, train_spec


def synth_words() -> list[str] | None:
    """Words of the synthetic world for the spelling generators (so they spell words the base model has seen)."""
    return list(getattr(synth, "WORDS", [])) or None


def chat_eval_tasks(cfg: ChatTrainConfig, meta: dict, stage: str) -> list[Task]:
    """Small categorical tasks for the periodic chat eval. Synth runs: the held-out facts of eval.jsonl (known
    only from pretraining) and the multiple-choice turns of chat_val.jsonl; other runs: ARC-Easy test."""
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
        raise UserError(f"{ckpt}: no optimizer state saved (optim_rank*.pt); drop --load-optimizer or start the stage "
                        f"over with --resume wipe")
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


def set_lr(opt, multiplier: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * multiplier


# ----------------------------------------------------------------------------------------------------------------
# Evaluation helpers


@torch.no_grad()
def val_loss(model: torch.nn.Module, packer: ChatPacker, batches: int, device: torch.device) -> float:
    """Mean loss per trained token over `batches` micro-batches (all ranks)."""
    was = model.training
    model.eval()
    total = torch.zeros(2, dtype=accum_dtype(device), device=device)
    for _ in range(batches):
        x, y = packer.next_batch()
        x, y = x.to(device), y.to(device)
        loss = model(x, y, loss_reduction="sum")
        total[0] += loss.to(total.dtype)
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
    was = model.training
    model.eval()
    rank, world = get_rank(), get_world_size()
    n = min(len(task), max_items)
    idxs = list(range(rank, n, world))
    correct = torch.zeros(2, dtype=accum_dtype(device), device=device)
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
# The stage opener


@dataclass
class Stage:
    """An opened chat stage: where it runs, what it loaded, where it writes, and how far it is."""

    name: str
    cfg: ChatStageConfig
    rt: Runtime
    run: str = ""
    src_ckpt: Path | None = None
    src_meta: dict = field(default_factory=dict)
    out_dir: Path | None = None
    resume_from: Path | None = None
    model: Any = None        # the module whose weights are saved, and that evals and sampling call
    train_model: Any = None  # the module the training forward calls (compiled, or `model` itself)
    tok: Any = None
    meta: dict = field(default_factory=dict)  # meta.json of the checkpoint the weights came from
    shape: dict = field(default_factory=dict)  # inherited shape and learning rates (saved as meta "inherited")
    loader: Any = None       # per-rank data cursor saved with each checkpoint (the packed stages' packer)
    opt: Any = None
    num_steps: int = 0
    step: int = 0
    base_meta: dict = field(default_factory=dict)
    metrics: training.MetricsLogger | None = None
    stop: training.StopFlag | None = None
    last_ckpt: Path | None = None
    lock: Any = None  # training.StageLock on rank 0: this process is the stage's one trainer
    scaler: training.LossScaler | None = None  # fp16 only: step functions back-propagate through `backward`
    info: dict = field(default_factory=dict)  # prepare_model's info, plus start-up time stamps ("marks")

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate a step function's loss: plain, or scaled under fp16 (`training.LossScaler`)."""
        loss.backward() if self.scaler is None else self.scaler.backward(loss)

    def arm(self, last_micro_step: bool) -> None:
        """Let the optimizer start reducing gradients from the last backward; never under fp16, whose gradients
        are checked for overflow before any reduction."""
        self.opt.arm(last_micro_step and self.scaler is None)

    def eval_due(self) -> bool:
        """Every `eval_every` steps, but not again at the step a resumed run starts from."""
        every = self.cfg.eval_every
        return bool(every) and self.step % every == 0 and (self.resume_from is None or
                                                           self.step > int(self.meta["step"]))

    def save(self, at_step: int, metrics: dict) -> Path:
        # the packed stages keep their packer's cursor per rank; RL's problem cursor is the step itself
        state = {"loader": self.loader.state_dict()} if self.loader is not None else {"step": at_step}
        state["rng"] = training.capture_rng_state(self.rt.device)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        self.last_ckpt = ckpt_mod.save_checkpoint(
            self.out_dir / "checkpoints", at_step, self.model.state_dict() if self.rt.master else None,
            self.opt.state_dict(), {**self.base_meta, "metrics": metrics}, state, keep_last=self.cfg.keep_last)
        return self.last_ckpt

    def already_trained(self) -> dict[str, Any] | None:
        """The result of a resumed stage that has nothing left to train, else None."""
        if self.resume_from is None or self.step < self.num_steps:
            return None
        print0(f"[{self.name}] {self.run} is already trained for {self.step}/{self.num_steps} steps "
               f"({self.resume_from}); use --resume wipe to train it again")
        return {"stage": self.name, "run": self.run, "step": self.step, "checkpoint": str(self.resume_from),
                "num_steps": self.num_steps,
                **{k: v for k, v in (self.meta.get("metrics") or {}).items() if k != "step"}}

    def result(self, final: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        """What the stage returns: stopped by a signal (final is None), or done with its final eval."""
        if final is None:
            return {"stage": self.name, "run": self.run, "step": self.step, "stopped": True,
                    "checkpoint": str(self.last_ckpt)}
        return {"stage": self.name, "run": self.run, "step": self.step, "checkpoint": str(self.last_ckpt),
                "num_steps": self.num_steps, **extra, **{k: v for k, v in final.items() if k != "step"}}


@contextmanager
def open_stage(name: str, cfg: ChatStageConfig, *, source: str, source_order: Sequence[str],
               shape_of: Callable[[dict, int], dict], setup: Callable[[Stage], tuple[int, dict]],
               compile: bool = False, check: Callable[[Runtime], None] | None = None,
               same_world: bool = False) -> Iterator[Stage]:
    """Open a chat stage: runtime, source + resume checkpoints, inherited shape (`shape_of(source meta, ranks)`),
    the stage's data (`setup(stage)` -> (steps, fields to record in the run config)), optimizer, resume state, run
    header, metrics, stop flag. `same_world`: the stage's per-rank state needs the same number of ranks to resume.
    The one `finally` restores the signal handlers, closes the metrics and leaves the process group, however the
    stage ends."""
    st = Stage(name, cfg, init_runtime(cfg.device or None, cfg.dtype or None, seed=cfg.seed))
    marks = {"setup": time.time()}
    try:
        _load(st, source, source_order, shape_of, check)
        marks["model"] = time.time()
        num_steps, record = setup(st)
        st.num_steps = num_steps
        st.opt = build_optimizer(st.model, st.shape, cfg.weight_decay)
        st.scaler = training.loss_scaler(st.rt.dtype)
        _restore(st, same_world)
        st.train_model, st.info = training.prepare_model(st.model, device=st.rt.device, dtype=st.rt.dtype,
                                                         seq_len=st.shape["max_seq_len"], compile=compile, fp8=False,
                                                         run_folder=st.out_dir)
        _begin(st, record)
        st.info["marks"] = {**marks, "loop": time.time()}
        yield st
    finally:
        if st.stop is not None:
            st.stop.restore()
        if st.metrics is not None:
            st.metrics.close()
        if st.lock is not None:
            st.lock.release()
        teardown()


def _load(st: Stage, source: str, source_order: Sequence[str], shape_of: Callable[[dict, int], dict],
          check: Callable[[Runtime], None] | None) -> None:
    cfg, rt = st.cfg, st.rt
    validate_stage(cfg)
    if check is not None:
        check(rt)
    st.run, st.src_ckpt = resolve_source(source, cfg.run, source_order)
    st.out_dir = stage_dir(st.run, st.name)
    st.lock = training.lock_stage(st.out_dir, st.run, st.name)
    st.resume_from = training.find_resume_checkpoint(st.out_dir / "checkpoints", cfg.resume)
    st.model, st.tok, st.meta = ckpt_mod.load_model(st.resume_from or st.src_ckpt, device=rt.device, dtype=rt.dtype)
    st.src_meta = ckpt_mod.read_meta(st.src_ckpt)
    st.model.train()
    st.shape = shape_of(st.src_meta, rt.world_size) if st.resume_from is None else st.meta["inherited"]


def _restore(st: Stage, same_world: bool) -> None:
    """Resume: optimizer, data cursor, RNG and step of this stage's checkpoint; else the optional warm start."""
    cfg, rt, ckpt = st.cfg, st.rt, st.resume_from
    if ckpt is not None:
        _, rank_state = ckpt_mod.load_rank_files(ckpt, map_location="cpu")
        saved = st.meta.get("world_size", 1)
        if rank_state is None or (same_world and int(saved) != rt.world_size):
            raise UserError(f"{ckpt}: saved by {saved} ranks, now {rt.world_size}, and its state is per rank (none "
                            f"for rank {rt.rank}); resume with the same number of ranks or --resume wipe")
        st.opt.load_state_dict(load_optimizer_shards(ckpt))
        if st.loader is not None:
            st.loader.load_state_dict(rank_state["loader"])
        training.restore_rng_state(rank_state["rng"], rt.device)
        if st.scaler is not None and rank_state.get("scaler"):
            st.scaler.load_state_dict(rank_state["scaler"])
        st.step = int(st.meta["step"])
        st.num_steps = int(st.meta["num_steps"]) if not cfg.num_iterations else st.num_steps
        print0(f"[{st.name}] resuming from {ckpt} at step {st.step}/{st.num_steps}")
    elif cfg.load_optimizer:
        st.opt.load_state_dict(load_optimizer_shards(st.src_ckpt))
        for group in st.opt.param_groups:  # the warm start keeps moments, not the source's learning rates
            group["lr"] = group["initial_lr"]
        print0(f"[{st.name}] optimizer state warm-started from {st.src_ckpt}")


def _begin(st: Stage, record: dict[str, Any]) -> None:
    """Run header, metrics log, stop flag and the metadata every checkpoint of the stage carries."""
    resolved = {**to_dict(st.cfg), "run": st.run, "source_checkpoint": str(st.src_ckpt), **record}
    training.write_run_header(st.out_dir, resolved, st.rt.device,
                              extra={"stage": st.name, "inherited": st.shape, "num_steps": st.num_steps})
    st.metrics = training.MetricsLogger(st.out_dir / "metrics.jsonl",
                                        resume_step=st.step if st.resume_from else None)
    st.stop = training.StopFlag.install()
    st.base_meta = {"stage": st.name, "run": st.run, "model_config": st.meta["model_config"],
                    "tokenizer_dir": st.meta["tokenizer_dir"], "config": resolved, "inherited": st.shape,
                    "parent": str(st.src_ckpt), "num_steps": st.num_steps}
    st.last_ckpt = st.resume_from


# ----------------------------------------------------------------------------------------------------------------
# The step loop


@dataclass
class StepOut:
    """What one training step of a stage reports to the loop (before the optimizer step)."""

    loss_sum: torch.Tensor  # this rank's summed micro-batch losses, each already divided by the step's count
    tokens: float           # tokens the step processed on all ranks (for tok/s)
    extra: str              # tail of the step line
    log: dict               # extra fields of the step's metrics record


def train_loop(st: Stage, *, step_fn: Callable[[Stage], StepOut], evaluate: Callable[[Stage, int], dict],
               lr_at: Callable[[int, int], float], doing: str, oom_shape: tuple[int, int | None, int | None]
               ) -> dict[str, Any] | None:
    """Train from `st.step` to `st.num_steps`: eval when due, LR from `lr_at(step, total)`, the stage's step, the
    optimizer step, checkpoints every `save_every`, a final eval and checkpoint. Returns the final eval, or None
    when a signal stopped the stage (after checkpointing at the step boundary). `oom_shape` = (rows, row length,
    tokens per step) for the out-of-memory message."""
    cfg, rt = st.cfg, st.rt
    timer = training.StepTimer(skip=1)  # the first step pays for compilation and allocator warm-up
    last_eval: dict = {}
    meter = training.CostMeter.from_env()  # dollars and the --budget stop under `picochat speedrun --price`

    def save(metrics: dict) -> None:
        t0 = time.monotonic()
        st.save(st.step, metrics)
        if meter is not None:
            meter.saved(time.monotonic() - t0)

    try:
        with (training.Heartbeat(st.name, doing, meter=meter) as hb,
              warmup.CompileWatch(st.info["cache"], hb, st.info["compiled"]) as watch):
            first = st.step + 1
            while st.step < st.num_steps:
                if st.eval_due():
                    last_eval = _evaluate(st, evaluate)
                timer.start()
                lrm = lr_at(st.step, st.num_steps)
                set_lr(st.opt, lrm)
                out = step_fn(st)
                st.opt.step() if st.scaler is None else st.scaler.step(st.opt)
                st.model.zero_grad(set_to_none=True)
                st.step += 1
                wants_stop = st.stop.requested or (meter is not None and meter.budget_due())  # any rank: all stop
                loss, stop_now = training.agree_on_step(out.loss_sum * rt.world_size, wants_stop, rt.device)
                training.check_finite(loss, st.step, st.last_ckpt)
                dt = timer.stop()
                hb.beat()
                eta = timer.eta(st.num_steps - st.step, dt)
                print0(training.format_step_line(st.step, st.num_steps, loss, lrm, dt, out.tokens / max(dt, 1e-9),
                                                 eta_s=eta, extra=out.extra,
                                                 cost=meter.text(eta) if meter is not None else ""))
                st.metrics.log({"step": st.step, "loss": loss, "lrm": lrm, "dt": dt, **out.log})
                if st.step == first:  # an eval before it counts in the total only
                    warmup.report_startup(st.info, watch, st.step, dt, st.metrics, now=time.time())
                by_budget = stop_now and not st.stop.requested and meter is not None and meter.budget is not None
                if stop_now and not (by_budget and st.step >= st.num_steps):  # a last step goes on to its eval
                    save(last_eval)
                    if by_budget:
                        print0(meter.record_stop(st.name, st.step, st.last_ckpt))
                    else:
                        print0(f"[{st.name}] stopped by {st.stop.signame or 'signal'} at step {st.step}; "
                               f"checkpoint {st.last_ckpt}")
                    return None
                if cfg.save_every and st.step % cfg.save_every == 0 and st.step < st.num_steps:
                    save(last_eval)
            final = _evaluate(st, evaluate)
            save(final)
            return final
    except torch.OutOfMemoryError as e:
        raise training.out_of_memory(st.name, st.step + 1, *oom_shape, rt.device, st.last_ckpt) from e


def _evaluate(st: Stage, evaluate: Callable[[Stage, int], dict]) -> dict:
    out = {"step": st.step, **evaluate(st, st.step)}
    print0(f"[{st.name}] eval step {st.step}: " + " | ".join(f"{k} {v:.4f}" for k, v in out.items() if k != "step"))
    st.metrics.log(out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The packed stages (midtrain, sft)


@dataclass
class PackedJob:
    """What a packed stage trains and evaluates on: its mixtures and how rows are packed (filled by the setup)."""

    full_train: str
    full_val: str
    crop: bool
    use_mask: bool
    train: Task | None = None
    val: Task | None = None
    eval_tasks: list[Task] = field(default_factory=list)
    packer: ChatPacker | None = None


def train_packed(stage: str, cfg: ChatTrainConfig, *, source_order: Sequence[str], full_train: str, full_val: str,
                 crop: bool, use_mask: bool) -> dict[str, Any]:
    """Run one packed, supervised chat stage end to end (load, inherit, train, eval, checkpoint, resume)."""
    job = PackedJob(full_train, full_val, crop, use_mask)
    with open_stage(stage, cfg, source=cfg.source, source_order=source_order, shape_of=partial(inherit, cfg),
                    setup=partial(_setup_packed, job), compile=cfg.compile, same_world=True) as st:
        shape, T, B = st.shape, st.shape["max_seq_len"], st.shape["device_batch_size"]
        what = job.train.describe() if isinstance(job.train, TaskMixture) else job.train.name
        print0(f"[{stage}] run {st.run} from {st.src_ckpt} | {st.rt.describe()} | {what}")
        print0(f"[{stage}] seq {T} x batch {B} x accum {shape['grad_accum']} x ranks {st.rt.world_size} = "
               f"{shape['total_batch_size']:,} tokens/step | {st.num_steps} steps | lrs matrix "
               f"{shape['matrix_lr']:.4g} emb {shape['embedding_lr']:.4g} unemb {shape['unembedding_lr']:.4g} "
               f"(x lr_scale {shape['lr_scale']:.3g}) | loss on {'assistant tokens' if use_mask else 'all tokens'}")
        done = st.already_trained()
        if done is not None:
            return done
        t_start = time.time()
        final = train_loop(st, step_fn=partial(_packed_step, job), evaluate=partial(_packed_eval, job),
                           lr_at=partial(scaling.chat_lr_multiplier, warmdown_frac=cfg.warmdown_frac),
                           doing="training", oom_shape=(B, T, shape["total_batch_size"]))
        if final is None:
            return st.result(None)
        s = job.packer.stats
        print0(f"[{stage}] done: {st.step} steps in {training.format_duration(time.time() - t_start)} | "
               f"rank0 render stats: {s.summary()} | checkpoint {st.last_ckpt}")
        return st.result(final, render=s.as_dict())


def _setup_packed(job: PackedJob, st: Stage) -> tuple[int, dict[str, Any]]:
    """Mixtures, the packer (the stage's per-rank loader), steps from the epochs, and the chat eval tasks."""
    cfg, rt = st.cfg, st.rt
    T, B, accum = st.shape["max_seq_len"], st.shape["device_batch_size"], st.shape["grad_accum"]
    job.train, job.val, train_spec = build_mixtures(cfg, st.src_meta, job.full_train, job.full_val)
    job.packer = ChatPacker(job.train, st.tok, T + 1, B, rt.rank, rt.world_size, cfg.buffer_size, job.crop,
                            job.use_mask)
    st.loader = job.packer
    rows_per_conv = estimate_rows(job.train, st.tok, T + 1, job.crop)
    rows_per_step = B * accum * rt.world_size
    num_steps = cfg.num_iterations or max(1, math.ceil(len(job.train) * cfg.num_epochs * rows_per_conv
                                                       / rows_per_step))
    job.eval_tasks = chat_eval_tasks(cfg, st.src_meta, st.name)
    return num_steps, {"mixture": train_spec}


def _packed_step(job: PackedJob, st: Stage) -> StepOut:
    """One optimizer step's forward/backward: the loss is the sum over every trained token of all micro-batches
    and ranks divided by their count, so short and long answers weigh the same per token."""
    rt, accum = st.rt, st.shape["grad_accum"]
    batches = [job.packer.next_batch() for _ in range(accum)]
    n_tok = torch.tensor(float(sum(int((y >= 0).sum()) for _, y in batches)), device=rt.device)
    if rt.distributed:
        dist.all_reduce(n_tok)
    denom = n_tok.clamp(min=1.0)
    loss_sum = torch.zeros((), device=rt.device)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        loss = st.train_model(x, y, loss_reduction="sum") / denom
        st.arm(i == accum - 1)  # lets the last backward start the gradient reductions early
        # the optimizer averages gradients over ranks; scale so the step is the global per-token mean
        st.backward(loss * rt.world_size)
        loss_sum += loss.detach()
    epoch = job.packer.epoch
    return StepOut(loss_sum, st.shape["total_batch_size"], f"epoch {epoch:.3f} | trained {int(n_tok)} tok",
                   {"epoch": epoch, "trained_tokens": int(n_tok)})


def _packed_eval(job: PackedJob, st: Stage, at_step: int) -> dict[str, float]:
    """Validation loss per trained token, then the categorical chat eval (the first task is `chat_acc`)."""
    cfg, rt, T, B = st.cfg, st.rt, st.shape["max_seq_len"], st.shape["device_batch_size"]
    vp = ChatPacker(job.val, st.tok, T + 1, B, rt.rank, rt.world_size, cfg.buffer_size, job.crop, job.use_mask)
    out = {"val_loss": val_loss(st.model, vp, cfg.eval_batches, rt.device)}
    for i, task in enumerate(job.eval_tasks):
        acc = categorical_accuracy(st.model, st.tok, task, cfg.chat_eval_items, rt.device)
        out[f"acc/{task.name}"] = acc
        if i == 0:
            out["chat_acc"] = acc
    return out
