"""The one `picochat` command line: thin dispatch to the stage modules.

Each command lives in its own module, which provides `add_cli(parser)` (its flags, or its own sub-commands) and
`cli_main(args) -> int`. Modules are imported only when their command runs, so `picochat --help` is instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path
from typing import NoReturn

from picochat import __version__
from picochat.config import UserError

# command -> (module, one-line help). Order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("picochat.tools.doctor", "probe hardware and software, and recommend settings"),
    "data": ("picochat.data.shards", "synth | download | verify | prepare pretraining shards"),
    "tokenizer": ("picochat.tokenizer", "train | eval the BPE tokenizer"),
    "pretrain": ("picochat.stages.pretrain", "pretrain the base model"),
    "midtrain": ("picochat.stages.midtrain", "midtrain the base model on the conversation mixture"),
    "sft": ("picochat.stages.sft", "supervised fine-tuning on conversations (masked loss)"),
    "rl": ("picochat.stages.rl", "reinforcement learning on GSM8K-style problems with tool use"),
    "eval": ("picochat.evals.evaluate", "base (bpb, CORE, samples) | chat (ARC, MMLU, GSM8K, HumanEval, SpellingBee)"),
    "chat": ("picochat.serving.chat_cli", "talk to a model in the terminal"),
    "serve": ("picochat.serving.serve", "web chat UI and OpenAI-compatible /v1 API"),
    "export": ("picochat.serving.export", "write a trained model as one shareable folder (safetensors + tokenizer)"),
    "report": ("picochat.tools.report", "write report.md (with plots) for a run"),
    "speedrun": ("picochat.tools.speedrun", "run the whole pipeline for a preset, resumably"),
    "launch": ("picochat.tools.launch", "run a stage under torchrun (multi-GPU, multi-node, no libuv needed)"),
    "bench": ("picochat.tools.bench", "pretrain | infer | tokenizer | loader benchmarks (one JSON line last)"),
}


class NotImplementedCommand(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, with its errors (unknown flag, bad int, missing argument) on one line: argparse prints the whole
    usage block first, which pushes the line that matters off a small terminal or out of a log's last line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _load(command: str):
    module_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise NotImplementedCommand(command) from None
        raise
    if not hasattr(module, "add_cli") or not hasattr(module, "cli_main"):
        raise NotImplementedCommand(command)
    return module


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="picochat",
        description="Train your own small ChatGPT from scratch, end to end. `picochat speedrun` runs it all.",
    )
    parser.add_argument("--version", action="version", version=f"picochat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == command:  # only the chosen command's module is imported
            _load(name).add_cli(p)
    return parser


# file-system errors about a path the user chose (a flag, PICOCHAT_HOME): one line naming it, not a traceback;
# writes that matter are atomic (files.py), so such a failure leaves no half-written file under a final name
FS_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOTDIR, errno.EISDIR,
             errno.EEXIST, errno.EDQUOT}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    try:
        parser = build_parser(command)
    except NotImplementedCommand:
        print(f"picochat {command}: not implemented yet in picochat {__version__}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = _load(args.command)
    home = os.environ.get("PICOCHAT_HOME")
    if home and Path(home).expanduser().exists() and not Path(home).expanduser().is_dir():
        print(f"picochat {args.command}: error: PICOCHAT_HOME={home} is a file; point PICOCHAT_HOME at a directory "
              f"(it is created if missing)", file=sys.stderr)
        return 2
    try:
        rc = module.cli_main(args)
    except UserError as e:
        print(f"picochat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"picochat {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in FS_ERRNOS or not e.filename:
            raise
        print(f"picochat {args.command}: error: {e.filename}: {e.strerror}; check that path (the flag or "
              f"PICOCHAT_HOME that leads to it), its permissions and the free space, then run the command again",
              file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
