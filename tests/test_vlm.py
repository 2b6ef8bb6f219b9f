"""Vision-language data and models: the JSONL schema with images, LLaVA conversion, processor reloading,
masks through the processor, and the language-model-only parameter subset of each VLM family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from merit.cli import main
from merit.data.chat import IGNORE

from conftest import write_jsonl


def picture(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), colour).save(path)
    return path


def image_example(image: str, question: str = "What colour?", answer: str = "red") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}], "images": [image]}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("merit: error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------------- schema


def test_image_paths_resolve_against_the_mixture_folder(tmp_path):
    from merit.data.jsonl import read_examples

    picture(tmp_path / "mix/images/a.png")
    absolute = picture(tmp_path / "elsewhere/b.png", "blue")
    write_jsonl(tmp_path / "mix/train/colours.jsonl", [image_example("images/a.png"),
                                                        image_example(str(absolute), answer="blue")])
    rows = read_examples(tmp_path / "mix/train/colours.jsonl")
    assert rows[0]["images"] == [str((tmp_path / "mix/images/a.png").resolve())]
    assert rows[1]["images"] == [str(absolute.resolve())]


def test_missing_image_is_one_line_naming_file_line_and_image(tmp_path, capsys, tiny_vlm_checkpoint):
    mix = tmp_path / "mix"
    picture(mix / "images/a.png")
    for name in ("colours", "shapes"):
        write_jsonl(mix / "train" / f"{name}.jsonl", [image_example("images/a.png")] * 2)
    bad = mix / "train/shapes.jsonl"
    bad.write_text(bad.read_text() + json.dumps(image_example("images/nope.png")) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(tiny_vlm_checkpoint)}, "mixture": {"dir": str(mix)},
                                   "split": {"r": 1}}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    msg = one_line_error(capsys)
    assert f"{bad}:3: image not found: {(mix / 'images/nope.png').resolve()}" in msg
    assert not list((tmp_path / "run").rglob("manifest.json")), "a stage was marked complete"


@pytest.mark.parametrize("example, expected", [
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                   {"role": "assistant", "content": "a"}], "images": []}, "1 image part(s) in 'messages' but 0"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "a"}]},
     "messages[0].content[0] must be {'type': 'image'}"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "images": "a.png"},
     "'images' must be a list"),
])
def test_malformed_image_examples(tmp_path, example, expected):
    from merit.data.jsonl import read_examples
    from merit.errors import DataError

    path = write_jsonl(tmp_path / "train/x.jsonl", [example])
    with pytest.raises(DataError, match=f"^{path}:1: ") as e:
        read_examples(path)
    assert expected in str(e.value)


def test_text_model_refuses_image_examples(tmp_path, tiny_checkpoint):
    from merit.data.jsonl import read_examples
    from merit.data.mixture import tokenize_examples
    from merit.errors import DataError
    from merit.models.loading import load_tokenizer

    picture(tmp_path / "images/a.png")
    rows = read_examples(write_jsonl(tmp_path / "train/x.jsonl", [image_example("images/a.png")]))
    with pytest.raises(DataError, match="text-only model"):
        tokenize_examples(load_tokenizer(tiny_checkpoint), rows, 64, "x.jsonl")


# ---------------------------------------------------------------------------------------------------- LLaVA


def llava_fixture(root: Path) -> Path:
    """A LLaVA-Instruct-style JSON list: marker first, marker last, no marker, text only, two turns."""
    for name, colour in (("coco/1.jpg", "red"), ("coco/2.jpg", "blue"), ("coco/3.jpg", "green")):
        picture(root / "images" / name, colour)
    records = [
        {"id": "a", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "b", "image": "coco/2.jpg", "conversations": [
            {"from": "human", "value": "Describe the picture.\n<image>"}, {"from": "gpt", "value": "Blue."}]},
        {"id": "c", "image": "coco/3.jpg", "conversations": [
            {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Green."}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
    ]
    path = root / "llava_instruct.json"
    path.write_text(json.dumps(records))
    return path


def test_convert_llava(tmp_path, capsys):
    from merit.data.jsonl import read_examples

    src = llava_fixture(tmp_path / "llava")
    out = tmp_path / "mix/train/llava_instruct.jsonl"
    assert main(["convert-llava", str(src), "--out", str(out), "--image-root", str(tmp_path / "llava/images"),
                 "--eval-size", "1"]) == 0
    assert "3 examples + 1 held out for eval, 3 images" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "mix/eval/llava_instruct.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows + held}
    assert sorted(by_id) == ["a", "b", "c", "d"]
    a = by_id["a"]
    assert a["source"] == "llava_instruct"
    assert a["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."}]
    # outside the mixture folder: absolute paths
    assert a["images"] == [str((tmp_path / "llava/images/coco/1.jpg").resolve())]
    assert by_id["b"]["messages"][0]["content"] == [{"type": "text", "text": "Describe the picture."}, {"type": "image"}]
    assert by_id["c"]["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Which colour?"}]
    assert by_id["d"]["messages"][0] == {"role": "user", "content": "Say hi."} and "images" not in by_id["d"]
    # the converted files are valid mixture sources
    assert len(read_examples(out)) == 3


def test_convert_llava_relative_paths_inside_the_mixture(tmp_path):
    from merit.data.jsonl import read_examples

    src = llava_fixture(tmp_path / "mix")  # images under mix/images
    out = tmp_path / "mix/train/inst.jsonl"
    assert main(["convert-llava", str(src), "--out", str(out), "--image-root", str(tmp_path / "mix/images")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["images"] == ["images/coco/1.jpg"]
    assert read_examples(out)[0]["images"] == [str((tmp_path / "mix/images/coco/1.jpg").resolve())]


def test_convert_llava_missing_image(tmp_path, capsys):
    src = llava_fixture(tmp_path / "llava")
    (tmp_path / "llava/images/coco/2.jpg").unlink()
    out = tmp_path / "mix/train/x.jsonl"
    assert main(["convert-llava", str(src), "--out", str(out), "--image-root", str(tmp_path / "llava/images")]) == 2
    msg = one_line_error(capsys)
    assert f"{src}: row 1 (line 1) (id b): image not found: {(tmp_path / 'llava/images/coco/2.jpg').resolve()}" in msg
    assert not out.exists()
    assert main(["convert-llava", str(src), "--out", str(out), "--image-root", str(tmp_path / "llava/images"),
                 "--skip-missing"]) == 0
    assert "skipped 1 with a missing image" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3


# ------------------------------------------------------------------------------------------ processor, masks


def test_processor_reloads_as_a_processor(tiny_vlm_checkpoint):
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    from merit.models.loading import load_tokenizer
    from merit.models.vlm import MeritQwen2_5_VLProcessor, ProcessorTokenizer, register_processors

    register_processors()
    processor = AutoProcessor.from_pretrained(tiny_vlm_checkpoint)
    assert isinstance(processor, ProcessorMixin) and isinstance(processor, MeritQwen2_5_VLProcessor)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    tok = load_tokenizer(tiny_vlm_checkpoint)
    assert isinstance(tok, ProcessorTokenizer) and isinstance(tok.processor, MeritQwen2_5_VLProcessor)
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"


def test_masks_through_the_processor(tmp_path, tiny_vlm_checkpoint):
    from merit.data.vision import tokenize_vision_conversation
    from merit.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_vlm_checkpoint)
    img = str(picture(tmp_path / "a.png"))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]
    t = tokenize_vision_conversation(tok.processor, msgs, [img], max_length=256)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert t.input_ids.count(pad) == t.image_tokens == 4  # 56×56 -> 4×4 patches -> 2×2 merged tokens
    assert t.extra["mm_token_type_ids"] == [int(x == pad) for x in t.input_ids]
    spans, current = [], []
    for i, label in zip(t.input_ids, t.labels):
        if label != IGNORE:
            current.append(i)
        elif current:
            spans.append(tok.decode(current)), current.clear()
    spans.append(tok.decode(current))
    assert spans == ["red<|im_end|>\n", "yes<|im_end|>\n"]
    # Truncation that would cut into the image placeholders drops every label (the example is skipped).
    cut = tokenize_vision_conversation(tok.processor, msgs, [img], max_length=5)
    assert cut.truncated and cut.loss_tokens == 0


def test_collator_batches_pixels_and_grids(tmp_path, tiny_vlm_checkpoint):
    from merit.data.vision import VisionCollator, tokenize_vision_conversation
    from merit.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_vlm_checkpoint)
    img = str(picture(tmp_path / "a.png"))
    with_image = tokenize_vision_conversation(tok.processor, image_example(img)["messages"], [img], 64)
    text_only = tokenize_vision_conversation(
        tok.processor, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}], [], 64)
    batch = VisionCollator(tok.processor, tok.pad_token_id)([with_image, text_only, with_image])
    assert batch["pixel_values"].shape == (2 * 16, 3 * 2 * 14 * 14)  # all patches of both images, concatenated
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape
    assert batch["mm_token_type_ids"].sum() == 8


# ------------------------------------------------------------------------------- trainable parameter subsets


def test_language_model_only_by_default(tiny_vlm_checkpoint):
    from merit.config import ModelConfig
    from merit.models.loading import load_for_training, trainable_parameters

    model = load_for_training(tiny_vlm_checkpoint, ModelConfig(path=str(tiny_vlm_checkpoint)))
    names = [n for n, _ in trainable_parameters(model)]
    assert names and all(n.startswith(("model.language_model.", "lm_head.")) for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("model.visual."))
    # An explicit model.trainable replaces the default (here: everything, vision tower included).
    model = load_for_training(tiny_vlm_checkpoint, ModelConfig(path=str(tiny_vlm_checkpoint), trainable=["."]))
    assert any(n.startswith("model.visual.") for n, _ in trainable_parameters(model))


def test_lora_adapters_only_on_the_language_model(tiny_vlm_checkpoint):
    from merit.config import LoraConfig, ModelConfig
    from merit.models.loading import load_for_training

    for modules in (["q_proj", "v_proj"], ["all-linear"]):
        model = load_for_training(tiny_vlm_checkpoint, ModelConfig(path=str(tiny_vlm_checkpoint)),
                                  LoraConfig(target_modules=modules))
        adapted = [n for n, p in model.named_parameters() if p.requires_grad]
        assert adapted and all(".language_model." in n and "lora_" in n for n in adapted), adapted[:3]
        assert not any("lm_head" in n for n in adapted)


def _meta_model(kind: str):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, LlavaConfig,
                              LlavaForConditionalGeneration)

    text = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    with torch.device("meta"):
        if kind == "idefics3":
            return Idefics3ForConditionalGeneration(Idefics3Config(
                text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=28, patch_size=14)))
        return LlavaForConditionalGeneration(LlavaConfig(
            text_config=text, vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, image_size=28,
                                                 patch_size=14, projection_dim=16)))


@pytest.mark.parametrize("kind, frozen_prefixes, lm_prefix", [
    ("idefics3", ("model.vision_model.", "model.connector."), "model.text_model."),
    ("llava", ("model.vision_tower.", "model.multi_modal_projector."), "model.language_model."),
])
def test_family_patterns_match_in_memory_names(kind, frozen_prefixes, lm_prefix):
    from merit.models.loading import select_trainable
    from merit.models.vlm import language_model_only, lora_targets

    model = _meta_model(kind)
    select_trainable(model, None, language_model_only(model))
    for n, p in model.named_parameters():
        assert p.requires_grad == (not n.startswith(frozen_prefixes)), n
        assert n.startswith(frozen_prefixes + (lm_prefix, "lm_head."))
    targets = lora_targets(model, ["q_proj"])
    assert targets and all(t.startswith(lm_prefix) and t.endswith("q_proj") for t in targets)


def test_unknown_vlm_family_asks_for_explicit_patterns():
    from merit.errors import MeritError
    from merit.models.vlm import family

    with pytest.raises(MeritError, match="set model.trainable"):
        family("my_new_vlm")
