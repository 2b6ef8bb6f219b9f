"""Gradient compressors (merit.conflict.compress): unbiased inner products, determinism, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merit.conflict import compress as C
from merit.conflict.compress import CompressionSpec, compress
from merit.errors import ConfigError


def _pair(n: int = 3000, rho: float = 0.6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g)
    return x, y


def _named(v: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    # three tensors of different shapes, so per-tensor seeding and offsets are exercised
    return [("emb.weight", v[:1200].reshape(40, 30)), ("norm.weight", v[1200:1250]), ("head.weight", v[1250:])]


@pytest.mark.parametrize("method,dim,trials", [("countsketch", 128, 300), ("jl", 64, 120)])
def test_sketch_inner_products_are_unbiased(method, dim, trials):
    """E<Sx, Sy> = <x, y>. Tolerance: 5 standard errors of the mean over ``trials`` seeds, with the
    single-sketch variance bounded by (|x|²|y|² + <x,y>²)/D (both sketches)."""
    x, y = _pair()
    exact = float(x @ y)
    est = []
    for seed in range(trials):
        spec = CompressionSpec(method, sketch_dim=dim, seed=seed)
        est.append(float(compress(_named(x), spec) @ compress(_named(y), spec)))
    sd = math.sqrt((float(x @ x) * float(y @ y) + exact**2) / dim)
    tol = 5 * sd / math.sqrt(trials)
    assert abs(np.mean(est) - exact) < tol, (np.mean(est), exact, tol)
    # and it is a real estimator, not the exact value: single sketches scatter around it
    assert np.std(est) > 0.2 * sd


def test_countsketch_norm_is_preserved_in_expectation():
    x, _ = _pair()
    sq = [float(compress(_named(x), CompressionSpec("countsketch", sketch_dim=256, seed=s)).pow(2).sum())
          for s in range(200)]
    assert np.mean(sq) == pytest.approx(float(x @ x), rel=0.03)


@pytest.mark.parametrize("method", ["countsketch", "jl", "stride", "none"])
def test_same_seed_same_vector_and_batched_rows_equal_single(method):
    spec = CompressionSpec(method, stride=3, sketch_dim=32, seed=7)
    a = torch.randn(4, 6, 5)
    b = torch.randn(4, 9)
    batched = compress([("a", a), ("b", b)], spec, batched=True)
    single = torch.stack([compress([("a", a[i]), ("b", b[i])], spec) for i in range(4)])
    again = torch.stack([compress([("a", a[i]), ("b", b[i])], spec) for i in range(4)])
    assert torch.equal(single, again)
    # jl: a (D, c)·(c, B) product against a matrix-vector product differs only by float rounding
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert batched.shape == (4, spec.output_dim(6 * 5 + 9))


def test_seed_and_names_change_the_sketch():
    x, _ = _pair(n=2000)
    base = compress(_named(x), CompressionSpec("countsketch", sketch_dim=64, seed=0))
    assert not torch.equal(base, compress(_named(x), CompressionSpec("countsketch", sketch_dim=64, seed=1)))
    renamed = [(n + ".x", t) for n, t in _named(x)]
    assert not torch.equal(base, compress(renamed, CompressionSpec("countsketch", sketch_dim=64, seed=0)))


def test_countsketch_stream_is_pinned():
    """Stored vectors are reused across runs by key; a change in how buckets are drawn must bump
    METHODS_VERSION. These values were computed once with the current implementation (version 2)."""
    assert C.METHODS_VERSION == 2
    x = [("layer.weight", torch.arange(1.0, 9.0).reshape(2, 4)), ("layer.bias", torch.tensor([10.0, -20.0]))]
    assert compress(x, CompressionSpec("countsketch", sketch_dim=4, seed=0)).tolist() == [-20.0, 2.0, 6.0, -6.0]
    assert compress(x, CompressionSpec("jl", sketch_dim=4, seed=0)).tolist() == [-8.0, 21.0, 3.0, 10.0]


def test_colliding_tensor_seeds_get_distinct_generators(monkeypatch):
    monkeypatch.setattr(C, "tensor_seed", lambda name, seed: 42)
    seeded = C._Seeded(0)
    a = torch.randint(0, 1 << 20, (8,), generator=seeded.generator("a"))
    b = torch.randint(0, 1 << 20, (8,), generator=seeded.generator("b"))
    assert not torch.equal(a, b)


def test_countsketch_is_exact_when_entries_do_not_collide():
    # one non-zero entry: the sketch holds it with a sign, so its norm is exact
    v = torch.zeros(500)
    v[123] = 3.0
    s = compress([("w", v)], CompressionSpec("countsketch", sketch_dim=64, seed=0))
    assert float(s.abs().max()) == 3.0 and int((s != 0).sum()) == 1


def test_settings_hold_only_what_the_method_uses():
    assert CompressionSpec("stride", stride=5, sketch_dim=9).settings() == {"method": "stride", "stride": 5}
    cs = CompressionSpec("countsketch", stride=9, sketch_dim=1024, seed=3).settings()
    assert cs["dim"] == 1024 and cs["seed"] == 3 and "stride" not in cs
    assert CompressionSpec("stride", stride=5).output_dim(11) == 3
    assert CompressionSpec("countsketch", sketch_dim=8).output_dim(10**9) == 8


def test_unknown_compression_lists_known_names():
    with pytest.raises(ConfigError, match="grads.compression: unknown compression 'zip'; known: countsketch"):
        compress([("w", torch.ones(3))], CompressionSpec("zip"))


def test_lowbias32_matches_its_published_definition():
    # hand-evaluated from the C definition for x = 1:
    #   x ^= x >> 16 -> 1; x *= 0x7feb352d -> 0x7feb352d; x ^= x >> 15 -> 0x7feb352d ^ 0xffd6 = 0x7febcafb;
    #   x *= 0x846ca68b (mod 2^32); x ^= x >> 16
    x = 0x7FEBCAFB * 0x846CA68B & 0xFFFFFFFF
    assert C.lowbias32(1) == x ^ (x >> 16)
    assert C.lowbias32(0) == 0  # a fixed point of every xor-shift-multiply mixer: why the key is XORed in
    idx = torch.tensor([0, 1, 2, 12345, 2**31, 2**32 - 1], dtype=torch.int64)
    key = C.lowbias32(77)
    out = C.sketch_hash_(idx.clone(), key, 1 << 32, torch.empty_like(idx))  # no reduction: the raw hash
    assert out.tolist() == [C.lowbias32(int(i) ^ key) for i in idx]


def _reference_inputs() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [("emb.weight", torch.randn(37, 11, generator=g)), ("ln.weight", torch.randn(5, generator=g)),
            ("head.weight", torch.randn(3, 4, 9, generator=g)), ("one", torch.randn(1, generator=g))]


@pytest.mark.parametrize("dim,chunk", [(16, 1 << 20), (24, 7), (64, 100), (5, 1)])
def test_countsketch_equals_the_plain_python_reference(monkeypatch, dim, chunk):
    """D=24 and 5: not powers of two (the remainder path); chunks of 7, 100 and 1 split every tensor."""
    monkeypatch.setattr(C, "_SKETCH_CHUNK", chunk)
    named = _reference_inputs()
    ref = C.countsketch_reference([(n, t.numpy()) for n, t in named], dim, seed=3)
    got = compress(named, CompressionSpec("countsketch", sketch_dim=dim, seed=3))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-5)
    assert np.abs(ref).sum() > 0
    # batched: every row is its own source's reference sketch
    batch = [(n, torch.stack([t, 2 * t + 1, -t])) for n, t in named]
    rows = compress(batch, CompressionSpec("countsketch", sketch_dim=dim, seed=3), batched=True)
    for b in range(3):
        ref_b = C.countsketch_reference([(n, t[b].numpy()) for n, t in batch], dim, seed=3)
        np.testing.assert_allclose(rows[b].numpy(), ref_b, rtol=1e-6, atol=1e-5)


def test_countsketch_reference_keeps_the_seed_clash_rule(monkeypatch):
    monkeypatch.setattr(C, "tensor_seed", lambda name, seed: 9)  # every tensor asks for the same seed
    named = _reference_inputs()
    ref = C.countsketch_reference([(n, t.numpy()) for n, t in named], 32, seed=0)
    np.testing.assert_allclose(compress(named, CompressionSpec("countsketch", sketch_dim=32)).numpy(), ref,
                               rtol=1e-6, atol=1e-5)
    # and the clash moved the later tensors: sharing the first seed would give another sketch
    shared = np.zeros(32)
    key = C.lowbias32(9)
    for _, t in named:
        for i, x in enumerate(t.double().flatten().tolist()):
            v = C.lowbias32(i ^ key) % 64
            shared[v % 32] += x if v >= 32 else -x
    assert not np.allclose(ref, shared)


def test_countsketch_does_not_depend_on_the_chunk_size(monkeypatch):
    """The hash is of the index alone and each chunk's entries are added in index order, so a chunk much
    smaller than the tensor (the only integer tensors are two chunk-sized buffers) gives the same bits."""
    g = torch.Generator().manual_seed(5)
    named = [("big", torch.randn(50_000, generator=g)), ("small", torch.randn(300, generator=g))]
    spec = CompressionSpec("countsketch", sketch_dim=128, seed=1)
    whole = compress(named, spec)
    allocated = []
    real_empty = torch.empty

    def spy(*size, **kw):
        t = real_empty(*size, **kw)
        if not t.dtype.is_floating_point:
            allocated.append(t.numel())
        return t

    monkeypatch.setattr(C.torch, "empty", spy)
    for chunk in (4096, 1000, 1):
        monkeypatch.setattr(C, "_SKETCH_CHUNK", chunk)
        allocated.clear()
        assert torch.equal(compress(named, spec), whole)
        assert allocated and max(allocated) == chunk  # index buffers of one chunk, never of the tensor


def test_countsketch_refuses_a_tensor_past_the_index_range():
    big = torch.zeros(1).expand(2**32 + 1)  # a view: no memory behind it
    with pytest.raises(ValueError, match="2\\^32"):
        compress([("huge", big)], CompressionSpec("countsketch", sketch_dim=8))


def test_pipeline_check_rejects_unknown_compression_and_a_huge_jl():
    from merit.config import load_config
    from merit.pipeline import check

    base = {"model": {"path": "m"}, "mixture": {"dir": "d"}}
    with pytest.raises(ConfigError, match="grads.compression: unknown compression 'gzip'; known: countsketch, jl"):
        check(load_config({**base, "grads": {"compression": "gzip"}}))
    with pytest.raises(ConfigError, match="grads.sketch_dim=65536 with grads.compression=jl"):
        check(load_config({**base, "grads": {"compression": "jl"}}))
    check(load_config({**base, "grads": {"compression": "jl", "sketch_dim": 1024}}))
