"""The one way a final file appears: written under a temp name next to it, flushed to disk, renamed into place.

A reader (a resumed run, `latest_checkpoint`, a shard listing, a second process) therefore sees either the old
content or the complete new one, never a torn write: `os.replace` within one directory is atomic on POSIX, and the
fsyncs before and after it make the new content survive a power loss once the call returns. Temp names are siblings
`<name>.tmp<pid>-<thread>`: a glob on the final suffix (`shard_*.parquet`, `step_000100`) never matches a half-written
file, and two writers (processes or threads) never share one.

Standard library only: `picochat data synth` imports this without torch.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: str | Path) -> Path:
    """A sibling of `path`, unique to this process and thread."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


def fsync_dir(path: str | Path) -> None:
    """Make the directory's entries (a rename into it) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not supported on every filesystem; the rename is still atomic
        pass


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def publish(tmp: str | Path, path: str | Path) -> None:
    """Put the complete file `tmp` at `path`: fsync its bytes, rename it over `path`, fsync the directory."""
    path = Path(path)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_dir(tmp: str | Path, path: str | Path) -> None:
    """Put the complete directory `tmp` at `path`. An existing `path` is first renamed aside (a directory cannot be
    renamed over a non-empty one) and removed once the new one is in place; a crash in between leaves the old one
    as `<name>.old<pid>` and `path` absent, never a mixture of the two."""
    path = Path(path)
    if path.exists():
        old = path.with_name(f"{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def is_disk_full(e: BaseException) -> bool:
    """An exception from a write that ran out of space (ENOSPC) or quota (EDQUOT)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temp path for a writer that takes a path (torch.save, a parquet writer, a folder of files); on a
    clean exit the result is published at `path` (`publish`, or `replace_dir` with `directory=True`, where the
    temp folder is created first). On an exception the temp is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            replace_dir(tmp, path)
        else:
            publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (creating the parent directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (creating the parent directory)."""
    atomic_write_bytes(path, text.encode("utf-8"))
