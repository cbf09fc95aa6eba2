"""`picochat bench pretrain|infer|tokenizer|loader`: benchmarks that print one JSON line last.

Thin dispatch: each benchmark lives next to the code it measures and provides `add_bench_args(parser)` and
`bench_main(args) -> dict`; this module prints the dict as the final JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json

BENCHES = {
    "pretrain": ("picochat.stages.pretrain", "training tok/s, MFU and peak memory for a depth (compile once, time steady state)"),
    "infer": ("picochat.engine", "time to first token, per-token latency and tok/s at batch 1, 8, 64"),
    "tokenizer": ("picochat.tokenizer", "tokenizer training time and encode throughput on parquet shards"),
    "loader": ("picochat.data.loader", "tokenizing loader throughput (tokens/s per process)"),
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


def cli_main(args: argparse.Namespace) -> int:
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
