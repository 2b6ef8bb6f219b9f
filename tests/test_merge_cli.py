"""``merit merge``: the standalone command, its exit codes and its mergekit export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merit.cli import main


def _save(folder: Path, vocab: int, seed: int, theta0_hash: str | None = None, tokens: int | None = None,
          intermediate: int = 64) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    if theta0_hash is not None:
        (folder / "manifest.json").write_text(json.dumps({"theta0_hash": theta0_hash, "tokens_seen": tokens}))
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from merit.models.loading import checkpoint_hash

    root = tmp_path_factory.mktemp("merge_cli")
    base = _save(root / "theta0", 100, 0)
    h = checkpoint_hash(base)
    branches = [_save(root / f"b{i}", 100, i + 1, h, tokens) for i, tokens in enumerate([300, 100])]
    return {"root": root, "base": base, "branches": branches, "hash": h}


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("merit: error: ")
    return err[-1]


def test_merge_uses_manifest_token_weights_by_default(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", "--out", str(out), *map(str, ckpts["branches"])]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"] == pytest.approx([0.75, 0.25]) and manifest["operator"] == "token-weighted"
    a, b = (load_file(str(p / "model.safetensors")) for p in ckpts["branches"])
    merged = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], 0.75 * a[name] + 0.25 * b[name], rtol=0, atol=1e-6)
    assert "merged" in capsys.readouterr().out


def test_weights_are_normalised_and_shards_written(ckpts, tmp_path):
    out = tmp_path / "out"
    assert main(["merge", "--out", str(out), "--weights", "1,3", "--shard-size", "20KB", "--dtype", "bfloat16",
                 *map(str, ckpts["branches"])]) == 0
    assert json.loads((out / "manifest.json").read_text())["weights"] == [0.25, 0.75]
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--weights", "1,2,3"], "3 weights for 2 checkpoints"),
    (["--weights", "1,x"], "cannot read"),
    (["--method", "nope"], "unknown merge 'nope'; known: dare, dare-ties"),
    (["--method", "ties"], "give θ\\(0\\) with --base"),
    (["--density", "0.5"], "--density does not apply to --method token-weighted"),
    (["--method", "ties", "--density", "2"], "density: must be in"),
])
def test_user_errors_exit_2_in_one_line_and_write_nothing(ckpts, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["merge", "--out", str(out), *extra, *map(str, ckpts["branches"])]) == 2
    assert re.search(message, _err_line(capsys))
    assert not out.exists()


def test_mismatched_inputs_exit_2(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    other_vocab = _save(tmp_path / "v101", 101, 7)
    assert main(["merge", "--out", str(out), str(ckpts["branches"][0]), str(other_vocab)]) == 2
    assert "vocabulary sizes differ" in _err_line(capsys)
    wider = _save(tmp_path / "wide", 100, 8, intermediate=48)
    assert main(["merge", "--out", str(out), str(ckpts["branches"][0]), str(wider)]) == 2
    shape_error = r"wide: tensor .*mlp.* has shape \[(48, 32|32, 48)\] but .* has \[(64, 32|32, 64)\]"
    assert re.search(shape_error, _err_line(capsys))
    foreign = tmp_path / "foreign"
    shutil.copytree(ckpts["branches"][1], foreign)
    (foreign / "manifest.json").write_text(json.dumps({"theta0_hash": "0" * 64}))
    assert main(["merge", "--out", str(out), str(ckpts["branches"][0]), str(foreign)]) == 2
    assert "--allow-different-base" in _err_line(capsys)
    assert not out.exists()
    assert main(["merge", "--out", str(out), "--allow-different-base", str(ckpts["branches"][0]), str(foreign)]) == 0


def test_existing_output_needs_overwrite(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", "--out", str(out), *map(str, ckpts["branches"])]) == 2
    assert "--overwrite" in _err_line(capsys) and (out / "keep.txt").exists()
    assert main(["merge", "--out", str(out), "--overwrite", *map(str, ckpts["branches"])]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_export_mergekit_linear_and_ties(ckpts, tmp_path):
    cfg = tmp_path / "linear.yml"
    assert main(["merge", "--out", str(tmp_path / "o"), "--weights", "1,3", "--export-mergekit", str(cfg),
                 "--export-only", *map(str, ckpts["branches"])]) == 0
    doc = yaml.safe_load(cfg.read_text())
    assert doc["merge_method"] == "linear" and doc["dtype"] == "float32" and doc["parameters"]["normalize"] is True
    assert [m["model"] for m in doc["models"]] == [str(b) for b in ckpts["branches"]]
    assert [m["parameters"]["weight"] for m in doc["models"]] == [0.25, 0.75]
    assert not (tmp_path / "o").exists()
    cfg = tmp_path / "ties.yml"
    assert main(["merge", "--out", str(tmp_path / "t"), "--method", "ties", "--base", str(ckpts["base"]),
                 "--density", "0.3", "--lambda", "0.8", "--export-mergekit", str(cfg),
                 *map(str, ckpts["branches"])]) == 0
    doc = yaml.safe_load(cfg.read_text())
    assert doc["merge_method"] == "ties" and doc["base_model"] == str(ckpts["base"])
    assert doc["parameters"]["lambda"] == 0.8 and doc["models"][0]["parameters"]["density"] == 0.3
    assert (tmp_path / "t" / "model.safetensors").is_file()


def test_real_command_exit_code_and_one_line_message(ckpts, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "merit.cli", "merge", "--out", str(out), "--method", "dare",
                           *map(str, ckpts["branches"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--base" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "star", "--eta", "0"], r"--eta: must be in \(0, 100\], got 0"),
    (["--method", "tsv", "--rank-fraction", "1.5"], r"--rank-fraction: must be in \(0, 1\]"),
    (["--method", "iso-cts", "--common-space-fraction", "2"], r"--common-space-fraction: must be in \[0, 1\]"),
    (["--method", "iso-c", "--alpha", "nan"], r"--alpha: must be a finite number"),
    (["--method", "ties", "--density", "0"], r"--density: must be in \(0, 1\], got 0"),
    (["--method", "tsv", "--density", "0.5"], "--density does not apply to --method tsv"),
    (["--method", "star", "--alpha", "2"], "--alpha does not apply to --method star"),
    (["--method", "model-stock", "--eta", "40"], "--eta does not apply to --method model-stock"),
    (["--method", "star"], "give θ\\(0\\) with --base"),
])
def test_spectral_method_errors_exit_2_and_write_nothing(ckpts, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    base = [] if extra == ["--method", "star"] else ["--base", str(ckpts["base"])]
    assert main(["merge", "--out", str(out), *base, *extra, *map(str, ckpts["branches"])]) == 2
    assert re.search(message, _err_line(capsys))
    assert not out.exists()


def test_spectral_methods_take_their_flags(ckpts, tmp_path):
    from merit.merge.spectral import iso_cts

    out = tmp_path / "iso"
    assert main(["merge", "--out", str(out), "--method", "iso-cts", "--base", str(ckpts["base"]), "--alpha", "1.2",
                 "--common-space-fraction", "0.5", *map(str, ckpts["branches"])]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["operator"] == "iso-cts" and manifest["params"] == {"alpha": 1.2, "common_space_fraction": 0.5}
    name = "model.layers.0.mlp.up_proj.weight"
    branches = [load_file(str(p / "model.safetensors"))[name] for p in ckpts["branches"]]
    base = load_file(str(ckpts["base"] / "model.safetensors"))[name]
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))[name],
                               iso_cts(branches, manifest["weights"], base=base, alpha=1.2, common_space_fraction=0.5),
                               rtol=0, atol=1e-6)
    other = tmp_path / "iso-default"
    assert main(["merge", "--out", str(other), "--method", "iso-cts", "--base", str(ckpts["base"]),
                 *map(str, ckpts["branches"])]) == 0
    assert json.loads((other / "manifest.json").read_text())["key"] != manifest["key"]


def test_export_mergekit_model_stock_and_refusal_for_spectral_methods(ckpts, tmp_path, capsys):
    cfg = tmp_path / "stock.yml"
    assert main(["merge", "--out", str(tmp_path / "o"), "--method", "model-stock", "--base", str(ckpts["base"]),
                 "--export-mergekit", str(cfg), "--export-only", *map(str, ckpts["branches"])]) == 0
    doc = yaml.safe_load(cfg.read_text())
    assert doc["merge_method"] == "model_stock" and doc["base_model"] == str(ckpts["base"])
    assert doc["parameters"] == {"filter_wise": False} and len(doc["models"]) == 2
    refused = tmp_path / "tsv.yml"
    assert main(["merge", "--out", str(tmp_path / "t"), "--method", "tsv", "--base", str(ckpts["base"]),
                 "--export-mergekit", str(refused), *map(str, ckpts["branches"])]) == 2
    assert "mergekit has no method equivalent to tsv" in _err_line(capsys)
    assert not refused.exists() and not (tmp_path / "t").exists()
