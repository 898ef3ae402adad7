"""Fetch an upstream checkpoint: resumable HTTP(S) or a local mirror, verified npz, sha256 pinned in a lock file.

python -m workflow_scripts.download --checkpoint NAME --url URL --out NPZ --record JSON --lock LOCK
    [--sha256 HEX] [--size-mib F]

URL forms: http(s)://..., file:///absolute/path, file:relative/path (relative to the working directory), or a
plain local path (a mirror on an air-gapped cluster). The file is written to OUT.part and renamed only when it
is complete and verified. sha256: a --sha256 from the config is always verified; otherwise the lock file's
entry for the URL is; with no entry, the observed sha256 is recorded there (commit the lock file to pin it).

Failures. What retrying cannot fix fails at once: a host name that does not resolve, a refused connection, an
unreachable network or host, a rejected TLS certificate, HTTP 4xx other than 408/429, a file that is not an
npz or does not match its checksum. Transient failures (timeouts, a cut connection, HTTP 5xx, 408, 429) are
retried with exponential backoff (honouring Retry-After) until RETRY_BUDGET_S seconds pass without a new byte;
then the job fails and Snakemake's `retries:` of the rule starts it again, resuming. Every final error names
the config key to fix (checkpoints.<name>.url, .sha256 or .size_mib, or the lock file).

Resuming an interrupted download (a .part left by this or an earlier, killed process; HTTP Range):
- 206 from the byte we have: appended. 200 (the server ignores Range), or 206 from byte 0: the .part is
  overwritten from byte 0. 206 from any other byte: the .part is deleted and the file requested again whole.
- 416 (nothing to send from there): if Content-Range gives the file's size and it equals the .part's, the .part
  is the whole file (a process killed before the rename) and is verified like any download; otherwise the
  .part is deleted and the file requested again whole.
- A resumed .part that fails verification (it may mix two versions of the file) is deleted and downloaded
  once more from byte 0 before the job fails.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import http.client
import json
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from workflow_scripts.common import PipelineError, read_json, run_cli, sha256_file, write_json

CHUNK = 1 << 20
# A size far from the config's size_mib means a wrong file; 10% absorbs MB-vs-MiB listings.
SIZE_TOLERANCE = 0.10
PROGRESS_EVERY_S = 10.0
# Transient failures are retried until this long passes without a new byte (plus the last attempt's socket
# timeout): an outage fails the job in about a minute, and Snakemake's retry of the rule takes over.
RETRY_BUDGET_S = 45.0
SOCKET_TIMEOUT_S = 20.0  # per connect / read, not per file
BACKOFF_S = 1.0  # first pause; doubled per failed attempt up to MAX_BACKOFF_S
MAX_BACKOFF_S = 10.0
MAX_ATTEMPTS = 10  # failed attempts in a row without a new byte
DEFAULT_KEY = "checkpoints.<name>"
URL_FORMS = ("https://host/path.npz, file:///absolute/path.npz, file:relative/path.npz (relative to the working "
             "directory) or a plain path")
# Connection errors that a retry a few seconds later would meet again: nothing listens there (a wrong host or
# port, a firewall's reject, a proxy that is not running), or there is no route (an offline node). A mirror that
# is restarting also refuses; Snakemake's retry of the rule covers that case.
PERMANENT_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH}


def url_fix(key: str) -> str:
    """The advice that ends every error a different url would fix; key is the config prefix of the checkpoint."""
    return f"fix {key}.url: point it at a local file or a mirror ({URL_FORMS})"


class _Retryable(Exception):
    """A transient failure (5xx, 408, 429, timeout, connection lost, truncated body): try again after a pause."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Permanent(Exception):
    """A failure that retrying cannot fix (DNS, refused, unreachable, HTTP 4xx): a different url can."""


class _Restart(Exception):
    """The .part could not be continued and was deleted: request the whole file again, at once."""


class _Unsatisfiable(Exception):
    """HTTP 416 to a resume request; total is the file size the server gave (Content-Range bytes */N) or None."""

    def __init__(self, total: int | None):
        super().__init__(total)
        self.total = total


def resolve_source(url: str, key: str = DEFAULT_KEY) -> tuple[str, str | Path]:
    """("http", url) for http(s) URLs, ("file", path) for file: URLs and plain local paths."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return "http", url
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise PipelineError(f"url {url}: a file URL names a local path, not host '{parsed.netloc}'; "
                                f"{url_fix(key)}")
        return "file", Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise PipelineError(f"url {url}: unsupported scheme '{parsed.scheme}'; {url_fix(key)}")
    return "file", Path(url)


# ---------------------------------------------------------------------------------------------
# Transfer


class _Progress:
    def __init__(self, label: str, done: int, total: int | None):
        self.label, self.done, self.total = label, done, total
        self.start, self.start_done = time.monotonic(), done
        self.last_print, self.last_decile = self.start, self._decile()

    def _decile(self) -> int:
        return self.done * 10 // self.total if self.total else 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._decile() != self.last_decile or now - self.last_print >= PROGRESS_EVERY_S:
            self.last_print, self.last_decile = now, self._decile()
            rate = (self.done - self.start_done) / 2**20 / max(now - self.start, 1e-9)
            of = f" of {self.total / 2**20:.1f} MiB ({100 * self.done / self.total:.0f}%)" if self.total else " MiB"
            print(f"{self.label}: {self.done / 2**20:.1f}{of}, {rate:.1f} MiB/s", flush=True)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _connection_error(url: str, reason: object) -> Exception:
    """_Permanent or _Retryable for a failure to get a response (urllib's URLError.reason or an OSError)."""
    if isinstance(reason, socket.gaierror):
        return _Permanent(f"cannot resolve the host name of {url} ({reason.strerror or reason}): no network, "
                          f"no DNS, or a misspelt host")
    if isinstance(reason, ssl.SSLCertVerificationError):
        return _Permanent(f"{url}: the server's TLS certificate was rejected ({reason.verify_message})")
    if isinstance(reason, OSError) and reason.errno in PERMANENT_ERRNOS:
        return _Permanent(f"cannot connect to {url}: {reason.strerror} (nothing accepts connections there, or "
                          f"no route: a wrong host or port, a firewall, a proxy that is down, or no network)")
    if isinstance(reason, (OSError, http.client.HTTPException)):  # timeouts, resets, a garbled status line
        return _Retryable(f"cannot connect to {url}: {reason}")
    return _Permanent(f"cannot open {url}: {reason}")


def _retry_after(headers) -> float | None:
    value = (headers or {}).get("Retry-After", "")
    return float(value) if value.strip().isdigit() else None  # the HTTP-date form is not worth parsing here


def _open(url: str, have: int, timeout: float) -> http.client.HTTPResponse:
    """The response to a GET (from byte `have` when resuming), or _Permanent/_Retryable/_Unsatisfiable."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:
            match = re.fullmatch(r"bytes \*/(\d+)", (e.headers or {}).get("Content-Range", "").strip())
            raise _Unsatisfiable(int(match[1]) if match else None) from None
        message = f"HTTP {e.code} {e.reason} for {url}"
        if e.code >= 500 or e.code in (408, 429):
            raise _Retryable(message, _retry_after(e.headers)) from None
        raise _Permanent(message) from None
    except urllib.error.URLError as e:
        raise _connection_error(url, e.reason) from None
    except (OSError, http.client.HTTPException) as e:  # while waiting for the headers
        raise _connection_error(url, e) from None


def _body_start(response: http.client.HTTPResponse) -> int | None:
    """The byte the body starts at: 0 for a 200, Content-Range's first byte for a 206 (None if unreadable)."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match[1]) if match else None


def _receive(response: http.client.HTTPResponse, url: str, part: Path, start: int) -> None:
    """Write the body into `part` from byte `start` (appending when start > 0, else overwriting)."""
    length = response.headers.get("Content-Length")
    total = start + int(length) if length is not None else None
    progress = _Progress(url, start, total)
    with open(part, "ab" if start else "wb") as f:
        try:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                progress.add(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # connection reset, timed out or cut mid-body
            raise _Retryable(f"{url}: connection lost after {progress.done} of {total} bytes ({e})") from None
    if total is not None and progress.done < total:
        raise _Retryable(f"{url}: truncated body, got {progress.done} of {total} bytes (Content-Length)")


def _http_attempt(url: str, part: Path, timeout: float) -> None:
    """One request, continuing the bytes already in `part` (see the module docstring for the cases)."""
    have = _size(part)
    try:
        response = _open(url, have, timeout)
    except _Unsatisfiable as e:
        if e.total == have:
            print(f"{url}: the {have} bytes in {part} are the whole file (HTTP 416 for more); verifying them",
                  flush=True)
            return
        part.unlink()
        raise _Restart(f"{url}: the server cannot resume at byte {have} (HTTP 416, file size {e.total}); "
                       f"requesting the whole file again") from None
    with response:
        start = _body_start(response)
        if start not in (have, 0):
            if not have:
                raise _Permanent(f"{url}: a partial response (HTTP 206, Content-Range "
                                 f"{response.headers.get('Content-Range')!r}) to a request for the whole file")
            part.unlink()
            raise _Restart(f"{url}: the server resumed at byte {start}, not at byte {have} that {part} ends at; "
                           f"requesting the whole file again")
        if have and start == 0:
            print(f"{url}: the server ignored the resume request and sent the whole file; starting over", flush=True)
        _receive(response, url, part, start)


def _download_http(url: str, part: Path, *, key: str, retries: int, timeout: float, backoff: float,
                   budget: float) -> None:
    """Retry transient failures with backoff while a new byte came in the last `budget` seconds (or fewer
    than `retries` attempts in a row brought nothing); an attempt that brings bytes resets both counts."""
    failures, kept, stalled_since = 0, _size(part), time.monotonic()
    if kept:
        print(f"{url}: resuming from {kept} bytes in {part}", flush=True)
    while True:
        try:
            return _http_attempt(url, part, timeout)
        except _Permanent as e:
            raise PipelineError(f"{e}; {url_fix(key)}") from None
        except _Restart as e:
            print(e, flush=True)
            kept = 0
        except _Retryable as e:
            size, now = _size(part), time.monotonic()
            if size > kept:  # progress: this attempt does not count against the limits
                failures, kept, stalled_since = 0, size, now
            else:
                failures += 1
            delay = max(min(backoff * 2 ** max(failures - 1, 0), MAX_BACKOFF_S), e.retry_after or 0)
            if failures > retries or now - stalled_since + delay > budget:
                keep = f"; the {size} bytes kept in {part} are resumed by a rerun" if size else ""
                wait = f"; the server asks to wait {e.retry_after:.0f} s" if e.retry_after else ""
                raise PipelineError(f"{e} (gave up after {failures} attempts without progress, "
                                    f"{now - stalled_since:.0f} s{wait}){keep}; {url_fix(key)}") from None
            print(f"{e}; retrying in {delay:.1f} s", flush=True)
            time.sleep(delay)


def _copy_local(url: str, source: Path, part: Path, key: str) -> None:
    if not source.is_file():
        raise PipelineError(f"url {url}: local file {source.resolve()} not found (relative paths are relative to "
                            f"the working directory {Path.cwd()}); {url_fix(key)}")
    total = source.stat().st_size
    progress = _Progress(str(source), 0, total)
    with open(source, "rb") as src, open(part, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            progress.add(len(chunk))


# ---------------------------------------------------------------------------------------------
# Verification


def check_npz(path: Path, url: str, key: str = DEFAULT_KEY) -> None:
    """A zip of .npy members whose CRCs check out, else an error that shows what arrived instead."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(64)
        raise PipelineError(f"{url}: what arrived is not an .npz (zip) archive ({size} bytes, starting {head!r}); "
                            f"check {key}.url (a login or error page instead of the file?)")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad_member = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise PipelineError(f"{url}: the downloaded archive is corrupt ({e}); download it again (rerun), or "
                            f"{url_fix(key)}") from None
    if not names or not all(n.endswith(".npy") for n in names):
        raise PipelineError(f"{url}: a zip archive but not an .npz (members {names[:3]}); check {key}.url")
    if bad_member is not None:
        raise PipelineError(f"{url}: member {bad_member} fails its CRC check (corrupt download); download it again "
                            f"(rerun), or {url_fix(key)}")


def check_json(path: Path, url: str, key: str = DEFAULT_KEY) -> None:
    """A JSON document (e.g. ReaL's real.json), else an error that shows what arrived instead."""
    try:
        json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        with open(path, "rb") as f:
            head = f.read(64)
        raise PipelineError(f"{url}: what arrived is not JSON ({e}; {path.stat().st_size} bytes, starting "
                            f"{head!r}); check {key}.url (a login or error page instead of the file?)") from None


CONTENT_CHECKS = {"npz": check_npz, "json": check_json}


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Exclusive access to the lock file across processes (download jobs run concurrently).

    The flock is on a sidecar file: the lock file itself is replaced atomically, which changes its inode.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path.with_name(lock_path.name + ".flock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def verify_against_lock(lock_path: Path, url: str, sha256: str, size: int, key: str = DEFAULT_KEY) -> str:
    """'lock' if the lock file's entry for url matches, 'recorded' if there was none (now there is)."""
    with locked(lock_path):
        lock = read_json(lock_path) if lock_path.exists() else {}
        if not isinstance(lock, dict):
            raise PipelineError(f"{lock_path}: expected a JSON object {{url: {{sha256, bytes, recorded_utc}}}}")
        entry = lock.get(url)
        if entry is None:
            lock[url] = {"sha256": sha256, "bytes": size,
                         "recorded_utc": datetime.now(UTC).isoformat(timespec="seconds")}
            write_json(lock_path, lock)
            print(f"{url}: sha256 {sha256} recorded in {lock_path} (commit it to pin this file)", flush=True)
            return "recorded"
    if entry.get("sha256") != sha256:
        raise PipelineError(
            f"{url}: sha256 {sha256} does not match {entry.get('sha256')} recorded in {lock_path} (config "
            f"weights_lock) on {entry.get('recorded_utc')}; the file changed upstream or the download is corrupt. "
            f"Download again; if the new file is intended, delete this url's entry from {lock_path}; or "
            f"{url_fix(key)}")
    return "lock"


def verify(path: Path, url: str, *, expected_sha256: str | None, lock_path: Path | None,
           expected_bytes: int | None, key: str = DEFAULT_KEY, content: str = "npz") -> tuple[str, str]:
    """(sha256, verified_against) of a complete file, or a PipelineError saying what is wrong."""
    CONTENT_CHECKS[content](path, url, key)
    size = path.stat().st_size
    if expected_bytes and abs(size - expected_bytes) > SIZE_TOLERANCE * expected_bytes:
        raise PipelineError(f"{url}: {size / 2**20:.2f} MiB is far from the expected {expected_bytes / 2**20:.2f} "
                            f"MiB ({key}.size_mib); a wrong file for this checkpoint? Fix {key}.url, or "
                            f"{key}.size_mib if the file is the intended one")
    sha256 = sha256_file(path)
    if expected_sha256:
        if sha256 != expected_sha256.lower():
            raise PipelineError(f"{url}: sha256 {sha256} does not match {expected_sha256.lower()} given in the "
                                f"config ({key}.sha256); download again, or fix {key}.sha256 if the file is the "
                                f"intended one, or {url_fix(key)}")
        return sha256, "config"
    if lock_path is not None:
        return sha256, verify_against_lock(Path(lock_path), url, sha256, size, key)
    return sha256, "recorded"


def _transfer(url: str, dest: Path, checks: dict, http_options: dict) -> tuple[str, str]:
    """Download or copy url into dest's .part, verify it, rename it onto dest; (sha256, verified_against)."""
    kind, source = resolve_source(url, checks["key"])
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        resumed = kind == "http" and _size(part) > 0
        if kind == "http":
            _download_http(url, part, key=checks["key"], **http_options)
        else:
            _copy_local(url, source, part, checks["key"])
        try:
            verified = verify(part, url, **checks)
        except PipelineError as e:
            part.unlink()  # complete but wrong: resuming it would not help
            if not resumed:
                raise
            print(f"{e}\n{part} was resumed from an earlier attempt and may mix two versions of the file; "
                  f"downloading it again from byte 0", flush=True)
            continue
        os.replace(part, dest)
        return verified


def fetch(url: str, dest: str | os.PathLike, *, expected_sha256: str | None = None,
          lock_path: str | os.PathLike | None = None, expected_bytes: int | None = None, key: str = DEFAULT_KEY,
          content: str = "npz", retries: int = MAX_ATTEMPTS, timeout: float = SOCKET_TIMEOUT_S,
          backoff: float = BACKOFF_S,
          budget: float = RETRY_BUDGET_S) -> dict:
    """Download (or copy) url to dest, verified; returns the download record (without "checkpoint").

    key is the config prefix of what is fetched (checkpoints.<name>, datasets.<name>.real_labels); errors
    name its fields (.url, .sha256, .size_mib). content says what the file must be: "npz" or "json".
    """
    start = time.perf_counter()
    dest = Path(dest)
    if expected_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256):
        raise PipelineError(f"sha256 {expected_sha256!r} is not 64 hex digits; fix {key}.sha256")
    checks = {"expected_sha256": expected_sha256, "lock_path": lock_path, "expected_bytes": expected_bytes,
              "key": key, "content": content}
    verified = None
    if dest.exists():
        try:
            verified = verify(dest, url, **checks)
            print(f"{dest} is already there and verifies ({verified[1]}); not downloading again", flush=True)
        except PipelineError as e:
            print(f"{dest} is already there but does not verify ({e}); downloading again", flush=True)
            dest.unlink()
    if verified is None:
        http_options = {"retries": retries, "timeout": timeout, "backoff": backoff, "budget": budget}
        verified = _transfer(url, dest, checks, http_options)
    sha256, verified_against = verified
    return {"url": url, "path": str(dest), "bytes": dest.stat().st_size, "sha256": sha256,
            "verified_against": verified_against, "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.download", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="checkpoint name (config checkpoints.<name>): an .npz")
    what.add_argument("--key", help="config prefix of another file to fetch, e.g. datasets.imagenet.real_labels")
    ap.add_argument("--content", choices=sorted(CONTENT_CHECKS), default="npz", help="what the file must be")
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", required=True, help="the file to write")
    ap.add_argument("--record", required=True, help="download record to write (.json)")
    ap.add_argument("--lock", required=True, help="lock file of observed sha256 per url (config weights_lock)")
    ap.add_argument("--sha256", help="expected sha256 (config <key>.sha256)")
    ap.add_argument("--size-mib", type=float, help="expected size (config <key>.size_mib)")
    args = ap.parse_args(argv)
    expected_bytes = round(args.size_mib * 2**20) if args.size_mib else None
    key = f"checkpoints.{args.checkpoint}" if args.checkpoint else args.key
    content = "npz" if args.checkpoint else args.content
    try:
        record = fetch(args.url, args.out, expected_sha256=args.sha256, lock_path=args.lock,
                       expected_bytes=expected_bytes, key=key, content=content)
    except PipelineError as e:
        raise PipelineError(f"{key}: {e}") from None
    write_json(args.record, {"key": key, "checkpoint": args.checkpoint, **record})
    print(f"{args.out}: {record['bytes'] / 2**20:.2f} MiB, sha256 {record['sha256']} "
          f"({record['verified_against']}), {record['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
