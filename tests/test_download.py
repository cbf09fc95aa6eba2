"""The downloader against a real ThreadingHTTPServer on 127.0.0.1 with injected faults."""

import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.config import UserError
from picochat.data.download import download_file, download_many


class FaultServer:
    """Serves `files` (name -> bytes). `faults[name]` is a list of per-request actions consumed in order:
    "drop" (send half the body then close), "500", "ignore_range" (answer 200 to a Range request); afterwards
    requests are served normally. Every request's Range header is recorded in `log`."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self.log: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.log.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                fault = server.faults.get(name, [])
                action = fault.pop(0) if fault else None
                if action == "500":
                    self.send_error(500)
                    return
                start = 0
                if rng and action != "ignore_range":
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


FAST = dict(backoff=0.0, timeout=5.0, progress=False)


def _parquet_bytes(n=200) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(n)]}), buf)
    return buf.getvalue()


def _check_parquet(path):
    pq.ParquetFile(path).metadata


def test_plain_download_and_sha(server, tmp_path):
    data = bytes(range(256)) * 4000
    server.files["a.bin"] = data
    dest = download_file(f"{server.url}/a.bin", tmp_path / "a.bin", sha256=hashlib.sha256(data).hexdigest(), **FAST)
    assert dest.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    # Idempotent: an existing valid file is not fetched again.
    n = len(server.log)
    download_file(f"{server.url}/a.bin", dest, sha256=hashlib.sha256(data).hexdigest(), **FAST)
    assert len(server.log) == n


def test_drop_mid_file_resumes_with_range(server, tmp_path):
    data = b"x" * 3_000_000 + b"y" * 1_000_000
    server.files["big.bin"] = data
    server.faults["big.bin"] = ["drop"]
    dest = download_file(f"{server.url}/big.bin", tmp_path / "big.bin", **FAST)
    assert dest.read_bytes() == data
    ranges = [r for n, r in server.log if n == "big.bin"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1].split("=")[1].rstrip("-")) > 0


def test_500_then_success(server, tmp_path):
    server.files["f.bin"] = b"hello" * 1000
    server.faults["f.bin"] = ["500", "500"]
    dest = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", **FAST)
    assert dest.read_bytes() == b"hello" * 1000
    assert len(server.log) == 3


def test_404_is_a_clear_error(server, tmp_path):
    with pytest.raises(UserError, match=r"missing\.bin: HTTP 404"):
        download_file(f"{server.url}/missing.bin", tmp_path / "m.bin", **FAST)
    assert len(server.log) == 1  # not retried
    assert not (tmp_path / "m.bin").exists()


def test_unreachable_host(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(UserError, match=rf"127\.0\.0\.1:{port}/x.bin: download failed after 3 attempts"):
        download_file(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", retries=2, **FAST)
    assert not (tmp_path / "x.bin").exists()


def test_exhausted_retries_keep_part_for_resume(server, tmp_path):
    data = b"z" * 2_000_000
    server.files["z.bin"] = data
    server.faults["z.bin"] = ["drop", "500", "500"]
    with pytest.raises(UserError, match="after 3 attempts"):
        download_file(f"{server.url}/z.bin", tmp_path / "z.bin", retries=2, **FAST)
    assert not (tmp_path / "z.bin").exists()
    part = tmp_path / "z.bin.part"
    assert 0 < part.stat().st_size < len(data)
    # A later run resumes the .part with a Range request instead of starting over.
    download_file(f"{server.url}/z.bin", tmp_path / "z.bin", **FAST)
    assert (tmp_path / "z.bin").read_bytes() == data
    assert server.log[-1][1] == f"bytes={len(data) // 2}-"


def test_server_ignoring_range_restarts(server, tmp_path):
    data = bytes(range(256)) * 10000
    server.files["r.bin"] = data
    (tmp_path / "r.bin.part").write_bytes(data[:1000])
    server.faults["r.bin"] = ["ignore_range"]
    dest = download_file(f"{server.url}/r.bin", tmp_path / "r.bin", **FAST)
    assert dest.read_bytes() == data


def test_truncated_parquet_rejected(server, tmp_path):
    good = _parquet_bytes()
    server.files["bad.parquet"] = good[: len(good) - 100]
    with pytest.raises(UserError, match="invalid file"):
        download_file(f"{server.url}/bad.parquet", tmp_path / "bad.parquet", retries=1, validator=_check_parquet,
                      **FAST)
    assert not (tmp_path / "bad.parquet").exists()
    assert not (tmp_path / "bad.parquet.part").exists()
    server.files["good.parquet"] = good
    dest = download_file(f"{server.url}/good.parquet", tmp_path / "good.parquet", validator=_check_parquet, **FAST)
    assert pq.read_table(dest).num_rows == 200


def test_sha256_mismatch(server, tmp_path):
    server.files["s.bin"] = b"abc" * 100
    with pytest.raises(UserError, match="sha256 mismatch"):
        download_file(f"{server.url}/s.bin", tmp_path / "s.bin", sha256="0" * 64, retries=1, **FAST)
    assert not (tmp_path / "s.bin").exists()


def test_disk_full_is_clear(server, tmp_path, monkeypatch):
    import errno
    import builtins

    server.files["d.bin"] = b"q" * 100_000
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if str(path).endswith(".part") and "b" in mode and ("w" in mode or "a" in mode) else f

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(UserError, match="disk full"):
        download_file(f"{server.url}/d.bin", tmp_path / "d.bin", **FAST)
    assert not (tmp_path / "d.bin").exists()


def test_download_many(server, tmp_path):
    for i in range(5):
        server.files[f"{i}.bin"] = bytes([i]) * 50_000
    server.faults["2.bin"] = ["drop"]
    paths = download_many([(f"{server.url}/{i}.bin", tmp_path / f"{i}.bin") for i in range(5)], workers=3, **FAST)
    assert [p.read_bytes() for p in paths] == [bytes([i]) * 50_000 for i in range(5)]
    with pytest.raises(UserError, match="1 of 2 downloads failed.*nope.bin"):
        download_many([(f"{server.url}/0.bin", tmp_path / "again.bin"), (f"{server.url}/nope.bin", tmp_path / "n")],
                      workers=2, **FAST)
    assert (tmp_path / "again.bin").exists()
