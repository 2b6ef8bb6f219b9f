"""Branch training: precision modes (fp32 master weights where promised), the memory and speed knobs
reaching the Trainer, packing (same loss, no attention across examples), and their bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from merit.cli import main
from merit.config import ModelConfig, TrainConfig, load_config

from conftest import chat, make_mixture_dir


def examples_for(checkpoint, n: int = 16):
    from merit.data.mixture import tokenize_examples
    from merit.models.loading import load_tokenizer

    tok = load_tokenizer(checkpoint)
    words = ["abc", "hello", "world", "zeta", "qrstuvw", "mn", "lorem ipsum dolor", "x"]
    rows = [chat(f"Rewrite: {w}" + " please" * (i % 3), w.upper()) for i, w in enumerate(words * (n // len(words)))]
    return tok, tokenize_examples(tok, rows, 64, "test")[0]


def trained(checkpoint, precision, *, model_dtype="float32", work_dir=None, steps=None, **train_kw):
    """(θ(0)'s trainable tensors in fp32, the model after training) for one precision mode."""
    from merit.models.loading import load_for_training
    from merit.train.options import load_dtype
    from merit.train.trainer import train

    tok, examples = examples_for(checkpoint)
    model_cfg = ModelConfig(path=str(checkpoint), dtype=model_dtype)
    cfg = TrainConfig(**{"learning_rate": 1e-4, "batch_size": 4, "epochs": 1, "warmup_ratio": 0,
                         "lr_scheduler": "constant", **train_kw})
    model = load_for_training(checkpoint, model_cfg, dtype=load_dtype(precision, model_cfg))
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = train(model, tok, examples, cfg, seed=0, precision=precision, progress=False, work_dir=work_dir,
                  save_steps=steps)
    return before, model, stats


def task_vector(before, model) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([(params[n].detach().float() - before[n]).flatten() for n in before])


# ------------------------------------------------------------------------------------------ precision


def test_bf16_mixed_keeps_fp32_master_weights_and_adamw_state(tiny_checkpoint, tmp_path):
    """θ(0) loaded in bf16 (model.dtype) trains with fp32 parameters and fp32 AdamW moments (read from the
    optimizer state the Trainer saved), under the Trainer's bf16 autocast."""
    _, model, stats = trained(tiny_checkpoint, "bf16", model_dtype="bfloat16", work_dir=tmp_path / "work", steps=1)
    assert stats["precision"] == "bf16"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ckpt = next((tmp_path / "work").glob("checkpoint-*"))
    state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
    moments = {t.dtype for s in state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")}
    assert moments == {torch.float32}
    args = json.loads((ckpt / "trainer_state.json").read_text())  # the run really was the Trainer's
    assert args["global_step"] >= 1


def test_bf16_pure_is_bf16_throughout(tiny_checkpoint):
    _, model, _ = trained(tiny_checkpoint, "bf16-pure")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bf16_mixed_applies_the_updates_that_pure_bf16_rounds_away(tiny_checkpoint):
    """At a small learning rate pure bf16 loses most updates; mixed precision keeps the fp32 run's task
    vector (cosine ≥ 0.99) and changes about as many entries as fp32 does."""
    runs = {p: trained(tiny_checkpoint, p, learning_rate=2e-5) for p in ("fp32", "bf16", "bf16-pure")}
    vec = {p: task_vector(*r[:2]) for p, r in runs.items()}
    changed = {p: (v != 0).float().mean().item() for p, v in vec.items()}
    cos = torch.nn.functional.cosine_similarity(vec["bf16"], vec["fp32"], dim=0).item()
    assert cos >= 0.99
    assert changed["bf16"] > 0.9 * changed["fp32"]
    assert changed["bf16-pure"] < 0.6 * changed["fp32"]


def test_model_dtype_bfloat16_trains_in_mixed_precision_and_says_so(tiny_checkpoint, capsys):
    from merit.train.options import explain_precision, resolve_precision

    model = ModelConfig(path=str(tiny_checkpoint), dtype="bfloat16")
    assert resolve_precision(TrainConfig(), model) == "bf16"
    assert resolve_precision(TrainConfig(precision="bf16-pure"), model) == "bf16-pure"
    assert resolve_precision(TrainConfig(), ModelConfig(path="x")) == "fp32"
    explain_precision(TrainConfig(), model)
    assert "bf16 mixed precision (fp32 master weights" in capsys.readouterr().err
    explain_precision(TrainConfig(precision="bf16-pure"), model)
    assert "rounds away" in capsys.readouterr().err


def test_fp16_without_cuda_is_refused():
    from merit.errors import ConfigError
    from merit.train.options import check_train_options

    with pytest.raises(ConfigError, match="train.precision: fp16 mixed precision needs a CUDA GPU"):
        check_train_options(TrainConfig(precision="fp16"), ModelConfig(preset="tiny"), cuda=False)
    with pytest.raises(ConfigError, match=r"model.dtype=float16 \(train.precision's default\)"):
        check_train_options(TrainConfig(), ModelConfig(preset="tiny", dtype="float16"), cuda=False)
    assert check_train_options(TrainConfig(precision="bf16"), ModelConfig(preset="tiny"), cuda=False) == "bf16"


def test_packing_a_vision_language_model_is_refused():
    from merit.errors import ConfigError
    from merit.train.options import check_train_options

    with pytest.raises(ConfigError, match="train.packing"):
        check_train_options(TrainConfig(packing=True), ModelConfig(preset="tiny"), is_vlm=True, cuda=False)


# ---------------------------------------------------------------------------- knobs reach the Trainer


def test_every_training_key_reaches_the_trainer(tmp_path):
    from merit.train.options import training_arguments

    cfg = TrainConfig(gradient_checkpointing=True, optim="adafactor", dataloader_num_workers=2, group_by_length=True,
                      lr_scheduler="linear", learning_rate=3e-4, batch_size=3, gradient_accumulation_steps=2,
                      weight_decay=0.1, max_grad_norm=0.5)
    args = training_arguments(cfg, "bf16", output_dir=str(tmp_path), seed=7, save_steps=5)
    assert args.bf16 and not args.fp16 and args.use_cpu == (not torch.cuda.is_available())
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.optim == "adafactor" and args.dataloader_num_workers == 2
    assert args.train_sampling_strategy == "group_by_length"
    assert args.lr_scheduler_type == "linear" and args.learning_rate == 3e-4
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 2)
    assert (args.weight_decay, args.max_grad_norm, args.seed, args.save_steps) == (0.1, 0.5, 7, 5)
    plain = training_arguments(TrainConfig(), "fp32", output_dir=str(tmp_path), seed=0)
    assert not plain.bf16 and not plain.fp16 and not plain.activation_checkpointing
    assert plain.optim == "adamw_torch" and plain.train_sampling_strategy == "random"
    assert plain.save_strategy == "no"


def test_attention_kernel_reaches_the_model(tiny_checkpoint):
    from merit.models.loading import load_for_training

    for kernel in ("eager", "sdpa"):
        model = load_for_training(tiny_checkpoint, ModelConfig(path=str(tiny_checkpoint), attn_implementation=kernel))
        assert model.config._attn_implementation == kernel


def test_group_by_length_uses_the_examples_lengths(tiny_checkpoint, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from merit.models.loading import load_for_training
    from merit.train.options import training_arguments
    from merit.train.trainer import _Examples, _Trainer, text_collator

    tok, examples = examples_for(tiny_checkpoint)
    cfg = TrainConfig(group_by_length=True, batch_size=4)
    trainer = _Trainer(model=load_for_training(tiny_checkpoint, ModelConfig(path=str(tiny_checkpoint))),
                       args=training_arguments(cfg, "fp32", output_dir=str(tmp_path), seed=0),
                       train_dataset=_Examples(examples), data_collator=text_collator(tok, False),
                       lengths=[len(t.input_ids) for t in examples])
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths == [len(t.input_ids) for t in examples]
    order = list(sampler)
    assert sorted(order) == list(range(len(examples)))


def test_gradient_checkpointing_gives_the_same_training(tiny_checkpoint):
    """Same gradients, hence the same weights after training (non-reentrant recomputation, CPU)."""
    _, plain, _ = trained(tiny_checkpoint, "fp32")
    _, ckpt, _ = trained(tiny_checkpoint, "fp32", gradient_checkpointing=True)
    assert ckpt.is_activation_checkpointing and not plain.is_activation_checkpointing  # it really ran
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------- packing


def _batches(tok, examples):
    from merit.train.trainer import text_collator

    feats = [{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels}
             for t in examples]
    return text_collator(tok, False)(feats), text_collator(tok, True)(feats)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss_and_no_attention_crosses_examples(tiny_checkpoint, kernel):
    from merit.models.loading import load_for_training

    tok, examples = examples_for(tiny_checkpoint)
    examples = examples[:5]
    assert len({len(t.input_ids) for t in examples}) > 1  # padding really happens
    model = load_for_training(tiny_checkpoint, ModelConfig(path=str(tiny_checkpoint), attn_implementation=kernel))
    model.train()  # as in training (no dropout in the tiny model): a KV cache here would disable the packed mask
    padded, packed = _batches(tok, examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(t.input_ids) for t in examples)
    # Same supervised tokens: labels identical apart from the (already ignored) first token per example.
    assert (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
        assert abs(loss_packed.item() - loss_padded.item()) < 1e-5
        # Each example's logits inside the packed row equal its logits alone: nothing leaks across.
        logits = model(**packed).logits[0]
        start = 0
        for t in examples:
            alone = model(input_ids=torch.tensor([t.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[start:start + len(t.input_ids)], alone, rtol=0, atol=1e-5)
            start += len(t.input_ids)


def test_packed_training_matches_padded_training(tiny_checkpoint):
    """Through the Trainer: the same batches packed or padded give the same weights (fp32, to rounding)."""
    _, padded, s1 = trained(tiny_checkpoint, "fp32")
    _, packed, s2 = trained(tiny_checkpoint, "fp32", packing=True)
    assert s1["steps"] == s2["steps"]
    assert abs(s1["train_loss"] - s2["train_loss"]) < 1e-5
    for (n, a), (_, b) in zip(padded.named_parameters(), packed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=n)


# ------------------------------------------------------------------------- the pipeline and its keys


def test_new_keys_leave_earlier_branch_keys_alone():
    """A config without the new keys keys its branches as before (earlier run folders stay cached); how-only
    settings never change a key; a setting that changes the weights does."""
    from merit.pipeline import training_identity

    base = {"model": {"preset": "tiny"}, "mixture": {"builtin": {}}}
    train, model = training_identity(load_config(base))
    assert set(train) == {"learning_rate", "batch_size", "gradient_accumulation_steps", "epochs", "lr_scheduler",
                          "warmup_ratio", "weight_decay", "max_grad_norm", "lora"}
    assert "attn_implementation" not in model
    same = load_config(base, ["train.gradient_checkpointing=true", "train.dataloader_num_workers=2",
                              "model.attn_implementation=eager", "train.precision=fp32", "train.fsdp={}",
                              "launch.kind=ray", "launch.save_steps=7"])
    assert training_identity(same) == (train, model)
    for change in ("train.packing=true", "train.precision=bf16", "train.optim=adafactor", "train.save_dtype=bfloat16",
                   "model.dtype=bfloat16", "train.group_by_length=true", "launch.processes_per_branch=2"):
        assert training_identity(load_config(base, [change])) != (train, model), change


def test_pipeline_in_bf16_mixed_with_packing(tmp_path, tiny_checkpoint):
    """The tiny pipeline with train.precision=bf16 + packing + length grouping: branches record their
    precision and save dtype (bf16 on request), the merge writes merge.dtype (fp32 here)."""
    from safetensors import safe_open

    mix = make_mixture_dir(tmp_path / "mix", n_train=16, n_eval=4,
                           names=["upper_copy", "upper_rev", "lower_copy", "lower_rev"])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mix), "max_length": 64},
        "grads": {"calibration_size": 8, "batch_size": 8}, "split": {"r": 1},
        "train": {"batch_size": 8, "learning_rate": 1e-3, "precision": "bf16", "packing": True,
                  "group_by_length": True, "save_dtype": "bfloat16"},
        "merge": {"operators": ["token-weighted"], "dtype": "float32"},
        "baselines": {"joint": False, "random": False},
    }))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--until", "merge"]) == 0
    for k in (0, 1):
        m = json.loads((out / f"branches/{k}/manifest.json").read_text())
        assert m["precision"] == "bf16" and m["save_dtype"] == "bfloat16"
        assert m["hyperparameters"]["packing"] is True
        with safe_open(str(out / f"branches/{k}/model.safetensors"), "pt") as f:
            assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    merged = json.loads((out / "merged/token-weighted/manifest.json").read_text())
    assert merged["out_dtypes"] == ["float32"] and merged["accumulate_dtype"] == "float32"
    with safe_open(str(out / "merged/token-weighted/model.safetensors"), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"F32"}


def test_branch_saves_in_theta0_dtype_by_default(tmp_path, tiny_checkpoint):
    from merit.train.branch import save_dtype

    class Job:
        theta0 = tiny_checkpoint
        train_cfg = TrainConfig()
        model_cfg = ModelConfig(path=str(tiny_checkpoint), dtype="bfloat16")

    assert save_dtype(Job) == "float32"  # the checkpoint files are fp32, whatever model.dtype loads
    Job.train_cfg = TrainConfig(save_dtype="float16")
    assert save_dtype(Job) == "float16"


# ---------------------------------------------------------------------------------------- bad values


def _config(tmp_path, tiny_checkpoint, **train) -> Path:
    mix = make_mixture_dir(tmp_path / "mix", n_train=8, n_eval=2, names=["upper_copy", "lower_copy"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mix)},
                                    "split": {"r": 1}, "train": train}))
    return path


@pytest.mark.parametrize("override, expected", [
    ("train.precision=bf15", "'train.precision': Input should be 'fp32', 'bf16', 'fp16' or 'bf16-pure'"),
    ("model.attn_implementation=flash", "'model.attn_implementation': Input should be 'sdpa', 'eager' or "
                                        "'flash_attention_2'"),
    ("train.optim=adam", "'train.optim': unknown optimizer 'adam'; use one of adamw_torch, "),
    ("train.lr_scheduler=cosin", "'train.lr_scheduler': unknown scheduler 'cosin'; use one of linear, cosine"),
    ("train.lr_scheduler=reduce_lr_on_plateau", "unknown scheduler 'reduce_lr_on_plateau'"),
    ("train.save_dtype=fp8", "'train.save_dtype': Input should be"),
    ("merge.dtype=half", "'merge.dtype': Input should be"),
    ("train.dataloader_num_workers=-1", "'train.dataloader_num_workers'"),
    ("train.precision=fp16", "train.precision: fp16 mixed precision needs a CUDA GPU"),
])
def test_bad_training_values_give_one_line_and_write_nothing(tmp_path, tiny_checkpoint, capsys, override, expected):
    if "fp16 mixed" in expected and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed")
    out = tmp_path / "run"
    rc = main(["run", str(_config(tmp_path, tiny_checkpoint)), "--out", str(out), "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("merit: error:")
    assert expected in err[0]
    assert not out.exists()


def test_flash_attention_without_the_package_is_refused(tmp_path, tiny_checkpoint, capsys):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    out = tmp_path / "run"
    rc = main(["run", str(_config(tmp_path, tiny_checkpoint)), "--out", str(out),
               "--set", "model.attn_implementation=flash_attention_2"])
    err = capsys.readouterr().err
    assert rc == 2 and "flash_attention_2 needs the flash-attn package" in err and not out.exists()
