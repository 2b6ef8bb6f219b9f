"""Incremental cosines, the per-source gradient store, and resume of gradient estimation (tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from merit.conflict import estimate as estimate_mod
from merit.conflict import store
from merit.conflict.compress import CompressionSpec
from merit.conflict import cosine
from merit.conflict.cosine import Rows, array_rows, cosine_matrix, extend_cosine, streamed_cosine, unit_rows
from merit.data.chat import IGNORE, Tokenized
from merit.errors import DataError

# ------------------------------------------------------------------------------------------ cosines


@pytest.mark.parametrize("t_old", [1, 3, 4, 7, 8, 10])
def test_extend_cosine_is_bitwise_equal_to_from_scratch(t_old):
    g = np.random.default_rng(0).standard_normal((11, 50)).astype(np.float32)
    scratch = cosine_matrix(g, tile=4)  # tile 4: several tiles, a padded last one
    c, unit = extend_cosine(cosine_matrix(g[:t_old], tile=4), unit_rows(g[:t_old]), g[t_old:], tile=4)
    np.testing.assert_array_equal(c, scratch)
    np.testing.assert_array_equal(unit, unit_rows(g))
    # and it is the cosine matrix
    u = g / np.linalg.norm(g.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(scratch, u @ u.T, atol=1e-12)


def test_extend_cosine_rejects_mismatched_inputs():
    g = np.random.default_rng(1).standard_normal((4, 6))
    with pytest.raises(ValueError, match="dims"):
        extend_cosine(cosine_matrix(g), unit_rows(g), np.ones((1, 5)))
    with pytest.raises(ValueError, match="does not match"):
        extend_cosine(cosine_matrix(g), unit_rows(g[:3]), np.ones((1, 6)))
    with pytest.raises(ValueError, match="row"):
        extend_cosine(cosine_matrix(g), unit_rows(g), np.zeros((1, 6)))


# ------------------------------------------------------------------------------------------ store


def _save(folder, vectors: dict[str, np.ndarray]) -> dict[str, str]:
    keys = {}
    for name, v in vectors.items():
        keys[name] = f"key-{name}"
        store.save_vector(folder, name, torch.from_numpy(v), keys[name])
    return keys


def test_cosine_cache_extends_with_only_the_new_sources(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    vecs = {f"s{i}": rng.standard_normal(40).astype(np.float32) for i in range(7)}
    keys = _save(tmp_path, vecs)
    names = list(vecs)
    first = store.update_cosine(tmp_path, names[:4], keys)
    np.testing.assert_array_equal(first, cosine_matrix(np.stack([vecs[n] for n in names[:4]])))

    seen = []
    real = store.streamed_cosine

    def spy(rows, *, c_old=None, **kw):
        seen.append((len(c_old), rows.count))
        return real(rows, c_old=c_old, **kw)

    monkeypatch.setattr(store, "streamed_cosine", spy)
    both = store.update_cosine(tmp_path, names, keys)
    assert seen == [(4, 7)]  # the 4 cached rows are reused; only the tile rows from the 3 new ones are computed
    np.testing.assert_array_equal(both, cosine_matrix(np.stack([vecs[n] for n in names])))

    # another order of the same sources: the same cache, permuted, nothing recomputed
    seen.clear()
    order = names[::-1]
    permuted = store.update_cosine(tmp_path, order, keys)
    assert seen == []
    idx = [names.index(n) for n in order]
    np.testing.assert_array_equal(permuted, both[np.ix_(idx, idx)])


def test_cosine_cache_drops_a_changed_source(tmp_path):
    rng = np.random.default_rng(3)
    vecs = {f"s{i}": rng.standard_normal(40).astype(np.float32) for i in range(5)}
    keys = _save(tmp_path, vecs)
    names = list(vecs)
    store.update_cosine(tmp_path, names, keys)
    vecs["s1"] = rng.standard_normal(40).astype(np.float32)  # s1 recomputed under a new key
    store.save_vector(tmp_path, "s1", torch.from_numpy(vecs["s1"]), "key-s1-v2")
    keys["s1"] = "key-s1-v2"
    c = store.update_cosine(tmp_path, names, keys)
    np.testing.assert_allclose(c, cosine_matrix(np.stack([vecs[n] for n in names])), atol=1e-12)


def test_pending_checks_the_key_not_just_the_file(tmp_path):
    store.save_vector(tmp_path, "a", torch.ones(3), "k1")
    (tmp_path / "b.safetensors").write_bytes(b"half a file")  # a file cut short by a kill
    assert store.pending(tmp_path, {"a": "k1", "b": "k2", "c": "k3"}) == ["b", "c"]
    assert store.pending(tmp_path, {"a": "other-config"}) == ["a"]


def test_streamed_cosine_is_the_float64_cosine_matrix():
    # T = 11 on tiles of 4 (a padded last tile), D = 1003 in chunks of 100 (a short last chunk)
    rng = np.random.default_rng(4)
    g = (rng.standard_normal((11, 1003)) * rng.uniform(0.1, 10, (11, 1))).astype(np.float32)
    c = streamed_cosine(array_rows(g), tile=4, chunk=100)
    g64 = g.astype(np.float64)
    u = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
    np.testing.assert_allclose(c, u @ u.T, rtol=0, atol=1e-12)
    assert np.array_equal(np.diag(c), np.ones(11)) and np.array_equal(c, c.T)
    # the chunk changes the rounding, not the value
    np.testing.assert_allclose(streamed_cosine(array_rows(g), tile=4, chunk=1003 * 2), c, rtol=0, atol=1e-12)


def test_streamed_cosine_reads_only_chunks():
    g = np.random.default_rng(5).standard_normal((6, 250)).astype(np.float32)
    widths = []

    def read(i, start, stop):
        widths.append(stop - start)
        return g[i, start:stop]

    c = streamed_cosine(Rows(6, 250, read), tile=4, chunk=64)
    assert max(widths) == 64 and sorted(set(widths)) == [58, 64]  # 250 = 3·64 + 58
    np.testing.assert_array_equal(c, cosine_matrix(g, tile=4, chunk=64))


def test_streamed_cosine_extended_in_batches_is_bitwise_from_scratch():
    g = np.random.default_rng(6).standard_normal((11, 1003)).astype(np.float32)
    scratch = streamed_cosine(array_rows(g), tile=4, chunk=100)
    c = None
    for t in (1, 3, 4, 9, 11):  # inside a tile, up to a tile's end, across tiles
        c = streamed_cosine(array_rows(g[:t]), c_old=c, tile=4, chunk=100)
    np.testing.assert_array_equal(c, scratch)


def test_store_cosines_stay_bitwise_under_incremental_updates(tmp_path):
    """Through the files: 70 sources (two row tiles of 64) of 2^16 + 37 entries (two column chunks), added
    in four batches, against one from-scratch computation in a second store and the in-memory one."""
    assert cosine.TILE == 64 and cosine.COLUMN_CHUNK == 1 << 16
    rng = np.random.default_rng(7)
    d = (1 << 16) + 37
    vecs = {f"s{i:02d}": rng.standard_normal(d).astype(np.float32) for i in range(70)}
    keys = _save(tmp_path / "inc", vecs)
    _save(tmp_path / "scratch", vecs)
    names = list(vecs)
    for t in (30, 35, 66, 70):
        inc = store.update_cosine(tmp_path / "inc", names[:t], keys)
    scratch = store.update_cosine(tmp_path / "scratch", names, keys)
    np.testing.assert_array_equal(inc, scratch)
    np.testing.assert_array_equal(scratch, cosine_matrix(store.load_vectors(tmp_path / "scratch", names)))
    g = np.stack(list(vecs.values())).astype(np.float64)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(scratch, u @ u.T, rtol=0, atol=1e-12)


def test_truncated_or_foreign_vector_file_is_refused_with_its_name(tmp_path):
    rng = np.random.default_rng(8)
    vecs = {f"s{i}": rng.standard_normal(100).astype(np.float32) for i in range(3)}
    keys = _save(tmp_path, vecs)
    path = store.vector_path(tmp_path, "s1")
    data = path.read_bytes()
    path.write_bytes(data[:-12])  # the last three entries cut off
    assert store.stored_key(tmp_path, "s1") is None  # for resume: as if missing, so it is recomputed
    assert store.pending(tmp_path, keys) == ["s1"]
    with pytest.raises(DataError, match=r"s1\.safetensors: truncated .*rerun the grads stage"):
        store.update_cosine(tmp_path, list(vecs), keys)
    path.write_bytes(data[:5])
    with pytest.raises(DataError, match="s1.safetensors: not a safetensors file"):
        store.update_cosine(tmp_path, list(vecs), keys)
    from safetensors.numpy import save_file

    save_file({"g": rng.standard_normal(100)}, str(path))  # float64: not what the store writes
    with pytest.raises(DataError, match="expected a 1-D F32 vector"):
        store.update_cosine(tmp_path, list(vecs), keys)
    store.save_vector(tmp_path, "s1", torch.ones(99), keys["s1"])
    with pytest.raises(DataError, match="differ in length"):
        store.update_cosine(tmp_path, list(vecs), keys)


def test_a_cache_of_another_version_is_recomputed_not_extended(tmp_path):
    rng = np.random.default_rng(9)
    vecs = {f"s{i}": rng.standard_normal(40).astype(np.float32) for i in range(4)}
    keys = _save(tmp_path, vecs)
    names = list(vecs)
    np.savez(tmp_path / store.COSINE_CACHE, keys=np.array([keys[n] for n in names[:2]]), matrix=np.eye(2))
    c = store.update_cosine(tmp_path, names, keys)  # the version-less identity would be wrong if kept
    np.testing.assert_array_equal(c, cosine_matrix(np.stack(list(vecs.values()))))


def test_load_conflict_without_a_cache_streams_the_vectors(tmp_path):
    rng = np.random.default_rng(10)
    vecs = {f"s{i}": rng.standard_normal(300).astype(np.float32) for i in range(5)}
    keys = _save(tmp_path, vecs)
    names = list(vecs)[::-1]
    store.write_store_manifest(tmp_path, "stage", names, keys, {"method": "none"})
    assert artifacts_dim(tmp_path) == 300
    with_cache = store.load_conflict(tmp_path)
    (tmp_path / store.COSINE_CACHE).unlink()
    without = store.load_conflict(tmp_path)
    assert with_cache[0] == without[0] == names
    np.testing.assert_array_equal(with_cache[1], without[1])
    np.testing.assert_array_equal(without[1], cosine_matrix(np.stack([vecs[n] for n in names])))


def artifacts_dim(folder) -> int:
    from merit import artifacts

    return artifacts.read_manifest(folder)["dim"]


# ------------------------------------------------------------------------------ estimate + resume


class _Tok:
    pad_token_id = 0


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _examples(seed: int, n: int = 6) -> list[Tokenized]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(6, 12))
        ids = rng.integers(1, 40, size=length).tolist()
        labels = [IGNORE] * (length // 2) + ids[length // 2 :]
        out.append(Tokenized(ids, labels, False))
    return out


def _run(folder, sources, keys, spec=CompressionSpec("countsketch", sketch_dim=256, seed=0)):
    return estimate_mod.estimate(_tiny_model(), _Tok(), sources, folder, keys=keys, spec=spec,
                                 calibration_size=4, batch_size=3, seed=0, device="cpu")


def test_resume_after_kill_computes_only_the_missing_sources(tmp_path, monkeypatch):
    sources = {f"src{i}": _examples(i) for i in range(5)}
    keys = {n: f"key-{n}" for n in sources}
    real = estimate_mod.mean_gradient
    calls = []

    def dies_after_two(*args, **kw):
        if len(calls) == 2:
            raise RuntimeError("simulated kill")
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(estimate_mod, "mean_gradient", dies_after_two)
    with pytest.raises(RuntimeError, match="simulated kill"):
        _run(tmp_path / "run", sources, keys)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["src0.safetensors", "src1.safetensors"]

    calls.clear()
    monkeypatch.setattr(estimate_mod, "mean_gradient", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    stats = _run(tmp_path / "run", sources, keys)
    assert len(calls) == 3 and sorted(stats) == ["src2", "src3", "src4"]
    assert store.pending(tmp_path / "run", keys) == []

    # the resumed store holds exactly what an uninterrupted run computes
    _run(tmp_path / "clean", sources, keys)
    for n in sources:
        a = store.load_vectors(tmp_path / "run", [n])
        b = store.load_vectors(tmp_path / "clean", [n])
        np.testing.assert_array_equal(a, b)


def test_mean_gradient_does_not_depend_on_batch_size():
    model = _tiny_model()
    ex = _examples(9, n=7)
    a = dict(estimate_mod.mean_gradient(model, ex, 7, 0))
    b = dict(estimate_mod.mean_gradient(model, ex, 2, 0))
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6)
    # the token-mean loss: the gradient of the mean CE over all label tokens
    model.zero_grad()
    batch = estimate_mod.pad_batch(ex, 0)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(a[n], p.grad, rtol=1e-4, atol=1e-6)


def test_loss_takes_logits_only_at_label_positions_and_matches_the_full_loss():
    model = _tiny_model()
    batch = estimate_mod.pad_batch(_examples(3, n=4), 0)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    loss, n = estimate_mod.summed_token_loss(model, batch)
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert n == labelled and seen == [(labelled, 40)]  # not (B, L, V)

    class FullLogitsOnly(torch.nn.Module):  # a forward without logits_to_keep takes the fallback path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    full, n_full = estimate_mod.summed_token_loss(FullLogitsOnly(model), batch)
    assert n_full == n and seen[-1] == (*batch["input_ids"].shape, 40)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lean_gradient_paths_give_the_plain_autograd_gradient(checkpointing):
    # tied embedding (SmolLM2's case): the head accumulates in place, the embedding's gradient is sparse
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ex = _examples(5, n=5)
    lean = dict(estimate_mod.mean_gradient(model, ex, 2, 0, checkpointing=checkpointing))
    # the model is left as it was: no patched forward, dense embedding, no checkpointing, eval mode
    assert "forward" not in vars(model.lm_head) and not model.model.embed_tokens.sparse
    assert not model.is_activation_checkpointing and not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    batch = estimate_mod.pad_batch(ex, 0)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(lean[n], p.grad, rtol=1e-4, atol=1e-6)
