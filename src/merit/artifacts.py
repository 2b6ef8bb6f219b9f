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


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_manifest(stage_dir: Path) -> dict | None:
    p = Path(stage_dir) / MANIFEST
    return read_json(p) if p.exists() else None


def is_done(stage_dir: Path, key: str) -> bool:
    """True when the stage folder holds a manifest written for the same inputs ``key``."""
    m = read_manifest(stage_dir)
    return m is not None and m.get("key") == key


def write_manifest(stage_dir: Path, key: str, **fields: Any) -> dict:
    manifest = {"key": key, **fields}
    write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    A crash leaves only the temporary folder (named ``.<name>.tmp-*``), never a complete-looking output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
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
