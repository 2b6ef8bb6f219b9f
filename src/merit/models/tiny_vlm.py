"""The embedded vision-language model: a tiny Qwen2.5-VL built from a config, with an offline
byte-level tokenizer and Qwen's image processor (Pillow only), saved as a normal checkpoint folder.

Everything downstream treats it like any Qwen2.5-VL checkpoint: ``AutoModelForImageTextToText`` and
the processor, parameters ``model.visual.*`` (vision tower + merger, frozen by default) and
``model.language_model.*`` + ``lm_head.*`` (trained).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from merit.models.vlm import MeritQwen2_5_VLProcessor

# What Qwen-style chat with images needs; <|im_end|> ends a turn and stops generation.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"]

# Qwen2.5-VL's ChatML with image parts, without its default system prompt (short sequences on CPU).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_processor(corpus: list[str], image_size: int = 56, vocab_size: int = 512) -> MeritQwen2_5_VLProcessor:
    """Byte-level BPE trained on ``corpus`` plus the image processor, at a fixed ``image_size`` (every
    picture is resized to image_size² pixels: (image_size / 14)² patches, a quarter as many tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE, model_max_length=2048)
    pixels = image_size * image_size
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14,
                                      merge_size=2, temporal_patch_size=2)
    return MeritQwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_model(processor, seed: int, hidden: int = 128, layers: int = 4, vision_hidden: int = 64,
                vision_depth: int = 2) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL (~1M parameters at the defaults)."""
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            # 3-D rotary sections (temporal, height, width) summing to head_dim / 2
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": _mrope_section(hidden // 4)},
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=2, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.bos_token_id = None
    return model


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def save_checkpoint(model, processor, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
