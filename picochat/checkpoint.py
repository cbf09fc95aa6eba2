"""Checkpoints: atomic, self-verifying, self-describing, enough to resume exactly.

Layout of one stage of one run (`PICOCHAT_HOME/runs/<run>/<stage>/`):

    checkpoints/step_000100/
        meta.json          step, stage, resolved config, model config, tokenizer dir, world size, metrics, checksums
        model.pt           model state_dict (rank 0; fp32 master weights)
        optim_rank0.pt     this rank's optimizer state (one file per rank)
        state_rank0.pt     this rank's loader state and RNG states (one file per rank)
    metrics.jsonl          one JSON object per logged step / eval
    run.json               run header: resolved config, versions, hardware, git SHA
    lock                   host and pid of the process training the stage (held with flock while it runs)

A checkpoint is written into `step_XXXXXX.tmp` and renamed into place only once every rank's files are on disk, so a
crash during save leaves the previous checkpoint as the latest loadable one. `latest_checkpoint` never returns a
`.tmp` directory. Only the newest `keep_last` checkpoints are kept.

Every file's size and digest are recorded in meta.json (`checksums`), computed from the bytes as they are written,
and meta.json carries the sha256 of its own content (`meta_checksum`), so a flipped byte or a truncation anywhere is
found before anything is loaded (`verify_checkpoint`). A file's digest is the sha256 of the sha256s of its 64 MiB
chunks (`chunk_bytes` in its record), so verification hashes the chunks of every file at once, one thread each: on
an H100 host a d20 resume's verification (9.2 GB) took 7.6 s one file after another, at most 0.8 s in chunks.
Records without `chunk_bytes` (exports, and checkpoints written before chunking) hold the sha256 of the whole
file. sha256 rather than blake2b: hashlib's sha256 runs on the CPU's SHA instructions (1.8 GB/s against blake2b's
0.94 GB/s over 512 MiB on an x86 server), and both ship with Python.
Checkpoints written before checksums existed are checked through the CRC32s of their zip members (a torch.save file
is a zip archive) and load with one warning. Paths to the tokenizer and the parent checkpoint are stored relative to
the checkpoint when they lie under PICOCHAT_HOME, so a moved PICOCHAT_HOME still loads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from picochat import hf
from picochat.config import UserError
from picochat.files import atomic_path, atomic_write_text, is_disk_full, replace_dir
from picochat.model import GPTConfig, build_model
from picochat.runtime import barrier, get_rank, get_world_size, picochat_home, print0, stage_dir
from picochat.tokenizer import Tokenizer

STAGES = ("base", "mid", "sft", "rl")
HASH = "sha256"
PATH_KEYS = ("tokenizer_dir", "parent")  # meta.json fields that name a directory (stored relative when possible)
_CHUNK = 1 << 20  # read size
CHUNK_BYTES = 64 << 20  # a file's digest covers chunks of this size (its record says which size)
_warned: set[str] = set()  # one warning per kind per process


def checkpoints_dir(run: str, stage: str) -> Path:
    return stage_dir(run, stage) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step_{step:06d}"


def _warn_once(key: str, line: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print0(line)


# ----------------------------------------------------------------------------------------------------------------
# Checksums


class _HashingWriter:
    """A binary file torch.save writes through: every byte is hashed on its way to disk, chunk by chunk
    (as `digests` checks it), so the checksum costs no second read, and a full disk surfaces as the OSError (ENOSPC) of
    Python's own write, not as torch's errno-less RuntimeError that a path argument gives."""

    def __init__(self, f: Any, chunk_bytes: int):
        self.f, self.name, self.size, self.chunk_bytes = f, f.name, 0, chunk_bytes
        self.h, self.filled, self.chunks = hashlib.new(HASH), 0, []
        self.error: OSError | None = None

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        at = 0
        while at < len(mv):
            take = min(len(mv) - at, self.chunk_bytes - self.filled)
            self.h.update(mv[at:at + take])
            self.filled += take
            at += take
            if self.filled == self.chunk_bytes:
                self.chunks.append(self.h.digest())
                self.h, self.filled = hashlib.new(HASH), 0
        self.size += len(mv)
        try:
            return self.f.write(b)
        except OSError as e:  # torch's zip writer turns it into a RuntimeError; _save_hashed raises it as it was
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()

    def digest(self) -> str:
        last = [self.h.digest()] if self.filled or not self.chunks else []
        return hashlib.new(HASH, b"".join(self.chunks + last)).hexdigest()


def _save_hashed(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save `obj` to `path` atomically; returns its record {"bytes", "digest", "chunk_bytes"}."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        w = _HashingWriter(f, CHUNK_BYTES)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:
                raise w.error from None
            raise
        f.flush()
    return {"bytes": w.size, "digest": w.digest(), "chunk_bytes": CHUNK_BYTES}


def _hash_range(path: Path, start: int, length: int | None, algorithm: str = HASH) -> bytes:
    """The digest of `length` bytes of `path` from `start` (None: to the end)."""
    h = hashlib.new(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            n = f.readinto(view if left is None or left >= _CHUNK else view[:left])
            if not n:
                break
            h.update(view[:n])
            if left is not None:
                left -= n
    return h.digest()


def file_digest(path: str | Path, algorithm: str = HASH) -> str:
    """The hex digest of a whole file, read once."""
    return _hash_range(Path(path), 0, None, algorithm).hex()


def digests(files: list[tuple[Path, int, int | None]], algorithm: str = HASH) -> list[str]:
    """The hex digest of each (path, size, chunk_bytes): with chunk_bytes, the digest of its chunks' digests
    (as `_HashingWriter` computes it while writing), else of the whole file. Every chunk of every file is hashed
    at once, one thread each (hashlib and file reads release the GIL); one at a time where no thread can start."""
    parts = []  # (file index, start, length)
    for i, (_, size, cb) in enumerate(files):
        if cb:
            parts += [(i, s, cb) for s in range(0, max(size, 1), cb)]
        else:
            parts.append((i, 0, None))
    work = lambda part: _hash_range(files[part[0]][0], part[1], part[2], algorithm)  # noqa: E731
    try:
        with ThreadPoolExecutor(max(1, min(len(parts), os.cpu_count() or 1, 16)),
                                thread_name_prefix="picochat-verify") as pool:
            done = list(pool.map(work, parts))
    except RuntimeError:  # no thread could start (interpreter shutdown, thread limit)
        done = [work(part) for part in parts]
    out: list[list[bytes]] = [[] for _ in files]
    for (i, _, _), d in zip(parts, done):
        out[i].append(d)
    return [hashlib.new(algorithm, b"".join(ds)).hexdigest() if cb else ds[0].hex()
            for (_, _, cb), ds in zip(files, out)]


def file_checksums(directory: str | Path, names: list[str]) -> dict[str, Any]:
    """The `checksums` record of files already written under `directory` (an export's files)."""
    d = Path(directory)
    return {"algorithm": HASH, "files": {n: {"bytes": (d / n).stat().st_size, "digest": file_digest(d / n)}
                                         for n in names}}


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return hashlib.new(HASH, json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_meta(meta: dict[str, Any]) -> str:
    """meta.json's text with `meta_checksum`, the hash of the content as a reader will parse it."""
    meta = json.loads(json.dumps(meta, default=str))
    meta.pop("meta_checksum", None)
    meta["meta_checksum"] = _meta_digest(meta)
    return json.dumps(meta, indent=2)


def _zip_problem(path: Path) -> str | None:
    """A torch.save file without a recorded checksum: the CRC32 of every zip member, else None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return f"{path.name}: member {bad} is corrupted (zip CRC mismatch)" if bad else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"{path.name}: unreadable ({e})"


def verify_checkpoint(ckpt: str | Path, names: set[str] | None = None) -> list[str]:
    """What is wrong with a checkpoint: an empty list when meta.json and its files (only `names`, where given)
    match their recorded sizes and checksums. Never raises for a damaged checkpoint."""
    ckpt = Path(ckpt)
    try:
        meta = _read_raw(ckpt)
    except UserError as e:
        return [str(e)]
    sums = meta.get("checksums")
    if sums is None:
        return _verify_legacy(ckpt, names)
    try:
        if "meta_checksum" not in meta:
            _warn_once(f"unsealed:{ckpt}", f"[checkpoint] WARNING: {ckpt}/meta.json has no meta_checksum (edited by "
                                           f"hand?); its other files are still verified")
        elif meta["meta_checksum"] != _meta_digest(meta):
            return ["meta.json: content does not match its meta_checksum (corrupted or edited; after a deliberate "
                    "edit, delete the meta_checksum line)"]
        algorithm = sums.get("algorithm", HASH)
        todo = [(n, rec) for n, rec in sums["files"].items() if names is None or n in names]
        problems = [msg for n, rec in todo if (msg := _size_problem(ckpt, n, rec))]
        if problems:
            return problems
        for n, rec in todo:
            cb = rec.get("chunk_bytes")
            if cb is not None and (type(cb) is not int or cb < 1 << 10):
                raise ValueError(f"{n}: chunk_bytes {cb!r}")
        found = digests([(ckpt / n, rec["bytes"], rec.get("chunk_bytes")) for n, rec in todo], algorithm)
        return [f"{n}: {algorithm} mismatch (corrupted)" for (n, rec), d in zip(todo, found) if d != rec["digest"]]
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        return [f"meta.json: malformed checksums ({e!r})"]
    except OSError as e:
        return [f"{e.filename or ckpt}: unreadable ({e.strerror})"]


def _size_problem(ckpt: Path, name: str, rec: dict[str, Any]) -> str | None:
    """A recorded file of a checkpoint that is missing or not the size written, else None (read before hashing)."""
    p = ckpt / name
    if not p.is_file():
        return f"{name}: missing"
    if (size := p.stat().st_size) != rec["bytes"]:
        return f"{name}: {size} bytes, {rec['bytes']} written (truncated or overwritten)"
    return None


def _verify_legacy(ckpt: Path, names: set[str] | None) -> list[str]:
    _warn_once("legacy", f"[checkpoint] WARNING: {ckpt} has no checksums (written by an older picochat); its files "
                         f"are checked by their zip CRCs only. Checkpoints written from now on carry sha256 sums")
    files = [p for p in sorted(ckpt.glob("*.pt")) if names is None or p.name in names]
    return [msg for p in files if (msg := _zip_problem(p))]


def checkpoint_files(ckpt: str | Path) -> list[str]:
    """The files verification covers: those meta.json records, or an older checkpoint's *.pt; [] if unreadable."""
    try:
        sums = _read_raw(Path(ckpt)).get("checksums")
        if isinstance(sums, dict) and isinstance(sums.get("files"), dict):
            return sorted(sums["files"])
    except UserError:
        return []
    return sorted(p.name for p in Path(ckpt).glob("*.pt"))


_VERIFIED: set[tuple] = set()  # checkpoints this process has just verified (newest_loadable, then load_model)


def _verified_key(ckpt: str | Path, names: set[str] | None) -> tuple:
    meta = Path(ckpt) / "meta.json"
    return (str(Path(ckpt).resolve()), frozenset(names or ()), meta.stat().st_mtime_ns if meta.exists() else None)


def check_checkpoint(ckpt: str | Path, names: set[str] | None = None) -> None:
    """Raise one UserError naming the checkpoint and what is wrong with it, unless it verifies (or this process
    verified it a moment ago, when `newest_loadable` picked it: a model's files are hashed once per load)."""
    key = _verified_key(ckpt, names)
    if key in _VERIFIED:
        _VERIFIED.discard(key)
        return
    problems = verify_checkpoint(ckpt, names)
    if problems:
        raise UserError(f"checkpoint {ckpt} fails verification: {'; '.join(problems)}. Load another checkpoint "
                        f"(the previous step_* folder beside it) or retrain it")


# ----------------------------------------------------------------------------------------------------------------
# Saving


def all_ranks(value: Any) -> list[Any]:
    """Every rank's `value` (small, picklable), in rank order; a collective, so it also serves as a barrier."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def checkpoint_bytes(ckpt: Path | None) -> int:
    return sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file()) if ckpt is not None else 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_full_error(e: OSError, what: str, where: Path, need: int, kept: str) -> UserError:
    """The one line for a write that ran out of space (ENOSPC) or quota (EDQUOT)."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    why = "quota exceeded" if e.errno == errno.EDQUOT else "disk full"
    return UserError(f"{why} while writing {what} under PICOCHAT_HOME={picochat_home()}: it needs about "
                     f"{_human(need)} free, {_human(free)} is left; {kept}. Free space (or set PICOCHAT_HOME to a "
                     f"larger disk, moving its contents) and rerun the same command: it resumes")


def _relative_paths(meta: dict[str, Any], final: Path) -> dict[str, Any]:
    """Directory paths under PICOCHAT_HOME stored relative to the checkpoint, so the tree can move as a whole."""
    home = os.path.abspath(picochat_home())
    out = dict(meta)
    for key in PATH_KEYS:
        v = out.get(key)
        if isinstance(v, (str, Path)) and str(v) and os.path.isabs(v):
            inside = os.path.relpath(os.path.abspath(v), home)
            if inside != ".." and not inside.startswith(".." + os.sep):
                out[key] = os.path.relpath(os.path.abspath(v), os.path.abspath(final))
    return out


class _SaveFailed(Exception):
    pass


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    optim_state: dict[str, Any] | None,
    meta: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it. Rank 0 writes model + meta; each rank writes its optimizer and state files.

    `model_state` is only needed on rank 0. Returns the final checkpoint directory. Each phase ends with every rank
    learning whether any rank failed, so a full disk on one rank stops all of them with the same message instead of
    leaving the others waiting at a barrier; the temp folder is then removed and the previous checkpoint is untouched.
    """
    rank, world = get_rank(), get_world_size()
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / _step_name(step)
    tmp = ckpt_root / (_step_name(step) + ".tmp")
    prev = latest_checkpoint(ckpt_root)
    # the space a save needs: the previous checkpoint's size, else what this rank holds times the ranks
    need = checkpoint_bytes(prev) or world * _nbytes([model_state, optim_state, rank_state])

    def phase(fn: Callable[[], Any]) -> list[Any]:
        try:
            res, err = fn(), None
        except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows
            res, err = None, e
        results = all_ranks((res, None if err is None else (is_disk_full(err), repr(err))))
        failed = [(r, e) for r, (_, e) in enumerate(results) if e is not None]
        if not failed:
            return [r for r, _ in results]
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint of this stage exists"
        if any(full for _, (full, _) in failed):
            cause = err if err is not None and is_disk_full(err) else OSError(errno.ENOSPC, "disk full")
            raise disk_full_error(cause, f"checkpoint {final.name}", ckpt_root, need, kept) from err
        if err is not None:
            raise err
        raise _SaveFailed(f"rank {failed[0][0]} failed to save {final}: {failed[0][1][1]}; {kept}")

    def start() -> None:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def rank_files() -> dict[str, Any]:
        files = {}
        if optim_state is not None:
            files[f"optim_rank{rank}.pt"] = _save_hashed(optim_state, tmp / f"optim_rank{rank}.pt")
        if rank_state is not None:
            files[f"state_rank{rank}.pt"] = _save_hashed(rank_state, tmp / f"state_rank{rank}.pt")
        return files

    def finish(files: dict[str, Any]) -> None:
        assert model_state is not None, "rank 0 must pass the model state"
        files = {"model.pt": _save_hashed(model_state, tmp / "model.pt"), **files}
        full = dict(_relative_paths(meta, final), step=step, world_size=world, saved_at=time.time(),
                    checksums={"algorithm": HASH, "files": dict(sorted(files.items()))})
        atomic_write_text(tmp / "meta.json", seal_meta(full))
        # the tmp name is shared by every rank (the phases above), so it is not files.atomic_path's per-process
        # one; re-saving a step (a final save right after a periodic one) swaps the folders
        replace_dir(tmp, final)

    phase(start if rank == 0 else lambda: None)
    per_rank = phase(rank_files)
    phase((lambda: finish({k: v for d in per_rank for k, v in d.items()})) if rank == 0 else lambda: None)
    if rank == 0:
        prune_checkpoints(ckpt_root, keep_last, keep=final)
    barrier()
    return final


# ----------------------------------------------------------------------------------------------------------------
# Listing, pruning, moving a damaged checkpoint aside


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and (p / "meta.json").exists():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[5:]))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def _sizes_match(ckpt: Path) -> bool:
    """The cheap part of verification (meta.json's own checksum, every file's size): what pruning checks of the
    checkpoint it keeps before deleting older ones."""
    try:
        meta = _read_raw(ckpt)
        sums = meta.get("checksums")
        if sums is None:
            return True
        return meta.get("meta_checksum", _meta_digest(meta)) == _meta_digest(meta) and all(
            (ckpt / n).is_file() and (ckpt / n).stat().st_size == r["bytes"] for n, r in sums["files"].items())
    except (UserError, OSError, AttributeError, KeyError, TypeError):
        return False


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints, never `keep` (the one just written, whatever its step),
    and nothing at all unless the newest checkpoint is intact: an older one may be the only good copy left."""
    ckpts = list_checkpoints(ckpt_root)
    if keep_last > 0 and ckpts and _sizes_match(ckpts[-1]) and (keep is None or _sizes_match(keep)):
        for p in ckpts[:-keep_last]:
            if keep is None or p.resolve() != Path(keep).resolve():
                shutil.rmtree(p, ignore_errors=True)
    for p in Path(ckpt_root).glob("step_*.tmp"):  # leftovers of a crashed save
        shutil.rmtree(p, ignore_errors=True)


def quarantine(ckpt: Path) -> Path:
    """Move a checkpoint that failed verification out of the listing (`step_XXXXXX.bad`, or `.bad2`, ...): nothing is
    deleted, it is kept for inspection, and the next save of that step does not collide with it."""
    n, dest = 1, ckpt.with_name(ckpt.name + ".bad")
    while dest.exists():
        n += 1
        dest = ckpt.with_name(f"{ckpt.name}.bad{n}")
    os.replace(ckpt, dest)
    return dest


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _read_raw(ckpt: Path) -> dict[str, Any]:
    """meta.json as stored (paths not resolved). UserError for anything unreadable."""
    path = Path(ckpt) / "meta.json"
    if not Path(ckpt).is_dir():
        what = "does not exist" if not Path(ckpt).exists() else "is a file, not a checkpoint directory"
        raise UserError(f"{ckpt}: {what}; pass a checkpoint directory (one holding meta.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not a picochat checkpoint (no meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt checkpoint metadata ({e}); use the previous checkpoint beside it") from None
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: corrupt checkpoint metadata (not a JSON object); use the previous checkpoint")
    return meta


def _rehome(old: str) -> str | None:
    """An absolute path written before PICOCHAT_HOME moved: the longest tail of it that exists under the current
    PICOCHAT_HOME (e.g. `/old/home/runs/x/tokenizer` -> `$PICOCHAT_HOME/runs/x/tokenizer`), else None."""
    parts = Path(old).parts[1:]
    home = picochat_home()
    for i in range(len(parts)):
        cand = home.joinpath(*parts[i:])
        if cand.exists():
            return str(cand)
    return None


def read_meta(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's meta.json with its paths resolved: a relative tokenizer_dir or parent (written under
    PICOCHAT_HOME, or an exported model's `tokenizer/`) against the checkpoint directory; an absolute one that no
    longer exists (PICOCHAT_HOME moved since an older picochat wrote it) under the current PICOCHAT_HOME."""
    meta = _read_raw(ckpt)
    for key in PATH_KEYS:
        v = meta.get(key)
        if not isinstance(v, str) or not v:
            continue
        if not os.path.isabs(v):
            meta[key] = os.path.normpath(os.path.join(os.path.abspath(ckpt), v))
        elif not os.path.exists(v) and (moved := _rehome(v)):
            _warn_once(f"moved:{v}", f"[checkpoint] {key} {v} no longer exists; using {moved} (PICOCHAT_HOME moved)")
            meta[key] = moved
    return meta


def update_meta(ckpt: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into a checkpoint's meta.json (atomic rewrite, resealed; rank 0 only). Used to record the
    metrics of an eval that ran after the checkpoint was saved. Dict values are merged one level deep."""
    meta = _read_raw(ckpt)
    for k, v in fields.items():
        if isinstance(v, dict) and isinstance(meta.get(k), dict):
            meta[k] = {**meta[k], **v}
        else:
            meta[k] = v
    text = seal_meta(meta) if "meta_checksum" in meta else json.dumps(meta, indent=2, default=str)
    try:
        atomic_write_text(Path(ckpt) / "meta.json", text)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e, f"{ckpt}/meta.json", Path(ckpt), len(text),
                                  "the checkpoint is intact without the new metrics") from e
        raise
    return read_meta(ckpt)


def torch_load(path: Path, map_location: str | torch.device, weights_only: bool) -> Any:
    """torch.load, memory-mapped where the tensors go on to an accelerator: they are then copied from the page
    cache once, instead of read into memory and copied again. A d20 checkpoint (3.6 GB model, 5.6 GB optimizer)
    loaded and copied once more on the 2-core CPU machine: 5.6 s and 8.1 s plain, 0.9 s and 1.2 s mapped; its
    resume's optimizer/data/resume phase on an H100 went from 4.4 s to 1.4 s. Not on the CPU: tensors the
    optimizer keeps would keep the file mapped for the whole run (and a pruned checkpoint's disk space taken until
    the process ends)."""
    # torch maps only its zip format; a file in its older format is read whole
    mmap = torch.device(map_location).type != "cpu" and zipfile.is_zipfile(path)
    return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)


def load_model_state(ckpt: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of a training checkpoint (model.pt) or of an exported model (model.safetensors)."""
    st = Path(ckpt) / "model.safetensors"
    if st.is_file() and not (Path(ckpt) / "model.pt").is_file():
        return {k: v.to(map_location) for k, v in load_file(str(st)).items()}
    return torch_load(Path(ckpt) / "model.pt", map_location, weights_only=True)


def load_rank_files(ckpt: Path, rank: int | None = None, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(optimizer state, rank state) of this rank; None where the checkpoint has no such file.

    Raises a clear error when the checkpoint was written by a different number of ranks and holds per-rank files
    for fewer ranks than needed (the caller decides whether it can reshard).
    """
    rank = get_rank() if rank is None else rank
    ckpt = Path(ckpt)
    optim_path, state_path = ckpt / f"optim_rank{rank}.pt", ckpt / f"state_rank{rank}.pt"
    optim = torch_load(optim_path, map_location, weights_only=False) if optim_path.exists() else None
    state = torch_load(state_path, map_location, weights_only=False) if state_path.exists() else None
    return optim, state


def find_run_with_stage(stage: str, run: str | None = None) -> tuple[str, Path]:
    """The run to load `stage` from: `run` if given, else the run whose latest `stage` checkpoint is newest.

    Returns (run_name, checkpoint_dir). Raises UserError naming what is missing and how to make it.
    """
    if stage not in STAGES:
        raise UserError(f"--source {stage!r}: expected one of {', '.join(STAGES)}")
    runs_root = picochat_home() / "runs"
    candidates = [run] if run else ([p.name for p in runs_root.iterdir() if p.is_dir()] if runs_root.is_dir() else [])
    best: tuple[float, str, Path] | None = None
    for name in candidates:
        ck = latest_checkpoint(checkpoints_dir(name, stage))
        if ck is not None:
            t = (ck / "meta.json").stat().st_mtime
            if best is None or t > best[0]:
                best = (t, name, ck)
    if best is None:
        where = f"run {run!r}" if run else f"any run under {runs_root}"
        raise UserError(f"no '{stage}' checkpoint found in {where}; train one first "
                        f"(e.g. `picochat speedrun --preset tiny`) or pass --run NAME")
    return best[1], newest_loadable(checkpoints_dir(best[1], stage))


def newest_loadable(ckpt_root: Path) -> Path:
    """The newest checkpoint under `ckpt_root` whose model files verify; each newer damaged one is named in a
    warning and left in place (loading never moves or deletes anything). One UserError when none verifies."""
    ckpts = list_checkpoints(ckpt_root)
    damaged = []
    for ck in reversed(ckpts):
        problems = verify_checkpoint(ck, MODEL_FILES)
        if not problems:
            for bad, why in damaged:  # stderr: `picochat chat -p` keeps stdout for the answer
                if get_rank() == 0:
                    print(f"[checkpoint] WARNING: {bad} fails verification ({why}); loading {ck.name} instead",
                          file=sys.stderr, flush=True)
            _VERIFIED.add(_verified_key(ck, MODEL_FILES))
            return ck
        damaged.append((ck, "; ".join(problems)))
    raise UserError(f"no checkpoint under {ckpt_root} verifies: " + " | ".join(f"{c.name}: {w}" for c, w in damaged)
                    + ". Retrain the stage (`--resume wipe`) or restore the files")


MODEL_FILES = {"model.pt", "model.safetensors", "tokenizer/tokenizer.json"}  # what loading a model reads


def require_tokenizer(ckpt: Path, meta: dict) -> None:
    """A checkpoint pretrained on --data random holds token ids with no text behind them: one clear error."""
    if not meta.get("tokenizer_dir"):
        raise UserError(f"{ckpt}: this checkpoint has no tokenizer (it was pretrained on --data random), so it cannot "
                        f"be chatted with, fine-tuned, exported, evaluated on text or served; pretrain on text (the "
                        f"default synthetic corpus or --data DIR) for a model that can")


def load_model(ckpt: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Build the model a checkpoint describes and load its weights. Returns (model, tokenizer, meta).

    meta.json must hold "model_config" (GPTConfig fields) and "tokenizer_dir". The files it reads are verified
    against their checksums first; a damaged checkpoint is one UserError naming it. A Hugging Face folder
    (config.json, no meta.json: `picochat export --format hf`, or a transformers nanochat model) loads through hf.py.
    """
    if hf.is_hf_folder(ckpt):
        return hf.load_model(Path(ckpt), device, dtype)
    check_checkpoint(ckpt, MODEL_FILES)
    meta = read_meta(ckpt)
    if "model_config" not in meta:
        raise UserError(f"{ckpt}/meta.json: no model_config; this checkpoint cannot be loaded as a model")
    require_tokenizer(ckpt, meta)
    cfg = GPTConfig.from_saved(meta["model_config"])
    tok = Tokenizer.load(meta["tokenizer_dir"], expect_vocab_size=cfg.vocab_size)
    model = build_model(cfg, device=device)
    state = load_model_state(ckpt, map_location=device)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.set_compute_dtype(dtype)
    model.eval()
    return model, tok, meta
