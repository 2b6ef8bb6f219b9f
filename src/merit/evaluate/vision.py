"""Held-out evaluation of a vision-language checkpoint: the same scores as ``merit.evaluate.runner``
(multiple choice by log-likelihood, exact match of a greedy generation, assistant-token loss), with each
example's images passed to the model alongside its ids.

Prompts are rendered through the processor, so image placeholders are expanded as in training. They are
not truncated: cutting into an image's placeholder tokens would break the model's input.
"""

from __future__ import annotations

import torch

from merit.conflict.estimate import model_inputs, summed_logprob_per_row, summed_token_loss
from merit.data.chat import IGNORE
from merit.data.vision import (VisionCollator, VisionTokenized, prompt_for_generation, text_of,
                               tokenize_vision_conversation)
from merit.evaluate.runner import _device, item_scores, source_result
from merit.evaluate.scoring import targets_of


def _batches(model, collate: VisionCollator, rows: list, size: int):
    """(indices, batch on the model's device) over ``rows``, shortest first so similar lengths share a batch."""
    order = sorted(range(len(rows)), key=lambda j: len(rows[j].input_ids))
    for b in range(0, len(order), size):
        idx = order[b : b + size]
        yield idx, {k: v.to(_device(model)) for k, v in collate([rows[j] for j in idx]).items()}


def _reset_rope_cache(model) -> None:
    # Qwen-VL models keep the 3-D rotary offsets of the last prompt (rope_deltas) for incremental decoding;
    # a stale value from another batch would shift the positions of the next one.
    for m in model.modules():
        if getattr(m, "rope_deltas", None) is not None:
            m.rope_deltas = None


@torch.no_grad()
def assistant_loss(model, processor, pad_id: int, examples: list[dict], s) -> tuple[float, int]:
    toks = [tokenize_vision_conversation(processor, ex["messages"], ex.get("images", []), s.max_length)
            for ex in examples]
    toks = [t for t in toks if t.loss_tokens > 0]
    total, count = 0.0, 0
    for _, batch in _batches(model, VisionCollator(processor, pad_id), toks, s.batch_size):
        _reset_rope_cache(model)
        loss, n = summed_token_loss(model, batch)
        total, count = total + float(loss), count + n
    return total, count


@torch.no_grad()
def choice_logprobs(model, processor, pad_id: int, examples: list[dict], s) -> list[tuple[list[float], list[int]]]:
    """Per example: the summed log-probability of each choice's tokens after the prompt, and their counts."""
    rows, owner = [], []
    for i, ex in enumerate(examples):
        prompt, _ = prompt_for_generation(processor, ex["messages"], ex.get("images", []))
        for choice in ex["choices"]:
            ids = processor.tokenizer(str(choice), add_special_tokens=False)["input_ids"]
            seq = prompt.input_ids + ids
            extra = {k: v + [0] * len(ids) for k, v in prompt.extra.items()}  # choice tokens are text
            rows.append(VisionTokenized(seq, [IGNORE] * len(prompt.input_ids) + ids, False, images=prompt.images,
                                        extra=extra))
            owner.append(i)
    sums = [0.0] * len(rows)
    for idx, batch in _batches(model, VisionCollator(processor, pad_id), rows, s.batch_size):
        _reset_rope_cache(model)
        for j, v in zip(idx, summed_logprob_per_row(model, batch).tolist()):
            sums[j] = v
    out = [([], []) for _ in examples]
    for i, row, v in zip(owner, rows, sums):
        out[i][0].append(v)
        out[i][1].append(row.loss_tokens)
    return out


@torch.no_grad()
def generate(model, processor, pad_id: int, eos_id: int, examples: list[dict], s) -> list[str]:
    """Greedy continuations of each example's prompt (with its images), batched with left padding."""
    prompts = [prompt_for_generation(processor, ex["messages"], ex.get("images", []))[0] for ex in examples]
    longest = max(len(processor.tokenizer(t, add_special_tokens=False)["input_ids"])
                  for ex in examples for t in targets_of(ex, _reference(ex)))
    new_tokens = min(s.max_new_tokens, longest + 2)
    texts = [""] * len(prompts)
    for idx, batch in _batches(model, VisionCollator(processor, pad_id, left=True), prompts, s.batch_size):
        _reset_rope_cache(model)
        out = model.generate(**model_inputs(batch), max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                             eos_token_id=eos_id)
        decoded = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, decoded):
            texts[i] = text
    _reset_rope_cache(model)
    return texts


def _reference(example: dict) -> str:
    """The text of the last assistant turn."""
    return text_of([m for m in example["messages"] if m["role"] == "assistant"][-1])


def evaluate_source(model, tokenizer, examples: list[dict], s) -> dict:
    """Score one source's examples (``tokenizer`` is a ``merit.models.vlm.ProcessorTokenizer``)."""
    processor, pad_id = tokenizer.processor, tokenizer.pad_token_id
    items = item_scores(examples, lambda exs: choice_logprobs(model, processor, pad_id, exs, s),
                        lambda exs: generate(model, processor, pad_id, tokenizer.eos_token_id, exs, s),
                        _reference, s)
    return source_result(examples, items, *assistant_loss(model, processor, pad_id, examples, s))
