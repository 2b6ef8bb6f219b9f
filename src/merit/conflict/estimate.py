"""Stage 1, gradients: each source's mean gradient at θ(0) over a seeded calibration sample.

The loss is the one training uses (token-mean cross entropy over assistant tokens), taken over the
same trainable parameters, accumulated in fp32 in the parameters' own ``.grad`` buffers (no per-example
gradients), then compressed once per source and saved as it finishes.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from merit import artifacts
from merit.data.chat import IGNORE, Tokenized
from merit.models.loading import trainable_parameters
from merit.registry import get


def calibration_sample(examples: list, size: int, seed: int, name: str) -> list:
    """A seeded random subset of ``size`` examples (all of them when the source is smaller)."""
    if len(examples) <= size:
        return list(examples)
    idx = sorted(random.Random(f"{seed}:calibration:{name}").sample(range(len(examples)), size))
    return [examples[i] for i in idx]


def pad_batch(batch: list[Tokenized], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """(B, L) input_ids / attention_mask / labels, padded to the longest example."""
    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, t in enumerate(batch):
        n = len(t.input_ids)
        sl = slice(width - n, width) if left else slice(0, n)
        ids[i, sl] = torch.tensor(t.input_ids)
        mask[i, sl] = 1
        labels[i, sl] = torch.tensor(t.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def summed_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross entropy over label positions, and how many positions there were."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()  # (B, L-1, V)
    shift_labels = batch["labels"][:, 1:]  # (B, L-1)
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((shift_labels != IGNORE).sum())


def mean_gradient(model, examples: list[Tokenized], batch_size: int, pad_id: int) -> list[tuple[str, torch.Tensor]]:
    """The gradient of the token-mean loss over ``examples``, per trainable parameter (fp32)."""
    params = trainable_parameters(model)
    for _, p in params:
        p.grad = None
    total = sum(sum(1 for x in t.labels[1:] if x != IGNORE) for t in examples)
    model.eval()  # no dropout: the gradient of the model as it stands
    for i in range(0, len(examples), batch_size):
        loss, _ = summed_token_loss(model, pad_batch(examples[i : i + batch_size], pad_id))
        (loss / total).backward()
    grads = [(n, p.grad.detach().float()) for n, p in params]
    for _, p in params:
        p.grad = None
    return grads


def estimate(model, tokenizer, sources: dict[str, list[Tokenized]], out: Path, *, calibration_size: int,
             stride: int, batch_size: int, seed: int, key: str) -> dict:
    """Run the gradients stage into ``out``; a source whose file exists from an interrupted run is reused."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    compress = get("compression", "stride")
    if model.dtype != torch.float32:
        model.float()  # fp32 accumulation
    entries = []
    for name, examples in tqdm(sources.items(), desc="gradients", unit="source"):
        path = out / f"{name}.safetensors"
        calib = calibration_sample(examples, calibration_size, seed, name)
        if not path.exists():
            grads = mean_gradient(model, calib, batch_size, tokenizer.pad_token_id)
            vec = compress((g for _, g in grads), stride=stride)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"g": vec.contiguous()}, str(tmp), metadata={"source": name, "key": key})
            tmp.replace(path)
        vec = load_file(str(path))["g"]
        entries.append({"name": name, "file": path.name, "calibration": len(calib), "norm": float(vec.norm())})
    dim = int(load_file(str(out / entries[0]["file"]))["g"].numel())
    return artifacts.write_manifest(out, key, compression="stride", stride=stride, dim=dim, sources=entries)


def load_gradients(grads_dir: Path) -> tuple[list[str], torch.Tensor]:
    """Source names and the (T, D) matrix of their compressed gradients, in manifest order."""
    m = artifacts.read_manifest(grads_dir)
    names = [e["name"] for e in m["sources"]]
    rows = [load_file(str(Path(grads_dir) / e["file"]))["g"] for e in m["sources"]]
    return names, torch.stack(rows)
