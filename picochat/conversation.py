"""Conversations: validation, rendering to token ids with a loss mask, and rendering for completion.

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}`:
- an optional leading `system` message, then strictly alternating `user` / `assistant` messages starting with user;
- user and system content is a string (or a list of `{"type": "text"}` parts, joined);
- assistant content is a string or a list of parts `{"type": "text" | "python" | "python_output", "text": str}`.

Token layout (mask 1 = trained on):

    <|bos|>                                    0
    <|user_start|> user text <|user_end|>      0 0 0      (a system message is merged into the first user turn)
    <|assistant_start|>                        0          (given at inference time, so never a target)
      text part                                1
      <|python_start|> code <|python_end|>     1 1 1      (the model must learn to call the tool)
      <|output_start|> out <|output_end|>      0 0 0      (the engine forces the tool output; never learned)
    <|assistant_end|>                          1          (the model must learn to stop)

Truncation rule (explicit, counted): a conversation longer than `max_tokens` keeps its longest prefix of whole turns
that ends with a complete assistant turn; if not even the first user+assistant exchange fits, it is dropped (render
returns empty lists). Every kept conversation therefore ends with `<|assistant_end|>`, which is always trained on, so
a batch made of kept conversations can never be all-masked (nanochat's SFT NaN bug, fixed upstream in scripts/chat_sft.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from picochat.config import UserError

ASSISTANT_PART_TYPES = ("text", "python", "python_output")


@dataclass
class RenderStats:
    """Counters a stage logs: how many conversations were rendered whole, truncated, or dropped."""

    rendered: int = 0
    truncated: int = 0
    dropped: int = 0
    turns_dropped: int = 0
    examples: list[str] = field(default_factory=list)  # a few `where` names of dropped conversations, for the log

    def as_dict(self) -> dict[str, int]:
        return {"rendered": self.rendered, "truncated": self.truncated, "dropped": self.dropped,
                "turns_dropped": self.turns_dropped}

    def merge(self, other: "RenderStats") -> None:
        self.rendered += other.rendered
        self.truncated += other.truncated
        self.dropped += other.dropped
        self.turns_dropped += other.turns_dropped

    def summary(self) -> str:
        return (f"{self.rendered} conversations rendered, {self.truncated} truncated to whole turns, "
                f"{self.dropped} dropped (first exchange longer than the context)")


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _text_of(content: Any, where: str, i: int, role: str) -> str:
    """User/system content: a string, or a list of text parts (OpenAI style), joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise UserError(f"{where}: message {i} ({role}) part {j}: expected {{'type': 'text', 'text': str}}, "
                                f"got {str(part)[:80]!r}")
            out.append(part["text"])
        return "".join(out)
    raise UserError(f"{where}: message {i} ({role}): content must be a string, got {type(content).__name__}")


def validate(conv: Any, where: str = "conversation", *, require_assistant_last: bool = False) -> None:
    """Raise UserError naming `where` (e.g. "chat_train.jsonl line 17") when `conv` is malformed.

    Rules: a dict with a non-empty `messages` list; an optional leading system message; then roles alternate
    user/assistant starting with user; content is a string or known parts (see module doc).
    """
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        raise UserError(f"{where}: expected an object {{\"messages\": [...]}}, got {str(conv)[:80]!r}")
    messages = conv["messages"]
    if not messages:
        raise UserError(f"{where}: 'messages' is empty")
    start = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i}: expected {{\"role\": ..., \"content\": ...}}, got {str(m)[:80]!r}")
    if messages[0]["role"] == "system":
        _text_of(messages[0]["content"], where, 0, "system")
        start = 1
        if len(messages) == 1:
            raise UserError(f"{where}: a system message alone is not a conversation; add a user message")
    for i in range(start, len(messages)):
        m = messages[i]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            hint = " (a system message is only allowed first)" if m["role"] == "system" else ""
            raise UserError(f"{where}: message {i} has role {m['role']!r} but {expected!r} was expected: roles must "
                            f"alternate user/assistant after an optional leading system message{hint}")
        if expected == "user":
            _text_of(m["content"], where, i, "user")
        else:
            content = m["content"]
            if isinstance(content, str):
                continue
            if not isinstance(content, list):
                raise UserError(f"{where}: message {i} (assistant): content must be a string or a list of parts, "
                                f"got {type(content).__name__}")
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ASSISTANT_PART_TYPES \
                        or not isinstance(part.get("text"), str):
                    raise UserError(f"{where}: message {i} (assistant) part {j}: expected {{'type': "
                                    f"{'|'.join(ASSISTANT_PART_TYPES)}, 'text': str}}, got {str(part)[:80]!r}")
    if require_assistant_last and messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's (there is nothing to train on after "
                        f"a user turn)")


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _specials(tokenizer) -> dict[str, int]:
    names = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
             "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
    return {n: tokenizer.encode_special(n) for n in names}


def _merged_messages(conv: dict) -> list[dict]:
    """Messages with a leading system message merged into the first user message (blank line between)."""
    messages = conv["messages"]
    if messages and messages[0]["role"] == "system":
        system = _text_of(messages[0]["content"], "", 0, "system")
        first = messages[1]
        merged = {"role": "user", "content": system + "\n\n" + _text_of(first["content"], "", 1, "user")}
        return [merged] + list(messages[2:])
    return list(messages)


def _render_turn(tokenizer, sp: dict[str, int], message: dict, ids: list[int], mask: list[int]) -> None:
    """Append one user or assistant turn to ids/mask."""
    def add(tokens: list[int], m: int) -> None:
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    if message["role"] == "user":
        add([sp["<|user_start|>"]], 0)
        add(tokenizer.encode(_text_of(message["content"], "", 0, "user")), 0)
        add([sp["<|user_end|>"]], 0)
        return
    add([sp["<|assistant_start|>"]], 0)
    content = message["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    for part in parts:
        kind, text = part["type"], part["text"]
        if kind == "text":
            add(tokenizer.encode(text), 1)
        elif kind == "python":
            add([sp["<|python_start|>"]] + tokenizer.encode(text) + [sp["<|python_end|>"]], 1)
        elif kind == "python_output":
            add([sp["<|output_start|>"]] + tokenizer.encode(text) + [sp["<|output_end|>"]], 0)
        else:  # validate() rejects this; kept as a guard for callers that skip validation
            raise UserError(f"unknown assistant part type {kind!r}")
    add([sp["<|assistant_end|>"]], 1)


def render(tokenizer, conv: dict, max_tokens: int | None = None, stats: RenderStats | None = None,
           where: str = "conversation") -> tuple[list[int], list[int]]:
    """Conversation -> (ids, mask) for training. See the module doc for the layout and the truncation rule.

    Returns ([], []) when the conversation is dropped (its first exchange does not fit in `max_tokens`), and counts
    it in `stats`. Trailing user turns (nothing to learn after them) are not rendered.
    """
    validate(conv, where)
    sp = _specials(tokenizer)
    messages = _merged_messages(conv)
    ids: list[int] = [sp["<|bos|>"]]
    mask: list[int] = [0]
    kept_len = 0  # length of the longest prefix that ends with a complete assistant turn
    n_turns_kept = 0
    for i, message in enumerate(messages):
        _render_turn(tokenizer, sp, message, ids, mask)
        if max_tokens is not None and len(ids) > max_tokens:
            break
        if message["role"] == "assistant":
            kept_len, n_turns_kept = len(ids), i + 1
    n_assistant_total = sum(1 for m in messages if m["role"] == "assistant")
    if kept_len == 0:
        if stats is not None:
            stats.dropped += 1
            if len(stats.examples) < 5:
                stats.examples.append(where)
        return [], []
    if stats is not None:
        stats.rendered += 1
        last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1 \
            if n_assistant_total else 0
        if n_turns_kept < last_assistant:
            stats.truncated += 1
            stats.turns_dropped += last_assistant - n_turns_kept
    return ids[:kept_len], mask[:kept_len]


def render_for_completion(tokenizer, conv: dict, where: str = "conversation") -> list[int]:
    """Prompt ids for generation: the conversation up to its last user turn, then `<|assistant_start|>`.

    A trailing assistant message (e.g. the gold answer of an eval item) is removed first, as the model must write it.
    """
    validate(conv, where)
    messages = _merged_messages(conv)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise UserError(f"{where}: a conversation to complete must end with a user turn")
    sp = _specials(tokenizer)
    ids: list[int] = [sp["<|bos|>"]]
    mask: list[int] = [0]
    for message in messages:
        _render_turn(tokenizer, sp, message, ids, mask)
    ids.append(sp["<|assistant_start|>"])
    return ids


def assistant_text(content: Any) -> str:
    """Plain text of an assistant message (parts joined; tool calls and outputs included as their text)."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content)


def to_targets(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """(inputs, targets) for next-token training: targets[t] = ids[t+1] where mask[t+1] else -1."""
    inputs = ids[:-1]
    targets = [tok if m else -1 for tok, m in zip(ids[1:], mask[1:])]
    return inputs, targets
