"""Small helpers every stage shares: one error type, atomic file writes, hashing, JSON I/O."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class PipelineError(Exception):
    """A problem the user can fix; the message names the file or config key and the fix."""


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds.

    A crash or error leaves no half-written `dest` that a rerun would trust.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (did the stage that writes it run?)") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e}); delete it and rerun the stage that writes it") from None


def json_arg(text: str, flag: str) -> Any:
    """A JSON value given on a stage's command line (the rules pass config blocks this way)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{flag} is not valid JSON ({e}): {text[:200]!r}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a stage's main(); a PipelineError becomes one clear line on stderr and exit code 2."""
    try:
        code = main(argv)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
