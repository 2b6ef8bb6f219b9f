"""Compression of a model's gradient to a short vector whose inner products approximate the exact ones
(pure tensor code, no IO).

A compressor sees the gradient one parameter tensor at a time (``add(name, grad)``), never the whole
flattened vector, and returns the compressed vector at the end (``result()``). Registered under registry
kind ``"compression"``:

- ``stride`` (the paper's, App. E): keep one entry every ``s`` positions of the gradient flattened in
  parameter-iteration order (s = 5 keeps 20%). Its size grows with the model, and on real models it is the
  least faithful option: gradient energy sits in few coordinates (normalisation weights), so which of
  them a stride hits is chance.
- ``countsketch``: every entry goes to one of D buckets with a random sign; E⟨Sx, Sy⟩ = ⟨x, y⟩. One
  pass, O(#params) work, size D whatever the model. The default (see benchmarks/conflict_results.md).
- ``jl``: a dense Rademacher projection to D dims (scaled by 1/√D), generated block by block and never
  held whole. Same guarantee as the count-sketch but O(D·#params) work: use D of a few thousand at most.
- ``none``: the exact gradient (as large as the model; for references and tiny models).

Hashes, signs and projection rows are drawn from a CPU generator seeded per parameter tensor from its
name and the run seed, in fixed-size chunks, so a compressed vector depends only on (names, values,
settings): not on the device, the batch order, or which other sources are compressed alongside. With
``batched=True`` every tensor carries a leading batch dimension (B sources at once, as the benchmark
uses) and the result is (B, D); each row equals compressing that source alone. A ``cache`` dict passed
to ``compress`` keeps the count-sketch buckets on the gradients' device between sources (4 bytes per
parameter: worth it on a GPU, where drawing them on the CPU would dominate; not used on the CPU, where
it would double the memory of a model's gradients).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from merit.registry import get, register

METHODS_VERSION = 1  # bump when a compressor's output for the same settings changes (invalidates stores)
_SKETCH_CHUNK = 1 << 22  # entries hashed per generator call: bounds temporaries to ~16 MB
_JL_BLOCK = 1 << 24  # projection entries generated per block (D × columns): ~64 MB as float32


@dataclass(frozen=True)
class CompressionSpec:
    """What to compute: the method and its settings (``grads.compression``, ``grads.stride``,
    ``grads.sketch_dim`` and the run seed)."""

    method: str = "countsketch"
    stride: int = 5
    sketch_dim: int = 65536
    seed: int = 0

    def settings(self) -> dict:
        """Only the settings this method uses: what a stored vector's key must depend on."""
        if self.method == "stride":
            return {"method": "stride", "stride": self.stride}
        if self.method in ("countsketch", "jl"):
            return {"method": self.method, "dim": self.sketch_dim, "seed": self.seed, "version": METHODS_VERSION}
        return {"method": self.method}

    def output_dim(self, numel: int) -> int:
        """Length of the compressed vector for a gradient of ``numel`` entries (bytes stored = 4×)."""
        if self.method == "stride":
            return -(-numel // self.stride)
        if self.method in ("countsketch", "jl"):
            return self.sketch_dim
        return numel


def tensor_seed(name: str, seed: int) -> int:
    """A stable 32-bit seed for one parameter tensor (CPU generators keep 32 bits of a seed anyway)."""
    return zlib.crc32(f"{seed}:{name}".encode())


def _as_rows(grad: torch.Tensor, batched: bool) -> torch.Tensor:
    """(B, n) fp32 view of one tensor's gradient; B = 1 when not batched."""
    g = grad.detach()
    g = g.reshape(g.shape[0], -1) if batched else g.reshape(1, -1)
    return g.float()


class _Seeded:
    """Per-tensor generators. Two tensor names that hash to the same seed would share hash functions,
    which correlates their collisions (a bias); a clash is moved to the next free seed, deterministically
    for a model's fixed parameter order."""

    def __init__(self, seed: int):
        self.seed = seed
        self.used: set[int] = set()

    def generator(self, name: str) -> torch.Generator:
        s = tensor_seed(name, self.seed)
        while s in self.used:
            s = (s + 1) & 0xFFFFFFFF
        self.used.add(s)
        return torch.Generator(device="cpu").manual_seed(s)


@register("compression", "stride")
class StrideCompressor:
    """Entries at global flat positions 0, s, 2s, ... of the concatenated gradient (the paper's)."""

    def __init__(self, spec: CompressionSpec, batched: bool = False, cache: dict | None = None):
        self.stride, self.batched = spec.stride, batched
        self.parts: list[torch.Tensor] = []
        self.offset = 0

    def add(self, name: str, grad: torch.Tensor) -> None:
        rows = _as_rows(grad, self.batched)
        start = (-self.offset) % self.stride  # first local index whose global index is a multiple of s
        self.parts.append(rows[:, start :: self.stride].clone())
        self.offset += rows.shape[1]

    def result(self) -> torch.Tensor:
        out = torch.cat(self.parts, dim=1) if self.parts else torch.zeros(1, 0)
        return out if self.batched else out[0]


@register("compression", "countsketch")
class CountSketch:
    """Count-sketch: entry i goes to bucket h(i) ∈ [0, D) with sign σ(i) ∈ {±1}.

    One draw v ∈ [0, 2D) per entry encodes both: bucket v mod D, sign + if v ≥ D. Entries are summed into
    2D half-buckets and the sketch is upper − lower half: one 1-D ``index_add_`` per chunk (and batch row),
    no sign multiplication.
    """

    def __init__(self, spec: CompressionSpec, batched: bool = False, cache: dict | None = None):
        self.dim, self.batched = spec.sketch_dim, batched
        self.seeds = _Seeded(spec.seed)
        self.acc: torch.Tensor | None = None  # (B, 2D)
        self.cache = cache
        self.tag = (spec.sketch_dim, spec.seed)  # a cache filled under other settings is not reused

    def add(self, name: str, grad: torch.Tensor) -> None:
        rows = _as_rows(grad, self.batched)
        if self.acc is None:
            self.acc = torch.zeros(rows.shape[0], 2 * self.dim, dtype=torch.float32, device=rows.device)
        gen = self.seeds.generator(name)  # drawn even when cached, so later tensors' seeds stay the same
        n = rows.shape[1]
        key = (self.tag, name, n, str(rows.device))
        cached = self.cache.get(key) if self.cache is not None else None
        chunks = []
        for i, a in enumerate(range(0, n, _SKETCH_CHUNK)):
            m = min(_SKETCH_CHUNK, n - a)
            if cached is not None:
                v = cached[i]
            else:
                v = torch.randint(0, 2 * self.dim, (m,), generator=gen, dtype=torch.int32).to(rows.device)
                if self.cache is not None:  # otherwise each chunk is freed once used (4M entries: 16 MB)
                    chunks.append(v)
            for b in range(rows.shape[0]):  # 1-D index_add_ per row: the fast kernel for int32 indices
                self.acc[b].index_add_(0, v, rows[b, a : a + m])
        if self.cache is not None and cached is None:
            self.cache[key] = chunks

    def result(self) -> torch.Tensor:
        if self.acc is None:
            raise ValueError("countsketch: no gradient tensors were added")
        out = self.acc[:, self.dim :] - self.acc[:, : self.dim]
        return out if self.batched else out[0]


def rademacher_bits(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) uint8 matrix of fair random bits: 64 bits per generator draw, unpacked."""
    count = rows * cols
    words = torch.empty(-(-count // 64), dtype=torch.int64).random_(-(2**63), None, generator=gen)
    bits = np.unpackbits(words.view(torch.uint8).numpy(), count=count)
    return torch.from_numpy(bits).reshape(rows, cols)


@register("compression", "jl")
class RademacherJL:
    """y = R g / √D with R ∈ {±1}^{D × n}, generated in column blocks of ≤ 2^24 entries.

    With B ∈ {0, 1} the random bits, R g = 2 B g − (Σ g) 1, so only the bits are materialised.
    """

    def __init__(self, spec: CompressionSpec, batched: bool = False, cache: dict | None = None):
        self.dim, self.batched = spec.sketch_dim, batched
        self.seeds = _Seeded(spec.seed)
        self.cols = max(1, _JL_BLOCK // self.dim)  # fixed per D, so the matrix does not depend on the input
        self.acc: torch.Tensor | None = None  # (D, B), float64 across blocks

    def add(self, name: str, grad: torch.Tensor) -> None:
        rows = _as_rows(grad, self.batched)
        if self.acc is None:
            self.acc = torch.zeros(self.dim, rows.shape[0], dtype=torch.float64, device=rows.device)
        gen = self.seeds.generator(name)
        for a in range(0, rows.shape[1], self.cols):
            x = rows[:, a : a + self.cols].T  # (c, B)
            bits = rademacher_bits(gen, self.dim, x.shape[0]).to(device=x.device, dtype=torch.float32)
            self.acc += (2 * (bits @ x) - x.sum(0)).double()

    def result(self) -> torch.Tensor:
        if self.acc is None:
            raise ValueError("jl: no gradient tensors were added")
        out = (self.acc / math.sqrt(self.dim)).float().T
        return out if self.batched else out[0]


@register("compression", "none")
class Exact:
    """The whole gradient, flattened in parameter-iteration order."""

    def __init__(self, spec: CompressionSpec, batched: bool = False, cache: dict | None = None):
        self.batched = batched
        self.parts: list[torch.Tensor] = []

    def add(self, name: str, grad: torch.Tensor) -> None:
        self.parts.append(_as_rows(grad, self.batched).clone())

    def result(self) -> torch.Tensor:
        out = torch.cat(self.parts, dim=1) if self.parts else torch.zeros(1, 0)
        return out if self.batched else out[0]


def compress(named: Iterable[tuple[str, torch.Tensor]], spec: CompressionSpec, batched: bool = False,
             cache: dict | None = None) -> torch.Tensor:
    """Compress a gradient given as (parameter name, tensor) pairs in parameter-iteration order.

    Returns a (D,) fp32 vector, or (B, D) with ``batched`` (every tensor then has a leading batch dim).
    ``cache``: a dict kept by the caller across sources (see the module docstring).
    """
    comp = get("compression", spec.method, field="grads.compression")(spec, batched, cache)
    for name, g in named:
        comp.add(name, g)
    return comp.result()


def stride_compress(tensors: Iterable[torch.Tensor], stride: int = 5) -> torch.Tensor:
    """The paper's stride subsampling of unnamed tensors (names do not matter for ``stride``)."""
    return compress(((str(i), t) for i, t in enumerate(tensors)), CompressionSpec("stride", stride=stride))
