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
from picochat.data.shards import SHARD_RE, check_shards, iter_texts, list_shards
from picochat.files import atomic_path, atomic_write_text
from picochat.runtime import default_data_dir, default_tokenizer_dir

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


def _rustbpe_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rustbpe") is not None


def _train_tokenizers(texts: Iterator[str], n_merge_vocab: int) -> dict[bytes, int]:
    """BPE merges with HF `tokenizers` -> tiktoken-style ranks (256 single bytes first, then merges in order)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_merge_vocab, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    hf.train_from_iterator(texts, trainer=trainer)
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
    return {b: i for i, (b, _) in enumerate(singles + merged)}


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
    def train(cls, texts: Iterable[str], vocab_size: int = 32768, max_doc_chars: int = 10_000,
              backend: str = "auto") -> "Tokenizer":
        """Train a byte-level BPE with `vocab_size` tokens in total (special tokens included).

        Each document is cropped to `max_doc_chars` characters (as nanochat does: long documents add many rare
        chunks and little new signal). backend: "tokenizers" (HF, always installed), "rustbpe" (faster: it splits and
        counts ~2.3x cheaper and merges ~4x cheaper per CPU second, measured on the Wikipedia shards), or "auto"
        (rustbpe when importable, else tokenizers). Both produce the same kind of ranks for tiktoken."""
        n_merge_vocab = vocab_size - len(SPECIAL_TOKENS)
        if n_merge_vocab < 256:
            raise UserError(f"--vocab-size {vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)} "
                            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        if backend not in ("auto", "tokenizers", "rustbpe"):
            raise UserError(f"--backend {backend!r}: expected auto, tokenizers or rustbpe")
        if backend == "auto":
            backend = "rustbpe" if _rustbpe_available() else "tokenizers"

        def capped() -> Iterator[str]:
            for t in texts:
                yield t[:max_doc_chars] if max_doc_chars else t

        if backend == "rustbpe":
            try:
                import rustbpe
            except ImportError:
                raise UserError("--backend rustbpe: the rustbpe package is not installed; `pip install rustbpe` "
                                "or use --backend tokenizers") from None
            trainer = rustbpe.Tokenizer()
            trainer.train_from_iterator(capped(), n_merge_vocab, pattern=SPLIT_PATTERN)
            ranks = dict(trainer.get_mergeable_ranks())
            if len(ranks) < 256:
                raise RuntimeError(f"rustbpe produced {len(ranks)} tokens, expected at least 256")
            return cls(ranks)
        return cls(_train_tokenizers(capped(), n_merge_vocab))

    # ------------------------------------------------------------------------------------------------------------
    # Save / load

    def save(self, directory: str | Path) -> Path:
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
        with atomic_path(directory / "token_bytes.pt") as tmp:
            torch.save(self.token_bytes(), tmp)
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


# ----------------------------------------------------------------------------------------------------------------
# CLI: `picochat tokenizer train | eval`

# Fixed samples for `tokenizer eval`: compression on prose, code and numbers says more than one average.
EVAL_SAMPLES = {
    "prose": ("The history of science is the study of the development of science and scientific knowledge, "
              "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
              "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
              "explanation, and prediction of real-world phenomena. Early on, people did not always agree."),
    "code": ("def fibonacci(n: int) -> list[int]:\n    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
             "    out = [0, 1]\n    while len(out) < n:\n        out.append(out[-1] + out[-2])\n"
             "    return out[:n]\n\n\nif __name__ == \"__main__\":\n    for i, x in enumerate(fibonacci(10)):\n"
             "        print(f\"{i:>3}: {x}\")\n"),
    "numbers": ("In 2023 the population was 8,045,311,447; GDP grew 3.14% to $104.8 trillion. "
                "Coordinates: 48.8566 N, 2.3522 E. Phone +1 (555) 010-9999. 12 + 345 = 357; 6789 * 2 = 13578."),
}


def _tiktoken_offline(name: str):
    """A stock tiktoken encoding only if its files are already cached (no network here: never try to fetch)."""
    import hashlib
    import tempfile

    urls = {"gpt2": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                     "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"],
            "cl100k_base": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"]}[name]
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls):
        return None
    try:
        import tiktoken

        return tiktoken.get_encoding(name)
    except Exception:  # noqa: BLE001 - a corrupt cache is the same as no cache here
        return None


def bytes_per_token(encode, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(encode(t)) for t in texts)
    return n_bytes / max(1, n_tokens)


def add_cli(parser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="{train,eval}", required=True)
    p = sub.add_parser("train", help="train the BPE tokenizer on the train shards of a data dir",
                       description="Train a byte-level BPE (GPT-4 split with <=2-digit numbers, chat special tokens).")
    p.add_argument("--data", type=Path, default=default_data_dir(), help="data dir (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=32768, help="total vocab incl. specials (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=2_000_000_000,
                   help="train on at most this many characters (default: %(default)s)")
    p.add_argument("--doc-cap", type=int, default=10_000,
                   help="crop each document to this many characters (default: %(default)s)")
    p.add_argument("--backend", choices=["auto", "tokenizers", "rustbpe"], default="auto",
                   help="BPE trainer: rustbpe if installed, else HF tokenizers (default: %(default)s)")
    p.add_argument("--out", type=Path, default=default_tokenizer_dir(), help="output dir (default: %(default)s)")
    p = sub.add_parser("eval", help="bytes per token on train/val text and on prose, code and numbers samples")
    p.add_argument("--tokenizer", type=Path, default=default_tokenizer_dir(), help="(default: %(default)s)")
    p.add_argument("--data", type=Path, default=None, help="data dir for train/val text (default: none)")
    p.add_argument("--max-chars", type=int, default=2_000_000, help="characters of train/val text to encode")


def validate_args(args) -> None:
    """The flags of `picochat tokenizer ...`, before any shard is read: one ConfigError line each."""
    from picochat.config import require, require_dir

    require(args.max_chars >= 1, f"--max-chars {args.max_chars}: must be >= 1")
    if args.tokenizer_command == "train":
        low = 256 + len(SPECIAL_TOKENS)
        require(args.vocab_size >= low, f"--vocab-size {args.vocab_size}: must be at least {low} (256 bytes + "
                                        f"{len(SPECIAL_TOKENS)} special tokens)")
        require(args.doc_cap >= 1, f"--doc-cap {args.doc_cap}: must be >= 1")
        require_dir(args.out, "--out", "pass a folder for the tokenizer (created if missing)", must_exist=False)
        require_dir(args.data, "--data", "pass a shard folder (`picochat data synth|download|prepare` make one)")
    else:
        require_dir(args.tokenizer, "--tokenizer", "pass the folder `picochat tokenizer train --out` wrote")
        if args.data is not None:
            require_dir(args.data, "--data", "pass a shard folder, or drop --data")


def cli_main(args) -> int:
    import time

    validate_args(args)
    if args.tokenizer_command == "train":
        train, val = list_shards(args.data)
        check_shards(train + val)
        t0 = time.perf_counter()
        chars = [0]

        def texts() -> Iterator[str]:
            for t in iter_texts(train, max_chars=args.max_chars, doc_cap=args.doc_cap):
                chars[0] += len(t)
                yield t

        backend = args.backend if args.backend != "auto" else ("rustbpe" if _rustbpe_available() else "tokenizers")
        tok = Tokenizer.train(texts(), vocab_size=args.vocab_size, max_doc_chars=args.doc_cap, backend=backend)
        dt = time.perf_counter() - t0
        tok.save(args.out)
        sample = list(iter_texts(val, max_chars=1_000_000))
        bpt = bytes_per_token(tok.enc.encode_ordinary, sample)
        print(f"tokenizer: trained vocab {tok.vocab_size} ({backend}) on {chars[0] / 1e6:.1f}M chars in {dt:.1f}s; "
              f"val {bpt:.2f} bytes/token; saved to {args.out}")
        return 0
    if args.tokenizer_command == "eval":
        tok = Tokenizer.load(args.tokenizer)
        rows: list[tuple[str, list[str]]] = [(k, [v]) for k, v in EVAL_SAMPLES.items()]
        if args.data is not None:
            train, val = list_shards(args.data)
            check_shards(train + val)
            rows = [("train", list(iter_texts(train, max_chars=args.max_chars))),
                    ("val", list(iter_texts(val, max_chars=args.max_chars)))] + rows
        others = {name: enc for name in ("gpt2", "cl100k_base") if (enc := _tiktoken_offline(name)) is not None}
        header = f"{'text':<10}{'bytes':>10}{'picochat':>10}" + "".join(f"{n:>13}" for n in others)
        print(f"tokenizer eval: {args.tokenizer} (vocab {tok.vocab_size}); bytes per token, higher is better")
        print(header)
        for name, texts in rows:
            line = f"{name:<10}{sum(len(t.encode()) for t in texts):>10}"
            line += f"{bytes_per_token(tok.enc.encode_ordinary, texts):>10.2f}"
            line += "".join(f"{bytes_per_token(enc.encode_ordinary, texts):>13.2f}" for enc in others.values())
            print(line)
        if not others:
            print("(gpt2 / cl100k_base comparison skipped: their files are not cached and there is no network)")
        return 0
    raise AssertionError(args.tokenizer_command)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: `picochat bench tokenizer`


def _parse_range(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def add_bench_args(parser) -> None:
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="dir of shard_*.parquet")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--shards", default="0-2", help="shard indices in the sorted file list, e.g. 0-2 or 0,3")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document (as training does)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the encode test")


def bench_main(args) -> dict:
    import time

    files = sorted(p for p in Path(args.data).iterdir() if SHARD_RE.match(p.name)) if Path(args.data).is_dir() else []
    try:
        shards = [files[i] for i in _parse_range(args.shards)]
    except (IndexError, ValueError):
        raise UserError(f"--shards {args.shards}: {args.data} has {len(files)} shard files") from None
    texts = list(iter_texts(shards, doc_cap=args.doc_cap))  # loaded once, outside the timings
    chars = sum(map(len, texts))
    result: dict = {"shards": [p.name for p in shards], "docs": len(texts), "chars": chars,
                    "vocab_size": args.vocab_size, "cpus": os.cpu_count()}
    backends = ["tokenizers"] + (["rustbpe"] if _rustbpe_available() else [])
    tok = None
    def cpu() -> float:  # process CPU seconds (all threads): steadier than wall time on a shared machine
        t = os.times()
        return t.user + t.system

    for backend in backends:
        t0, c0 = time.perf_counter(), cpu()
        tok = Tokenizer.train(texts, args.vocab_size, max_doc_chars=args.doc_cap, backend=backend)
        result[f"train_s_{backend}"] = round(time.perf_counter() - t0, 2)
        result[f"train_cpu_s_{backend}"] = round(cpu() - c0, 2)
        print(f"picochat Tokenizer.train (backend {backend}): {result[f'train_s_{backend}']}s "
              f"({result[f'train_cpu_s_{backend}']} CPU s)", flush=True)
    if _rustbpe_available():
        import rustbpe

        t0, c0 = time.perf_counter(), cpu()
        rustbpe.Tokenizer().train_from_iterator(iter(texts), args.vocab_size - len(SPECIAL_TOKENS),
                                                pattern=SPLIT_PATTERN)
        result["train_s_rustbpe_reference"] = round(time.perf_counter() - t0, 2)
        result["train_cpu_s_rustbpe_reference"] = round(cpu() - c0, 2)
        print(f"rustbpe reference: {result['train_s_rustbpe_reference']}s "
              f"({result['train_cpu_s_rustbpe_reference']} CPU s)", flush=True)
    else:
        result["train_s_rustbpe_reference"] = None
        print("rustbpe is not installed: no reference time", flush=True)
    t0 = time.perf_counter()
    n_tokens = sum(map(len, tok.encode(texts, num_threads=args.threads)))
    dt = time.perf_counter() - t0
    result["encode_mb_per_s"] = round(sum(len(t.encode()) for t in texts) / 1e6 / dt, 1)
    result["encode_tokens_per_s"] = round(n_tokens / dt)
    result["bytes_per_token"] = round(sum(len(t.encode()) for t in texts) / n_tokens, 3)
    return result
