"""Tokenizing distributed pretraining loader: rank-strided documents, background tokenization, BOS-aligned
best-fit packing, exact resume.

Document stream. The shards' row groups form a list of units (shard, row group). Epoch 0 visits them in file order
(the shards are pre-shuffled), later epochs in a permutation drawn from (seed, epoch). Rank r of W takes documents
r, r+W, r+2W, ... of every row group, so ranks see disjoint documents and equal shares even on tiny data.

Tokenization. A reader thread decodes row groups ahead of need; tokenizer threads encode chunks of documents (tiktoken
releases the GIL). Results are consumed strictly in stream order, so threads change speed, never content.

Packing. A row holds T+1 tokens (inputs = row[:-1], targets = row[1:]). Every buffered item is a BOS followed by a
slice of one document, at most T+1 tokens long:
- a document of C content tokens becomes BOS + its tokens when 1 + C <= T+1. A longer document is split into
  pieces of T content tokens, each behind its own BOS (so every piece can start a row), instead of being cropped to
  one row and mostly thrown away (Wikipedia articles average ~4K tokens; cropping would discard most of them);
- each row is filled greedily with the largest buffered item that fits the space left (best fit);
- when nothing fits, the smallest item longer than the space is cut: its head fills the row exactly, and its
  tail goes back into the buffer as a new BOS-led item when it has at least `min_piece` tokens (else it is dropped).
Only tails shorter than `min_piece` are dropped (and, in evaluation mode, what is left when the data ends); the
dropped fraction is counted in `stats()`.

Exact resume. `state_dict()` records the stream position and the buffer as references (unit, document, token range),
not tokens; `load_state_dict()` re-reads and re-tokenizes just those documents. A restored loader yields exactly the
batches the uninterrupted one would have yielded.
"""

from __future__ import annotations

import argparse
import bisect
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from picochat.config import UserError
from picochat.data.shards import list_shards
from picochat.runtime import default_data_dir, default_tokenizer_dir
from picochat.tokenizer import Tokenizer

STATE_VERSION = 1
CHUNK_DOCS = 64  # documents per tokenizer job: small enough to spread one row group over all threads


class _Item:
    """BOS + doc[start:end] of one document; `ref` locates the document in the stream for state_dict."""

    __slots__ = ("tokens", "start", "end", "ref")

    def __init__(self, tokens: np.ndarray, start: int, end: int, ref: tuple[int, int, int]):
        self.tokens, self.start, self.end, self.ref = tokens, start, end, ref

    def __len__(self) -> int:
        return 1 + self.end - self.start


class DataLoader:
    """Yields (inputs, targets) int64 (B, T) batches on `device`; see the module docstring for the rules.

    loop=True: endless, epoch after epoch (training). loop=False: one pass, then StopIteration (evaluation: the
    same packing, deterministic, rebuilt from scratch for each eval)."""

    def __init__(self, shards: list[Path], tokenizer, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", seed: int = 0, threads: int = 4,
                 loop: bool = True, buffer_docs: int = 1000, min_piece: int = 32, prefetch_units: int = 2):
        import pyarrow.parquet as pq

        if not shards:
            raise UserError("DataLoader: no shards given; create data with `picochat data synth` or "
                            "`picochat data download` (or check --data)")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.shards = [Path(s) for s in shards]
        self.tokenizer = tokenizer
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.seed, self.loop = seed, loop
        self.buffer_docs, self.min_piece = buffer_docs, min_piece
        self.prefetch_units = max(1, prefetch_units)
        self.bos = int(tokenizer.bos_id)
        self.units: list[tuple[int, int]] = []
        for si, path in enumerate(self.shards):
            try:
                n = pq.ParquetFile(path).metadata.num_row_groups
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
                raise UserError(f"{path}: cannot read parquet shard ({e}); re-create it "
                                f"(`picochat data download` re-fetches invalid files)") from None
            self.units += [(si, rg) for rg in range(n)]
        if not self.units:
            raise UserError(f"{self.shards[0].parent}: the shards hold no row groups (no documents)")
        self._files: dict[int, Any] = {}
        self._readers = ThreadPoolExecutor(1, thread_name_prefix="picochat-read")
        self._tokenizers = ThreadPoolExecutor(max(1, threads), thread_name_prefix="picochat-tok")
        self._pinned: list[torch.Tensor] = []
        self._events: list[Any] = []
        self._slot = 0
        self._reset(epoch=0, upos=0, dpos=0)

    # ------------------------------------------------------------------------------------------------------------
    # Document stream

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.units)
        if epoch == 0:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _read_texts(self, epoch: int, upos: int, cache: bool = True) -> list[str]:
        """This rank's documents of the upos-th unit of `epoch`. cache=True only from the (single) reader thread."""
        import pyarrow.parquet as pq

        si, rg = self.units[int(self._order(epoch)[upos])]
        pf = self._files.get(si) if cache else None
        if pf is None:
            pf = pq.ParquetFile(self.shards[si])
            if cache:
                self._files = {si: pf}  # keep one open file: units advance shard by shard
        texts = pf.read_row_group(rg, columns=["text"]).column(0).to_pylist()
        return texts[self.rank::self.world_size]

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        enc = getattr(self.tokenizer, "enc", None)
        if enc is not None and hasattr(enc, "encode_to_numpy"):
            # allowed_special=set() + disallowed_special=(): special-token strings in text are plain text.
            return [enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
        return [np.asarray(ids, dtype=np.int64) for ids in self.tokenizer.encode(texts)]

    def _read_job(self, epoch: int, upos: int, first_doc: int) -> list[Future]:
        texts = self._read_texts(epoch, upos)[first_doc:]
        return [self._tokenizers.submit(self._encode, texts[i:i + CHUNK_DOCS])
                for i in range(0, len(texts), CHUNK_DOCS)]

    def _submit_more(self) -> None:
        while len(self._pending) < self.prefetch_units and self._sub is not None:
            epoch, upos, first = self._sub
            self._pending.append((epoch, upos, first, self._readers.submit(self._read_job, epoch, upos, first)))
            upos += 1
            if upos == len(self.units):
                epoch, upos = epoch + 1, 0
            self._sub = (epoch, upos, 0) if (self.loop or epoch == 0) else None

    def _next_doc(self) -> tuple[np.ndarray, tuple[int, int, int]] | None:
        """The next document of this rank's stream (tokens without BOS, (epoch, upos, dpos)), None at the end."""
        while True:
            if self._cur is not None:
                chunks, epoch, upos, dpos = self._cur
                while chunks and not chunks[0][1]:
                    chunks.popleft()
                if chunks:
                    if isinstance(chunks[0][1], Future):
                        chunks[0] = (chunks[0][0], deque(chunks[0][1].result()))
                        continue
                    doc = chunks[0][1].popleft()
                    self._cur = (chunks, epoch, upos, dpos + 1)
                    self._pos = (epoch, upos, dpos + 1)
                    return doc, (epoch, upos, dpos)
                self._cur = None
                upos += 1
                if upos == len(self.units):
                    epoch, upos = epoch + 1, 0
                    self._check_epoch_had_tokens()
                self._pos = (epoch, upos, 0)
            if not self._pending:
                self._submit_more()
                if not self._pending:
                    return None
            epoch, upos, first, fut = self._pending.popleft()
            self._submit_more()
            self._cur = (deque((None, f) for f in fut.result()), epoch, upos, first)
            self._pos = (epoch, upos, first)

    def _check_epoch_had_tokens(self) -> None:
        # Without this, a rank that gets no text (e.g. 1-document row groups and 2 ranks) would spin forever.
        content = self._stats["tokens_in"] - self._stats["docs"]
        if self._content_at_wrap is not None and content == self._content_at_wrap:
            raise UserError(f"{self.shards[0].parent}: rank {self.rank} of {self.world_size} got no text in a whole "
                            f"pass over {len(self.shards)} shard(s) (ranks take every {self.world_size}th document "
                            f"of each row group); use more data or fewer processes")
        self._content_at_wrap = content

    # ------------------------------------------------------------------------------------------------------------
    # Packing buffer

    def _add_item(self, item: _Item, seq: int | None = None) -> None:
        if seq is None:
            seq, self._seq = self._seq, self._seq + 1
        key = (len(item), seq)
        self._keys.insert(bisect.bisect_left(self._keys, key), key)
        self._items[seq] = item

    def _add_doc(self, tokens: np.ndarray, ref: tuple[int, int, int]) -> None:
        n = len(tokens)
        self._stats["docs"] += 1
        self._stats["tokens_in"] += n + 1
        if n == 0:
            return
        T = self.T
        for start in range(0, n, T):
            end = min(start + T, n)
            if start and end - start < self.min_piece:
                self._stats["tokens_dropped"] += end - start
                continue
            if start:
                self._stats["bos_added"] += 1
            self._add_item(_Item(tokens, start, end, ref))

    def _fill(self) -> bool:
        """Top the buffer up to `buffer_docs` items; False when it is empty and the stream has ended."""
        while len(self._keys) < self.buffer_docs and not self._exhausted:
            got = self._next_doc()
            if got is None:
                self._exhausted = True
                break
            self._add_doc(*got)
        return bool(self._keys)

    def _pack_row(self, row: np.ndarray) -> bool:
        """Fill one row of T+1 tokens; False (row unusable) only when the data ran out (loop=False)."""
        pos, cap = 0, self.T + 1
        keys, items = self._keys, self._items
        while pos < cap:
            if not self._fill():
                self._stats["tokens_dropped"] += max(0, pos - 1)  # a partial last row (evaluation) is discarded
                return False
            space = cap - pos
            i = bisect.bisect_right(keys, (space, float("inf"))) - 1
            if i >= 0:  # best fit: the largest item that fits entirely
                length, seq = keys.pop(i)
                item = items.pop(seq)
                take = length
            else:  # nothing fits: cut the smallest item, requeue its tail
                length, seq = keys.pop(0)
                item = items.pop(seq)
                take = space
            row[pos] = self.bos
            n = take - 1
            if n:
                row[pos + 1:pos + take] = item.tokens[item.start:item.start + n]
            pos += take
            if take < length:
                tail_start = item.start + n
                if item.end - tail_start >= self.min_piece:
                    self._stats["bos_added"] += 1
                    self._add_item(_Item(item.tokens, tail_start, item.end, item.ref))
                else:
                    self._stats["tokens_dropped"] += item.end - tail_start
        return True

    # ------------------------------------------------------------------------------------------------------------
    # Batches

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        rows = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            if not self._pack_row(rows[b]):
                self._stats["tokens_dropped"] += b * (T + 1)  # an incomplete last batch is discarded too
                raise StopIteration
        self._batches += 1
        self._stats["tokens_yielded"] += B * (T + 1)
        if self.device.type == "cuda":
            return self._to_cuda(rows)
        both = np.empty((2, B, T), dtype=np.int64)
        both[0] = rows[:, :-1]
        both[1] = rows[:, 1:]
        t = torch.from_numpy(both)
        if self.device.type != "cpu":
            t = t.to(self.device)
        return t[0], t[1]

    def batch_from(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A held batch (a resume's first) in the layout `next_batch` gives: the halves of one (2, B, T) tensor.
        The compiled model specializes on its inputs' strides and offsets, and a held batch saved from CUDA comes
        back from .cpu() as two separate tensors: on an H100 such a d12 resume missed the compile cache and
        compiled its training graph twice (docs/LOG.md)."""
        t = torch.stack([x, y]).to(self.device)
        return t[0], t[1]

    def _to_cuda(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Two pinned staging buffers in turn; before refilling one, wait until its previous copy has finished.
        if not self._pinned:
            self._pinned = [torch.empty((2, self.B, self.T), dtype=torch.int64).pin_memory() for _ in range(2)]
            self._events = [None, None]
        slot = self._slot
        self._slot ^= 1
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        host = self._pinned[slot]
        view = host.numpy()
        view[0] = rows[:, :-1]
        view[1] = rows[:, 1:]
        gpu = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[slot] = event
        return gpu[0], gpu[1]

    def __iter__(self):
        while True:
            try:
                batch = self.next_batch()
            except StopIteration:
                return
            yield batch

    # ------------------------------------------------------------------------------------------------------------
    # State

    def _shape(self) -> dict[str, Any]:
        return {"batch_size": self.B, "seq_len": self.T, "rank": self.rank, "world_size": self.world_size,
                "units": len(self.units), "seed": self.seed, "buffer_docs": self.buffer_docs,
                "min_piece": self.min_piece}

    def state_dict(self) -> dict:
        items = [[seq, *self._items[seq].ref, self._items[seq].start, self._items[seq].end] for _, seq in self._keys]
        return {"version": STATE_VERSION, "shape": self._shape(), "pos": list(self._pos), "seq": self._seq,
                "batches": self._batches, "exhausted": self._exhausted, "items": items, "stats": dict(self._stats)}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore exactly. strict=False accepts another batch/world shape and restarts from the saved stream
        position with an empty buffer (approximate resume, e.g. on a different GPU count)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"loader state version {state.get('version')} is not {STATE_VERSION}; "
                            f"start the stage fresh (or resume with the picochat version that wrote it)")
        if state["shape"] != self._shape():
            if strict:
                diff = {k: (v, self._shape().get(k)) for k, v in state["shape"].items() if self._shape().get(k) != v}
                raise UserError(f"loader state was saved with a different setup (saved, now): {diff}; "
                                f"resume with the same data, batch size, sequence length and GPU count")
            self._reset(*state["pos"])
            return
        self._reset(*state["pos"])
        self._seq, self._batches, self._exhausted = state["seq"], state["batches"], state["exhausted"]
        self._stats.update(state["stats"])
        if self._content_at_wrap is not None:
            self._content_at_wrap = self._stats["tokens_in"] - self._stats["docs"]
        by_unit: dict[tuple[int, int], list] = {}
        for seq, epoch, upos, dpos, start, end in state["items"]:
            by_unit.setdefault((epoch, upos), []).append((seq, dpos, start, end))
        for (epoch, upos), entries in by_unit.items():
            texts = self._read_texts(epoch, upos, cache=False)
            wanted = sorted({d for _, d, _, _ in entries})
            futures = [self._tokenizers.submit(self._encode, [texts[d] for d in wanted[i:i + CHUNK_DOCS]])
                       for i in range(0, len(wanted), CHUNK_DOCS)]
            tokens = dict(zip(wanted, (arr for f in futures for arr in f.result())))
            for seq, dpos, start, end in entries:
                self._add_item(_Item(tokens[dpos], start, end, (epoch, upos, dpos)), seq=seq)

    def _reset(self, epoch: int, upos: int, dpos: int) -> None:
        for *_, fut in getattr(self, "_pending", ()):
            fut.cancel()
        self._pos = (epoch, upos, dpos)
        self._sub: tuple[int, int, int] | None = (epoch, upos, dpos) if (self.loop or epoch == 0) else None
        self._pending: deque = deque()
        self._cur = None
        self._keys: list[tuple[int, int]] = []
        self._items: dict[int, _Item] = {}
        self._seq = 0
        self._batches = 0
        self._exhausted = False
        self._stats = {"docs": 0, "tokens_in": 0, "tokens_yielded": 0, "tokens_dropped": 0, "bos_added": 0}
        # Content tokens seen at the last epoch boundary; from the start of an epoch, the first pass counts too.
        self._content_at_wrap: int | None = 0 if (upos, dpos) == (0, 0) else None

    def stats(self) -> dict:
        s = dict(self._stats)
        s["dropped_fraction"] = s["tokens_dropped"] / max(1, s["tokens_in"])
        s["epoch"] = self._pos[0]
        s["batches"] = self._batches
        s["buffered_items"] = len(self._keys)
        return s

    def close(self) -> None:
        for *_, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._readers.shutdown(wait=False, cancel_futures=True)
        self._tokenizers.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: `picochat bench loader`


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="data dir (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=default_tokenizer_dir(),
                        help="tokenizer dir (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=2048, help="(default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed duration (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4, help="tokenizer threads (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: cuda includes the pinned H2D copy")


def bench_main(args: argparse.Namespace) -> dict:
    tok = Tokenizer.load(args.tokenizer)
    train, _ = list_shards(args.data)
    loader = DataLoader(train, tok, args.batch_size, args.seq_len, device=args.device, threads=args.threads)
    t0 = time.perf_counter()
    loader.next_batch()
    first = time.perf_counter() - t0
    batches = 0
    # CPU seconds as well as wall time: on a shared machine tokens per CPU-second (all threads) and per main-thread
    # CPU-second (the serial packing part, the ceiling however many tokenizer threads run) are the stable figures.
    cpu0, main0 = os.times(), time.thread_time()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        loader.next_batch()
        batches += 1
    if loader.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    cpu1, main_cpu = os.times(), time.thread_time() - main0
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    stats = loader.stats()
    loader.close()
    tokens = batches * args.batch_size * args.seq_len
    result = {"tokens_per_s": round(tokens / dt), "batches": batches, "seconds": round(dt, 2),
              "first_batch_s": round(first, 2), "batch_size": args.batch_size, "seq_len": args.seq_len,
              "threads": args.threads, "cpu_s": round(cpu, 2), "tokens_per_cpu_s": round(tokens / max(cpu, 1e-9)),
              "main_thread_cpu_s": round(main_cpu, 2),
              "serial_ceiling_tokens_per_s": round(tokens / max(main_cpu, 1e-9)),
              "dropped_fraction": round(stats["dropped_fraction"], 4),
              "bos_added": stats["bos_added"], "docs": stats["docs"]}
    print(f"loader: {result['tokens_per_s'] / 1e6:.2f}M tokens/s ({batches} batches of {args.batch_size}x"
          f"{args.seq_len} in {dt:.1f}s, {args.threads} threads), dropped {100 * stats['dropped_fraction']:.2f}% "
          f"of tokens", flush=True)
    return result
