"""`picochat bench pretrain|infer|tokenizer|loader|serve`: benchmarks that print one JSON line last.

Thin dispatch: each benchmark lives next to the code it measures and provides `add_bench_args(parser)` and
`bench_main(args) -> dict`; this module prints the dict as the final JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re

from picochat.config import require

BENCHES = {
    "pretrain": ("picochat.stages.pretrain", "training tok/s, MFU and peak memory for a depth (compile once, time steady state)"),
    "infer": ("picochat.engine", "time to first token, per-token latency and tok/s at batch 1, 8, 64"),
    "tokenizer": ("picochat.tokenizer", "tokenizer training time and encode throughput on parquet shards"),
    "loader": ("picochat.data.loader", "tokenizing loader throughput (tokens/s per process)"),
    "serve": ("picochat.serving.serve", "a real `picochat serve` driven by 1, 8, 32, 64 concurrent streaming clients: "
                                       "aggregate tok/s, p50/p99 time to first token"),
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, helptext) in BENCHES.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # that stage is not written yet: `bench <name>` then says "not implemented yet"
        if hasattr(mod, "add_bench_args"):
            mod.add_bench_args(p)


# The smallest value of each count-like flag the benchmarks share by name (a zero --steps divides by zero)
BENCH_MINIMUMS = {"steps": 1, "warmup": 0, "profile": 0, "prompt_tokens": 1, "new_tokens": 1, "repeats": 1,
                  "depth": 1, "vocab_size": 2, "batch_size": 1, "seq_len": 8, "threads": 1, "doc_cap": 1}


def validate_args(args: argparse.Namespace) -> None:
    """Every benchmark's count flags, number lists and numbers, one ConfigError line each, before any work."""
    for name, low in BENCH_MINIMUMS.items():
        value = getattr(args, name, None)
        require(not isinstance(value, int) or value >= low, f"--{name.replace('_', '-')} {value}: must be >= {low}")
    seconds = getattr(args, "seconds", None)
    require(seconds is None or (math.isfinite(seconds) and seconds > 0), f"--seconds {seconds}: must be > 0")
    sizes = getattr(args, "batch_sizes", None)
    require(sizes is None or re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", sizes) is not None,
            f"--batch-sizes {sizes!r}: expected positive numbers separated by commas, e.g. 1,8,64")
    shards = getattr(args, "shards", None)
    require(not isinstance(shards, str) or re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", shards) is not None,
            f"--shards {shards!r}: expected shard indices such as 0-2 or 0,3")


def cli_main(args: argparse.Namespace) -> int:
    validate_args(args)
    try:
        mod = importlib.import_module(BENCHES[args.bench][0])
    except ModuleNotFoundError as e:
        if e.name != BENCHES[args.bench][0]:
            raise
        mod = None
    if not hasattr(mod, "bench_main"):
        print(f"picochat bench {args.bench}: not implemented yet")
        return 2
    result = mod.bench_main(args)
    print(json.dumps({"bench": args.bench, **result}, default=str), flush=True)
    return 0
