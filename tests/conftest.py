"""Shared fixtures: a tiny checkpoint and small chat-format mixtures, all built in the test session."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama (hidden 32) with an offline byte-level tokenizer."""
    from merit.models.tiny import build_model, build_tokenizer, save_checkpoint

    folder = tmp_path_factory.mktemp("tiny") / "theta0"
    corpus = ["user\nhello world", "assistant\nHELLO WORLD", "abcdefghijklmnopqrstuvwxyz 0123456789"] * 20
    tok = build_tokenizer(corpus, vocab_size=300)
    model = build_model(tok, seed=0, hidden=32, layers=2)
    save_checkpoint(model, tok, folder)
    return folder


def word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))


# Two planted families over one input distribution with systematically contradictory outputs:
# "upper" tasks answer in capital letters, "lower" tasks in small letters. The difference is in which
# output tokens are pushed up, so it survives averaging over a source's examples.
FAMILIES = {
    "upper_copy": lambda w: ("Rewrite: " + w, w.upper()),
    "upper_rev": lambda w: ("Flip: " + w, w[::-1].upper()),
    "upper_sort": lambda w: ("Order: " + w, "".join(sorted(w)).upper()),
    "lower_copy": lambda w: ("Rewrite: " + w, w),
    "lower_rev": lambda w: ("Flip: " + w, w[::-1]),
    "lower_sort": lambda w: ("Order: " + w, "".join(sorted(w))),
}


def make_mixture_dir(root: Path, n_train: int = 24, n_eval: int = 6, names=None, samples: dict | None = None) -> Path:
    """A mixture folder in the bigbench-mix layout: train/<source>.jsonl and eval/<source>.jsonl."""
    for name in names or FAMILIES:
        rng = random.Random(name)
        fn = FAMILIES[name]
        n = (samples or {}).get(name, n_train)
        rows = [dict(chat(*fn(word(rng))), id=f"{name}-{i}", source=name) for i in range(n + n_eval)]
        write_jsonl(root / "train" / f"{name}.jsonl", rows[:n])
        write_jsonl(root / "eval" / f"{name}.jsonl", rows[n:])
    return root


@pytest.fixture
def mixture_dir(tmp_path) -> Path:
    return make_mixture_dir(tmp_path / "mix")


@pytest.fixture(scope="session")
def tiny_vlm_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny Qwen2.5-VL (text hidden 64 × 2 layers, vision hidden 32 × 2 blocks) with
    an offline byte-level tokenizer and Qwen's Pillow image processor (56×56 pictures -> 4 image tokens)."""
    from merit.models.tiny_vlm import build_model, build_processor, save_checkpoint

    folder = tmp_path_factory.mktemp("tiny-vlm") / "theta0"
    corpus = ["user\nWhat colour is the shape?", "assistant\nred green blue yellow purple RED",
              "Is the ball on the left or the right? west east", "abcdefghijklmnopqrstuvwxyz 0123456789"] * 10
    processor = build_processor(corpus, vocab_size=320)
    model = build_model(processor, seed=0, hidden=64, layers=2, vision_hidden=32, vision_depth=2)
    save_checkpoint(model, processor, folder)
    return folder
