"""Stage 1, gradients: each source's mean gradient at θ(0) over a seeded calibration sample.

The loss is the one training uses (token-mean cross entropy over assistant tokens), taken over the
same trainable parameters, accumulated in fp32 in the parameters' own ``.grad`` buffers (no per-example
gradients, no flattened copy), then compressed once per source and saved as it finishes, so a killed run
resumes with the sources not yet done (see ``merit.conflict.store``). Runs on the GPU when there is one.
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from merit import artifacts
from merit.conflict import store
from merit.conflict.compress import CompressionSpec, compress
from merit.data.chat import IGNORE, Tokenized
from merit.data.vision import collator_for
from merit.errors import ConfigError
from merit.models.loading import trainable_parameters


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


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything in a batch but the labels: ids and mask, and for a VLM its pixels and image fields."""
    return {k: v for k, v in batch.items() if k != "labels"}


def _accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward can compute logits at chosen positions only (transformers ≥ 4.50 causal
    LMs and VLMs; a PEFT wrapper passes it on to its base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def label_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every label token, and the batch row each belongs to (two 1-D tensors).

    Logits are computed only at the positions that have a label (a boolean ``logits_to_keep`` mask): with
    a 49k vocabulary the full (B, L, V) logits and their gradient are the largest transient of a backward
    pass, and on instruction data most positions are prompt. The labels are shifted instead of the
    logits, so nothing of size V is copied. Models without ``logits_to_keep`` get the full logits.
    """
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # (B, L): position i predicts token i+1
    keep = targets != IGNORE
    if _accepts_logits_to_keep(model):
        logits = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep).logits  # (N, V): N labels
    else:
        logits = model(**model_inputs(batch)).logits[keep]
    logp = -F.cross_entropy(logits.float(), targets[keep], reduction="none")
    return logp, keep.nonzero()[:, 0]


def summed_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross entropy over label positions, and how many positions there were."""
    logp, _ = label_logprobs(model, batch)
    return -logp.sum(), logp.numel()


def summed_logprob_per_row(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) sum of each row's label-token log-probabilities (a multiple-choice option's score)."""
    logp, rows = label_logprobs(model, batch)
    return torch.zeros(batch["labels"].shape[0], dtype=logp.dtype, device=logp.device).index_add_(0, rows, logp)


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def layer_checkpointing(model, enabled: bool = True) -> Iterator[None]:
    """Recompute each transformer layer's activations during the backward pass instead of keeping them.

    transformers checkpoints a layer only while that layer is in training mode, so only the layers' own
    ``training`` flags are set: their dropouts and attention modules stay in eval mode and the gradient
    is the same as without checkpointing (the recompute is the same computation).
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"grads.gradient_checkpointing: {type(model).__name__} does not support gradient "
                          "checkpointing; set it to false")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False
        model.activation_checkpointing_disable()


class _HeadGradInPlace(torch.autograd.Function):
    """logits = h Wᵀ, whose backward adds ∂L/∂W straight into the preallocated ``W.grad`` (one ``addmm_``).

    Returned the usual way, ∂L/∂W is a second V×H buffer, and for a tied embedding autograd holds it until
    the embedding's contribution arrives and sums the two: up to three V×H buffers at once (340 MB above
    model + gradients for SmolLM2's 49k×576 embedding, which is 28% of its parameters).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        return F.linear(hidden, weight)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        weight.grad.addmm_(grad_logits.reshape(-1, grad_logits.shape[-1]).T,
                           hidden.reshape(-1, hidden.shape[-1]).to(grad_logits.dtype))
        return grad_logits @ weight, None


@contextmanager
def lean_vocabulary_gradients(model) -> Iterator[None]:
    """Keep the vocabulary-sized layers from making V×H temporaries in the backward pass.

    The output head accumulates its gradient in place (``_HeadGradInPlace``) and the input embedding gives
    a sparse gradient (the rows of the tokens seen) that is added in place into its dense ``.grad``. The
    values are the same; every trainable ``.grad`` must be allocated beforehand (``mean_gradient`` does).
    Layers that are frozen, have a bias, or are not plain ``nn.Linear`` / ``nn.Embedding`` are left as
    they are.
    """
    undo = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear and head.bias is None and head.weight.requires_grad:
        head.forward = lambda hidden: _HeadGradInPlace.apply(hidden, head.weight)  # instance attribute
        undo.append(lambda: delattr(head, "forward"))
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(emb) is torch.nn.Embedding and emb.weight.requires_grad and not emb.sparse:
        emb.sparse = True
        undo.append(lambda: setattr(emb, "sparse", False))
    try:
        yield
    finally:
        for fn in undo:
            fn()


def mean_gradient(model, examples: list[Tokenized], batch_size: int, pad_id: int,
                  collate: Callable[[list[Tokenized]], dict[str, torch.Tensor]] | None = None,
                  checkpointing: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The gradient of the token-mean loss over ``examples``, per trainable parameter (fp32, on the model's device).

    Each micro-batch adds (its summed loss / all label tokens) to the ``.grad`` buffers, so the result is
    the mean over every label token of the sample whatever the batch size. ``checkpointing``: see
    ``layer_checkpointing`` (less memory, about a third more compute).
    """
    params = trainable_parameters(model)
    device = params[0][1].device
    total = sum(sum(1 for x in t.labels[1:] if x != IGNORE) for t in examples)
    if total == 0:
        raise ValueError("no label tokens in the calibration sample")
    for _, p in params:  # allocated up front: every micro-batch accumulates in place
        p.grad = torch.zeros_like(p)
    model.eval()  # no dropout: the gradient of the model as it stands
    with layer_checkpointing(model, checkpointing), lean_vocabulary_gradients(model):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = {k: v.to(device) for k, v in (collate(chunk) if collate else pad_batch(chunk, pad_id)).items()}
            (summed_token_loss(model, batch)[0] / total).backward()
    grads = [(n, p.grad.detach().float()) for n, p in params]
    for _, p in params:
        p.grad = None
    return grads


def estimate(model, tokenizer, sources: dict[str, list[Tokenized]], out: Path, *, keys: dict[str, str],
             spec: CompressionSpec, calibration_size: int, batch_size: int, seed: int,
             device: str | torch.device | None = None, checkpointing: bool = False) -> dict[str, dict]:
    """Compute, compress and store the mean gradient of each source in ``sources``.

    A source whose stored vector already carries its key (``keys[name]``) is skipped: that is how an
    interrupted run resumes. Each vector is written as soon as it is done.

    Returns:
        For each source computed here: calibration examples and tokens, and seconds spent on the
        gradient and on compressing it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [n for n in sources if store.stored_key(out, n) != keys[n]]
    stats: dict[str, dict] = {}
    if not todo:
        return stats
    device = torch.device(device) if device is not None else default_device()
    model.to(device=device, dtype=torch.float32)  # fp32 accumulation
    collate = collator_for(tokenizer)  # a VLM's batches carry pixels (None: text, pad_batch)
    for name in tqdm(todo, desc="gradients", unit="source", disable=None):
        calib = calibration_sample(sources[name], calibration_size, seed, name)
        t0 = time.perf_counter()
        grads = mean_gradient(model, calib, batch_size, tokenizer.pad_token_id, collate, checkpointing)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        vec = compress(grads, spec).cpu()
        t2 = time.perf_counter()
        del grads
        tokens = sum(len(t.input_ids) for t in calib)
        store.save_vector(out, name, vec, keys[name], calibration=len(calib), tokens=tokens, norm=float(vec.norm()))
        stats[name] = {"calibration": len(calib), "tokens": tokens, "gradient_s": round(t1 - t0, 3),
                       "compress_s": round(t2 - t1, 3)}
    return stats


def load_gradients(grads_dir: Path) -> tuple[list[str], torch.Tensor]:
    """Source names and the (T, D) matrix of their compressed gradients, in manifest order."""
    m = artifacts.read_manifest(grads_dir)
    names = [e["name"] for e in m["sources"]]
    rows = [load_file(str(Path(grads_dir) / e["file"]))["g"] for e in m["sources"]]
    return names, torch.stack(rows)
