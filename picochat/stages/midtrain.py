"""`picochat midtrain`: continue the base model on the conversation mixture, packed like pretraining.

What it teaches: the chat special tokens, multiple choice, the python tool, spelling and counting, and who the
model is (nanochat's scripts/mid_train.py). How:
- Rows are packed like pretraining: every row starts at a conversation's `<|bos|>`, takes whole conversations
  best-fit, and crops one conversation to fill the remainder (no padding, every token is trained).
- Loss on every token, user text and tool outputs included (nanochat's midtraining choice). Why: midtraining is
  continued pretraining on conversation-shaped text; predicting the user's side teaches the turn structure and the
  special tokens too, and at this stage more trained tokens beat a cleaner target. The row-level crop is only safe
  because of that choice: a masked loss could leave a cropped row with nothing to train on. SFT, which comes next,
  is where the loss is restricted to the assistant's own tokens (measured better there: nanochat PR #582).
- Everything else (inheritance from the base checkpoint, resume, eval, checkpoints) is the machinery it shares
  with SFT and RL (stages/chat.py).
- Schedule: constant LR for 80% of training, then linear to 0 (nanochat's mid_train.py; `scaling.chat_lr_multiplier`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from picochat.config import add_config_args, config_from_args
from picochat.stages.chat import FULL_VAL_MIXTURE, ChatTrainConfig, train_packed

STAGE = "mid"

# The midtraining mixture of nanochat's scripts/mid_train.py, with our task names.
FULL_MID_MIXTURE = "smoltalk,mmlu:auxiliary_train,gsm8k,identity@2000,simple_spelling@200000,spelling_bee@80000"


@dataclass
class MidtrainConfig(ChatTrainConfig):
    source: str = field(default="base", metadata={"help": "checkpoint to start from: base | a checkpoint directory"})
    init_lr_frac: float = field(default=1.0, metadata={"help": "multiplier on the inherited learning rates"})
    warmdown_frac: float = field(default=0.2, metadata={"help": "last fraction of training that decays LR to 0"})


def run(cfg: MidtrainConfig) -> dict[str, Any]:
    """Midtrain the run's base checkpoint into `runs/<run>/mid/`."""
    return train_packed(STAGE, cfg, source_order=("base",), full_train=FULL_MID_MIXTURE, full_val=FULL_VAL_MIXTURE,
                        crop=True, use_mask=False)


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, MidtrainConfig)


def cli_main(args: argparse.Namespace) -> int:
    run(config_from_args(MidtrainConfig, args))
    return 0
