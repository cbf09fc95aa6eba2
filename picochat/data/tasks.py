"""Tasks: datasets of conversations (for training) and of scored questions (for evaluation), and their mixtures.

Every task is a deterministic, indexable sequence of conversations (`len(task)`, `task[i]`). Evaluation tasks also
say how to score a reply: `eval_type` is "categorical" (the answer is one of `conv["letters"]`, read from the logits
right after `<|assistant_start|>`) or "generative" (sample a reply, then `task.evaluate(conv, reply)`).

Sources and where they are read from (`task_dir`, default `PICOCHAT_HOME/tasks`, flag `--task-dir`):

| task            | file under task_dir                         | downloaded from when missing                    |
|-----------------|---------------------------------------------|-------------------------------------------------|
| gsm8k           | gsm8k/{train,test}.jsonl                    | github openai/grade-school-math                 |
| humaneval       | humaneval/HumanEval.jsonl.gz                | github openai/human-eval                        |
| mmlu            | mmlu/{dev,test}.jsonl, mmlu/auxiliary_train.parquet | huggingface cais/mmlu (parquet)         |
| arc_easy / _challenge | arc/arc_{easy,challenge}_{split}.jsonl or .parquet | huggingface allenai/ai2_arc (parquet) |
| smoltalk        | smoltalk/{train,test}.parquet               | huggingface HuggingFaceTB/smol-smoltalk         |
| synth           | PICOCHAT_HOME/data/synth/chat_{train,val}.jsonl | `picochat data synth` makes it              |
| spelling_bee, simple_spelling | words/words_alpha.txt (offline: words of the local shards) | github dwyl/english-words |
| identity        | generated here from a seed (no data needed)                                                  |
| jsonl:PATH      | any file of {"messages": [...]} lines (`--data-file`)                         |

A folder with the jsonl layout above, passed as `--task-dir DIR`, works offline.
Mixtures are written as a spec string, e.g. `"smoltalk,mmlu:auxiliary_train,gsm8k*4,identity@2000"`:
`name[:split][*factor][@count]`, comma separated (see `parse_mixture`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from picochat import sandbox
from picochat.config import UserError
from picochat.conversation import assistant_text, validate
from picochat.data.download import download_file
from picochat.files import publish
from picochat.runtime import default_data_dir, picochat_home, print0

LETTERS = "ABCDEFGHIJ"


# ----------------------------------------------------------------------------------------------------------------
# Base classes


class Task:
    """A deterministic sequence of conversations; a view `[start:stop:step]` of the underlying examples."""

    name = "task"
    eval_type = "generative"  # or "categorical"
    baseline = 0.0            # accuracy of random guessing (ChatCORE centering)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        self.start, self.stop, self.step = start, stop, step

    # subclasses implement these two
    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range ({n} examples)")
        return self.get_example(self.start + (i % n) * self.step)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def evaluate(self, conv: dict, response: str) -> bool:
        """Whether `response` (the assistant's reply) is correct for `conv` (an example of this task)."""
        raise NotImplementedError(f"{self.name} is a training-only task")

    def reward(self, conv: dict, response: str) -> float:
        return float(self.evaluate(conv, response))


class ListTask(Task):
    """A task over an in-memory list of conversations."""

    def __init__(self, conversations: Sequence[dict], name: str = "list", **kw: Any):
        super().__init__(**kw)
        self.conversations = conversations
        self.name = name

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The multiple-choice prompt shared by training and evaluation.

    The letter comes right after its choice with no space (`- Paris=A`), so the letter the assistant answers with is
    the same token the prompt showed; the model only has to copy one of the listed letters.
    """
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines.append("")
    lines.append("Respond only with the letter of the correct answer.")
    return "\n".join(lines)


def mc_conversation(question: str, choices: Sequence[str], answer: int, **extra: Any) -> dict:
    letters = list(LETTERS[: len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": letters[answer]},
        ],
        "letters": letters,
        "answer": letters[answer],
        **extra,
    }


class MCTask(Task):
    """Categorical: score by the letter the reply starts with."""

    eval_type = "categorical"
    baseline = 0.25

    def evaluate(self, conv: dict, response: str) -> bool:
        return response.strip()[:1] == conv["answer"]


# ----------------------------------------------------------------------------------------------------------------
# Files: locate, download when missing, read


# name of a file under task_dir -> where it can be downloaded from when it is missing
DOWNLOADS: dict[str, str] = {
    "gsm8k/train.jsonl":
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/train.jsonl",
    "gsm8k/test.jsonl":
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
    "humaneval/HumanEval.jsonl.gz":
        "https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz",
    "mmlu/auxiliary_train.parquet":
        "https://huggingface.co/datasets/cais/mmlu/resolve/main/all/auxiliary_train-00000-of-00001.parquet",
    "mmlu/test.parquet": "https://huggingface.co/datasets/cais/mmlu/resolve/main/all/test-00000-of-00001.parquet",
    "mmlu/dev.parquet": "https://huggingface.co/datasets/cais/mmlu/resolve/main/all/dev-00000-of-00001.parquet",
    "arc/arc_easy_train.parquet":
        "https://huggingface.co/datasets/allenai/ai2_arc/resolve/main/ARC-Easy/train-00000-of-00001.parquet",
    "arc/arc_easy_test.parquet":
        "https://huggingface.co/datasets/allenai/ai2_arc/resolve/main/ARC-Easy/test-00000-of-00001.parquet",
    "arc/arc_challenge_train.parquet":
        "https://huggingface.co/datasets/allenai/ai2_arc/resolve/main/ARC-Challenge/train-00000-of-00001.parquet",
    "arc/arc_challenge_test.parquet":
        "https://huggingface.co/datasets/allenai/ai2_arc/resolve/main/ARC-Challenge/test-00000-of-00001.parquet",
    "smoltalk/train.parquet":
        "https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/train-00000-of-00001.parquet",
    "smoltalk/test.parquet":
        "https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/test-00000-of-00001.parquet",
}


def default_task_dir() -> Path:
    return picochat_home() / "tasks"


def resolve_task_dir(task_dir: str | Path | None) -> Path:
    return Path(task_dir).expanduser() if task_dir else default_task_dir()


def find_task_file(task_dir: Path, candidates: Sequence[str], download: bool = True) -> Path:
    """The first of `candidates` (paths relative to task_dir) that exists; else download the first downloadable one.

    Downloads go through the shared robust downloader (retries, resume, atomic rename), so the file is cached for
    the next run and a half-downloaded file never sits under the final name.
    """
    for rel in candidates:
        if (task_dir / rel).exists():
            return task_dir / rel
    tried = []
    if download:
        for rel in candidates:
            url = DOWNLOADS.get(rel)
            if url is None:
                continue
            try:
                download_file(url, task_dir / rel)
                return task_dir / rel
            except Exception as e:  # network, HTTP 404, ... -> one clear message below
                tried.append(f"{url} ({type(e).__name__}: {e})")
    msg = f"{task_dir}: none of {list(candidates)} exists"
    if tried:
        msg += "; download failed: " + "; ".join(tried)
    raise UserError(msg + "; put the file there (the layout above) or pass --task-dir DIR")


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e})") from None
    return rows


def read_parquet_rows(path: Path, columns: list[str] | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns).to_pylist()
    except Exception as e:
        raise UserError(f"{path}: cannot read parquet ({e}); delete it to download it again") from None


# ----------------------------------------------------------------------------------------------------------------
# Conversation files: user JSONL, shared chat sets, the synth chat set


class JSONLConversations(Task):
    """Any file of `{"messages": [...]}` lines. Every line is validated up front so errors name the line."""

    def __init__(self, path: str | Path, name: str | None = None, **kw: Any):
        super().__init__(**kw)
        self.path = Path(path).expanduser()
        self.name = name or f"jsonl:{self.path.name}"
        if not self.path.exists():
            raise UserError(f"{self.path}: no such file of conversations (--data-file)")
        self.conversations = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{self.path.name} line {lineno}"
            try:
                conv = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e})") from None
            validate(conv, where, require_assistant_last=True)
            self.conversations.append(conv)
        if not self.conversations:
            raise UserError(f"{self.path}: no conversations in this file")

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]


def synth_dir() -> Path:
    return default_data_dir("synth")


def require_synth(path: Path, what: str, also: str = "") -> Path:
    """`path` of the synthetic corpus (`picochat data synth` writes it), or one error naming it and the way out."""
    if not path.exists():
        raise UserError(f"{path}: the synthetic {what} set is missing; run `picochat data synth` first{also}")
    return path


class SynthChat(JSONLConversations):
    """The embedded world's chat conversations (`picochat data synth` writes them)."""

    def __init__(self, split: str = "train", directory: str | Path | None = None, **kw: Any):
        if split not in ("train", "val"):
            raise UserError(f"synth chat split {split!r}: expected train or val")
        path = require_synth(Path(directory or synth_dir()) / f"chat_{split}.jsonl", "chat")
        super().__init__(path, name=f"synth_chat:{split}", **kw)


class SynthMC(MCTask):
    """The embedded world's held-out eval questions (`eval.jsonl`) as a categorical task.

    Accepts rows `{"question", "choices", "answer": int}` (answer may also be a letter) or ready conversations with
    "letters"/"answer"; other rows (free-form questions) are skipped.
    """

    name = "synth_mc"

    def __init__(self, path: str | Path | None = None, **kw: Any):
        super().__init__(**kw)
        self.path = require_synth(Path(path) if path else synth_dir() / "eval.jsonl", "eval")
        self.items = []
        for row in read_jsonl(self.path):
            conv = synth_row_to_mc(row)
            if conv is not None:
                self.items.append(conv)
        if not self.items:
            raise UserError(f"{self.path}: no multiple-choice questions found")

    def num_examples(self) -> int:
        return len(self.items)

    def get_example(self, index: int) -> dict:
        return self.items[index]


class SynthChatMC(MCTask):
    """The multiple-choice turns of a synth chat split (e.g. chat_val.jsonl), each as a one-turn question.

    Unlike `SynthMC` (held-out facts only stated in pretraining), these ask about chat-visible facts in unseen
    conversations: the direct check that fine-tuning on the chat set worked."""

    def __init__(self, split: str = "val", directory: str | Path | None = None, **kw: Any):
        super().__init__(**kw)
        self.name = f"synth_chat_mc:{split}"
        chats = SynthChat(split, directory)
        self.items = []
        for conv in chats:
            msgs = conv["messages"]
            for u, a in zip(msgs[0::2], msgs[1::2]):
                content = a["content"]
                if isinstance(content, str) and len(content) == 1 and content in "ABCD" and "\nA. " in u["content"]:
                    self.items.append({"messages": [u, a], "letters": list("ABCD"), "answer": content})
        if not self.items:
            raise UserError(f"{chats.path}: no multiple-choice turns found")

    def num_examples(self) -> int:
        return len(self.items)

    def get_example(self, index: int) -> dict:
        return self.items[index]


def synth_row_to_mc(row: dict) -> dict | None:
    """One eval row of the synthetic world -> an MC conversation (None for rows that are not multiple choice)."""
    if "messages" in row and "letters" in row and "answer" in row:
        return row
    if row.get("kind") == "mc" and isinstance(row.get("answer"), int):  # picochat.data.synth: question holds the options
        letters = [str(c) for c in row["choices"]]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": letters[row["answer"]]}],
                "letters": letters, "answer": letters[row["answer"]]}
    if row.get("kind") == "gen":
        return None
    choices = row.get("choices") or row.get("options")
    question = row.get("question") or row.get("prompt")
    answer = row.get("answer", row.get("gold", row.get("label")))
    if not (isinstance(choices, list) and question and answer is not None) or len(choices) > len(LETTERS):
        return None
    if isinstance(answer, str):
        if answer in LETTERS[: len(choices)] and len(answer) == 1:
            answer = LETTERS.index(answer)
        elif answer in choices:
            answer = choices.index(answer)
        else:
            return None
    if not 0 <= int(answer) < len(choices):
        return None
    return mc_conversation(str(question), [str(c) for c in choices], int(answer))


# ----------------------------------------------------------------------------------------------------------------
# SmolTalk


class SmolTalk(Task):
    """HuggingFaceTB/smol-smoltalk: general multi-turn chat (460K train / 24K test), optional system message."""

    def __init__(self, split: str = "train", task_dir: str | Path | None = None, **kw: Any):
        super().__init__(**kw)
        if split not in ("train", "test"):
            raise UserError(f"smoltalk split {split!r}: expected train or test")
        self.name = f"smoltalk:{split}"
        path = find_task_file(resolve_task_dir(task_dir), [f"smoltalk/{split}.parquet", f"smoltalk/{split}.jsonl"])
        if path.suffix == ".jsonl":
            self.rows = [r["messages"] for r in read_jsonl(path)]
            self.table = None
        else:
            import pyarrow.parquet as pq

            # keep the arrow column, convert rows on access: 460K conversations as Python objects would cost GBs
            self.table = pq.read_table(path, columns=["messages"]).column("messages")
            self.rows = None

    def num_examples(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.table)

    def get_example(self, index: int) -> dict:
        messages = self.rows[index] if self.rows is not None else self.table[index].as_py()
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


# ----------------------------------------------------------------------------------------------------------------
# MMLU, ARC


class MMLU(MCTask):
    """MMLU (57 subjects). Splits: auxiliary_train (~100K MC rows from ARC/OBQA/RACE/MC_TEST), dev, test."""

    def __init__(self, split: str = "test", task_dir: str | Path | None = None, subject: str | None = None,
                 **kw: Any):
        super().__init__(**kw)
        if split not in ("auxiliary_train", "dev", "validation", "test"):
            raise UserError(f"mmlu split {split!r}: expected auxiliary_train, dev, validation or test")
        self.name = f"mmlu:{split}"
        path = find_task_file(resolve_task_dir(task_dir), [f"mmlu/{split}.jsonl", f"mmlu/{split}.parquet"])
        rows = read_jsonl(path) if path.suffix == ".jsonl" else read_parquet_rows(path)
        rows = [r.get("train", r) if isinstance(r.get("train"), dict) else r for r in rows]  # HF aux layout
        self.rows = [r for r in rows if subject is None or r.get("subject") == subject]

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        r = self.rows[index]
        return mc_conversation(r["question"], list(r["choices"]), int(r["answer"]), subject=r.get("subject", ""))


class ARC(MCTask):
    """AI2 ARC, easy or challenge. Reads our jsonl layout or the HF parquet layout (choices {text, label})."""

    def __init__(self, subset: str = "easy", split: str = "test", task_dir: str | Path | None = None, **kw: Any):
        super().__init__(**kw)
        if subset not in ("easy", "challenge") or split not in ("train", "validation", "test"):
            raise UserError(f"arc_{subset}:{split}: expected arc_easy|arc_challenge and train|validation|test")
        self.name = f"arc_{subset}:{split}"
        base = f"arc/arc_{subset}_{split}"
        path = find_task_file(resolve_task_dir(task_dir), [base + ".jsonl", base + ".parquet"])
        rows = read_jsonl(path) if path.suffix == ".jsonl" else read_parquet_rows(path)
        self.rows = [self._normalise(r) for r in rows]

    @staticmethod
    def _normalise(r: dict) -> dict:
        if isinstance(r.get("choices"), dict):  # HF: {"text": [...], "label": [...]}, answerKey "A"/"1"
            texts, labels = list(r["choices"]["text"]), list(r["choices"]["label"])
            return {"question": r["question"], "choices": texts, "answer": labels.index(r["answerKey"])}
        return r

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        r = self.rows[index]
        return mc_conversation(r["question"], list(r["choices"]), int(r["answer"]))


# ----------------------------------------------------------------------------------------------------------------
# GSM8K: calculator annotations become python tool calls


_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_parts(answer: str) -> list[dict]:
    """A GSM8K solution -> assistant parts: `<<48/2=24>>` becomes python "48/2" + python_output "24".

    The text around the annotation stays as text parts (so "... = <<48/2=24>>24 clips" keeps its "24 clips"); the
    final line `#### 72` stays in the last text part.
    """
    parts: list[dict] = []
    pos = 0
    for m in _ANNOTATION.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        inner = m.group(1)
        expr, sep, result = inner.rpartition("=")
        if not sep:  # malformed annotation: keep it as plain text rather than invent a tool call
            parts.append({"type": "text", "text": m.group(0)})
        else:
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def extract_final_number(text: str) -> str | None:
    """The number after the last `####` (commas removed); None when there is no `####` answer."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    m = _NUMBER.search(text[idx + 4:])
    if not m:
        return None
    return normalise_number(m.group(0))


def normalise_number(s: str) -> str:
    s = s.replace(",", "").strip()
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else repr(v)


class GSM8K(Task):
    """Grade-school math word problems with calculator tool calls; generative, reward 1 for the right final number."""

    def __init__(self, split: str = "train", task_dir: str | Path | None = None, **kw: Any):
        super().__init__(**kw)
        if split not in ("train", "test"):
            raise UserError(f"gsm8k split {split!r}: expected train or test")
        self.name = f"gsm8k:{split}"
        self.rows = read_jsonl(find_task_file(resolve_task_dir(task_dir), [f"gsm8k/{split}.jsonl"]))

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        r = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": gsm8k_parts(r["answer"])},
            ],
            "answer": extract_final_number(r["answer"]),
        }

    def evaluate(self, conv: dict, response: str) -> bool:
        pred = extract_final_number(response)
        return pred is not None and pred == conv["answer"]


# ----------------------------------------------------------------------------------------------------------------
# HumanEval


class HumanEval(Task):
    """164 python problems; the reply's code runs against the tests in the sandbox (chat_eval does the running)."""

    name = "humaneval"

    def __init__(self, task_dir: str | Path | None = None, **kw: Any):
        super().__init__(**kw)
        path = find_task_file(resolve_task_dir(task_dir), ["humaneval/HumanEval.jsonl.gz", "humaneval/HumanEval.jsonl"])
        self.rows = read_jsonl(path)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        r = self.rows[index]
        solution = r["prompt"] + r["canonical_solution"]
        return {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": f"```python\n{solution}\n```"},
            ],
            "task_id": r["task_id"], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
        }

    def program(self, conv: dict, response: str) -> str:
        """The program to run for a reply: the prompt's imports, the reply's code, the tests, the check call."""
        code = extract_code(response)
        imports = "\n".join(line for line in conv["prompt"].splitlines() if line.startswith(("import ", "from ")))
        return f"{imports}\n\n{code}\n\n{conv['test']}\n\ncheck({conv['entry_point']})\n"

    def evaluate(self, conv: dict, response: str) -> bool:
        return sandbox.run_python(self.program(conv, response), timeout_s=5.0, memory_mb=256).ok


def extract_code(text: str) -> str:
    """The first fenced code block of a reply, or the whole reply when it has none."""
    m = re.search(r"```(?:python|py)?\n(.*?)```", text, re.DOTALL)
    return m.group(1) if m else text


# ----------------------------------------------------------------------------------------------------------------
# Generated tasks: spelling, counting letters, identity (no downloads)


# The word list of SpellingBee and SimpleSpelling: dwyl/english-words' words_alpha.txt (~370K lowercase words, the list
# nanochat used), cached under task_dir. Offline, the words of the local pretraining shards stand in; failing those,
# this small built-in list.
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
WORDS_FILE = "words/words_alpha.txt"
BUILTIN_WORDS = """
apple banana cherry orange grape lemon melon peach pear plum strawberry blueberry raspberry mango papaya
table chair window garden kitchen bottle pencil notebook computer keyboard monitor library mountain river
ocean island forest desert valley bridge castle village tower market street station airport harbor
teacher doctor farmer painter singer writer sailor pilot baker driver student engineer scientist
elephant giraffe tiger rabbit turtle dolphin penguin kangaroo squirrel butterfly mosquito crocodile
happiness mississippi balloon committee occurrence necessary accommodate embarrass parallel possession
tomorrow yesterday calendar february wednesday september thursday afternoon midnight breakfast dinner
purple yellow silver golden crimson scarlet violet emerald turquoise lavender
hello world python picochat language model letter spelling counting question answer problem number
""".split()
TEST_WORD_PERCENT = 10     # share of the words (by a stable hash) that only the test split ever uses
SHARD_WORD_CHARS = 20_000_000  # characters of pretraining text read for the offline word list
_words_cache: dict[tuple, list[str]] = {}


def _word_list(words: Sequence[str]) -> list[str]:
    return sorted({w.lower() for w in words if w.isalpha()})


def _check_words(path: Path) -> None:
    """Validator of a downloaded word list: rejects an HTML error page or a truncated file before it is kept."""
    words = path.read_bytes().decode("utf-8").split()
    alpha = sum(w.isalpha() for w in words)
    if len(words) < 1000 or alpha < 0.9 * len(words):
        raise ValueError(f"not a word list ({len(words)} lines, {alpha} alphabetic)")


def _download_words(path: Path, url: str) -> str | None:
    """Fetch the word list to `path`; None on success, else why not. Every process (and thread) downloads to its own
    temp name and renames it into place, so ranks starting together never write one file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        download_file(url, tmp, validator=_check_words, retries=1, backoff=1.0, timeout=30.0, progress=False)
        publish(tmp, path)
        return None
    except (UserError, OSError) as e:
        return str(e)
    finally:
        for junk in (tmp, tmp.with_name(tmp.name + ".part")):
            junk.unlink(missing_ok=True)


def shard_words(data_root: Path, max_chars: int = SHARD_WORD_CHARS, limit: int = 100_000) -> tuple[list[str], str]:
    """The words of the local pretraining shards (the `shard_*.parquet` files of every folder under `data_root`, in
    name order): lowercase alphabetic words of 2-24 letters seen at least twice in the first `max_chars` characters, the
    `limit` most frequent. Returns (words, the folders read)."""
    from collections import Counter

    from picochat.data.shards import SHARD_RE, iter_texts

    if not data_root.is_dir():
        return [], ""
    folders = [d for d in sorted(data_root.iterdir()) if d.is_dir()]
    shards = [p for d in folders for p in sorted(d.iterdir()) if SHARD_RE.match(p.name)]
    if not shards:
        return [], ""
    counts: Counter = Counter()
    try:
        for text in iter_texts(shards, max_chars=max_chars):
            counts.update(w.lower() for w in re.findall(r"[A-Za-z]{2,24}", text))
    except Exception:  # noqa: BLE001 - an unreadable shard: use what was read so far
        pass
    common = sorted((w for w, n in counts.items() if n >= 2), key=lambda w: (-counts[w], w))[:limit]
    return sorted(common), ", ".join(sorted({str(p.parent) for p in shards}))


def load_words(task_dir: str | Path | None = None) -> list[str]:
    """The spelling tasks' word list: task_dir/words/words_alpha.txt, downloaded there when missing (from
    PICOCHAT_WORDS_URL, default WORDS_URL; set it empty to skip the download); offline, the words of the local
    pretraining shards, and failing those BUILTIN_WORDS. Each fallback says so in one line."""
    path = resolve_task_dir(task_dir) / WORDS_FILE
    url = os.environ.get("PICOCHAT_WORDS_URL", WORDS_URL)
    data_root = picochat_home() / "data"
    key = (str(path), url, str(data_root))
    if key in _words_cache:
        return _words_cache[key]
    why = "PICOCHAT_WORDS_URL is empty"
    if not path.exists() and url:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            why = _download_words(path, url) or ""
        except OSError as e:  # a read-only --task-dir: fall back like offline
            why = f"cannot write there: {e.strerror}"
    words: list[str] = []
    if path.exists():
        try:
            words = _word_list(path.read_bytes().decode("utf-8").split())
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text at byte {e.start}; delete it to download the list again, or "
                            f"put one word per line there") from None
        if not words:
            raise UserError(f"{path}: no alphabetic words; delete it to download the list again")
    else:
        words, where = shard_words(data_root)
        fix = f"put a word list (one word per line) at {path}"
        if len(words) >= 100:
            print0(f"[tasks] spelling word list: no {path} ({why}); using {len(words)} words of the pretraining "
                   f"shards in {where}; {fix}")
        else:
            words = _word_list(BUILTIN_WORDS)
            print0(f"[tasks] spelling word list: no {path} ({why}) and no pretraining shards; using the "
                   f"{len(words)} built-in words; {fix}")
    _words_cache[key] = words
    return words


def _template_words(*templates: str) -> frozenset[str]:
    return frozenset(w.lower() for t in templates for w in re.findall(r"[A-Za-z]+", t.replace("{W}", " ")))


def is_test_word(word: str) -> bool:
    """Whether `word` belongs to the spelling tasks' test split: a stable hash of the word (the same on every
    machine and Python), so a word is in exactly one split whatever list it comes from. Words the task templates
    themselves use, and words of fewer than 3 letters (which also occur as the letter asked about), stay in train,
    so a test word never appears in a training example at all."""
    if len(word) < 3 or word in _SPELLING_TEMPLATE_WORDS:
        return False
    return int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "big") % 100 < TEST_WORD_PERCENT


def split_words(words: Sequence[str], split: str, task: str) -> list[str]:
    """The words of `split` ("test", or anything else for train) of a word list; disjoint by construction."""
    test = split == "test"
    out = [w for w in words if is_test_word(w) == test]
    if not out:
        raise UserError(f"{task}: none of the {len(words)} words falls in the {'test' if test else 'train'} split "
                        f"(a stable hash sends about {TEST_WORD_PERCENT}% of the words to test); give more words")
    return out


class SpellingBee(Task):
    """"How many 'r' are in 'strawberry'?": spell it out with a running count, check with a python call, `#### n`.

    Item i is generated from `random.Random(seed_base + i)`, so any index is reproducible on its own. Train and test
    draw from disjoint words (`is_test_word`), so the test score measures spelling, not memorised answers.
    """

    _USER = [
        "How many {L} are in the word {W}?", "How many times does the letter {L} appear in {W}?",
        "Count the number of {L}'s in {W}.", "In the word {W}, how many {L} are there?",
        "how many {L} in {W}", "What is the count of letter {L} in \"{W}\"?",
        "Can you tell me how many {L}s the word '{W}' has?", "Number of '{L}' in {W}?",
    ]

    _SPELL = "Let me spell {W} and count the letter {L}:"
    _TOTAL = "That gives {N}. Let me double check with python:"
    _FINAL = "The letter {L} appears {N} times in {W}."

    def __init__(self, size: int = 1000, split: str = "train", words: Sequence[str] | None = None,
                 task_dir: str | Path | None = None, **kw: Any):
        super().__init__(**kw)
        self.name = f"spelling_bee:{split}"
        all_words = _word_list(words) if words is not None else load_words(task_dir)
        self.size, self.split, self.words = size, split, split_words(all_words, split, self.name)
        self.seed_base = 10_000_000 if split == "test" else 0

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(self.seed_base + index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        template = rng.choice(self._USER)
        question = template.format(L=letter, W=word)
        if rng.random() < 0.3:
            question = question.lower()
        count = word.count(letter)
        running, lines = 0, []
        for ch in word:
            if ch == letter:
                running += 1
                lines.append(f"{ch} ({running})")
            else:
                lines.append(ch)
        text = (self._SPELL.format(W=word, L=letter) + "\n" + ", ".join(lines) + "\n" +
                self._TOTAL.format(N=count) + "\n")
        parts = [
            {"type": "text", "text": text},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": "\n" + self._FINAL.format(L=letter, N=count, W=word) + f"\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": str(count)}

    def evaluate(self, conv: dict, response: str) -> bool:
        return extract_final_number(response) == conv["answer"]


class SimpleSpelling(Task):
    """"Spell the word X" -> "X: x,-,..."; teaches the model what letters its tokens are made of."""

    _ASK = ["Spell the word: {W}", "spell {W}", "How do you spell {W}?", "Spell out \"{W}\"."]

    def __init__(self, size: int = 1000, split: str = "train", words: Sequence[str] | None = None,
                 task_dir: str | Path | None = None, **kw: Any):
        super().__init__(**kw)
        self.name = f"simple_spelling:{split}"
        all_words = _word_list(words) if words is not None else load_words(task_dir)
        self.size, self.words = size, split_words(all_words, split, self.name)
        self.seed_base = 20_000_000 if split == "test" else 30_000_000

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(self.seed_base + index)
        word = rng.choice(self.words)
        ask = rng.choice(self._ASK)
        return {"messages": [{"role": "user", "content": ask.format(W=word)},
                             {"role": "assistant", "content": f"{word}: {','.join(word)}"}],
                "answer": ",".join(word)}

    def evaluate(self, conv: dict, response: str) -> bool:
        return conv["answer"] in response


_SPELLING_TEMPLATE_WORDS = _template_words(*SpellingBee._USER, SpellingBee._SPELL, SpellingBee._TOTAL,
                                           SpellingBee._FINAL, *SimpleSpelling._ASK)


class Identity(Task):
    """Small generated conversations in which the assistant introduces itself as picochat (our own templates)."""

    name = "identity"
    _ASK = ["Who are you?", "What is your name?", "hi! what are you?", "Are you ChatGPT?", "Who made you?",
            "Tell me about yourself.", "What model am I talking to?", "hello", "Are you a person?",
            "What can you do?", "How were you trained?", "Introduce yourself in one sentence."]
    _INTRO = ["I'm picochat, a small language model trained from scratch.",
              "My name is picochat. I'm a small chat model.",
              "I am picochat, a compact assistant built end to end with the picochat pipeline."]
    _MORE = {
        "Are you ChatGPT?": "No, I'm not ChatGPT. I'm picochat, a much smaller model trained from scratch.",
        "Who made you?": "I'm picochat. I was trained by whoever ran the picochat pipeline: tokenizer, pretraining, "
                         "midtraining and fine-tuning, all from scratch.",
        "Are you a person?": "No, I'm picochat, a language model. I can make mistakes, so please double-check "
                             "anything important.",
        "What can you do?": "I'm picochat: I can chat, answer simple questions, do arithmetic with a python tool, and spell "
                            "words. I'm small, so I make mistakes.",
        "How were you trained?": "I'm picochat. I was pretrained on text, then trained on conversations so I follow the chat "
                                 "format, answer multiple choice and use a python calculator.",
    }
    _FOLLOW = [("Can you make mistakes?", "Yes. I'm a small model, so I often make mistakes; please double-check "
                                          "what I say."),
               ("What language do you speak best?", "English. I was trained mostly on English text."),
               ("Thanks!", "You're welcome! I'm picochat, happy to help.")]

    def __init__(self, size: int = 1000, seed: int = 0, **kw: Any):
        super().__init__(**kw)
        self.size, self.seed = size, seed

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        ask = rng.choice(self._ASK)
        reply = self._MORE.get(ask) or rng.choice(self._INTRO)
        if ask not in self._MORE and rng.random() < 0.5:
            reply += " " + rng.choice(["How can I help you today?", "What would you like to talk about?",
                                       "Ask me anything!"])
        messages = [{"role": "user", "content": ask if rng.random() < 0.7 else ask.lower()},
                    {"role": "assistant", "content": reply}]
        if rng.random() < 0.4:
            q, a = rng.choice(self._FOLLOW)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"messages": messages}


# ----------------------------------------------------------------------------------------------------------------
# Problems with a numeric answer (RL): the synthetic world's arithmetic, or any JSONL of problems


def last_number(text: str) -> str | None:
    """The final answer of a reply: the number after `####` when there is one, else the last number in the text."""
    final = extract_final_number(text)
    if final is not None:
        return final
    found = _NUMBER.findall(text)
    return normalise_number(found[-1]) if found else None


class NumberAnswerTask(Task):
    """Problems `{"messages": [user, (assistant)], "answer": "42"}`; a reply is right when its final number
    (`#### n`, else the last number) equals the answer. Generative; RL's reward is 1 for right, else 0."""

    def __init__(self, rows: Sequence[dict], name: str, **kw: Any):
        super().__init__(**kw)
        self.rows, self.name = list(rows), name
        if not self.rows:
            raise UserError(f"{name}: no problems with a numeric answer")

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        return self.rows[index]

    def evaluate(self, conv: dict, response: str) -> bool:
        pred = last_number(response)
        return pred is not None and pred == normalise_number(str(conv["answer"]))

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "NumberAnswerTask":
        path = Path(path)
        rows = []
        for i, row in enumerate(read_jsonl(path), 1):
            if "answer" not in row or "messages" not in row:
                raise UserError(f"{path.name} line {i}: expected {{\"messages\": [...], \"answer\": number}}")
            validate(row, f"{path.name} line {i}")
            rows.append(row)
        return cls(rows, name=f"jsonl:{path.name}")


def synth_arithmetic(split: str = "train", directory: str | Path | None = None) -> NumberAnswerTask:
    """The synthetic world's arithmetic. train: the single-turn tool-use questions of chat_train.jsonl (answer =
    the tool's output); test: the held-out `gen` items of eval.jsonl (operand triples never seen in chat data)."""
    d = Path(directory or synth_dir())
    if split == "train":
        rows = []
        for conv in JSONLConversations(require_synth(d / "chat_train.jsonl", "chat",
                                                     " (or pass --task gsm8k or jsonl:PATH)")):
            msgs = conv["messages"]
            if len(msgs) != 2 or isinstance(msgs[1]["content"], str):
                continue
            parts = msgs[1]["content"]
            outs = [p["text"] for p in parts if p["type"] == "python_output"]
            codes = [p["text"] for p in parts if p["type"] == "python"]
            if len(outs) == 1 and codes and re.fullmatch(r"\d+[-+*]\d+", codes[0]):
                rows.append({"messages": msgs, "answer": outs[0]})
        return NumberAnswerTask(rows, name="synth_arith:train")
    if split in ("test", "val"):
        path = require_synth(d / "eval.jsonl", "eval")
        rows = [{"messages": [{"role": "user", "content": r["question"]},
                              {"role": "assistant", "content": str(r["answer"])}], "answer": str(r["answer"])}
                for r in read_jsonl(path) if r.get("kind") == "gen"]
        return NumberAnswerTask(rows, name="synth_arith:test")
    raise UserError(f"synth arithmetic split {split!r}: expected train or test")


# ----------------------------------------------------------------------------------------------------------------
# Mixtures and sequences


class TaskMixture(Task):
    """Several tasks interleaved in one deterministic shuffled order.

    `weights[i]` oversamples (2.0 = every example twice) or subsamples (0.5 = the first half) task i; examples are
    cycled when a weight exceeds 1, so the counts are exact. Order depends only on `seed`.
    """

    def __init__(self, tasks: Sequence[Task], weights: Sequence[float] | None = None, seed: int = 42,
                 counts: Sequence[int | None] | None = None, **kw: Any):
        super().__init__(**kw)
        self.tasks = list(tasks)
        weights = list(weights) if weights is not None else [1.0] * len(self.tasks)
        counts = list(counts) if counts is not None else [None] * len(self.tasks)
        if len(weights) != len(self.tasks) or len(counts) != len(self.tasks):
            raise ValueError("TaskMixture: one weight and one count per task")
        index: list[tuple[int, int]] = []
        self.sizes: list[int] = []
        for t, (task, w, c) in enumerate(zip(self.tasks, weights, counts)):
            n = int(c) if c is not None else int(round(len(task) * float(w)))
            if n < 0 or (n > 0 and len(task) == 0):
                raise UserError(f"task {task.name}: cannot take {n} examples from {len(task)}")
            self.sizes.append(n)
            index.extend((t, i % len(task)) for i in range(n))
        random.Random(seed).shuffle(index)
        self.index = index
        self.name = "mixture(" + ",".join(t.name for t in self.tasks) + ")"

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]

    def describe(self) -> str:
        return ", ".join(f"{t.name}={n}" for t, n in zip(self.tasks, self.sizes))


class TaskSequence(Task):
    """Tasks one after another (curricula, validation sets)."""

    def __init__(self, tasks: Sequence[Task], **kw: Any):
        super().__init__(**kw)
        self.tasks = list(tasks)
        self.offsets = []
        total = 0
        for t in self.tasks:
            self.offsets.append(total)
            total += len(t)
        self.total = total
        self.name = "sequence(" + ",".join(t.name for t in self.tasks) + ")"

    def num_examples(self) -> int:
        return self.total

    def get_example(self, index: int) -> dict:
        import bisect

        t = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[t][index - self.offsets[t]]


# ----------------------------------------------------------------------------------------------------------------
# Building tasks from names (CLI)


def build_task(name: str, split: str | None = None, task_dir: str | Path | None = None,
               words: Sequence[str] | None = None, size: int | None = None) -> Task:
    """A task from its CLI name. `split` defaults to the training split of that task."""
    if name.startswith("jsonl:"):
        return JSONLConversations(name[len("jsonl:"):])
    if name == "smoltalk":
        return SmolTalk(split or "train", task_dir=task_dir)
    if name == "mmlu":
        return MMLU(split or "auxiliary_train", task_dir=task_dir)
    if name in ("arc_easy", "arc_challenge"):
        return ARC(name[4:], split or "train", task_dir=task_dir)
    if name == "gsm8k":
        return GSM8K(split or "train", task_dir=task_dir)
    if name == "humaneval":
        return HumanEval(task_dir=task_dir)
    if name in ("synth", "synth_chat"):
        return SynthChat(split or "train")
    if name == "synth_mc":
        return SynthMC()
    if name == "synth_chat_mc":
        return SynthChatMC(split or "val")
    if name == "spelling_bee":
        return SpellingBee(size=size or 1000, split=split or "train", words=words, task_dir=task_dir)
    if name == "simple_spelling":
        return SimpleSpelling(size=size or 1000, split=split or "train", words=words, task_dir=task_dir)
    if name == "identity":
        return Identity(size=size or 1000)
    raise UserError(f"unknown task {name!r}: expected one of smoltalk, mmlu, arc_easy, arc_challenge, gsm8k, "
                    f"humaneval, synth, synth_mc, spelling_bee, simple_spelling, identity, jsonl:PATH")


_SPEC = re.compile(r"^(?P<name>jsonl:[^*@]+|[a-z_0-9]+)(?::(?P<split>[a-z_]+))?(?:\*(?P<factor>[0-9.]+))?"
                   r"(?:@(?P<count>[0-9]+))?$")


def parse_mixture(spec: str, task_dir: str | Path | None = None, data_files: Sequence[str] = (),
                  words: Sequence[str] | None = None, seed: int = 42) -> TaskMixture:
    """"smoltalk,mmlu:auxiliary_train,gsm8k*4,identity@2000" -> TaskMixture.

    Each item is `name[:split][*factor][@count]`: factor oversamples (or subsamples) the task, count sets its exact
    number of examples (generators produce that many). `data_files` add `jsonl:PATH` items with factor 1.
    """
    tasks, weights, counts = [], [], []
    items = [s.strip() for s in spec.split(",") if s.strip()] + [f"jsonl:{p}" for p in data_files]
    if not items:
        raise UserError("--mixture is empty: name at least one task (e.g. 'synth,identity')")
    for item in items:
        m = _SPEC.match(item)
        if not m:
            raise UserError(f"--mixture item {item!r}: expected name[:split][*factor][@count], e.g. 'gsm8k:train*2'")
        count = int(m["count"]) if m["count"] else None
        tasks.append(build_task(m["name"], m["split"], task_dir=task_dir, words=words, size=count))
        weights.append(float(m["factor"]) if m["factor"] else 1.0)
        counts.append(None if count is None else int(count * (float(m["factor"]) if m["factor"] else 1.0)))
    return TaskMixture(tasks, weights, seed=seed, counts=counts)


def conversation_to_text(conv: dict) -> str:
    """Readable plain text of a conversation (debugging and logs)."""
    out = []
    for m in conv["messages"]:
        c = m["content"] if isinstance(m["content"], str) else assistant_text(m["content"])
        out.append(f"{m['role']}: {c}")
    return "\n".join(out)
