"""The gradient store: one compressed gradient file per source, and a cache of their cosine matrix.

``grads/<source>.safetensors`` holds one vector ``g`` and metadata: the source's own key (θ(0), that
source's data, the gradient and compression settings, the seed), its calibration size and tokens. A file
whose key differs is stale and recomputed; a file whose key matches is reused whatever else changed in
the mixture, so adding sources to a run computes only the new gradients.

``grads/cosine.npz`` caches C in *store order* (the order sources were first computed) with each row's
key. On update, the longest prefix of that order that is still current is kept and every other current
source is appended (``streamed_cosine`` with the kept block), which makes the cache bitwise equal to a
from-scratch computation in store order; callers get C permuted into their own order.

C is computed from the vector files a column chunk at a time (``stored_rows``), with plain reads at
offsets taken from the safetensors header, not a memory map (mapped pages count towards the process's
resident memory): memory stays O(T × chunk + T²) whatever the vectors' length.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from merit import artifacts
from merit.conflict.cosine import Rows, streamed_cosine
from merit.errors import DataError

COSINE_CACHE = "cosine.npz"
# Stored in the cache; a cache of another version is recomputed. 2: row norms summed over column chunks
# (the bits of C changed, so version-1 rows cannot be extended bitwise).
COSINE_VERSION = 2
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header's size


def vector_path(store: Path, name: str) -> Path:
    return Path(store) / f"{name}.safetensors"


def read_meta(path: Path) -> dict[str, str] | None:
    """The metadata of a stored vector, or None when there is no readable file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError, SafetensorError):  # missing, truncated, not safetensors
        return None


def stored_key(store: Path, name: str) -> str | None:
    meta = read_meta(vector_path(store, name))
    return None if meta is None else meta.get("key")


def pending(store: Path, keys: dict[str, str]) -> list[str]:
    """Sources (in ``keys`` order) with no stored vector for their current key."""
    return [n for n, k in keys.items() if stored_key(store, n) != k]


def save_vector(store: Path, name: str, vec: torch.Tensor, key: str, **meta: object) -> Path:
    """Write one source's vector atomically (temporary file, then rename): a kill leaves no half file."""
    path = vector_path(store, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"g": vec.detach().float().cpu().contiguous()}, str(tmp),
              metadata={"source": name, "key": key, **{k: str(v) for k, v in meta.items()}})
    tmp.replace(path)
    return path


def load_vectors(store: Path, names: list[str]) -> np.ndarray:
    """(len(names), D) float32 matrix of stored vectors, all in memory: for small stores and tests (the
    pipeline's cosines read the files a chunk at a time, ``stored_rows``)."""
    rows = [load_file(str(vector_path(store, n)))["g"].numpy() for n in names]
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def vector_layout(path: Path) -> tuple[int, int]:
    """(byte offset of the first entry, number of entries) of the vector ``g`` in a stored file.

    Read from the safetensors header (8-byte little-endian length, then JSON); the file must hold the
    whole of ``g`` as 1-D little-endian float32.

    Raises:
        DataError: the file is missing, not safetensors, holds no such vector, or is cut short.
    """
    path = Path(path)
    hint = "delete it and rerun the grads stage to recompute it"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(_MAX_HEADER, size - 8):
                raise DataError(f"{path}: not a safetensors file (header length {length}, file {size} bytes); {hint}")
            header = json.loads(f.read(length))
    except OSError as e:
        raise DataError(f"{path}: cannot read the stored gradient ({e.strerror or e}); {hint}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: damaged safetensors header ({e}); {hint}") from e
    g = header.get("g") if isinstance(header, dict) else None
    if not isinstance(g, dict):
        raise DataError(f"{path}: holds no vector 'g'; {hint}")
    shape, offsets = g.get("shape"), g.get("data_offsets")
    if g.get("dtype") != "F32" or not isinstance(shape, list) or len(shape) != 1:
        raise DataError(f"{path}: 'g' is {g.get('dtype')} of shape {shape}, expected a 1-D F32 vector; {hint}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] - offsets[0] == 4 * shape[0]):
        raise DataError(f"{path}: 'g' has data offsets {offsets} for {shape[0]} float32 entries; {hint}")
    start, end = 8 + length + offsets[0], 8 + length + offsets[1]
    if end > size:
        raise DataError(f"{path}: truncated ({size} bytes, 'g' ends at byte {end}); {hint}")
    return start, shape[0]


@contextmanager
def stored_rows(store: Path, names: list[str]) -> Iterator[Rows]:
    """The stored vectors of ``names`` as a ``Rows`` reader (row i = names[i]), files held open meanwhile.

    Every header is checked up front (``vector_layout``) and all vectors must have the same length.

    Raises:
        DataError: a file is missing, malformed or truncated, or the lengths differ.
    """
    paths = [vector_path(store, n) for n in names]
    layouts = [vector_layout(p) for p in paths]
    dims = {n for _, n in layouts}
    if len(dims) > 1:
        sizes = ", ".join(f"{n}: {d}" for n, (_, d) in zip(names, layouts))
        raise DataError(f"{store}: stored gradients differ in length ({sizes}); rerun the grads stage")
    files = []
    try:
        for p in paths:
            files.append(open(p, "rb", buffering=0))  # unbuffered: readinto goes straight to the array

        def read(i: int, start: int, stop: int) -> np.ndarray:
            out = np.empty(stop - start, dtype="<f4")
            f = files[i]
            f.seek(layouts[i][0] + 4 * start)
            got = f.readinto(out)
            if got != out.nbytes:  # shortened since its header was checked
                raise DataError(f"{paths[i]}: truncated while being read; rerun the grads stage")
            return out

        yield Rows(len(names), dims.pop() if dims else 0, read)
    finally:
        for f in files:
            f.close()


def update_cosine(store: Path, names: list[str], keys: dict[str, str]) -> np.ndarray:
    """C for ``names`` (in that order), reusing and extending the store's cosine cache."""
    store = Path(store)
    cache = store / COSINE_CACHE
    old_keys: list[str] = []
    old_c = np.zeros((0, 0))
    cached = _read_cache(cache)
    if cached is not None:
        old_keys, old_c = cached
    by_key = {keys[n]: n for n in names}
    keep = 0
    while keep < len(old_keys) and old_keys[keep] in by_key:
        keep += 1
    kept = old_keys[:keep]
    new = [n for n in names if keys[n] not in set(kept)]
    if not new:
        c = old_c[:keep, :keep]
    else:
        with stored_rows(store, [by_key[k] for k in kept] + new) as rows:
            c = streamed_cosine(rows, c_old=old_c[:keep, :keep])
    order = kept + [keys[n] for n in new]
    if new or keep < len(old_keys):
        tmp = store / f".{COSINE_CACHE}.tmp.npz"
        np.savez(tmp, keys=np.array(order), matrix=c, version=COSINE_VERSION)
        os.replace(tmp, cache)
    pos = {k: i for i, k in enumerate(order)}
    perm = [pos[keys[n]] for n in names]
    return c[np.ix_(perm, perm)]


def _read_cache(cache: Path) -> tuple[list[str], np.ndarray] | None:
    """(row keys, C) of the cosine cache; None when absent or damaged (then C is recomputed from the vectors)."""
    if not cache.exists():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            if "version" not in z or int(z["version"]) != COSINE_VERSION:
                return None  # computed another way: recomputed, not extended
            keys, c = [str(k) for k in z["keys"]], np.asarray(z["matrix"])
        if c.shape != (len(keys), len(keys)):
            raise ValueError("matrix and keys disagree")
        return keys, c
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        from merit.errors import notice

        notice(f"{cache}: damaged ({type(e).__name__}); recomputing the cosine matrix from the stored gradients")
        return None


def write_store_manifest(store: Path, stage_key: str, names: list[str], keys: dict[str, str],
                         settings: dict, **fields: object) -> dict:
    """Update the cosine cache and write the stage manifest (last: its existence means complete)."""
    store = Path(store)
    entries = []
    for n in names:
        meta = read_meta(vector_path(store, n)) or {}
        if meta.get("key") != keys[n]:
            raise RuntimeError(f"gradient store: {n} has no vector for key {keys[n]}")
        entries.append({"name": n, "file": vector_path(store, n).name, "key": keys[n],
                        "calibration": int(meta.get("calibration", 0)), "tokens": int(meta.get("tokens", 0)),
                        "norm": float(meta.get("norm", "nan"))})
    update_cosine(store, names, keys)
    dim = vector_layout(vector_path(store, names[0]))[1]
    return artifacts.write_manifest(store, stage_key, compression=settings, dim=dim, conflict=COSINE_CACHE,
                                    sources=entries, **fields)


def load_conflict(store: Path) -> tuple[list[str], np.ndarray]:
    """Source names and C in manifest order: from the cache when it is current, else from the vectors."""
    m = artifacts.read_manifest(store)
    names = [e["name"] for e in m["sources"]]
    keys = {e["name"]: e.get("key") for e in m["sources"]}
    cached = _read_cache(Path(store) / COSINE_CACHE)
    if cached is not None and all(keys.values()):
        pos = {k: i for i, k in enumerate(cached[0])}
        if all(keys[n] in pos for n in names):
            perm = [pos[keys[n]] for n in names]
            return names, cached[1][np.ix_(perm, perm)]
    with stored_rows(store, names) as rows:  # a run folder from before the cache (or its version) existed
        return names, streamed_cosine(rows)
