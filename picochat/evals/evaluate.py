"""`picochat eval base|chat`: evaluate a checkpoint and write the results where the report finds them.

    picochat eval base [--run NAME] [--source base] [--step N] [--bpb] [--core] [--samples] [--bundle DIR] ...
    picochat eval chat [--run NAME] [--source sft] [--tasks arc_easy,...,synth] [--max-problems N] [--task-dir DIR]

`eval base` with none of --bpb/--core/--samples does all three. `--random-init --depth 12` scores a freshly
initialised model of that depth instead of a checkpoint (to time CORE without training first).

Outputs (rank 0): `runs/<run>/eval/<source>_{core,bpb,samples,chat}.json` (+ `.csv` tables for core and chat), and
one line per eval appended to `runs/<run>/<source>/metrics.jsonl` (`{"step", "eval", ...}`). Under torchrun every
rank evaluates its share and the counts are all-reduced.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from picochat.checkpoint import checkpoints_dir, find_run_with_stage, load_model
from picochat.config import (UserError, add_config_args, check_ranges, check_run_name, config_from_args,
                             require_checkpoint_dir, require_dir, to_dict)
from picochat.data.loader import DataLoader
from picochat.data.shards import list_shards
from picochat.engine import Engine, prepare_model
from picochat.evals import chat_eval, core_eval
from picochat.evals.chat_eval import evaluate_chat
from picochat.evals.core_eval import (bundle_yaml, compare_with_reference, evaluate_core, load_task_specs,
                                      resolve_bundle, throughput_line)
from picochat.evals.loss_eval import evaluate_bpb
from picochat.files import atomic_write_text
from picochat.model import build_model
from picochat.runtime import (default_data_dir, default_tokenizer_dir, init_runtime, is_rank0, picochat_home, print0,
                              run_dir, stage_dir, teardown)
from picochat.scaling import gpt_config
from picochat.tokenizer import Tokenizer

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


@dataclass
class BaseEvalConfig:
    run: str | None = field(default=None, metadata={"help": "run name (default: the run with the newest checkpoint)"})
    source: str = field(default="base", metadata={"help": "stage to load", "choices": ["base", "mid", "sft", "rl"]})
    step: int | None = field(default=None, metadata={"help": "checkpoint step (default: latest)"})
    checkpoint: str | None = field(default=None, metadata={"help": "explicit checkpoint directory"})
    bpb: bool = field(default=False, metadata={"help": "bits per byte on train and val shards"})
    core: bool = field(default=False, metadata={"help": "CORE (DCLM) benchmark"})
    samples: bool = field(default=False, metadata={"help": "a few greedy completions"})
    bundle: str | None = field(default=None, metadata={"help": "unpacked CORE eval bundle dir (default: download)"})
    max_per_task: int = field(default=-1, metadata={"help": "CORE examples per task (<= 0: all)"})
    core_tasks: str | None = field(default=None, metadata={"help": "comma-separated CORE task labels (default: all)"})
    batch_tokens: int = field(default=0, metadata={"help": "CORE tokens per forward pass (0: 32768 GPU / 4096 CPU)"})
    core_check: bool = field(default=False, metadata={"help": "also score the first --max-per-task examples (20 "
                                                              "if unset) one at a time and compare with batched"})
    data: str | None = field(default=None, metadata={"help": "shard directory for bpb (default: the checkpoint's)"})
    eval_tokens: int = field(default=40 * 2**19, metadata={"help": "tokens per split for bpb"})
    device_batch_size: int = field(default=0, metadata={"help": "bpb rows per forward (0: auto)"})
    random_init: bool = field(default=False, metadata={"help": "evaluate a randomly initialised model (timing)"})
    depth: int = field(default=12, metadata={"help": "model depth for --random-init"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir for --random-init"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda | mps (default: best available)"})


@dataclass
class ChatEvalConfig:
    run: str | None = field(default=None, metadata={"help": "run name (default: the run with the newest checkpoint)"})
    source: str = field(default="sft", metadata={"help": "stage to load", "choices": ["base", "mid", "sft", "rl"]})
    step: int | None = field(default=None, metadata={"help": "checkpoint step (default: latest)"})
    checkpoint: str | None = field(default=None, metadata={"help": "explicit checkpoint directory"})
    tasks: str = field(default="arc_easy,arc_challenge,mmlu,gsm8k,humaneval,spellingbee,synth",
                       metadata={"help": "comma-separated tasks"})
    max_problems: int = field(default=0, metadata={"help": "problems per task (0: all; a fixed shuffled subset)"})
    task_dir: str | None = field(default=None, metadata={"help": "task files (one jsonl per task, see data/tasks.py); "
                                                                 "default PICOCHAT_HOME/tasks, downloaded if missing"})
    synth_eval: str | None = field(default=None, metadata={"help": "synth eval.jsonl (default: data/synth/eval.jsonl)"})
    num_samples: int = field(default=1, metadata={"help": "samples per generative problem (pass@k)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_k: int = field(default=50, metadata={"help": "top-k for sampling"})
    max_new_tokens: int = field(default=512, metadata={"help": "most tokens per generated reply"})
    batch_tokens: int = field(default=0, metadata={"help": "categorical tokens per forward (0: auto)"})
    seed: int = field(default=42, metadata={"help": "sampling seed"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda | mps (default: best available)"})


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _load(cfg: BaseEvalConfig | ChatEvalConfig, rt: Any) -> tuple[Any, Any, dict[str, Any], str, int | None]:
    """(model, tokenizer, meta, run name, step) for a config's checkpoint (or a random-init model)."""
    if getattr(cfg, "random_init", False):
        return _random_model(cfg, rt)
    if cfg.checkpoint:
        ckpt = Path(cfg.checkpoint)
        run = cfg.run
    elif cfg.step is not None:
        run = cfg.run or find_run_with_stage(cfg.source, None)[0]
        ckpt = checkpoints_dir(run, cfg.source) / f"step_{cfg.step:06d}"
        if not ckpt.exists():
            raise UserError(f"--step {cfg.step}: no checkpoint {ckpt}; omit --step for the latest")
    else:
        run, ckpt = find_run_with_stage(cfg.source, cfg.run)
    model, tok, meta = load_model(ckpt, rt.device, rt.dtype)
    run = run or meta.get("run") or "default"
    return model, tok, dict(meta, checkpoint_dir=str(ckpt)), run, meta.get("step")


def _random_model(cfg: BaseEvalConfig, rt: Any) -> tuple[Any, Any, dict[str, Any], str, int | None]:
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else default_tokenizer_dir()
    if (tok_dir / "tokenizer.json").exists():
        tok = Tokenizer.load(tok_dir)
    elif cfg.tokenizer:
        raise UserError(f"--tokenizer {cfg.tokenizer}: no tokenizer.json there")
    else:
        tok = _bundle_tokenizer(cfg)
    torch.manual_seed(0)
    gcfg = gpt_config(cfg.depth, vocab_size=tok.vocab_size)
    model = build_model(gcfg, device=rt.device)
    model.set_compute_dtype(rt.dtype)
    model.eval()
    print0(f"[eval] random-init d{cfg.depth}: {model.num_params() / 1e6:.1f}M params, vocab {tok.vocab_size}")
    meta = {"model_config": to_dict(gcfg), "random_init": True}
    return model, tok, meta, cfg.run or f"random_d{cfg.depth}", 0


def _bundle_tokenizer(cfg: BaseEvalConfig) -> Any:
    """No tokenizer anywhere: train a 32K BPE on the CORE bundle's own text (seconds), cached in PICOCHAT_HOME.
    Only for --random-init timing runs; a real model always brings the tokenizer it was trained with."""
    cache = picochat_home() / "tokenizer_core_bench"
    if (cache / "tokenizer.json").exists():
        return Tokenizer.load(cache)
    bundle = resolve_bundle(cfg.bundle)
    texts = []
    for spec in load_task_specs(bundle_yaml(bundle)):
        path = bundle / "eval_data" / spec.dataset_uri
        if path.exists():
            texts += [line for line in path.read_text(encoding="utf-8").splitlines()[:3000]]
    t0 = time.time()
    tok = Tokenizer.train(texts, vocab_size=32768)
    if is_rank0():
        tok.save(cache)
    print0(f"[eval] no tokenizer found: trained a 32K BPE on the bundle text in {time.time() - t0:.1f}s ({cache})")
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Writing results


def _eval_dir(run: str) -> Path:
    return run_dir(run) / "eval"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _append_metrics(run: str, source: str, record: dict[str, Any]) -> None:
    """One line in the stage's metrics.jsonl (appended: the training curve before it stays intact)."""
    path = stage_dir(run, source) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# eval base


def _bpb(cfg: BaseEvalConfig, model: Any, tok: Any, meta: dict[str, Any], rt: Any) -> dict[str, Any]:
    data = cfg.data or (meta.get("config") or {}).get("data") or str(default_data_dir("synth"))
    train, val = list_shards(data)
    T = model.config.sequence_len
    B = cfg.device_batch_size or max(1, (65536 if rt.device.type == "cuda" else 8192) // T)
    steps = max(1, cfg.eval_tokens // (B * T * rt.world_size))
    token_bytes = tok.token_bytes().to(rt.device)
    out: dict[str, Any] = {"data": str(data), "tokens_per_split": steps * B * T * rt.world_size}
    for split, shards in (("train", train), ("val", val)):
        loader = DataLoader(shards, tok, B, T, rank=rt.rank, world_size=rt.world_size, device=rt.device,
                            loop=False)

        seen = [0]

        def batches(loader=loader):
            for i, batch in enumerate(loader):
                if i >= steps:
                    break
                seen[0] += 1
                yield batch

        t0 = time.time()
        try:
            out[f"{split}_bpb"] = float(evaluate_bpb(model, batches(), token_bytes))
        finally:
            loader.close()
        if seen[0] == 0:
            raise UserError(f"--data {data}: the {split} shards hold less than one batch of {B} x {T} tokens; "
                            f"lower --device-batch-size")
        out[f"{split}_batches"] = seen[0]
        out[f"{split}_seconds"] = round(time.time() - t0, 2)
    return out


def _samples(model: Any, tok: Any, max_tokens: int = 32) -> list[dict[str, str]]:
    engine = Engine(model, tok, cuda_graph=False, compile=False)
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = tok.encode(prompt, prepend=tok.bos_id)
        seqs, _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        out.append({"prompt": prompt, "completion": tok.decode(seqs[0][len(ids):])})
    return out


def _validate_common(cfg: BaseEvalConfig | ChatEvalConfig) -> None:
    if cfg.run:
        check_run_name(cfg.run)
    if cfg.checkpoint:
        require_checkpoint_dir(cfg.checkpoint)


def validate_base(cfg: BaseEvalConfig) -> None:
    """The flags of `eval base`, one ConfigError line each, before the model is loaded."""
    check_ranges(cfg, {"step": (0, None), "batch_tokens": (0, None), "eval_tokens": (1, None),
                       "device_batch_size": (0, None), "depth": (1, None)})
    _validate_common(cfg)
    if cfg.bundle:
        require_dir(cfg.bundle, "--bundle", "pass the unpacked CORE eval bundle folder, or drop --bundle to "
                                            "download it")
    if cfg.data:
        require_dir(cfg.data, "--data", "pass a shard folder (`picochat data synth|download|prepare` make one)")
    if cfg.tokenizer:
        require_dir(cfg.tokenizer, "--tokenizer", "pass the folder `picochat tokenizer train --out` wrote")


def validate_chat(cfg: ChatEvalConfig) -> None:
    """The flags of `eval chat`, one ConfigError line each, before the model is loaded."""
    check_ranges(cfg, {"step": (0, None), "max_problems": (0, None), "num_samples": (1, None),
                       "temperature": (0, None), "top_k": (0, None), "max_new_tokens": (1, None),
                       "batch_tokens": (0, None)})
    _validate_common(cfg)
    if cfg.num_samples > 1 and cfg.temperature <= 0:
        raise UserError(f"--num-samples {cfg.num_samples} with --temperature {cfg.temperature}: greedy samples are "
                        f"identical; use a temperature > 0 for pass@k")
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not names:
        raise UserError(f"--tasks {cfg.tasks!r}: give at least one task of {', '.join(chat_eval.ALL_TASKS)}")
    unknown = [n for n in names if n not in chat_eval.ALL_TASKS]
    if unknown:
        raise UserError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(chat_eval.ALL_TASKS)}")
    if cfg.task_dir:
        require_dir(cfg.task_dir, "--task-dir", "pass a folder (task files are downloaded into it if missing)",
                    must_exist=False)
    if cfg.synth_eval and not Path(cfg.synth_eval).is_file():
        raise UserError(f"--synth-eval {cfg.synth_eval}: no such file; pass the eval.jsonl `picochat data synth` "
                        f"wrote, or drop the flag")


def run_base(cfg: BaseEvalConfig) -> dict[str, Any]:
    validate_base(cfg)
    rt = init_runtime(cfg.device)
    model, tok, meta, run, step = _load(cfg, rt)
    model = prepare_model(model)  # on CUDA: weights in bf16 once, instead of a cast in every forward
    do_all = not (cfg.bpb or cfg.core or cfg.samples)
    edir = _eval_dir(run)
    result: dict[str, Any] = {"run": run, "source": cfg.source, "step": step,
                              "checkpoint": meta.get("checkpoint_dir"), "random_init": bool(cfg.random_init)}
    record: dict[str, Any] = {"step": step or 0, "eval": "base"}
    if cfg.samples or do_all:
        if is_rank0():
            samples = _samples(model, tok)
            for s in samples:
                print0(f"[sample] {s['prompt']!r} -> {s['completion']!r}")
            result["samples"] = samples
            _write_json(edir / f"{cfg.source}_samples.json", {**result, "samples": samples})
    if cfg.bpb or do_all:
        bpb = _bpb(cfg, model, tok, meta, rt)
        print0(f"[eval] bpb train {bpb['train_bpb']:.4f} val {bpb['val_bpb']:.4f} "
               f"({bpb['tokens_per_split']:,} tokens per split)")
        result["bpb"] = bpb
        record.update(train_bpb=bpb["train_bpb"], val_bpb=bpb["val_bpb"])
        if is_rank0():
            _write_json(edir / f"{cfg.source}_bpb.json", {**{k: v for k, v in result.items() if k != "samples"},
                                                           **bpb})
    if cfg.core or do_all:
        bundle = resolve_bundle(cfg.bundle)
        tasks = [t.strip() for t in cfg.core_tasks.split(",") if t.strip()] if cfg.core_tasks else None
        core = evaluate_core(model, tok, bundle, max_per_task=cfg.max_per_task, device=rt.device,
                             batch_tokens=cfg.batch_tokens or None, tasks=tasks, verbose=True)
        tokens = sum(t["tokens"] for t in core["tasks"].values()) * rt.world_size
        print0(core_eval.format_table(core))
        print0(f"[eval] CORE: {core['examples']:,} examples, {throughput_line(tokens, core['seconds'])} "
               f"(rank 0 tokens x world {rt.world_size})")
        result["core"] = core
        record.update(core=core["core"], core_label=core["core_label"])
        if cfg.core_check and is_rank0():
            n = cfg.max_per_task if cfg.max_per_task > 0 else 20
            check = compare_with_reference(model, tok, bundle, max_per_task=n, device=rt.device,
                                           batch_tokens=cfg.batch_tokens or None, tasks=tasks)
            for label, c in check["tasks"].items():
                print0(f"[core check] {label:<34} n={c['n']:<4} max|dloss| {c['max_abs_loss_diff']:.2e} "
                       f"decisions differ {c['decisions_differ']} acc {c['acc_batched']:.3f} vs "
                       f"{c['acc_reference']:.3f}")
            print0(f"[core check] batched vs one-at-a-time over {check['examples']} examples: max|dloss| "
                   f"{check['max_abs_loss_diff']:.2e}, {check['decisions_differ']} decisions differ")
            core["reference_check"] = check
        if is_rank0():
            _write_json(edir / f"{cfg.source}_core.json", {**{k: v for k, v in result.items() if k != "samples"}})
            _write_csv(edir / f"{cfg.source}_core.csv",
                       ["task", "type", "shots", "n", "accuracy", "baseline_percent", "centered"],
                       [[k, v["type"], v["shots"], v["n"], f"{v['accuracy']:.6f}", v["baseline"],
                         f"{v['centered']:.6f}"] for k, v in core["tasks"].items()]
                       + [[core["core_label"], "", "", core["examples"], "", "",
                           "" if core["core"] is None else f"{core['core']:.6f}"]])
    if is_rank0() and not cfg.random_init and len(record) > 2:
        _append_metrics(run, cfg.source, record)
    return result


# ----------------------------------------------------------------------------------------------------------------
# eval chat


def run_chat(cfg: ChatEvalConfig) -> dict[str, Any]:
    validate_chat(cfg)
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    rt = init_runtime(cfg.device)
    model, tok, meta, run, step = _load(cfg, rt)
    model = prepare_model(model)
    engine = Engine(model, tok)
    summary = evaluate_chat(model, tok, names, task_dir=cfg.task_dir, synth_path=cfg.synth_eval,
                            max_problems=cfg.max_problems or None, num_samples=cfg.num_samples,
                            temperature=cfg.temperature, top_k=cfg.top_k or None, max_new_tokens=cfg.max_new_tokens,
                            batch_tokens=cfg.batch_tokens or None, device=rt.device, engine=engine, seed=cfg.seed)
    print0(chat_eval.format_table(summary))
    result = {"run": run, "source": cfg.source, "step": step, "checkpoint": meta.get("checkpoint_dir"), **summary}
    if is_rank0():
        edir = _eval_dir(run)
        _write_json(edir / f"{cfg.source}_chat.json", result)
        _write_csv(edir / f"{cfg.source}_chat.csv", ["task", "kind", "n", "accuracy", "baseline", "centered"],
                   [[k, v["kind"], v["n"], f"{v['accuracy']:.6f}", v["baseline"], f"{v['centered']:.6f}"]
                    for k, v in summary["tasks"].items()]
                   + [[summary["chatcore_label"], "", "", "", "",
                       "" if summary["chatcore"] is None else f"{summary['chatcore']:.6f}"]])
        rec = {"step": step or 0, "eval": "chat", "chatcore": summary["chatcore"],
               **{f"{k}_acc": v["accuracy"] for k, v in summary["tasks"].items()}}
        _append_metrics(run, cfg.source, rec)
    return result


# ----------------------------------------------------------------------------------------------------------------
# CLI


def run(cfg: BaseEvalConfig | ChatEvalConfig) -> dict[str, Any]:
    """Entry point for the orchestrator: dispatch on the config type."""
    if isinstance(cfg, BaseEvalConfig):
        return run_base(cfg)
    if isinstance(cfg, ChatEvalConfig):
        return run_chat(cfg)
    raise TypeError(f"evaluate.run: expected BaseEvalConfig or ChatEvalConfig, got {type(cfg).__name__}")


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_kind", metavar="KIND", required=True)
    base = sub.add_parser("base", help="bpb, CORE and samples of a base model",
                          description="bpb on train/val shards, CORE (DCLM), greedy samples. None selected = all.")
    add_config_args(base, BaseEvalConfig)
    chat = sub.add_parser("chat", help="ARC, MMLU, GSM8K, HumanEval, SpellingBee, synth; ChatCORE",
                          description="Chat evaluations and ChatCORE of a chat model (or a base model: --source base).")
    add_config_args(chat, ChatEvalConfig)


def cli_main(args: argparse.Namespace) -> int:
    try:
        if args.eval_kind == "base":
            run_base(config_from_args(BaseEvalConfig, args))
        else:
            run_chat(config_from_args(ChatEvalConfig, args))
    finally:
        teardown()
    return 0
