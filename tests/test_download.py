"""Checkpoint download against a loopback HTTP server the test runs: resume, retries, errors, sha256 pinning."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from workflow_scripts import download
from workflow_scripts.common import PipelineError, sha256_file

REPO = Path(__file__).resolve().parents[1]
FAST = {"timeout": 5.0, "backoff": 0.01}  # retries in milliseconds, every wait bounded


def npz_bytes(seed: int, size: int = 200_000) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{"stem/kernel": np.random.default_rng(seed).standard_normal(size // 4, dtype=np.float32)})
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    """Serves server.files[path] with Range support; server.behaviour[path] injects faults."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        behaviour = srv.behaviour.get(self.path, "ok")
        data = srv.files.get(self.path)
        if data is None:
            return self.send_error(404)
        if behaviour == "error_once" and not srv.faulted.get(self.path):
            srv.faulted[self.path] = True
            return self.send_error(503)
        start, rng = 0, self.headers.get("Range")
        if rng and behaviour != "truncate":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = behaviour == "truncate" or (behaviour == "cut_once" and not srv.faulted.get(self.path))
        if cut:  # promise the whole body, send part of it, close
            srv.faulted[self.path] = True
            body = body[: len(body) // 3]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.behaviour, srv.faulted, srv.requests = {}, {}, {}, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".npz", ".part"))


def test_resumes_after_a_cut_connection_and_records_the_sha(server, tmp_path, capsys):
    data = npz_bytes(0, 3 << 20)
    server.files["/ckpt.npz"], server.behaviour["/ckpt.npz"] = data, "cut_once"
    dest, lock = tmp_path / "w" / "ckpt.npz", tmp_path / "weights.lock"
    record = download.fetch(server.url + "/ckpt.npz", dest, lock_path=lock, **FAST)
    assert dest.read_bytes() == data and leftovers(dest.parent) == ["ckpt.npz"]
    first_cut = len(data) // 3
    assert server.requests == [("/ckpt.npz", None), ("/ckpt.npz", f"bytes={first_cut}-")]
    sha = sha256_file(dest)
    assert record == {"url": server.url + "/ckpt.npz", "path": str(dest), "bytes": len(data), "sha256": sha,
                      "verified_against": "recorded", "seconds": record["seconds"]}
    entry = json.loads(lock.read_text())[server.url + "/ckpt.npz"]
    assert entry["sha256"] == sha and entry["bytes"] == len(data) and entry["recorded_utc"]
    out = capsys.readouterr().out
    assert "truncated body" in out and "retrying" in out and "MiB (100%)" in out

    # A later run finds the file in place, checks it against the lock and does not download again.
    again = download.fetch(server.url + "/ckpt.npz", dest, lock_path=lock, **FAST)
    assert again["verified_against"] == "lock" and len(server.requests) == 2


def test_changed_upstream_file_fails_against_the_lock(server, tmp_path):
    url, lock = server.url + "/ckpt.npz", tmp_path / "weights.lock"
    server.files["/ckpt.npz"] = npz_bytes(1)
    old = download.fetch(url, tmp_path / "a.npz", lock_path=lock, **FAST)["sha256"]
    server.files["/ckpt.npz"] = npz_bytes(2)
    with pytest.raises(PipelineError) as err:
        download.fetch(url, tmp_path / "b.npz", lock_path=lock, **FAST)
    new = sha256_file_of_bytes(server.files["/ckpt.npz"])
    assert old in str(err.value) and new in str(err.value) and str(lock) in str(err.value)
    assert "delete this url's entry" in str(err.value)
    assert leftovers(tmp_path) == ["a.npz"]
    # An existing file that no longer verifies is fetched again (and fails the same way).
    (tmp_path / "a.npz").write_bytes(server.files["/ckpt.npz"])
    with pytest.raises(PipelineError, match="does not match"):
        download.fetch(url, tmp_path / "a.npz", lock_path=lock, **FAST)
    assert leftovers(tmp_path) == []


def sha256_file_of_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_config_sha256_is_always_verified(server, tmp_path):
    data = npz_bytes(3)
    server.files["/c.npz"] = data
    good, bad = sha256_file_of_bytes(data), "ab" * 32
    lock = tmp_path / "weights.lock"
    with pytest.raises(PipelineError) as err:
        download.fetch(server.url + "/c.npz", tmp_path / "c.npz", expected_sha256=bad, lock_path=lock, **FAST)
    assert good in str(err.value) and bad in str(err.value) and "given in the config" in str(err.value)
    assert leftovers(tmp_path) == [] and not lock.exists()
    record = download.fetch(server.url + "/c.npz", tmp_path / "c.npz", expected_sha256=good.upper(),
                            lock_path=lock, **FAST)
    assert record["verified_against"] == "config"
    with pytest.raises(PipelineError, match="not 64 hex digits"):
        download.fetch(server.url + "/c.npz", tmp_path / "d.npz", expected_sha256="123", **FAST)


def test_http_404_is_not_retried(server, tmp_path):
    with pytest.raises(PipelineError, match=r"HTTP 404 .* for http://127\.0\.0\.1:\d+/missing\.npz"):
        download.fetch(server.url + "/missing.npz", tmp_path / "m.npz", retries=3, **FAST)
    assert len(server.requests) == 1 and leftovers(tmp_path) == []


def test_server_error_is_retried(server, tmp_path):
    server.files["/e.npz"], server.behaviour["/e.npz"] = npz_bytes(4), "error_once"
    record = download.fetch(server.url + "/e.npz", tmp_path / "e.npz", **FAST)
    assert record["bytes"] == len(server.files["/e.npz"]) and len(server.requests) == 2


def test_truncated_body_gives_up_with_bytes_got_and_expected(server, tmp_path):
    data = npz_bytes(5)
    server.files["/t.npz"], server.behaviour["/t.npz"] = data, "truncate"
    with pytest.raises(PipelineError) as err:
        download.fetch(server.url + "/t.npz", tmp_path / "t.npz", retries=2, **FAST)
    assert f"got {len(data) // 3} of {len(data)} bytes (Content-Length)" in str(err.value)
    # The first attempt brought bytes (progress); then retries=2 means 3 attempts that bring nothing new.
    assert "gave up after 3 attempts without progress" in str(err.value)
    assert len(server.requests) == 4 and not (tmp_path / "t.npz").exists()


def test_connection_refused(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PipelineError, match=f"cannot connect to http://127.0.0.1:{port}/x.npz: .*refused"):
        download.fetch(f"http://127.0.0.1:{port}/x.npz", tmp_path / "x.npz", retries=1, **FAST)
    assert leftovers(tmp_path) == []


def test_a_web_page_is_not_an_npz(server, tmp_path):
    server.files["/page.npz"] = b"<html><body>Sign in to continue</body></html>"
    with pytest.raises(PipelineError, match=r"not an \.npz \(zip\) archive .*Sign in"):
        download.fetch(server.url + "/page.npz", tmp_path / "p.npz", **FAST)
    assert leftovers(tmp_path) == []


def test_size_far_from_the_config_is_an_error(server, tmp_path):
    server.files["/s.npz"] = data = npz_bytes(6)
    with pytest.raises(PipelineError, match="far from the expected"):
        download.fetch(server.url + "/s.npz", tmp_path / "s.npz", expected_bytes=3 * len(data), **FAST)
    assert leftovers(tmp_path) == []
    record = download.fetch(server.url + "/s.npz", tmp_path / "s.npz", expected_bytes=int(len(data) * 1.05), **FAST)
    assert record["bytes"] == len(data)


def test_local_sources_file_urls_and_plain_paths(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = npz_bytes(7)
    (mirror / "m.npz").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    lock = tmp_path / "weights.lock"
    for i, url in enumerate([(mirror / "m.npz").as_uri(), "file:mirror/m.npz", "mirror/m.npz",
                             str(mirror / "m.npz")]):
        download.fetch(url, tmp_path / "w" / f"{i}.npz", lock_path=lock)
        assert (tmp_path / "w" / f"{i}.npz").read_bytes() == data, url
    assert set(json.loads(lock.read_text())) == {(mirror / "m.npz").as_uri(), "file:mirror/m.npz",
                                                 "mirror/m.npz", str(mirror / "m.npz")}
    with pytest.raises(PipelineError, match="local file .*absent.npz not found"):
        download.fetch("file:mirror/absent.npz", tmp_path / "w" / "a.npz")
    with pytest.raises(PipelineError, match="unsupported scheme 'ftp'"):
        download.fetch("ftp://host/x.npz", tmp_path / "w" / "f.npz")
    assert leftovers(tmp_path / "w") == ["0.npz", "1.npz", "2.npz", "3.npz"]


def test_concurrent_jobs_all_land_in_the_lock(tmp_path):
    lock = tmp_path / "weights.lock"
    urls = [f"https://example.org/{i}.npz" for i in range(8)]
    threads = [threading.Thread(target=download.verify_against_lock, args=(lock, url, f"{i:064x}", i))
               for i, url in enumerate(urls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(json.loads(lock.read_text())) == sorted(urls)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow_scripts.download", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_the_record(tmp_path):
    data = npz_bytes(8)
    (tmp_path / "up.npz").write_bytes(data)
    out, record, lock = tmp_path / "w" / "ck.npz", tmp_path / "w" / "ck.download.json", tmp_path / "weights.lock"
    url = f"file:{tmp_path / 'up.npz'}"
    proc = run_cli("--checkpoint", "ck", "--url", url, "--out", out, "--record", record, "--lock", lock,
                   "--size-mib", f"{len(data) / 2**20:.3f}")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(record.read_text())
    assert rec == {"checkpoint": "ck", "url": url, "path": str(out), "bytes": len(data),
                   "sha256": sha256_file_of_bytes(data), "verified_against": "recorded", "seconds": rec["seconds"]}
    proc = run_cli("--checkpoint", "ck", "--url", url, "--out", tmp_path / "w" / "x.npz", "--record",
                   tmp_path / "w" / "x.json", "--lock", lock, "--sha256", "0" * 64)
    assert proc.returncode == 2 and proc.stderr.startswith("error: checkpoint ck (config checkpoints.ck):")
    assert not (tmp_path / "w" / "x.npz").exists() and not (tmp_path / "w" / "x.json").exists()
