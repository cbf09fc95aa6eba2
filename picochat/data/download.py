"""Robust HTTP downloads with the standard library only: retries, Range resume, atomic rename, checksums; and the
Hugging Face Hub's file listing, which gives the expected checksum of every file before it is fetched.

Used for pretraining shards (`picochat data download`), eval bundles and task files.

Rules every download follows:
- Bytes go to `<dest>.part`; the final name appears only via `files.publish` (fsync, rename) after the size, the
  optional sha256 and the optional validator (e.g. a parquet footer check) all pass. A half file never sits under
  the final name.
- Connection errors, timeouts, dropped connections and HTTP 5xx/408/429 are retried with exponential backoff.
  A `.part` left by a dropped connection (or by an earlier, interrupted run) is resumed with an HTTP Range request;
  a server that ignores Range (answers 200) makes us restart from byte 0.
- HTTP 4xx (other than 408/429), a full disk and exhausted retries raise `UserError` naming the URL and the next step.
- An expected sha256 that does not match deletes the bytes and fetches the file once more; a second mismatch is a
  `UserError` (a host serving other bytes than its listing promises is not a transient fault).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from picochat.config import UserError
from picochat.files import publish

CHUNK = 1 << 20
USER_AGENT = "picochat-downloader/1"
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class _Retry(Exception):
    """A transient failure: try again (resuming the .part when possible)."""


class _Restart(Exception):
    """The .part is unusable (bad checksum/validation, server ignored Range): delete it and try again."""


class _Mismatch(_Restart):
    """The complete .part has another sha256 than expected."""


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _disk_full(url: str, dest: Path, e: OSError) -> UserError:
    return UserError(f"{url}: disk full while writing {dest} ({e.strerror}); free some space "
                     f"(or choose another --out) and rerun: the download resumes where it stopped")


def _fetch_once(url: str, part: Path, timeout: float, progress: Callable[[int], None] | None,
                headers: dict[str, str] | None) -> None:
    """One HTTP attempt that appends to `part`. Returns when the body is complete; raises _Retry/_Restart/UserError."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            # Range past the end: the .part may already be complete, or the remote file changed. Start over.
            raise _Restart(f"HTTP 416 for a resume at byte {offset}")
        if e.code in RETRYABLE_STATUS or 500 <= e.code < 600:
            raise _Retry(f"HTTP {e.code} {e.reason}")
        hint = "check the URL (and --source)" if e.code == 404 else "check the URL and your access to it"
        raise UserError(f"{url}: HTTP {e.code} {e.reason}; {hint}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Retry(f"cannot connect ({reason})")

    with resp:
        status = resp.status
        if offset and status == 200:
            offset = 0  # the server ignored Range: rewrite from the start
        elif offset and status != 206:
            raise _Restart(f"unexpected HTTP {status} for a Range request")
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        received = 0
        try:
            with open(part, "ab" if offset else "wb") as f:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as e:
                        raise _Retry(f"connection dropped after {offset + received} bytes ({e.__class__.__name__})")
                    if not block:
                        break
                    f.write(block)
                    received += len(block)
                    if progress is not None:
                        progress(len(block))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise _disk_full(url, part, e) from None
            raise
        if expected is not None and received < expected:
            raise _Retry(f"connection dropped after {offset + received} of {offset + expected} bytes")


def download_file(url: str, dest: str | Path, *, sha256: str | None = None, retries: int = 5, backoff: float = 2.0,
                  timeout: float = 60.0, progress: bool | Callable[[int], None] | None = None,
                  validator: Callable[[Path], None] | None = None, overwrite: bool = False,
                  headers: dict[str, str] | None = None) -> Path:
    """Download `url` to `dest` robustly (see the module docstring) and return `dest`.

    sha256: expected hex digest; a mismatch discards the download and fetches it once more, then fails.
    retries: extra attempts after the first; sleeps backoff * 2**k (with jitter) between attempts.
    progress: True/False for a tqdm bar (None: only when stderr is a terminal), or a callable taking byte counts.
    validator: called with the complete `.part` before the rename; raise (any exception) to reject the file.
    overwrite: download even when `dest` exists (otherwise an existing file that passes sha256/validator is kept).
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        if _valid(dest, sha256, validator) is None:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    bar = None
    callback: Callable[[int], None] | None
    if callable(progress):
        callback = progress
    elif progress or (progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, desc=dest.name, leave=False)
        callback = bar.update
    else:
        callback = None
    last_error = "no attempt made"
    mismatches = 0
    try:
        for attempt in range(retries + 1):
            if attempt:
                delay = backoff * (2 ** (attempt - 1)) * (1 + 0.25 * random.random())
                time.sleep(delay)
            try:
                _fetch_once(url, part, timeout, callback, headers)
                try:
                    problem = _valid(part, sha256, validator)
                except UserError:
                    part.unlink(missing_ok=True)
                    raise
                if problem is not None:
                    raise (_Mismatch if problem.startswith("sha256") else _Restart)(problem)
                publish(part, dest)
                return dest
            except _Retry as e:
                last_error = str(e)
            except _Mismatch as e:
                part.unlink(missing_ok=True)
                mismatches += 1
                if mismatches >= 2:
                    raise UserError(f"{url}: {e} on two downloads; the bytes were deleted. The host serves another "
                                    f"file than expected: check the source and its revision, then rerun") from None
                last_error = str(e)
            except _Restart as e:
                last_error = str(e)
                part.unlink(missing_ok=True)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise _disk_full(url, dest, e) from None
                raise
    finally:
        if bar is not None:
            bar.close()
    resume = f" (the {part.stat().st_size} bytes in {part.name} are resumed)" if part.exists() else ""
    raise UserError(f"{url}: download failed after {retries + 1} attempts (last error: {last_error}); "
                    f"check the URL and your network, then rerun{resume}")


def _valid(path: Path, sha256: str | None, validator: Callable[[Path], None] | None) -> str | None:
    """None when `path` passes the checks, else a short reason."""
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256.lower():
            return f"sha256 mismatch (expected {sha256}, got {got})"
    if validator is not None:
        try:
            validator(path)
        except UserError:
            raise  # final (e.g. a file of the wrong schema): no retry
        except Exception as e:  # noqa: BLE001 - any validator failure means "reject this file"
            return f"invalid file ({e})"
    return None


def download_many(items: Iterable[tuple], workers: int = 4, progress: bool | None = None, **kwargs) -> list[Path]:
    """Download `(url, dest)` or `(url, dest, sha256)` items in parallel threads; returns the dest paths in order.

    Every file is attempted even when some fail; the failures are then raised together as one UserError.
    kwargs go to `download_file` (retries, backoff, timeout, validator, ...).
    """
    items = list(items)
    bar = None
    lock = threading.Lock()
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="file", desc="download")
    byte_count = [0]

    def on_bytes(n: int) -> None:
        with lock:
            byte_count[0] += n
            if bar is not None:
                bar.set_postfix_str(f"{byte_count[0] / 1e6:.1f} MB", refresh=False)

    results: dict[int, Path] = {}
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(download_file, item[0], item[1], sha256=item[2] if len(item) > 2 else None,
                               progress=on_bytes, **kwargs): i
                   for i, item in enumerate(items)}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except UserError as e:
                errors.append(str(e))
            if bar is not None:
                bar.update(1)
            elif progress is None:  # not a terminal (logs, launchers): one line per file instead of a bar
                done = len(results) + len(errors)
                print(f"[download] {done}/{len(items)} {Path(items[i][1]).name} "
                      f"({'failed' if i not in results else 'ok'}, {byte_count[0] / 1e6:.1f} MB so far)", flush=True)
    if bar is not None:
        bar.close()
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{len(errors)} of {len(items)} downloads failed: {errors[0]}{more}")
    return [results[i] for i in range(len(items))]


# --------------------------------------------------------------------------------------------------------------------
# The Hugging Face Hub's file listing: the expected checksum of every file of a dataset repository, before download.
#
# `GET {endpoint}/api/datasets/{repo}/revision/{rev}` gives the commit (`sha`) a branch points at, so a manifest can
# be pinned to it; `GET .../tree/{commit}?recursive=true&expand=false` lists the files (paginated through the
# `Link: <...>; rel="next"` header) and `POST .../paths-info/{commit}` (form `paths=...`) lists chosen ones. Each file
# entry is {"type": "file", "path", "size", "oid": git blob sha1, "lfs": {"oid": sha256 of the content, "size"}};
# "lfs" is absent for files stored in git itself, whose checksum is then the git blob sha1.

HF_ENDPOINT = "https://huggingface.co"


def hf_endpoint() -> str:
    """The hub's base URL: PICOCHAT_HF_ENDPOINT, else HF_ENDPOINT (the huggingface_hub variable, set for mirrors)."""
    return (os.environ.get("PICOCHAT_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def git_blob_sha1(path: str | Path) -> str:
    """Git's object id of a file's bytes: sha1(b"blob <size>\\0" + bytes); the hub's checksum of non-LFS files."""
    path = Path(path)
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _hub_request(url: str, data: bytes | None, what: str, retries: int, backoff: float, timeout: float
                 ) -> tuple[object, str | None]:
    """(parsed JSON, Link header) of one hub API call, with the downloader's retry rules."""
    last = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * (2 ** (attempt - 1)) * (1 + 0.25 * random.random()))
        req = urllib.request.Request(url, data=data, headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body, link = resp.read(), resp.headers.get("Link")
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in RETRYABLE_STATUS or 500 <= e.code < 600:
                last = f"HTTP {e.code} {e.reason}"
                continue
            hint = ("no such dataset or revision (or it is private or gated)" if e.code in (401, 403, 404)
                    else "check the name and your access to it")
            raise UserError(f"{what}: HTTP {e.code} from {url}: {hint}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
            last = f"cannot connect ({getattr(e, 'reason', e)})"
            continue
        try:
            return json.loads(body), link
        except ValueError:
            raise UserError(f"{what}: {url} did not answer JSON; is {hf_endpoint()} a Hugging Face Hub "
                            f"(PICOCHAT_HF_ENDPOINT)?") from None
    raise UserError(f"{what}: {url} failed after {retries + 1} attempts (last error: {last}); check your network "
                    f"(or PICOCHAT_HF_ENDPOINT), then rerun")


def _repo_url(repo: str) -> str:
    return f"{hf_endpoint()}/api/datasets/{repo}"


def hub_commit(repo: str, revision: str = "main", *, retries: int = 5, backoff: float = 2.0,
               timeout: float = 60.0) -> str:
    """The commit sha a revision (branch, tag or sha) of dataset `repo` points at."""
    url = f"{_repo_url(repo)}/revision/{urllib.parse.quote(revision, safe='')}"
    info, _ = _hub_request(url, None, f"dataset {repo}@{revision}", retries, backoff, timeout)
    sha = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
        raise UserError(f"dataset {repo}@{revision}: the hub's answer names no commit sha; check the revision")
    return sha


def _entries(raw: object, where: str) -> dict[str, dict]:
    """path -> {"size", "sha256"} (LFS) or {"size", "git_sha1"} from a listing's JSON; folders are skipped."""
    if not isinstance(raw, list):
        raise UserError(f"{where}: the hub's file listing is not a JSON array")
    out: dict[str, dict] = {}
    for e in raw:
        if not isinstance(e, dict) or e.get("type") != "file" or not isinstance(e.get("path"), str):
            continue
        lfs = e.get("lfs")
        if isinstance(lfs, dict) and isinstance(lfs.get("oid"), str) and re.fullmatch(r"[0-9a-f]{64}", lfs["oid"]):
            out[e["path"]] = {"size": int(lfs.get("size", e.get("size", -1))), "sha256": lfs["oid"]}
        elif isinstance(e.get("oid"), str) and re.fullmatch(r"[0-9a-f]{40}", e["oid"]):
            out[e["path"]] = {"size": int(e.get("size", -1)), "git_sha1": e["oid"]}
        else:
            raise UserError(f"{where}: the listing gives no checksum for {e['path']}")
    return out


def hub_tree(repo: str, commit: str, *, retries: int = 5, backoff: float = 2.0, timeout: float = 60.0
             ) -> dict[str, dict]:
    """Every file of dataset `repo` at `commit` with its size and checksum (see `_entries`)."""
    url: str | None = (f"{_repo_url(repo)}/tree/{urllib.parse.quote(commit, safe='')}"
                       f"?recursive=true&expand=false")
    out: dict[str, dict] = {}
    pages = 0
    while url:
        raw, link = _hub_request(url, None, f"listing of {repo}@{commit[:12]}", retries, backoff, timeout)
        out.update(_entries(raw, f"{repo}@{commit[:12]}"))
        m = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', link or "")
        url = urllib.parse.urljoin(url, m.group(1)) if m else None
        pages += 1
        if pages > 10_000:
            raise UserError(f"listing of {repo}: more than 10,000 pages; the hub's pagination does not end")
    return out


def hub_paths_info(repo: str, commit: str, paths: Sequence[str], *, retries: int = 5, backoff: float = 2.0,
                   timeout: float = 60.0, batch: int = 500) -> dict[str, dict]:
    """Size and checksum of chosen files of dataset `repo` at `commit`; paths the repository lacks are absent."""
    url = f"{_repo_url(repo)}/paths-info/{urllib.parse.quote(commit, safe='')}"
    out: dict[str, dict] = {}
    for i in range(0, len(paths), batch):
        form = urllib.parse.urlencode([("paths", p) for p in paths[i:i + batch]] + [("expand", "false")]).encode()
        raw, _ = _hub_request(url, form, f"listing of {repo}@{commit[:12]}", retries, backoff, timeout)
        out.update(_entries(raw, f"{repo}@{commit[:12]}"))
    return out


def hub_file_url(repo: str, commit: str, path: str) -> str:
    return (f"{hf_endpoint()}/datasets/{repo}/resolve/{urllib.parse.quote(commit, safe='')}/"
            f"{urllib.parse.quote(path)}")
