"""The gradient store: one compressed gradient file per source, and a cache of their cosine matrix.

``grads/<source>.safetensors`` holds one vector ``g`` and metadata: the source's own key (θ(0), that
source's data, the gradient and compression settings, the seed), its calibration size and tokens. A file
whose key differs is stale and recomputed; a file whose key matches is reused whatever else changed in
the mixture, so adding sources to a run computes only the new gradients.

``grads/cosine.npz`` caches C in *store order* (the order sources were first computed) with each row's
key. On update, the longest prefix of that order that is still current is kept and every other current
source is appended through ``extend_cosine``, which makes the cache bitwise equal to a from-scratch
computation in store order; callers get C permuted into their own order.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from merit import artifacts
from merit.conflict.cosine import cosine_matrix, extend_cosine, unit_rows

COSINE_CACHE = "cosine.npz"


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
    """(len(names), D) float32 matrix of stored vectors."""
    rows = [load_file(str(vector_path(store, n)))["g"].numpy() for n in names]
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


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
    elif kept:
        unit_kept = unit_rows(load_vectors(store, [by_key[k] for k in kept]))
        c, _ = extend_cosine(old_c[:keep, :keep], unit_kept, load_vectors(store, new))
    else:
        c = cosine_matrix(load_vectors(store, new))
    order = kept + [keys[n] for n in new]
    if new or keep < len(old_keys):
        tmp = store / f".{COSINE_CACHE}.tmp.npz"
        np.savez(tmp, keys=np.array(order), matrix=c)
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
    with safe_open(str(vector_path(store, names[0])), framework="pt") as f:
        dim = int(f.get_slice("g").get_shape()[0])
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
    return names, cosine_matrix(load_vectors(store, names))  # a run folder from before the cache existed
