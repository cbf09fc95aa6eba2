"""CORE: the DCLM in-context-learning benchmark (22 tasks), scored the DCLM way, batched and distributed.

Three task types, each few-shot prompted as the bundle's yaml says (`num_fewshot`, `continuation_delimiter`):
- multiple_choice: one prompt per choice, `shots + query + delim + choice`; the continuation is what follows the
  choices' common token prefix; the model picks the choice with the lowest mean cross-entropy over it.
- schema: one prompt per context option, `shots + option + delim + continuation`; the continuation is the options'
  common token suffix; lowest mean cross-entropy wins.
- language_modeling: `shots + context.strip() + delim + continuation`; correct iff greedy argmax reproduces every
  continuation token.
Few-shot examples are joined by a blank line. Every prompt starts with BOS. Accuracy is centered against the task's
random baseline, `(acc - b) / (1 - b)`, and CORE is the mean over the 22 DCLM tasks (baselines: DCLM's original
`eval_meta_data_v1.csv`, the ones behind GPT-2's published 0.256525). When tasks are missing the score is labelled
partial ("CORE (partial, 18 of 22 tasks)") and the missing ones are named.

Speed: instead of one forward pass per example, every (example, choice) sequence of a task is tokenized up front
(multi-threaded tiktoken), sorted by length and packed into right-padded batches of about `batch_tokens` tokens.
Right padding never changes a causal model's outputs at real positions, so the scores equal a one-at-a-time
reference (`reference=True`, also used by the tests). Only the logits at continuation positions are
log-softmaxed, and results stay on the GPU until a task ends (no per-batch host sync). Under torchrun, examples are
strided across ranks and the per-task counts are all-reduced.

Determinism: each task's rows are shuffled with Random(1337) and cropped to `max_per_task`; the few-shot examples of
example i are drawn with Random(1234 + i) from the whole shuffled task, never including i itself, so a capped run
scores exactly the first N examples of a full run.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from picochat import runtime
from picochat.config import UserError
from picochat.data.download import download_file
from picochat.files import replace_dir
from picochat.runtime import barrier, is_rank0, picochat_home, print0

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

# The 22 CORE tasks (DCLM `low_variance_datasets`) with DCLM's original random baselines in percent
# (eval_meta_data_v1.csv). Used when the bundle carries no v1 csv, and to name the tasks a bundle lacks.
CORE_BASELINES_V1: dict[str, float] = {
    "hellaswag_zeroshot": 25.0, "jeopardy": 0.0, "bigbench_qa_wikidata": 0.0, "arc_easy": 25.0,
    "arc_challenge": 25.0, "copa": 50.0, "commonsense_qa": 20.0, "piqa": 50.0, "openbook_qa": 25.0,
    "lambada_openai": 0.0, "hellaswag": 25.0, "winograd": 50.0, "winogrande": 50.0,
    "bigbench_dyck_languages": 0.0, "agi_eval_lsat_ar": 20.0, "bigbench_cs_algorithms": 0.0,
    "bigbench_operators": 0.0, "bigbench_repeat_copy_logic": 0.0, "squad": 0.0, "coqa": 0.0, "boolq": 62.0,
    "bigbench_language_identification": 9.1,
}
CORE_TASKS: tuple[str, ...] = tuple(CORE_BASELINES_V1)
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


# ----------------------------------------------------------------------------------------------------------------
# Bundle: yaml task list, baselines, data files


@dataclass
class TaskSpec:
    label: str
    dataset_uri: str
    task_type: str
    num_fewshot: int
    delimiter: str = " "

    @property
    def kind(self) -> str:
        return {"multiple_choice": "MC", "schema": "schema", "language_modeling": "LM"}[self.task_type]


def _yaml_scalar(text: str) -> Any:
    """One scalar of the tiny YAML subset the bundle uses (quoted strings, ints, floats, bools, [a, b] lists)."""
    text = text.strip()
    if text.startswith('"'):
        return json.loads(text)  # YAML double-quoted escapes used here (\n, \") are JSON's
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_yaml_scalar(p) for p in inner.split(",")] if inner else []
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_icl_yaml(text: str) -> list[dict[str, Any]]:
    """Parse `icl_tasks:` followed by `- key: value` blocks. Used when PyYAML is not installed (GPU images)."""
    tasks: list[dict[str, Any]] = []
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith(("'", '"')) else raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#") or line.strip() == "icl_tasks:":
            continue
        stripped = line.strip()
        if stripped.startswith("- "):
            tasks.append({})
            stripped = stripped[2:]
        if not tasks or ":" not in stripped:
            raise ValueError(f"unexpected line {raw!r}")
        key, _, value = stripped.partition(":")
        tasks[-1][key.strip()] = _yaml_scalar(value)
    return tasks


def load_task_specs(yaml_path: Path) -> list[TaskSpec]:
    """The task list of a CORE yaml (`icl_tasks: [{label, dataset_uri, num_fewshot, icl_task_type, ...}]`)."""
    text = Path(yaml_path).read_text()
    try:
        try:
            import yaml

            entries = (yaml.safe_load(text) or {}).get("icl_tasks", [])
        except ImportError:
            entries = _parse_icl_yaml(text)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise UserError(f"{yaml_path}: cannot parse the task list ({e}); use the bundle's core.yaml") from None
    specs = []
    for i, e in enumerate(entries):
        try:
            shots = e.get("num_fewshot", [0])
            shots = int(shots[0] if isinstance(shots, list) else shots)
            spec = TaskSpec(label=str(e["label"]), dataset_uri=str(e["dataset_uri"]),
                            task_type=str(e["icl_task_type"]), num_fewshot=shots,
                            delimiter=str(e.get("continuation_delimiter", " ")))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{yaml_path}: task #{i} is missing or has a bad field ({err})") from None
        if spec.task_type not in TASK_TYPES:
            raise UserError(f"{yaml_path}: task {spec.label!r} has icl_task_type {spec.task_type!r}; "
                            f"expected one of {', '.join(TASK_TYPES)}")
        specs.append(spec)
    return specs


def bundle_yaml(bundle_dir: Path) -> Path:
    """The bundle's full task list: core_full22.yaml (all 22 entries) when present, else core.yaml."""
    for name in ("core_full22.yaml", "core.yaml"):
        if (Path(bundle_dir) / name).exists():
            return Path(bundle_dir) / name
    raise UserError(f"--bundle {bundle_dir}: no core.yaml there; point --bundle at an unpacked eval bundle "
                    f"(core.yaml, eval_meta_data*.csv, eval_data/) or leave it out to download one")


def load_baselines(bundle_dir: Path) -> tuple[dict[str, float], str]:
    """Random baselines in percent by task label, and where they came from.

    DCLM's original `eval_meta_data_v1.csv` wins; without it the built-in v1 values cover the 22 CORE tasks and
    `eval_meta_data.csv` (whose corrected baselines differ for 3 CORE tasks) only fills in other tasks.
    """
    v1 = Path(bundle_dir) / "eval_meta_data_v1.csv"
    other = Path(bundle_dir) / "eval_meta_data.csv"
    out: dict[str, float] = {}
    if other.exists():
        out.update(_read_baseline_csv(other))
    out.update(CORE_BASELINES_V1)
    source = "built-in DCLM v1 baselines"
    if v1.exists():
        out.update(_read_baseline_csv(v1))
        source = str(v1.name)
    return out, source


def _read_baseline_csv(path: Path) -> dict[str, float]:
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                out[row["Eval Task"].strip()] = float(row["Random baseline"])
            except (KeyError, ValueError, TypeError):
                continue
    return out


def resolve_bundle(bundle: str | Path | None = None, url: str | None = None, retries: int = 5) -> Path:
    """An unpacked bundle directory: `bundle` if given, else the cached download (fetched on first use)."""
    if bundle:
        path = Path(bundle).expanduser()
        if not path.is_dir():
            raise UserError(f"--bundle {bundle}: no such directory")
        bundle_yaml(path)
        return path
    cache = picochat_home() / "eval_bundle"
    if (cache / "core.yaml").exists():
        return cache
    url = url or os.environ.get("PICOCHAT_EVAL_BUNDLE_URL", BUNDLE_URL)
    if not is_rank0():  # rank 0 downloads; the others wait at the barrier below, then read the cache
        barrier()
        if not (cache / "core.yaml").exists():
            raise UserError(f"{cache}: rank 0 could not prepare the eval bundle (see its error)")
        return cache
    archive = picochat_home() / "downloads" / "eval_bundle.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)

    def is_zip(path: Path) -> None:  # reject an HTML error page or a truncated file before it is kept
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"corrupt member {bad}")

    print0(f"[core] downloading the CORE eval bundle from {url}")
    try:
        try:
            download_file(url, archive, validator=is_zip, retries=retries)
        except Exception as e:  # noqa: BLE001 - network/HTTP/validation: one clear message
            why = str(e) if isinstance(e, UserError) else f"{url}: {type(e).__name__}: {e}"
            raise UserError(f"cannot download the CORE eval bundle: {why}; or pass --bundle DIR with an "
                            f"unpacked bundle") from None
        _unpack_bundle(archive, cache)
    finally:
        barrier()
    return cache


def _unpack_bundle(archive: Path, dest: Path) -> None:
    """Extract into a temp dir next to `dest`, find the folder holding core.yaml, rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".eval_bundle.", dir=dest.parent))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():  # refuse members that would land outside tmp
                    target = (tmp / name).resolve()
                    if not str(target).startswith(str(tmp.resolve())):
                        raise UserError(f"{archive}: unsafe path {name!r} in the archive")
                zf.extractall(tmp)
        except zipfile.BadZipFile:
            archive.unlink(missing_ok=True)
            raise UserError(f"{archive}: not a zip archive (download corrupted?); it was deleted, run again") from None
        roots = sorted(p.parent for p in tmp.rglob("core.yaml"))
        if not roots:
            raise UserError(f"{archive}: no core.yaml inside; is this the CORE eval bundle?")
        replace_dir(roots[0], dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_task_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: bad JSON ({e})") from None
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def fewshot_indices(n: int, idx: int, k: int) -> list[int]:
    """k distinct indices of [0, n) other than idx, from Random(FEWSHOT_SEED + idx). O(k), not O(n)."""
    k = min(k, n - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(n - 1), k)
    return [i + 1 if i >= idx else i for i in picks]


def render_prompts(spec: TaskSpec, item: dict[str, Any], shots: list[dict[str, Any]]) -> list[str]:
    """The prompt texts of one example (BOS is added at tokenization).

    MC: one per choice. Schema: one per context option. LM: [without continuation (stripped), with continuation].
    """
    d = spec.delimiter
    if spec.task_type == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{c}" for c in item["choices"]]
    if spec.task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{c}{d}{item['continuation']}" for c in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    without = f"{head}{item['context'].strip()}{d}"
    # strip: a trailing delimiter space would merge into the continuation's first token, so the prompt
    # without the continuation would not be a token prefix of the prompt with it
    return [without.strip(), without + item["continuation"]]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass
class Example:
    """One tokenized example: its sequences (one per choice, one for LM) and continuation spans [start, end)."""

    seqs: list[np.ndarray]
    spans: list[tuple[int, int]]
    gold: int


def build_example(spec: TaskSpec, token_lists: list[list[int]], gold: int, max_len: int | None) -> Example:
    """Continuation spans from the tokenized prompts (see render_prompts), cropped on the left to max_len."""
    token_lists = [np.asarray(t, dtype=np.int32) for t in token_lists]
    if spec.task_type == "language_modeling":
        without, with_ = token_lists
        start = _common_prefix(without, with_)
        seqs, spans = [with_], [(start, len(with_))]
    elif spec.task_type == "multiple_choice":
        shortest = min(len(t) for t in token_lists)
        prefix = shortest
        for t in token_lists[1:]:
            prefix = min(prefix, _common_prefix(token_lists[0], t))
        seqs, spans = token_lists, [(prefix, len(t)) for t in token_lists]
    else:  # schema: the shared continuation is the options' common token suffix
        shortest = min(len(t) for t in token_lists)
        suffix = shortest
        for t in token_lists[1:]:
            suffix = min(suffix, _common_prefix(token_lists[0][::-1], t[::-1]))
        seqs, spans = token_lists, [(len(t) - suffix, len(t)) for t in token_lists]
    out_seqs, out_spans = [], []
    for t, (s, e) in zip(seqs, spans):
        s = min(max(s, 1), e - 1) if e > 1 else 1  # at least one scored token, never position 0 (BOS)
        if max_len is not None and len(t) > max_len:
            drop = len(t) - max_len
            t = t[drop:]
            s, e = max(1, s - drop), e - drop
        out_seqs.append(t)
        out_spans.append((s, e))
    return Example(out_seqs, out_spans, gold)


def prepare_task(spec: TaskSpec, rows: list[dict[str, Any]], tokenizer: Any, indices: list[int],
                 max_len: int | None) -> list[Example]:
    """Render and tokenize the examples `indices` of a (shuffled) task."""
    prompts: list[str] = []
    counts: list[int] = []
    for i in indices:
        shots = [rows[j] for j in fewshot_indices(len(rows), i, spec.num_fewshot)]
        p = render_prompts(spec, rows[i], shots)
        prompts.extend(p)
        counts.append(len(p))
    bos = tokenizer.bos_id
    tokens = tokenizer.encode(prompts, prepend=bos, num_threads=min(16, os.cpu_count() or 1)) if prompts else []
    out, pos = [], 0
    for i, c in zip(indices, counts):
        gold = int(rows[i].get("gold", 0)) if spec.task_type != "language_modeling" else 0
        out.append(build_example(spec, tokens[pos:pos + c], gold, max_len))
        pos += c
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def _model_max_len(model: Any) -> int | None:
    cfg = getattr(model, "config", None) or getattr(getattr(model, "_orig_mod", None), "config", None)
    return getattr(cfg, "sequence_len", None)


@torch.no_grad()
def score_sequences(model: Any, seqs: list[np.ndarray], spans: list[tuple[int, int]], device: torch.device | str,
                    batch_tokens: int = 32768, pad_id: int = 0, pad_multiple: int = 64,
                    fixed_shapes: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean continuation CE, greedy-exact flag) per sequence, computed in length-sorted padded batches.

    The spans give the scored tokens [start, end) of each sequence; the logits at positions start-1..end-2 predict
    them. Batches hold at most `batch_tokens` tokens (rows x padded length); lengths are rounded up to
    `pad_multiple` so the attention kernels see few distinct shapes.
    """
    device = torch.device(device)
    if fixed_shapes is None:
        fixed_shapes = device.type == "cuda"
    n = len(seqs)
    order = sorted(range(n), key=lambda i: -len(seqs[i]))
    loss_parts: list[torch.Tensor] = []
    ok_parts: list[torch.Tensor] = []
    row_ids: list[np.ndarray] = []
    pin = device.type == "cuda"
    i = 0
    while i < n:
        T = -(-len(seqs[order[i]]) // pad_multiple) * pad_multiple  # round up: fewer distinct kernel shapes
        B = max(1, batch_tokens // T)
        rows = order[i:i + B]
        i += len(rows)
        # on CUDA a short last batch is padded with empty rows to the full B: every batch of a given length then
        # has the same shape, so the attention kernels plan each shape once (cuDNN builds a graph per new shape)
        idx = np.full((B if fixed_shapes else len(rows), T), pad_id, dtype=np.int64)
        pos, tgt, lens = [], [], []
        for r, j in enumerate(rows):
            s = seqs[j]
            idx[r, :len(s)] = s
            a, b = spans[j]
            pos.append(np.arange(a - 1, b - 1) + r * T)
            tgt.append(s[a:b])
            lens.append(b - a)
        # each row's scored tokens are contiguous in the flat arrays: row sums = differences of a prefix sum
        # (deterministic, unlike atomic scatter-adds on the GPU, so near-ties never flip between runs)
        ends = np.cumsum(lens)
        bounds = np.stack([ends - np.asarray(lens), ends])
        pos_t, tgt_t, bounds_t = (torch.from_numpy(np.ascontiguousarray(x).astype(np.int64))
                                  for x in (np.concatenate(pos), np.concatenate(tgt), bounds))
        idx_t = torch.from_numpy(idx)
        if pin:
            idx_t, pos_t, tgt_t, bounds_t = (t.pin_memory() for t in (idx_t, pos_t, tgt_t, bounds_t))
        idx_t, pos_t, tgt_t, bounds_t = (t.to(device, non_blocking=True) for t in (idx_t, pos_t, tgt_t, bounds_t))
        sel = scored_logits(model, idx_t, pos_t)
        acc = runtime.accum_dtype(device)
        ce = (torch.logsumexp(sel, dim=-1) - sel.gather(1, tgt_t[:, None]).squeeze(1)).to(acc)
        wrong = (sel.argmax(dim=-1) != tgt_t).to(acc)
        zero = torch.zeros(1, dtype=acc, device=device)
        ce_cs, wrong_cs = torch.cat([zero, ce.cumsum(0)]), torch.cat([zero, wrong.cumsum(0)])
        sums = ce_cs[bounds_t[1]] - ce_cs[bounds_t[0]]
        nwrong = wrong_cs[bounds_t[1]] - wrong_cs[bounds_t[0]]
        loss_parts.append(sums / (bounds_t[1] - bounds_t[0]).clamp(min=1))
        ok_parts.append(nwrong == 0)
        row_ids.append(np.asarray(rows))
    losses = np.zeros(n, dtype=np.float64)
    oks = np.zeros(n, dtype=bool)
    if n:
        order_np = np.concatenate(row_ids)
        losses[order_np] = torch.cat(loss_parts).double().cpu().numpy()
        oks[order_np] = torch.cat(ok_parts).cpu().numpy()
    return losses, oks


def scored_logits(model: Any, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """fp32 logits (N, V) at the flat positions `pos` of idx (B, T).

    Most positions of a batch are context that is never scored, and the vocabulary projection (plus the fp32 cast
    and softcap of a (B, T, 32K) tensor) is a large share of a forward pass. So when the model has an `lm_head`
    module, a pre-hook hands it only the scored rows of the final hidden state; the model's own code still applies
    everything after it. A model whose output then has an unexpected shape is re-run without the hook.
    """
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.nn.Module) and not getattr(model, "_picochat_no_select", False):
        def select(_module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x.reshape(-1, x.size(-1)).index_select(0, pos)[None],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(select)
        try:
            logits = model(idx)
        finally:
            handle.remove()
        if logits.dim() == 3 and logits.shape[:2] == (1, pos.numel()):
            return logits[0].float()
        model._picochat_no_select = True  # remember: this model post-processes per position; never hook it again
    logits = model(idx)
    return logits.reshape(-1, logits.size(-1)).index_select(0, pos).float()


@torch.no_grad()
def score_sequences_reference(model: Any, seqs: list[np.ndarray], spans: list[tuple[int, int]],
                              device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    """One sequence per forward pass, no padding: the slow, obviously-correct reference for score_sequences."""
    losses = np.zeros(len(seqs))
    oks = np.zeros(len(seqs), dtype=bool)
    for j, (s, (a, b)) in enumerate(zip(seqs, spans)):
        x = torch.tensor(np.asarray(s, dtype=np.int64), device=device)[None]
        logp = F.log_softmax(model(x)[0].float(), dim=-1)
        targets = x[0, a:b]
        pred = logp[a - 1:b - 1]
        losses[j] = -pred.gather(1, targets[:, None]).mean().item()
        oks[j] = bool((pred.argmax(-1) == targets).all())
    return losses, oks


def judge(spec: TaskSpec, examples: list[Example], losses: np.ndarray, oks: np.ndarray) -> list[bool]:
    """Per-example correctness from per-sequence scores (sequences in example order)."""
    out, p = [], 0
    for ex in examples:
        k = len(ex.seqs)
        if spec.task_type == "language_modeling":
            out.append(bool(oks[p]))
        else:
            out.append(int(np.argmin(losses[p:p + k])) == ex.gold)  # ties -> first choice, as DCLM
        p += k
    return out


def centered(accuracy: float, baseline_percent: float) -> float:
    b = baseline_percent / 100.0
    return (accuracy - b) / (1.0 - b)


# ----------------------------------------------------------------------------------------------------------------
# The whole benchmark


@dataclass
class CoreResult:
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)   # CORE task label -> why it did not run
    extra: list[str] = field(default_factory=list)          # tasks that ran but are not among the 22

    def summary(self) -> dict[str, Any]:
        ran = [t for t in CORE_TASKS if t in self.tasks]
        core = float(np.mean([self.tasks[t]["centered"] for t in ran])) if ran else None
        return {"core": core, "core_label": core_label(len(ran)), "n_tasks": len(ran),
                "n_core_tasks": len(CORE_TASKS), "partial": len(ran) < len(CORE_TASKS),
                "missing": dict(self.missing), "extra": list(self.extra), "tasks": dict(self.tasks)}


def core_label(n_ran: int) -> str:
    total = len(CORE_TASKS)
    return "CORE" if n_ran == total else f"CORE (partial, {n_ran} of {total} tasks)"


def _shuffled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = list(rows)
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows


def _resolve_device(model: Any, device: torch.device | str | None) -> torch.device:
    """`device`, defaulting to where the model's parameters live (CPU for a model without parameters)."""
    if device is None:
        device = next(iter(model.parameters())).device if hasattr(model, "parameters") else "cpu"
    return torch.device(device)


def _select_specs(yaml_path: Path, tasks: list[str] | None) -> list[TaskSpec]:
    """The yaml's task specs, cut to `tasks` when given; an unknown task name is a UserError listing the valid ones."""
    specs = load_task_specs(yaml_path)
    if tasks:
        unknown = set(tasks) - {s.label for s in specs}
        if unknown:
            raise UserError(f"--core-tasks: unknown task(s) {sorted(unknown)}; {yaml_path} has "
                            f"{', '.join(s.label for s in specs)}")
        specs = [s for s in specs if s.label in tasks]
    return specs


def _runnable_specs(specs: list[TaskSpec], tasks: list[str] | None, bundle_dir: Path, yaml_path: Path,
                    baselines: dict[str, float], result: CoreResult) -> list[TaskSpec]:
    """The specs whose data file exists. Records in `result.missing` why each CORE task cannot run, so a partial
    score names what it lacks; a task chosen with `tasks` is not missing for being unlisted."""
    listed = {s.label for s in specs}
    for label in CORE_TASKS:
        if label not in listed and not tasks:
            result.missing[label] = f"not listed in {yaml_path.name}"
    runnable: list[TaskSpec] = []
    for spec in specs:
        path = bundle_dir / "eval_data" / spec.dataset_uri
        if not path.exists():
            if spec.label in CORE_BASELINES_V1:
                result.missing[spec.label] = f"data file eval_data/{spec.dataset_uri} not found"
            else:
                print0(f"[core] skipping {spec.label}: eval_data/{spec.dataset_uri} not found")
            continue
        if spec.label not in baselines:
            raise UserError(f"{bundle_dir}: no random baseline for task {spec.label!r} in eval_meta_data*.csv")
        runnable.append(spec)
    return runnable


def _prepare_shard(spec: TaskSpec, bundle_dir: Path, tokenizer: Any, max_per_task: int | None, rank: int,
                   world: int, max_len: int | None) -> tuple[list[Example], int]:
    """This rank's tokenized examples of the task (every `world`-th of the first `max_per_task` shuffled rows),
    and the number of rows scored over all ranks."""
    rows = _shuffled(load_task_rows(bundle_dir / "eval_data" / spec.dataset_uri))
    n = len(rows) if max_per_task is None or max_per_task <= 0 else min(max_per_task, len(rows))
    mine = list(range(rank, n, world))
    return prepare_task(spec, rows, tokenizer, mine, max_len), n


def _score_examples(model: Any, tokenizer: Any, spec: TaskSpec, examples: list[Example], device: torch.device,
                    batch_tokens: int, reference: bool) -> tuple[int, list[np.ndarray]]:
    """How many of this rank's examples the model gets right, and the sequences it scored for them."""
    seqs = [s for ex in examples for s in ex.seqs]
    spans = [sp for ex in examples for sp in ex.spans]
    if reference:
        losses, oks = score_sequences_reference(model, seqs, spans, device)
    else:
        losses, oks = score_sequences(model, seqs, spans, device, batch_tokens=batch_tokens,
                                      pad_id=tokenizer.bos_id)
    return sum(judge(spec, examples, losses, oks)), seqs


def _sum_over_ranks(correct: int, n: int, device: torch.device, world: int) -> tuple[int, int]:
    """(correct, examples) summed over all ranks; a no-op in a single process."""
    # on the model's device when distributed: NCCL reduces only GPU tensors
    counts = torch.tensor([correct, n], dtype=torch.float64, device=device if world > 1 else "cpu")
    if world > 1:
        dist.all_reduce(counts)
    return int(counts[0].item()), int(counts[1].item())


def _task_entry(spec: TaskSpec, correct: int, n: int, baseline: float, seqs: list[np.ndarray], started: float,
                prep_seconds: float) -> dict[str, Any]:
    """The per-task record of the summary; its `seconds` run from `started` to now (prep time is separate)."""
    acc = correct / max(n, 1)
    return {
        "type": spec.kind, "shots": spec.num_fewshot, "n": n, "correct": correct,
        "accuracy": acc, "baseline": baseline, "centered": centered(acc, baseline),
        "sequences": len(seqs), "tokens": int(sum(len(s) for s in seqs)),
        "seconds": round(time.time() - started, 3), "prep_seconds": round(prep_seconds, 3),
    }


def evaluate_core(model: Any, tokenizer: Any, bundle_dir: str | Path, max_per_task: int = -1,
                  device: torch.device | str | None = None, batch_tokens: int | None = None,
                  tasks: list[str] | None = None, reference: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Score `model` on the bundle's CORE tasks. Returns the summary dict (see CoreResult.summary) plus timing.

    The hook the pretraining loop calls every `--core-every` steps (pass the uncompiled model: batches have many
    shapes). `max_per_task` <= 0 means all examples. Collective under torchrun: every rank must call it.
    """
    t0 = time.time()
    bundle_dir = Path(bundle_dir)
    device = _resolve_device(model, device)
    if batch_tokens is None:
        batch_tokens = 32768 if device.type == "cuda" else 4096
    yaml_path = bundle_yaml(bundle_dir)
    specs = _select_specs(yaml_path, tasks)
    baselines, baseline_source = load_baselines(bundle_dir)
    result = CoreResult()
    runnable = _runnable_specs(specs, tasks, bundle_dir, yaml_path, baselines, result)
    rank, world = runtime.get_rank(), runtime.get_world_size()  # via the module: tests patch it to fake ranks
    max_len = _model_max_len(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()

    def prepared(spec: TaskSpec) -> tuple[list[Example], int]:
        return _prepare_shard(spec, bundle_dir, tokenizer, max_per_task, rank, world, max_len)

    # tokenize task k+1 on a background thread while the GPU scores task k
    for spec, (examples, n_total), t_prep in _prefetch(runnable, prepared):
        ts = time.time()
        correct, seqs = _score_examples(model, tokenizer, spec, examples, device, batch_tokens, reference)
        correct_all, n_all = _sum_over_ranks(correct, len(examples), device, world)
        r = _task_entry(spec, correct_all, n_all, baselines[spec.label], seqs, ts, t_prep)
        result.tasks[spec.label] = r
        if spec.label not in CORE_BASELINES_V1:
            result.extra.append(spec.label)
        if verbose:
            print0(f"[core] {spec.label:<34} {spec.kind:<6} acc {r['accuracy']:.4f} centered {r['centered']:+.4f} "
                   f"n={n_all} ({r['seconds']:.1f}s)")
    if was_training and hasattr(model, "train"):
        model.train()
    out = result.summary()
    out.update(seconds=round(time.time() - t0, 3), examples=sum(t["n"] for t in result.tasks.values()),
               max_per_task=max_per_task, baselines_from=baseline_source, bundle=str(bundle_dir),
               yaml=yaml_path.name, world_size=world)
    return out


def compare_with_reference(model: Any, tokenizer: Any, bundle_dir: str | Path, max_per_task: int = 20,
                           device: torch.device | str = "cpu", batch_tokens: int | None = None,
                           tasks: list[str] | None = None) -> dict[str, Any]:
    """Score the first `max_per_task` examples of each task both batched and one at a time; report the largest
    per-sequence loss difference and how many decisions differ. (On a GPU in bf16, different batch shapes pick
    different kernels, so losses agree to rounding; on a random-init model nearly every choice is a near-tie, so
    a few decisions can flip there without any bug.)"""
    device = torch.device(device)
    bundle_dir = Path(bundle_dir)
    batch_tokens = batch_tokens or (32768 if device.type == "cuda" else 4096)
    specs = [s for s in load_task_specs(bundle_yaml(bundle_dir)) if not tasks or s.label in tasks]
    max_len = _model_max_len(model)
    out: dict[str, Any] = {"tasks": {}}
    worst, flips, total = 0.0, 0, 0
    for spec in specs:
        path = bundle_dir / "eval_data" / spec.dataset_uri
        if not path.exists():
            continue
        rows = _shuffled(load_task_rows(path))
        examples = prepare_task(spec, rows, tokenizer, list(range(min(max_per_task, len(rows)))), max_len)
        seqs = [s for ex in examples for s in ex.seqs]
        spans = [sp for ex in examples for sp in ex.spans]
        lb, ob = score_sequences(model, seqs, spans, device, batch_tokens=batch_tokens, pad_id=tokenizer.bos_id)
        lr, orf = score_sequences_reference(model, seqs, spans, device)
        jb, jr = judge(spec, examples, lb, ob), judge(spec, examples, lr, orf)
        diff = float(np.max(np.abs(lb - lr))) if len(seqs) else 0.0
        n_flip = sum(a != b for a, b in zip(jb, jr))
        out["tasks"][spec.label] = {"n": len(examples), "max_abs_loss_diff": diff, "decisions_differ": n_flip,
                                    "acc_batched": float(np.mean(jb)) if jb else 0.0,
                                    "acc_reference": float(np.mean(jr)) if jr else 0.0}
        worst, flips, total = max(worst, diff), flips + n_flip, total + len(examples)
    out.update(max_abs_loss_diff=worst, decisions_differ=flips, examples=total)
    return out


def _prefetch(specs: list[TaskSpec], fn) -> Iterator[tuple[TaskSpec, Any, float]]:
    """Yield (spec, fn(spec), seconds) in order, computing the next item on a worker thread meanwhile."""
    results: dict[int, tuple[Any, float, BaseException | None]] = {}

    def work(k: int) -> None:
        t = time.time()
        try:
            results[k] = (fn(specs[k]), time.time() - t, None)
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            results[k] = (None, 0.0, e)

    thread: threading.Thread | None = None
    if specs:
        thread = threading.Thread(target=work, args=(0,), daemon=True)
        thread.start()
    for k in range(len(specs)):
        assert thread is not None
        thread.join()
        if k + 1 < len(specs):
            thread = threading.Thread(target=work, args=(k + 1,), daemon=True)
            thread.start()
        value, secs, err = results.pop(k)
        if err is not None:
            raise err
        yield specs[k], value, secs


def format_table(summary: dict[str, Any]) -> str:
    """Per-task table plus the CORE line (and the missing tasks, named)."""
    lines = [f"{'task':<34} {'type':<6} {'shots':>5} {'n':>6} {'acc':>7} {'base%':>6} {'centered':>9}"]
    for label, r in summary["tasks"].items():
        lines.append(f"{label:<34} {r['type']:<6} {r['shots']:>5} {r['n']:>6} {r['accuracy']:>7.4f} "
                     f"{r['baseline']:>6.1f} {r['centered']:>+9.4f}")
    core = summary["core"]
    lines.append(f"{summary['core_label']}: " + (f"{core:.4f}" if core is not None else "n/a (no CORE task ran)"))
    by_reason: dict[str, list[str]] = {}
    for label, why in summary["missing"].items():
        by_reason.setdefault(why, []).append(label)
    for why, labels in by_reason.items():
        if why.startswith("data file"):  # one line per file: each names a different path
            lines += [f"  missing {label}: {why}" for label in labels]
        else:
            lines.append(f"  missing ({why}): {', '.join(labels)}")
    if summary.get("extra"):
        lines.append(f"  not in CORE (reported only): {', '.join(summary['extra'])}")
    return "\n".join(lines)


def throughput_line(n_tokens: int, seconds: float) -> str:
    """Human throughput line, e.g. '41.2M tokens in 95.3 s (432K tok/s)'."""
    rate = n_tokens / max(seconds, 1e-9)
    return f"{n_tokens / 1e6:.1f}M tokens in {seconds:.1f} s ({rate / 1e3:.0f}K tok/s)"


__all__ = ["BUNDLE_URL", "CORE_TASKS", "CORE_BASELINES_V1", "TaskSpec", "Example", "load_task_specs",
           "load_baselines", "bundle_yaml", "resolve_bundle", "render_prompts", "fewshot_indices", "build_example",
           "prepare_task", "score_sequences", "score_sequences_reference", "judge", "centered", "core_label",
           "evaluate_core", "compare_with_reference", "format_table", "throughput_line"]
