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
- Schedule: constant LR for the first half, then linear to 0 (`scaling.chat_lr_multiplier`).
- Resume (`--resume auto`): the checkpoint holds the model, each rank's optimizer state, its loader cursor + buffer,
  its RNG state and the step, so a resumed run continues exactly as if it had never stopped.

The machinery is shared with midtrain and rl: picochat/stages/chat.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from picochat.config import add_config_args, config_from_args
from picochat.stages.chat import FULL_VAL_MIXTURE, ChatTrainConfig, train_packed

STAGE = "sft"

# The SFT mixture of nanochat's scripts/chat_sft.py, with our task names.
FULL_SFT_MIXTURE = "smoltalk,mmlu:auxiliary_train*3,gsm8k*4,identity@2000,simple_spelling@20000,spelling_bee@8000"


@dataclass
class SFTConfig(ChatTrainConfig):
    pass


def run(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune the run's mid (else base) checkpoint into `runs/<run>/sft/`."""
    return train_packed(STAGE, cfg, source_order=("mid", "base"), full_train=FULL_SFT_MIXTURE,
                        full_val=FULL_VAL_MIXTURE, crop=False, use_mask=True)


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, SFTConfig)


def cli_main(args: argparse.Namespace) -> int:
    run(config_from_args(SFTConfig, args))
    return 0
