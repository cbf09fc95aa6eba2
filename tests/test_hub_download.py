"""`picochat data download` / `data verify` against a real HTTP server on 127.0.0.1 that speaks the Hugging Face
Hub's API: revision -> commit, the paginated tree listing, paths-info, and resolve URLs that redirect to a CDN."""

import hashlib
import io
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import cli
from picochat.config import UserError
from picochat.data.download import git_blob_sha1
from picochat.data.shards import download, iter_texts, list_shards, verify

CLIMBMIX = "karpathy/climbmix-400b-shuffle"
FAST = dict(backoff=0.0, timeout=5.0, progress=False)


def parquet_bytes(tag: str, n: int = 30, column: str = "text") -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({column: [f"{tag} document {i}" for i in range(n)]}), buf)
    return buf.getvalue()


class HubServer:
    """repos[repo] = {"commits": {sha: {path: bytes}}, "main": sha, "plain": {paths stored in git, not LFS}}.
    `corrupt[path]` = how many more downloads of that path get one flipped byte. `log` holds (method, path)."""

    PAGE = 2  # tree entries per page, so that pagination is exercised

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.corrupt: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []
        self.not_json = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, obj, headers=()):
                body = b"<html>oops</html>" if hub.not_json else json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _entry(self, repo, path, data):
                e = {"type": "file", "path": path, "size": len(data),
                     "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                if path not in hub.repos[repo].get("plain", ()):
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                return e

            def _commit(self, repo, rev):
                r = hub.repos.get(repo)
                if r is None:
                    return None
                rev = urllib.parse.unquote(rev)
                sha = r["main"] if rev == "main" else rev
                return sha if sha in r["commits"] else None

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                hub.log.append(("GET", url.path))
                parts = url.path.split("/")
                if url.path.startswith("/api/datasets/") and parts[5] == "revision":
                    repo = f"{parts[3]}/{parts[4]}"
                    sha = self._commit(repo, parts[6])
                    return self._json({"id": repo, "sha": sha}) if sha else self.send_error(404)
                if url.path.startswith("/api/datasets/") and parts[5] == "tree":
                    repo = f"{parts[3]}/{parts[4]}"
                    sha = self._commit(repo, parts[6])
                    if sha is None:
                        return self.send_error(404)
                    files = hub.repos[repo]["commits"][sha]
                    entries = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": "data"}]
                    entries += [self._entry(repo, p, d) for p, d in sorted(files.items())]
                    q = urllib.parse.parse_qs(url.query)
                    assert q["recursive"] == ["true"] and q["expand"] == ["false"]
                    start = int(q.get("cursor", ["0"])[0])
                    page = entries[start:start + HubServer.PAGE]
                    headers = []
                    if start + HubServer.PAGE < len(entries):
                        nxt = f"{url.path}?recursive=true&expand=false&cursor={start + HubServer.PAGE}"
                        headers.append(("Link", f'<{hub.url}{nxt}>; rel="next"'))
                    return self._json(page, headers)
                if url.path.startswith("/datasets/") and parts[4] == "resolve":
                    # like the hub: the resolve URL redirects to a content host
                    self.send_response(302)
                    self.send_header("Location", "/cdn/" + "/".join(parts[2:4] + parts[5:]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if url.path.startswith("/cdn/"):
                    repo, sha, path = f"{parts[2]}/{parts[3]}", self._commit(f"{parts[2]}/{parts[3]}", parts[4]), \
                        urllib.parse.unquote("/".join(parts[5:]))
                    files = hub.repos[repo]["commits"].get(sha, {}) if sha else {}
                    if path not in files:
                        return self.send_error(404)
                    data = files[path]
                    if hub.corrupt.get(path, 0) > 0:
                        hub.corrupt[path] -= 1
                        data = data[:-20] + bytes([data[-20] ^ 1]) + data[-19:]  # footer intact, bytes differ
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_error(404)

            def do_POST(self):
                url = urllib.parse.urlsplit(self.path)
                hub.log.append(("POST", url.path))
                parts = url.path.split("/")
                n = int(self.headers.get("Content-Length", 0))
                form = urllib.parse.parse_qs(self.rfile.read(n).decode())
                repo = f"{parts[3]}/{parts[4]}"
                sha = self._commit(repo, parts[6]) if parts[5] == "paths-info" else None
                if sha is None:
                    return self.send_error(404)
                files = hub.repos[repo]["commits"][sha]
                self._json([self._entry(repo, p, files[p]) for p in form.get("paths", []) if p in files])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, repo: str, files: dict[str, bytes], commit: str | None = None, plain=()) -> str:
        commit = commit or hashlib.sha1(repo.encode() + str(len(self.repos)).encode()).hexdigest()
        r = self.repos.setdefault(repo, {"commits": {}, "plain": set()})
        r["commits"][commit] = files
        r["main"] = commit
        r["plain"] |= set(plain)
        return commit

    def gets(self, fragment: str) -> int:
        return sum(1 for m, p in self.log if m == "GET" and p.startswith("/cdn/") and p.endswith(fragment))


@pytest.fixture
def hub(monkeypatch):
    h = HubServer()
    monkeypatch.setenv("PICOCHAT_HF_ENDPOINT", h.url)
    yield h
    h.httpd.shutdown()
    h.httpd.server_close()


def climbmix(hub, n=3):
    files = {f"shard_{i:05d}.parquet": parquet_bytes(f"climb{i}") for i in list(range(n)) + [6542]}
    return files, hub.add(CLIMBMIX, files)


def test_climbmix_default_checked_pinned_and_usable(hub, tmp_path):
    files, commit = climbmix(hub)
    s = download(2, **FAST)  # default source and folder: PICOCHAT_HOME/data/climbmix
    out = tmp_path / "picochat_home" / "data" / "climbmix"
    assert s["out"] == str(out) and s["downloaded"] == 3 and s["revision"] == commit
    m = json.loads((out / "manifest.json").read_text())
    assert m["repo"] == CLIMBMIX and m["revision"] == commit and m["source"] == "climbmix"
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"):
        assert m["files"][name]["sha256"] == hashlib.sha256(files[name]).hexdigest()
        assert (out / name).read_bytes() == files[name]
    assert ("POST", f"/api/datasets/{CLIMBMIX}/paths-info/{commit}") in hub.log  # one listing call, pinned sha
    assert all(commit in p for m_, p in hub.log if p.startswith("/cdn/"))
    # the rest of the pipeline reads them: the host's val shard sorts last, the `text` column is there
    train, val = list_shards(out)
    assert [p.name for p in val] == ["shard_06542.parquet"] and len(train) == 2
    assert next(iter_texts(train)) == "climb0 document 0"
    # a rerun re-hashes and downloads nothing; a new upload on main does not move the pinned folder
    hub.add(CLIMBMIX, {k: parquet_bytes("new" + k) for k in files}, commit="f" * 40)
    n = len(hub.log)
    s = download(2, **FAST)
    assert s["downloaded"] == 0 and s["skipped"] == 3 and s["revision"] == commit
    assert not [p for _, p in hub.log[n:] if p.startswith("/cdn/")]
    assert verify(out) == []
    # the pinned commit vanished from the hub (history rewritten): the error says how to move on
    hub.repos[CLIMBMIX]["commits"]["e" * 40] = hub.repos[CLIMBMIX]["commits"].pop(commit)
    with pytest.raises(UserError, match=r"pinned in .*manifest\.json; pass --revision main"):
        download(2, **FAST)
    hub.repos[CLIMBMIX]["commits"][commit] = hub.repos[CLIMBMIX]["commits"].pop("e" * 40)
    # --revision main moves it: every file differs, so all are fetched again and the manifest follows
    s = download(2, revision="main", **FAST)
    assert s["downloaded"] == 3 and s["revision"] == "f" * 40
    assert verify(out) == []


def test_mismatch_refetches_once_then_one_clear_error(hub, tmp_path):
    files, _ = climbmix(hub)
    out = tmp_path / "d"
    hub.corrupt["shard_00001.parquet"] = 1
    download(2, out, **FAST)
    assert hub.gets("shard_00001.parquet") == 2 and verify(out) == []
    hub.corrupt["shard_00002.parquet"] = 99
    with pytest.raises(UserError) as e:
        download(3, out, retries=5, **FAST)
    msg = str(e.value)
    assert "\n" not in msg and "shard_00002.parquet" in msg and "sha256 mismatch" in msg and "two downloads" in msg
    assert hub.gets("shard_00002.parquet") == 2  # deleted, fetched again, then the error (not 6 tries)
    assert not (out / "shard_00002.parquet").exists() and not (out / "shard_00002.parquet.part").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["files"]) == {"shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"}
    assert (out / "shard_00000.parquet").read_bytes() == files["shard_00000.parquet"]  # the good ones stay


def test_tampered_file_is_replaced_and_verify_reports_it(hub, tmp_path, capsys):
    files, _ = climbmix(hub)
    out = tmp_path / "d"
    download(2, out, **FAST)
    p0, p1 = out / "shard_00000.parquet", out / "shard_00001.parquet"
    raw = bytearray(p0.read_bytes())
    raw[-20] ^= 1  # same size, footer intact: only a checksum notices
    p0.write_bytes(bytes(raw))
    p1.unlink()
    (out / "shard_00003.parquet").write_bytes(files["shard_00002.parquet"])  # not downloaded: unlisted
    bad = verify(out)
    assert len(bad) == 3
    assert any(line.startswith(f"{p0}: sha256 ") for line in bad)
    assert any(line.startswith(f"{p1}: missing") for line in bad)
    assert any("shard_00003.parquet: a shard the manifest does not list" in line for line in bad)
    assert cli.main(["data", "verify", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("Traceback" not in line for line in err)
    (out / "shard_00003.parquet").unlink()
    s = download(2, out, **FAST)  # the edited file is deleted and fetched again, the missing one too
    assert s["downloaded"] == 2 and p0.read_bytes() == files["shard_00000.parquet"]
    assert cli.main(["data", "verify", str(out)]) == 0
    assert "matches its manifest" in capsys.readouterr().out


def test_fineweb_and_any_hf_dataset(hub, tmp_path):
    fw = {f"shard_{i:05d}.parquet": parquet_bytes(f"fw{i}") for i in (0, 1822)}
    hub.add("karpathy/fineweb-edu-100b-shuffle", fw)
    download(1, source="fineweb-edu", **FAST)
    out = tmp_path / "picochat_home" / "data" / "fineweb-edu"
    assert [p.name for p in list_shards(out)[1]] == ["shard_01822.parquet"]

    files = {f"data/train-0000{i}-of-00004.parquet": parquet_bytes(f"hf{i}") for i in range(4)}
    files["data/validation-00000-of-00001.parquet"] = parquet_bytes("val", n=5)
    files["README.md"] = b"# card\n"
    files["data/train-00001-of-00004.parquet"] = parquet_bytes("small", n=2)  # stored in git: checked by sha1
    commit = hub.add("someone/corpus", files, plain={"data/train-00001-of-00004.parquet", "README.md"})
    s = download(2, tmp_path / "hf", source="hf:someone/corpus", **FAST)
    assert s["downloaded"] == 3
    m = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert m["files"]["shard_00000.parquet"]["path"] == "data/train-00000-of-00004.parquet"
    assert m["files"]["shard_00001.parquet"]["git_sha1"] == git_blob_sha1(tmp_path / "hf" / "shard_00001.parquet")
    assert m["files"]["shard_00004.parquet"]["path"] == "data/validation-00000-of-00001.parquet"
    assert sum(1 for _, p in hub.log if "/tree/" in p) >= 3  # followed the Link pages
    train, val = list_shards(tmp_path / "hf")
    assert list(iter_texts(val)) == [f"val document {i}" for i in range(5)]
    assert verify(tmp_path / "hf") == []
    with pytest.raises(UserError, match=r"--shards 5: someone/corpus has 4 train"):
        download(5, tmp_path / "hf", source="hf:someone/corpus", **FAST)
    # a folder of one dataset refuses another one
    assert m["revision"] == commit
    climbmix(hub)
    with pytest.raises(UserError, match=r"holds shards of someone/corpus, not karpathy/climbmix"):
        download(1, tmp_path / "hf", **FAST)


def test_bad_input_is_one_line(hub, tmp_path, capsys):
    with pytest.raises(UserError, match=r"--source hf:\.\./x: expected hf:OWNER/NAME"):
        download(1, tmp_path / "a", source="hf:../x", **FAST)
    with pytest.raises(UserError, match=r"--source nope: expected climbmix, fineweb-edu or hf:OWNER/NAME"):
        download(1, tmp_path / "a", source="nope", **FAST)
    with pytest.raises(UserError, match=r"dataset someone/missing@main: HTTP 404 .*no such dataset"):
        download(1, tmp_path / "a", source="hf:someone/missing", **FAST)
    climbmix(hub)
    with pytest.raises(UserError, match=r"--shards 0: must be >= 1"):
        download(0, tmp_path / "a", **FAST)
    with pytest.raises(UserError, match=r"--shards 6543: climbmix has 6542 train shards"):
        download(6543, tmp_path / "a", **FAST)
    with pytest.raises(UserError, match=r"has no shard_00003\.parquet"):
        download(4, tmp_path / "a", **FAST)
    with pytest.raises(UserError, match=r"revision/v9.*no such dataset or revision"):
        download(1, tmp_path / "a", revision="v9", **FAST)
    # a dataset without a `text` column: one error, no retries, nothing left behind
    hub.add("someone/notext", {f"d/{i}.parquet": parquet_bytes("x", column="content") for i in range(3)})
    with pytest.raises(UserError, match=r"no 'text' column.*picochat data prepare .*--text-field"):
        download(1, tmp_path / "b", source="hf:someone/notext", retries=3, **FAST)
    assert hub.gets("d/0.parquet") == 1 and not list((tmp_path / "b").glob("shard_*"))
    # a host that is not a hub
    hub.not_json = True
    with pytest.raises(UserError, match=r"did not answer JSON.*PICOCHAT_HF_ENDPOINT"):
        download(1, tmp_path / "c", **FAST)
    hub.not_json = False
    # verify of folders that were not downloaded
    with pytest.raises(UserError, match="no such folder"):
        verify(tmp_path / "nowhere")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text("{not json")
    assert cli.main(["data", "verify", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no readable manifest.json" in err
    # the CLI: one line, exit 2, for a bad --source
    assert cli.main(["data", "download", "--shards", "1", "--source", "hf:bad name"]) == 2
    assert "expected hf:OWNER/NAME" in capsys.readouterr().err


def test_cli_download_default_source(hub, tmp_path, capsys):
    climbmix(hub, n=1)
    assert cli.main(["data", "download", "--shards", "1", "--out", str(tmp_path / "o"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 downloaded" in out and "sha256 checked" in out
    assert cli.main(["data", "verify", str(tmp_path / "o")]) == 0
