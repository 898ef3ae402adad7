"""Checkpoint download against a loopback HTTP server the test runs: resume, retries, errors, sha256 pinning."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from workflow_scripts import download
from workflow_scripts.common import PipelineError, sha256_file
from workflow_scripts.common import run_cli as run_in_process

REPO = Path(__file__).resolve().parents[1]
FAST = {"timeout": 5.0, "backoff": 0.01}  # retries in milliseconds, every wait bounded


def npz_bytes(seed: int, size: int = 200_000) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{"stem/kernel": np.random.default_rng(seed).standard_normal(size // 4, dtype=np.float32)})
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    """Serves server.files[path] with Range support; server.behaviour[path] injects faults.

    Behaviours: ok, error_once (503 then ok), busy_once (429 with Retry-After: 1, then ok), always_503,
    cut_once (the first body is cut), truncate (ignores Range, cuts every body), ignore_range (200 to a
    Range request), wrong_offset (a 206 that starts 7 bytes before the byte asked for).
    """

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        behaviour = srv.behaviour.get(self.path, "ok")
        data = srv.files.get(self.path)
        if data is None:
            return self.send_error(404)
        first = not srv.faulted.get(self.path)
        if behaviour == "always_503" or (behaviour == "error_once" and first):
            srv.faulted[self.path] = True
            return self.send_error(503)
        if behaviour == "busy_once" and first:
            srv.faulted[self.path] = True
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        start, rng = 0, self.headers.get("Range")
        if rng and behaviour not in ("truncate", "ignore_range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):  # RFC 9110: 416 with the current length
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if behaviour == "wrong_offset":
                start -= 7
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


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
UNRESOLVABLE = "nonexistent.invalid"


@pytest.fixture
def no_dns(monkeypatch):
    """A resolver that fails for UNRESOLVABLE at once, as one does for a .invalid name (RFC 6761): real resolvers
    may drop the query (seconds of timeouts) or answer NXDOMAIN with an address (the message check breaks).
    No proxy either: with one, the proxy resolves the name and the pipeline never sees the failure."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == UNRESOLVABLE:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener read the proxies when it was built


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
    with pytest.raises(PipelineError, match=r"HTTP 404 .* for http://127\.0\.0\.1:\d+/missing\.npz") as err:
        download.fetch(server.url + "/missing.npz", tmp_path / "m.npz", key="checkpoints.ck", **FAST)
    assert len(server.requests) == 1 and leftovers(tmp_path) == []
    assert "fix checkpoints.ck.url: point it at a local file or a mirror" in str(err.value)


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


def test_connection_refused_fails_at_once(tmp_path, capsys):
    """Nothing listens there: a retry seconds later meets the same refusal (Snakemake's rule retry remains)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PipelineError, match=f"cannot connect to http://127.0.0.1:{port}/x.npz: .*refused"):
        download.fetch(f"http://127.0.0.1:{port}/x.npz", tmp_path / "x.npz", timeout=5.0, backoff=1.0)
    assert leftovers(tmp_path) == [] and "retrying" not in capsys.readouterr().out


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


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow_scripts.download", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_writes_the_record(tmp_path):
    data = npz_bytes(8)
    (tmp_path / "up.npz").write_bytes(data)
    out, record, lock = tmp_path / "w" / "ck.npz", tmp_path / "w" / "ck.download.json", tmp_path / "weights.lock"
    url = f"file:{tmp_path / 'up.npz'}"
    proc = run_cli("--checkpoint", "ck", "--url", url, "--out", out, "--record", record, "--lock", lock,
                   "--size-mib", f"{len(data) / 2**20:.3f}")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(record.read_text())
    assert rec == {"key": "checkpoints.ck", "checkpoint": "ck", "url": url, "path": str(out), "bytes": len(data),
                   "sha256": sha256_file_of_bytes(data), "verified_against": "recorded", "seconds": rec["seconds"]}
    proc = run_cli("--checkpoint", "ck", "--url", url, "--out", tmp_path / "w" / "x.npz", "--record",
                   tmp_path / "w" / "x.json", "--lock", lock, "--sha256", "0" * 64)
    assert proc.returncode == 2 and proc.stderr.startswith("error: checkpoints.ck: ")
    assert not (tmp_path / "w" / "x.npz").exists() and not (tmp_path / "w" / "x.json").exists()


def test_unresolvable_host_fails_fast_naming_the_config_key(tmp_path, no_dns, capsys):
    """No network or a misspelt host (the resolver's failure injected: no_dns): one attempt, then the key to fix
    and the accepted url forms."""
    with pytest.raises(SystemExit) as exited:
        run_in_process(download.main, ["--checkpoint", "ck", "--url", f"http://{UNRESOLVABLE}/x.npz", "--out",
                                       str(tmp_path / "x.npz"), "--record", str(tmp_path / "x.json"), "--lock",
                                       str(tmp_path / "weights.lock")])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and f"cannot resolve the host name of http://{UNRESOLVABLE}/x.npz" in err
    assert "fix checkpoints.ck.url: point it at a local file or a mirror" in err
    for form in ("https://", "file:///", "file:relative", "plain path"):
        assert form in err, form
    assert "retrying" not in out and sorted(p.name for p in tmp_path.iterdir()) == []


def test_downloads_go_through_the_users_proxy(server, tmp_path):
    """http_proxy is honoured: the request for another host goes to the proxy (the test's server plays it; the
    suite only keeps loopback hosts off a proxy, through no_proxy)."""
    data = npz_bytes(11)
    url = f"http://{UNRESOLVABLE}/p.npz"
    server.files[url] = data  # a proxy gets the absolute URL as the request target
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    proc = run_cli("--checkpoint", "ck", "--url", url, "--out", tmp_path / "p.npz", "--record", tmp_path / "p.json",
                   "--lock", tmp_path / "weights.lock", env=dict(env, http_proxy=server.url))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.npz").read_bytes() == data and server.requests == [(url, None)]


def test_retry_after_is_honoured(server, tmp_path):
    server.files["/b.npz"], server.behaviour["/b.npz"] = npz_bytes(9), "busy_once"
    start = time.monotonic()
    download.fetch(server.url + "/b.npz", tmp_path / "b.npz", **FAST)
    assert time.monotonic() - start >= 1.0 and len(server.requests) == 2


def test_transient_errors_give_up_within_the_budget(server, tmp_path):
    server.files["/u.npz"], server.behaviour["/u.npz"] = npz_bytes(10), "always_503"
    start = time.monotonic()
    with pytest.raises(PipelineError, match=r"HTTP 503 .*gave up after \d+ attempts without progress") as err:
        download.fetch(server.url + "/u.npz", tmp_path / "u.npz", key="checkpoints.ck", timeout=5.0, backoff=0.05,
                       budget=0.5)
    assert time.monotonic() - start < 3 and 3 <= len(server.requests) <= 6
    assert "fix checkpoints.ck.url" in str(err.value) and leftovers(tmp_path) == []
    # The defaults bound a job's retrying to about a minute before Snakemake's retry of the rule.
    worst = download.RETRY_BUDGET_S + download.SOCKET_TIMEOUT_S + download.MAX_BACKOFF_S
    assert worst <= 75


def test_part_left_by_a_killed_process_is_resumed(server, tmp_path, capsys):
    data = npz_bytes(11, 1 << 20)
    server.files["/k.npz"] = data
    dest = tmp_path / "k.npz"
    (tmp_path / "k.npz.part").write_bytes(data[:300_000])
    download.fetch(server.url + "/k.npz", dest, **FAST)
    assert dest.read_bytes() == data and server.requests == [("/k.npz", "bytes=300000-")]
    assert "resuming from 300000 bytes" in capsys.readouterr().out and leftovers(tmp_path) == ["k.npz"]


def test_server_that_ignores_range_overwrites_the_part(server, tmp_path, capsys):
    data = npz_bytes(12)
    server.files["/i.npz"], server.behaviour["/i.npz"] = data, "ignore_range"
    (tmp_path / "i.npz.part").write_bytes(b"stale bytes that must not stay in front")
    download.fetch(server.url + "/i.npz", tmp_path / "i.npz", **FAST)
    assert (tmp_path / "i.npz").read_bytes() == data and len(server.requests) == 1
    assert "ignored the resume request" in capsys.readouterr().out


def test_416_complete_part_is_verified_and_too_long_part_starts_over(server, tmp_path, capsys):
    data = npz_bytes(13)
    server.files["/f.npz"] = data
    # Killed after the last byte, before the rename: the .part is the whole file; no byte is fetched again.
    (tmp_path / "a.npz.part").write_bytes(data)
    record = download.fetch(server.url + "/f.npz", tmp_path / "a.npz", **FAST)
    assert record["bytes"] == len(data) and server.requests == [("/f.npz", f"bytes={len(data)}-")]
    assert "are the whole file (HTTP 416" in capsys.readouterr().out
    # A .part longer than the file cannot be part of it: deleted, the whole file requested again.
    server.requests.clear()
    (tmp_path / "b.npz.part").write_bytes(data + b"junk")
    download.fetch(server.url + "/f.npz", tmp_path / "b.npz", **FAST)
    assert (tmp_path / "b.npz").read_bytes() == data
    assert server.requests == [("/f.npz", f"bytes={len(data) + 4}-"), ("/f.npz", None)]
    assert leftovers(tmp_path) == ["a.npz", "b.npz"]


def test_206_at_the_wrong_offset_starts_over(server, tmp_path, capsys):
    data = npz_bytes(14)
    server.files["/o.npz"], server.behaviour["/o.npz"] = data, "wrong_offset"
    (tmp_path / "o.npz.part").write_bytes(data[:1000])
    download.fetch(server.url + "/o.npz", tmp_path / "o.npz", **FAST)
    assert (tmp_path / "o.npz").read_bytes() == data
    assert server.requests == [("/o.npz", "bytes=1000-"), ("/o.npz", None)]
    assert "resumed at byte 993, not at byte 1000" in capsys.readouterr().out


def test_resumed_part_of_an_older_file_is_downloaded_again(server, tmp_path, capsys):
    """A .part from before the upstream file changed: old head + new tail fails the CRC check; one fresh try."""
    old, new = npz_bytes(15), npz_bytes(16)
    assert len(old) == len(new)
    server.files["/v.npz"] = new
    (tmp_path / "v.npz.part").write_bytes(old[: len(old) // 2])
    record = download.fetch(server.url + "/v.npz", tmp_path / "v.npz", **FAST)
    assert (tmp_path / "v.npz").read_bytes() == new and record["sha256"] == sha256_file_of_bytes(new)
    assert server.requests == [("/v.npz", f"bytes={len(old) // 2}-"), ("/v.npz", None)]
    assert "may mix two versions" in capsys.readouterr().out


def test_cifar10_download_failure_names_the_source_path_key(tmp_path, monkeypatch, no_dns):
    """torchvision's own CIFAR-10 download (prepare_data): the error says which key points at a local copy."""
    from torchvision.datasets import CIFAR10

    from workflow_scripts import prepare_data

    monkeypatch.setattr(CIFAR10, "url", f"http://{UNRESOLVABLE}/cifar-10-python.tar.gz")
    spec = {"label": "CIFAR-10", "source": {"kind": "cifar10", "path": None}, "minival": {"fraction": 0.02},
            "test_split": "test", "steps": 1, "eval_protocol": "official"}
    start = time.monotonic()
    with pytest.raises(PipelineError) as err:
        prepare_data.prepare("cifar10", spec, tmp_path / "d" / "cifar10" / "dataset.json")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert UNRESOLVABLE in message and "datasets.cifar10.source.path" in message
    assert "cifar-10-batches-py" in message and str(tmp_path / "d" / "cifar10" / "raw") in message
    assert not (tmp_path / "d" / "cifar10" / "dataset.json").exists()


def test_a_json_file_is_fetched_and_checked_under_its_own_key(tmp_path):
    """ReaL's real.json goes through the same code; what arrives must be JSON, errors name its key."""
    good, bad = tmp_path / "real.json", tmp_path / "page.html"
    good.write_text(json.dumps([[1], [], [2, 3]]))
    bad.write_text("<html>login</html>")
    key = "datasets.imagenet.real_labels"
    record = download.fetch(f"file:{good}", tmp_path / "out" / "real.json", key=key, content="json")
    assert record["sha256"] == sha256_file_of_bytes(good.read_bytes())
    with pytest.raises(PipelineError, match=rf"not JSON.*{key}\.url"):
        download.fetch(f"file:{bad}", tmp_path / "out" / "bad.json", key=key, content="json")
    assert not (tmp_path / "out" / "bad.json").exists()
