"""Merging Hugging Face safetensors checkpoints tensor by tensor.

Only one parameter's K branch copies are read at a time; the merged tensors are held until written. Inputs must agree on keys, shapes and dtypes;
that is checked before anything is written. The output folder appears only when complete.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merit import artifacts
from merit.errors import MeritError

# Files copied from the first checkpoint so the result loads like any checkpoint.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def _weight_file(folder: Path) -> Path:
    files = sorted(Path(folder).glob("*.safetensors"))
    if len(files) != 1:
        raise MeritError(f"{folder}: expected one .safetensors weight file, found {len(files)}")
    return files[0]


def merge_checkpoints(folders: Sequence[Path], weights: Sequence[float], op: Callable, out: Path) -> dict:
    """Merge ``folders`` with operator ``op`` and write a checkpoint folder at ``out``."""
    files = [_weight_file(f) for f in folders]
    with ExitStack() as stack:
        readers = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        keys = list(readers[0].keys())
        for f, r in zip(files[1:], readers[1:]):
            if set(r.keys()) != set(keys):
                diff = sorted(set(r.keys()) ^ set(keys))[:3]
                raise MeritError(f"{f}: parameter names differ from {files[0]} (e.g. {diff})")
        merged = {}
        for key in keys:
            slices = [r.get_slice(key) for r in readers]
            shapes = {tuple(s.get_shape()) for s in slices}
            dtypes = {s.get_dtype() for s in slices}
            if len(shapes) > 1 or len(dtypes) > 1:
                raise MeritError(f"{key}: shapes {sorted(shapes)} / dtypes {sorted(dtypes)} differ across checkpoints")
            tensors = [r.get_tensor(key) for r in readers]
            out_t = op(tensors, weights)
            if not torch.isfinite(out_t).all():
                raise MeritError(f"{key}: the merge produced NaN or Inf")
            merged[key] = out_t.to(tensors[0].dtype).contiguous()
        metadata = readers[0].metadata() or {}
    with artifacts.atomic_dir(out) as tmp:
        save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt", **metadata})
        for name in _SIDE_FILES:
            if (Path(folders[0]) / name).exists():
                shutil.copy2(Path(folders[0]) / name, tmp / name)
    return {"tensors": len(keys), "parameters": int(sum(t.numel() for t in merged.values()))}
