"""Bits per byte: the tokenizer-independent validation loss.

bpb = (sum of per-token cross-entropy in nats) / (ln 2 * sum of UTF-8 bytes of the target tokens), over targets
that are real text: ignored targets (-1) and special tokens (0 bytes, e.g. <|bos|>) count in neither sum. Models
with different vocabularies are therefore comparable, unlike per-token loss.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from picochat.runtime import accum_dtype


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 token_bytes: torch.Tensor, max_batches: int | None = None) -> float:
    """Bits per byte of `model` over `batches` of (inputs, targets) (B, T); summed over all ranks when distributed.

    `token_bytes` (vocab,) holds each token's byte length (0 for specials), e.g. `Tokenizer.token_bytes()`.
    Works on a plain or compiled model (anything that takes `loss_reduction="none"` and returns per-token losses).
    Ranks may see different numbers of batches; the only collective is the final sum. Returns inf when no byte
    was seen (an empty split), never NaN.
    """
    was_training = model.training
    model.eval()
    nats = None
    nbytes = None
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            tb = token_bytes.to(y.device)
            loss = model(x, y, loss_reduction="none").reshape(-1).float()
            yf = y.reshape(-1)
            counted = (yf >= 0)
            b = torch.where(counted, tb[yf.clamp_min(0)], 0)
            keep = b > 0
            n_i = torch.where(keep, loss, 0.0).sum()
            acc = accum_dtype(y.device)
            b_i = b.sum().to(acc)
            nats = n_i.to(acc) if nats is None else nats + n_i.to(acc)
            nbytes = b_i if nbytes is None else nbytes + b_i
    finally:
        model.train(was_training)
    device = token_bytes.device if nats is None else nats.device
    acc = accum_dtype(device)
    totals = torch.stack([nats if nats is not None else torch.zeros((), dtype=acc, device=device),
                          nbytes if nbytes is not None else torch.zeros((), dtype=acc, device=device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and totals.device.type != "cuda":
            totals = totals.cuda()
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    total_nats, total_bytes = totals.tolist()
    if total_bytes <= 0:
        return math.inf
    return total_nats / (math.log(2) * total_bytes)


def doc_start_batches(shards: list, tokenizer, batch_size: int, seq_len: int, max_tokens: int, device="cpu",
                      rank: int = 0, world_size: int = 1):
    """(inputs, targets) rows laid out the way a crop-packing loader (nanochat's) lays out validation text.

    Each document becomes <|bos|> + its tokens; a row takes whole documents while they fit, and the document that
    does not fit is cropped to fill the row (its rest is discarded). So rows hold mostly document beginnings.
    This is for comparing val bpb with such a loader; our own loader splits long documents instead of cropping,
    which keeps ~all tokens but also scores mid-document pieces. Rows are dealt round-robin to ranks.
    """
    import pyarrow.parquet as pq

    row_len = seq_len + 1
    rows: list[list[int]] = []
    cur: list[int] = []
    n_rows = max(1, max_tokens // seq_len)
    done = False
    for shard in shards:
        pf = pq.ParquetFile(shard)
        for rg in range(pf.num_row_groups):
            texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            for ids in tokenizer.encode(texts, prepend=tokenizer.bos_id):
                space = row_len - len(cur)
                cur.extend(ids[:space])
                if len(cur) == row_len:
                    rows.append(cur)
                    cur = []
                    if len(rows) >= n_rows:
                        done = True
                        break
            if done:
                break
        if done:
            break
    mine = rows[rank::world_size]
    for i in range(0, len(mine) - batch_size + 1, batch_size):
        t = torch.tensor(mine[i:i + batch_size], dtype=torch.long)
        yield t[:, :-1].to(device), t[:, 1:].to(device)
