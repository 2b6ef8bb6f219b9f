"""Loading θ(0) and its tokenizer from a local Hugging Face checkpoint folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from merit.errors import MeritError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_checkpoint(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MeritError(f"{folder}: not a Hugging Face checkpoint folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise MeritError(f"{folder}: no .safetensors weights (pickled .bin weights are not loaded)")
    return folder


def load_tokenizer(folder: str | Path):
    tok = AutoTokenizer.from_pretrained(check_checkpoint(folder))
    if tok.chat_template is None:
        raise MeritError(f"{folder}: the tokenizer has no chat template; merit tokenizes with the model's template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: str | Path, dtype: str = "float32"):
    return AutoModelForCausalLM.from_pretrained(check_checkpoint(folder), dtype=DTYPES[dtype], use_safetensors=True)


def checkpoint_hash(folder: str | Path) -> str:
    """sha256 over the weight files' bytes (sorted by name): the identity of θ(0) in every manifest."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that both gradient estimation and training update, in iteration order.

    Today every parameter is trainable; the seam for name-pattern subsets (frozen embeddings,
    language-model-only VLMs) is here so that gradients and training always agree.
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
