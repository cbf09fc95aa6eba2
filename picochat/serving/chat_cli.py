"""`picochat chat`: talk to a trained model in the terminal, with history and streaming.

    picochat chat                       # interactive; commands: quit / exit, clear (new conversation)
    picochat chat -p "Why is the sky blue?"
    picochat chat --source base -p "The capital of France is"   # plain text completion, no chat format

Prompts are built with `conversation.render_for_completion`, exactly as training renders conversations, and
assistant turns are kept as parts (text / python / python_output) so a tool call is re-rendered faithfully.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from picochat.config import (UserError, add_config_args, check_ranges, check_run_name, config_from_args,
                             require_checkpoint_dir)
from picochat.conversation import render_for_completion


@dataclass
class ChatConfig:
    run: str | None = field(default=None, metadata={"help": "run to load (default: the newest run with --source)"})
    source: str = field(default="sft", metadata={"help": "which stage's checkpoint to talk to",
                                                 "choices": ["base", "mid", "sft", "rl"]})
    checkpoint: str | None = field(default=None, metadata={"help": "explicit checkpoint directory (overrides --run)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (0 = greedy)"})
    top_k: int = field(default=50, metadata={"help": "sample among the k most likely tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 = off)"})
    max_tokens: int = field(default=512, metadata={"help": "most tokens per reply"})
    seed: int = field(default=42, metadata={"help": "sampling seed (each turn uses seed + turn number)"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda | mps (default: auto)"})


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--prompt", default=None, help="one-shot: answer this prompt and exit")
    add_config_args(parser, ChatConfig)


class _Display:
    """Streams generated tokens as text: UTF-8 safe, tool calls shown as <<expr=result>>."""

    def __init__(self, tokenizer, out: TextIO):
        from picochat.engine import StreamDecoder  # lazy: the engine imports torch (~2 s); --help starts without it

        self.dec, self.out = StreamDecoder(tokenizer), out
        sp = tokenizer.special_tokens
        self.marks = {sp["<|python_start|>"]: "<<", sp["<|python_end|>"]: "=", sp["<|output_end|>"]: ">>"}

    def push(self, token: int) -> None:
        text = self.dec.push(token)
        if token in self.marks:
            text = self.dec.flush() + self.marks[token]
        if text:
            self.out.write(text)
            self.out.flush()

    def end(self) -> None:
        self.out.write(self.dec.flush() + "\n")
        self.out.flush()


def _reply(engine, prompt: list[int], cfg: ChatConfig, seed: int, out: TextIO, stop: list[int] | None = None
           ) -> list[int]:
    """Stream one reply to `out`; returns its tokens (terminal token excluded)."""
    display = _Display(engine.tokenizer, out)
    terminal = {engine.assistant_end, engine.bos, *(stop or [])}
    tokens: list[int] = []
    gen = engine.generate(prompt, num_samples=1, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                          top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1.0 else None, seed=seed, stop=stop)
    try:
        for col, mask in gen:
            tok = col[0]
            if mask[0] == 1 and tok in terminal:
                break
            tokens.append(tok)
            display.push(tok)
    finally:
        gen.close()
        display.end()
    return tokens


def _fit_history(engine, messages: list[dict[str, Any]], max_tokens: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Drop the oldest exchanges until the prompt leaves room for the reply; returns (messages, prompt ids)."""
    while True:
        ids = render_for_completion(engine.tokenizer, {"messages": messages}, where="chat history")
        if len(ids) + max_tokens <= engine.max_context or len(messages) <= 1:
            if len(ids) >= engine.max_context:
                raise UserError(f"prompt of {len(ids)} tokens is longer than the model's context "
                                f"({engine.max_context}); shorten it")
            return messages, ids
        messages = messages[2:]


def chat(engine, cfg: ChatConfig, prompt: str | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> int:
    """The chat loop (one-shot when `prompt` is given). Separate from the CLI so tests can drive it."""
    from picochat.engine import tokens_to_parts  # lazy: the engine imports torch (~2 s); --help starts without it

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tok = engine.tokenizer
    base = cfg.source == "base"
    messages: list[dict[str, Any]] = []
    turn = 0

    def answer(text: str) -> None:
        nonlocal messages, turn
        if base:  # a base model continues text; it has never seen the chat markers
            ids = [tok.bos_id] + tok.encode(text)
            if len(ids) >= engine.max_context:
                raise UserError(f"prompt of {len(ids)} tokens is longer than the model's context "
                                f"({engine.max_context})")
            stdout.write(text)
            _reply(engine, ids, cfg, cfg.seed + turn, stdout, stop=[tok.bos_id])
        else:
            messages, ids = _fit_history(engine, messages + [{"role": "user", "content": text}], cfg.max_tokens)
            if prompt is None:
                stdout.write("Assistant: ")
            reply = _reply(engine, ids, cfg, cfg.seed + turn, stdout)
            parts = tokens_to_parts(tok, reply) or [{"type": "text", "text": ""}]
            messages = messages + [{"role": "assistant", "content": parts}]
        turn += 1

    if prompt is not None:
        answer(prompt)
        return 0
    interactive = stdin.isatty()
    stdout.write(f"picochat ({cfg.source}, {engine.mode}). Type 'quit' or 'exit' to leave, 'clear' to start over.\n")
    while True:
        if interactive:
            stdout.write("\nUser: ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # EOF (Ctrl-D or the end of piped input)
            break
        text = line.rstrip("\n")
        cmd = text.strip().lower()
        if cmd in ("quit", "exit"):
            break
        if cmd == "clear":
            messages, turn = [], 0
            stdout.write("(conversation cleared)\n")
            continue
        if not text.strip():
            continue
        if not interactive:
            stdout.write(f"User: {text}\n")
        answer(text)
    return 0


def validate(cfg: ChatConfig) -> None:
    """The flags, one ConfigError line each, before the model is loaded."""
    check_ranges(cfg, {"temperature": (0, None), "top_k": (0, None), "top_p": (0, 1), "max_tokens": (1, None)})
    if cfg.top_p <= 0:
        raise UserError(f"--top-p {cfg.top_p}: must be in (0, 1] (1 = off)")
    if cfg.run:
        check_run_name(cfg.run)
    if cfg.checkpoint:
        require_checkpoint_dir(cfg.checkpoint)


def cli_main(args: argparse.Namespace) -> int:
    from picochat.engine import load_engine  # lazy: the engine imports torch (~2 s); --help starts without it

    cfg = config_from_args(ChatConfig, args)
    validate(cfg)
    engine, meta = load_engine(cfg.source, cfg.run, cfg.checkpoint, cfg.device)
    print(f"[chat] loaded {meta['checkpoint_dir']} (step {meta.get('step')})", file=sys.stderr, flush=True)
    return chat(engine, cfg, prompt=args.prompt)
