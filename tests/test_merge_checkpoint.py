"""The streaming merge engine on tiny Llama checkpoints built here: results, layout, checks, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merit.errors import MeritError
from merit.merge import checkpoint, operators
from merit.merge.checkpoint import merge_checkpoints
from merit.merge.safetensors_io import INDEX, checkpoint_tensors, parse_size, plan_shards

WEIGHTS = [0.5, 0.3, 0.2]


def tiny_config(vocab: int = 96, tied: bool = False, intermediate: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tied,
                       max_position_embeddings=64)


def build(folder: Path, cfg, seed: int, base_state: dict | None = None, noise: float = 0.05,
          theta0_hash: str | None = None, tokens: int | None = None, **save_kw) -> Path:
    """Save a tiny Llama: θ(0) from ``seed``, or ``base_state`` + N(0, noise²) as a branch (with a manifest)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if base_state is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name] + noise * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder, **save_kw)
    if theta0_hash is not None:
        (folder / "manifest.json").write_text(json.dumps({"theta0_hash": theta0_hash, "tokens_seen": tokens}))
    return folder


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """θ(0), three branches (the second sharded into several files) and the second again as one file."""
    from transformers import LlamaForCausalLM

    from merit.models.loading import checkpoint_hash

    root = tmp_path_factory.mktemp("merge")
    cfg = tiny_config()
    base = build(root / "theta0", cfg, seed=0)
    h = checkpoint_hash(base)
    state = LlamaForCausalLM.from_pretrained(base).state_dict()
    b0 = build(root / "b0", cfg, 1, state, theta0_hash=h, tokens=500)
    b1 = build(root / "b1", cfg, 2, state, theta0_hash=h, tokens=300, max_shard_size="20KB")
    b2 = build(root / "b2", cfg, 3, state, theta0_hash=h, tokens=200)
    b1_single = build(root / "b1_single", cfg, 2, state)
    assert (b1 / INDEX).is_file() and len(list(b1.glob("*.safetensors"))) > 2
    return {"root": root, "base": base, "branches": [b0, b1, b2], "b1_single": b1_single, "hash": h}


def test_merge_is_the_weighted_sum_and_sharded_output_loads(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    info = merge_checkpoints(ckpts["branches"], WEIGHTS, "token-weighted", out, shard_size="30KB", chunk_elements=256)
    assert info["shards"] > 1 and (out / INDEX).is_file()
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*-of-*.safetensors")}
    assert index["metadata"]["total_size"] == info["bytes_written"]
    states = [state_of(b) for b in ckpts["branches"]]
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in state_of(out).items():
        expected = sum(w * s[name].float() for w, s in zip(WEIGHTS, states))
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        assert torch.equal(merged[name], value)
    assert info["parameters"] == sum(t.numel() for t in states[0].values())
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert temporaries(out) == []


def test_sharded_and_single_file_inputs_give_identical_bytes(ckpts, tmp_path):
    b0, b1, b2 = ckpts["branches"]
    merge_checkpoints([b0, b1, b2], WEIGHTS, "token-weighted", tmp_path / "a")
    merge_checkpoints([b0, ckpts["b1_single"], b2], WEIGHTS, "token-weighted", tmp_path / "b")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_output_dtype_option(ckpts, tmp_path):
    out = tmp_path / "bf16"
    merge_checkpoints(ckpts["branches"], WEIGHTS, "token-weighted", out, dtype="bfloat16")
    assert {e.dtype for e in checkpoint_tensors(out).values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = tmp_path / "fp32"
    merge_checkpoints(ckpts["branches"], WEIGHTS, "token-weighted", fp32)
    assert {e.dtype for e in checkpoint_tensors(fp32).values()} == {"F32"}
    a, b = state_of(out), state_of(fp32)
    for name in a:
        assert torch.equal(a[name], b[name].to(torch.bfloat16))  # fp32 accumulation, one final rounding


@pytest.mark.parametrize("method", ["token-weighted", "uniform", "task-arithmetic", "ties", "dare", "dare-ties", "star", "tsv",
                                    "iso-c", "iso-cts", "model-stock"])
def test_engine_equals_the_operator_on_whole_tensors(ckpts, tmp_path, method):
    op = checkpoint.resolve(method)
    params = op.resolve_params({"density": 0.5} if "density" in op.params else {})
    out = tmp_path / method
    # Small slices force the slice-by-slice path for elementwise operators.
    merge_checkpoints(ckpts["branches"], WEIGHTS, op, out, base=ckpts["base"], params=params, chunk_elements=100,
                      workers=3)
    states = [state_of(b) for b in ckpts["branches"]]
    base = state_of(ckpts["base"])
    for name, value in state_of(out).items():
        p = {**params, "seed": operators.tensor_seed(params["seed"], name)} if op.seeded else params
        expected = op([s[name] for s in states], WEIGHTS, base=base[name], **p)
        # An fp32 SVD inside an engine worker thread runs LAPACK with another thread split than in this
        # thread, so the spectral operators agree to SVD rounding (measured up to 1.4e-6), not bit for bit.
        tol = 1e-5 if method in SPECTRAL else 1e-6
        torch.testing.assert_close(value, expected, rtol=0, atol=tol)


SPECTRAL = {"star", "tsv", "iso-c", "iso-cts"}


def test_random_operators_do_not_depend_on_workers_or_order(ckpts, tmp_path):
    kw = {"base": ckpts["base"], "params": {"density": 0.3, "seed": 5}}
    merge_checkpoints(ckpts["branches"], WEIGHTS, "dare-ties", tmp_path / "one", workers=1, **kw)
    merge_checkpoints(ckpts["branches"], WEIGHTS, "dare-ties", tmp_path / "four", workers=4, **kw)
    assert (tmp_path / "one/model.safetensors").read_bytes() == (tmp_path / "four/model.safetensors").read_bytes()
    merge_checkpoints(ckpts["branches"], WEIGHTS, "dare-ties", tmp_path / "seed6", base=ckpts["base"],
                      params={"density": 0.3, "seed": 6})
    assert (tmp_path / "one/model.safetensors").read_bytes() != (tmp_path / "seed6/model.safetensors").read_bytes()


def test_memory_budget_holds(ckpts, tmp_path):
    k = len(ckpts["branches"])
    largest = max(e.numel for e in checkpoint_tensors(ckpts["branches"][0]).values())
    info = merge_checkpoints(ckpts["branches"], WEIGHTS, "token-weighted", tmp_path / "a", chunk_elements=100,
                             workers=4)
    assert info["memory_bound_bytes"] == (k + 2) * largest * 4
    assert 0 < info["peak_unit_bytes"] <= info["memory_bound_bytes"]
    info = merge_checkpoints(ckpts["branches"], WEIGHTS, "ties", tmp_path / "b", base=ckpts["base"], workers=4)
    assert 0 < info["peak_unit_bytes"] <= info["memory_bound_bytes"]


# --------------------------------------------------------------------------------------------- checks


def _refused(branches, out: Path, match: str, **kw) -> MeritError:
    with pytest.raises(MeritError, match=match) as e:
        merge_checkpoints(branches, None, kw.pop("op", "token-weighted"), out, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists() and temporaries(out) == []
    return e.value


def test_refuses_mismatched_keys(ckpts, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(ckpts["b1_single"], odd)
    state = load_file(str(odd / "model.safetensors"))
    state["model.extra.weight"] = torch.zeros(3)
    save_file(state, str(odd / "model.safetensors"), metadata={"format": "pt"})
    err = _refused([ckpts["branches"][0], odd], tmp_path / "out", "has 1 tensor\\(s\\) that .* lacks")
    assert "model.extra.weight" in str(err) and str(odd) in str(err)
    _refused([odd, ckpts["branches"][0]], tmp_path / "out", "lacks 1 tensor")


def test_refuses_mismatched_shapes_and_dtypes(ckpts, tmp_path):
    wide = build(tmp_path / "wide", tiny_config(intermediate=48), seed=4)
    err = _refused([ckpts["branches"][0], wide], tmp_path / "out", "has shape")
    assert "mlp" in str(err)
    from transformers import LlamaForCausalLM

    half = tmp_path / "half"
    LlamaForCausalLM.from_pretrained(ckpts["b1_single"]).to(torch.bfloat16).save_pretrained(half)
    _refused([ckpts["branches"][0], half], tmp_path / "out", "is BF16 but .* has F32")


def test_refuses_vocabulary_mismatch_saying_what_differs(ckpts, tmp_path):
    bigger = build(tmp_path / "v97", tiny_config(vocab=97), seed=5)
    err = _refused([ckpts["branches"][0], bigger], tmp_path / "out", "vocabulary sizes differ")
    assert "96" in str(err) and "97" in str(err)
    # Without config.json (bare weight files), the embedding rows tell.
    bare = tmp_path / "bare.safetensors"
    shutil.copy(bigger / "model.safetensors", bare)
    bare0 = tmp_path / "bare0.safetensors"
    shutil.copy(ckpts["b1_single"] / "model.safetensors", bare0)
    _refused([bare0, bare], tmp_path / "out",
             "vocabulary sizes differ: .* has 97 \\(rows of (lm_head|model.embed_tokens).weight\\)")


def test_refuses_branches_from_different_theta0(ckpts, tmp_path):
    b0, b1, _ = ckpts["branches"]
    other = tmp_path / "other"
    shutil.copytree(b1, other)
    (other / "manifest.json").write_text(json.dumps({"theta0_hash": "f" * 64}))
    _refused([b0, other], tmp_path / "out", "θ\\(0\\) hash ffffffffffff… differs .*--allow-different-base")
    info = merge_checkpoints([b0, other], None, "uniform", tmp_path / "out", allow_different_base=True)
    assert info["tensors"] > 0


def test_refuses_a_base_that_is_not_the_branches_theta0(ckpts, tmp_path):
    wrong = tmp_path / "wrong"
    shutil.copytree(ckpts["b1_single"], wrong)
    _refused(ckpts["branches"], tmp_path / "out", "is not the θ\\(0\\) hash", op="ties", base=wrong)
    _refused(ckpts["branches"], tmp_path / "out", "give θ\\(0\\) with --base", op="ties")


@pytest.mark.parametrize("method", ["token-weighted", "ties"])
def test_refuses_nan_in_an_input(ckpts, tmp_path, method):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["b1_single"], bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    err = _refused([ckpts["branches"][0], bad], tmp_path / "out", "contains NaN or Inf", op=method,
                   base=ckpts["base"] if method == "ties" else None, allow_different_base=True)
    assert str(bad) in str(err) and "model.layers.1.mlp.up_proj.weight" in str(err)


def test_refuses_nan_in_the_output(ckpts, tmp_path):
    def explode(tensors, weights):
        return tensors[0].float() * float("inf")

    _refused(ckpts["branches"], tmp_path / "out", "the merge result is NaN or Inf", op=explode)


def test_refuses_output_folder_that_is_an_input(ckpts):
    with pytest.raises(MeritError, match="one of the inputs"):
        merge_checkpoints(ckpts["branches"], None, "uniform", ckpts["branches"][1])


def test_tied_embeddings_are_written_once(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cfg = tiny_config(tied=True)
    base = build(tmp_path / "theta0", cfg, seed=0)
    state = LlamaForCausalLM.from_pretrained(base).state_dict()
    a = build(tmp_path / "a", cfg, 1, state)
    b = build(tmp_path / "b", cfg, 2, state)
    assert "lm_head.weight" not in state_of(a)
    # A tied checkpoint that also stores lm_head (as some exporters do) merges with one that does not.
    sb = state_of(b)
    sb["lm_head.weight"] = sb["model.embed_tokens.weight"].clone()
    save_file(sb, str(b / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    info = merge_checkpoints([a, b], [0.5, 0.5], "token-weighted", out)
    assert info["tied_not_written"] == ["lm_head.weight"]
    assert "lm_head.weight" not in state_of(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = 0.5 * state_of(a)["model.embed_tokens.weight"] + 0.5 * sb["model.embed_tokens.weight"]
    torch.testing.assert_close(model.lm_head.weight.detach(), expected, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------- crashes


def test_operator_failing_midway_leaves_nothing_and_a_rerun_completes(ckpts, tmp_path):
    calls = [0]

    def flaky(tensors, weights):
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("boom")
        return operators.token_weighted.fn(tensors, weights)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        merge_checkpoints(ckpts["branches"], WEIGHTS, flaky, out, workers=2)
    assert not out.exists() and temporaries(out) == []
    merge_checkpoints(ckpts["branches"], WEIGHTS, flaky, out)
    assert (out / "model.safetensors").is_file()


def test_sigkill_midway_leaves_no_complete_output_and_a_rerun_completes(ckpts, tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent("""
        import os, signal, sys
        from merit.merge.checkpoint import merge_checkpoints
        calls = [0]
        def op(tensors, weights):
            calls[0] += 1
            if calls[0] == 8:
                os.kill(os.getpid(), signal.SIGKILL)
            return tensors[0].float()
        merge_checkpoints(sys.argv[2:], None, op, sys.argv[1], workers=1, shard_size=20000)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(out), *map(str, ckpts["branches"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    (stale,) = temporaries(out)
    assert not (stale / INDEX).exists() and not (stale / "config.json").exists()  # nothing complete-looking
    info = merge_checkpoints(ckpts["branches"], WEIGHTS, "token-weighted", out, shard_size=20000)
    assert temporaries(out) == [] and (out / INDEX).is_file() and info["shards"] > 1


# ----------------------------------------------------------------------------------------------- format


def test_shard_plan_and_sizes():
    shards = plan_shards([("a", "F32", (10,)), ("b", "F32", (10,)), ("c", "F32", (30,)), ("d", "BF16", (4,))], 80)
    assert [s.names for s in shards] == [["a", "b"], ["c"], ["d"]]
    assert [s.filename for s in shards][0] == "model-00001-of-00003.safetensors"
    assert plan_shards([("a", "F32", (10,))], 80)[0].filename == "model.safetensors"
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 5 * 10**8
    with pytest.raises(MeritError, match="--shard-size"):
        parse_size("lots")


def test_written_header_is_read_by_safetensors(ckpts, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    merge_checkpoints(ckpts["branches"], WEIGHTS, "token-weighted", out, shard_size="10KB")
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as r:
            assert r.metadata() == {"format": "pt"}
            for k in r.keys():
                assert torch.isfinite(r.get_tensor(k)).all()
    assert os.path.getsize(out / INDEX) > 0
