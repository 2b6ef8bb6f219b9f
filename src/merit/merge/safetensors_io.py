"""The safetensors format at the byte level: read headers, read byte ranges, plan and write shards.

The merge engine maps only the byte range of the slice it is merging, writes merged slices with
``pwrite`` at offsets planned in advance, and so never holds a whole checkpoint and can read and write
from several threads. A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative to
the end of the header), then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from merit.errors import MeritError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_MAX_HEADER = 100 << 20  # the reference implementation's limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_NAMES = {"F64", "F32", "F16", "BF16"}  # what merging averages; fp8 is not merged (no scales)


TORCH_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


_ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in DTYPES.items()}


def itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype name, shape and absolute byte range in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of one safetensors file and its ``__metadata__``; a MeritError if it is malformed."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise MeritError(f"{path}: not a safetensors file (bad header length); re-save the checkpoint")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise MeritError(f"{path}: not a safetensors file (header is not JSON); re-save the checkpoint") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries = {}
    for name, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MeritError(f"{path}: malformed header entry for tensor {name!r}; re-save the checkpoint") from None
        if dtype not in DTYPES:
            raise MeritError(f"{path}: tensor {name!r} has dtype {dtype}, which merit cannot merge")
        entry = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
        if entry.nbytes != entry.numel * itemsize(dtype) or begin < 0 or entry.end > size:
            raise MeritError(f"{path}: tensor {name!r} lies outside the file or has the wrong size; "
                             "the file is truncated or corrupt (re-copy or re-save it)")
        entries[name] = entry
    return entries, metadata


def weight_files(folder: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """A checkpoint's weight files and, when sharded with an index, its ``weight_map`` (name -> file).

    ``folder`` may also be a single ``.safetensors`` file.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".safetensors":
        return [folder], None
    if not folder.is_dir():
        raise MeritError(f"{folder}: no such checkpoint folder")
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise MeritError(f"{index}: malformed index (no weight_map); re-save the checkpoint") from None
        mapping = {name: folder / fname for name, fname in weight_map.items()}
        files = sorted(set(mapping.values()))
        for f in files:
            if not f.is_file():
                raise MeritError(f"{index}: names shard {f.name}, which is missing; re-copy the checkpoint")
        return files, mapping
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (pickled .bin weights: re-save with safe_serialization=True)" if any(folder.glob("*.bin")) else ""
        raise MeritError(f"{folder}: no .safetensors weights{hint}")
    return files, None


def checkpoint_tensors(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a (possibly sharded) checkpoint, in file order then offset order."""
    files, mapping = weight_files(folder)
    out: dict[str, TensorEntry] = {}
    for f in files:
        entries, _ = read_header(f)
        for name, e in sorted(entries.items(), key=lambda kv: kv[1].start):
            if mapping is not None and mapping.get(name) != f:
                continue  # the index is authoritative: a stray copy elsewhere is not loaded by HF either
            if name in out:
                raise MeritError(f"{folder}: tensor {name!r} is in both {out[name].file.name} and {f.name}; "
                                 "add a model.safetensors.index.json or remove the duplicate")
            out[name] = e
    if mapping is not None:
        missing = sorted(set(mapping) - set(out))
        if missing:
            raise MeritError(f"{folder / INDEX}: tensor {missing[0]!r} is not in {mapping[missing[0]].name}; "
                             "the index does not match the shards (re-save the checkpoint)")
    return out



def floating_dtype(folder: Path) -> str | None:
    """torch name (``float32``, ``bfloat16``, ``float16``) of a checkpoint's first floating tensor: the
    dtype it was saved in; None for a checkpoint without one (or with pickled weights only)."""
    if not any(Path(folder).glob("*.safetensors")) and Path(folder).is_dir():
        return None
    return next((TORCH_NAMES[e.dtype] for e in checkpoint_tensors(folder).values() if e.dtype in TORCH_NAMES), None)

def parse_size(text: str | int) -> int:
    """Bytes from ``5GB`` / ``500MB`` / ``2GiB`` / ``1000000``; a MeritError otherwise."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(text).upper())
    if not m:
        raise MeritError(f"--shard-size: cannot read {text!r}; write e.g. 5GB, 500MB or 2GiB")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    unit = m.group(2) or ""
    if unit not in units:
        raise MeritError(f"--shard-size: unknown unit in {text!r}; write e.g. 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * units[unit])
    if size <= 0:
        raise MeritError(f"--shard-size: must be positive, got {text!r}")
    return size


@dataclass
class OutShard:
    """One output file: its tensors in order with offsets relative to the data section."""

    filename: str
    names: list[str]
    specs: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (dtype, shape, begin, end)
    size: int = 0
    data_start: int = 0  # absolute offset of the data section, known once the header is written


def plan_shards(tensors: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> list[OutShard]:
    """Split (name, dtype, shape) into shards of at most ``max_bytes`` of tensor data, in order.

    Same rule as ``transformers``' ``save_pretrained``: a tensor that does not fit starts a new shard; one
    larger than ``max_bytes`` gets a shard of its own. One shard is named ``model.safetensors``; several
    ``model-0000i-of-0000n.safetensors``, with an index.
    """
    shards: list[OutShard] = []
    current: OutShard | None = None
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * itemsize(dtype)
        if current is None or (current.size + nbytes > max_bytes and current.names):
            current = OutShard("", [], {})
            shards.append(current)
        current.names.append(name)
        current.specs[name] = (dtype, shape, current.size, current.size + nbytes)
        current.size += nbytes
    n = len(shards)
    for i, s in enumerate(shards):
        s.filename = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


def write_header(fd: int, shard: OutShard, metadata: dict[str, str]) -> None:
    """Write ``shard``'s header at the start of ``fd`` and size the file; sets ``shard.data_start``."""
    header: dict = {"__metadata__": metadata}
    for name in shard.names:
        dtype, shape, begin, end = shard.specs[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data section is 8-byte aligned, as safetensors does
    os.pwrite(fd, struct.pack("<Q", len(blob)) + blob, 0)
    shard.data_start = 8 + len(blob)
    os.ftruncate(fd, shard.data_start + shard.size)


def pwrite_from(fd: int, t: torch.Tensor, offset: int) -> None:
    """Write the bytes of the contiguous CPU tensor ``t`` at ``offset`` of ``fd``."""
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)

