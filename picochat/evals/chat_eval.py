"""Chat evaluations and ChatCORE.

| task          | data                                  | kind        | baseline |
|---------------|---------------------------------------|-------------|----------|
| arc_easy      | ARC-Easy test (2,376)                 | categorical | 0.25     |
| arc_challenge | ARC-Challenge test (1,172)            | categorical | 0.25     |
| mmlu          | MMLU test (14,042)                    | categorical | 0.25     |
| gsm8k         | GSM8K test (1,319)                    | generative  | 0        |
| humaneval     | HumanEval (164), run in the sandbox   | generative  | 0        |
| spellingbee   | our letter-counting generator, 256    | generative  | 0        |
| synth_mc      | the embedded world's held-out facts   | categorical | 0.25     |
| synth_gen     | the embedded world's held-out sums    | generative  | 0        |

Categorical: the prompt is the chat rendering the model was trained on, ending in `<|assistant_start|>`; one forward
pass per batch of prompts (length-sorted, right-padded), the logits at the last prompt position restricted to the
answer letters' tokens, argmax. No sampling. Generative: the Engine samples (greedy by default, i.e. pass@1 at
temperature 0; `num_samples=k, temperature=t` gives pass@k), with the python tool active, and the task checks the
reply (final `#### number`, or HumanEval's tests in the sandbox).

ChatCORE = mean over tasks of (accuracy - baseline) / (1 - baseline). It is labelled partial unless the six standard
tasks (nanochat's set) all ran; synth tasks are reported and folded into a separate "ChatCORE incl. synth".
`max_problems` takes a deterministic shuffled subset (MMLU's file is sorted by subject; its head is not a sample).
Under torchrun, problems are strided over ranks and the counts all-reduced.
"""

from __future__ import annotations

import random
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from picochat.config import UserError
from picochat.conversation import render_for_completion
from picochat.data.synth import LETTERS, load_eval
from picochat.data.tasks import ARC, GSM8K, HumanEval, MMLU, SpellingBee, normalise_number, require_synth
from picochat.sandbox import unavailable_message
from picochat.engine import Engine, parts_to_text, tokens_to_parts
from picochat.evals.core_eval import scored_logits
from picochat.runtime import default_data_dir, get_rank, get_world_size, print0

STANDARD_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee")
ALL_TASKS = STANDARD_TASKS + ("synth",)
SUBSET_SEED = 42
SPELLINGBEE_SIZE = 256


@dataclass
class ChatTask:
    name: str
    kind: str                                     # "categorical" | "generative"
    baseline: float
    problems: Sequence[dict]                      # conversations (the last assistant message is the gold answer)
    evaluate: Callable[[dict, str], bool] | None = None  # generative: is this reply right?


# ----------------------------------------------------------------------------------------------------------------
# Tasks


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in a reply, commas dropped and normalised ("1,200.0" -> "1200")."""
    found = _NUM.findall(text)
    return normalise_number(found[-1]) if found else None


def synth_tasks(path: str | Path | None = None) -> list[ChatTask]:
    """The embedded world's eval items as two tasks, prompted exactly like its chat training data: the question
    text (which already lists the lettered options for MC) as the user turn."""
    if path is None:
        path = default_data_dir("synth") / "eval.jsonl"
    path = require_synth(Path(path), "eval")
    mc, gen = [], []
    for row in load_eval(path):
        if row["kind"] == "mc":
            letters = list(LETTERS[: len(row["choices"])])
            mc.append({"messages": [{"role": "user", "content": row["question"]},
                                    {"role": "assistant", "content": letters[row["answer"]]}],
                       "letters": letters, "answer": letters[row["answer"]], "id": row["id"]})
        else:
            gen.append({"messages": [{"role": "user", "content": row["question"]},
                                     {"role": "assistant", "content": row["answer"]}],
                        "answer": normalise_number(row["answer"]), "id": row["id"]})
    out = []
    if mc:
        out.append(ChatTask("synth_mc", "categorical", 0.25, mc))
    if gen:
        out.append(ChatTask("synth_gen", "generative", 0.0, gen, lambda conv, reply: last_number(reply) == conv["answer"]))
    return out


def load_tasks(names: Sequence[str], task_dir: str | Path | None = None, synth_path: str | Path | None = None
               ) -> list[ChatTask]:
    """ChatTasks for task names (see ALL_TASKS); 'synth' expands to synth_mc + synth_gen."""
    out: list[ChatTask] = []
    for name in names:
        if name == "arc_easy":
            t = ARC("easy", "test", task_dir=task_dir)
        elif name == "arc_challenge":
            t = ARC("challenge", "test", task_dir=task_dir)
        elif name == "mmlu":
            t = MMLU("test", task_dir=task_dir)
        elif name == "gsm8k":
            t = GSM8K("test", task_dir=task_dir)
        elif name == "humaneval":
            off = unavailable_message()
            if off:  # scoring every answer as wrong would read as a model result; say why it is missing instead
                print(f"[eval] humaneval skipped: {off}", file=sys.stderr)
                continue
            t = HumanEval(task_dir=task_dir)
        elif name == "spellingbee":
            t = SpellingBee(size=SPELLINGBEE_SIZE, split="test", task_dir=task_dir)
        elif name == "synth":
            out += synth_tasks(synth_path)
            continue
        else:
            raise UserError(f"--tasks: unknown task {name!r}; choose from {', '.join(ALL_TASKS)}")
        kind = getattr(t, "eval_type", "generative")
        out.append(ChatTask(name, kind, float(getattr(t, "baseline", 0.0)), _Materialised(t),
                            None if kind == "categorical" else t.evaluate))
    return out


class _Materialised(Sequence):
    """Index access to a tasks.Task (its conversations are built on demand)."""

    def __init__(self, task: Any):
        self.task = task

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, i):  # type: ignore[override]
        return self.task[i]


def subset(n: int, max_problems: int | None) -> list[int]:
    """Indices of the problems to run: all in order, or a deterministic shuffled subset of max_problems."""
    if max_problems is None or max_problems <= 0 or max_problems >= n:
        return list(range(n))
    idx = list(range(n))
    random.Random(SUBSET_SEED).shuffle(idx)
    return sorted(idx[:max_problems])


# ----------------------------------------------------------------------------------------------------------------
# Categorical


@torch.no_grad()
def categorical_predictions(model: Any, tokenizer: Any, convs: Sequence[dict], device: torch.device | str,
                            batch_tokens: int = 16384, max_len: int | None = None) -> list[str]:
    """The letter each conversation's assistant turn would start with (argmax over the allowed letters' logits)."""
    device = torch.device(device)
    prompts, letter_ids = [], []
    for i, conv in enumerate(convs):
        ids = render_for_completion(tokenizer, conv, where=f"problem {i}")
        if max_len is not None and len(ids) > max_len:
            ids = ids[-max_len:]  # keep the question's end and the answer position
        prompts.append(np.asarray(ids, dtype=np.int64))
        lids = []
        for letter in conv["letters"]:
            toks = tokenizer.encode(letter)
            if len(toks) != 1:
                raise UserError(f"answer letter {letter!r} is {len(toks)} tokens with this tokenizer; expected 1")
            lids.append(toks[0])
        letter_ids.append(lids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    preds: list[str] = [""] * len(prompts)
    i = 0
    while i < len(order):
        T = len(prompts[order[i]])
        rows = order[i:i + max(1, batch_tokens // T)]
        i += len(rows)
        idx = np.full((len(rows), T), tokenizer.bos_id, dtype=np.int64)
        for r, j in enumerate(rows):
            idx[r, :len(prompts[j])] = prompts[j]
        flat_last = torch.tensor([r * T + len(prompts[j]) - 1 for r, j in enumerate(rows)], device=device)
        at = scored_logits(model, torch.from_numpy(idx).to(device), flat_last).cpu()  # (rows, V)
        for r, j in enumerate(rows):
            scores = at[r, letter_ids[j]]
            preds[j] = convs[j]["letters"][int(scores.argmax())]
    return preds


# ----------------------------------------------------------------------------------------------------------------
# Generative


def completion_text(tokenizer: Any, tokens: Sequence[int]) -> str:
    """A generated assistant turn as text; a tool call reads `<<expr=result>>` (GSM8K's notation)."""
    return parts_to_text(tokens_to_parts(tokenizer, tokens))


def generative_results(engine: Any, tokenizer: Any, task: ChatTask, convs: Sequence[dict], num_samples: int = 1,
                       temperature: float = 0.0, top_k: int | None = 50, max_new_tokens: int = 512, seed: int = 42,
                       on_problem: Callable[[int, int], None] | None = None) -> list[bool]:
    """pass@num_samples per problem. Replies are checked on a thread pool (HumanEval runs in the sandbox) while
    the engine generates the next problem."""
    assert task.evaluate is not None
    results: list[list[Future]] = []
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="picochat-check") as pool:
        for i, conv in enumerate(convs):
            prompt = render_for_completion(tokenizer, conv, where=f"{task.name} problem {i}")
            try:
                seqs, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                                temperature=temperature, top_k=top_k, seed=seed + i)
            except ValueError:  # prompt longer than the model's context: it cannot be answered
                results.append([])
                continue
            texts = [completion_text(tokenizer, s[len(prompt):]) for s in seqs]
            results.append([pool.submit(_safe_check, task.evaluate, conv, t) for t in texts])
            if on_problem is not None:
                on_problem(i + 1, len(convs))
        return [any(f.result() for f in fs) for fs in results]


def _safe_check(fn: Callable[[dict, str], bool], conv: dict, text: str) -> bool:
    try:
        return bool(fn(conv, text))
    except Exception:  # noqa: BLE001 - a reply that breaks the checker is a wrong reply
        return False


# ----------------------------------------------------------------------------------------------------------------
# The suite


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_chat(model: Any, tokenizer: Any, task_names: Sequence[str] = ALL_TASKS, *,
                  task_dir: str | Path | None = None, synth_path: str | Path | None = None,
                  max_problems: int | None = None, num_samples: int = 1, temperature: float = 0.0,
                  top_k: int | None = 50, max_new_tokens: int = 512, batch_tokens: int | None = None,
                  device: torch.device | str | None = None, engine: Any = None, seed: int = 42,
                  verbose: bool = True) -> dict[str, Any]:
    """Run the chat tasks and return {"tasks": {name: {...}}, "chatcore": ..., ...}. Collective under torchrun."""
    if num_samples > 1 and temperature <= 0:
        raise UserError(f"--num-samples {num_samples} with --temperature {temperature}: greedy samples are "
                        f"identical; use a temperature > 0 for pass@k")
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    if batch_tokens is None:
        batch_tokens = 65536 if device.type == "cuda" else 8192
    rank, world = get_rank(), get_world_size()
    cfg = getattr(model, "config", None)
    max_len = getattr(cfg, "sequence_len", None)
    tasks = load_tasks(task_names, task_dir=task_dir, synth_path=synth_path)
    out: dict[str, dict[str, Any]] = {}
    t_all = time.time()
    for task in tasks:
        t0 = time.time()
        chosen = subset(len(task.problems), max_problems)
        mine = chosen[rank::world]
        convs = [task.problems[i] for i in mine]
        if task.kind == "categorical":
            preds = categorical_predictions(model, tokenizer, convs, device, batch_tokens, max_len)
            correct = [p == c["answer"] for p, c in zip(preds, convs)]
        else:
            if engine is None:
                engine = Engine(model, tokenizer)
            last_print = [time.time()]

            def progress(done: int, total: int, _name: str = task.name) -> None:
                if verbose and time.time() - last_print[0] > 30:
                    last_print[0] = time.time()
                    print0(f"[chat eval] {_name}: {done}/{total} problems on rank 0")

            correct = generative_results(engine, tokenizer, task, convs, num_samples, temperature, top_k,
                                         max_new_tokens, seed, on_problem=progress)
        counts = torch.tensor([float(sum(correct)), float(len(correct))], dtype=torch.float64,
                              device=device if world > 1 else "cpu")
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(counts)
        n_correct, n = int(counts[0].item()), int(counts[1].item())
        acc = n_correct / max(n, 1)
        out[task.name] = {"kind": task.kind, "n": n, "correct": n_correct, "accuracy": acc,
                          "baseline": task.baseline, "centered": centered(acc, task.baseline),
                          "num_samples": num_samples if task.kind == "generative" else 1,
                          "seconds": round(time.time() - t0, 2)}
        if verbose:
            r = out[task.name]
            metric = f"pass@{num_samples}" if task.kind == "generative" else "acc"
            print0(f"[chat eval] {task.name:<14} {metric} {acc:.4f} ({n_correct}/{n}) centered "
                   f"{r['centered']:+.4f} ({r['seconds']:.1f}s)")
    summary = chatcore_summary(out)
    summary.update(tasks=out, seconds=round(time.time() - t_all, 2), max_problems=max_problems,
                   num_samples=num_samples, temperature=temperature, world_size=world)
    return summary


def chatcore_summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ChatCORE over the standard tasks that ran (labelled partial unless all six did), plus one incl. synth."""
    std = [t for t in STANDARD_TASKS if t in results]
    chatcore = float(np.mean([results[t]["centered"] for t in std])) if std else None
    label = "ChatCORE" if len(std) == len(STANDARD_TASKS) else \
        f"ChatCORE (partial, {len(std)} of {len(STANDARD_TASKS)} tasks)"
    out: dict[str, Any] = {"chatcore": chatcore, "chatcore_label": label, "partial": len(std) < len(STANDARD_TASKS)}
    if any(t not in STANDARD_TASKS for t in results):
        out["chatcore_incl_synth"] = float(np.mean([r["centered"] for r in results.values()]))
    return out


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"{'task':<14} {'kind':<11} {'n':>6} {'acc':>7} {'base':>5} {'centered':>9}"]
    for name, r in summary["tasks"].items():
        lines.append(f"{name:<14} {r['kind']:<11} {r['n']:>6} {r['accuracy']:>7.4f} {r['baseline']:>5.2f} "
                     f"{r['centered']:>+9.4f}")
    cc = summary.get("chatcore")
    lines.append(f"{summary['chatcore_label']}: " + (f"{cc:.4f}" if cc is not None else "n/a (no standard task ran)"))
    if "chatcore_incl_synth" in summary:
        lines.append(f"ChatCORE incl. synth ({len(summary['tasks'])} tasks): {summary['chatcore_incl_synth']:.4f}")
    return "\n".join(lines)
