"""Fetch an upstream checkpoint: resumable HTTP(S) or a local mirror, verified npz, sha256 pinned in a lock file.

python -m workflow_scripts.download --checkpoint NAME --url URL --out NPZ --record JSON --lock LOCK
    [--sha256 HEX] [--size-mib F]

URL forms: http(s)://..., file:///absolute/path, file:relative/path (relative to the working directory), or a
plain local path (a mirror on an air-gapped cluster). The file is written to OUT.part and renamed only when it
is complete and verified; an interrupted HTTP download resumes from the .part file (HTTP Range).
sha256: a --sha256 from the config is always verified; otherwise the lock file's entry for the URL is; with
no entry, the observed sha256 is recorded there (commit the lock file to pin it).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from workflow_scripts.common import PipelineError, read_json, run_cli, sha256_file, write_json

CHUNK = 1 << 20
# A size far from the config's size_mib means a wrong file; 10% absorbs MB-vs-MiB listings.
SIZE_TOLERANCE = 0.10
PROGRESS_EVERY_S = 10.0


class _Retryable(Exception):
    """A transient failure (5xx, connection lost or refused, truncated body): try again after a pause."""


def resolve_source(url: str) -> tuple[str, str | Path]:
    """("http", url) for http(s) URLs, ("file", path) for file: URLs and plain local paths."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return "http", url
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise PipelineError(f"url {url}: file URLs name a local path (file:///abs or file:relative)")
        return "file", Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise PipelineError(f"url {url}: unsupported scheme '{parsed.scheme}' (use http(s)://, file: or a path)")
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


def _http_attempt(url: str, part: Path, timeout: float) -> None:
    """One request, resuming from the bytes already in `part`; raises _Retryable or PipelineError."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send from there: the .part cannot be trusted
            part.unlink()
            raise _Retryable(f"{url}: server refused to resume at byte {have} (HTTP 416); starting over") from None
        message = f"HTTP {e.code} {e.reason} for {url}"
        if e.code >= 500 or e.code in (408, 429):
            raise _Retryable(message) from None
        raise PipelineError(f"{message}; check the checkpoint's url in the config") from None
    except urllib.error.URLError as e:
        raise _Retryable(f"cannot connect to {url}: {e.reason}") from None
    except OSError as e:  # timeouts, resets while waiting for the headers
        raise _Retryable(f"cannot connect to {url}: {e}") from None
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if response.status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match[1]) != have:
                part.unlink()
                raise _Retryable(f"{url}: server resumed at the wrong offset; starting over")
            mode = "ab"
        else:
            if have:
                print(f"{url}: server ignored the resume request; starting over", flush=True)
            have, mode = 0, "wb"
        total = have + length if length is not None else None
        progress = _Progress(url, have, total)
        with open(part, mode) as f:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    progress.add(len(chunk))
            except OSError as e:  # connection reset or timed out mid-body
                raise _Retryable(f"{url}: connection lost after {progress.done} of {total} bytes ({e})") from None
    if total is not None and progress.done < total:
        raise _Retryable(f"{url}: truncated body, got {progress.done} of {total} bytes (Content-Length)")


def _download_http(url: str, part: Path, *, retries: int, timeout: float, backoff: float) -> None:
    """Retry with exponential backoff; an attempt that adds bytes to `part` does not use up a retry."""
    failures = 0
    kept = part.stat().st_size if part.exists() else 0
    if kept:
        print(f"{url}: resuming from {kept} bytes in {part}", flush=True)
    while True:
        try:
            return _http_attempt(url, part, timeout)
        except _Retryable as e:
            size = part.stat().st_size if part.exists() else 0
            if size > kept:
                kept = size
            else:
                failures += 1
            if failures > retries:
                keep = f"; rerun to resume from the {size} bytes kept in {part}" if size else ""
                raise PipelineError(f"{e} (gave up after {failures} attempts without progress){keep}") from None
            delay = backoff * 2 ** max(failures - 1, 0)
            print(f"{e}; retrying in {delay:.1f} s", flush=True)
            time.sleep(delay)


def _copy_local(url: str, source: Path, part: Path) -> None:
    if not source.is_file():
        raise PipelineError(f"url {url}: local file {source.resolve()} not found (relative paths are relative to "
                            f"the working directory {Path.cwd()}); fix the checkpoint's url in the config")
    total = source.stat().st_size
    progress = _Progress(str(source), 0, total)
    with open(source, "rb") as src, open(part, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            progress.add(len(chunk))


# ---------------------------------------------------------------------------------------------
# Verification


def check_npz(path: Path, url: str) -> None:
    """A zip of .npy members whose CRCs check out, else an error that shows what arrived instead."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(64)
        raise PipelineError(f"{url}: what arrived is not an .npz (zip) archive ({size} bytes, starting {head!r}); "
                            f"check the url")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad_member = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise PipelineError(f"{url}: the downloaded archive is corrupt ({e}); download it again") from None
    if not names or not all(n.endswith(".npy") for n in names):
        raise PipelineError(f"{url}: a zip archive but not an .npz (members {names[:3]}); check the url")
    if bad_member is not None:
        raise PipelineError(f"{url}: member {bad_member} fails its CRC check (corrupt download); download it again")


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


def verify_against_lock(lock_path: Path, url: str, sha256: str, size: int) -> str:
    """'lock' if the lock file's entry for url matches, 'recorded' if there was none (now there is)."""
    with locked(lock_path):
        lock = read_json(lock_path) if lock_path.exists() else {}
        if not isinstance(lock, dict):
            raise PipelineError(f"{lock_path}: expected a JSON object {{url: {{sha256, bytes, recorded_utc}}}}")
        entry = lock.get(url)
        if entry is None:
            lock[url] = {"sha256": sha256, "bytes": size,
                         "recorded_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_json(lock_path, lock)
            print(f"{url}: sha256 {sha256} recorded in {lock_path} (commit it to pin this file)", flush=True)
            return "recorded"
    if entry.get("sha256") != sha256:
        raise PipelineError(
            f"{url}: sha256 {sha256} does not match {entry.get('sha256')} recorded in {lock_path} on "
            f"{entry.get('recorded_utc')}; the file changed upstream or the download is corrupt. "
            f"Download again; if the new file is intended, delete this url's entry from {lock_path}")
    return "lock"


def verify(path: Path, url: str, *, expected_sha256: str | None, lock_path: Path | None,
           expected_bytes: int | None) -> tuple[str, str]:
    """(sha256, verified_against) of a complete file, or a PipelineError saying what is wrong."""
    check_npz(path, url)
    size = path.stat().st_size
    if expected_bytes and abs(size - expected_bytes) > SIZE_TOLERANCE * expected_bytes:
        raise PipelineError(f"{url}: {size / 2**20:.2f} MiB is far from the expected {expected_bytes / 2**20:.2f} "
                            f"MiB (the checkpoint's size_mib in the config); wrong file for this checkpoint?")
    sha256 = sha256_file(path)
    if expected_sha256:
        if sha256 != expected_sha256.lower():
            raise PipelineError(f"{url}: sha256 {sha256} does not match {expected_sha256.lower()} given in the "
                                f"config (the checkpoint's sha256); download again, or fix the config value if "
                                f"the file is the intended one")
        return sha256, "config"
    if lock_path is not None:
        return sha256, verify_against_lock(Path(lock_path), url, sha256, size)
    return sha256, "recorded"


def fetch(url: str, dest: str | os.PathLike, *, expected_sha256: str | None = None,
          lock_path: str | os.PathLike | None = None, expected_bytes: int | None = None, retries: int = 5,
          timeout: float = 60.0, backoff: float = 2.0) -> dict:
    """Download (or copy) url to dest, verified; returns the download record (without "checkpoint")."""
    start = time.perf_counter()
    dest = Path(dest)
    if expected_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256):
        raise PipelineError(f"sha256 {expected_sha256!r} is not 64 hex digits; fix the checkpoint's sha256")
    kind, source = resolve_source(url)
    checks = {"expected_sha256": expected_sha256, "lock_path": lock_path, "expected_bytes": expected_bytes}
    verified = None
    if dest.exists():
        try:
            verified = verify(dest, url, **checks)
            print(f"{dest} is already there and verifies ({verified[1]}); not downloading again", flush=True)
        except PipelineError as e:
            print(f"{dest} is already there but does not verify ({e}); downloading again", flush=True)
            dest.unlink()
    if verified is None:
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if kind == "http":
            _download_http(url, part, retries=retries, timeout=timeout, backoff=backoff)
        else:
            _copy_local(url, source, part)
        try:
            verified = verify(part, url, **checks)
        except PipelineError:
            part.unlink()  # complete but wrong: resuming it would not help
            raise
        os.replace(part, dest)
    sha256, verified_against = verified
    return {"url": url, "path": str(dest), "bytes": dest.stat().st_size, "sha256": sha256,
            "verified_against": verified_against, "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.download", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint name (config checkpoints.<name>)")
    ap.add_argument("--url", required=True)
    ap.add_argument("--out", required=True, help=".npz to write")
    ap.add_argument("--record", required=True, help="download record to write (.json)")
    ap.add_argument("--lock", required=True, help="lock file of observed sha256 per url (config weights_lock)")
    ap.add_argument("--sha256", help="expected sha256 (config checkpoints.<name>.sha256)")
    ap.add_argument("--size-mib", type=float, help="expected size (config checkpoints.<name>.size_mib)")
    args = ap.parse_args(argv)
    expected_bytes = round(args.size_mib * 2**20) if args.size_mib else None
    try:
        record = fetch(args.url, args.out, expected_sha256=args.sha256, lock_path=args.lock,
                       expected_bytes=expected_bytes)
    except PipelineError as e:
        raise PipelineError(f"checkpoint {args.checkpoint} (config checkpoints.{args.checkpoint}): {e}") from None
    write_json(args.record, {"checkpoint": args.checkpoint, **record})
    print(f"{args.out}: {record['bytes'] / 2**20:.2f} MiB, sha256 {record['sha256']} "
          f"({record['verified_against']}), {record['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
