"""Pretraining shards: `picochat data synth | download | prepare`, and the shard helpers other modules use.

A data directory holds `shard_XXXXX.parquet` files with one string column `text` (one document per row), zstd,
row groups of 1,024 documents. Files sort by name; the LAST one is the validation shard, all others train.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from picochat.config import UserError
from picochat.data import synth
from picochat.data.download import download_many, sha256_file
from picochat.files import atomic_path, atomic_write_text

ROW_GROUP = 1024
SHARD_RE = re.compile(r"^shard_\d+\.parquet$")

# nanochat's public pre-shuffled FineWeb-Edu-100B host: shard_00000 .. shard_01822 (~100 MB each, ~250M chars).
FINEWEB_SOURCE = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_PATTERN = "shard_{i:05d}.parquet"
FINEWEB_LAST_SHARD = 1822


# --------------------------------------------------------------------------------------------------------------------
# Shard helpers


def list_shards(data_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(train shards, val shards) of a data directory: all `shard_*.parquet` sorted by name; the last one is val."""
    data_dir = Path(data_dir)
    hint = "create one with `picochat data synth`, `picochat data download` or `picochat data prepare`"
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data directory does not exist; {hint} (or pass --data DIR)")
    shards = sorted(p for p in data_dir.iterdir() if SHARD_RE.match(p.name))
    if not shards:
        raise UserError(f"{data_dir}: no shard_*.parquet files; {hint}")
    if len(shards) < 2:
        raise UserError(f"{data_dir}: only one shard ({shards[0].name}); need at least 2 (the last is validation); "
                        f"{hint}")
    return shards[:-1], shards[-1:]


def check_shards(shards: Iterable[str | Path]) -> None:
    """Raise UserError naming the first shard that the loader could not read as documents: not a parquet file, no
    `text` column, a column that is not strings, or null rows (footer and schema only: milliseconds per file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in shards:
        way = "rewrite it with `picochat data prepare` (or remove it from the data directory)"
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{path}: not a readable parquet shard ({e}); {way}") from None
        schema = pf.schema_arrow
        if "text" not in schema.names:
            raise UserError(f"{path}: no 'text' column (columns: {schema.names}); {way}")
        kind = schema.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: column 'text' holds {kind}, not strings; {way}")
        meta = pf.metadata
        col = next(i for i in range(meta.num_columns) if meta.row_group(0).column(i).path_in_schema == "text") \
            if meta.num_row_groups else 0
        for rg in range(meta.num_row_groups):
            stats = meta.row_group(rg).column(col).statistics
            if stats is not None and stats.has_null_count and stats.null_count:
                raise UserError(f"{path}: {stats.null_count} null documents in row group {rg} of column 'text'; "
                                f"{way}")


_END = object()  # end of the document iterator


def write_shards(docs: Iterable[str], out_dir: str | Path, docs_per_shard: int, row_group: int = ROW_GROUP,
                 start_index: int = 0, compression_level: int = 3) -> list[Path]:
    """Write documents into `shard_{i:05d}.parquet` files of `docs_per_shard` rows (the last may be shorter).

    Each file is written under a temporary name and renamed when complete. Returns the written paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if docs_per_shard < 1 or row_group < 1:
        raise ValueError(f"docs_per_shard={docs_per_shard} and row_group={row_group} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("text", pa.string())])
    written: list[Path] = []
    it = iter(docs)
    index = start_index
    while True:
        first = next(it, _END)
        if first is _END:
            return written
        final = out_dir / f"shard_{index:05d}.parquet"
        n = 0
        try:
            with atomic_path(final) as tmp:
                writer = pq.ParquetWriter(tmp, schema, compression="zstd", compression_level=compression_level)
                try:
                    group: list[str] = []
                    for doc in itertools.chain([first], it):
                        group.append(doc)
                        n += 1
                        if len(group) == row_group or n == docs_per_shard:
                            writer.write_table(pa.table({"text": group}, schema=schema), row_group_size=row_group)
                            group = []
                        if n == docs_per_shard:
                            break
                    if group:
                        writer.write_table(pa.table({"text": group}, schema=schema), row_group_size=row_group)
                finally:
                    writer.close()
        except OSError as e:
            raise UserError(f"{final}: cannot write shard ({e}); check free space and permissions of {out_dir}") from e
        written.append(final)
        if n < docs_per_shard:
            return written
        index += 1


def iter_texts(shards: Iterable[str | Path], max_chars: int | None = None, doc_cap: int | None = None
               ) -> Iterator[str]:
    """Documents of the shards in order (row group by row group), optionally each cropped to `doc_cap` characters,
    stopping once `max_chars` characters (after cropping) have been yielded."""
    import pyarrow.parquet as pq

    total = 0
    for path in shards:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column(0).to_pylist():
                if doc_cap:
                    text = text[:doc_cap]
                yield text
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return


def check_parquet(path: str | Path) -> None:
    """Raise if `path` is not a complete parquet file with a string `text` column (footer and schema check)."""
    import pyarrow.parquet as pq

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise ValueError(f"{path.name}: not a complete parquet file ({size} bytes, missing PAR1 magic)")
    meta = pq.ParquetFile(path).schema_arrow
    if "text" not in meta.names:
        raise ValueError(f"{path.name}: no 'text' column (columns: {meta.names})")


# --------------------------------------------------------------------------------------------------------------------
# prepare: local files -> shards


def _read_text(path: Path, errors: str) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start}; convert it to UTF-8 or pass --errors replace "
                        f"to substitute U+FFFD") from None


def _docs_from_file(path: Path, split_blank_lines: bool, text_field: str, errors: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = _read_text(path, errors)
        parts = re.split(r"\n\s*\n", text) if split_blank_lines else [text]
        for part in parts:
            if part.strip():
                yield part.strip("\n")
    elif suffix in (".jsonl", ".json"):
        text = _read_text(path, errors)
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise UserError(f"{path}:{lineno}: expected an object with a string {text_field!r} field "
                                f"(use --text-field NAME for another field)")
            if obj[text_field].strip():
                yield obj[text_field]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise UserError(f"{path}: cannot read parquet file ({e})") from None
        if text_field not in pf.schema_arrow.names:
            raise UserError(f"{path}: no {text_field!r} column (columns: {pf.schema_arrow.names}); "
                            f"use --text-field NAME")
        for rg in range(pf.num_row_groups):
            for doc in pf.read_row_group(rg, columns=[text_field]).column(0).to_pylist():
                if isinstance(doc, str) and doc.strip():
                    yield doc
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .parquet")


def prepare(inputs: list[Path], out: Path, val_docs: int | None = None, docs_per_shard: int = 8 * ROW_GROUP,
            split_blank_lines: bool = False, text_field: str = "text", errors: str = "strict",
            overwrite: bool = False) -> dict:
    """Convert text files into shards in `out`; the last `val_docs` documents form the final (val) shard.

    val_docs default: 10% of the documents, at most 1,024 and at least 1. Documents keep their input order."""
    files: list[Path] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix.lower() in (".txt", ".jsonl", ".json", ".parquet"))
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"{p}: input file does not exist")
    if not files:
        raise UserError(f"{' '.join(map(str, inputs))}: no .txt/.jsonl/.parquet input files found")
    out = Path(out)
    existing = sorted(q for q in out.glob("shard_*.parquet")) if out.is_dir() else []
    if existing and not overwrite:
        raise UserError(f"{out}: already holds {len(existing)} shard files; choose another --out or pass --overwrite")
    if val_docs is not None and val_docs < 1:
        raise UserError(f"--val-docs {val_docs}: must be >= 1")

    counts = {"docs": 0, "chars": 0}
    held: deque[str] = deque()
    hold = val_docs if val_docs is not None else ROW_GROUP
    val: list[str] = []

    def train_docs() -> Iterator[str]:
        # Hold back the last `hold` docs so they can become the val shard without knowing the total in advance.
        for f in files:
            n_file = 0
            for doc in _docs_from_file(f, split_blank_lines, text_field, errors):
                n_file += 1
                counts["docs"] += 1
                counts["chars"] += len(doc)
                held.append(doc)
                if len(held) > hold:
                    yield held.popleft()
            if n_file == 0:
                raise UserError(f"{f}: no documents (the file is empty or only whitespace)")
        total = counts["docs"]
        n_val = val_docs if val_docs is not None else min(ROW_GROUP, max(1, total // 10))
        if total - n_val < 1:
            raise UserError(f"{' '.join(map(str, inputs))}: only {total} document(s); need more than the "
                            f"{n_val} validation document(s) (--val-docs)")
        while len(held) > n_val:
            yield held.popleft()
        val.extend(held)

    for q in existing:
        q.unlink()
    try:
        train_paths = write_shards(train_docs(), out, docs_per_shard)
        val_paths = write_shards(val, out, len(val), start_index=len(train_paths))
    except BaseException:
        for q in out.glob("shard_*.parquet"):  # no partial dataset: a later run would train on it silently
            q.unlink()
        raise
    return {"out": str(out), "files": len(files), "docs": counts["docs"], "chars": counts["chars"],
            "train_shards": len(train_paths), "val_docs": len(val), "val_shard": val_paths[0].name}


# --------------------------------------------------------------------------------------------------------------------
# download: a public shard host -> local shards


def download(shards: int, out: Path, source: str = FINEWEB_SOURCE, pattern: str = FINEWEB_PATTERN,
             val_shard: int | None = None, workers: int = 4, retries: int = 5, progress: bool | None = None,
             backoff: float = 2.0, timeout: float = 60.0) -> dict:
    """Download train shards 0..shards-1 and the val shard into `out`, keeping `manifest.json` (size + sha256).

    Val rule: the source's designated val shard is always fetched too. For the default FineWeb-Edu host it is the
    host's last shard (01822), which also sorts last locally, so `list_shards` picks it as val no matter how many
    train shards were downloaded. For another --source pass --val-shard IDX; without it, the last of the N
    downloaded shards serves as val (so N must be >= 2).
    Already-present files that match the manifest (size) and have a valid parquet footer are skipped."""

    if shards < 1:
        raise UserError(f"--shards {shards}: must be >= 1")
    if val_shard is None and source.rstrip("/") == FINEWEB_SOURCE:
        val_shard = FINEWEB_LAST_SHARD
    if val_shard is None and shards < 2:
        raise UserError(f"--shards {shards}: with --source {source} and no --val-shard, the last downloaded shard is "
                        f"val, so download at least 2 (or pass --val-shard IDX)")
    if val_shard is not None and shards > val_shard:
        raise UserError(f"--shards {shards}: the source's val shard is index {val_shard}; ask for at most {val_shard}")
    indices = list(range(shards)) + ([val_shard] if val_shard is not None else [])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = {"source": source, "pattern": pattern, "val_shard": val_shard, "files": {}}
    if manifest_path.exists():
        try:
            manifest["files"] = json.loads(manifest_path.read_text()).get("files", {})
        except json.JSONDecodeError:
            pass  # a corrupt manifest is rebuilt from the files
    base = source.rstrip("/")
    todo, skipped = [], 0
    for i in indices:
        name = pattern.format(i=i)
        dest = out / name
        entry = manifest["files"].get(name)
        if dest.exists() and (entry is None or entry.get("size") == dest.stat().st_size):
            try:
                check_parquet(dest)
                if entry is None:  # a valid file put here by hand or by an older run: adopt it
                    manifest["files"][name] = {"size": dest.stat().st_size, "sha256": sha256_file(dest)}
                skipped += 1
                continue
            except (ValueError, OSError):
                pass
        if dest.exists():
            dest.unlink()  # unknown or invalid file under the final name: fetch it again
        todo.append((f"{base}/{name}", dest))

    lock = threading.Lock()

    def record(path: Path) -> None:
        # Called in the worker thread by the validator, after the footer check; sha256 of the complete .part.
        check_parquet(path)
        digest = sha256_file(path)
        with lock:
            manifest["files"][path.name.removesuffix(".part")] = {"size": path.stat().st_size, "sha256": digest}

    try:
        if todo:
            download_many(todo, workers=workers, progress=progress, validator=record, retries=retries,
                          backoff=backoff, timeout=timeout)
    finally:
        # Keep entries only for files that made it to their final name (a rejected .part is not recorded as done).
        manifest["files"] = {k: v for k, v in manifest["files"].items() if (out / k).exists()}
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return {"out": str(out), "downloaded": len(todo), "skipped": skipped, "files": len(indices),
            "bytes": sum(v["size"] for v in manifest["files"].values())}


# --------------------------------------------------------------------------------------------------------------------
# CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    from picochat.runtime import default_data_dir  # lazy: runtime imports torch (~2 s); `picochat data` needs none

    sub = parser.add_subparsers(dest="data_command", metavar="{synth,download,prepare}", required=True)

    p = sub.add_parser("synth", help="write the embedded synthetic corpus (pretraining shards, chats, eval set)",
                       description="Write the embedded synthetic corpus deterministically from a seed.")
    synth.add_synth_args(p)

    p = sub.add_parser("download", help="download pre-shuffled pretraining shards (FineWeb-Edu by default)",
                       description=download.__doc__)
    p.add_argument("--shards", type=int, required=True, help="number of train shards (indices 0..N-1)")
    p.add_argument("--source", default=FINEWEB_SOURCE, help="base URL of the shard host (default: %(default)s)")
    p.add_argument("--pattern", default=FINEWEB_PATTERN,
                   help="file name pattern under --source, with {i} the shard index (default: %(default)s)")
    p.add_argument("--val-shard", type=int, default=None,
                   help=f"index of the source's val shard (default: {FINEWEB_LAST_SHARD} for the default source)")
    p.add_argument("--workers", type=int, default=4, help="parallel downloads (default: %(default)s)")
    p.add_argument("--retries", type=int, default=5, help="retries per file (default: %(default)s)")
    p.add_argument("--out", type=Path, default=default_data_dir("fineweb"), help="output dir (default: %(default)s)")

    p = sub.add_parser("prepare", help="convert .txt/.jsonl/.parquet files into shards",
                       description="Convert .txt (one doc per file, or --split-blank-lines), .jsonl (a text field) and "
                                   ".parquet (a text column) files or folders into shards; the last shard is val.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    p.add_argument("--out", type=Path, required=True, help="output data directory")
    p.add_argument("--val-docs", type=int, default=None,
                   help="documents in the val shard (default: 10%% of the docs, at most 1024)")
    p.add_argument("--docs-per-shard", type=int, default=8 * ROW_GROUP, help="(default: %(default)s)")
    p.add_argument("--split-blank-lines", action="store_true",
                   help=".txt files hold many docs separated by blank lines (default: one doc per file)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column (default: %(default)s)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="non-UTF-8 bytes: fail (strict) or substitute U+FFFD (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")


def validate_args(args: argparse.Namespace) -> None:
    """The flags of `picochat data ...` that the workers would only trip over later (a --workers 0 download waits
    forever), as one ConfigError line each."""
    from picochat.config import check_ranges, config_from_args, require, require_dir

    if args.data_command == "synth":
        cfg = config_from_args(synth.SynthConfig, args)
        check_ranges(cfg, {"n_docs": (1, None), "n_eval": (0, None)})
        if cfg.out is not None:
            require_dir(cfg.out, "--out", "pass a folder for the corpus (created if missing)", must_exist=False)
    elif args.data_command == "download":
        for flag, value, low in (("--workers", args.workers, 1), ("--retries", args.retries, 0),
                                 ("--val-shard", args.val_shard, 0)):
            require(value is None or value >= low, f"{flag} {value}: must be >= {low}")
        require_dir(args.out, "--out", "pass a folder for the shards (created if missing)", must_exist=False)
    elif args.data_command == "prepare":
        require(args.docs_per_shard >= 1, f"--docs-per-shard {args.docs_per_shard}: must be >= 1")
        require(args.val_docs is None or args.val_docs >= 1, f"--val-docs {args.val_docs}: must be >= 1")
        require(bool(args.text_field), "--text-field: must name a field or column, e.g. --text-field text")
        require_dir(args.out, "--out", "pass a folder for the shards (created if missing)", must_exist=False)


def cli_main(args: argparse.Namespace) -> int:
    validate_args(args)
    if args.data_command == "synth":
        return int(synth.synth_main(args) or 0)
    if args.data_command == "download":
        summary = download(args.shards, args.out, source=args.source, pattern=args.pattern,
                           val_shard=args.val_shard, workers=args.workers, retries=args.retries)
        print(f"data download: {summary['downloaded']} downloaded, {summary['skipped']} already present, "
              f"{summary['bytes'] / 1e9:.2f} GB in {summary['out']}")
        return 0
    if args.data_command == "prepare":
        s = prepare(args.inputs, args.out, val_docs=args.val_docs, docs_per_shard=args.docs_per_shard,
                    split_blank_lines=args.split_blank_lines, text_field=args.text_field, errors=args.errors,
                    overwrite=args.overwrite)
        print(f"data prepare: {s['docs']} docs ({s['chars'] / 1e6:.1f}M chars) from {s['files']} files -> "
              f"{s['train_shards']} train shard(s) + val {s['val_shard']} ({s['val_docs']} docs) in {s['out']}")
        return 0
    raise AssertionError(args.data_command)
