"""Real-checkpoint concerns: chat templates without generation markers, multiple-choice scoring,
LoRA merges in weight space, pickled weights, trainable-parameter subsets."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file

from merit.data.chat import IGNORE, tokenize_conversation
from merit.errors import MeritError
from merit.evaluate.runner import EvalSettings, choice_logprobs, evaluate_source
from merit.evaluate.scoring import exact_match, pick_choice
from merit.models.loading import load_model, load_tokenizer, select_trainable

# A Zephyr/SmolLM-like template: a default system prompt is injected when none is given, turns end with
# an end token, and there are no {% generation %} markers for transformers' assistant masks.
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_masks_without_generation_markers_multi_turn(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    tok.chat_template = TEMPLATE
    assert "{% generation %}" not in tok.chat_template
    msgs = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "ALPHA"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "BETA GAMMA"}]
    t = tokenize_conversation(tok, msgs, max_length=1024)
    spans, current = [], []
    for i, label in zip(t.input_ids, t.labels):
        if label != IGNORE:
            current.append(i)
        elif current:
            spans.append(tok.decode(current)), current.clear()
    spans.append(tok.decode(current))
    # Each span is the answer, its end-of-turn token and the newline the template puts after it.
    assert spans == ["ALPHA<|im_end|>\n", "BETA GAMMA<|im_end|>\n"]
    assert "You are helpful" in tok.decode(t.input_ids)  # the injected system prompt is not trained on


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose next-token distribution ignores the context: log p = log_softmax(bias)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = torch.nn.Parameter(bias)

    def forward(self, input_ids, attention_mask=None, **unused):  # keeps no key/value cache
        return types.SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1).clone())


def test_multiple_choice_scorer_picks_the_likely_option(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    choices = ["red", "blue", "green"]
    ids = {c: tok(c, add_special_tokens=False)["input_ids"] for c in choices}
    bias = torch.zeros(len(tok))
    bias[ids["blue"]] = 8.0  # every token of "blue" is very likely, whatever the context
    model = FixedLogits(bias)
    ex = {"messages": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "blue"}],
          "choices": choices, "answer_index": 1}
    [(sums, lengths)] = choice_logprobs(model, tok, [ex], EvalSettings())
    logp = torch.log_softmax(bias, -1)
    assert sums == pytest.approx([float(logp[ids[c]].sum()) for c in choices], abs=1e-4)
    assert lengths == [len(ids[c]) for c in choices]
    assert pick_choice(sums, lengths) == 1
    wrong = dict(ex, answer_index=0)
    assert evaluate_source(model, tok, [ex, wrong], EvalSettings())["score"] == pytest.approx(0.5)


def test_one_pass_scoring_equals_one_row_per_choice_and_the_separate_loss(tiny_checkpoint):
    """One forward per conversation, its prompt's cache shared by the choices, gives the scores of scoring each
    prompt + choice alone and the assistant loss of a separate pass: conversations of different lengths in
    one batch, choices of one and of several tokens, batches split by their row count, and an example too
    long to share (scored by row, its loss left to assistant_loss) in the same call."""
    import random

    from merit.data.chat import generation_prompt
    from merit.evaluate.runner import _choice_logprobs_by_row, assistant_loss, choice_pass

    tok, model = load_tokenizer(tiny_checkpoint), load_model(tiny_checkpoint).eval()
    rng = random.Random(0)
    examples = []
    for n in range(9):
        prompt = " ".join("hello world abc"[: rng.randint(1, 15)] for _ in range(1 + n % 4))
        choices = ["a", "HELLO WORLD", "xyz 0123", "b c"][: 2 + n % 3]
        examples.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": choices[n % 2]}],
                         "choices": choices, "answer_index": n % 2})
    settings = EvalSettings(max_length=64, batch_size=5)
    long = {"messages": [{"role": "user", "content": "hello world " * 12}, {"role": "assistant", "content": "a"}],
            "choices": ["a", "HELLO WORLD"], "answer_index": 0}
    examples.insert(4, long)
    assert len(generation_prompt(tok, long["messages"])[0]) + 2 > settings.max_length  # cut: not shared

    passed = choice_pass(model, tok, examples, settings)
    by_row = _choice_logprobs_by_row(model, tok, examples, settings)
    assert [lengths for _, lengths in passed.scores] == [lengths for _, lengths in by_row]
    for (a, _), (b, _) in zip(passed.scores, by_row):
        assert a == pytest.approx(b, abs=1e-4)
    assert len({round(v, 3) for sums, _ in passed.scores for v in sums}) > 10  # not a comparison of constants
    assert passed.losses[4] is None and all(loss is not None for i, loss in enumerate(passed.losses) if i != 4)
    for ex, loss in zip(examples, passed.losses):
        if loss is not None:
            assert loss == pytest.approx(assistant_loss(model, tok, [ex], settings), abs=1e-4)
    source = evaluate_source(model, tok, examples, settings)
    total, count = assistant_loss(model, tok, examples, settings)
    assert source["loss"] == pytest.approx(total / count, abs=1e-5)

    # Single-token choices only: no cache is kept, the same scores and losses come from the one forward.
    letters = [{"messages": [{"role": "user", "content": "hello " * (1 + n)}, {"role": "assistant", "content": "b"}],
                "choices": ["a", "b"], "answer_index": 1} for n in range(3)]
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) == 1 for c in ("a", "b"))
    passed = choice_pass(model, tok, letters, settings)
    for (a, _), (b, _) in zip(passed.scores, _choice_logprobs_by_row(model, tok, letters, settings)):
        assert a == pytest.approx(b, abs=1e-4)
    assert all(loss == pytest.approx(assistant_loss(model, tok, [ex], settings), abs=1e-4)
               for ex, loss in zip(letters, passed.losses))


def test_length_normalisation_changes_the_pick():
    # A: one token at log p -1.0 (sum -1.0, mean -1.0); B: three tokens at -0.5 each (sum -1.5, mean -0.5).
    assert pick_choice([-1.0, -1.5], [1, 3]) == 0
    assert pick_choice([-1.0, -1.5], [1, 3], length_normalized=True) == 1


def test_exact_match_normalisation():
    assert exact_match("  Paris ", ["paris", "Paris"]) == 1.0
    assert exact_match("PARIS.", ["paris"]) == 0.0
    assert exact_match("PARIS.", ["paris"], mode="lower") == 1.0


def _adapter(tiny_checkpoint, folder, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(tiny_checkpoint), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def test_lora_weight_space_merge_equals_dense_merge_of_unloaded_branches(tiny_checkpoint, tmp_path):
    from peft import PeftModel

    from merit.merge.lora import merge_lora
    from merit.merge.operators import token_weighted

    adapters = [_adapter(tiny_checkpoint, tmp_path / f"a{k}", seed=k) for k in range(3)]
    weights = [0.5, 0.3, 0.2]
    merge_lora(tiny_checkpoint, adapters, weights, token_weighted, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged/model.safetensors"))

    dense = [PeftModel.from_pretrained(load_model(tiny_checkpoint), a).merge_and_unload().state_dict() for a in adapters]
    theta0 = load_file(str(tiny_checkpoint / "model.safetensors"))
    for key, value in merged.items():
        expected = sum(w * d[key] for w, d in zip(weights, dense))
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        if "q_proj" not in key and "v_proj" not in key:
            assert torch.equal(value, theta0[key])  # untouched weights are copied bit for bit

    # The pitfall the weight-space merge avoids: averaging A and B separately is not the same model.
    tensors = [load_file(str(a / "adapter_model.safetensors")) for a in adapters]
    key_a = next(k for k in tensors[0] if "q_proj.lora_A" in k)
    a_bar = sum(w * t[key_a] for w, t in zip(weights, tensors))
    b_bar = sum(w * t[key_a.replace("lora_A", "lora_B")] for w, t in zip(weights, tensors))
    naive = theta0["model.layers.0.self_attn.q_proj.weight"] + 2.0 * b_bar @ a_bar
    assert not torch.allclose(naive, merged["model.layers.0.self_attn.q_proj.weight"], atol=1e-4)


def test_pickled_checkpoint_is_refused(tiny_checkpoint, tmp_path, capsys):
    from merit.cli import main

    model = load_model(tiny_checkpoint)
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the legacy pickled format
    load_tokenizer(tiny_checkpoint).save_pretrained(pickled)
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    with pytest.raises(MeritError, match="pickled"):
        load_model(pickled)

    (tmp_path / "mix/train").mkdir(parents=True)
    for name in ("a", "b"):
        (tmp_path / f"mix/train/{name}.jsonl").write_text(json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {pickled}}}\nmixture: {{dir: {tmp_path / 'mix'}}}\nsplit: {{r: 1}}\n")
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickled (.bin)" in err[0] and "model.allow_pickle" in err[0]


def test_trainable_patterns_freeze_parameters(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    n = select_trainable(model, trainable=None, frozen=[r"embed_tokens"])
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"model.embed_tokens.weight"}
    assert n == sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    select_trainable(model, trainable=[r"\.mlp\."])
    assert all(("mlp" in k) == p.requires_grad for k, p in model.named_parameters())
    with pytest.raises(MeritError, match="no parameter"):
        select_trainable(model, trainable=["nothing-matches"])


def test_frozen_parameters_stay_put_through_gradients_and_training(tiny_checkpoint):
    from merit.config import ModelConfig, TrainConfig
    from merit.conflict.estimate import mean_gradient
    from merit.models.loading import load_for_training
    from merit.train.trainer import train

    tok = load_tokenizer(tiny_checkpoint)
    cfg = ModelConfig(path=str(tiny_checkpoint), frozen=["embed_tokens", "lm_head"])
    model = load_for_training(tiny_checkpoint, cfg)
    examples = [tokenize_conversation(tok, [{"role": "user", "content": f"say {w}"},
                                            {"role": "assistant", "content": w.upper()}], 64)
                for w in ["abc", "hello", "xyz", "merge", "split", "tune", "train", "data"]]
    names = [n for n, _ in mean_gradient(model, examples, 4, tok.pad_token_id)]
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tok, examples, TrainConfig(batch_size=4, learning_rate=1e-2), seed=0)
    after = model.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def test_lora_pipeline_merges_adapters_onto_theta0(tiny_checkpoint, mixture_dir, tmp_path):
    from merit.cli import main

    cfg = tmp_path / "lora.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_checkpoint}}}\nmixture: {{dir: {mixture_dir}}}\nsplit: {{r: 1}}\n"
        "grads: {calibration_size: 8}\nbaselines: {random: false}\neval: {max_per_source: 2}\n"
        "train: {batch_size: 8, learning_rate: 0.01, lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}\n")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    assert (out / "branches/0/adapter_model.safetensors").exists()
    # The conflict gradients were taken over the same LoRA parameters the branches train.
    grads = json.loads((out / "grads/manifest.json").read_text())
    assert grads["sources"]
    theta0 = load_file(str(tiny_checkpoint / "model.safetensors"))
    merged = load_file(str(out / "merged/token-weighted/model.safetensors"))
    assert set(merged) == set(theta0)
    for key in theta0:
        changed = not torch.equal(merged[key], theta0[key])
        assert changed == ("q_proj" in key or "v_proj" in key), key
    results = json.loads((out / "results.json").read_text())["methods"]
    assert list(results) == ["base", "joint", "merit-r1", "merit-r1-uniform"]
