"""The token cache (merit.data.tokens): same tokens as the in-memory path, resumable, corruption-proof."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import FAMILIES, chat, make_mixture_dir, word, write_jsonl
from merit import artifacts
from merit.data import mixture as mixture_stage
from merit.data import formats, tokens
from merit.data.jsonl import read_examples
from merit.errors import DataError


def _request(tokenizer, path, root, max_length=64, limit=None):
    return tokens.request(path.stem, formats.open_reader(formats.ReadSpec(path)), root,
                          tokens.tokenizer_identity(tokenizer), artifacts.file_sha256(path), max_length, limit)


def _rows(n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, answer = FAMILIES["upper_copy"](word(rng))
        if long_every and i % long_every == 0:
            prompt = "x" * 200 + prompt  # truncated to nothing at max_length 64: skipped
        rows.append(chat(prompt, answer))
    return rows


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.input_ids, x.labels, x.truncated) == (y.input_ids, y.labels, y.truncated)


@pytest.fixture
def tokenizer(tiny_checkpoint):
    from merit.models.loading import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


def test_cached_rows_equal_the_in_memory_tokenizer(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "train" / "src.jsonl", _rows(300, long_every=7))
    monkeypatch.setattr(formats.containers, "SHARD_BYTES", 2000)  # several shards, cut at line starts
    req = _request(tokenizer, path, tmp_path / "cache")
    assert tokens.build([req], tokenizer) > 3
    table = tokens.open_tokens(req)
    expected, truncated, skipped = mixture_stage.tokenize_examples(tokenizer, read_examples(path), 64, "x")
    assert skipped > 0  # the long prompts are cut to nothing and left out, as before
    _same(table, expected)
    index = tokens.read_index(req)
    assert index["rows"] == len(expected) and index["skipped"] == skipped and index["truncated"] == truncated
    assert index["tokens"] == sum(len(t.input_ids) for t in expected) == sum(table.lengths())
    assert index["loss_tokens"] == sum(t.loss_tokens for t in expected)
    assert tokens.build([req], tokenizer) == 0  # whole: nothing tokenized again


def test_limit_takes_the_first_examples(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "src.jsonl", _rows(50))
    path.write_text(path.read_text().replace("\n", "\n\n", 3))  # blank lines do not count as examples
    monkeypatch.setattr(formats.containers, "SHARD_BYTES", 500)
    req = _request(tokenizer, path, tmp_path / "cache", limit=17)
    tokens.build([req], tokenizer)
    expected, _, _ = mixture_stage.tokenize_examples(tokenizer, read_examples(path, 17), 64, "x")
    _same(tokens.open_tokens(req), expected)


def test_errors_name_the_file_line_in_any_shard(tmp_path, tokenizer, monkeypatch):
    rows = [json.dumps(r) for r in _rows(60)]
    rows[41] = '{"messages": [{"role": "user", "content": "hi"}]}'  # no assistant turn, on line 42
    path = tmp_path / "src.jsonl"
    path.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(formats.containers, "SHARD_BYTES", 700)
    req = _request(tokenizer, path, tmp_path / "cache")
    with pytest.raises(DataError, match=rf"{path}:42: no assistant turn"):
        tokens.build([req], tokenizer)
    assert tokens.open_tokens(req) is None
    assert not list(req.folder.glob(".*.tmp"))  # nothing half-written left behind


def test_killed_tokenization_resumes_with_the_missing_shards(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "src.jsonl", _rows(200))
    monkeypatch.setattr(formats.containers, "SHARD_BYTES", 1500)
    req = _request(tokenizer, path, tmp_path / "cache")
    real = tokens.tokenize_shard
    calls = []

    def dies_on_the_third(tok, r, shard):
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill in the middle of the third shard
        calls.append(shard.index)
        return real(tok, r, shard)

    monkeypatch.setattr(tokens, "tokenize_shard", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        tokens.build([req], tokenizer)
    monkeypatch.setattr(tokens, "tokenize_shard", lambda tok, r, shard: calls.append(shard.index) or real(tok, r, shard))
    shards = formats.plan_shards(formats.open_reader(formats.ReadSpec(path)), None)
    redone = tokens.build([req], tokenizer)
    assert redone == len(shards) - 2 and calls[2:] == [s.index for s in shards[2:]]
    expected, _, _ = mixture_stage.tokenize_examples(tokenizer, read_examples(path), 64, "x")
    _same(tokens.open_tokens(req), expected)


@pytest.mark.parametrize("damage", ["truncate", "drop-index-shard"])
def test_a_damaged_cache_is_rebuilt_never_read(tmp_path, tokenizer, monkeypatch, capsys, damage):
    path = write_jsonl(tmp_path / "src.jsonl", _rows(200))
    monkeypatch.setattr(formats.containers, "SHARD_BYTES", 1500)
    req = _request(tokenizer, path, tmp_path / "cache")
    tokens.build([req], tokenizer)
    arrow = sorted(req.folder.glob("shard-*.arrow"))[1]
    if damage == "truncate":  # a copy cut short: the Arrow stream may still parse, with fewer rows
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    else:
        arrow.unlink()
    assert tokens.open_tokens(req) is None
    assert "token cache damaged" in capsys.readouterr().err
    table = tokens.load(req, tokenizer)
    expected, _, _ = mixture_stage.tokenize_examples(tokenizer, read_examples(path), 64, "x")
    _same(table, expected)


def test_parallel_workers_write_the_same_rows(tmp_path, tokenizer, tiny_checkpoint, monkeypatch):
    path = write_jsonl(tmp_path / "src.jsonl", _rows(120, long_every=9))
    monkeypatch.setattr(formats.containers, "SHARD_BYTES", 2500)
    one = _request(tokenizer, path, tmp_path / "one")
    two = _request(tokenizer, path, tmp_path / "two")
    tokens.build([one], tokenizer, num_proc=1, tokenizer_path=tiny_checkpoint)
    # Spawned workers import merit afresh: SHARD_BYTES there is the module's own, but the shard plan
    # is made here and sent with each task.
    tokens.build([two], tokenizer, num_proc=2, tokenizer_path=tiny_checkpoint)
    _same(tokens.open_tokens(one), tokens.open_tokens(two))
    assert tokens.read_index(one)["rows"] == tokens.read_index(two)["rows"]


def test_key_follows_what_decides_the_tokens(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "src.jsonl", _rows(5))
    base = _request(tokenizer, path, tmp_path)
    assert _request(tokenizer, path, tmp_path).key == base.key
    assert _request(tokenizer, path, tmp_path, max_length=32).key != base.key
    assert _request(tokenizer, path, tmp_path, limit=3).key != base.key
    write_jsonl(path, _rows(5, seed=1))
    assert _request(tokenizer, path, tmp_path).key != base.key


def test_pipeline_tokenizes_once_and_branches_read_the_cache(tmp_path, tiny_checkpoint, monkeypatch):
    from merit.config import RunConfig
    from merit.pipeline import run

    mix = make_mixture_dir(tmp_path / "mix", n_train=16, n_eval=2, names=list(FAMILIES)[:4])
    cfg = RunConfig.model_validate({
        "model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mix), "max_length": 64},
        "grads": {"calibration_size": 4, "batch_size": 4, "sketch_dim": 256},
        "split": {"r": 1}, "train": {"epochs": 1, "batch_size": 8},
        "baselines": {"random": False, "joint": False}})
    shards = []
    real = tokens.tokenize_shard
    monkeypatch.setattr(tokens, "tokenize_shard", lambda *a: shards.append(a[2]) or real(*a))
    run(cfg, tmp_path / "run", until="branches")
    assert len(shards) == 4  # one pass: the grads stage and the branches read the Arrow files
    manifest = artifacts.read_manifest(tmp_path / "run" / "mixture")
    assert all(Path(e["tokens_dir"]).parent == tmp_path / "run" / "mixture" / "tokens" for e in manifest["sources"])
    # A changed gradient setting recomputes the gradients, not the tokens.
    run(cfg.model_copy(update={"grads": cfg.grads.model_copy(update={"sketch_dim": 128})}), tmp_path / "run",
        until="grads")
    assert len(shards) == 4


def test_vlm_cached_rows_equal_the_processor_path(tmp_path, tiny_vlm_checkpoint):
    from PIL import Image

    from merit.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_vlm_checkpoint)
    (tmp_path / "img").mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (56 + 28 * (i % 2), 56), colour).save(tmp_path / "img" / f"{i}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                                  {"role": "assistant", "content": colour}], "images": [f"img/{i}.png"]})
    rows.append(chat("text only", "fine"))
    path = write_jsonl(tmp_path / "src.jsonl", rows)
    req = _request(tok, path, tmp_path / "cache", max_length=128)
    tokens.build([req], tok)
    table = tokens.open_tokens(req)
    expected, _, _ = mixture_stage.tokenize_examples(tok, read_examples(path), 128, "x")
    _same(table, expected)
    for got, want in zip(table, expected):
        assert got.images == want.images and got.extra == want.extra and got.image_tokens == want.image_tokens
    index = tokens.read_index(req)
    assert index["images"] == 4 and index["image_tokens"] == sum(t.image_tokens for t in expected) > 0


def test_cache_dir_that_is_a_file_fails_before_work(tmp_path, tiny_checkpoint, capsys):
    from merit.cli import main

    mix = make_mixture_dir(tmp_path / "mix", n_train=8, n_eval=2, names=list(FAMILIES)[:4])
    (tmp_path / "not-a-folder").write_text("x")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"model": {"path": str(tiny_checkpoint)},
                               "mixture": {"dir": str(mix), "cache_dir": str(tmp_path / "not-a-folder")},
                               "split": {"r": 1}}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("mixture.cache_dir" in line and "is a file" in line for line in err)
    assert not (tmp_path / "run").exists()
