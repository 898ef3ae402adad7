"""Fine-tuning resume files that cannot block a job: the last two checkpoints, each with a checksum.

A resume folder holds, per checkpoint, the training state `state-<step>.pt` (torch.save) and its sidecar
`state-<step>.json` = {"step", "bytes", "sha256", "fingerprint"}. The sidecar is written after the state,
so it is the commit record: a state file without one was cut short. After each save only the newest
`KEEP` checkpoints stay, so a damaged newest one (a full disk or a node crash can leave it truncated or
empty) still leaves an older one to continue from.

On load, the newest checkpoint that passes every check is used. Each one that does not is moved aside
(renamed `<name>.<reason>`, never deleted) with a warning naming it, and the next older one is tried, then
step 0: reasons `corrupt` (unreadable, no sidecar, size or sha256 differs, torch cannot load it),
`old-version` (another `state_version` in the fingerprint, or the single `state.pt` of earlier versions)
and `other-run` (the checkpoint, data or protocol changed).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from workflow_scripts.common import atomic_path, sha256_file, write_json

KEEP = 2
LEGACY_STATE = "state.pt"  # the single resume file of state versions <= 2
_STATE_NAME = re.compile(r"state-(\d{9})\.(pt|json)")


def state_path(resume_dir: Path, step: int) -> Path:
    return Path(resume_dir) / f"state-{step:09d}.pt"


def sidecar_path(state: Path) -> Path:
    return state.with_suffix(".json")


def checkpoint_steps(resume_dir: str | Path) -> list[int]:
    """Steps of the checkpoint files (state or sidecar) in resume_dir, newest first; moved-aside ones not."""
    folder = Path(resume_dir)
    names = (m for p in folder.iterdir() if (m := _STATE_NAME.fullmatch(p.name))) if folder.is_dir() else ()
    return sorted({int(m.group(1)) for m in names}, reverse=True)


def save(resume_dir: str | Path, step: int, state: dict, fingerprint: dict, keep: int = KEEP) -> Path:
    """Write the state of `step` and then its sidecar (both atomically); keep the newest `keep` checkpoints."""
    path = state_path(Path(resume_dir), step)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_json(sidecar_path(path), {"step": step, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                                    "fingerprint": fingerprint})
    for old in checkpoint_steps(resume_dir)[keep:]:
        remove(resume_dir, old)
    return path


def remove(resume_dir: str | Path, step: int) -> None:
    """Delete one checkpoint, the state first (a sidecar without its state is skipped on load)."""
    path = state_path(Path(resume_dir), step)
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)


def remove_all(resume_dir: str | Path) -> None:
    """Delete every checkpoint (the run's outputs now hold everything); moved-aside files stay."""
    for step in checkpoint_steps(resume_dir):
        remove(resume_dir, step)


def move_aside(path: Path, reason: str) -> Path:
    """Rename path to <name>.<reason> (or <name>.<reason>-2, -3, ... if taken); returns the new path."""
    target, n = path.with_name(f"{path.name}.{reason}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{reason}-{n}")
    path.rename(target)
    return target


def _warn(path: Path, problem: str, reason: str, sidecar: Path | None = None) -> None:
    """Move a failing checkpoint's files aside and say so, naming them."""
    moved = [f"{p.name} -> {move_aside(p, reason).name}" for p in (path, sidecar) if p is not None and p.exists()]
    print(f"finetune: WARNING: resume file {path} {problem}; moved aside ({', '.join(moved) or 'nothing left'}); "
          "trying an older checkpoint, else step 0", file=sys.stderr, flush=True)


def _problem(path: Path, record: dict | None, fingerprint: dict) -> tuple[str, str] | None:
    """(what is wrong, reason) with a checkpoint's state file and sidecar record, or None if it passes."""
    if record is None:
        return "has no readable sidecar with its checksum (the write was cut short)", "corrupt"
    theirs, ours = record.get("fingerprint", {}).get("state_version"), fingerprint["state_version"]
    if theirs != ours:
        return f"was written by another version of finetune (state version {theirs}, this is {ours})", "old-version"
    if record["fingerprint"] != fingerprint:
        return "belongs to a different run (checkpoint, data or protocol changed)", "other-run"
    if not path.is_file():
        return "is missing (only its sidecar is left)", "corrupt"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"fails its integrity check ({size} bytes, its sidecar records {record.get('bytes')})", "corrupt"
    if sha256_file(path) != record.get("sha256"):
        return "fails its integrity check (its sha256 differs from the one its sidecar records)", "corrupt"
    return None


def _read_record(sidecar: Path) -> dict | None:
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("fingerprint"), dict) else None


def load(resume_dir: str | Path, step: int, map_location) -> dict:
    return torch.load(state_path(Path(resume_dir), step), map_location=map_location, weights_only=True)


def newest_usable(resume_dir: str | Path, fingerprint: dict, map_location) -> tuple[int, dict] | None:
    """(step, state) of the newest checkpoint that passes every check, moving each failing one aside.

    `fingerprint` is the run's (it holds "state_version"); None when no checkpoint is usable.
    """
    resume_dir = Path(resume_dir)
    legacy = resume_dir / LEGACY_STATE
    if legacy.exists():
        _warn(legacy, "was written by an earlier version of finetune (one state.pt, no checksum)", "old-version")
    for step in checkpoint_steps(resume_dir):
        path = state_path(resume_dir, step)
        sidecar = sidecar_path(path)
        if not path.exists() and not sidecar.exists():
            continue  # removed meanwhile
        problem = _problem(path, _read_record(sidecar), fingerprint)
        if problem is None:
            try:
                return step, load(resume_dir, step, map_location)
            except Exception as e:  # whatever torch raises for a damaged file: it is unusable
                problem = f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})", "corrupt"
        _warn(path, problem[0], problem[1], sidecar)
    return None
