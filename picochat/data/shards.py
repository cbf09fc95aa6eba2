"""Pretraining shards: `picochat data synth | download | verify | prepare`, and the shard helpers other modules use.

A data directory holds `shard_XXXXX.parquet` files with one string column `text` (one document per row), zstd,
row groups of 1,024 documents. Files sort by name; the LAST one is the validation shard, all others train.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from picochat.config import UserError, check_ranges, config_from_args, require, require_dir
from picochat.data import synth
from picochat.data.download import download_many, sha256_file
from picochat.files import atomic_path, atomic_write_text

ROW_GROUP = 1024
SHARD_RE = re.compile(r"^shard_\d+\.parquet$")


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
# download: a Hugging Face dataset -> local shards, each checked against the hub's own sha256


# name -> (dataset repository, index of its val shard). Both are nanochat's pre-shuffled shard sets of
# `shard_{i:05d}.parquet` files with a `text` column (~100 MB, ~250M characters each); the host's last shard is val.
SOURCES = {
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6542),       # NVIDIA ClimbMix, nanochat's default since 2026
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1822),  # FineWeb-Edu-100B, nanochat's earlier default
}
DEFAULT_SOURCE = "climbmix"
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
MANIFEST = "manifest.json"


def parse_source(source: str) -> tuple[str, int | None]:
    """(dataset repository, val shard index or None) of a --source: a name of SOURCES or hf:OWNER/NAME."""
    if source in SOURCES:
        return SOURCES[source]
    if source.startswith("hf:"):
        repo = source[3:]
        if _REPO_RE.match(repo) and ".." not in repo:
            return repo, None
        raise UserError(f"--source {source}: expected hf:OWNER/NAME, a Hugging Face dataset (e.g. hf:karpathy/"
                        f"climbmix-400b-shuffle)")
    raise UserError(f"--source {source}: expected {', '.join(SOURCES)} or hf:OWNER/NAME")


def default_download_dir(source: str = DEFAULT_SOURCE) -> Path:
    from picochat.runtime import default_data_dir  # lazy: runtime imports torch (~2 s); `picochat data` needs none

    name = source[3:].replace("/", "--") if source.startswith("hf:") else source
    return default_data_dir(name)


def _read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # rebuilt: files already here are checked against the hub's listing, not against this file
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else {}


def _plan(source: str, repo: str, val_shard: int | None, shards: int, commit: str, retries: int, backoff: float,
          timeout: float) -> dict[str, dict]:
    """local shard name -> {"path": path in the repository, "size", "sha256" | "git_sha1"} to download."""
    from picochat.data.download import hub_paths_info, hub_tree

    if val_shard is not None:  # a named source: the file names are known, ask for just those
        names = [f"shard_{i:05d}.parquet" for i in list(range(shards)) + [val_shard]]
        info = hub_paths_info(repo, commit, names, retries=retries, backoff=backoff, timeout=timeout)
        missing = [n for n in names if n not in info]
        if missing:
            raise UserError(f"--source {source}: {repo}@{commit[:12]} has no {missing[0]}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; check --revision")
        return {n: {"path": n, **info[n]} for n in names}
    # Any dataset: its .parquet files in path order; the first N train, the last one is val (it sorts last here too).
    tree = hub_tree(repo, commit, retries=retries, backoff=backoff, timeout=timeout)
    files = sorted(p for p in tree if p.endswith(".parquet"))
    if len(files) < 2:
        raise UserError(f"--source {source}: {repo}@{commit[:12]} has {len(files)} .parquet file(s); need at least "
                        f"2 (the last is validation)")
    if shards > len(files) - 1:
        raise UserError(f"--shards {shards}: {repo} has {len(files) - 1} train .parquet file(s) besides its last "
                        f"(val); ask for at most {len(files) - 1}")
    chosen = list(range(shards)) + [len(files) - 1]
    return {f"shard_{i:05d}.parquet": {"path": files[i], **tree[files[i]]} for i in chosen}


def _has_text(path: Path) -> None:
    """Validator of downloaded shards: a complete parquet file with a `text` column (what the loader reads)."""
    try:
        check_parquet(path)
    except ValueError as e:
        if "no 'text' column" not in str(e):
            raise
        raise UserError(f"{e}: the loader reads a `text` column; convert the dataset's files with `picochat data "
                        f"prepare FILES --text-field COLUMN --out DIR`") from None


def _check_shard_count(shards: int, source: str, val_shard: int | None) -> None:
    """UserError unless --shards asks for at least one train shard and no more than a named source has."""
    if shards < 1:
        raise UserError(f"--shards {shards}: must be >= 1")
    if val_shard is not None and shards > val_shard:
        raise UserError(f"--shards {shards}: {source} has {val_shard} train shards (index {val_shard} is val); ask "
                        f"for at most {val_shard}")


def _resolve_commit(repo: str, revision: str | None, out: Path, old: dict, kw: dict) -> str:
    """The dataset commit to download: the one pinned in `out`'s manifest, unless --revision moves it."""
    from picochat.data.download import hub_commit

    if revision is None and isinstance(old.get("revision"), str):
        return old["revision"]  # pinned by an earlier run
    commit = hub_commit(repo, revision or "main", **kw)
    if old.get("revision") not in (None, commit) and any((out / n).exists() for n in old["files"]):
        print(f"[download] {out}: moving from {repo}@{old['revision'][:12]} to @{commit[:12]}; files that "
              f"differ are fetched again", flush=True)
    return commit


def _plan_at_commit(source: str, repo: str, val_shard: int | None, shards: int, commit: str, revision: str | None,
                    out: Path, old: dict, kw: dict) -> dict[str, dict]:
    """_plan, with a hint to pass --revision when the files are missing from a commit pinned by an earlier run."""
    try:
        return _plan(source, repo, val_shard, shards, commit, **kw)
    except UserError as e:
        if revision is None and commit == old.get("revision"):
            raise UserError(f"{e} (commit {commit[:12]} is the one pinned in {out / MANIFEST}; pass --revision main "
                            f"to move to the current one)") from None
        raise


def _matches(dest: Path, want: dict) -> bool:
    """Whether `dest` holds exactly the listed bytes (size, then sha256 or git blob sha1)."""
    from picochat.data.download import git_blob_sha1

    # Always re-hashed (in parallel threads, hashlib releases the GIL): a file that rotted or was edited since
    # it was written must not pass on the manifest's word.
    if not dest.exists() or dest.stat().st_size != want["size"]:
        return False
    return (sha256_file(dest) == want["sha256"]) if "sha256" in want else git_blob_sha1(dest) == want["git_sha1"]


def _present(out: Path, plan: dict[str, dict], workers: int) -> dict[str, bool]:
    """name -> whether `out` already holds that planned file with the listed bytes (hashed in parallel)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(plan, pool.map(lambda name: _matches(out / name, plan[name]), plan)))


def _fetch_list(out: Path, plan: dict[str, dict], present: dict[str, bool], repo: str, commit: str
                ) -> list[tuple[str, Path, str | None]]:
    """(url, destination, sha256) of each planned file not present; a stale copy is deleted first."""
    from picochat.data.download import hub_file_url

    todo = []
    for name, want in plan.items():
        if present[name]:
            continue
        dest = out / name
        if dest.exists():
            dest.unlink()  # not the listed bytes: fetch it again
        todo.append((hub_file_url(repo, commit, want["path"]), dest, want.get("sha256")))
    return todo


def _check_fetched(plan: dict[str, dict], path: Path) -> None:
    """Validator of a fetched file (`.part` or final name): the listed git blob sha1, and a `text` column."""
    from picochat.data.download import git_blob_sha1

    name = path.name.removesuffix(".part")
    want = plan[name]
    if "git_sha1" in want and git_blob_sha1(path) != want["git_sha1"]:
        raise ValueError(f"git blob sha1 mismatch (expected {want['git_sha1']})")
    _has_text(path)


def _write_manifest(out: Path, manifest: dict, plan: dict[str, dict], known: dict) -> None:
    """Add the files now in `out` to the manifest and write it."""
    # Record only files that made it to their final name (a rejected .part is not recorded as done); entries
    # of files outside this plan stay (same revision only), so asking for fewer shards does not forget others.
    for name, entry in known.items():
        if name not in plan and (out / name).exists():
            manifest["files"][name] = entry
    for name, want in plan.items():
        if (out / name).exists():
            manifest["files"][name] = want
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def download(shards: int, out: Path | None = None, source: str = DEFAULT_SOURCE, revision: str | None = None,
             workers: int = 4, retries: int = 5, progress: bool | None = None, backoff: float = 2.0,
             timeout: float = 60.0) -> dict:
    """Download train shards 0..N-1 and the val shard of --source into --out, each checked against the sha256 the
    Hugging Face Hub lists for it.

    --source: climbmix (default), fineweb-edu, or hf:OWNER/NAME for any dataset of parquet files with a `text`
    column (its files in path order; the last one is val). The revision (default main) is resolved to a commit once
    and pinned in `manifest.json`, so a later run (or a re-upload) cannot mix files of two versions; pass --revision
    to move. A file whose bytes differ from the listing is deleted and fetched again; a second mismatch is an error.
    Files already present that match the listing are kept. `picochat data verify` re-checks a folder later."""
    repo, val_shard = parse_source(source)
    _check_shard_count(shards, source, val_shard)
    out = Path(out) if out is not None else default_download_dir(source)
    old = _read_manifest(out)
    if old.get("repo") not in (None, repo):
        raise UserError(f"{out}: holds shards of {old['repo']}, not {repo}; choose another --out (mixing two "
                        f"datasets in one folder would train on both)")
    kw = dict(retries=retries, backoff=backoff, timeout=timeout)
    commit = _resolve_commit(repo, revision, out, old, kw)
    plan = _plan_at_commit(source, repo, val_shard, shards, commit, revision, out, old, kw)

    out.mkdir(parents=True, exist_ok=True)
    known = old.get("files", {}) if old.get("revision") == commit else {}
    present = _present(out, plan, workers)
    manifest = {"source": source, "repo": repo, "revision": commit,
                "files": {name: want for name, want in plan.items() if present[name]}}
    skipped = len(manifest["files"])
    todo = _fetch_list(out, plan, present, repo, commit)
    try:
        if todo:
            download_many(todo, workers=workers, progress=progress, validator=partial(_check_fetched, plan), **kw)
    finally:
        _write_manifest(out, manifest, plan, known)
    return {"out": str(out), "downloaded": len(todo), "skipped": skipped, "files": len(plan), "revision": commit,
            "bytes": sum(v["size"] for v in manifest["files"].values())}


def verify(data_dir: Path | None = None) -> list[str]:
    """Re-hash every shard of a downloaded folder against its manifest. Returns one line per bad file (empty: all
    good): a file that is missing, has another size or checksum, or is a shard the manifest does not list."""
    from picochat.data.download import git_blob_sha1

    data_dir = Path(data_dir) if data_dir is not None else default_download_dir()
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such folder; pass the folder `picochat data download --out` wrote")
    m = _read_manifest(data_dir)
    if not m.get("files"):
        raise UserError(f"{data_dir}: no readable {MANIFEST} listing files; only folders written by `picochat data "
                        f"download` can be verified (rerun it to rebuild the manifest)")
    again = f"`picochat data download --source {m.get('source', DEFAULT_SOURCE)} --out {data_dir}` fetches it again"
    bad = []
    for name, want in sorted(m["files"].items()):
        path = data_dir / name
        if not isinstance(want, dict) or not ("sha256" in want or "git_sha1" in want):
            bad.append(f"{path}: the manifest gives no checksum for it; {again}")
        elif not path.exists():
            bad.append(f"{path}: missing; {again}")
        elif path.stat().st_size != want.get("size"):
            bad.append(f"{path}: {path.stat().st_size} bytes, the listing says {want.get('size')}; {again}")
        elif "sha256" in want and (got := sha256_file(path)) != want["sha256"]:
            bad.append(f"{path}: sha256 {got}, the listing says {want['sha256']}; {again}")
        elif "sha256" not in want and (got := git_blob_sha1(path)) != want["git_sha1"]:
            bad.append(f"{path}: git sha1 {got}, the listing says {want['git_sha1']}; {again}")
    for path in sorted(data_dir.iterdir()):
        if SHARD_RE.match(path.name) and path.name not in m["files"]:
            bad.append(f"{path}: a shard the manifest does not list (training would read it); move it away")
    return bad


# --------------------------------------------------------------------------------------------------------------------
# CLI


def add_cli(parser: argparse.ArgumentParser) -> None:
    from picochat.runtime import default_data_dir  # lazy: runtime imports torch (~2 s); `picochat data` needs none

    sub = parser.add_subparsers(dest="data_command", metavar="{synth,download,verify,prepare}", required=True)

    p = sub.add_parser("synth", help="write the embedded synthetic corpus (pretraining shards, chats, eval set)",
                       description="Write the embedded synthetic corpus deterministically from a seed.")
    synth.add_synth_args(p)

    p = sub.add_parser("download", help="download pre-shuffled pretraining shards (ClimbMix by default), checksummed",
                       description=download.__doc__)
    p.add_argument("--shards", type=int, required=True, help="number of train shards (indices 0..N-1)")
    p.add_argument("--source", default=DEFAULT_SOURCE,
                   help=f"{', '.join(SOURCES)} or hf:OWNER/NAME (default: %(default)s)")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of the dataset (default: the commit pinned in --out, else main)")
    p.add_argument("--workers", type=int, default=4, help="parallel downloads (default: %(default)s)")
    p.add_argument("--retries", type=int, default=5, help="retries per file (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output dir (default: {default_data_dir('<source>')}, e.g. .../{DEFAULT_SOURCE})")

    p = sub.add_parser("verify", help="re-check downloaded shards against their manifest's sha256",
                       description=verify.__doc__)
    p.add_argument("dir", type=Path, nargs="?", default=None,
                   help=f"a folder written by `data download` (default: {default_data_dir(DEFAULT_SOURCE)})")

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
    if args.data_command == "synth":
        cfg = config_from_args(synth.SynthConfig, args)
        check_ranges(cfg, {"n_docs": (1, None), "n_eval": (0, None)})
        if cfg.out is not None:
            require_dir(cfg.out, "--out", "pass a folder for the corpus (created if missing)", must_exist=False)
    elif args.data_command == "download":
        for flag, value, low in (("--workers", args.workers, 1), ("--retries", args.retries, 0)):
            require(value is None or value >= low, f"{flag} {value}: must be >= {low}")
        if args.out is not None:
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
        summary = download(args.shards, args.out, source=args.source, revision=args.revision, workers=args.workers,
                           retries=args.retries)
        print(f"data download: {summary['downloaded']} downloaded, {summary['skipped']} already present, "
              f"{summary['bytes'] / 1e9:.2f} GB in {summary['out']} (sha256 checked, revision "
              f"{summary['revision'][:12]})")
        return 0
    if args.data_command == "verify":
        bad = verify(args.dir)
        for line in bad:
            print(line, file=sys.stderr)
        if bad:
            return 2
        print(f"data verify: every file in {args.dir or default_download_dir()} matches its manifest")
        return 0
    if args.data_command == "prepare":
        s = prepare(args.inputs, args.out, val_docs=args.val_docs, docs_per_shard=args.docs_per_shard,
                    split_blank_lines=args.split_blank_lines, text_field=args.text_field, errors=args.errors,
                    overwrite=args.overwrite)
        print(f"data prepare: {s['docs']} docs ({s['chars'] / 1e6:.1f}M chars) from {s['files']} files -> "
              f"{s['train_shards']} train shard(s) + val {s['val_shard']} ({s['val_docs']} docs) in {s['out']}")
        return 0
    raise AssertionError(args.data_command)
