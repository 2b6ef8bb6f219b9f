"""Held-out evaluation of one checkpoint: per-source exact match (greedy generation) and mean loss."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from merit.conflict.estimate import pad_batch, summed_token_loss
from merit.data.chat import Tokenized, generation_prompt, tokenize_conversation
from merit.evaluate.scoring import exact_match, targets_of


@torch.no_grad()
def evaluate_source(model, tokenizer, examples: list[dict], *, max_length: int, batch_size: int,
                    max_new_tokens: int) -> dict:
    """Exact match and token-mean assistant loss of ``model`` on one source's eval examples."""
    # Loss: teacher-forced, assistant tokens only, as in training.
    toks = [tokenize_conversation(tokenizer, ex["messages"], max_length) for ex in examples]
    toks = [t for t in toks if t.loss_tokens > 0]
    loss_sum, count = 0.0, 0
    for i in range(0, len(toks), batch_size):
        loss, n = summed_token_loss(model, pad_batch(toks[i : i + batch_size], tokenizer.pad_token_id))
        loss_sum, count = loss_sum + float(loss), count + n

    # Exact match: greedy continuation of the prompt up to the last assistant turn.
    prompts, targets = [], []
    for ex in examples:
        ids, ref = generation_prompt(tokenizer, ex["messages"])
        prompts.append(Tokenized(ids[-max_length:], ids[-max_length:], False))
        targets.append(targets_of(ex, ref))
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for ts in targets for t in ts)
    new_tokens = min(max_new_tokens, longest + 2)
    hits = 0.0
    for i in range(0, len(prompts), batch_size):
        batch = pad_batch(prompts[i : i + batch_size], tokenizer.pad_token_id, left=True)
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(exact_match(p, t) for p, t in zip(texts, targets[i : i + batch_size]))
    return {"exact_match": hits / len(examples), "loss": loss_sum / max(count, 1), "n": len(examples)}


def evaluate_model(model, tokenizer, sources: dict[str, list[dict]], *, max_length: int, batch_size: int,
                   max_new_tokens: int, desc: str = "eval") -> dict:
    """Per-source scores plus the macro exact match and the macro mean loss over sources."""
    model.eval()
    per = {}
    for name, examples in tqdm(sources.items(), desc=desc, unit="source"):
        per[name] = evaluate_source(model, tokenizer, examples, max_length=max_length, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens)
    return {
        "macro": sum(v["exact_match"] for v in per.values()) / len(per),
        "loss": sum(v["loss"] for v in per.values()) / len(per),
        "per_source": {k: v["exact_match"] for k, v in per.items()},
        "per_source_loss": {k: v["loss"] for k, v in per.items()},
    }
