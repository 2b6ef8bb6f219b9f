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

The count-sketch's bucket and sign of entry i of a tensor are a seeded 32-bit integer hash of i
(``sketch_hash_``), computed chunk by chunk with torch integer ops on the gradient's own device: nothing
of the model's size is drawn or kept, on the CPU or a GPU. ``countsketch_reference`` is the same sketch
in plain Python, the specification the tests hold it to. The JL projection rows are drawn from a CPU
generator, in fixed-size blocks. Every tensor's seed comes from its name and the run seed, so a
compressed vector depends only on (names, values, settings): not on the batch order, the chunk size, or
which other sources are compressed alongside, nor on the device beyond float rounding (a GPU's
``index_add_`` sums a bucket's entries in no fixed order). With ``batched=True`` every tensor carries
a leading batch dimension (B sources at once, as the benchmark uses) and the result is (B, D); each row
equals compressing that source alone.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from merit.registry import lookup, register

# Bump when a compressor's output for the same settings changes (invalidates stores). 2: the count-sketch
# hashes indices instead of drawing them from a generator.
METHODS_VERSION = 2
# Entries hashed per step. Two int64 buffers of this length (16 MB): large enough that a GPU runs few
# kernels per tensor, small enough that on a CPU the ~10 integer passes over them stay in cache (2^20
# measured ~1.6× faster than 2^22 on the 2-core benchmark machine).
_SKETCH_CHUNK = 1 << 20
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
    """Per-tensor seeds. Two tensor names that hash to the same seed would share hash functions, which
    correlates their collisions (a bias); a clash is moved to the next free seed, deterministically for a
    model's fixed parameter order."""

    def __init__(self, seed: int):
        self.seed = seed
        self.used: set[int] = set()

    def next_seed(self, name: str) -> int:
        """The seed of tensor ``name``: ``tensor_seed``, moved past the seeds earlier tensors took."""
        s = tensor_seed(name, self.seed)
        while s in self.used:
            s = (s + 1) & _MASK32
        self.used.add(s)
        return s

    def generator(self, name: str) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.next_seed(name))

    def key(self, name: str) -> int:
        """The 32-bit key ``sketch_hash_`` mixes into tensor ``name``'s indices."""
        return lowbias32(self.next_seed(name))


# ------------------------------------------------------------------------------------ the index hash

_MASK32 = 0xFFFFFFFF
# lowbias32 (C. Wellons, "Prospecting for Hash Functions", 2018; github.com/skeeto/hash-prospector): a
# bijection of 32-bit words with low avalanche bias, two multiplies and three xor-shifts.
_LOWBIAS32_MUL = (0x7FEB352D, 0x846CA68B)


def lowbias32(x: int) -> int:
    """lowbias32 of a 32-bit word, in plain Python integers (the reference for ``sketch_hash_``)."""
    x ^= x >> 16
    x = (x * _LOWBIAS32_MUL[0]) & _MASK32
    x ^= x >> 15
    x = (x * _LOWBIAS32_MUL[1]) & _MASK32
    x ^= x >> 16
    return x


def _signed32(c: int) -> int:
    """The representative of c mod 2^32 in [-2^31, 2^31)."""
    return c - (1 << 32) if c >= 1 << 31 else c


def sketch_hash_(index: torch.Tensor, key: int, buckets: int, scratch: torch.Tensor) -> torch.Tensor:
    """In place: ``index`` (int64, entries in [0, 2^32)) becomes lowbias32(index XOR key) mod ``buckets``.

    The state stays in [0, 2^32) between steps. A product x·c mod 2^32 is taken as (x · c_s) & (2^32 − 1)
    with c_s the signed representative of c in [-2^31, 2^31): |x · c_s| ≤ (2^32 − 1)·2^31 < 2^63, so the
    int64 multiply never overflows, and ``&`` of the (possibly negative) two's-complement product keeps
    exactly its low 32 bits. ``scratch``: an int64 buffer of the same length (no temporaries per step).
    """
    index ^= key
    torch.bitwise_right_shift(index, 16, out=scratch)
    index ^= scratch
    index.mul_(_signed32(_LOWBIAS32_MUL[0])).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(index, 15, out=scratch)
    index ^= scratch
    index.mul_(_signed32(_LOWBIAS32_MUL[1])).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(index, 16, out=scratch)
    index ^= scratch
    if buckets & (buckets - 1) == 0:  # a power of two (the usual D): a mask instead of a division
        return index.bitwise_and_(buckets - 1)
    return index.remainder_(buckets)


def countsketch_reference(named: list[tuple[str, np.ndarray]], dim: int, seed: int) -> np.ndarray:
    """The count-sketch of one gradient, entry by entry in plain Python: the specification of ``CountSketch``.

    Tensors in order get seeds ``tensor_seed(name, seed)``, each moved to the next free 32-bit value while
    an earlier tensor holds it; key = lowbias32(tensor seed). Entry i (row-major) of a tensor has
    v = lowbias32(i XOR key) mod 2D and adds +x to bucket v − D when v ≥ D, else −x to bucket v.
    Accumulates in float64 (so it equals the float32 torch sketch up to summation rounding).

    Returns:
        (dim,) float64 sketch.
    """
    out = np.zeros(dim)
    used: set[int] = set()
    for name, values in named:
        s = tensor_seed(name, seed)
        while s in used:
            s = (s + 1) & _MASK32
        used.add(s)
        key = lowbias32(s)
        for i, x in enumerate(np.asarray(values, dtype=np.float64).ravel().tolist()):
            v = lowbias32(i ^ key) % (2 * dim)
            if v >= dim:
                out[v - dim] += x
            else:
                out[v] -= x
    return out


@register("compression", "stride")
class StrideCompressor:
    """Entries at global flat positions 0, s, 2s, ... of the concatenated gradient (the paper's)."""

    def __init__(self, spec: CompressionSpec, batched: bool = False):
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

    One value v ∈ [0, 2D) per entry encodes both: bucket v mod D, sign + if v ≥ D. It is a hash of the
    entry's index within its tensor and the tensor's seed (``sketch_hash``), computed chunk by chunk on
    the gradient's device, so no index of the model's size is drawn, cached or moved. Entries are summed
    into 2D half-buckets and the sketch is upper − lower half: one 1-D ``index_add_`` per chunk (and batch
    row), no sign multiplication.
    """

    def __init__(self, spec: CompressionSpec, batched: bool = False):
        self.dim, self.batched = spec.sketch_dim, batched
        self.seeds = _Seeded(spec.seed)
        self.acc: torch.Tensor | None = None  # (B, 2D)

    def add(self, name: str, grad: torch.Tensor) -> None:
        rows = _as_rows(grad, self.batched)
        if self.acc is None:
            self.acc = torch.zeros(rows.shape[0], 2 * self.dim, dtype=torch.float32, device=rows.device)
        key = self.seeds.key(name)
        n = rows.shape[1]
        if n > 1 << 32:
            raise ValueError(f"countsketch: {name} has {n} entries; the index hash covers 2^32 per tensor")
        m = min(_SKETCH_CHUNK, n)
        v = torch.empty(m, dtype=torch.int64, device=rows.device)  # reused by every chunk of this tensor
        scratch = torch.empty_like(v)
        for a in range(0, n, _SKETCH_CHUNK):
            w = min(_SKETCH_CHUNK, n - a)
            sketch_hash_(torch.arange(a, a + w, dtype=torch.int64, device=rows.device, out=v[:w]), key,
                         2 * self.dim, scratch[:w])
            for b in range(rows.shape[0]):
                self.acc[b].index_add_(0, v[:w], rows[b, a : a + w])

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

    def __init__(self, spec: CompressionSpec, batched: bool = False):
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

    def __init__(self, spec: CompressionSpec, batched: bool = False):
        self.batched = batched
        self.parts: list[torch.Tensor] = []

    def add(self, name: str, grad: torch.Tensor) -> None:
        self.parts.append(_as_rows(grad, self.batched).clone())

    def result(self) -> torch.Tensor:
        out = torch.cat(self.parts, dim=1) if self.parts else torch.zeros(1, 0)
        return out if self.batched else out[0]


def compress(named: Iterable[tuple[str, torch.Tensor]], spec: CompressionSpec,
             batched: bool = False) -> torch.Tensor:
    """Compress a gradient given as (parameter name, tensor) pairs in parameter-iteration order.

    Returns a (D,) fp32 vector, or (B, D) with ``batched`` (every tensor then has a leading batch dim).
    """
    comp = lookup("compression", spec.method, field="grads.compression")(spec, batched)
    for name, g in named:
        comp.add(name, g)
    return comp.result()


def stride_compress(tensors: Iterable[torch.Tensor], stride: int = 5) -> torch.Tensor:
    """The paper's stride subsampling of unnamed tensors (names do not matter for ``stride``)."""
    return compress(((str(i), t) for i, t in enumerate(tensors)), CompressionSpec("stride", stride=stride))
