"""Run-folder layout, manifests and atomic writes.

A stage writes its outputs first and its ``manifest.json`` last, so the manifest's existence means the
stage completed. Each manifest carries a fingerprint of the stage's inputs (its config section and the
fingerprints of the stages it reads); a rerun skips a stage whose manifest has the same fingerprint and
redoes one whose inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


_DAMAGED_SEEN: set[str] = set()


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest, or None when there is none or it is damaged (truncated, empty, not an
    object): a damaged manifest means the stage did not complete, so it is redone (with a notice)."""
    p = Path(stage_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        m = read_json(p)
        if not isinstance(m, dict) or "key" not in m:
            raise ValueError("not a manifest object")
        return m
    except (OSError, ValueError) as e:
        _damaged(p, f"unreadable ({type(e).__name__})")
        return None


def _damaged(path: Path, why: str) -> None:
    from merit.errors import notice

    if str(path) not in _DAMAGED_SEEN:  # one notice per file and process, however often it is read
        _DAMAGED_SEEN.add(str(path))
        notice(f"{path}: {why}; the stage is treated as not done (a run recomputes it)")


def is_done(stage_dir: Path, key: str) -> bool:
    """True when the stage folder holds a manifest written for the same inputs ``key`` and every file
    the manifest recorded is still there with its size (a missing or cut file means: redo the stage)."""
    m = read_manifest(stage_dir)
    if m is None or m.get("key") != key:
        return False
    for name, size in (m.get("files") or {}).items():
        f = Path(stage_dir) / name
        if not f.is_file() or f.stat().st_size != size:
            _damaged(f, "missing" if not f.is_file() else f"size changed ({f.stat().st_size} bytes, manifest: {size})")
            return False
    return True


def write_manifest(stage_dir: Path, key: str, **fields: Any) -> dict:
    """Write the manifest last: it records the stage's files (top level, with sizes; plots left out, the
    report redraws them) so that :func:`is_done` can tell a complete stage folder from a damaged one."""
    stage_dir = Path(stage_dir)
    files = {f.name: f.stat().st_size for f in sorted(stage_dir.iterdir())
             if f.is_file() and not f.name.startswith(".") and f.name != MANIFEST
             and f.suffix != ".png"} if stage_dir.is_dir() else {}
    manifest = {"key": key, **fields, "files": files}
    write_json(stage_dir / MANIFEST, manifest)
    return manifest


def check_output_dir(path: Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be made: it is a file, it lies below a file,
    or its nearest existing folder cannot be written to (tried with a probe file, which works as root too)."""
    from merit.errors import MeritError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MeritError(f"{flag} {path}: exists and is a file, not a folder; choose another {flag}")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MeritError(f"{flag} {path}: {parent} is a file, so no folder can be made below it; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".merit-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MeritError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); choose a writable folder") from None
    return path


def check_output_file(path: Path, flag: str) -> Path:
    """Like :func:`check_output_dir` for a file to be written: not a folder, its folder makeable."""
    from merit.errors import MeritError

    path = Path(path)
    if path.is_dir():
        raise MeritError(f"{flag} {path}: is a folder; give a file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MeritError(f"{flag} {path}: {parent} is a file, so no folder can be made below it; choose another {flag}")
    check_output_dir(parent, flag)
    return path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    A crash leaves only the temporary folder (named ``.<name>.tmp-*``), never a complete-looking output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A stage killed hard (SIGKILL, power loss) leaves its temporary folder: the next attempt removes it.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def reset_stage(stage_dir: Path) -> Path:
    """Remove a stale stage folder (inputs changed or a previous attempt died) and recreate it empty."""
    stage_dir = Path(stage_dir)
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    return stage_dir
