"""Byte-level BPE tokenizer: trained with the Rust `tokenizers` library, encoded with tiktoken.

- Split regex: GPT-4's, except numbers split into chunks of at most 2 digits (smaller vocab, better arithmetic).
- Special tokens (never produced from user text): bos and the chat/tool markers below.
- Saved as `tokenizer.json` (ranks as base64 + special tokens) and `token_bytes.pt` (bytes per token, for bpb).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from picochat.config import UserError

# GPT-4 (cl100k) pattern with \p{N}{1,3} -> \p{N}{1,2}.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",            # every document and every conversation starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",     # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",     # the tool's output, forced into the stream
]

FORMAT_VERSION = 1


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-char map that byte-level BPE (GPT-2, HF ByteLevel) uses for its vocab strings."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """Encode/decode text and chat markers. Build with `Tokenizer.train(...)` or `Tokenizer.load(dir)`."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, name: str = "picochat"):
        import tiktoken

        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        n = len(mergeable_ranks)
        self.special_tokens = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|bos|>"]

    # ------------------------------------------------------------------------------------------------------------
    # Training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 32768, max_doc_chars: int = 10_000) -> "Tokenizer":
        """Train a byte-level BPE with `vocab_size` tokens in total (special tokens included)."""
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        n_merge_vocab = vocab_size - len(SPECIAL_TOKENS)
        if n_merge_vocab < 256:
            raise UserError(f"--vocab-size {vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)} "
                            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        hf = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=n_merge_vocab, show_progress=False, min_frequency=0,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])

        def capped() -> Iterator[str]:
            for t in texts:
                yield t[:max_doc_chars] if max_doc_chars else t

        hf.train_from_iterator(capped(), trainer=trainer)
        vocab = hf.get_vocab()  # str -> id
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        ranks: dict[bytes, int] = {}
        for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            ranks[bytes(byte_decoder[c] for c in tok)] = idx
        # tiktoken wants ranks 0..n-1 with every single byte present; re-number in id order to be safe.
        ordered = sorted(ranks.items(), key=lambda kv: kv[1])
        singles = [kv for kv in ordered if len(kv[0]) == 1]
        merged = [kv for kv in ordered if len(kv[0]) > 1]
        if len(singles) != 256:
            raise RuntimeError(f"tokenizer training produced {len(singles)} single-byte tokens, expected 256")
        final = {b: i for i, (b, _) in enumerate(singles + merged)}
        return cls(final)

    # ------------------------------------------------------------------------------------------------------------
    # Save / load

    def save(self, directory: str | Path) -> Path:
        from picochat.checkpoint import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT_VERSION,
            "pattern": self.pattern,
            "vocab_size": self.vocab_size,
            "special_tokens": SPECIAL_TOKENS,
            "ranks": [base64.b64encode(b).decode("ascii") for b, _ in sorted(self.mergeable_ranks.items(),
                                                                              key=lambda kv: kv[1])],
        }
        atomic_write_text(directory / "tokenizer.json", json.dumps(payload))
        tmp = directory / f"token_bytes.pt.part{os.getpid()}"
        torch.save(self.token_bytes(), tmp)
        os.replace(tmp, directory / "token_bytes.pt")
        return directory

    @classmethod
    def load(cls, directory: str | Path, expect_vocab_size: int | None = None) -> "Tokenizer":
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            raise UserError(f"{path}: no tokenizer here; train one with `picochat tokenizer train` "
                            f"or pass --tokenizer DIR")
        try:
            payload = json.loads(path.read_text())
            ranks = {base64.b64decode(s): i for i, s in enumerate(payload["ranks"])}
            tok = cls(ranks, pattern=payload["pattern"])
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise UserError(f"{path}: corrupt tokenizer file ({e}); retrain with `picochat tokenizer train`") from None
        if payload.get("special_tokens") != SPECIAL_TOKENS:
            raise UserError(f"{path}: tokenizer has different special tokens than this picochat version; retrain it")
        if expect_vocab_size is not None and tok.vocab_size != expect_vocab_size:
            raise UserError(f"{path}: tokenizer has vocab {tok.vocab_size} but the checkpoint expects "
                            f"{expect_vocab_size}; pass the tokenizer the model was trained with (--tokenizer DIR)")
        return tok

    # ------------------------------------------------------------------------------------------------------------
    # Encode / decode

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode_special(self, name: str) -> int:
        return self.special_tokens[name]

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ordinary text -> ids. Special-token strings in the text are encoded as plain text, never as specials."""
        pre = self.encode_special(prepend) if isinstance(prepend, str) else prepend
        post = self.encode_special(append) if isinstance(append, str) else append
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        if pre is not None or post is not None:
            for ids in batch:
                if pre is not None:
                    ids.insert(0, pre)
                if post is not None:
                    ids.append(post)
        return batch

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(ids)

    def id_to_bytes(self, idx: int) -> bytes:
        return self.enc.decode_single_token_bytes(idx)

    def token_bytes(self) -> torch.Tensor:
        """int32 tensor (vocab_size,): UTF-8 byte length of each token, 0 for special tokens (excluded from bpb)."""
        out = torch.zeros(self.vocab_size, dtype=torch.int32)
        for b, i in self.mergeable_ranks.items():
            out[i] = len(b)
        return out
