"""Model presets: names that resolve to a θ(0) checkpoint folder built or converted locally.

``tiny``: a ~1M-parameter Llama with an offline byte-level BPE tokenizer, made merge-ready by a short
joint training on the built-in *warm-up* mixture (tasks disjoint from the target mixture), standing in
for the paper's instruction-tuned θ(0). No hub access is needed.
"""

from __future__ import annotations

from pathlib import Path

from merit.config import PrepareConfig, TrainConfig
from merit.registry import register


@register("model-preset", "tiny")
def prepare_tiny(out: Path, cfg: PrepareConfig, seed: int, max_length: int = 128) -> dict:
    """Build, warm up and save the tiny θ(0) into folder ``out`` (which must be empty)."""
    from merit.data.builtin import builtin_mixture
    from merit.data.mixture import tokenize_examples
    from merit.models.tiny import build_model, build_tokenizer, save_checkpoint
    from merit.train.trainer import train

    warmup = builtin_mixture(n_train=cfg.examples_per_task, n_eval=1, seed=seed, warmup=True)
    examples = [ex for train_split, _ in warmup.values() for ex in train_split]
    corpus = [f"{m['role']}\n{m['content']}" for ex in examples for m in ex["messages"]]
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, seed)
    tokenized, _, _ = tokenize_examples(tokenizer, examples, max_length, "built-in warm-up mixture")
    hp = TrainConfig(learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, epochs=cfg.epochs)
    stats = train(model, tokenizer, tokenized, hp, seed, desc="warm-up θ(0)")
    save_checkpoint(model, tokenizer, out)
    return {
        "preset": "tiny",
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_tasks": list(warmup),
        "warmup": stats,
    }
